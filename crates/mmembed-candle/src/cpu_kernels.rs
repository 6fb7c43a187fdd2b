//! Fused f32 inference kernels for the CPU: linear layers with their bias,
//! activation and residual in the matmul's output pass, multi-head
//! attention straight from the packed QKV projection, and layer norm.
//!
//! Why: profiled on ViT-B/32 (BENCHMARKS.md, "Where the time goes"), the
//! matmuls candle calls run as fast as PyTorch's, but everything around them
//! did not: quick-GELU as three single-threaded elementwise passes with
//! libm's `expf` was 18 % of a batch-32 image forward, the attention's head
//! split/merge copies, per-head matmul calls, mask add and softmax another
//! 5 %, bias and residual adds and layer norm a few more. Here each of those
//! is folded into one pass that runs on rayon's pool (the one the `gemm`
//! crate, and so candle's matmul, already uses), so no second thread pool
//! competes for the cores.
//!
//! The kernels take contiguous f32 CPU tensors; [`supported`] says when a
//! tensor is one, and callers use candle's ops otherwise (other devices,
//! other dtypes, or the `mkl`/`accelerate` features, whose BLAS we leave in
//! charge of matmuls). They have no backward pass: training uses
//! [`crate::train_ops`]. Unit tests compare each with candle's op graph.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Whether `x` can go through these kernels.
pub(crate) fn supported(x: &Tensor) -> bool {
    cfg!(not(any(feature = "mkl", feature = "accelerate")))
        && x.device().is_cpu()
        && x.dtype() == DType::F32
}

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("CPU kernels take f32 tensors")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("CPU kernels take contiguous tensors"),
    }
}

/// Runs `f` on the f32 data of a contiguous CPU tensor held by an op.
pub(crate) fn with_f32s<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else {
        candle_core::bail!("CPU kernels take CPU tensors")
    };
    f(f32s(s, layout)?)
}

/// candle's thread count, read once. `candle_core::utils::get_num_threads`
/// re-reads `/proc/cpuinfo` on every call when no thread count is set in
/// the environment (`num_cpus::get_physical` is not cached): measured at
/// 8-10 % of the model thread's time on small batches (perf, the demo
/// model serving single texts), since every kernel asks. The count cannot
/// change while the process runs: rayon's pool is built once.
pub(crate) fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

fn parallelism(work: usize) -> gemm::Parallelism {
    // Below a few hundred thousand multiply-adds, waking a second thread
    // costs more than it saves.
    match threads() {
        n if n > 1 && work >= 1 << 18 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    }
}

/// Rows per parallel chunk so each chunk has at least ~64k elements.
fn rows_per_chunk(rows: usize, width: usize) -> usize {
    let min_rows = (1usize << 16).div_ceil(width.max(1));
    rows.div_ceil(threads()).max(min_rows).max(1)
}

/// What the linear layer applies to its output, in the same pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// Nothing.
    None,
    /// `y * sigmoid(1.702 y)`, CLIP's quick GELU.
    QuickGelu,
    /// The tanh approximation of GELU (`gelu_pytorch_tanh`, SigLIP's).
    GeluTanh,
    /// Exact (erf) GELU, `x Φ(x)` (`gelu`: OpenCLIP exports, BERT).
    GeluErf,
}

impl Epilogue {
    /// Applies the activation to `v` in place (inlined, so it vectorises
    /// inside callers compiled for AVX2 + FMA).
    #[inline(always)]
    pub(crate) fn apply_generic(self, v: &mut [f32]) {
        match self {
            Epilogue::None => {}
            Epilogue::QuickGelu => quick_gelu_generic(v),
            Epilogue::GeluTanh => gelu_tanh_generic(v),
            Epilogue::GeluErf => gelu_erf_generic(v),
        }
    }
}

/// A fused linear layer's output pass adds a residual or applies an
/// activation, not both (CLIP never needs both, and the order would be
/// ambiguous).
pub(crate) fn check_epilogue(residual: Option<&Tensor>, epilogue: Epilogue) -> Result<()> {
    if residual.is_some() && epilogue != Epilogue::None {
        candle_core::bail!("a fused linear takes a residual or an activation, not both");
    }
    Ok(())
}

