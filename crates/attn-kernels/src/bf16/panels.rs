//! [`Bf16Panels`]: a right operand rounded to bf16 and packed once, its storage kept for the
//! next packing of its size, and the packing itself.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx512bf16;
use super::*;
use crate::bf16_grad::Layout;
use crate::{Par, View2};

/// A `[K, N]` right operand rounded to bf16 and packed once for [`gemm_bf16`]: panels of 16
/// columns, each `[K / 2 pairs][16][2]` (an odd `K` gets a zero row, a ragged `N` zero
/// columns), padded with zero pairs to a multiple of 16 pairs (32 rows of `K`), so that a
/// panel is a whole number of AMX B tiles. For a linear layer's weight `W: [out, in]`, pack `Wᵀ` (a permuted view) once at
/// load; the packing reads any strides, and at the AVX512-BF16 level converts 16 values per
/// instruction when either dimension is contiguous. Mixed-precision training packs every weight
/// again after each update, so a dropped packing's storage is kept for the next one of its
/// size (up to 2 GiB in all) instead of going back to the system, whose fresh
/// pages would cost a fault each.
#[derive(Debug)]
pub struct Bf16Panels {
    k: usize,
    n: usize,
    /// `[n.div_ceil(16)][padded_pairs(k)][16]` pairs from `start`, the first 64-byte
    /// boundary (a tile or vector load never straddles two cache lines).
    data: Vec<u32>,
    start: usize,
}

/// Words in a cache line.
const LINE_WORDS: usize = 16;

/// Pairs per panel of [`Bf16Panels`] for a depth `k`: `ceil(k / 2)` rounded up to a multiple
/// of 16 (an AMX tile's depth).
pub(crate) fn padded_pairs(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(16)
}

/// Words of dropped packings kept for the next packings (2 GiB).
const SPARE_MAX_WORDS: usize = 1 << 29;
/// Packings smaller than this (64 KiB) are not kept.
const SPARE_MIN_WORDS: usize = 1 << 14;

/// Storage of dropped [`Bf16Panels`], for the next packings of about its size.
static SPARE: std::sync::Mutex<Vec<Vec<u32>>> = std::sync::Mutex::new(Vec::new());

/// Packings of at least this many words (32 KiB) fill their panels in parallel: mixed-precision
/// training packs a d_model 128 model's weights again after every update.
const PACK_PARALLEL_WORDS: usize = 1 << 13;

/// `fill((panel, words))` for each panel of `panel_len` words, in parallel when there are enough.
fn fill_panels(words: &mut [u32], panel_len: usize, fill: impl Fn((usize, &mut [u32])) + Send + Sync) {
    if words.len() >= PACK_PARALLEL_WORDS {
        words.par_chunks_exact_mut(panel_len).enumerate().for_each(fill);
    } else {
        words.chunks_exact_mut(panel_len).enumerate().for_each(fill);
    }
}

/// `len` words from a 64-byte boundary, and the index of the boundary: a kept buffer of at
/// least `len` and at most twice that, holding what its last packing left, or a new one of
/// zeros. Every caller writes all `len` words (a mixed-precision step packs every weight again
/// after each update, and zeroing them first was 1.3% of a step).
fn take_words(len: usize) -> (Vec<u32>, usize) {
    let room = len + LINE_WORDS - 1;
    let aligned = |mut words: Vec<u32>| {
        words.resize(room, 0);
        let misalign = (words.as_ptr() as usize / 4) % LINE_WORDS;
        ((words), (LINE_WORDS - misalign) % LINE_WORDS)
    };
    if room >= SPARE_MIN_WORDS {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        let best = (0..spare.len())
            .filter(|&i| (room..=2 * room).contains(&spare[i].capacity()))
            .min_by_key(|&i| spare[i].capacity());
        if let Some(i) = best {
            return aligned(spare.swap_remove(i));
        }
    }
    aligned(Vec::with_capacity(room))
}

impl Clone for Bf16Panels {
    /// The same words in new storage, aligned again (a derived clone would keep the old
    /// offset in an allocation aligned elsewhere).
    fn clone(&self) -> Self {
        let words = self.words();
        let (mut data, start) = take_words(words.len());
        data[start..start + words.len()].copy_from_slice(words);
        Bf16Panels {
            k: self.k,
            n: self.n,
            data,
            start,
        }
    }
}

