//! What the CPU's packed linear layers share, whatever their number format
//! (f32 in [`crate::packed`], int8 in [`crate::int8`]): weights packed once
//! at load into strips of [`NR`] output columns, activations packed per
//! call into tiles of [`MR`] rows (layer-normed on the way when the layer
//! follows a norm), `MR × NR` output tiles computed over the whole
//! reduction with bias, activation and residual applied while the tile is
//! in registers, and tiles spread over rayon's pool.
//!
//! Why packed once: the `gemm` crate packs its right-hand side (our
//! weights) on every call, which was 16 % of a one-image ViT-B/32 forward
//! (BENCHMARKS.md, "Where the time goes, per op type"); ONNX Runtime's MLAS
//! packs constant weights at load, and so do we.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cpu_kernels::{Epilogue, SharedOut, f32s, layer_norm_row, threads, with_f32s};
use crate::packed::PackedLinear;

/// Columns per weight strip (two 8-lane registers).
pub(crate) const NR: usize = 16;
/// Rows per tile.
pub(crate) const MR: usize = 6;
/// Rows per parallel task: a multiple of `MR`, small enough that a task's
/// packed activation rows stay in L2 at ViT-B/32's widths, while each
/// weight strip is read from memory once per task.
pub(crate) const MC: usize = 8 * MR;

/// The most packed-activation bytes a thread keeps between calls
/// ([`with_scratch`]): ViT-B/32's largest (the MLP's second layer) at 64
/// images is 39 MB. Larger buffers are allocated per call and freed, so a
/// thread that once ran a huge batch does not hold its buffer for good.
const SCRATCH_KEEP_BYTES: usize = 64 << 20;

/// 16 floats on one 64-byte cache line: the unit of the f32 weight strips
/// and of the scratch buffers, so that neither straddles lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [f32; NR]);

/// The floats of `lines`, in order.
pub(crate) fn floats(lines: &[Line]) -> &[f32] {
    // SAFETY: `Line` is `repr(C)` around `[f32; NR]` and 64 bytes, exactly
    // NR floats with no padding, so the lines are `len · NR` contiguous
    // floats.
    unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const f32, lines.len() * NR) }
}

thread_local! {
    /// This thread's packed-activation buffer, kept between layers.
    static SCRATCH: std::cell::Cell<Vec<Line>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Element types for which every bit pattern is a value, so a scratch
/// buffer's stale bytes can be lent out as them.
///
/// # Safety
/// Implementors have no invalid bit patterns, no padding, and an alignment
/// of at most 64 bytes.
pub(crate) unsafe trait Plain: Copy {}
// SAFETY: plain numbers, aligned to their size (≤ 4 bytes).
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for i16 {}
// SAFETY: as above.
unsafe impl Plain for u8 {}

/// Calls `f` with `len` values of this thread's scratch buffer (holding
/// whatever the last call left there) for a layer's packed activations:
/// f32 rows, or the int8 layers' quantised ones.
///
/// Why not a fresh `Vec` per layer: a forward pass runs on one of rayon's
/// workers ([`crate::LoadedClip`]'s `on_pool`), and glibc gives each
/// worker its own arena, made of 64 MB heaps of which all but the first
/// are unmapped as soon as they empty, whatever `M_TRIM_THRESHOLD` says
/// (only [`crate::tune_malloc_for_inference`]'s `M_TOP_PAD` stops that, and
/// a library cannot count on its caller having called it). At ViT-B/32 and
/// 32 images a layer's blocks (20 MB for the MLP's packed hidden rows)
/// outgrow the first heap, so every layer mapped fresh pages and faulted
/// them in: 1.05 million page faults in 8 s of images ×32 (BENCHMARKS.md,
/// issue #24). A reused buffer also needs no zeroing.
/// Re-entrant: a call made while this thread's buffer is lent out (rayon
/// runs other jobs while it waits) allocates its own.
pub(crate) fn with_scratch<T: Plain, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let per_line = size_of::<Line>() / size_of::<T>();
    let lines = len.div_ceil(per_line);
    let all = |buf: &mut Vec<Line>| {
        // SAFETY: the lines are `len · 64` contiguous initialised bytes,
        // aligned to 64, which `T` (`Plain`) may view as values of its own;
        // `buf` is exclusively borrowed here.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut T, buf.len() * per_line) }
    };
    if lines * size_of::<Line>() > SCRATCH_KEEP_BYTES {
        // Too large to keep: a buffer of its own, and the kept one stays.
        let mut buf = vec![Line([0.0; NR]); lines];
        return f(&mut all(&mut buf)[..len]);
    }
    let mut buf = SCRATCH.with(std::cell::Cell::take);
    if buf.len() < lines {
        // Not `resize`: the old contents need no copy.
        buf = vec![Line([0.0; NR]); lines];
    }
    let r = f(&mut all(&mut buf)[..len]);
    SCRATCH.with(|s| {
        // Keep the larger of ours and one a nested call put back.
        let other = s.take();
        s.set(if other.len() > buf.len() { other } else { buf });
    });
    r
}