/// `act(x · wᵀ + b) (+ residual)` for `x [.., k]`, `w [n, k]` (any
/// strides: a transposed view of a `[k, n]` tensor is read in place), `b [n]`,
/// `residual` shaped like the output. The bias (and residual) are written
/// into the output first and the matmul accumulates onto them, so neither
/// costs a pass of its own. `residual` and an epilogue do not combine (CLIP
/// never needs both, and the order would be ambiguous).
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    epilogue: Epilogue,
) -> Result<Tensor> {
    check_epilogue(residual, epilogue)?;
    let x = x.contiguous()?;
    let op = Linear {
        w: w.clone(),
        b: b.contiguous()?,
        residual: residual.map(Tensor::contiguous).transpose()?,
        epilogue,
    };
    x.apply_op1_no_bwd(&op)
}

struct Linear {
    w: Tensor,
    b: Tensor,
    residual: Option<Tensor>,
    epilogue: Epilogue,
}

impl CustomOp1 for Linear {
    fn name(&self) -> &'static str {
        "cpu-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let (n, k) = self.w.dims2()?;
        let in_dims = l.dims();
        if in_dims.last() != Some(&k) || self.b.dims() != [n] {
            candle_core::bail!(
                "cpu-linear: input {:?}, weight [{n}, {k}], bias {:?}",
                in_dims,
                self.b.dims()
            );
        }
        let m = x.len() / k.max(1);
        let mut out_dims = in_dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        if let Some(res) = &self.residual
            && res.dims() != out_dims.as_slice()
        {
            candle_core::bail!("cpu-linear: residual {:?}, output {out_dims:?}", res.dims());
        }
        // The output starts as bias (+ residual) rows; the matmul adds onto
        // it. Written straight into the new allocation: zero-filling it
        // first was 1.6 % of a text forward.
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        // (At least 1: a zero-width weight is refused below, not here.)
        let chunk = (n * rows_per_chunk(m, n)).max(1);
        let start = &mut y.spare_capacity_mut()[..m * n];
        with_f32s(&self.b, |b| match &self.residual {
            None => {
                start.par_chunks_mut(chunk).for_each(|y| {
                    for row in y.chunks_exact_mut(n) {
                        for (y, b) in row.iter_mut().zip(b) {
                            y.write(*b);
                        }
                    }
                });
                Ok(())
            }
            Some(res) => with_f32s(res, |r| {
                start
                    .par_chunks_mut(chunk)
                    .zip(r.par_chunks(chunk))
                    .for_each(|(y, r)| {
                        for (y, r) in y.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                            for ((y, r), b) in y.iter_mut().zip(r).zip(b) {
                                y.write(r + b);
                            }
                        }
                    });
                Ok(())
            }),
        })?;
        // SAFETY: the chunks above are whole rows covering all m · n
        // elements (`chunk` is a multiple of n), each written once.
        unsafe { y.set_len(m * n) };
        // The weight may be stored either way round (see `Dense` in
        // model.rs): read it through its strides, `w[j, kk]` at
        // `j * s0 + kk * s1`, as the k×n right-hand side.
        let (storage, layout) = self.w.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(w)) = &*storage else {
            candle_core::bail!("cpu-linear: the weight is not an f32 CPU tensor")
        };
        let (s0, s1) = match layout.stride() {
            &[s0, s1] => (s0, s1),
            _ => candle_core::bail!("cpu-linear: weight strides {:?}", layout.stride()),
        };
        let start = layout.start_offset();
        if n == 0 || k == 0 || w.len() < start + (n - 1) * s0 + (k - 1) * s1 + 1 {
            candle_core::bail!("cpu-linear: empty or out-of-bounds weight [{n}, {k}]");
        }
        // SAFETY: `y` is m×n row-major and `x` m×k row-major (lengths
        // checked above); every weight index `start + j*s0 + kk*s1` with
        // j < n, kk < k is in bounds (checked just above).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr().add(start),
                s0 as isize,
                s1 as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(m * n * k),
            );
        }
        drop(storage);
        if self.epilogue != Epilogue::None {
            let act = self.epilogue;
            y.par_chunks_mut(chunk).for_each(|v| act_in_place(act, v));
        }
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

