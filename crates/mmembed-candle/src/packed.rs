//! f32 linear layers with weights packed once at load, for x86-64 CPUs
//! with AVX2 and FMA.
//!
//! The `gemm` crate (and so candle's matmul) packs the weights into its
//! kernel's layout on every call: 16 % of a one-image ViT-B/32 forward
//! (BENCHMARKS.md). Here they are packed at load into strips of
//! [`NR`] output columns, `[strip][k][NR]`, and each call packs only its
//! activations, into tiles of [`MR`] rows `[tile][k][MR]` (layer-normed on
//! the way when the layer follows a norm, so the norm's output is never a
//! tensor of its own). A 6 × 16 tile is 12 accumulator registers over the
//! whole reduction: per input element, two weight loads, six broadcasts and
//! twelve FMAs. Bias, quick-GELU and residual are applied as the tile is
//! stored. The tiling and threading are [`crate::tiled`]'s, shared with the
//! int8 layers.
//!
//! Elsewhere (no AVX2, other architectures, the `mkl`/`accelerate`
//! features) layers keep candle's weights and the `gemm` crate.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::cpu_kernels::{Epilogue, with_f32s};
use crate::tiled::{
    Blocks, Line, MC, MR, NR, RowNorm, Rows, Task, Tile, TileOut, TiledLinear, clear_padding_tile,
    floats, for_each_task, for_each_task_in, put_row, rows_of_tile, task_layout, with_scratch,
};
use std::ops::Range;

/// The longest reduction read in place rather than packed
/// ([`PackedLinear::run`]). ViT-B/32's MLP projection (k = 3072, six rows
/// 12 KB apart) read in place measured 4 % fewer images/s at 32 images (two
/// rounds, within this machine's noise); MobileCLIP's longest in-place
/// reduction is 768.
const DIRECT_MAX_K: usize = 1024;

/// Whether this CPU runs packed layers (faster than the `gemm` crate only
/// with the AVX2 kernel).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::cpu_kernels::has_avx2_fma();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A linear layer `y = x · wᵀ + b` with `w` packed for the tile kernel.
pub(crate) struct PackedLinear {
    /// Input width.
    k: usize,
    /// Output width.
    n: usize,
    /// `[n / NR strips][k]` lines of NR columns, zero past `n`. Lines so
    /// that the kernel's loads never straddle two cache lines (the
    /// allocator only promises 16 bytes, which splits one load in two for
    /// half the strips): measured +3.5 % images/s at one image, +5.5 % at
    /// 32 (medians of six A/B rounds). Prefetching the strip 8 lines ahead
    /// on top of this changed nothing measurable (+0.1 to +0.8 %).
    w: Vec<Line>,
    /// Zero past `n` (and everywhere for a layer without bias).
    bias: Vec<f32>,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedLinear(f32, in {}, out {})", self.k, self.n)
    }
}

