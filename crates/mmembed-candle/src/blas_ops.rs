//! The CUDA graph's fused ops ([`crate::Kernels::Cublas`]): linear layers
//! as one cuBLASLt call each with the bias, and where there is one the
//! residual, in the GEMM's epilogue; attention as per-head strided-batched
//! cuBLAS GEMMs that read the packed Q/K/V projections in place and write
//! the merged heads in place.
//!
//! Why: on an H200, candle's broadcast add (the bias after every linear
//! layer, the residuals) was 55 % of the GPU graph's kernel time, and the
//! copies that split and merge the heads 21 %, against 13 % for every GEMM
//! (Nsight Compute, BENCHMARKS.md "On a GPU"): candle's strided kernels
//! index with 64-bit divisions per element and ran at 0.2-0.3 TB/s of the
//! chip's 4.8. Here a bias costs the epilogue nothing measurable, and no
//! attention tensor is copied.
//!
//! The calls are [`crate::blas::Gemm`]s. On CUDA they go to cuBLASLt
//! (`cudarc`'s bindings, the library candle itself links) and to candle's
//! own cuBLAS handle, on candle's stream; on the CPU the same calls run
//! through [`crate::blas::Gemm::run`], cuBLAS's semantics written out,
//! which is how the whole graph is tested against PyTorch without a GPU.

use candle_core::{DType, Device, Result, Tensor};

use crate::blas::{Gemm, Heads};

/// `x [.., inp] · w [out, inp]ᵀ + bias [out] (+ residual [.., out])`.
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&0);
    let (out, w_inp) = w.dims2()?;
    if inp != w_inp || inp == 0 {
        candle_core::bail!("linear: input width {inp}, weight [{out}, {w_inp}]");
    }
    let rows = x.elem_count() / inp;
    let x = x.reshape((rows, inp))?.contiguous()?;
    let w = w.contiguous()?;
    if let Some(b) = bias
        && b.dims1()? != out
    {
        candle_core::bail!("linear: {} bias values for {out} outputs", b.elem_count());
    }
    let residual = residual
        .map(|r| {
            if r.elem_count() != rows * out {
                candle_core::bail!("linear: residual {:?} for [{rows}, {out}]", r.dims());
            }
            r.reshape((rows, out))?.contiguous()
        })
        .transpose()?;
    for t in [Some(&w), bias, residual.as_ref()].into_iter().flatten() {
        if t.dtype() != x.dtype() {
            candle_core::bail!("linear: {:?} input, {:?} operand", x.dtype(), t.dtype());
        }
    }
    let y = match x.device() {
        Device::Cpu => reference_linear(&x, &w, bias, residual.as_ref())?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let op = cuda::LtOp {
                g: Gemm::linear(rows, inp, out, residual.is_some()),
                w: aligned(&w)?,
                bias: bias.map(aligned).transpose()?,
                under: residual.as_ref().map(aligned).transpose()?,
                shape: (rows, out).into(),
            };
            or_candle(aligned(&x)?.apply_op1_no_bwd(&op), || {
                candle_linear(&x, &w, bias, residual.as_ref())
            })?
        }
        other => candle_core::bail!(
            "the cuBLAS graph runs on CUDA (and, for tests, the CPU), not {other:?}"
        ),
    };
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    y.reshape(dims)
}

/// The vision tower's first rows: `patches [b · n, inp] · w [d, inp]ᵀ (+
/// bias)` written after each image's first `first.dim(0) - n` rows (the
/// class token), every row plus `first [n (+ 1), d]` (the positions, the
/// class token's added to its row): `[b, first.dim(0), d]`, the same as
/// `cat([class, patches]) + positions` without the concatenation's copy
/// or a broadcast add. `first` is laid under every image by doubling
/// copies, then one GEMM batched over the images accumulates onto it.
pub(crate) fn patch_embed(
    patches: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    first: &Tensor,
    images: usize,
) -> Result<Tensor> {
    let (rows, inp) = patches.dims2()?;
    let (d, w_inp) = w.dims2()?;
    let (r, fd) = first.dims2()?;
    if images == 0 || rows % images != 0 || w_inp != inp || fd != d || r < rows / images {
        candle_core::bail!(
            "patch embedding: {rows} x {inp} patches of {images} images, weight [{d}, {w_inp}], first rows [{r}, {fd}]"
        );
    }
    let n = rows / images;
    let g = Gemm::patches(images, n, inp, d, r - n);
    match patches.device() {
        Device::Cpu => {
            let mut out = host(first)?.repeat(images);
            let bias = bias.map(host).transpose()?;
            g.run(&host(w)?, &host(patches)?, &mut out, bias.as_deref())?;
            stored(out, &[images, r, d], patches)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let op = cuda::LtOp {
                g,
                w: aligned(w)?,
                bias: bias.map(aligned).transpose()?,
                under: Some(first.to_dtype(patches.dtype())?.contiguous()?),
                shape: (images, r, d).into(),
            };
            or_candle(aligned(patches)?.apply_op1_no_bwd(&op), || {
                candle_patch_embed(patches, w, bias, first, images)
            })
        }
        other => candle_core::bail!(
            "the cuBLAS graph runs on CUDA (and, for tests, the CPU), not {other:?}"
        ),
    }
}