/// Multi-head self-attention from a packed projection: `qkv [b, t, 3d]`
/// holds each token's query, key and value (heads side by side in each);
/// the result is `[b, t, d]` with heads merged, ready for the output
/// projection. Scores are scaled by `1/sqrt(d/heads)`; `visible` says
/// which keys each query sees. Each (sequence, head) pair is one task: two
/// small matmuls read the heads in place by stride and write the output in
/// place, so no split or merge copies are made.
pub(crate) fn attention(qkv: &Tensor, heads: usize, visible: Visible) -> Result<Tensor> {
    let b = qkv.dim(0)?;
    if let Visible::Prefix(lens) = &visible
        && lens.len() != b
    {
        candle_core::bail!("cpu-attention: {} lengths for {b} sequences", lens.len());
    }
    qkv.contiguous()?
        .apply_op1_no_bwd(&Attention { heads, visible })
}

/// The keys each query attends to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Visible {
    /// Every key.
    All,
    /// Keys up to the query's own position (CLIP's text).
    Causal,
    /// Sequence `i`'s first `lens[i]` keys: the rest is padding (BERT).
    Prefix(Vec<usize>),
}

impl Visible {
    /// The same rule as an additive `[b, 1, t, t]` mask for candle's ops:
    /// 0 where query `i` of sequence `s` sees key `j`, -inf where not (a
    /// sequence always sees its first key, as the kernel does). Where every
    /// sequence sees the same keys (all, causal) it is one `[1, 1, t, t]`
    /// block that broadcasts over the batch: built and uploaded per
    /// forward, `b` copies of it were 6 MB and a host loop for 256 texts.
    pub(crate) fn additive(&self, b: usize, t: usize, dev: &candle_core::Device) -> Result<Tensor> {
        if let Visible::Prefix(lens) = self
            && lens.len() != b
        {
            candle_core::bail!("attention mask: {} lengths for {b} sequences", lens.len());
        }
        let b = match self {
            Visible::Prefix(_) => b,
            Visible::All | Visible::Causal => 1,
        };
        let hidden = |s: usize, i: usize, j: usize| match self {
            Visible::All => false,
            Visible::Causal => j > i,
            Visible::Prefix(lens) => j >= lens[s].max(1),
        };
        let m: Vec<f32> = (0..b * t * t)
            .map(|n| {
                let (s, i, j) = (n / (t * t), n / t % t, n % t);
                if hidden(s, i, j) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(m, (b, 1, t, t), dev)
    }
}

struct Attention {
    heads: usize,
    visible: Visible,
}

/// A pointer that tasks write through at disjoint offsets.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

impl SharedOut {
    /// # Safety
    /// `i` is inside the buffer, and no other task writes that element.
    pub(crate) unsafe fn at(&self, i: usize) -> *mut f32 {
        // SAFETY: per the contract.
        unsafe { self.0.add(i) }
    }
}
// SAFETY: every task writes a disjoint set of elements (its own head's
// columns of its own sequence), and the buffer outlives the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32s(s, l)?;
        let (b, t, d3) = l.shape().dims3()?;
        let h = self.heads;
        if h == 0 || d3 % 3 != 0 || (d3 / 3) % h != 0 {
            candle_core::bail!("cpu-attention: width {d3} is not 3 x {h} heads");
        }
        let d = d3 / 3;
        let hd = d / h;
        let scale = (hd as f32).powf(-0.5);
        let mut out = vec![0f32; b * t * d];
        let dst = SharedOut(out.as_mut_ptr());
        let visible = &self.visible;
        (0..b * h).into_par_iter().for_each_init(
            || vec![0f32; t * t],
            |scores, task| {
                let (seq, head) = (task / h, task % h);
                let base = seq * t * d3 + head * hd;
                let (q, k, v) = (base, base + d, base + 2 * d);
                // SAFETY: q/k/v index rows of `qkv` with row stride 3d and
                // hd columns inside it; `scores` is t×t; the output block is
                // rows `seq*t..` with row stride d and this head's hd
                // columns, written by this task only.
                unsafe {
                    gemm::gemm(
                        t,
                        t,
                        hd,
                        scores.as_mut_ptr(),
                        1,
                        t as isize,
                        false,
                        qkv.as_ptr().add(q),
                        1,
                        d3 as isize,
                        qkv.as_ptr().add(k),
                        d3 as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for (i, row) in scores.chunks_exact_mut(t).enumerate() {
                    // At least one key: a padded sequence keeps its first
                    // token, whatever length it is given.
                    let valid = match visible {
                        Visible::All => t,
                        Visible::Causal => i + 1,
                        Visible::Prefix(lens) => lens[seq].clamp(1, t),
                    };
                    softmax_in_place(&mut row[..valid]);
                    row[valid..].fill(0.0);
                }
                let out = dst;
                // SAFETY: see above.
                unsafe {
                    gemm::gemm(
                        t,
                        hd,
                        t,
                        out.0.add(seq * t * d + head * hd),
                        1,
                        d as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        t as isize,
                        qkv.as_ptr().add(v),
                        1,
                        d3 as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, t, d))))
    }
}

/// Layer norm over the last dim with affine weight and bias, rows in
/// parallel.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&LayerNorm {
        w: w.contiguous()?,
        b: b.contiguous()?,
        eps: eps as f32,
    })
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "cpu-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let d = match l.dims().last() {
            Some(&d) if d > 0 && self.w.dims() == [d] && self.b.dims() == [d] => d,
            _ => candle_core::bail!(
                "cpu-layer-norm: input {:?}, weight {:?}, bias {:?}",
                l.dims(),
                self.w.dims(),
                self.b.dims()
            ),
        };
        let mut y = vec![0f32; x.len()];
        let rows = x.len() / d;
        let chunk = d * rows_per_chunk(rows, d);
        with_f32s(&self.w, |w| {
            with_f32s(&self.b, |b| {
                y.par_chunks_mut(chunk)
                    .zip(x.par_chunks(chunk))
                    .for_each(|(y, x)| {
                        for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                            layer_norm_row(x, w, b, self.eps, y);
                        }
                    });
                Ok(())
            })
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// One row of layer norm, `y = (x - mean) / sqrt(var + eps) · w + b`; all
/// slices the same length (not checked: callers check the shapes once).
pub(crate) fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has the features this copy was compiled for.
        return unsafe { layer_norm_row_avx2(x, w, b, eps, y) };
    }
    layer_norm_row_generic(x, w, b, eps, y)
}