/// A layer norm applied to each input row as it is packed.
pub(crate) struct RowNorm<'a> {
    pub(crate) w: &'a [f32],
    pub(crate) b: &'a [f32],
    pub(crate) eps: f32,
}

/// Calls `f(lane, row)` for the rows of activation tile `t` (rows
/// `MR t ..`, fewer in the last tile) of the `m × k` input `x`, each
/// layer-normed first (into `normed`, grown as needed) when `norm` is
/// given: how the packed layers walk their input when packing it.
///
/// `normed` (and the callers' other per-row buffers) belong to the
/// parallel loop's task (`for_each_init`), not to each tile: per tile they
/// were hundreds of allocations per layer from every pool thread, and,
/// with glibc limited to one arena (`MALLOC_ARENA_MAX=1`), most of the
/// lock waits beside the `gemm` crate's buffers in attention
/// (BENCHMARKS.md, issue #24).
pub(crate) fn rows_of_tile(
    x: &[f32],
    (m, k): (usize, usize),
    t: usize,
    norm: Option<&RowNorm>,
    normed: &mut Vec<f32>,
    mut f: impl FnMut(usize, &[f32]),
) {
    if norm.is_some() && normed.len() < k {
        normed.resize(k, 0.0);
    }
    for (lane, r) in (t * MR..((t + 1) * MR).min(m)).enumerate() {
        let row = &x[r * k..(r + 1) * k];
        match norm {
            Some(n) => {
                layer_norm_row(row, n.w, n.b, n.eps, &mut normed[..k]);
                f(lane, &normed[..k]);
            }
            None => f(lane, row),
        }
    }
}

/// Zeroes activation tile `t` of an `m`-row input when it is the last,
/// partial one: its padding rows must read as zeros, and the packed layers'
/// tiles live in a reused scratch buffer ([`with_scratch`]) that holds an
/// earlier layer's values. Whole tiles are overwritten row by row anyway.
pub(crate) fn clear_padding_tile<T: Plain + Default>(tile: &mut [T], t: usize, m: usize) {
    if (t + 1) * MR > m {
        tile.fill(T::default());
    }
}

/// Writes `row` into lane `lane` of an activation tile laid out
/// `[k / G][MR][G]`: each row's values in groups of `G` consecutive ones
/// (one f32, an i16 pair, a u8 quad: what one kernel step multiplies), the
/// tile's rows interleaved group by group, so the kernel's broadcasts walk
/// one contiguous stream. The layout of all three packed layers' inputs.
#[inline(always)]
pub(crate) fn put_row<T: Copy, const G: usize>(tile: &mut [T], lane: usize, row: &[T]) {
    for (p, group) in row.chunks_exact(G).enumerate() {
        let at = (p * MR + lane) * G;
        tile[at..at + G].copy_from_slice(group);
    }
}

/// A linear layer `y = x · wᵀ + b` with weights packed at load.
pub(crate) trait TiledLinear: Send + Sync {
    /// The op's name in candle errors.
    fn name(&self) -> &'static str;
    /// Input width.
    fn k(&self) -> usize;
    /// Output width.
    fn n(&self) -> usize;
    /// The layer as an f32 [`PackedLinear`], if it is one (for
    /// [`crate::packed::mlp`], which chains two).
    fn as_packed_f32(&self) -> Option<&PackedLinear> {
        None
    }
    /// `act(norm(x) · wᵀ + b) (+ residual)` for `m` contiguous rows of `x`
    /// (shapes checked by the caller).
    fn run(
        &self,
        x: &[f32],
        m: usize,
        norm: Option<&RowNorm>,
        residual: Option<&[f32]>,
        act: Epilogue,
    ) -> Rows;
}