/// Multi-head attention over packed projections `qkv [b, t, 3d]` whose
/// queries are already scaled, with an additive `mask [b, 1, t, t]` (0 or
/// -inf; `[1, 1, t, t]` when every sequence sees the same keys): the heads'
/// outputs merged, `[b, t, d]`. With `rows` (our CUDA graph), where
/// [`crate::attention`]'s kernel fits, that kernel. Otherwise the scores of
/// every head go through a fused last-dim softmax between the two calls:
/// with `rows` our own ([`crate::rows::softmax`]), which adds the mask as it
/// reads the scores, else candle's, the mask laid under the scores and
/// accumulated onto by their GEMM.
pub(crate) fn attention(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    rows: bool,
) -> Result<Tensor> {
    let shape = Heads::of(qkv.dims3()?, heads)?;
    let qkv = qkv.contiguous()?;
    let mask = mask
        .map(|m| {
            // One `[t, t]` block per sequence, or one for all of them.
            crate::attention::mask_blocks(shape, m.elem_count())?;
            m.to_dtype(qkv.dtype())?.contiguous()
        })
        .transpose()?;
    if rows && crate::attention::fits(shape, qkv.dtype()) && crate::attention::wanted() {
        match crate::attention::attention(&qkv, heads, mask.as_ref()) {
            Ok(y) => return Ok(y),
            // The kernel's module failed to load (bf16 needs sm_80; a
            // driver older than the toolkit): the GEMMs below, said once.
            Err(e) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::warn!(
                        "our attention kernel failed ({e}); attention takes cuBLAS GEMMs \
                         instead (MMEMBED_CUDA_ATTENTION=gemm says so up front)"
                    )
                });
            }
        }
    }
    let (under, after) = if rows { (None, mask) } else { (mask, None) };
    let scores = match qkv.device() {
        Device::Cpu => reference_scores(&qkv, shape, under.as_ref())?,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => qkv.apply_op1_no_bwd(&cuda::ScoresOp { heads, mask: under })?,
        other => candle_core::bail!(
            "the cuBLAS graph runs on CUDA (and, for tests, the CPU), not {other:?}"
        ),
    };
    let probs = if rows {
        crate::rows::softmax(&scores, after.as_ref())?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    match qkv.device() {
        Device::Cpu => reference_values(&probs, &qkv, shape),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => probs.apply_op2_no_bwd(&qkv, &cuda::ValuesOp { heads }),
        other => candle_core::bail!(
            "the cuBLAS graph runs on CUDA (and, for tests, the CPU), not {other:?}"
        ),
    }
}

/// A cuBLASLt call's result, or where cuBLASLt refused the call (an
/// algorithm it has none of for this shape, dtype or alignment on this GPU:
/// an API error, nothing run), the same function from candle's ops, slower;
/// said once per process, with cuBLASLt's reason.
#[cfg(feature = "cuda")]
fn or_candle(lt: Result<Tensor>, candle: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    match lt {
        Ok(y) => Ok(y),
        Err(e) => {
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "cuBLASLt refused a linear layer ({e}); such layers run on candle's ops \
                     instead, slower (MMEMBED_CUDA_GRAPH=portable runs every layer so)"
                );
            }
            candle()
        }
    }
}