#[inline(always)]
fn layer_norm_row_generic(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let d = x.len() as f32;
    let mean = sum_lanes(x, |v| v) / d;
    let var = sum_lanes(x, |v| (v - mean) * (v - mean)) / d;
    let inv = 1.0 / (var + eps).sqrt();
    for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (x - mean) * inv * w + b;
    }
}

/// `Σ f(x)` in eight interleaved partial sums. A plain float sum is one
/// serial chain of adds that the compiler may not reorder, so it cannot
/// vectorise: layer norm's two sums were most of its time (3 % of a
/// 16-token text forward).
#[inline(always)]
fn sum_lanes(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + rest
}

/// The largest value, in eight interleaved lanes (see [`sum_lanes`]).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.into_iter().fold(rest, f32::max)
}

/// `exp(x)` to within a few ulp, written so the compiler can vectorise a
/// loop of it (libm's `expf` is a call per element). Cody-Waite reduction
/// to `[-ln2/2, ln2/2]` and Cephes' degree-6 polynomial; inputs are
/// clamped to the range where `2^n` is a normal f32 (the ends are what
/// softmax weights and sigmoid tails need: ~1e-38 below, ~2e38 above).
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer (ties to even) and leaves
    // that integer in the low mantissa bits, so 2ⁿ comes from integer ops
    // on the bits. Why not `n as i32`: Rust's saturating cast does not
    // vectorise (it was a scalar conversion per element inside the int8
    // kernels' GELU epilogue, 30 % of a tile's time).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x.mul_add(LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 5e-1);
    let e = (p * r).mul_add(r, r) + 1.0;
    // t's bits are MAGIC's plus n; 2ⁿ's are (n + 127) << 23.
    e * f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits() - 127) << 23)
}