/// A layer's `m × n` output, starting on a cache line inside `data`: the
/// tiles' rows of 16 floats are then whole 64-byte lines. From the heap
/// (`M_MMAP_THRESHOLD` is raised for inference) a `Vec<f32>` starts
/// anywhere 16 bytes apart, and one that straddles lines made each of the
/// tile's row stores two partial ones: single-threaded int8 layers of
/// 77-token texts ×32 ran 2–25 % slower (q/k/v 130 → 162 GMAC/s, the
/// same binary alternating the two placements; BENCHMARKS.md, issue #24).
pub(crate) struct Rows {
    /// `start` floats of padding, the output, then padding to the end:
    /// zeros.
    pub(crate) data: Vec<f32>,
    pub(crate) start: usize,
}

impl Rows {
    /// The output as a tensor of `shape` (its `m · n` elements): a view
    /// from the first cache line on, as [`forward`]'s.
    pub(crate) fn into_tensor(self, shape: &Shape, device: &Device) -> Result<Tensor> {
        let len = self.data.len();
        Tensor::from_vec(self.data, len, device)?
            .narrow(0, self.start, shape.elem_count())?
            .reshape(shape)
    }
}

/// `act(x · wᵀ + b) (+ residual)` for `x [.., k]`.
pub(crate) fn forward(
    layer: &dyn TiledLinear,
    x: &Tensor,
    residual: Option<&Tensor>,
    epilogue: Epilogue,
) -> Result<Tensor> {
    apply(layer, x, None, residual, epilogue)
}

/// `act(layer_norm(x) · wᵀ + b) (+ residual)`: the layer norm (weight,
/// bias, eps) is computed row by row as the rows are packed, so the
/// normalised activations are never written out as a tensor (one pass and
/// one allocation fewer per layer than a layer norm op before this one).
pub(crate) fn forward_normed(
    layer: &dyn TiledLinear,
    x: &Tensor,
    norm: (&Tensor, &Tensor, f64),
    residual: Option<&Tensor>,
    epilogue: Epilogue,
) -> Result<Tensor> {
    let (w, b, eps) = norm;
    let k = layer.k();
    if w.dims() != [k] || b.dims() != [k] {
        candle_core::bail!(
            "{}: layer norm weight {:?} and bias {:?} for input width {k}",
            layer.name(),
            w.dims(),
            b.dims(),
        );
    }
    let norm = (
        w.to_dtype(candle_core::DType::F32)?.contiguous()?,
        b.to_dtype(candle_core::DType::F32)?.contiguous()?,
        eps as f32,
    );
    apply(layer, x, Some(norm), residual, epilogue)
}

fn apply(
    layer: &dyn TiledLinear,
    x: &Tensor,
    norm: Option<(Tensor, Tensor, f32)>,
    residual: Option<&Tensor>,
    epilogue: Epilogue,
) -> Result<Tensor> {
    crate::cpu_kernels::check_epilogue(residual, epilogue)?;
    let op = Op {
        layer,
        norm,
        residual: residual.map(Tensor::contiguous).transpose()?,
        epilogue,
        start: AtomicUsize::new(0),
    };
    let y = x.contiguous()?.apply_op1_no_bwd(&op)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = layer.n();
    }
    let len = dims.iter().product();
    // A view from the first cache line on (see `Rows`); contiguous, so
    // candle's ops and ours read it as any other tensor.
    y.narrow(0, op.start.load(Ordering::Relaxed), len)?
        .reshape(dims)
}

