//! The AMX kernel of [`super::gemm_bf16`]: `tdpbf16ps` on 16 × 16 tiles of f32 sums, written
//! with inline `asm!` (Rust's AMX intrinsics are not stable).
//!
//! # Tiles
//! Eight tile registers of up to 16 rows × 64 bytes. A block of the product is up to 2 × 2 C
//! tiles (32 rows × 32 columns of f32, `tmm0..tmm3`, `tmm(2r + c)`), fed per step of 32 along
//! the depth by two A tiles (`tmm4`, `tmm5`: 16 rows × 32 bf16 of the left operand) and two B
//! tiles (`tmm6`, `tmm7`: 16 pairs × 16 columns of [`super::Bf16Panels`], whose panels are the
//! B tile's layout as they are). The left operand is packed as whole tiles ([`pack_tiles`]):
//! each A tile's 1 KiB is contiguous, as each B tile's is, so a tile load reads 16 consecutive
//! cache lines (rows of a row-major operand a power of two apart would fall into the same few
//! L1 sets). Each `tdpbf16ps` adds 16 × 16 × 32 products; each A and B
//! tile is used twice per load. Row and column tails are tiles configured with fewer rows or
//! columns, so every row of the destination is stored in place and nothing past it is
//! touched; the depth is padded with zeros to a multiple of 32 in both operands. A GEMM loads
//! its A tiles with the non-temporal hint (`tileloaddt1`), so that a task's rows streaming
//! through do not evict the pair of B panels its next row blocks read ([`Tiles`]).
//!
//! A product runs in tasks of up to [`TASK_ROWS`] rows, as many per thread ([`row_tasks`]; by
//! a part of the columns only when the rows are too few to keep the threads busy,
//! [`column_parts`]). A task of f32 rows ([`Lhs::Rows`]) packs its own rows into a buffer of
//! its thread just before multiplying them, so the packed rows (at most 128 × the depth in
//! bf16) are in L2 when the tiles read them; packing the whole operand first, then
//! multiplying, read them back from memory (1.03–1.24× slower per call, see
//! docs/PERFORMANCE.md).
//!
//! Each element is one chain of additions over the depth in order, so the result does not
//! depend on the thread count or on how rows are split into tiles.
//!
//! # The tile state
//! Linux grants a process the 8 KiB of tile state only when it asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); [`available`] asks once, and the
//! AMX level exists only when the CPU has AMX-TILE and AMX-BF16 and the request succeeded.
//! A [`Tiles`] loads the tile configuration (`ldtilecfg`) when a block's shape changes and
//! releases the tiles when dropped (`tilerelease`): per GEMM task, and per row tile of the
//! flash kernel, so a thread holds the state only while it multiplies.

use std::arch::asm;

use super::avx512bf16::Shared;
use super::PANEL;
use crate::Par;

/// Rows of the left operand per parallel task, at most (four blocks of 32).
const TASK_ROWS: usize = 128;
/// Pairs of the depth per step (one A tile row of 64 bytes, one B tile of 16 pair rows).
pub(crate) const STEP_PAIRS: usize = super::AMX_STEP_PAIRS;
/// Words of one tile (16 rows of 16 pairs).
pub(crate) const TILE_WORDS: usize = 16 * STEP_PAIRS;