impl PackedLinear {
    /// Packs `w [n, k]` (any strides, any float dtype) and `b [n]`.
    pub(crate) fn new(w: &Tensor, b: Option<&Tensor>) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if n == 0 || k == 0 {
            candle_core::bail!("packed linear: empty weight [{n}, {k}]");
        }
        let strips = n.div_ceil(NR);
        let mut bias = match b {
            Some(b) if b.dims() != [n] => {
                candle_core::bail!("packed linear: weight [{n}, {k}], bias {:?}", b.dims())
            }
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; n],
        };
        bias.resize(strips * NR, 0.0);
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let mut packed = vec![Line([0.0; NR]); strips * k];
        with_f32s(&w, |w| {
            packed
                .par_chunks_mut(k)
                .enumerate()
                .for_each(|(strip, dst)| {
                    for (col, row) in w.chunks_exact(k).enumerate().skip(strip * NR).take(NR) {
                        for (line, v) in dst.iter_mut().zip(row) {
                            line.0[col % NR] = *v;
                        }
                    }
                });
            Ok(())
        })?;
        Ok(Self {
            k,
            n,
            w: packed,
            bias,
        })
    }

    /// Rows of `x` (layer-normed first if `norm` is given) into `a` in
    /// tiles of `MR` rows, each `[k][MR]` (the last padded with zero rows):
    /// the kernel's broadcasts then walk one contiguous stream.
    fn pack_rows(&self, x: &[f32], m: usize, norm: Option<&RowNorm>, a: &mut [f32]) {
        a.par_chunks_mut(self.k * MR)
            .enumerate()
            .for_each_init(Vec::new, |normed, (t, a)| {
                self.pack_tile(x, m, norm, t, normed, a)
            });
    }

    /// Activation tile `t` of `x` (`m` rows) into `a` (`[k][MR]`), the rows
    /// normed first (through `normed`) when `norm` is given.
    fn pack_tile(
        &self,
        x: &[f32],
        m: usize,
        norm: Option<&RowNorm>,
        t: usize,
        normed: &mut Vec<f32>,
        a: &mut [f32],
    ) {
        // The kernel never reads padding lanes, but zeros keep it that way.
        clear_padding_tile(a, t, m);
        rows_of_tile(x, (m, self.k), t, norm, normed, |lane, row| {
            put_row::<_, 1>(a, lane, row)
        });
    }

    /// Weight strip `strip` (`[k][NR]`) and its `NR` biases.
    fn strip(&self, strip: usize) -> (&[f32], &[f32]) {
        let k = self.k;
        (
            floats(&self.w[strip * k..(strip + 1) * k]),
            &self.bias[strip * NR..(strip + 1) * NR],
        )
    }

    /// One output tile: activation tile `r0 / MR` against weight strip
    /// `strip`, over the whole reduction.
    ///
    /// Why not in blocks of the reduction, so that a block of the weight
    /// strip stays in L1 across the task's row tiles: measured slower
    /// (blocks of 256, partial sums stored and read back: 7-15 % fewer
    /// images/s at batch 1 and 32, ViT-B/32, this project's Zen 3 machine);
    /// the strip streams from L2 fast enough for this kernel.
    fn tile(&self, a: &[f32], tile: &Tile, out: &TileOut) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu_kernels::has_avx512f() {
            // SAFETY: the CPU has AVX2, FMA and AVX-512 F.
            return unsafe { avx512::tile(self, a, tile, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if crate::cpu_kernels::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2::tile(self, a, tile, out) };
        }
        // The portable loop, through an array.
        let (k, t) = (self.k, tile.r0 / MR);
        let a = &a[t * k * MR..(t + 1) * k * MR];
        let (b, bias) = self.strip(tile.strip);
        let mut acc = [[0f32; NR]; MR];
        for acc in &mut acc {
            acc.copy_from_slice(bias);
        }
        dot_generic(a, b, k, out.rows, &mut acc);
        for (i, acc) in acc.iter_mut().enumerate().take(out.rows) {
            // SAFETY: `out` describes a writable rectangle of the output.
            unsafe { out.finish_row(i, acc) };
        }
    }

    /// Whether this CPU has a kernel that reads the input rows in place
    /// ([`Self::tile_direct`]).
    fn direct() -> bool {
        #[cfg(target_arch = "x86_64")]
        return crate::cpu_kernels::has_avx2_fma();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// One output tile from the unpacked input `x` (`[m, k]` rows): rows
    /// `r0 .. r0 + out.rows` against weight strip `strip`. Only where
    /// [`Self::direct`] says so.
    fn tile_direct(&self, x: &[f32], r0: usize, strip: usize, out: &TileOut) {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu_kernels::has_avx512f() {
                // SAFETY: the CPU has AVX2, FMA and AVX-512 F.
                return unsafe { avx512::tile_direct(self, x, r0, strip, out) };
            }
            if crate::cpu_kernels::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { avx2::tile_direct(self, x, r0, strip, out) };
            }
        }
        let _ = (x, r0, strip, out);
        unreachable!("tile_direct where Self::direct() is false")
    }
}

impl TiledLinear for PackedLinear {
    fn name(&self) -> &'static str {
        "cpu-packed-linear"
    }

    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn as_packed_f32(&self) -> Option<&PackedLinear> {
        Some(self)
    }

    fn run(
        &self,
        x: &[f32],
        m: usize,
        norm: Option<&RowNorm>,
        residual: Option<&[f32]>,
        act: Epilogue,
    ) -> Rows {
        let k = self.k;
        if task_layout(m, self.n).1 == 1 {
            // Every task has rows of its own: each packs them itself, into
            // its thread's scratch, and runs its strips over them while
            // they are in cache. Packing all rows first wrote the packed
            // copy out and read it back (stage 0 of MobileCLIP-S1 at 8
            // images: 25 MB each way per layer).
            if norm.is_none() && k <= DIRECT_MAX_K && Self::direct() {
                // No norm to apply on the way: the kernel broadcasts
                // straight from the input rows (six streams, `k` apart),
                // as MLAS's kernels read their left-hand side, and
                // nothing is packed at all.
                return for_each_task(m, self.n, residual, act, |task| {
                    for (r0, strip) in task.tiles() {
                        self.tile_direct(x, r0, strip, &task.out(r0, strip));
                    }
                });
            }
            return for_each_task(m, self.n, residual, act, |task| {
                let first = task.rows.start / MR;
                let tiles = task.rows.end.div_ceil(MR) - first;
                with_scratch(tiles * k * MR, |a: &mut [f32]| {
                    let mut normed = Vec::new();
                    for (i, a) in a.chunks_exact_mut(k * MR).enumerate() {
                        self.pack_tile(x, m, norm, first + i, &mut normed, a);
                    }
                    self.task_tiles(a, first * MR, task);
                })
            });
        }
        with_scratch(m.div_ceil(MR) * k * MR, |a| {
            self.pack_rows(x, m, norm, a);
            let a = &*a;
            for_each_task(m, self.n, residual, act, |task| self.task_tiles(a, 0, task))
        })
    }
}