struct Op<'a> {
    layer: &'a dyn TiledLinear,
    /// Layer norm weight, bias, eps (checked to be `[k]` f32).
    norm: Option<(Tensor, Tensor, f32)>,
    residual: Option<Tensor>,
    epilogue: Epilogue,
    /// Where `cpu_fwd`'s output starts in the buffer it returns.
    start: AtomicUsize,
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        self.layer.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let (k, n, name) = (self.layer.k(), self.layer.n(), self.layer.name());
        let in_dims = l.dims();
        if in_dims.last() != Some(&k) {
            candle_core::bail!("{name}: input {in_dims:?}, weight [{n}, {k}]");
        }
        let m = x.len() / k.max(1);
        let mut out_dims = in_dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        let act = self.epilogue;
        if let Some(res) = &self.residual
            && res.dims() != out_dims.as_slice()
        {
            candle_core::bail!("{name}: residual {:?}, output {out_dims:?}", res.dims());
        }
        let with_residual = |norm: Option<&RowNorm>| match &self.residual {
            Some(res) => with_f32s(res, |r| Ok(self.layer.run(x, m, norm, Some(r), act))),
            None => Ok(self.layer.run(x, m, norm, None, act)),
        };
        let y = match &self.norm {
            Some((w, b, eps)) => with_f32s(w, |w| {
                with_f32s(b, |b| with_residual(Some(&RowNorm { w, b, eps: *eps })))
            })?,
            None => with_residual(None)?,
        };
        // The whole buffer, padding and all: `apply` narrows it to the
        // output (a custom op's result cannot start at an offset).
        self.start.store(y.start, Ordering::Relaxed);
        let len = y.data.len();
        Ok((CpuStorage::F32(y.data), Shape::from(len)))
    }
}

/// Where a tile's rows go: `rows × cols` floats at `y`, `ld` apart, with
/// the residual (same layout) added and quick-GELU applied on the way.
pub(crate) struct TileOut<'a> {
    pub(crate) y: *mut f32,
    /// Row stride of `y` and `residual`.
    pub(crate) ld: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) residual: Option<&'a [f32]>,
    /// The activation after the bias (never together with a residual).
    pub(crate) act: Epilogue,
}

impl<'a> TileOut<'a> {
    /// A whole `MR × NR` tile written to `y`, row after row: what the
    /// kernels' unit tests compare.
    #[cfg(test)]
    pub(crate) fn whole(
        y: &mut [f32; MR * NR],
        residual: Option<&'a [f32]>,
        act: Epilogue,
    ) -> Self {
        Self {
            y: y.as_mut_ptr(),
            ld: NR,
            rows: MR,
            cols: NR,
            residual,
            act,
        }
    }

    /// Writes row `i` of the tile from two vectors of 8 (the product plus
    /// bias): the activation (inlined, so at 8 lanes in an AVX2 caller)
    /// and the residual applied in registers, a masked store for a row
    /// cut short at `cols`. Why not through [`Self::finish_row`]: the
    /// kernels' two 32-byte stores into its array, read back as one
    /// 64-byte copy, defeat store forwarding (a tenth of an int8 layer's
    /// epilogue time), and the copy out was a `memmove` call per row (3.5 %
    /// of MobileCLIP-S1's forward on the AVX2 kernels).
    ///
    /// # Safety
    /// As [`Self::finish_row`]; the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) unsafe fn store_row_avx(
        &self,
        i: usize,
        mut y: [std::arch::x86_64::__m256; NR / 8],
    ) {
        use std::arch::x86_64::*;
        debug_assert!(i < self.rows && self.cols <= NR);
        // SAFETY (all intrinsics): the CPU has AVX2; the loads and stores
        // touch row `i`'s first `cols` floats of `y` and of the residual,
        // which the contract makes valid (masked past `cols`).
        unsafe {
            // The int8 kernels' case (no activation, a whole row) first
            // and on its own: folded into the general path below, their
            // 77-token texts at 32 ran 5 % slower (best call 337 → 357 ms,
            // three interleaved rounds; the same instructions, arranged
            // differently by the compiler).
            if self.cols == NR && self.act == Epilogue::None {
                let at = self.y.add(i * self.ld);
                let r = self.residual.map(|r| &r[i * self.ld..i * self.ld + NR]);
                for (v, y) in y.into_iter().enumerate() {
                    let y = match r {
                        Some(r) => _mm256_add_ps(y, _mm256_loadu_ps(r.as_ptr().add(8 * v))),
                        None => y,
                    };
                    _mm256_storeu_ps(at.add(8 * v), y);
                }
                return;
            }
            if self.act != Epilogue::None {
                let mut t = [0f32; NR];
                for (v, y) in y.iter().enumerate() {
                    _mm256_storeu_ps(t.as_mut_ptr().add(8 * v), *y);
                }
                self.act.apply_generic(&mut t);
                for (v, y) in y.iter_mut().enumerate() {
                    *y = _mm256_loadu_ps(t.as_ptr().add(8 * v));
                }
            }
            let at = self.y.add(i * self.ld);
            let r = self
                .residual
                .map(|r| r[i * self.ld..i * self.ld + self.cols].as_ptr());
            if self.cols == NR {
                for (v, y) in y.into_iter().enumerate() {
                    let y = match r {
                        Some(r) => _mm256_add_ps(y, _mm256_loadu_ps(r.add(8 * v))),
                        None => y,
                    };
                    _mm256_storeu_ps(at.add(8 * v), y);
                }
                return;
            }
            // Masked: AMD's masked stores are slow, but only the last
            // strip of a layer whose width is not a multiple of 16 comes
            // here.
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            for (v, y) in y.into_iter().enumerate() {
                // Lanes `8 v + j < cols`: all ones where stored.
                let left = self.cols as i32 - 8 * v as i32;
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes);
                let y = match r {
                    Some(r) => _mm256_add_ps(y, _mm256_maskload_ps(r.add(8 * v), mask)),
                    None => y,
                };
                _mm256_maskstore_ps(at.add(8 * v), mask, y);
            }
        }
    }

    /// Writes row `i` of the tile from `t` (the product plus bias).
    ///
    /// # Safety
    /// `i < rows`, and `y` points at `rows` rows of `cols` writable floats,
    /// `ld` apart.
    #[inline(always)]
    pub(crate) unsafe fn finish_row(&self, i: usize, t: &mut [f32; NR]) {
        // Here, while the tile is in cache, rather than as a pass over the
        // output afterwards (measured: 3 % of a batch-32 image forward as a
        // separate pass).
        self.act.apply_generic(t);
        // SAFETY: per the contract.
        let y = unsafe { std::slice::from_raw_parts_mut(self.y.add(i * self.ld), self.cols) };
        match self.residual {
            Some(r) => {
                let r = &r[i * self.ld..i * self.ld + self.cols];
                for ((y, t), r) in y.iter_mut().zip(t.iter()).zip(r) {
                    *y = t + r;
                }
            }
            None => match <&mut [f32; NR]>::try_from(&mut *y) {
                // A whole tile row as a fixed-size copy: vector stores, not
                // a call to `memcpy` (5 % of an int8 layer's time).
                Ok(y) => *y = *t,
                Err(_) => y.copy_from_slice(&t[..self.cols]),
            },
        }
    }
}