/// Rows `rows` of `lhs: [M, K]` rounded to bf16 as AMX A tiles, in f32 slots: row tile `t`
/// (rows `rows.start + 16t ..` sixteen of them), step `s` (pairs `16s .. 16s + 16`) is the tile
/// at `(t·steps + s)·256` words, its row `r` at `+ 16r`, pair `q` of that row
/// `lhs[rows.start + 16t + r, 32s + 2q .. + 2]`; zeros past the depth, and rows past
/// `rows.end` in the last row tile left as they were (never loaded: that tile is configured
/// with fewer rows). `dst` holds `ceil(rows.len() / 16)·steps·256` words. Sequential: each
/// task of [`gemm`] packs its own rows.
pub(crate) fn pack_tiles(dst: &mut [f32], lhs: crate::View2<'_, f32>, rows: std::ops::Range<usize>, steps: usize) {
    let [_, k] = lhs.shape();
    let [rs, cs] = lhs.strides();
    let data = lhs.data();
    assert!(k <= 32 * steps && rows.end <= lhs.shape()[0]);
    let m = rows.len();
    let dst = &mut dst[..m.div_ceil(16) * steps * TILE_WORDS];
    for (t, tiles) in dst.chunks_exact_mut(steps * TILE_WORDS).enumerate() {
        for r in 0..(m - 16 * t).min(16) {
            let i = rows.start + 16 * t + r;
            if cs == 1 {
                let row = &data[i * rs..i * rs + k];
                let out = &mut tiles[r * STEP_PAIRS..(steps - 1) * TILE_WORDS + (r + 1) * STEP_PAIRS];
                // What the conversion writes through its pointer: 16 words at each step's offset.
                assert!(out.len() == (steps - 1) * TILE_WORDS + STEP_PAIRS);
                // SAFETY: AVX512-BF16 is available where AMX is (`available`); `row` holds at
                // most `32·steps` values; `out` covers 16 words at each step's offset (asserted).
                unsafe { super::avx512bf16::convert_row_steps(row, 1.0, steps, out.as_mut_ptr(), TILE_WORDS) };
                continue;
            }
            for s in 0..steps {
                let out = &mut tiles[s * TILE_WORDS + r * STEP_PAIRS..][..STEP_PAIRS];
                let (p0, p1) = ((32 * s).min(k), (32 * s + 32).min(k));
                let used = (p1 - p0).div_ceil(2);
                for (q, word) in out[..used].iter_mut().enumerate() {
                    let (p, hi) = (p0 + 2 * q, p0 + 2 * q + 1);
                    let hi = if hi < k { lhs.get([i, hi]) } else { 0.0 };
                    *word = f32::from_bits(super::pair(lhs.get([i, p]), hi));
                }
                out[used..].fill(0.0);
            }
        }
    }
}

/// Whether this CPU runs AMX-BF16 here: AVX512-BF16 for the rest of the bf16 work, AMX-TILE
/// and AMX-BF16 in `cpuid` leaf 7, and Linux's permission for the tile state (asked for once
/// per process; other systems answer no).
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if !std::arch::is_x86_feature_detected!("avx512bf16") {
            return false;
        }
        // Leaf 7 exists where AVX512-BF16 does.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        amx_bf16 && amx_tile && request_tile_state()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when Linux granted it.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a system call with two integer arguments; it changes only this process's
    // permissions.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// A block's shape: rows of its one or two row tiles, columns of its one or two column tiles
/// (a `0` second entry: that tile is absent).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Shape {
    rows: [usize; 2],
    cols: [usize; 2],
}

/// The 64-byte operand of `ldtilecfg` for `shape`: palette 1, and per tile its rows and bytes
/// per row (absent tiles left unconfigured).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn of(shape: Shape) -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut set = |tile: usize, rows: usize, colsb: usize| {
            if rows > 0 && colsb > 0 {
                bytes[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(colsb as u16).to_le_bytes());
                bytes[48 + tile] = rows as u8;
            }
        };
        for r in 0..2 {
            for c in 0..2 {
                set(2 * r + c, shape.rows[r], 4 * shape.cols[c]);
            }
            set(4 + r, shape.rows[r], 64);
        }
        for c in 0..2 {
            set(6 + c, STEP_PAIRS, 4 * shape.cols[c]);
        }
        Config(bytes)
    }
}

/// Loads `config`.
///
/// # Safety
/// The AMX level must be available ([`available`]).
unsafe fn load_config(config: &Config) {
    // SAFETY: the caller's contract; `config` is 64 readable bytes.
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
}

/// What a product's sums start from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Init {
    /// Zeros: `c = a · b`.
    Zero,
    /// The destination: `c += a · b`.
    Dst,
    /// A row of `n` floats, the same for every row: `c = bias + a · b` (each sum's chain starts
    /// from its column's bias, the bits of writing the bias into `c` and adding).
    Row(*const f32),
}

impl Init {
    /// The start of the block whose first column is `j`: a bias row advanced by `j` (never
    /// past its end: `j` is a column of the product).
    fn at_column(self, j: usize) -> Init {
        match self {
            Init::Row(row) => Init::Row(row.wrapping_add(j)),
            other => other,
        }
    }
}