impl Drop for Bf16Panels {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.data);
        if words.capacity() < SPARE_MIN_WORDS {
            return;
        }
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        let kept: usize = spare.iter().map(Vec::capacity).sum();
        if kept + words.capacity() <= SPARE_MAX_WORDS {
            spare.push(words);
        }
    }
}

impl Bf16Panels {
    /// Rounds `b: [K, N]` to bf16 and packs it (in parallel on the current rayon pool when
    /// large; the same words either way).
    pub fn pack(b: View2<'_, f32>) -> Self {
        let [k, n] = b.shape();
        let pairs = k.div_ceil(2);
        let len = n.div_ceil(PANEL) * padded_pairs(k) * PANEL;
        let (mut data, start) = take_words(len);
        // `max(1)`: an empty depth has no panels to fill (and chunks of 0 are not allowed).
        let panel_len = (padded_pairs(k) * PANEL).max(1);
        if b.strides() == [n, 1] && k > 0 && n > 0 && crate::bf16_level().has_avx512bf16() {
            // A dense operand: a pair of rows at a time across every panel (two read streams),
            // as the weight gradient packs its operands.
            let words = &mut data[start..start + len];
            let par = if len >= PACK_PARALLEL_WORDS {
                Par::Rayon
            } else {
                Par::Seq
            };
            // SAFETY: u32 and f32 have the same size and alignment, and `pack_pairs` writes
            // every word of `words` (the panels with their padding pairs) as f32 bits.
            let slots = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<f32>(), len) };
            crate::bf16_grad::pack_pairs(
                slots,
                &b.data()[..k * n],
                [k, n],
                Layout::PaddedPanels(padded_pairs(k)),
                par,
            );
            return Bf16Panels { k, n, data, start };
        }
        // The pairs past the depth, up to the padded depth, are zeros.
        let fill = |(panel, out): (usize, &mut [u32])| {
            pack_panel(&mut out[..pairs * PANEL], b, panel * PANEL, pairs);
            out[pairs * PANEL..].fill(0);
        };
        fill_panels(&mut data[start..start + len], panel_len, fill);
        Bf16Panels { k, n, data, start }
    }

    /// Packs `b: [K, N]` given as bf16 bits (as a BF16 safetensors file holds a weight), with
    /// no f32 copy: the same words as [`Bf16Panels::pack`] of the widened values (subnormals
    /// flushed to signed zeros and NaNs made quiet, as the conversion does), so a model loaded
    /// from bf16 bits computes exactly what it computes from those bits widened to f32.
    pub fn from_bits(b: View2<'_, u16>) -> Self {
        let [k, n] = b.shape();
        let pairs = k.div_ceil(2);
        let len = n.div_ceil(PANEL) * padded_pairs(k) * PANEL;
        let (mut data, start) = take_words(len);
        let words = &mut data[start..start + len];
        let panel_len = (padded_pairs(k) * PANEL).max(1);
        let canonical = |h: u16| f32_to_bf16(bf16_to_f32(h)) as u32;
        let fill = |(panel, out): (usize, &mut [u32])| {
            let j0 = panel * PANEL;
            let cols = (n - j0).min(PANEL);
            for l in 0..cols {
                for q in 0..pairs {
                    let lo = canonical(b.get([2 * q, j0 + l]));
                    let hi = if 2 * q + 1 < k {
                        canonical(b.get([2 * q + 1, j0 + l]))
                    } else {
                        0
                    };
                    out[q * PANEL + l] = lo | hi << 16;
                }
            }
            for q in 0..pairs {
                out[q * PANEL + cols..(q + 1) * PANEL].fill(0);
            }
            out[pairs * PANEL..].fill(0);
        };
        fill_panels(words, panel_len, fill);
        Bf16Panels { k, n, data, start }
    }

    /// The packed words (without the alignment slack).
    pub(crate) fn words(&self) -> &[u32] {
        &self.data[self.start..self.start + self.n.div_ceil(PANEL) * padded_pairs(self.k) * PANEL]
    }

    /// `[K, N]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.k, self.n]
    }

    /// Bytes held (2 per value, padding included).
    pub fn size_in_bytes(&self) -> usize {
        self.words().len() * 4
    }

    /// The packed values widened to f32, `[K, N]` row-major: the operand rounded to bf16.
    pub fn widened(&self) -> Vec<f32> {
        let pairs = padded_pairs(self.k);
        let mut out = vec![0.0f32; self.k * self.n];
        for p in 0..self.k {
            for j in 0..self.n {
                let word = self.words()[(j / PANEL) * pairs * PANEL + (p / 2) * PANEL + j % PANEL];
                let half = if p % 2 == 0 { word as u16 } else { (word >> 16) as u16 };
                out[p * self.n + j] = bf16_to_f32(half);
            }
        }
        out
    }
}