/// One output tile: rows `r0 ..` (`MR` at most; tile `r0 / MR` of the
/// packed activations) of strip `strip`.
pub(crate) struct Tile {
    pub(crate) r0: usize,
    pub(crate) strip: usize,
}

/// Makes the `m × n` output by calling `f` with each tile and where it
/// goes (residual rows attached); every element is written by exactly one
/// call. Tasks are (row block of [`MC`], group of strips); short batches
/// have few row blocks, so the columns are split too and every core gets
/// work.
pub(crate) fn for_each_tile(
    m: usize,
    n: usize,
    residual: Option<&[f32]>,
    act: Epilogue,
    f: impl Fn(&Tile, &TileOut) + Sync,
) -> Rows {
    for_each_task(m, n, residual, act, |task| {
        for (r0, strip) in task.tiles() {
            f(&Tile { r0, strip }, &task.out(r0, strip));
        }
    })
}

/// How [`for_each_task`] splits an `m × n` output: (row blocks, groups of
/// strips per row block). One group means every task has rows of its own,
/// so a layer may pack each task's rows in the task, while they are hot,
/// instead of all rows in a pass before.
pub(crate) fn task_layout(m: usize, n: usize) -> (usize, usize) {
    let strips = n.div_ceil(NR);
    // Blocks of about MC rows, as even as whole tiles allow: 50 rows (one
    // image) are one block rather than 48 + 2, whose tasks would each
    // stream the weights for two rows; 400 rows (8 images) are blocks of 8
    // or 9 tiles, not seven of 54 rows and one of 22 (whose short tasks
    // left a thread idle: +4 to +9 % images/s at 8 images, f32).
    let tiles = m.div_ceil(MR);
    let row_blocks = ((m + MC / 2) / MC).clamp(1, tiles.max(1));
    // At least 8 tasks per thread: rayon balances by stealing whole tasks,
    // so the last one to finish can leave the other threads idle for up
    // to a task's time. 16-token texts ×32 (512 rows) were 11 tasks with 4
    // per thread; 22 now, +6 % texts/s (f32, A/B of 4 rounds; int8 +2 %,
    // other workloads unchanged: they already had enough row blocks).
    // Splitting the columns costs little: each task still reads its
    // strips of the weights once.
    let groups = (8 * threads()).div_ceil(row_blocks).clamp(1, strips.max(1));
    (row_blocks, groups)
}