/// [`linear`] from candle's ops: the fallback where cuBLASLt refuses.
#[cfg(any(feature = "cuda", test))]
fn candle_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let mut y = x.broadcast_matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// [`patch_embed`] from candle's ops: the fallback where cuBLASLt refuses.
#[cfg(any(feature = "cuda", test))]
fn candle_patch_embed(
    patches: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    first: &Tensor,
    images: usize,
) -> Result<Tensor> {
    let (r, d) = first.dims2()?;
    let n = patches.dim(0)? / images;
    let y = candle_linear(patches, w, bias, None)?.reshape((images, n, d))?;
    let y = if r > n {
        let head = Tensor::zeros((images, r - n, d), y.dtype(), y.device())?;
        Tensor::cat(&[&head, &y], 1)?
    } else {
        y
    };
    y.broadcast_add(&first.to_dtype(y.dtype())?)
}

/// `t` contiguous and starting on a 256-byte boundary, copied if not.
/// cuBLASLt's algorithm search assumes 256-byte aligned operands unless
/// told otherwise (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES`, which
/// cudarc's call leaves at that default); candle's allocations are, but a
/// view into one (a narrowed tensor) need not be. The model's operands are
/// fresh tensors, so this copies nothing there.
#[cfg(feature = "cuda")]
fn aligned(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if (t.layout().start_offset() * t.dtype().size_in_bytes()) % 256 == 0 {
        Ok(t)
    } else {
        // A fresh allocation, offset 0 (`copy` would keep the offset).
        t.force_contiguous()
    }
}

/// A tensor's values as f32 (exact for f16 and bf16).
fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// The f32 results rounded once to the inputs' dtype, as cuBLAS stores
/// its f32 accumulators.
fn stored(v: Vec<f32>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())
}

fn reference_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, inp) = x.dims2()?;
    let out = w.dim(0)?;
    let mut y = match residual {
        Some(r) => host(r)?,
        None => vec![0.0; rows * out],
    };
    let bias = bias.map(host).transpose()?;
    Gemm::linear(rows, inp, out, residual.is_some()).run(
        &host(w)?,
        &host(x)?,
        &mut y,
        bias.as_deref(),
    )?;
    stored(y, &[rows, out], x)
}

fn reference_scores(qkv: &Tensor, shape: Heads, mask: Option<&Tensor>) -> Result<Tensor> {
    let Heads { b, t, heads, .. } = shape;
    let q = host(qkv)?;
    let mut s = match mask {
        Some(m) => {
            let m = host(m)?;
            m.repeat(shape.scores_len() / m.len())
        }
        None => vec![0.0; shape.scores_len()],
    };
    for g in Gemm::scores(shape, mask.is_some()) {
        g.run(&q, &q, &mut s, None)?;
    }
    stored(s, &[heads, b, t, t], qkv)
}