/// Quick-GELU in place, always inlined so that inside a caller compiled for
/// AVX2 + FMA (such as the int8 kernel's epilogue) it vectorises with
/// them.
#[inline(always)]
pub(crate) fn quick_gelu_generic(v: &mut [f32]) {
    for x in v {
        *x /= 1.0 + exp_approx(-1.702 * *x);
    }
}

/// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` in place, as PyTorch's
/// `gelu(approximate="tanh")`, written as `x · sigmoid(2 z)` (the same
/// function: `(1 + tanh z) / 2 = sigmoid(2 z)`) so it vectorises with
/// [`exp_approx`] instead of a libm `tanhf` call per element.
#[inline(always)]
pub(crate) fn gelu_tanh_generic(v: &mut [f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    for x in v {
        let z = C * x.mul_add(0.044_715 * *x * *x, *x);
        *x /= 1.0 + exp_approx(-2.0 * z);
    }
}

/// `x Φ(x) = x (1 + erf(x/√2)) / 2` in place, as PyTorch's exact `gelu`.
/// erf is the rational approximation XLA and Eigen use for f32 (odd
/// degree 13 over even degree 8 on `[-4, 4]`, absolute error 6.5e-8 in
/// exact arithmetic, 4.5e-7 in f32), branch-free so it vectorises
/// (libm's `erff` is a call per element: candle's `gelu_erf` ran one
/// thread at a time over BERT's whole MLP width). Why not Abramowitz &
/// Stegun 7.1.26 on [`exp_approx`], as this was first written: a
/// reciprocal and an `exp` against one division; 0.54 → 0.34 ns per
/// element at 16 lanes on this project's Zen 4, where GELU was about 5 %
/// of a MobileCLIP-S1 forward. Below `x = -4√2` the result is 0 (the
/// true value is under 4e-8 in magnitude, and `1 + erf` there is what is
/// left of a cancellation).
#[inline(always)]
pub(crate) fn gelu_erf_generic(v: &mut [f32]) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    // Numerator, odd: z · Σ a_i z^(2i); denominator, even: Σ b_i z^(2i).
    const A: [f32; 7] = [
        -1.609_603_3e-2,
        -2.954_6e-3,
        -7.349_906_3e-4,
        -5.692_506_4e-5,
        -2.101_024e-6,
        2.770_681_4e-8,
        -2.726_142_3e-10,
    ];
    const B: [f32; 5] = [
        -1.426_473_9e-2,
        -7.373_329e-3,
        -1.682_827e-3,
        -2.133_740_6e-4,
        -1.456_607_2e-5,
    ];
    for x in v {
        let z = *x * FRAC_1_SQRT_2;
        let c = z.clamp(-4.0, 4.0);
        let c2 = c * c;
        let p = A[6]
            .mul_add(c2, A[5])
            .mul_add(c2, A[4])
            .mul_add(c2, A[3])
            .mul_add(c2, A[2])
            .mul_add(c2, A[1])
            .mul_add(c2, A[0])
            * c;
        let q = B[4]
            .mul_add(c2, B[3])
            .mul_add(c2, B[2])
            .mul_add(c2, B[1])
            .mul_add(c2, B[0]);
        let h = 0.5 * *x;
        *x = if z < -4.0 { 0.0 } else { h.mul_add(p / q, h) };
    }
}

#[inline(always)]
fn softmax_generic(v: &mut [f32]) {
    let max = max_lanes(v);
    for x in v.iter_mut() {
        *x = exp_approx(*x - max);
    }
    let inv = 1.0 / sum_lanes(v, |x| x);
    v.iter_mut().for_each(|x| *x *= inv);
}