impl PackedLinear {
    /// A task's tiles, over its rows packed in `a` from row `a_r0` on.
    ///
    /// Why one strip at a time: a kernel over two strips at once (twelve
    /// FMAs per two weight loads and six broadcasts, where one strip takes
    /// one load and six broadcasts for six) measured no faster on
    /// MobileCLIP-S1 or ViT-B/32 (Zen 4, two threads, A/B of 2–3 rounds):
    /// these layers wait on memory more than on the loop's loads.
    fn task_tiles(&self, a: &[f32], a_r0: usize, task: &Task) {
        for (r0, strip) in task.tiles() {
            let local = Tile {
                r0: r0 - a_r0,
                strip,
            };
            self.tile(a, &local, &task.out(r0, strip));
        }
    }
}

/// What [`mlp`] asks for a block's input: `input(rows, dst)` fills `dst`
/// with those rows of `x`.
pub(crate) type RowSource<'a> = dyn Fn(Range<usize>, &mut [f32]) + Sync + 'a;

/// `fc2(act(fc1(x))) + residual` for `m` rows, one block of rows at a
/// time: each task asks `input` for its rows of `x` (`input(rows, dst)`
/// fills `dst` with those rows; FastViT computes them there, its depthwise
/// convolution's output rows), runs `fc1` over them into its thread's
/// scratch and `fc2` over that, so neither `x` nor the hidden rows (three
/// times `x`'s width in MobileCLIP's MLPs) go out to memory and back.
/// Layer by layer, `fc2` of MobileCLIP-S1's first stage at 8 images read
/// its 25 MB input from memory at 66 GFLOP/s on one core, against 96 with
/// the input in cache. Blocks are whole multiples of `align` rows (an
/// image's row of pixels), at least [`MC`] rows.
///
/// `None` where this does not apply: no kernel that reads rows in place
/// (AVX2 or AVX-512), widths that do not chain, a hidden width over
/// [`DIRECT_MAX_K`] (MobileCLIP-S1's last stage, 1536: 11.2 ms fused
/// against 10.3 layer by layer at 8 images, its 6 MB of weights streamed
/// past the hidden rows), or fewer than four blocks per thread (the
/// layer-by-layer path then splits columns too; with rows alone to share,
/// stage 2 at one image, 5 blocks on 2 threads, ran 1.16 ms fused against
/// 1.10 apart, and the forward 6 % faster at the higher bar).
pub(crate) fn mlp(
    (fc1, fc2): (&PackedLinear, &PackedLinear),
    m: usize,
    (input, align): (&RowSource<'_>, usize),
    act: Epilogue,
    residual: &[f32],
) -> Option<Rows> {
    let (k, hidden, n) = (fc1.k, fc1.n, fc2.n);
    let align = align.max(1);
    let block = MC.div_ceil(align) * align;
    if !PackedLinear::direct()
        || fc2.k != hidden
        || hidden > DIRECT_MAX_K
        || residual.len() != m * n
        || m.div_ceil(block) < 4 * crate::cpu_kernels::threads()
    {
        return None;
    }
    Some(for_each_task_in(
        Blocks::Of(block),
        m,
        n,
        Some(residual),
        Epilogue::None,
        |task| {
            let (r0, rows) = (task.rows.start, task.rows.len());
            with_scratch(rows * k, |x: &mut [f32]| {
                input(task.rows.clone(), x);
                let x = &*x;
                with_scratch(rows * hidden, |h: &mut [f32]| {
                    let at = h.as_mut_ptr();
                    for strip in 0..hidden.div_ceil(NR) {
                        let cols = strip * NR..((strip + 1) * NR).min(hidden);
                        for t0 in (0..rows).step_by(MR) {
                            let out = TileOut {
                                // SAFETY: within `h`'s `rows · hidden`
                                // floats (row `t0`, these columns).
                                y: unsafe { at.add(t0 * hidden + cols.start) },
                                ld: hidden,
                                rows: MR.min(rows - t0),
                                cols: cols.len(),
                                residual: None,
                                act,
                            };
                            fc1.tile_direct(x, t0, strip, &out);
                        }
                    }
                    for (t0, strip) in task.tiles() {
                        // `h` holds the task's rows.
                        fc2.tile_direct(h, t0 - r0, strip, &task.out(t0, strip));
                    }
                })
            })
        },
    ))
}

/// `acc[i][j] += Σ_p a[p][i] · b[p][j]` for the first `rows` rows.
fn dot_generic(a: &[f32], b: &[f32], k: usize, rows: usize, acc: &mut [[f32; NR]; MR]) {
    for p in 0..k {
        let a = &a[p * MR..p * MR + rows.min(MR)];
        let b = &b[p * NR..(p + 1) * NR];
        for (acc, a) in acc.iter_mut().zip(a) {
            for (acc, b) in acc.iter_mut().zip(b) {
                *acc += a * b;
            }
        }
    }
}

/// `$dot::<R>(args)` with `R` the tile's row count (1 to `MR` = 6), so a
/// kernel computes only the tile's rows: the last tile of a batch is often
/// short (one image is 50 rows, 8 tiles and 2 rows).
#[cfg(target_arch = "x86_64")]
macro_rules! dot_rows {
    ($dot:ident, $rows:expr, $($arg:expr),*) => {{
        const { assert!(MR == 6) };
        match $rows {
            6.. => $dot::<6>($($arg),*),
            5 => $dot::<5>($($arg),*),
            4 => $dot::<4>($($arg),*),
            3 => $dot::<3>($($arg),*),
            2 => $dot::<2>($($arg),*),
            _ => $dot::<1>($($arg),*),
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR, PackedLinear, Tile, TileOut};
    use std::arch::x86_64::*;

    /// Two 8-lane registers: one tile row's `NR` columns.
    type Row = [__m256; NR / 8];

    /// [`PackedLinear::tile`] compiled for AVX2 and FMA.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(p: &PackedLinear, a: &[f32], tile: &Tile, out: &TileOut) {
        let (k, t) = (p.k, tile.r0 / MR);
        let a = &a[t * k * MR..(t + 1) * k * MR];
        let (b, bias) = p.strip(tile.strip);
        // SAFETY: this function's features are the kernel's.
        unsafe { dot_rows!(dot, out.rows, a, b, k, bias, out) }
    }

    /// One output tile from the unpacked input `x` (`[m, k]` rows): rows
    /// `r0 .. r0 + out.rows` against weight strip `strip`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_direct(
        p: &PackedLinear,
        x: &[f32],
        r0: usize,
        strip: usize,
        out: &TileOut,
    ) {
        let k = p.k;
        let x = &x[r0 * k..(r0 + out.rows) * k];
        let (b, bias) = p.strip(strip);
        // SAFETY: this function's features are the kernel's.
        unsafe { dot_rows!(dot_direct, out.rows, x, b, k, bias, out) }
    }

    /// The bias of a strip, in registers: where every row's sum starts.
    ///
    /// # Safety
    /// AVX must be available; `bias` holds `NR` floats.
    #[inline(always)]
    unsafe fn bias_row(bias: &[f32]) -> Row {
        debug_assert_eq!(bias.len(), NR);
        // SAFETY: `bias` holds NR = 8 · (NR / 8) floats.
        std::array::from_fn(|j| unsafe { _mm256_loadu_ps(bias.as_ptr().add(8 * j)) })
    }

    /// `bias + Σ_p a[p][i] · b[p][j]` for the first `R <= MR` rows of the
    /// packed tile `a`, in registers and stored to `out`
    /// ([`TileOut::store_row_avx`]). Why not from and into an array, as
    /// this kernel was first written: the bias copied into the array, the
    /// rows stored back into it and copied out cost as much as the loop on
    /// short reductions (the AVX-512 kernel's `store_rows`).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `R == out.rows`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot<const R: usize>(a: &[f32], b: &[f32], k: usize, bias: &[f32], out: &TileOut) {
        const NV: usize = NR / 8;
        assert!(R <= MR && a.len() >= k * MR && b.len() >= k * NR && bias.len() == NR);
        // SAFETY: `bias` holds NR floats.
        let mut v: [Row; R] = [unsafe { bias_row(bias) }; R];
        let (mut a, mut b) = (a.as_ptr(), b.as_ptr());
        for _ in 0..k {
            // SAFETY (all loads): `k` steps of MR and NR floats stay within
            // the lengths asserted above.
            unsafe {
                let bv: Row = std::array::from_fn(|j| _mm256_loadu_ps(b.add(8 * j)));
                for (i, v) in v.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(i));
                    for (v, bv) in v.iter_mut().zip(bv) {
                        *v = _mm256_fmadd_ps(av, bv, *v);
                    }
                }
                a = a.add(MR);
                b = b.add(NR);
            }
        }
        const { assert!(NV == 2) };
        for (i, v) in v.into_iter().enumerate() {
            // SAFETY: `i < R == out.rows`; the CPU has AVX.
            unsafe { out.store_row_avx(i, v) };
        }
    }

    /// [`dot`] reading its `R` rows from `x` (`R` rows of `k`) in place.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `R == out.rows`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_direct<const R: usize>(
        x: &[f32],
        b: &[f32],
        k: usize,
        bias: &[f32],
        out: &TileOut,
    ) {
        assert!(R <= MR && x.len() >= R * k && b.len() >= k * NR && bias.len() == NR);
        // SAFETY: `bias` holds NR floats.
        let mut v: [Row; R] = [unsafe { bias_row(bias) }; R];
        let rows: [*const f32; R] = std::array::from_fn(|i| x[i * k..].as_ptr());
        let mut b = b.as_ptr();
        for j in 0..k {
            // SAFETY (all loads): row `i`'s `k` floats and `k` lines of the
            // strip, as asserted above.
            unsafe {
                let bv: Row = std::array::from_fn(|c| _mm256_loadu_ps(b.add(8 * c)));
                for (v, row) in v.iter_mut().zip(rows) {
                    let av = _mm256_broadcast_ss(&*row.add(j));
                    for (v, bv) in v.iter_mut().zip(bv) {
                        *v = _mm256_fmadd_ps(av, bv, *v);
                    }
                }
                b = b.add(NR);
            }
        }
        for (i, v) in v.into_iter().enumerate() {
            // SAFETY: `i < R == out.rows`; the CPU has AVX.
            unsafe { out.store_row_avx(i, v) };
        }
    }
}