fn reference_values(probs: &Tensor, qkv: &Tensor, shape: Heads) -> Result<Tensor> {
    let Heads { b, t, heads, dh } = shape;
    let (p, q) = (host(probs)?, host(qkv)?);
    let mut o = vec![0.0; b * t * heads * dh];
    for g in Gemm::values(shape) {
        g.run(&q, &p, &mut o, None)?;
    }
    stored(o, &[b, t, heads * dh], qkv)
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The calls on CUDA. Every call is checked against its buffers
    //! ([`Gemm::check`]) before it is made.

    use std::ffi::{c_int, c_longlong};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{
        self, CudaBlas, GemmConfig, StridedBatchedConfig,
    };
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{CudaStorage, Layout, Result, Shape, Tensor, WithDType};

    use crate::blas::{Gemm, Heads};
    use crate::cuda_ops::{cu, cuda_only_op, storage_of, view};
    use crate::lt::{Lt, LtType};

    fn int(v: usize) -> Result<c_int> {
        c_int::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("gemm: {v} exceeds cuBLAS's int")))
    }

    fn long(v: usize) -> Result<c_longlong> {
        c_longlong::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("gemm: stride {v} too large")))
    }

    /// One strided-batched cuBLAS GEMM (f32 accumulation) on candle's
    /// handle.
    fn gemm<T>(
        blas: &CudaBlas,
        g: &Gemm,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        c: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> Result<()>
    where
        T: WithDType + DeviceRepr,
        CudaBlas: cublas::Gemm<T>,
    {
        g.check(a.len(), b.len(), c.len())?;
        let op = |t: bool| {
            if t {
                cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas::sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: op(g.transa),
                transb: op(g.transb),
                m: int(g.m)?,
                n: int(g.n)?,
                k: int(g.k)?,
                alpha: T::from_f64(1.0),
                lda: int(g.lda)?,
                ldb: int(g.ldb)?,
                beta: T::from_f64(if g.accumulate { 1.0 } else { 0.0 }),
                ldc: int(g.ldc)?,
            },
            batch_size: int(g.batch)?,
            stride_a: long(g.stride_a)?,
            stride_b: long(g.stride_b)?,
            stride_c: long(g.stride_c)?,
        };
        let (a, b) = (a.slice(g.a_offset..), b.slice(g.b_offset..));
        let mut c = c.slice_mut(g.c_offset..);
        // SAFETY: `check` above keeps every element the call reads or
        // writes inside the three buffers; all three are on candle's
        // stream, which the handle uses.
        unsafe { cublas::Gemm::gemm_strided_batched(blas, cfg, &a, &b, &mut c) }.map_err(cu)
    }

    cuda_only_op!(
        1,
        LtOp,
        "cublaslt-linear",
        "blas_ops::linear's and blas_ops::patch_embed's references"
    );
    cuda_only_op!(
        1,
        ScoresOp,
        "cublas-attention-scores",
        "blas_ops::attention's reference"
    );
    cuda_only_op!(
        2,
        ValuesOp,
        "cublas-attention-values",
        "blas_ops::attention's reference"
    );

    /// One cuBLASLt call on CUDA, for [`super::linear`] and
    /// [`super::patch_embed`]: the weight and bias ride in the op, `B` (the
    /// rows or patches) is its input, and when the call accumulates it
    /// adds `under`: read where it lies when it is the output's size (a
    /// linear layer's residual, cuBLASLt's `C` apart from `D`), else laid
    /// end to end over the output first (the class and position rows, once
    /// per image) and accumulated onto in place.
    pub(super) struct LtOp {
        pub g: Gemm,
        pub w: Tensor,
        pub bias: Option<Tensor>,
        pub under: Option<Tensor>,
        pub shape: Shape,
    }

    impl LtOp {
        fn run<T>(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)>
        where
            T: CudaDType + WithDType + DeviceRepr + LtType,
        {
            if self.g.accumulate != self.under.is_some() {
                candle_core::bail!("gemm: accumulates onto nothing, or overwrites what is laid");
            }
            let dev = x.device().clone();
            let xs = view::<T>(x, xl)?;
            let (w_guard, wl) = self.w.storage_and_layout();
            let ws = view::<T>(storage_of(&w_guard)?, wl)?;
            let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
            let bias = match &bias_guard {
                Some((s, l)) => Some(view::<T>(storage_of(s)?, l)?),
                None => None,
            };
            let under_guard = self.under.as_ref().map(|u| u.storage_and_layout());
            let under = match &under_guard {
                Some((s, l)) => Some(view::<T>(storage_of(s)?, l)?),
                None => None,
            };
            let len = self.shape.elem_count();
            // SAFETY: every element is written: by the GEMM (beta 0, or
            // reading `C` apart, which `check` holds to cover the output),
            // or by the copies of `under` and then the GEMM's accumulation.
            let mut y = unsafe { dev.alloc::<T>(len)? };
            let apart = match &under {
                Some(u) if u.len() == len => Some(u),
                Some(u) => {
                    tile_into(&dev, u, &mut y)?;
                    None
                }
                None => None,
            };
            Lt::for_device(&dev)?.matmul(&self.g, &ws, &xs, apart, &mut y, bias.as_ref())?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), self.shape.clone()))
        }
    }

    /// `unit` copied end to end over the whole of `y` (a whole number of
    /// times): one copy, then doubling, `[0, filled)` to `[filled, 2
    /// filled)`, so log2(times) copies of contiguous memory.
    fn tile_into<T: DeviceRepr>(
        dev: &CudaDevice,
        unit: &CudaView<'_, T>,
        y: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    ) -> Result<()> {
        let len = unit.len();
        if len == 0 || !y.len().is_multiple_of(len) {
            candle_core::bail!(
                "{} elements laid over {}: not a whole number of times",
                len,
                y.len()
            );
        }
        dev.memcpy_dtod(unit, &mut y.slice_mut(0..len))?;
        let mut filled = len;
        while filled < y.len() {
            let n = filled.min(y.len() - filled);
            let (done, mut rest) = y.split_at_mut(filled);
            dev.memcpy_dtod(&done.slice(0..n), &mut rest.slice_mut(0..n))?;
            filled += n;
        }
        Ok(())
    }

    /// Every head's scores `[heads, b, t, t]` from `qkv [b, t, 3d]`, the
    /// mask (if any) copied under each head first and accumulated into.
    pub(super) struct ScoresOp {
        pub heads: usize,
        pub mask: Option<Tensor>,
    }

    impl ScoresOp {
        fn run<T>(&self, qkv: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)>
        where
            T: CudaDType + WithDType + DeviceRepr,
            CudaBlas: cublas::Gemm<T>,
        {
            let shape = Heads::of(l.shape().dims3()?, self.heads)?;
            let Heads { b, t, heads, .. } = shape;
            let dev = qkv.device().clone();
            let q = view::<T>(qkv, l)?;
            let block = b * t * t;
            // SAFETY: every element is written: by the mask's copies and the
            // accumulating GEMMs, or by the GEMMs alone (beta 0); each head
            // covers its own `block`.
            let mut s = unsafe { dev.alloc::<T>(shape.scores_len())? };
            if let Some(m) = &self.mask {
                let (m_guard, ml) = m.storage_and_layout();
                let mv = view::<T>(storage_of(&m_guard)?, ml)?;
                if mv.is_empty() || !block.is_multiple_of(mv.len()) {
                    candle_core::bail!("attention: mask of {} for {b} x {t} x {t}", mv.len());
                }
                tile_into(&dev, &mv, &mut s)?;
            }
            let blas = dev.cublas_handle();
            for g in Gemm::scores(shape, self.mask.is_some()) {
                gemm(&blas, &g, &q, &q, &mut s)?;
            }
            Ok((
                CudaStorage::wrap_cuda_slice(s, dev),
                Shape::from((heads, b, t, t)),
            ))
        }
    }

    /// `probs [heads, b, t, t]` times each head's values, written into the
    /// merged rows `[b, t, d]`.
    pub(super) struct ValuesOp {
        pub heads: usize,
    }

    impl ValuesOp {
        fn run2<T>(
            &self,
            p: &CudaStorage,
            pl: &Layout,
            qkv: &CudaStorage,
            ql: &Layout,
        ) -> Result<(CudaStorage, Shape)>
        where
            T: CudaDType + WithDType + DeviceRepr,
            CudaBlas: cublas::Gemm<T>,
        {
            let shape = Heads::of(ql.shape().dims3()?, self.heads)?;
            let Heads { b, t, heads, dh } = shape;
            if pl.shape().elem_count() != shape.scores_len() {
                candle_core::bail!(
                    "attention: {:?} probabilities for {heads} x {b} x {t} x {t}",
                    pl.dims()
                );
            }
            let dev = qkv.device().clone();
            let (pv, qv) = (view::<T>(p, pl)?, view::<T>(qkv, ql)?);
            // SAFETY: the calls write head `h`'s columns `h·dh..(h+1)·dh`
            // of every row (beta 0) for every head: every element.
            let mut o = unsafe { dev.alloc::<T>(b * t * heads * dh)? };
            let blas = dev.cublas_handle();
            for g in Gemm::values(shape) {
                gemm(&blas, &g, &qv, &pv, &mut o)?;
            }
            Ok((
                CudaStorage::wrap_cuda_slice(o, dev),
                Shape::from((b, t, heads * dh)),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fallbacks (candle's ops, where cuBLASLt refuses a call) compute
    /// what the cuBLAS calls compute.
    #[test]
    fn fallbacks_compute_the_calls_functions() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, inp, d) = (3, 4, 6, 5);
        let x = Tensor::randn(0f32, 1., (b, n, inp), &dev)?;
        let w = Tensor::randn(0f32, 1., (d, inp), &dev)?;
        let bias = Tensor::randn(0f32, 1., d, &dev)?;
        let res = Tensor::randn(0f32, 1., (b, n, d), &dev)?;
        let want = linear(&x, &w, Some(&bias), Some(&res))?;
        let got = candle_linear(&x, &w, Some(&bias), Some(&res))?;
        assert!(max_diff(&want, &got) < 1e-5);
        let patches = x.reshape((b * n, inp))?;
        for r in [n, n + 1] {
            let first = Tensor::randn(0f32, 1., (r, d), &dev)?;
            let want = patch_embed(&patches, &w, Some(&bias), &first, b)?;
            let got = candle_patch_embed(&patches, &w, Some(&bias), &first, b)?;
            assert_eq!(want.dims(), &[b, r, d]);
            assert!(max_diff(&want, &got) < 1e-5, "{r} rows");
        }
        Ok(())
    }
}