// The same loops compiled for AVX2+FMA, picked at run time: the crate
// itself is built for baseline x86-64, where `round_ties_even` and `mul_add`
// are calls rather than instructions and nothing vectorises.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn act_avx2(act: Epilogue, v: &mut [f32]) {
    act.apply_generic(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(v: &mut [f32]) {
    softmax_generic(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn layer_norm_row_avx2(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    layer_norm_row_generic(x, w, b, eps, y)
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Whether this CPU has AVX-512 F (and AVX2 + FMA): the packed f32 kernel
/// then runs on 16-lane registers. `MMEMBED_NO_AVX512=1` turns it off (A/B
/// runs, and to test the AVX2 kernel on such CPUs).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f() -> bool {
    use std::sync::OnceLock;
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| {
        has_avx2_fma() && is_x86_feature_detected!("avx512f") && !env_flag("MMEMBED_NO_AVX512")
    })
}

/// Whether this CPU has AVX-512 VNNI with 256-bit forms (VL): the int8
/// kernel then sums its 16-bit pair products in one instruction.
/// `MMEMBED_NO_VNNI=1` turns it off, for A/B runs and to test the AVX2
/// kernel on such CPUs.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_vnni() -> bool {
    use std::sync::OnceLock;
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| {
        has_avx2_fma()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && !env_flag("MMEMBED_NO_VNNI")
    })
}

/// Whether the environment variable `name` is set to something other than
/// empty or `0` (read once per name and process by its callers).
pub(crate) fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// An [`Epilogue`]'s activation in place.
pub(crate) fn act_in_place(act: Epilogue, v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has the features this copy was compiled for.
        return unsafe { act_avx2(act, v) };
    }
    act.apply_generic(v)
}

