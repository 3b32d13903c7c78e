//! Dev tool: the own GEMM micro-kernel's inner loop with its operands in L1, against the
//! same FMAs on registers only, on one core, in `asm!` (so the compiler neither spills nor
//! drops anything). It measures what the loads of a micro-kernel cost before any cache miss:
//!
//! - `registers`: 24 FMAs a step on accumulators, the other operands in registers (the FMA
//!   ceiling of `fma_peak`, with the same loop overhead as the others);
//! - `8 × 48 from L1`: the GEMM's step (three zmm of a `B` row, eight broadcasts of `A`, 24 FMAs);
//! - `14 × 32 from L1`: two zmm of `B`, 14 broadcasts, 28 FMAs (as intrinsics the compiler
//!   spills it);
//!
//! and on a CPU with AVX2 but no AVX-512, the AVX2 GEMM's 6 × 16 step (two ymm of `B`, six
//! broadcasts, 12 FMAs) against the same 12 FMAs on registers;
//!
//! each over 200 steps of packed operands that stay in L1 (`A` 11 KiB at most, `B` 38 KiB),
//! 64-byte aligned, or 4 bytes past alignment with `misaligned` (every `B` load then splits a
//! cache line). Interleaved 21 times; prints each loop's median GFLOP/s and its median ratio to
//! `registers` in the same round. docs/PERFORMANCE.md quotes it (AVX-512 2026-12-06, AVX2
//! 2026-12-07).
//! `cargo run --release -p attn-kernels --example gemm_loop_ceiling [misaligned]`

#[cfg(target_arch = "x86_64")]
mod bench {
    /// `fn $name(a, b, steps)`: `steps` steps of the loop body `$step` (`a` and `b` advancing by
    /// `$a_step` and `$b_step` bytes a step), every vector register loaded from `b` first.
    macro_rules! asm_loop {
        ($name:ident, $a_step:literal, $b_step:literal, $($step:literal,)*) => {
            /// One loop of the table in the file's comment.
            #[target_feature(enable = "avx512f")]
            unsafe fn $name(a: *const f32, b: *const f32, steps: usize) {
                // SAFETY: the caller sizes `a` and `b` for `steps` steps; every vector register
                // is declared clobbered (each starts from `b`'s values, so none holds a
                // subnormal or a NaN from before), and the loop touches no stack.
                unsafe {
                    std::arch::asm!(
                        asm_init!(),
                        "2:",
                        $($step,)*
                        concat!("add {a}, ", $a_step),
                        concat!("add {b}, ", $b_step),
                        "dec {n}",
                        "jnz 2b",
                        a = inout(reg) a => _,
                        b = inout(reg) b => _,
                        n = inout(reg) steps => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                        out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _, out("zmm16") _, out("zmm17") _,
                        out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                        out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _, out("zmm28") _, out("zmm29") _,
                        out("zmm30") _, out("zmm31") _,
                        options(nostack, readonly),
                    );
                }
            }
        };
    }

    /// Loads every vector register from `b` (the eight lines from it, in turn).
    macro_rules! asm_init {
        () => {
            concat!(
                "vmovups zmm0, [{b} + 0]\n",
                "vmovups zmm1, [{b} + 64]\n",
                "vmovups zmm2, [{b} + 128]\n",
                "vmovups zmm3, [{b} + 192]\n",
                "vmovups zmm4, [{b} + 256]\n",
                "vmovups zmm5, [{b} + 320]\n",
                "vmovups zmm6, [{b} + 384]\n",
                "vmovups zmm7, [{b} + 448]\n",
                "vmovups zmm8, [{b} + 0]\n",
                "vmovups zmm9, [{b} + 64]\n",
                "vmovups zmm10, [{b} + 128]\n",
                "vmovups zmm11, [{b} + 192]\n",
                "vmovups zmm12, [{b} + 256]\n",
                "vmovups zmm13, [{b} + 320]\n",
                "vmovups zmm14, [{b} + 384]\n",
                "vmovups zmm15, [{b} + 448]\n",
                "vmovups zmm16, [{b} + 0]\n",
                "vmovups zmm17, [{b} + 64]\n",
                "vmovups zmm18, [{b} + 128]\n",
                "vmovups zmm19, [{b} + 192]\n",
                "vmovups zmm20, [{b} + 256]\n",
                "vmovups zmm21, [{b} + 320]\n",
                "vmovups zmm22, [{b} + 384]\n",
                "vmovups zmm23, [{b} + 448]\n",
                "vmovups zmm24, [{b} + 0]\n",
                "vmovups zmm25, [{b} + 64]\n",
                "vmovups zmm26, [{b} + 128]\n",
                "vmovups zmm27, [{b} + 192]\n",
                "vmovups zmm28, [{b} + 256]\n",
                "vmovups zmm29, [{b} + 320]\n",
                "vmovups zmm30, [{b} + 384]\n",
                "vmovups zmm31, [{b} + 448]\n",
            )
        };
    }

