//! `Seq2Seq::decoding_bytes` against what decoding allocates: this test binary's allocator
//! tracks the bytes live and their peak, and one test (alone in the binary, sequential) reads
//! the peak above the model's own bytes during greedy decoding and beam search.

use attn_core::kernels::Par;
use attn_nn::{Seq2Seq, Seq2SeqConfig};

mod tracking;
use tracking::peak_above_start;

#[global_allocator]
static ALLOCATOR: tracking::Tracking = tracking::Tracking;

/// The bound holds what greedy decoding and beam search allocate, at several widths and
/// lengths, and is loose by less than 3× (measured 1.7–2.6×: the caches dominate both).
#[test]
fn decoding_bytes_bound_what_decoding_allocates() {
    let pairs = [("3 March 2021", "2021-03-03"), ("12/05/1999", "1999-05-12")];
    let mut config = Seq2SeqConfig::for_pairs(&pairs);
    config.transformer.layer.d_model = 32;
    config.transformer.layer.nhead = 4;
    config.transformer.layer.dim_feedforward = 64;
    config.max_len = 40;
    let model = Seq2Seq::with_seed(config, 7).unwrap();
    let source = "3 March 2021";
    let n = source.chars().count();
    // The kernels' per-thread buffers are made on first use and kept: not decoding's.
    model.beam(&[source; 2], 2, 40, Par::Seq).unwrap();
    model.greedy(&[source; 64], 40, true, Par::Seq).unwrap();
    for (rows, max_len) in [(1, 40), (4, 40), (16, 12), (64, 40)] {
        let sources = vec![source; rows];
        let greedy = peak_above_start(|| {
            model.greedy(&sources, max_len, true, Par::Seq).unwrap();
        });
        let beam = peak_above_start(|| {
            model.beam(&[source], rows, max_len, Par::Seq).unwrap();
        });
        let bound = model.decoding_bytes(rows, n, max_len);
        for (what, peak) in [("greedy", greedy), ("beam", beam)] {
            assert!(
                peak as u128 <= bound,
                "{what} of {rows} rows, max_len {max_len}: {peak} bytes at the peak, bound {bound}"
            );
        }
        let most = greedy.max(beam) as u128;
        assert!(
            bound <= 3 * most,
            "{rows} rows, max_len {max_len}: bound {bound} against a peak of {most} bytes"
        );
    }
    // No width overflows it.
    assert!(model.decoding_bytes(usize::MAX, usize::MAX, usize::MAX) >= u128::from(u64::MAX));
}