/// Softmax of one row in place.
fn softmax_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: as above.
        return unsafe { softmax_avx2(v) };
    }
    softmax_generic(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Module};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("diff")
    }

    #[test]
    fn exp_approx_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (a, e) = (exp_approx(x), x.exp());
            worst = worst.max(((a - e) / e).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(-1e4), exp_approx(-87.3));
        assert!(exp_approx(1e4).is_finite());
    }

    #[test]
    fn gelu_tanh_matches_candle_and_pytorchs_formula() -> Result<()> {
        // candle's `gelu` is the tanh approximation, as PyTorch's
        // `gelu(approximate="tanh")`; checked over the range where it bends
        // and its tails, where sigmoid(2z) must not overflow.
        let xs: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.005)
            .chain([-90.0, 90.0])
            .collect();
        let want: Vec<f32> = Tensor::new(xs.as_slice(), &Device::Cpu)?
            .gelu()?
            .to_vec1()?;
        let mut got = xs.clone();
        act_in_place(Epilogue::GeluTanh, &mut got);
        for ((x, g), w) in xs.iter().zip(&got).zip(&want) {
            assert!((g - w).abs() <= 2e-6 * (1.0 + w.abs()), "x {x}: {g} vs {w}");
        }
        Ok(())
    }

    #[test]
    fn gelu_erf_matches_candles_libm_erf() -> Result<()> {
        // candle's `gelu_erf` evaluates erf with libm, as PyTorch's `gelu`.
        let xs: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.005)
            .chain([-90.0, -1e30, 90.0, 1e30, 0.0, -0.0])
            .collect();
        let want: Vec<f32> = Tensor::new(xs.as_slice(), &Device::Cpu)?
            .gelu_erf()?
            .to_vec1()?;
        let mut got = xs.clone();
        act_in_place(Epilogue::GeluErf, &mut got);
        for ((x, g), w) in xs.iter().zip(&got).zip(&want) {
            assert!((g - w).abs() <= 2e-7 * (1.0 + x.abs()), "x {x}: {g} vs {w}");
        }
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_candle() -> Result<()> {
        let x = (Tensor::randn(0f32, 3., (7, 301), &Device::Cpu)? * 4.0)?;
        let want = (&x * candle_nn::ops::sigmoid(&(&x * 1.702)?)?)?;
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        act_in_place(Epilogue::QuickGelu, &mut v);
        let got = Tensor::from_vec(v, (7, 301), &Device::Cpu)?;
        assert!(max_diff(&got, &want) < 1e-5);
        Ok(())
    }

    #[test]
    fn linear_with_bias_activation_and_residual_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        // Sizes on both sides of the single-thread threshold.
        for (b, t, k, n) in [(2, 3, 5, 4), (4, 50, 96, 384)] {
            let x = Tensor::randn(0f32, 1., (b, t, k), &dev)?;
            let w = Tensor::randn(0f32, 0.2, (n, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., n, &dev)?;
            let lin = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
            let plain = lin.forward(&x)?;
            let got = linear(&x, &w, &bias, None, Epilogue::None)?;
            assert_eq!(got.dims(), &[b, t, n]);
            assert!(max_diff(&got, &plain) < 1e-4);
            let gelu = (&plain * candle_nn::ops::sigmoid(&(&plain * 1.702)?)?)?;
            let got = linear(&x, &w, &bias, None, Epilogue::QuickGelu)?;
            assert!(max_diff(&got, &gelu) < 1e-4);
            let res = Tensor::randn(0f32, 1., (b, t, n), &dev)?;
            let got = linear(&x, &w, &bias, Some(&res), Epilogue::None)?;
            assert!(max_diff(&got, &(&plain + &res)?) < 1e-4);
            // A weight stored [k, n] and passed as its transposed view.
            let w_kn = w.t()?.contiguous()?;
            let got = linear(&x, &w_kn.t()?, &bias, None, Epilogue::None)?;
            assert!(max_diff(&got, &plain) < 1e-4);
        }
        let x = Tensor::zeros((2, 5), DType::F32, &dev)?;
        let w = Tensor::zeros((4, 6), DType::F32, &dev)?;
        let bias = Tensor::zeros(4, DType::F32, &dev)?;
        assert!(linear(&x, &w, &bias, None, Epilogue::None).is_err());
        Ok(())
    }

    /// Reference attention the way the model's candle path computes it.
    fn reference(qkv: &Tensor, heads: usize, visible: &Visible) -> Result<Tensor> {
        let (b, t, d3) = qkv.dims3()?;
        let d = d3 / 3;
        let hd = d / heads;
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let mut w = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        w = w.broadcast_add(&visible.additive(b, t, qkv.device())?)?;
        let w = candle_nn::ops::softmax(&w, D::Minus1)?;
        w.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
    }

    #[test]
    fn attention_matches_candle_with_each_mask() -> Result<()> {
        let dev = Device::Cpu;
        for (b, t, heads, hd) in [(1, 1, 1, 4), (3, 7, 2, 8), (2, 50, 12, 64)] {
            let qkv = Tensor::randn(0f32, 1., (b, t, 3 * heads * hd), &dev)?;
            // Lengths from full down to 1 (and a 0, read as 1).
            let lens = (0..b).map(|i| t.saturating_sub(3 * i)).collect();
            for visible in [Visible::All, Visible::Causal, Visible::Prefix(lens)] {
                let got = attention(&qkv, heads, visible.clone())?;
                let want = reference(&qkv, heads, &visible)?;
                assert_eq!(got.dims(), want.dims());
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-5, "b{b} t{t} h{heads} {visible:?}: {diff}");
            }
        }
        let bad = Tensor::zeros((1, 2, 10), DType::F32, &dev)?;
        assert!(attention(&bad, 3, Visible::All).is_err());
        let qkv = Tensor::zeros((2, 2, 6), DType::F32, &dev)?;
        assert!(attention(&qkv, 1, Visible::Prefix(vec![1])).is_err());
        Ok(())
    }

    #[test]
    fn layer_norm_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        // Widths with and without a remainder past the eight summing lanes.
        for d in [96, 77, 5] {
            let x = (Tensor::randn(0f32, 2., (3, 40, d), &dev)? + 5.0)?;
            let w = Tensor::randn(0f32, 1., d, &dev)?;
            let b = Tensor::randn(0f32, 1., d, &dev)?;
            // The reference in f64 from elementary ops: candle's fused
            // kernel takes the variance as E[x²] - E[x]², which in f32
            // loses digits on these rows (mean 5, a few elements: one CI
            // run in many was 1e-4 off); ours subtracts the mean first.
            let f64s = |t: &Tensor| t.to_dtype(DType::F64);
            let x64 = f64s(&x)?;
            let centred = x64.broadcast_sub(&x64.mean_keepdim(D::Minus1)?)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            let want = centred
                .broadcast_div(&(var + 1e-5)?.sqrt()?)?
                .broadcast_mul(&f64s(&w)?)?
                .broadcast_add(&f64s(&b)?)?
                .to_dtype(DType::F32)?;
            let got = layer_norm(&x, &w, &b, 1e-5)?;
            assert!(max_diff(&got, &want) < 1e-4, "width {d}");
        }
        Ok(())
    }
}
