//! A self-contained HTML page of a translation's cross-attention: the model and the input
//! named at the top, a matrix view (output characters down, source characters across) for
//! every layer and head and their mean, a token view (point at an output character to see
//! where it looked), and a legend. No network, no external script.

use attn_nn::Seq2Seq;
use serde_json::json;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page for `source` -> `output`, with `weights[layer]` = `[H, T, S]` over `rows` (T) and
/// `cols` (S).
pub fn page(
    model: &Seq2Seq,
    source: &str,
    output: &str,
    rows: &[String],
    cols: &[String],
    weights: &[Vec<f32>],
) -> String {
    let layer = &model.config().transformer;
    let heads = layer.layer.nhead;
    let (t, s) = (rows.len(), cols.len());
    // views[v] = [T·S] weights; the first is the mean.
    let mut views: Vec<(String, Vec<f32>)> = vec![("mean of all layers and heads".into(), averaged(weights, t, s))];
    for (l, w) in weights.iter().enumerate() {
        for h in 0..heads {
            views.push((format!("layer {l}, head {h}"), w[h * t * s..(h + 1) * t * s].to_vec()));
        }
    }
    let data = json!({
        "rows": rows, "cols": cols,
        "views": views.iter().map(|(n, w)| json!({"name": n, "w": w.iter().map(|x| (x * 1000.0).round() / 1000.0).collect::<Vec<_>>()})).collect::<Vec<_>>(),
    });
    let model_line = format!(
        "d_model {}, {} heads, {} encoder and {} decoder layers, {} parameters",
        layer.layer.d_model,
        heads,
        layer.num_encoder_layers,
        layer.num_decoder_layers,
        model.parameter_count()
    );
    format!(
        r##"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attn: cross-attention of {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }} .meta {{ color: #555; margin-bottom: 16px; }}
.views {{ display: flex; gap: 40px; flex-wrap: wrap; align-items: flex-start; }}
table.matrix {{ border-collapse: collapse; }} table.matrix td {{ width: 22px; height: 22px; padding: 0; }}
table.matrix th {{ font: 13px monospace; padding: 0 4px; }} table.matrix thead th {{ writing-mode: vertical-rl; }}
.tokens span {{ font: 20px monospace; padding: 3px 2px; margin: 1px; display: inline-block; border-radius: 3px; }}
.out span {{ cursor: pointer; border: 1px solid #ccc; }} .out span.on {{ border-color: #000; }}
.legend {{ display: flex; align-items: center; gap: 8px; margin-top: 12px; font-size: 13px; }}
.legend .bar {{ width: 200px; height: 12px; background: linear-gradient(to right, rgb(255,255,255), rgb(8,48,107)); border: 1px solid #999; }}
</style></head><body>
<h1>Cross-attention: which source characters each output character looked at</h1>
<div class="meta">Model: sequence-to-sequence Transformer ({model_line}).<br>
Input: <code id="source">{source}</code> &rarr; output: <code id="output">{output}</code></div>
<label>View: <select id="view"></select></label>
<div class="views">
<div><h2>Matrix</h2><table class="matrix" id="matrix"></table></div>
<div><h2>Tokens</h2><p>Point at an output character.</p>
<div class="tokens out" id="out"></div><div class="tokens" id="src"></div></div>
</div>
<div class="legend"><span>0</span><span class="bar"></span><span>1 (all of the character's attention)</span></div>
<script>
const data = {data};
const shade = w => {{ const k = Math.max(0, Math.min(1, w)); const c = (a, b) => Math.round(a + (b - a) * Math.sqrt(k));
  return `rgb(${{c(255,8)}},${{c(255,48)}},${{c(255,107)}})`; }};
const select = document.getElementById("view");
data.views.forEach((v, i) => {{ const o = document.createElement("option"); o.value = i; o.textContent = v.name; select.appendChild(o); }});
function draw() {{
  const v = data.views[select.value], S = data.cols.length;
  let html = "<thead><tr><th></th>" + data.cols.map(c => `<th>${{c.replace(/</g, "&lt;")}}</th>`).join("") + "</tr></thead><tbody>";
  data.rows.forEach((r, i) => {{
    html += `<tr><th>${{r.replace(/</g, "&lt;")}}</th>` + data.cols.map((c, j) => {{ const w = v.w[i * S + j];
      return `<td title="${{r}} → ${{c}}: ${{w.toFixed(3)}}" style="background:${{shade(w)}}"></td>`; }}).join("") + "</tr>";
  }});
  document.getElementById("matrix").innerHTML = html + "</tbody>";
  const out = document.getElementById("out"), src = document.getElementById("src");
  out.innerHTML = data.rows.map((r, i) => `<span data-i="${{i}}">${{r.replace(/</g, "&lt;")}}</span>`).join("");
  src.innerHTML = data.cols.map(c => `<span>${{c.replace(/</g, "&lt;")}}</span>`).join("");
  out.querySelectorAll("span").forEach(el => el.addEventListener("mouseenter", () => {{
    out.querySelectorAll("span").forEach(x => x.classList.remove("on")); el.classList.add("on");
    const i = +el.dataset.i;
    src.querySelectorAll("span").forEach((x, j) => {{ const w = v.w[i * S + j]; x.style.background = shade(w);
      x.style.color = w > 0.5 ? "#fff" : "#222"; x.title = w.toFixed(3); }});
  }}));
  out.querySelector("span").dispatchEvent(new Event("mouseenter"));
}}
select.addEventListener("change", draw); draw();
</script></body></html>
"##,
        title = escape(source),
        source = escape(source),
        output = escape(output),
        model_line = escape(&model_line),
        data = data,
    )
}

/// The mean over layers and heads, `[T, S]`.
pub fn averaged(weights: &[Vec<f32>], t: usize, s: usize) -> Vec<f32> {
    let mut mean = vec![0.0f32; t * s];
    let mut count = 0;
    for layer in weights {
        for head in layer.chunks_exact(t * s) {
            mean.iter_mut().zip(head).for_each(|(m, &w)| *m += w);
            count += 1;
        }
    }
    mean.iter_mut().for_each(|m| *m /= count.max(1) as f32);
    mean
}
