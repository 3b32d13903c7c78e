//! Dev tool: the AVX-512 GEMM micro-kernel's variants on one core, in one process, interleaved
//! 40 times; prints each variant's median GFLOP/s and the median of its per-round ratio to the
//! first (on a shared machine a ratio within a round is steadier than either side). The variants
//! are stand-alone copies of `gemm/avx512.rs`'s kernel, for choosing its shape and packing:
//! `A` row-major at a stride of 400 floats or step-major, the `B` panel prefetched or not, and
//! `rows × columns` shapes of 24–28 accumulators, over a block of 96 rows × 512 columns whose
//! panels stream from L2 as in the GEMM. docs/PERFORMANCE.md (issue 23, third part) quotes it.
//! `cargo run --release -p attn-kernels --example gemm_kernel_shapes [KC]` (1 to 384, default 384).

#[cfg(target_arch = "x86_64")]
mod bench {
    use std::arch::x86_64::*;

    /// Row stride of a row-major packed `A` sliver (the layout before step-major packing).
    const SA: usize = 400;
    const ROWS: usize = 96;
    const COLS: usize = 512;

    /// `R` rows × `V` zmm of `C` over `kc` steps: `a` step-major (`a[p·R + r]`) or row-major at
    /// stride [`SA`]; the `B` panel (`16·V` columns a row) prefetched `PF` steps ahead (0: not).
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const R: usize, const V: usize, const STEP_MAJOR: bool, const PF: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
    ) {
        let nr = 16 * V;
        // SAFETY: the caller sizes `a`, `b` (plus `PF` rows) and `c` for these offsets.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for p in 0..kc {
                if PF > 0 {
                    for v in 0..V {
                        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((p + PF) * nr + 16 * v).cast());
                    }
                }
                let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(p * nr + 16 * v)));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let at = if STEP_MAJOR { p * R + r } else { r * SA + p };
                    let x = _mm512_set1_ps(*a.add(at));
                    for (acc_rv, &bv) in acc_r.iter_mut().zip(&bv) {
                        *acc_rv = _mm512_fmadd_ps(x, bv, *acc_rv);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, &acc_rv) in acc_r.iter().enumerate() {
                    let out = c.add(r * COLS + 16 * v);
                    _mm512_storeu_ps(out, _mm512_add_ps(acc_rv, _mm512_loadu_ps(out)));
                }
            }
        }
    }

    type Block = fn(usize, &[f32], &[f32], &mut [f32]) -> f64;

    /// Seconds for the block of [`ROWS`] × [`COLS`] (whole kernels only) at depth `kc`, every
    /// sliver over every panel, per multiply-add.
    fn block<const R: usize, const V: usize, const STEP_MAJOR: bool, const PF: usize>(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
    ) -> f64 {
        let (slivers, panels) = (ROWS / R, COLS / (16 * V));
        let sliver = if STEP_MAJOR { R * kc } else { R * SA };
        let t = std::time::Instant::now();
        for _ in 0..10 {
            for s in 0..slivers {
                for q in 0..panels {
                    // SAFETY: AVX-512 F was checked in `run`; the buffers cover the block.
                    unsafe {
                        kernel::<R, V, STEP_MAJOR, PF>(
                            kc,
                            a.as_ptr().add(s * sliver),
                            b.as_ptr().add(q * kc * 16 * V),
                            c.as_mut_ptr().add(s * R * COLS + q * 16 * V),
                        )
                    }
                }
            }
        }
        t.elapsed().as_secs_f64() / (10 * slivers * R * panels * 16 * V * kc) as f64
    }

    fn compare(title: &str, kc: usize, variants: &[(&str, Block)]) {
        let a = vec![1.0f32; ROWS * SA.max(kc) + 64];
        let b = vec![1.0f32; (COLS + 64) * (kc + 16)];
        let mut c = vec![0.0f32; ROWS * COLS];
        let mut rates = vec![Vec::new(); variants.len()];
        for _ in 0..40 {
            for (i, (_, f)) in variants.iter().enumerate() {
                rates[i].push(2e-9 / f(kc, &a, &b, &mut c));
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!("{title}, KC = {kc}");
        for (i, (name, _)) in variants.iter().enumerate() {
            let ratios = rates[i].iter().zip(&rates[0]).map(|(x, y)| x / y).collect();
            println!(
                "  {name:34} {:6.1} GFLOP/s   {:.3} of the first",
                median(rates[i].clone()),
                median(ratios)
            );
        }
    }

    pub fn run(kc: usize) {
        if !is_x86_feature_detected!("avx512f") {
            println!("this CPU has no AVX-512 F: nothing to measure");
            return;
        }
        compare(
            "12 × 32, packing and prefetch",
            kc,
            &[
                ("A row-major, no prefetch", block::<12, 2, false, 0>),
                ("A row-major, B prefetched 8 ahead", block::<12, 2, false, 8>),
                ("A step-major, B prefetched 8 ahead", block::<12, 2, true, 8>),
            ],
        );
        compare(
            "shapes, A step-major, B prefetched 8 ahead",
            kc,
            &[
                ("12 × 32", block::<12, 2, true, 8>),
                ("14 × 32", block::<14, 2, true, 8>),
                ("8 × 48", block::<8, 3, true, 8>),
                ("7 × 48", block::<7, 3, true, 8>),
                ("6 × 64", block::<6, 4, true, 8>),
                ("4 × 96", block::<4, 6, true, 8>),
            ],
        );
    }
}

fn main() {
    // At most 384, so that a row-major sliver's rows (400 floats apart) never overlap.
    let kc = match std::env::args().nth(1).map(|s| s.parse::<usize>()) {
        None => 384,
        Some(Ok(kc)) if (1..=384).contains(&kc) => kc,
        Some(_) => {
            eprintln!("error: KC must be a whole number from 1 to 384");
            std::process::exit(2);
        }
    };
    #[cfg(target_arch = "x86_64")]
    bench::run(kc);
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only (AVX-512): nothing to measure, KC = {kc}");
}