/// C tile `$t` initialised by `$init`: loaded from `$c` (rows `$ld` bytes apart), from the
/// bias row at `$row` (every tile row the same 64 bytes: a row stride of zero), or zeroed.
macro_rules! init_tile {
    ($t:literal, $init:expr, $c:expr, $ld:expr, $row:expr) => {
        match $init {
            Init::Dst => asm!(concat!("tileloadd tmm", $t, ", [{c} + {ld}*1]"), c = in(reg) $c, ld = in(reg) $ld,
                              options(nostack, readonly)),
            Init::Row(_) => asm!(concat!("tileloadd tmm", $t, ", [{c} + {ld}*1]"), c = in(reg) $row,
                                 ld = in(reg) 0usize, options(nostack, readonly)),
            Init::Zero => asm!(concat!("tilezero tmm", $t), options(nostack, nomem)),
        }
    };
}

/// C tile `$t` stored at `$c` (rows `$ld` bytes apart).
macro_rules! store_tile {
    ($t:literal, $c:expr, $ld:expr) => {
        asm!(concat!("tilestored [{c} + {ld}*1], tmm", $t), c = in(reg) $c, ld = in(reg) $ld,
             options(nostack));
    };
}

/// The depth loop of one block: per step, load the A tiles `tmm4`(, `tmm5`) and the B tiles
/// `tmm6`(, `tmm7`), then one `tdpbf16ps` per C tile: `$load` and `$dp` list a step's
/// instructions, the four pointers advance one tile each per step.
macro_rules! depth_loop {
    ($steps:expr, ($a0:expr, $a1:expr, $b0:expr, $b1:expr), [$($load:expr),*], [$($dp:expr),*]) => {
        asm!(
            "2:",
            $($load,)*
            $($dp,)*
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            steps = inout(reg) $steps => _,
            a0 = inout(reg) $a0 => _,
            a1 = inout(reg) $a1 => _,
            b0 = inout(reg) $b0 => _,
            b1 = inout(reg) $b1 => _,
            ldb = in(reg) 64usize,
            options(nostack, readonly),
        )
    };
}

/// The depth loop of a block of one or two row tiles by one or two column tiles, its A tiles
/// loaded by `$lda` (`tileloadd`, or `tileloaddt1` with the non-temporal hint).
macro_rules! depth_arms {
    ($lda:literal, $two_rows:expr, $two_cols:expr, $steps:expr, $a0:expr, $a1:expr, $b0:expr, $b1:expr) => {
        match ($two_rows, $two_cols) {
            (true, true) => depth_loop!(
                $steps,
                ($a0, $a1, $b0, $b1),
                [
                    concat!($lda, " tmm4, [{a0} + {ldb}*1]"),
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    concat!($lda, " tmm5, [{a1} + {ldb}*1]"),
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7"
                ],
                []
            ),
            (true, false) => depth_loop!(
                $steps,
                ($a0, $a1, $b0, $b1),
                [
                    concat!($lda, " tmm4, [{a0} + {ldb}*1]"),
                    concat!($lda, " tmm5, [{a1} + {ldb}*1]"),
                    "tileloadd tmm6, [{b0} + {ldb}*1]"
                ],
                ["tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm2, tmm5, tmm6"]
            ),
            (false, true) => depth_loop!(
                $steps,
                ($a0, $a1, $b0, $b1),
                [
                    concat!($lda, " tmm4, [{a0} + {ldb}*1]"),
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tileloadd tmm7, [{b1} + {ldb}*1]"
                ],
                ["tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7"]
            ),
            (false, false) => depth_loop!(
                $steps,
                ($a0, $a1, $b0, $b1),
                [
                    concat!($lda, " tmm4, [{a0} + {ldb}*1]"),
                    "tileloadd tmm6, [{b0} + {ldb}*1]"
                ],
                ["tdpbf16ps tmm0, tmm4, tmm6"]
            ),
        }
    };
}