    asm_loop!(
        registers,
        32,
        192,
        "vfmadd231ps zmm0, zmm27, zmm24",
        "vfmadd231ps zmm1, zmm27, zmm25",
        "vfmadd231ps zmm2, zmm27, zmm26",
        "vfmadd231ps zmm3, zmm28, zmm24",
        "vfmadd231ps zmm4, zmm28, zmm25",
        "vfmadd231ps zmm5, zmm28, zmm26",
        "vfmadd231ps zmm6, zmm29, zmm24",
        "vfmadd231ps zmm7, zmm29, zmm25",
        "vfmadd231ps zmm8, zmm29, zmm26",
        "vfmadd231ps zmm9, zmm30, zmm24",
        "vfmadd231ps zmm10, zmm30, zmm25",
        "vfmadd231ps zmm11, zmm30, zmm26",
        "vfmadd231ps zmm12, zmm27, zmm24",
        "vfmadd231ps zmm13, zmm27, zmm25",
        "vfmadd231ps zmm14, zmm27, zmm26",
        "vfmadd231ps zmm15, zmm28, zmm24",
        "vfmadd231ps zmm16, zmm28, zmm25",
        "vfmadd231ps zmm17, zmm28, zmm26",
        "vfmadd231ps zmm18, zmm29, zmm24",
        "vfmadd231ps zmm19, zmm29, zmm25",
        "vfmadd231ps zmm20, zmm29, zmm26",
        "vfmadd231ps zmm21, zmm30, zmm24",
        "vfmadd231ps zmm22, zmm30, zmm25",
        "vfmadd231ps zmm23, zmm30, zmm26",
    );

    asm_loop!(
        loads_8x48,
        32,
        192,
        "vmovups zmm24, [{b} + 0]",
        "vmovups zmm25, [{b} + 64]",
        "vmovups zmm26, [{b} + 128]",
        "vbroadcastss zmm27, dword ptr [{a} + 0]",
        "vfmadd231ps zmm0, zmm27, zmm24",
        "vfmadd231ps zmm1, zmm27, zmm25",
        "vfmadd231ps zmm2, zmm27, zmm26",
        "vbroadcastss zmm28, dword ptr [{a} + 4]",
        "vfmadd231ps zmm3, zmm28, zmm24",
        "vfmadd231ps zmm4, zmm28, zmm25",
        "vfmadd231ps zmm5, zmm28, zmm26",
        "vbroadcastss zmm27, dword ptr [{a} + 8]",
        "vfmadd231ps zmm6, zmm27, zmm24",
        "vfmadd231ps zmm7, zmm27, zmm25",
        "vfmadd231ps zmm8, zmm27, zmm26",
        "vbroadcastss zmm28, dword ptr [{a} + 12]",
        "vfmadd231ps zmm9, zmm28, zmm24",
        "vfmadd231ps zmm10, zmm28, zmm25",
        "vfmadd231ps zmm11, zmm28, zmm26",
        "vbroadcastss zmm27, dword ptr [{a} + 16]",
        "vfmadd231ps zmm12, zmm27, zmm24",
        "vfmadd231ps zmm13, zmm27, zmm25",
        "vfmadd231ps zmm14, zmm27, zmm26",
        "vbroadcastss zmm28, dword ptr [{a} + 20]",
        "vfmadd231ps zmm15, zmm28, zmm24",
        "vfmadd231ps zmm16, zmm28, zmm25",
        "vfmadd231ps zmm17, zmm28, zmm26",
        "vbroadcastss zmm27, dword ptr [{a} + 24]",
        "vfmadd231ps zmm18, zmm27, zmm24",
        "vfmadd231ps zmm19, zmm27, zmm25",
        "vfmadd231ps zmm20, zmm27, zmm26",
        "vbroadcastss zmm28, dword ptr [{a} + 28]",
        "vfmadd231ps zmm21, zmm28, zmm24",
        "vfmadd231ps zmm22, zmm28, zmm25",
        "vfmadd231ps zmm23, zmm28, zmm26",
    );

