"""An independent check of the shipped date translator: random dates drawn with Python's datetime
(not `attn dates`), written in the eleven styles with random leading zeros, letter case (title case
too, which `attn dates` never writes) and runs of spaces, and non-existent dates; prints the share
translated exactly and the share answered `?`.

    python3 xtask/python/dates_independent.py 3000 target/release/attn
"""
import random, datetime, subprocess, sys
random.seed(7)
M = ["January","February","March","April","May","June","July","August","September","October","November","December"]
W = ["Monday","Tuesday","Wednesday","Thursday","Friday","Saturday","Sunday"]
def ordn(d): return "th" if 11 <= d % 100 <= 13 else {1:"st",2:"nd",3:"rd"}.get(d % 10, "th")
def z(n, p): return f"{n:02d}" if p else str(n)
rows = []
start = datetime.date(1900,1,1)
for _ in int(sys.argv[1]) * [0]:
    d = start + datetime.timedelta(days=random.randrange(73049))
    zd, zm = random.random() < .5, random.random() < .5
    m, wd = M[d.month-1], W[d.weekday()]
    styles = [f"{z(d.day,zd and random.random()<.3)} {m} {d.year}", f"{m} {d.day}, {d.year}", f"{d.day} {m[:3]} {d.year}",
              f"{m[:3]} {d.day}, {d.year}", f"{wd}, {d.day} {m} {d.year}", f"{wd.lower()} {d.day} {m[:3].lower()} {d.year}",
              f"{z(d.day,zd)}.{z(d.month,zm)}.{d.year}", f"{d.year}/{z(d.month,zm)}/{z(d.day,zd)}",
              f"the {d.day}{ordn(d.day)} of {m} {d.year}", f"{m} {d.day}{ordn(d.day)}, {d.year}", f"{d.year}-{d.month:02d}-{d.day:02d}"]
    s = random.choice(styles)
    s = random.choice([s, s.lower(), s.upper(), s.title()])
    if random.random() < .3:
        s = " " * random.randrange(3) + s.replace(" ", " " * random.randint(1, 3)) + " " * random.randrange(3)
    rows.append((s, d.isoformat()))
bad = []
for _ in range(int(sys.argv[1]) // 2):
    y = random.randrange(1900, 2100); mo = random.choice([2, 4, 6, 9, 11])
    last = 29 if (mo == 2 and (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0))) else (28 if mo == 2 else 30)
    dd = random.randrange(last + 1, 32)
    bad.append(random.choice([f"{dd} {M[mo-1]} {y}", f"{dd}.{mo}.{y}", f"{y}/{mo:02d}/{dd:02d}", f"{M[mo-1]} {dd}, {y}"]))
import tempfile, os
tmp = tempfile.mkdtemp()
open(os.path.join(tmp, "dates.txt"), "w").write("\n".join(r[0] for r in rows) + "\n")
open(os.path.join(tmp, "bad.txt"), "w").write("\n".join(bad) + "\n")
out = subprocess.run([sys.argv[2], "translate", "--input", os.path.join(tmp, "dates.txt")], capture_output=True, text=True).stdout.split("\n")
ok = sum(o == t for o, (_, t) in zip(out, rows))
miss = [(s, o, t) for o, (s, t) in zip(out, rows) if o != t]
print(f"valid: {ok}/{len(rows)} = {100*ok/len(rows):.2f}%", miss[:5])
out = subprocess.run([sys.argv[2], "translate", "--input", os.path.join(tmp, "bad.txt")], capture_output=True, text=True).stdout.split("\n")
q = sum(o == "?" for o in out[:len(bad)])
print(f"nonexistent: {q}/{len(bad)} = {100*q/len(bad):.2f}%", [(b, o) for b, o in zip(bad, out) if o != "?"][:5])