/// One block: `c (+)= a · b` for `shape.rows` rows (`a` the first row tile's tiles of
/// [`pack_tiles`], the second's `a_tiles` words after them) and `shape.cols` columns (`b` the
/// first column tile's panel, the second `b_panel` words after it), over `steps` steps of 32
/// along the depth. The tiles must be configured for `shape`.
///
/// # Safety
/// The AMX level must be available and configured for `shape`; each row tile's tiles readable
/// for `steps` × 1 KiB, each panel too, `c` writable at `r·ldc + j` for the block's rows and
/// columns (`ldc` in bytes); an [`Init::Row`] readable for the block's columns.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    shape: Shape,
    steps: usize,
    a: *const u32,
    a_tiles: usize,
    b: *const u32,
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
    init: Init,
    stream_lhs: bool,
) {
    let two_rows = shape.rows[1] > 0;
    let two_cols = shape.cols[1] > 0;
    // SAFETY: the caller's contract; every address below is inside the block's operands.
    unsafe {
        let (a0, a1) = (a, if two_rows { a.add(a_tiles) } else { a });
        let (b0, b1) = (b, if two_cols { b.add(b_panel) } else { b });
        let c00 = c;
        // `wrapping_add`: an absent tile's address may lie past the operand; it is not used.
        let c01 = c.wrapping_add(PANEL);
        let c10 = c.cast::<u8>().wrapping_add(16 * ldc).cast::<f32>();
        let c11 = c10.wrapping_add(PANEL);
        let (row0, row1) = match init {
            Init::Row(row) => (row, row.wrapping_add(PANEL)),
            _ => (std::ptr::null(), std::ptr::null()),
        };
        init_tile!(0, init, c00, ldc, row0);
        if two_cols {
            init_tile!(1, init, c01, ldc, row1);
        }
        if two_rows {
            init_tile!(2, init, c10, ldc, row0);
            if two_cols {
                init_tile!(3, init, c11, ldc, row1);
            }
        }
        // The A tiles of a GEMM are loaded with the non-temporal hint: each is read once per
        // pair of panels, from L2, and kept out of L1 it leaves the pair's B tiles there for
        // the task's next row blocks.
        if stream_lhs {
            depth_arms!("tileloaddt1", two_rows, two_cols, steps, a0, a1, b0, b1);
        } else {
            depth_arms!("tileloadd", two_rows, two_cols, steps, a0, a1, b0, b1);
        }
        store_tile!(0, c00, ldc);
        if two_cols {
            store_tile!(1, c01, ldc);
        }
        if two_rows {
            store_tile!(2, c10, ldc);
            if two_cols {
                store_tile!(3, c11, ldc);
            }
        }
    }
}

/// `prefetchw` of the cache lines of `len` floats from `p`.
///
/// # Safety
/// None beyond the CPU's (a prefetch never faults); AMX CPUs have `PREFETCHW`.
#[inline(always)]
unsafe fn prefetch_for_write(p: *const f32, len: usize) {
    let start = p as usize & !63;
    let end = p as usize + 4 * len;
    for line in (start..end).step_by(64) {
        // SAFETY: a prefetch does not fault, whatever the address.
        unsafe { asm!("prefetchw [{}]", in(reg) line, options(nostack, readonly, preserves_flags)) };
    }
}

/// A thread's use of the tile registers: the configuration loaded last (none yet), kept across
/// products so that it is loaded again only when a block's shape changes; dropping it releases
/// the tiles (`tilerelease`), so a thread holds the 8 KiB of tile state only while it
/// multiplies. Not `Send`: the configuration belongs to the thread that loaded it.
pub(crate) struct Tiles {
    current: Option<Shape>,
    /// Whether the products are a GEMM's ([`gemm`]) rather than the flash kernel's. A GEMM
    /// loads its A tiles with the non-temporal hint (`tileloaddt1`): a task's packed rows
    /// are read from L2 once per pair of panels, and kept out of L1 they leave the pair's B
    /// tiles there for the task's next row blocks (1.12–1.16× on the K = 512 layer shapes,
    /// docs/PERFORMANCE.md). At a depth of at most [`PREFETCH_STEPS`] steps a GEMM also
    /// prefetches each block's destination rows for writing, which is often out of cache.
    /// The flash kernel's query tiles are read again for every key block, and its scores and
    /// accumulators are in L1 or L2.
    gemm: bool,
    _thread: std::marker::PhantomData<*const ()>,
}

impl Tiles {
    /// No configuration loaded yet; `gemm` as the field says.
    ///
    /// # Safety
    /// [`available`] must have returned true.
    pub(crate) unsafe fn new(gemm: bool) -> Self {
        Tiles {
            current: None,
            gemm,
            _thread: std::marker::PhantomData,
        }
    }