    asm_loop!(
        loads_14x32,
        56,
        128,
        "vmovups zmm28, [{b}]",
        "vmovups zmm29, [{b} + 64]",
        "vbroadcastss zmm30, dword ptr [{a} + 0]",
        "vfmadd231ps zmm0, zmm30, zmm28",
        "vfmadd231ps zmm1, zmm30, zmm29",
        "vbroadcastss zmm31, dword ptr [{a} + 4]",
        "vfmadd231ps zmm2, zmm31, zmm28",
        "vfmadd231ps zmm3, zmm31, zmm29",
        "vbroadcastss zmm30, dword ptr [{a} + 8]",
        "vfmadd231ps zmm4, zmm30, zmm28",
        "vfmadd231ps zmm5, zmm30, zmm29",
        "vbroadcastss zmm31, dword ptr [{a} + 12]",
        "vfmadd231ps zmm6, zmm31, zmm28",
        "vfmadd231ps zmm7, zmm31, zmm29",
        "vbroadcastss zmm30, dword ptr [{a} + 16]",
        "vfmadd231ps zmm8, zmm30, zmm28",
        "vfmadd231ps zmm9, zmm30, zmm29",
        "vbroadcastss zmm31, dword ptr [{a} + 20]",
        "vfmadd231ps zmm10, zmm31, zmm28",
        "vfmadd231ps zmm11, zmm31, zmm29",
        "vbroadcastss zmm30, dword ptr [{a} + 24]",
        "vfmadd231ps zmm12, zmm30, zmm28",
        "vfmadd231ps zmm13, zmm30, zmm29",
        "vbroadcastss zmm31, dword ptr [{a} + 28]",
        "vfmadd231ps zmm14, zmm31, zmm28",
        "vfmadd231ps zmm15, zmm31, zmm29",
        "vbroadcastss zmm30, dword ptr [{a} + 32]",
        "vfmadd231ps zmm16, zmm30, zmm28",
        "vfmadd231ps zmm17, zmm30, zmm29",
        "vbroadcastss zmm31, dword ptr [{a} + 36]",
        "vfmadd231ps zmm18, zmm31, zmm28",
        "vfmadd231ps zmm19, zmm31, zmm29",
        "vbroadcastss zmm30, dword ptr [{a} + 40]",
        "vfmadd231ps zmm20, zmm30, zmm28",
        "vfmadd231ps zmm21, zmm30, zmm29",
        "vbroadcastss zmm31, dword ptr [{a} + 44]",
        "vfmadd231ps zmm22, zmm31, zmm28",
        "vfmadd231ps zmm23, zmm31, zmm29",
        "vbroadcastss zmm30, dword ptr [{a} + 48]",
        "vfmadd231ps zmm24, zmm30, zmm28",
        "vfmadd231ps zmm25, zmm30, zmm29",
        "vbroadcastss zmm31, dword ptr [{a} + 52]",
        "vfmadd231ps zmm26, zmm31, zmm28",
        "vfmadd231ps zmm27, zmm31, zmm29",
    );