/// One task of [`for_each_task`]: its rows (starting on a whole tile), its
/// strips, and where their tiles go.
pub(crate) struct Task<'a> {
    pub(crate) rows: std::ops::Range<usize>,
    pub(crate) strips: std::ops::Range<usize>,
    n: usize,
    out: &'a SharedOut,
    residual: Option<&'a [f32]>,
    act: Epilogue,
}

impl Task<'_> {
    /// The task's tiles as (first row, strip), strip by strip: each strip
    /// of the weights is read once while the rows stay in cache.
    pub(crate) fn tiles(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.strips
            .clone()
            .flat_map(|strip| self.rows.clone().step_by(MR).map(move |r0| (r0, strip)))
    }

    /// Where the tile of rows `r0 ..` (within [`Self::rows`], a multiple
    /// of `MR` from its start) and strip `strip` goes.
    pub(crate) fn out(&self, r0: usize, strip: usize) -> TileOut<'_> {
        let n = self.n;
        debug_assert!(self.rows.contains(&r0) && self.strips.contains(&strip));
        let cols = strip * NR..((strip + 1) * NR).min(n);
        TileOut {
            // SAFETY: tasks cover disjoint (row block, strip) rectangles
            // of the output's allocation, which outlives the tasks.
            y: unsafe { self.out.at(r0 * n + cols.start) },
            ld: n,
            rows: MR.min(self.rows.end - r0),
            cols: cols.len(),
            residual: self.residual.map(|r| &r[r0 * n + cols.start..]),
            act: self.act,
        }
    }
}

/// Makes the `m × n` output by calling `f` once per task ([`task_layout`])
/// over rayon's pool; every element is written by exactly one task's tiles
/// (each task must write every tile of its rows and strips).
pub(crate) fn for_each_task(
    m: usize,
    n: usize,
    residual: Option<&[f32]>,
    act: Epilogue,
    f: impl Fn(&Task) + Sync,
) -> Rows {
    let (row_blocks, groups) = task_layout(m, n);
    for_each_task_in(Blocks::Even(row_blocks, groups), m, n, residual, act, f)
}

/// How [`for_each_task_in`] splits the rows among tasks.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Blocks {
    /// `.0` row blocks of whole tiles, as even as tiles allow, each split
    /// into `.1` groups of strips ([`task_layout`]'s).
    Even(usize, usize),
    /// Blocks of this many rows (the last one shorter), all strips each:
    /// rows that go together, such as an image's pixel rows. Their tiles
    /// start at the block's first row.
    Of(usize),
}

