//! Dev tool: the f32 FMA ceiling of this machine, the number every f32 kernel is measured
//! against. Each thread runs FMAs into 24 independent zmm (or, without AVX-512, 12 ymm)
//! accumulators, enough to cover the FMA latency on two ports, with no loads; the threads start
//! together and the figure is their total GFLOP/s over the slowest thread's time. Median of
//! `ROUNDS` runs of about 0.1 s each.
//!
//! `cargo run --release -p attn-kernels --example fma_peak [THREADS] [ROUNDS] [ymm]` (2 and 9
//! by default; `ymm` takes the AVX2 loop even where AVX-512 is present); prints one line of
//! JSON. `xtask/python/bench_peak.py` runs it between MKL's and
//! attn's kernels to give each as a fraction of it.

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::hint::black_box;

    /// Independent accumulators: with two FMA ports of latency 4, at least 8 are needed.
    const ACC: usize = 24;

    /// `iters` rounds of [`ACC`] independent FMAs of 16 lanes, in `asm!` so that the compiler
    /// neither spills an accumulator nor drops the work.
    #[target_feature(enable = "avx512f")]
    unsafe fn zmm(iters: u64) {
        // SAFETY: AVX-512 F is checked by the caller; only vector registers and the counter
        // are written, and they are declared clobbered. Every register starts at zero, so no
        // subnormal or NaN from before slows an FMA.
        unsafe {
            std::arch::asm!(
                "vpxord zmm0, zmm0, zmm0",
                "vpxord zmm1, zmm1, zmm1",
                "vpxord zmm2, zmm2, zmm2",
                "vpxord zmm3, zmm3, zmm3",
                "vpxord zmm4, zmm4, zmm4",
                "vpxord zmm5, zmm5, zmm5",
                "vpxord zmm6, zmm6, zmm6",
                "vpxord zmm7, zmm7, zmm7",
                "vpxord zmm8, zmm8, zmm8",
                "vpxord zmm9, zmm9, zmm9",
                "vpxord zmm10, zmm10, zmm10",
                "vpxord zmm11, zmm11, zmm11",
                "vpxord zmm12, zmm12, zmm12",
                "vpxord zmm13, zmm13, zmm13",
                "vpxord zmm14, zmm14, zmm14",
                "vpxord zmm15, zmm15, zmm15",
                "vpxord zmm16, zmm16, zmm16",
                "vpxord zmm17, zmm17, zmm17",
                "vpxord zmm18, zmm18, zmm18",
                "vpxord zmm19, zmm19, zmm19",
                "vpxord zmm20, zmm20, zmm20",
                "vpxord zmm21, zmm21, zmm21",
                "vpxord zmm22, zmm22, zmm22",
                "vpxord zmm23, zmm23, zmm23",
                "vpxord zmm30, zmm30, zmm30",
                "vpxord zmm31, zmm31, zmm31",
                "2:",
                "vfmadd231ps zmm0, zmm30, zmm31",
                "vfmadd231ps zmm1, zmm30, zmm31",
                "vfmadd231ps zmm2, zmm30, zmm31",
                "vfmadd231ps zmm3, zmm30, zmm31",
                "vfmadd231ps zmm4, zmm30, zmm31",
                "vfmadd231ps zmm5, zmm30, zmm31",
                "vfmadd231ps zmm6, zmm30, zmm31",
                "vfmadd231ps zmm7, zmm30, zmm31",
                "vfmadd231ps zmm8, zmm30, zmm31",
                "vfmadd231ps zmm9, zmm30, zmm31",
                "vfmadd231ps zmm10, zmm30, zmm31",
                "vfmadd231ps zmm11, zmm30, zmm31",
                "vfmadd231ps zmm12, zmm30, zmm31",
                "vfmadd231ps zmm13, zmm30, zmm31",
                "vfmadd231ps zmm14, zmm30, zmm31",
                "vfmadd231ps zmm15, zmm30, zmm31",
                "vfmadd231ps zmm16, zmm30, zmm31",
                "vfmadd231ps zmm17, zmm30, zmm31",
                "vfmadd231ps zmm18, zmm30, zmm31",
                "vfmadd231ps zmm19, zmm30, zmm31",
                "vfmadd231ps zmm20, zmm30, zmm31",
                "vfmadd231ps zmm21, zmm30, zmm31",
                "vfmadd231ps zmm22, zmm30, zmm31",
                "vfmadd231ps zmm23, zmm30, zmm31",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _, out("zmm16") _, out("zmm17") _,
                out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                out("zmm30") _, out("zmm31") _,
                options(nostack, nomem),
            );
        }
    }

    /// [`zmm`] at 8 lanes, 12 accumulators (AVX2 has 16 registers).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn ymm(iters: u64) {
        // SAFETY: AVX2 and FMA are checked by the caller; as for [`zmm`].
        unsafe {
            std::arch::asm!(
                "vxorps ymm0, ymm0, ymm0",
                "vxorps ymm1, ymm1, ymm1",
                "vxorps ymm2, ymm2, ymm2",
                "vxorps ymm3, ymm3, ymm3",
                "vxorps ymm4, ymm4, ymm4",
                "vxorps ymm5, ymm5, ymm5",
                "vxorps ymm6, ymm6, ymm6",
                "vxorps ymm7, ymm7, ymm7",
                "vxorps ymm8, ymm8, ymm8",
                "vxorps ymm9, ymm9, ymm9",
                "vxorps ymm10, ymm10, ymm10",
                "vxorps ymm11, ymm11, ymm11",
                "vxorps ymm14, ymm14, ymm14",
                "vxorps ymm15, ymm15, ymm15",
                "2:",
                "vfmadd231ps ymm0, ymm14, ymm15",
                "vfmadd231ps ymm1, ymm14, ymm15",
                "vfmadd231ps ymm2, ymm14, ymm15",
                "vfmadd231ps ymm3, ymm14, ymm15",
                "vfmadd231ps ymm4, ymm14, ymm15",
                "vfmadd231ps ymm5, ymm14, ymm15",
                "vfmadd231ps ymm6, ymm14, ymm15",
                "vfmadd231ps ymm7, ymm14, ymm15",
                "vfmadd231ps ymm8, ymm14, ymm15",
                "vfmadd231ps ymm9, ymm14, ymm15",
                "vfmadd231ps ymm10, ymm14, ymm15",
                "vfmadd231ps ymm11, ymm14, ymm15",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters => _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
                out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                out("ymm14") _, out("ymm15") _,
                options(nostack, nomem),
            );
        }
    }

    /// Flops of one call of the level's loop per iteration.
    pub fn flops_per_iter(avx512: bool) -> f64 {
        if avx512 {
            (ACC * 16 * 2) as f64
        } else {
            (12 * 8 * 2) as f64
        }
    }

    /// Runs the loop on `threads` threads at once; the slowest thread's seconds.
    pub fn run(threads: usize, iters: u64, avx512: bool) -> f64 {
        let barrier = std::sync::Barrier::new(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let t0 = std::time::Instant::now();
                        // SAFETY: the level's features were detected by the caller.
                        unsafe {
                            if avx512 {
                                zmm(black_box(iters))
                            } else {
                                ymm(black_box(iters))
                            }
                        };
                        t0.elapsed().as_secs_f64()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).fold(0.0, f64::max)
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: fma_peak [THREADS ≥ 1] [ROUNDS ≥ 1] [ymm]";
    let fail = |what: String| -> ! {
        eprintln!("fma_peak: {what}; {usage}");
        std::process::exit(2)
    };
    let number = |i: usize, name: &str, default: usize| match args.get(i) {
        None => default,
        Some(a) => match a.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => fail(format!("{name} is {a:?}, expected a whole number of at least 1")),
        },
    };
    let (threads, rounds) = (number(0, "THREADS", 2), number(1, "ROUNDS", 9));
    // `ymm` as a third argument measures the AVX2 loop on an AVX-512 machine too.
    let ymm = match args.get(2).map(String::as_str) {
        None => false,
        Some("ymm") => true,
        Some(other) => fail(format!("the third argument is {other:?}, expected `ymm`")),
    };
    if args.len() > 3 {
        fail(format!("{} arguments, expected at most 3", args.len()));
    }
    let avx512 = is_x86_feature_detected!("avx512f") && !ymm;
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    if !(avx512 || avx2) {
        eprintln!("fma_peak: this CPU has neither AVX-512 nor AVX2+FMA");
        std::process::exit(1);
    }
    // About 0.1 s a round at 100 GFLOP/s a thread.
    let iters = 10_000_000_000 / peak::flops_per_iter(avx512) as u64;
    peak::run(threads, iters / 10, avx512);
    let mut rates: Vec<f64> = (0..rounds)
        .map(|_| threads as f64 * iters as f64 * peak::flops_per_iter(avx512) / peak::run(threads, iters, avx512) / 1e9)
        .collect();
    rates.sort_by(f64::total_cmp);
    println!(
        "{{\"threads\": {threads}, \"vector_bits\": {}, \"median_gflops\": {:.1}, \"max_gflops\": {:.1}}}",
        if avx512 { 512 } else { 256 },
        rates[rates.len() / 2],
        rates[rates.len() - 1]
    );
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("fma_peak: x86-64 only");
    std::process::exit(1);
}