    /// `fn $name(a, b, steps)` at AVX2: `$step` over 16 ymm registers, each loaded from `b` first.
    macro_rules! asm_loop_avx2 {
        ($name:ident, $($step:literal,)*) => {
            /// One AVX2 loop of the table in the file's comment.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name(a: *const f32, b: *const f32, steps: usize) {
                // SAFETY: as for `asm_loop!`, over the 16 ymm registers.
                unsafe {
                    std::arch::asm!(
                        "vmovups ymm0, [{b}]", "vmovups ymm1, [{b} + 32]", "vmovups ymm2, [{b} + 64]",
                        "vmovups ymm3, [{b} + 96]", "vmovups ymm4, [{b} + 128]", "vmovups ymm5, [{b} + 160]",
                        "vmovups ymm6, [{b} + 192]", "vmovups ymm7, [{b} + 224]", "vmovups ymm8, [{b}]",
                        "vmovups ymm9, [{b} + 32]", "vmovups ymm10, [{b} + 64]", "vmovups ymm11, [{b} + 96]",
                        "vmovups ymm12, [{b} + 128]", "vmovups ymm13, [{b} + 160]", "vmovups ymm14, [{b} + 192]",
                        "vmovups ymm15, [{b} + 224]",
                        "2:",
                        $($step,)*
                        "add {a}, 24",
                        "add {b}, 64",
                        "dec {n}",
                        "jnz 2b",
                        a = inout(reg) a => _,
                        b = inout(reg) b => _,
                        n = inout(reg) steps => _,
                        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
                        out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                        options(nostack, readonly),
                    );
                }
            }
        };
    }

    asm_loop_avx2!(
        registers_avx2,
        "vfmadd231ps ymm4, ymm2, ymm0",
        "vfmadd231ps ymm5, ymm2, ymm1",
        "vfmadd231ps ymm6, ymm3, ymm0",
        "vfmadd231ps ymm7, ymm3, ymm1",
        "vfmadd231ps ymm8, ymm2, ymm0",
        "vfmadd231ps ymm9, ymm2, ymm1",
        "vfmadd231ps ymm10, ymm3, ymm0",
        "vfmadd231ps ymm11, ymm3, ymm1",
        "vfmadd231ps ymm12, ymm2, ymm0",
        "vfmadd231ps ymm13, ymm2, ymm1",
        "vfmadd231ps ymm14, ymm3, ymm0",
        "vfmadd231ps ymm15, ymm3, ymm1",
    );

    asm_loop_avx2!(
        loads_6x16,
        "vmovups ymm0, [{b}]",
        "vmovups ymm1, [{b} + 32]",
        "vbroadcastss ymm2, dword ptr [{a} + 0]",
        "vfmadd231ps ymm4, ymm2, ymm0",
        "vfmadd231ps ymm5, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{a} + 4]",
        "vfmadd231ps ymm6, ymm3, ymm0",
        "vfmadd231ps ymm7, ymm3, ymm1",
        "vbroadcastss ymm2, dword ptr [{a} + 8]",
        "vfmadd231ps ymm8, ymm2, ymm0",
        "vfmadd231ps ymm9, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{a} + 12]",
        "vfmadd231ps ymm10, ymm3, ymm0",
        "vfmadd231ps ymm11, ymm3, ymm1",
        "vbroadcastss ymm2, dword ptr [{a} + 16]",
        "vfmadd231ps ymm12, ymm2, ymm0",
        "vfmadd231ps ymm13, ymm2, ymm1",
        "vbroadcastss ymm3, dword ptr [{a} + 20]",
        "vfmadd231ps ymm14, ymm3, ymm0",
        "vfmadd231ps ymm15, ymm3, ymm1",
    );

    type Loop = unsafe fn(*const f32, *const f32, usize);

    /// Steps of each call, and calls of each timing.
    const STEPS: usize = 200;
    const CALLS: usize = 6400;

    pub fn run(misaligned: bool) {
        let avx512 = is_x86_feature_detected!("avx512f");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if !(avx512 || avx2) {
            println!("this CPU has neither AVX-512 F nor AVX2 with FMA: nothing to measure");
            return;
        }
        // Small values, so that no sum overflows or goes subnormal.
        let mut state = 1u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2
        };
        let a: Vec<f32> = (0..STEPS * 16 + 64).map(|_| next()).collect();
        let b: Vec<f32> = (0..STEPS * 48 + 64).map(|_| next()).collect();
        let aligned = |p: *const f32| p.wrapping_add((64 - p as usize % 64) % 64 / 4 + usize::from(misaligned));
        let (ap, bp) = (aligned(a.as_ptr()), aligned(b.as_ptr()));
        // (name, loop, multiply-adds a step)
        let loops: Vec<(&str, Loop, usize)> = if avx512 {
            vec![
                ("registers", registers, 8 * 48),
                ("8 × 48 from L1", loads_8x48, 8 * 48),
                ("14 × 32 from L1", loads_14x32, 14 * 32),
            ]
        } else {
            vec![
                ("registers (AVX2)", registers_avx2, 6 * 16),
                ("6 × 16 from L1", loads_6x16, 6 * 16),
            ]
        };
        let mut rates = vec![Vec::new(); loops.len()];
        for _ in 0..21 {
            for (i, &(_, f, fmas)) in loops.iter().enumerate() {
                let t = std::time::Instant::now();
                for _ in 0..CALLS {
                    // SAFETY: the level of these loops was detected; `a` and `b` hold `STEPS`
                    // steps of any shape here past the aligned start.
                    unsafe { f(ap, bp, STEPS) };
                }
                rates[i].push(2.0 * (CALLS * STEPS * fmas) as f64 / t.elapsed().as_secs_f64() * 1e-9);
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let alignment = if misaligned {
            "4 bytes past a line"
        } else {
            "64-byte aligned"
        };
        println!("one core, operands {alignment}, {STEPS} steps a call");
        for (i, (name, _, _)) in loops.iter().enumerate() {
            let ratios = rates[i].iter().zip(&rates[0]).map(|(x, y)| x / y).collect();
            println!(
                "  {name:18} {:6.1} GFLOP/s   {:.3} of registers",
                median(rates[i].clone()),
                median(ratios)
            );
        }
    }
}

fn main() {
    let misaligned = std::env::args().nth(1).as_deref() == Some("misaligned");
    #[cfg(target_arch = "x86_64")]
    bench::run(misaligned);
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only (AVX-512 or AVX2): nothing to measure ({misaligned})");
}