    /// `c[m, n] (+)= a · b` over `steps` steps of 16 pairs, sequentially: `a` row tiles of
    /// [`pack_tiles`]'s layout, `a_tiles` words apart (step `s` of row tile `t` at
    /// `t·a_tiles + 256·s`); `b` panels of 16 columns `b_panel` words apart (step `s` of a
    /// panel at `256·s`), zeros in the padding rows and columns of the depth; `c` rows `ldc`
    /// floats apart. Column pairs outside and blocks of 32 rows inside, so a panel pair is read
    /// from memory once per call and the configuration changes only at the right and bottom
    /// edges. For a GEMM at a depth of at most [`PREFETCH_STEPS`] steps, each block's
    /// destination rows are prefetched for writing (`prefetchw`) while the block before it
    /// multiplies: `tilestored` to rows that miss the cache stalls on each row, which cost a
    /// 2048×1536×64 product (a 12 MiB destination) two thirds of its time when its A tiles
    /// were loaded without the non-temporal hint. Deeper blocks give the stores time to
    /// drain, and there the prefetches cost 4–10% (docs/PERFORMANCE.md). Columns from `n` to
    /// the end of their panel are neither read nor written, nor are rows from `m` to the end
    /// of their tile.
    ///
    /// # Safety
    /// `a` readable for `ceil(m / 16)` row tiles of `steps` tiles, `b` for `ceil(n / 16)`
    /// panels of `steps` tiles, `c` writable at `r·ldc + j` for `r < m`, `j < n`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn product(
        &mut self,
        [m, n, steps]: [usize; 3],
        (a, a_tiles): (*const u32, usize),
        (b, b_panel): (*const u32, usize),
        c: *mut f32,
        ldc: usize,
        init: Init,
    ) {
        for j0 in (0..n).step_by(2 * PANEL) {
            let cols = [(n - j0).min(PANEL), (n - j0).saturating_sub(PANEL).min(PANEL)];
            for i0 in (0..m).step_by(32) {
                let shape = Shape {
                    rows: [(m - i0).min(16), (m - i0).saturating_sub(16).min(16)],
                    cols,
                };
                // SAFETY: AMX is available (`new`'s contract); the block's rows `i0 ..` and
                // columns `j0 ..` are inside the operands (the caller's contract).
                unsafe {
                    if self.current != Some(shape) {
                        load_config(&Config::of(shape));
                        self.current = Some(shape);
                    }
                    // The next block's destination rows, fetched for writing while this
                    // block multiplies: `tilestored` (and `tileloadd` of the sums to add to)
                    // stalls on every row that misses the cache.
                    let next = if i0 + 32 < m {
                        Some((i0 + 32, j0))
                    } else if j0 + 2 * PANEL < n {
                        Some((0, j0 + 2 * PANEL))
                    } else {
                        None
                    };
                    if let (Some((ni, nj)), true) = (next, self.gemm && steps <= PREFETCH_STEPS) {
                        let cols = (n - nj).min(2 * PANEL);
                        for r in ni..(ni + 32).min(m) {
                            prefetch_for_write(c.add(r * ldc + nj), cols);
                        }
                    }
                    block(
                        shape,
                        steps,
                        a.add(i0 / 16 * a_tiles),
                        a_tiles,
                        b.add(j0 / PANEL * b_panel),
                        b_panel,
                        c.add(i0 * ldc + j0),
                        4 * ldc,
                        init.at_column(j0),
                        self.gemm,
                    );
                }
            }
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        if self.current.is_some() {
            // SAFETY: this thread loaded a configuration (so AMX is available).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

/// The left operand of [`gemm`].
#[derive(Clone, Copy)]
pub(crate) enum Lhs<'a> {
    /// Already packed: the tiles of [`pack_tiles`] for all `M` rows.
    Tiles(&'a [f32]),
    /// f32 rows `[M, K]`, rounded and packed by each task for its own rows.
    Rows(crate::View2<'a, f32>),
}

/// `c[m, n] (+)= a · b` over `steps` steps of 16 pairs: `a` the left operand (packed, or rows
/// each task packs); `b` panels of 16 columns `b_panel` words apart (`b_panel ≥ 256·steps`),
/// zeros in the padding rows and columns; `c` rows `ldc` floats apart. [`row_tasks`] tasks of
/// rows by [`column_parts`] of the columns, each a [`Tiles::product`] that releases the tiles
/// when done.
///
/// # Safety
/// [`available`] must have returned true; the operands must cover those shapes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    [m, n, steps]: [usize; 3],
    a: Lhs<'_>,
    b: &[u32],
    b_panel: usize,
    c: *mut f32,
    ldc: usize,
    init: Init,
    par: Par,
) {
    let a_tiles = steps * TILE_WORDS;
    match a {
        Lhs::Tiles(a) => assert!(a.len() >= m.div_ceil(16) * a_tiles),
        Lhs::Rows(a) => assert!(a.shape() == [m, a.shape()[1]] && a.shape()[1] <= 32 * steps),
    }
    assert!(steps > 0 && b_panel >= a_tiles);
    assert!(b.len() >= (n.div_ceil(PANEL) - 1) * b_panel + steps * STEP_PAIRS * PANEL);
    let (b, c, init) = (Shared(b.as_ptr()), Shared(c), Shared(init));
    // One thread gains nothing from more tasks than 128-row ones, and split columns pack
    // their rows again.
    let (threads, min_tasks) = match par.threads() {
        1 => (1, 1),
        threads => (threads, MIN_TASKS),
    };
    let blocks = m.div_ceil(32);
    let row_tasks = row_tasks(blocks, threads, min_tasks);
    let part = n
        .div_ceil(column_parts(n, row_tasks, min_tasks))
        .next_multiple_of(2 * PANEL);
    let task = |index: usize| {
        let (t, j0) = (index % row_tasks, index / row_tasks * part);
        // Blocks `t·blocks / row_tasks ..` of 32 rows: shares that differ by one block at most.
        let r0 = 32 * (t * blocks / row_tasks);
        let r1 = (32 * ((t + 1) * blocks / row_tasks)).min(m);
        let (rows, cols) = (r1 - r0, (n - j0).min(part));
        let mut packed = None;
        let tiles = match a {
            // Row tiles start at `r0 / 16`: `r0` is a multiple of 32.
            Lhs::Tiles(a) => &a[r0 / 16 * a_tiles..],
            Lhs::Rows(a) => {
                let buffer = packed.insert(crate::buffer::take(rows.div_ceil(16) * a_tiles));
                pack_tiles(buffer, a, r0..r0 + rows, steps);
                &buffer[..]
            }
        };
        // SAFETY: `available` returned true (the caller's contract); `tiles` holds the row
        // tiles of rows `r0 .. r0 + rows`, and the columns `j0 .. j0 + cols` are whole panels
        // from `j0 / PANEL` (`part` is a multiple of `PANEL`) of the caller's `b`.
        unsafe {
            Tiles::new(true).product(
                [rows, cols, steps],
                (tiles.as_ptr().cast::<u32>(), a_tiles),
                (b.get().add(j0 / PANEL * b_panel), b_panel),
                c.get().add(r0 * ldc + j0),
                ldc,
                init.get().at_column(j0),
            )
        };
        if let Some(buffer) = packed {
            crate::buffer::give(buffer);
        }
    };
    let tasks = n.div_ceil(part) * row_tasks;
    par.for_each_task(tasks, task);
}

/// How many tasks share the `blocks` blocks of 32 rows: enough for at most [`TASK_ROWS`] rows
/// each; at least `min_tasks` ([`MIN_TASKS`] on more than one thread), so that the threads
/// share the rows before the columns are split (each part of the columns packs its rows again:
/// the feed-forward's blocks of 256 tokens, split into 4 parts, doubled the packing's share of
/// an `attn embed --dtype bf16` profile); and a multiple of the thread count, so that each
/// thread gets as many rows (9 tasks of 128 rows left one of two threads idle for a ninth of a
/// 1,140-row product). Never more than `blocks`.
fn row_tasks(blocks: usize, threads: usize, min_tasks: usize) -> usize {
    blocks
        .div_ceil(TASK_ROWS / 32)
        .max(min_tasks)
        .next_multiple_of(threads)
        .min(blocks)
}

/// How many parts the columns are split into: one, unless there are fewer than `min_tasks` row
/// tasks (fewer blocks of 32 rows); then enough for that many tasks, each at least two panels
/// wide. A task reads every panel of its part, from L3 or memory; each part packs its rows
/// again.
fn column_parts(n: usize, row_tasks: usize, min_tasks: usize) -> usize {
    min_tasks.div_ceil(row_tasks).min(n.div_ceil(2 * PANEL)).max(1)
}

/// The depth, in steps of 32, up to which a GEMM prefetches its destination rows for writing
/// ([`Tiles::product`]).
const PREFETCH_STEPS: usize = 4;

/// Tasks a product is split into at least, where its size allows (four per thread of a
/// two-core machine).
const MIN_TASKS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count from 1 to 100 blocks on 1 to 4 threads: the tasks share the blocks with
    /// at most [`TASK_ROWS`] rows each, are a multiple of the thread count unless each has one
    /// block, and are at least `min_tasks` where the blocks allow; the columns are split only
    /// when the row tasks are fewer than that, into parts of at least two panels that make up
    /// the difference where the columns allow.
    #[test]
    fn tasks_share_rows_before_columns() {
        for threads in 1..=4 {
            let min_tasks = if threads == 1 { 1 } else { MIN_TASKS };
            for blocks in 1..=100 {
                let rows = row_tasks(blocks, threads, min_tasks);
                let context = format!("{blocks} blocks, {threads} threads: {rows} row tasks");
                assert!((1..=blocks).contains(&rows), "{context}");
                assert!(blocks.div_ceil(rows) * 32 <= TASK_ROWS, "{context}");
                assert!(rows == blocks || rows.is_multiple_of(threads), "{context}");
                assert!(rows >= min_tasks.min(blocks), "{context}");
                for n in [1, 16, 17, 32, 33, 64, 100, 384, 1536] {
                    let parts = column_parts(n, rows, min_tasks);
                    let context = format!("{context}, n {n}: {parts} column parts");
                    let panel_pairs = n.div_ceil(2 * PANEL);
                    assert!((1..=panel_pairs).contains(&parts), "{context}");
                    if rows >= min_tasks {
                        assert_eq!(parts, 1, "{context}");
                    } else {
                        assert!(parts * rows >= min_tasks || parts == panel_pairs, "{context}");
                    }
                }
            }
        }
    }

    /// `XINUSE`'s tile-data bit (`xgetbv(1)`, bit 18): set while this thread's tiles hold
    /// values, clear once they are released.
    fn tiles_in_use() -> bool {
        #[target_feature(enable = "xsave")]
        unsafe fn xinuse() -> u64 {
            // SAFETY: AMX CPUs have XGETBV with ECX = 1 (the caller checked AMX).
            unsafe { std::arch::x86_64::_xgetbv(1) }
        }
        // SAFETY: `xsave` is present wherever AMX is (the callers check `available`).
        unsafe { xinuse() & (1 << 18) != 0 }
    }

    /// A thread holds the tile state only while it multiplies: a product leaves the tiles in
    /// use until its [`Tiles`] is dropped, and [`gemm`] releases them before it returns.
    #[test]
    fn products_release_the_tiles() {
        if !available() {
            println!("skipped: no AMX on this CPU (or the tile state was refused)");
            return;
        }
        let (m, n, k) = (40, 48, 70);
        let a = crate::rng::random_vec(m * k, 1);
        let b = crate::rng::random_vec(k * n, 2);
        let lhs = crate::View2::contiguous(&a, [m, k]).unwrap();
        let panels = super::super::Bf16Panels::pack(crate::View2::contiguous(&b, [k, n]).unwrap());
        let steps = super::super::padded_pairs(k) / STEP_PAIRS;
        let panel = steps * TILE_WORDS;
        let mut c = vec![0.0f32; m * n];
        let mut packed = vec![0.0f32; m.div_ceil(16) * steps * TILE_WORDS];
        pack_tiles(&mut packed, lhs, 0..m, steps);
        // SAFETY: AMX is available; the packed rows, the panels and `c` cover `[m, n, steps]`.
        unsafe {
            let mut tiles = Tiles::new(true);
            tiles.product(
                [m, n, steps],
                (packed.as_ptr().cast(), steps * TILE_WORDS),
                (panels.words().as_ptr(), panel),
                c.as_mut_ptr(),
                n,
                Init::Zero,
            );
            assert!(tiles_in_use(), "the tiles hold the last block's sums until dropped");
        }
        assert!(!tiles_in_use(), "dropping the tiles releases them");
        c.fill(0.0);
        // SAFETY: as above, with the f32 rows packed by the task.
        unsafe {
            gemm(
                [m, n, steps],
                Lhs::Rows(lhs),
                panels.words(),
                panel,
                c.as_mut_ptr(),
                n,
                Init::Zero,
                Par::Seq,
            )
        };
        assert!(!tiles_in_use(), "gemm releases the tiles of its thread");
        assert!(c.iter().all(|x| x.is_finite()) && c.iter().any(|&x| x != 0.0));
    }
}