/// The kernel with one 16-lane register per tile row: the same layouts
/// and tiles as [`avx2`], half the instructions (one weight load and six
/// FMAs with their broadcast folded in per step, against two loads, six
/// broadcasts and twelve FMAs).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR, PackedLinear, Tile, TileOut};
    use crate::cpu_kernels::Epilogue;
    use std::arch::x86_64::*;

    /// [`PackedLinear::tile`] compiled for AVX-512 F.
    ///
    /// # Safety
    /// AVX2, FMA and AVX-512 F must be available.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn tile(p: &PackedLinear, a: &[f32], tile: &Tile, out: &TileOut) {
        let (k, t) = (p.k, tile.r0 / MR);
        let a = &a[t * k * MR..(t + 1) * k * MR];
        let (b, bias) = p.strip(tile.strip);
        // SAFETY: this function's features are the kernel's.
        unsafe { dot_rows!(dot, out.rows, a, b, k, bias, out) }
    }

    /// One output tile from the unpacked input `x` (`[m, k]` rows): rows
    /// `r0 .. r0 + out.rows` against weight strip `strip`.
    ///
    /// # Safety
    /// AVX2, FMA and AVX-512 F must be available.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn tile_direct(
        p: &PackedLinear,
        x: &[f32],
        r0: usize,
        strip: usize,
        out: &TileOut,
    ) {
        let k = p.k;
        let x = &x[r0 * k..(r0 + out.rows) * k];
        let (b, bias) = p.strip(strip);
        // SAFETY: this function's features are the kernel's.
        unsafe { dot_rows!(dot_direct, out.rows, x, b, k, bias, out) }
    }

    /// [`dot`] reading its `R` rows from `x` (`R` rows of `k`) in place.
    ///
    /// # Safety
    /// AVX-512 F must be available.
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn dot_direct<const R: usize>(
        x: &[f32],
        b: &[f32],
        k: usize,
        bias: &[f32],
        out: &TileOut,
    ) {
        const { assert!(NR == 16) };
        assert!(R <= MR && x.len() >= R * k && b.len() >= k * NR && bias.len() == NR);
        // SAFETY: `bias` holds NR = 16 floats.
        let mut v = [unsafe { _mm512_loadu_ps(bias.as_ptr()) }; R];
        let rows: [*const f32; R] = std::array::from_fn(|i| x[i * k..].as_ptr());
        let mut b = b.as_ptr();
        for j in 0..k {
            // SAFETY (all loads): row `i`'s `k` floats and `k` lines of the
            // strip, as asserted above.
            unsafe {
                let bv = _mm512_loadu_ps(b);
                for (v, row) in v.iter_mut().zip(rows) {
                    *v = _mm512_fmadd_ps(_mm512_set1_ps(*row.add(j)), bv, *v);
                }
                b = b.add(NR);
            }
        }
        // SAFETY: `R` is the tile's row count (`dot_rows!`).
        unsafe { store_rows(out, v) }
    }

    /// `bias + Σ_p a[p][i] · b[p][j]` for the first `R <= MR` rows of the
    /// packed tile `a`, stored to `out`.
    ///
    /// # Safety
    /// AVX-512 F must be available.
    #[target_feature(enable = "avx2,fma,avx512f")]
    unsafe fn dot<const R: usize>(a: &[f32], b: &[f32], k: usize, bias: &[f32], out: &TileOut) {
        const { assert!(NR == 16) };
        assert!(R <= MR && a.len() >= k * MR && b.len() >= k * NR && bias.len() == NR);
        // SAFETY: `bias` holds NR = 16 floats.
        let mut v = [unsafe { _mm512_loadu_ps(bias.as_ptr()) }; R];
        let (mut a, mut b) = (a.as_ptr(), b.as_ptr());
        for _ in 0..k {
            // SAFETY (all loads): `k` steps of MR and NR floats stay within
            // the lengths asserted above.
            unsafe {
                let bv = _mm512_loadu_ps(b);
                for (i, v) in v.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i)), bv, *v);
                }
                a = a.add(MR);
                b = b.add(NR);
            }
        }
        // SAFETY: `R` is the tile's row count (`dot_rows!`).
        unsafe { store_rows(out, v) }
    }

    /// The tile's rows from registers (product plus bias) to `out`:
    /// activation or residual applied on the way, a masked store for a
    /// strip cut short at `n`. Why not through arrays and
    /// [`TileOut::finish_row`]: with the bias copied into the
    /// accumulators' array and the rows stored back into it, a tile of a
    /// 64-wide reduction (MobileCLIP's first stage) spent as long around
    /// its loop as in it: 58 GFLOP/s on one core against 106 for the same
    /// loop alone.
    ///
    /// # Safety
    /// AVX-512 F must be available; `R == out.rows`.
    #[inline(always)]
    unsafe fn store_rows<const R: usize>(out: &TileOut, v: [__m512; R]) {
        debug_assert!(R == out.rows && out.cols <= NR);
        let mask: __mmask16 = if out.cols >= NR {
            !0
        } else {
            (1 << out.cols) - 1
        };
        for (i, mut y) in v.into_iter().enumerate() {
            // SAFETY (all intrinsics): the masked loads and stores touch
            // row `i`'s `cols` floats of `out` and of its residual, which
            // the contract of `TileOut` makes valid; the CPU has AVX-512 F.
            unsafe {
                if out.act != Epilogue::None {
                    // Inlined here, the activation vectorises at 16 lanes.
                    let mut t = [0f32; NR];
                    _mm512_storeu_ps(t.as_mut_ptr(), y);
                    out.act.apply_generic(&mut t);
                    y = _mm512_loadu_ps(t.as_ptr());
                }
                if let Some(r) = out.residual {
                    let r = &r[i * out.ld..i * out.ld + out.cols];
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, r.as_ptr()));
                }
                _mm512_mask_storeu_ps(out.y.add(i * out.ld), mask, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::Epilogue;
    use crate::tiled::{forward, forward_normed};
    use candle_core::{Device, Module};

    /// Uniform in [-0.5, 0.5), from a fixed xorshift sequence.
    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// `x · wᵀ + b` in f64, row by row: the reference, independent of
    /// candle's and our kernels.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Vec<Vec<f64>> {
        let (x, w, b) = (
            x.to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap(),
        );
        x.iter()
            .map(|x| {
                w.iter()
                    .zip(&b)
                    .map(|(w, b)| {
                        x.iter()
                            .zip(w)
                            .map(|(x, w)| *x as f64 * *w as f64)
                            .sum::<f64>()
                            + *b as f64
                    })
                    .collect()
            })
            .collect()
    }

    fn max_abs_err(got: &Tensor, want: &[Vec<f64>]) -> f64 {
        got.to_vec2::<f32>()
            .unwrap()
            .iter()
            .zip(want)
            .flat_map(|(g, w)| g.iter().zip(w).map(|(g, w)| (*g as f64 - w).abs()))
            .fold(0.0, f64::max)
    }

    #[test]
    fn matches_an_f64_reference_on_every_edge_of_the_tiling() -> Result<()> {
        // Rows not a multiple of 6 or of a task's 48, output not a multiple
        // of 16, odd and long reductions, one row, one column; 403 rows
        // are 8 row blocks of 8 or 9 tiles (the last one short).
        for (m, k, n) in [
            (1, 1, 1),
            (1, 7, 3),
            (5, 64, 16),
            (53, 131, 37),
            (100, 768, 200),
            (403, 40, 70),
            // Enough row blocks that each task packs (or reads in place)
            // its own rows.
            (6001, 100, 40),
            (24576, 9, 17),
        ] {
            let x = randn(&[m, k], 1);
            let w = randn(&[n, k], 2);
            let b = randn(&[n], 3);
            let want = reference(&x, &w, &b);
            let p = PackedLinear::new(&w, Some(&b))?;
            let got = forward(&p, &x, None, Epilogue::None)?;
            assert_eq!(got.dims(), [m, n]);
            let e = max_abs_err(&got, &want);
            assert!(e < 1e-5 * (k as f64).sqrt(), "{m}x{k}x{n}: max error {e}");
            // A transposed view packs the same.
            let wt = w.t()?.contiguous()?.t()?;
            let again = forward(&PackedLinear::new(&wt, Some(&b))?, &x, None, Epilogue::None)?;
            assert_eq!(again.to_vec2::<f32>()?, got.to_vec2::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn epilogues_norm_and_bad_shapes() -> Result<()> {
        let (m, k, n) = (13, 96, 40);
        let x = (randn(&[2, m, k], 10) * 3.0)?.affine(1.0, 0.5)?;
        let (w, b) = (randn(&[n, k], 11), randn(&[n], 12));
        let (lw, lb) = (randn(&[k], 13), randn(&[k], 14));
        let res = randn(&[2, m, n], 15);
        let p = PackedLinear::new(&w, Some(&b))?;
        let lin = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(close(&forward(&p, &x, None, Epilogue::None)?, &lin)? < 1e-4);
        let with_res = forward(&p, &x, Some(&res), Epilogue::None)?;
        assert!(close(&with_res, &(&lin + &res)?)? < 1e-4);
        let gelu = forward(&p, &x, None, Epilogue::QuickGelu)?;
        let want = (&lin * candle_nn::ops::sigmoid(&(&lin * 1.702)?)?)?;
        assert!(close(&gelu, &want)? < 1e-4);
        // The layer norm folded into packing is exactly norm, then linear.
        let normed = crate::cpu_kernels::layer_norm(&x, &lw, &lb, 1e-5)?;
        for (residual, epilogue) in [
            (None, Epilogue::None),
            (None, Epilogue::QuickGelu),
            (Some(&res), Epilogue::None),
        ] {
            let want = forward(&p, &normed, residual, epilogue)?;
            let got = forward_normed(&p, &x, (&lw, &lb, 1e-5), residual, epilogue)?;
            assert_eq!(got.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
        }
        // No bias is a zero bias.
        let nb = PackedLinear::new(&w, None)?;
        let want = candle_nn::Linear::new(w.clone(), None).forward(&x)?;
        assert!(close(&forward(&nb, &x, None, Epilogue::None)?, &want)? < 1e-4);
        // Clear errors, no panics.
        assert!(forward(&p, &randn(&[3, k - 1], 1), None, Epilogue::None).is_err());
        assert!(forward(&p, &x, Some(&res), Epilogue::QuickGelu).is_err());
        assert!(forward(&p, &x, Some(&randn(&[2, m, n - 1], 1)), Epilogue::None).is_err());
        let short = randn(&[k - 1], 16);
        assert!(forward_normed(&p, &x, (&short, &lb, 1e-5), None, Epilogue::None).is_err());
        assert!(PackedLinear::new(&w, Some(&randn(&[n + 1], 1))).is_err());
        assert!(PackedLinear::new(&randn(&[0, k], 1), None).is_err());
        Ok(())
    }

    /// [`mlp`] is `fc1`, the activation, then `fc2` with the residual, to
    /// the bit (the same kernels sum in the same order), on widths that
    /// cut tiles and strips short and blocks of rows aligned to 1, 7 and
    /// 64 (whose tiles start off the layer's tile grid); each row asked for
    /// once; and it declines what it does not cover.
    #[test]
    fn mlp_is_the_two_layers_in_a_row() -> Result<()> {
        // Enough blocks for any thread count's threshold, and a short last
        // tile.
        let m = 4 * crate::cpu_kernels::threads() * 64 * 7;
        for (k, hidden, n, act, align) in [
            (64, 192, 64, Epilogue::GeluErf, 64),
            (40, 100, 24, Epilogue::GeluErf, 7),
            (7, 33, 5, Epilogue::QuickGelu, 1),
            (96, 1024, 96, Epilogue::None, 7),
        ] {
            let x = randn(&[m, k], 20);
            let fc1 = PackedLinear::new(&randn(&[hidden, k], 21), Some(&randn(&[hidden], 22)))?;
            let fc2 = PackedLinear::new(&randn(&[n, hidden], 23), Some(&randn(&[n], 24)))?;
            let res = randn(&[m, n], 25);
            let h = forward(&fc1, &x, None, act)?;
            let want = forward(&fc2, &h, Some(&res), Epilogue::None)?.to_vec2::<f32>()?;
            let (xs, rs) = (
                x.flatten_all()?.to_vec1::<f32>()?,
                res.flatten_all()?.to_vec1()?,
            );
            let asked = std::sync::Mutex::new(vec![0u8; m]);
            let input = |rows: Range<usize>, dst: &mut [f32]| {
                assert_eq!(rows.start % align, 0, "blocks start on an aligned row");
                asked.lock().unwrap()[rows.clone()]
                    .iter_mut()
                    .for_each(|a| *a += 1);
                dst.copy_from_slice(&xs[rows.start * k..rows.end * k]);
            };
            let got = mlp((&fc1, &fc2), m, (&input, align), act, &rs);
            if !PackedLinear::direct() {
                assert!(
                    got.is_none(),
                    "only the AVX2 and AVX-512 kernels read rows in place"
                );
                continue;
            }
            let got = got.expect("fused");
            let got = &got.data[got.start..got.start + m * n];
            assert_eq!(
                got,
                want.concat(),
                "{k} -> {hidden} -> {n}, rows by {align}"
            );
            assert!(asked.into_inner().unwrap().iter().all(|&a| a == 1));
        }
        // Declined: too few rows to share, widths that do not chain, a
        // hidden width past the in-place kernel's, a residual of the wrong
        // length.
        let (fc1, fc2) = (
            PackedLinear::new(&randn(&[48, 16], 1), None)?,
            PackedLinear::new(&randn(&[16, 48], 2), None)?,
        );
        let zeros = |_: Range<usize>, dst: &mut [f32]| dst.fill(0.0);
        let few = vec![0.5; 12 * 16];
        assert!(mlp((&fc1, &fc2), 12, (&zeros, 1), Epilogue::None, &few).is_none());
        let rows = vec![0.5; m * 16];
        assert!(mlp((&fc1, &fc1), m, (&zeros, 1), Epilogue::None, &rows).is_none());
        assert!(mlp((&fc1, &fc2), m, (&zeros, 1), Epilogue::None, &rows[1..]).is_none());
        let wide = PackedLinear::new(&randn(&[DIRECT_MAX_K + 1, 16], 3), None)?;
        let back = PackedLinear::new(&randn(&[16, DIRECT_MAX_K + 1], 4), None)?;
        assert!(mlp((&wide, &back), m, (&zeros, 1), Epilogue::None, &rows).is_none());
        Ok(())
    }

    #[test]
    fn generic_and_avx2_tiles_agree() {
        let (k, n) = (301, 16);
        let p = PackedLinear::new(&randn(&[n, k], 4), Some(&randn(&[n], 5))).unwrap();
        let x = randn(&[MR, k], 6).to_vec2::<f32>().unwrap().concat();
        let mut a = vec![f32::NAN; k * MR];
        p.pack_rows(&x, MR, None, &mut a);
        let mut acc = [[0f32; NR]; MR];
        dot_generic(&a, floats(&p.w), k, MR, &mut acc);
        let mut want = [0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                want[i * NR + j] = v + p.bias[j];
            }
        }
        let tile = Tile { r0: 0, strip: 0 };
        // Every kernel this CPU can run, whichever `tile` picks.
        type Kernel<'k> = Box<dyn Fn(&[f32], &TileOut) + 'k>;
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut kernels: Vec<(&str, Kernel)> =
            vec![("dispatch", Box::new(|a, o| p.tile(a, &tile, o)))];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu_kernels::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA.
                kernels.push((
                    "avx2",
                    Box::new(|a, o| unsafe { avx2::tile(&p, a, &tile, o) }),
                ));
            }
            if crate::cpu_kernels::has_avx512f() {
                // SAFETY: the CPU has AVX-512 F too.
                kernels.push((
                    "avx512",
                    Box::new(|a, o| unsafe { avx512::tile(&p, a, &tile, o) }),
                ));
            }
        }
        for (name, kernel) in kernels {
            let mut got = [0f32; MR * NR];
            kernel(&a, &TileOut::whole(&mut got, None, Epilogue::None));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{name}: {g} vs {w}"
                );
            }
        }
    }
}
