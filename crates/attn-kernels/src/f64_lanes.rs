//! Eight f64 lanes written once over the vector width (one zmm, two ymm, or an array): the
//! f64 sums of the norms' backward (`grad/norm.rs`) and of the attention backward's row deltas
//! (`backward/deltas.rs`). Every level evaluates the same f64 operations in the same order
//! (element `j` in lane `j mod 8`, no fused multiply-adds, the lanes folded by [`fold`]), so all
//! give the same bits.

/// Eight f64 lanes: the operations the f64 sums need, implemented once per level.
/// Loads widen eight f32 (exactly); [`F64x8::add_narrowed`] rounds each lane to f32 and adds it
/// to eight f32 in memory.
pub(crate) trait F64x8: Copy {
    unsafe fn widen(p: *const f32) -> Self;
    unsafe fn load(p: *const f64) -> Self;
    unsafe fn store(self, p: *mut f64);
    unsafe fn add_narrowed(self, p: *mut f32);
    unsafe fn splat(v: f64) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    /// The lanes, for the remainder of a row and the final fold.
    unsafe fn lanes(self) -> [f64; 8];
}

/// The portable lanes, what the scalar level runs.
#[derive(Clone, Copy)]
pub(crate) struct Lanes8([f64; 8]);

impl F64x8 for Lanes8 {
    #[inline(always)]
    unsafe fn widen(p: *const f32) -> Self {
        // SAFETY: the caller passes eight readable floats.
        Lanes8(std::array::from_fn(|l| unsafe { *p.add(l) } as f64))
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: as above.
        Lanes8(std::array::from_fn(|l| unsafe { *p.add(l) }))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        for (l, v) in self.0.into_iter().enumerate() {
            // SAFETY: the caller passes eight writable floats.
            unsafe { *p.add(l) = v };
        }
    }
    #[inline(always)]
    unsafe fn add_narrowed(self, p: *mut f32) {
        for (l, v) in self.0.into_iter().enumerate() {
            // SAFETY: as above.
            unsafe { *p.add(l) += v as f32 };
        }
    }
    #[inline(always)]
    unsafe fn splat(v: f64) -> Self {
        Lanes8([v; 8])
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Lanes8(std::array::from_fn(|l| self.0[l] + o.0[l]))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Lanes8(std::array::from_fn(|l| self.0[l] - o.0[l]))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Lanes8(std::array::from_fn(|l| self.0[l] * o.0[l]))
    }
    #[inline(always)]
    unsafe fn lanes(self) -> [f64; 8] {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! The lanes in registers: one zmm at AVX-512, two ymm at AVX2.
    use std::arch::x86_64::*;

    use super::F64x8;

    /// One zmm of f64.
    #[derive(Clone, Copy)]
    pub(crate) struct Zmm(__m512d);

    /// Two ymm of f64.
    #[derive(Clone, Copy)]
    pub(crate) struct Ymm2(__m256d, __m256d);

    // Both impls: every method requires its level's features, which the callers' entry points
    // enable, and the pointer contracts of `F64x8`.
    impl F64x8 for Zmm {
        #[inline(always)]
        unsafe fn widen(p: *const f32) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Zmm(_mm512_cvtps_pd(_mm256_loadu_ps(p))) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Zmm(_mm512_loadu_pd(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f64) {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { _mm512_storeu_pd(p, self.0) }
        }
        #[inline(always)]
        unsafe fn add_narrowed(self, p: *mut f32) {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm512_cvtpd_ps(self.0))) }
        }
        #[inline(always)]
        unsafe fn splat(v: f64) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Zmm(_mm512_set1_pd(v)) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Zmm(_mm512_add_pd(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Zmm(_mm512_sub_pd(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Zmm(_mm512_mul_pd(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn lanes(self) -> [f64; 8] {
            let mut out = [0.0; 8];
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { _mm512_storeu_pd(out.as_mut_ptr(), self.0) };
            out
        }
    }

    impl F64x8 for Ymm2 {
        #[inline(always)]
        unsafe fn widen(p: *const f32) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe {
                Ymm2(
                    _mm256_cvtps_pd(_mm_loadu_ps(p)),
                    _mm256_cvtps_pd(_mm_loadu_ps(p.add(4))),
                )
            }
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Ymm2(_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4))) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f64) {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe {
                _mm256_storeu_pd(p, self.0);
                _mm256_storeu_pd(p.add(4), self.1);
            }
        }
        #[inline(always)]
        unsafe fn add_narrowed(self, p: *mut f32) {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe {
                _mm_storeu_ps(p, _mm_add_ps(_mm_loadu_ps(p), _mm256_cvtpd_ps(self.0)));
                _mm_storeu_ps(p.add(4), _mm_add_ps(_mm_loadu_ps(p.add(4)), _mm256_cvtpd_ps(self.1)));
            }
        }
        #[inline(always)]
        unsafe fn splat(v: f64) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Ymm2(_mm256_set1_pd(v), _mm256_set1_pd(v)) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Ymm2(_mm256_add_pd(self.0, o.0), _mm256_add_pd(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Ymm2(_mm256_sub_pd(self.0, o.0), _mm256_sub_pd(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe { Ymm2(_mm256_mul_pd(self.0, o.0), _mm256_mul_pd(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn lanes(self) -> [f64; 8] {
            let mut out = [0.0; 8];
            // SAFETY: the entry point enabled the level; the caller passes eight values at `p`.
            unsafe {
                _mm256_storeu_pd(out.as_mut_ptr(), self.0);
                _mm256_storeu_pd(out.as_mut_ptr().add(4), self.1);
            }
            out
        }
    }
}

/// Eight partial sums added pairwise, in a fixed order.
#[inline(always)]
pub(crate) fn fold(a: [f64; 8]) -> f64 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}