/// [`for_each_task`] with the split given.
pub(crate) fn for_each_task_in(
    blocks: Blocks,
    m: usize,
    n: usize,
    residual: Option<&[f32]>,
    act: Epilogue,
    f: impl Fn(&Task) + Sync,
) -> Rows {
    // Not zero-filled: the tiles write every element (zeroing was 2.6 % of
    // a batch-32 image forward).
    let len = m * n;
    let mut y: Vec<f32> = Vec::with_capacity(len + NR - 1);
    // Floats from the allocation's start to its first cache line (f32s are
    // 4-byte aligned, so the distance is a whole number of them).
    // Not `align_offset`, which may answer `usize::MAX`: `start` bounds the
    // writes below, so it is computed. An f32 address is a multiple of 4,
    // so this is at most NR − 1.
    let start = (y.as_ptr() as usize).wrapping_neg() % size_of::<Line>() / size_of::<f32>();
    let strips = n.div_ceil(NR);
    let tiles = m.div_ceil(MR);
    // Part `i` of `parts` nearly equal ones of `0..len`.
    let part = |i: usize, parts: usize, len: usize| i * len / parts..(i + 1) * len / parts;
    let (row_blocks, groups) = match blocks {
        Blocks::Even(r, g) => (r.clamp(1, tiles.max(1)), g.clamp(1, strips.max(1))),
        Blocks::Of(rows) => (m.div_ceil(rows.max(1)).max(1), 1),
    };
    let rows_of = |rb: usize| match blocks {
        Blocks::Even(..) => {
            let t = part(rb, row_blocks, tiles);
            t.start * MR..(t.end * MR).min(m)
        }
        Blocks::Of(rows) => rb * rows.max(1)..((rb + 1) * rows.max(1)).min(m),
    };
    // SAFETY: `start + len ≤ len + NR − 1`, within the capacity.
    let out = SharedOut(unsafe { y.as_mut_ptr().add(start) });
    (0..row_blocks * groups).into_par_iter().for_each(|task| {
        let (rb, g) = (task / groups, task % groups);
        f(&Task {
            rows: rows_of(rb),
            strips: part(g, groups, strips),
            n,
            out: &out,
            residual,
            act,
        });
    });
    // SAFETY: the row blocks cover rows 0..m (whole tiles' parts of
    // 0..tiles, or consecutive blocks of `rows`) and, for each, the groups
    // cover strips 0..strips (consecutive parts), and each task writes all
    // its tiles, so every one of the m · n elements after `start` was
    // written above; the padding on either side is written here.
    unsafe {
        let pad = y.spare_capacity_mut();
        pad[..start].fill(std::mem::MaybeUninit::new(0.0));
        pad[start + len..NR - 1 + len].fill(std::mem::MaybeUninit::new(0.0));
        y.set_len(len + NR - 1);
    }
    Rows { data: y, start }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_start_on_a_cache_line() -> candle_core::Result<()> {
        use candle_core::{Device, Storage};
        let w = Tensor::arange(0f32, 37.0 * 5.0, &Device::Cpu)?.reshape((37, 5))?;
        let b = Tensor::zeros(37, candle_core::DType::F32, &Device::Cpu)?;
        let layer = crate::packed::PackedLinear::new(&w, Some(&b))?;
        // Several sizes, so that the heap hands out differently placed
        // blocks; the values are the layer's tests' business.
        for m in [1, 7, 50, 301] {
            let x = Tensor::ones((m, 5), candle_core::DType::F32, &Device::Cpu)?;
            let y = forward(&layer, &x, None, Epilogue::None)?;
            assert_eq!(y.dims(), [m, 37]);
            assert!(y.is_contiguous());
            let (storage, layout) = y.storage_and_layout();
            let Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage else {
                panic!("f32 CPU storage")
            };
            assert_eq!(
                v[layout.start_offset()..].as_ptr() as usize % 64,
                0,
                "{m} rows"
            );
            // Each output is its weight row's sum (x is all ones).
            let want = w.sum(1)?.to_vec1::<f32>()?;
            for row in y.to_vec2::<f32>()? {
                assert_eq!(row, want);
            }
        }
        Ok(())
    }

    #[test]
    fn scratch_is_reused_and_a_nested_call_gets_its_own() {
        let first = with_scratch(100, |a: &mut [f32]| {
            a.fill(7.0);
            a.as_ptr() as usize
        });
        // Same thread, no larger request: the same buffer, as left.
        let (again, stale) = with_scratch(40, |a: &mut [f32]| (a.as_ptr() as usize, a[39]));
        assert_eq!((again, stale), (first, 7.0));
        assert_eq!(first % 64, 0, "scratch starts on a cache line");
        with_scratch(64, |outer: &mut [f32]| {
            outer.fill(1.0);
            with_scratch(64, |inner: &mut [f32]| {
                assert_ne!(inner.as_ptr(), outer.as_ptr());
                inner.fill(2.0);
            });
            assert!(outer.iter().all(|&v| v == 1.0));
        });
        // Larger than kept: served, not kept (the kept one stays).
        let big = SCRATCH_KEEP_BYTES / size_of::<f32>() + 1;
        with_scratch(big, |a: &mut [f32]| assert_eq!(a.len(), big));
        // Other element types view the same lines.
        with_scratch(100, |a: &mut [u8]| {
            assert_eq!((a.len(), a.as_ptr() as usize % 64), (100, 0));
            a.fill(1);
        });
        with_scratch(33, |a: &mut [i16]| assert_eq!(a.len(), 33));
        let kept = SCRATCH.with(|s| {
            let v = s.take();
            let len = v.len();
            s.set(v);
            len
        });
        assert!(kept * size_of::<Line>() <= SCRATCH_KEEP_BYTES && kept > 0);
    }
}