/// Panel `[pairs][16]` of `b: [K, N]` for columns `j0..j0 + 16` (zeros past `N` and after an
/// odd `K`): two rows at a time by one conversion when rows are contiguous (and spaced: a
/// dense operand goes through `pack_pairs`); when columns are (a transposed view, as a
/// weight's `Wᵀ`), each of the 16 columns whole, 32 values per conversion, into 16 × 16 blocks
/// of words, each then transposed into 16 pairs.
fn pack_panel(out: &mut [u32], b: View2<'_, f32>, j0: usize, pairs: usize) {
    let [k, n] = b.shape();
    let [rs, cs] = b.strides();
    let cols = (n - j0).min(PANEL);
    let data = b.data();
    #[cfg(target_arch = "x86_64")]
    if crate::bf16_level().has_avx512bf16() {
        if cs == 1 && cols == PANEL {
            let zeros = [0.0f32; PANEL];
            for (q, words) in out.chunks_exact_mut(PANEL).enumerate() {
                let lo = &data[2 * q * rs + j0..][..PANEL];
                let hi = if 2 * q + 1 < k {
                    &data[(2 * q + 1) * rs + j0..][..PANEL]
                } else {
                    &zeros[..]
                };
                // SAFETY: the level was detected; `lo` and `hi` hold 16 values, `words` 16 slots.
                unsafe { avx512bf16::interleave16(lo.as_ptr(), hi.as_ptr(), words.as_mut_ptr().cast()) };
            }
            return;
        }
        if rs == 1 {
            // Each of the 16 columns (a row of `W` for `Wᵀ`) read once from start to end and
            // rounded into its row of every 16 × 16 block of words (block `s` holds pairs
            // `16s ..`), then each block transposed into the panel's 16 pairs.
            let steps = pairs.div_ceil(PANEL);
            let mut blocks = vec![[[0.0f32; PANEL]; PANEL]; steps];
            for l in 0..cols {
                let start = (j0 + l) * cs;
                // SAFETY: the level was detected; the column's `k` values are inside the
                // checked view, at most `32·steps`; row `l` of block `s` is 16 words at
                // `l·16 + s·256` inside `blocks`.
                unsafe {
                    avx512bf16::convert_row_steps(
                        &data[start..start + k],
                        1.0,
                        steps,
                        blocks.as_mut_ptr().cast::<f32>().add(l * PANEL),
                        PANEL * PANEL,
                    )
                };
            }
            for (s, block) in blocks.iter().enumerate() {
                let (q0, count) = (s * PANEL, (pairs - s * PANEL).min(PANEL));
                let dst = &mut out[q0 * PANEL..(q0 + count) * PANEL];
                if count == PANEL {
                    // SAFETY: AVX-512F (the level); `dst` holds 16 rows of 16 words.
                    unsafe { avx512bf16::transpose16(block, dst.as_mut_ptr().cast(), PANEL) };
                } else {
                    let mut tile = [0.0f32; PANEL * PANEL];
                    // SAFETY: as above, into `tile`.
                    unsafe { avx512bf16::transpose16(block, tile.as_mut_ptr(), PANEL) };
                    for (word, value) in dst.iter_mut().zip(&tile) {
                        *word = value.to_bits();
                    }
                }
            }
            return;
        }
    }
    let _ = (rs, cs, data);
    for q in 0..pairs {
        for l in 0..PANEL {
            out[q * PANEL + l] = if l < cols {
                let j = j0 + l;
                let hi = if 2 * q + 1 < k { b.get([2 * q + 1, j]) } else { 0.0 };
                pair(b.get([2 * q, j]), hi)
            } else {
                0
            };
        }
    }
}
