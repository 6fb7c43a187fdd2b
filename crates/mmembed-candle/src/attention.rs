//! Attention in one CUDA kernel (`kernels/attention.cu`) for the CUDA
//! graph ([`crate::Kernels::Cuda`]) where it fits: bf16 or f16, head dim 64,
//! sequences of at most 80 tokens (every CLIP text tower's 77, ViT-B/32's
//! 50 patches and class token). A block per sequence and head reads that
//! head's queries, keys and values from the packed projections in place,
//! keeps the scores in shared memory in f32, takes the softmax with the
//! additive mask, multiplies by the values on tensor cores and writes the
//! head's columns of the merged output.
//!
//! Why: the GEMM path ([`crate::blas_ops::attention`]) makes two cuBLAS
//! calls per head and layer, 24 for ViT-B/32, each over matrices of 50×64,
//! and writes the scores to global memory and reads them back twice in
//! between; PyTorch's SDPA, which we are measured against, does a layer's
//! attention in one kernel. Longer sequences (ViT-B/16's 197 tokens, SigLIP's
//! 196 and more), other head dims and f32 keep the GEMM path, as does
//! `MMEMBED_CUDA_ATTENTION=gemm`.
//!
//! Numerics: the scores stay f32 (the GEMM path rounds them to the storage
//! type), the probabilities are rounded to it once (the tensor cores take
//! them so, as in flash attention), the output once. [`reference`] computes
//! the same on the CPU; the kernel is held to it on a GPU by this module's
//! `on_cuda` tests, which `scripts/gpu-check.sh` runs before anything else.

use candle_core::{DType, Result, Tensor};

use crate::blas::Heads;

/// The head dim the kernel is compiled for (`kDh` in the kernel).
const HEAD_DIM: usize = 64;

/// The padded sequence lengths compiled (`ATTENTION_LENGTHS` in the
/// kernel): a block holds a sequence of up to the smallest that fits.
const PADDED: [usize; 5] = [16, 32, 48, 64, 80];

/// The padded length serving sequences of `t` tokens, if any.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn padded(t: usize) -> Option<usize> {
    PADDED.into_iter().find(|&p| t > 0 && p >= t)
}

/// Whether the kernel serves attention of this shape and dtype.
pub(crate) fn fits(shape: Heads, dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
        && shape.dh == HEAD_DIM
        && shape.b > 0
        && padded(shape.t).is_some()
}

/// Whether the kernel is wanted: unless `MMEMBED_CUDA_ATTENTION` is `gemm`.
pub(crate) fn wanted() -> bool {
    crate::device::our_kernel("MMEMBED_CUDA_ATTENTION", "fused", "gemm")
}

/// The heads' outputs merged, `[b, t, d]`, from packed projections `qkv
/// [b, t, 3d]` whose queries are already scaled, with an optional
/// additive mask of whole `[t, t]` blocks (sequence `s` takes block `s mod
/// blocks`: `[b, 1, t, t]` per sequence or `[1, 1, t, t]` for all). On
/// CUDA the kernel (the caller checks [`fits`]), elsewhere [`reference`].
pub(crate) fn attention(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let shape = Heads::of(qkv.dims3()?, heads)?;
    if let Some(m) = mask {
        mask_blocks(shape, m.elem_count())?;
    }
    match qkv.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => {
            let qkv = qkv.contiguous()?;
            let op = cuda::Attention { heads };
            match mask {
                Some(m) => qkv.apply_op2_no_bwd(&m.to_dtype(qkv.dtype())?.contiguous()?, &op),
                None => qkv.apply_op1_no_bwd(&op),
            }
        }
        _ => reference(qkv, heads, mask),
    }
}

/// How many `[t, t]` mask blocks a mask of `len` values holds: a whole
/// number that divides the sequences, else an error (the GEMM path's
/// check too).
pub(crate) fn mask_blocks(shape: Heads, len: usize) -> Result<usize> {
    let Heads { b, t, .. } = shape;
    let blocks = len / (t * t).max(1);
    if blocks == 0 || blocks * t * t != len || !b.is_multiple_of(blocks) {
        candle_core::bail!("attention: a mask of {len} values for {b} sequences of {t}");
    }
    Ok(blocks)
}

/// What the kernel computes, with candle's ops in f32: scores unrounded,
/// the mask added, softmax, the probabilities rounded to `qkv`'s dtype,
/// their product with the values rounded once.
pub(crate) fn reference(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let shape = Heads::of(qkv.dims3()?, heads)?;
    let Heads { b, t, dh, .. } = shape;
    let dtype = qkv.dtype();
    let x = qkv
        .to_dtype(DType::F32)?
        .reshape((b, t, 3, heads, dh))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    let (q, k, v) = (x.get(0)?, x.get(1)?, x.get(2)?);
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(m) = mask {
        let blocks = mask_blocks(shape, m.elem_count())?;
        let m = m
            .to_dtype(DType::F32)?
            .reshape((1, blocks, 1, t, t))?
            .broadcast_as((b / blocks, blocks, heads, t, t))?;
        scores =
            (scores.reshape((b / blocks, blocks, heads, t, t))? + m)?.reshape((b, heads, t, t))?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, t, heads * dh))?
        .to_dtype(dtype)
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The launch. The op checks the shapes, lengths and alignment the
    //! kernel assumes, so it reads and writes only inside its buffers.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result, Shape, WithDType};

    use super::{HEAD_DIM, Heads};
    use crate::cuda_ops::{cuda_only_op, ptx, view};

    /// The module's name in candle's per-device cache of loaded PTX.
    const MODULE: &str = "mmembed_attention";

    pub(super) struct Attention {
        pub heads: usize,
    }

    cuda_only_op!(1, Attention, "mmembed-attention", "attention::reference");
    cuda_only_op!(
        2,
        Attention,
        "mmembed-attention-masked",
        "attention::reference"
    );

    impl Attention {
        fn run<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            qkv: &CudaStorage,
            l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.launch::<T>(qkv, l, None)
        }

        fn run2<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            qkv: &CudaStorage,
            l: &Layout,
            m: &CudaStorage,
            ml: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.launch::<T>(qkv, l, Some((m, ml)))
        }

        fn launch<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            qkv: &CudaStorage,
            l: &Layout,
            mask: Option<(&CudaStorage, &Layout)>,
        ) -> Result<(CudaStorage, Shape)> {
            let shape = Heads::of(l.shape().dims3()?, self.heads)?;
            let Heads { b, t, heads, dh } = shape;
            if !matches!(T::DTYPE, DType::BF16 | DType::F16) || dh != HEAD_DIM {
                candle_core::bail!(
                    "mmembed-attention: {:?} with head dim {dh} (takes bf16 or f16, head dim \
                     {HEAD_DIM})",
                    T::DTYPE
                );
            }
            let Some(padded) = super::padded(t) else {
                candle_core::bail!("mmembed-attention: sequences of {t} tokens");
            };
            let d = heads * dh;
            let dev = qkv.device().clone();
            let qv = view::<T>(qkv, l)?;
            // The kernel reads rows in 16-byte pieces: 8 values.
            if qv.len() != b * t * 3 * d || !l.start_offset().is_multiple_of(8) {
                candle_core::bail!(
                    "mmembed-attention: {} values from {} for {b} x {t} x {}",
                    qv.len(),
                    l.start_offset(),
                    3 * d
                );
            }
            let mask = match mask {
                Some((m, ml)) => {
                    let mv = view::<T>(m, ml)?;
                    let blocks = super::mask_blocks(shape, mv.len())?;
                    Some((mv, i32::try_from(blocks).map_err(candle_core::Error::wrap)?))
                }
                None => None,
            };
            let blocks = u32::try_from(b * heads).map_err(|_| {
                candle_core::Error::Msg(format!("mmembed-attention: {b} x {heads}"))
            })?;
            let (ti, hi) = (t as i32, heads as i32);
            // SAFETY: every block writes its head's columns of its
            // sequence's `t` rows: every value of the output.
            let out = unsafe { dev.alloc::<T>(b * t * d) }?;
            let name = format!(
                "attention{}_{}_{padded}",
                if mask.is_some() { "_masked" } else { "" },
                T::DTYPE.as_str()
            );
            let func = dev.get_or_load_custom_func(&name, MODULE, ptx::ATTENTION)?;
            let mut launch = func.builder();
            launch.arg(&qv);
            if let Some((mv, _)) = &mask {
                launch.arg(mv);
            }
            launch.arg(&out);
            launch.arg(&ti);
            launch.arg(&hi);
            if let Some((_, blocks)) = &mask {
                launch.arg(blocks);
            }
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (2 * padded as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernel reads `b · t · 3d` values of `qkv` (checked
            // above, 16-byte aligned), `blocks · t · t` of the mask (checked)
            // and writes `b · t · d` of `out`, on candle's stream.
            unsafe { launch.launch(cfg) }.w()?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev),
                Shape::from((b, t, d)),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values in [-2, 2), as `qkv [b, t, 3 · heads · 64]`.
    fn qkv(b: usize, t: usize, heads: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
        let n = b * t * 3 * heads * HEAD_DIM;
        let mut s = 0x9e37_79b9u32;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 4000) as f32 / 1000.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, (b, t, 3 * heads * HEAD_DIM), dev)?.to_dtype(dtype)
    }

    /// The causal mask, `[1, 1, t, t]`.
    fn causal(t: usize, dev: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0. })
            .collect();
        Tensor::from_vec(v, (1, 1, t, t), dev)
    }

    /// Sequence `s` sees its first `t - s` keys, `[b, 1, t, t]`.
    fn padding(b: usize, t: usize, dev: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..b * t * t)
            .map(|i| {
                let (s, key) = (i / (t * t), i % t);
                if key + s >= t { f32::NEG_INFINITY } else { 0. }
            })
            .collect();
        Tensor::from_vec(v, (b, 1, t, t), dev)
    }

    /// Attention by hand, in f64 from the stored values: the probabilities
    /// rounded to bf16 as the kernel rounds them (`rounded`), the output
    /// left unrounded. `mask` is `[blocks, t, t]` flattened.
    fn by_hand(x: &Tensor, heads: usize, mask: Option<&Tensor>, rounded: bool) -> Result<Vec<f64>> {
        let (b, t, d3) = x.dims3()?;
        let d = d3 / 3;
        let x: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let m: Option<Vec<f32>> = mask.map(|m| m.flatten_all()?.to_vec1()).transpose()?;
        let at = |s: usize, i: usize, part: usize, h: usize, k: usize| {
            f64::from(x[(s * t + i) * d3 + part * d + h * HEAD_DIM + k])
        };
        let mut out = vec![0f64; b * t * d];
        for s in 0..b {
            for h in 0..heads {
                for i in 0..t {
                    let mut p: Vec<f64> = (0..t)
                        .map(|j| {
                            let dot: f64 = (0..HEAD_DIM)
                                .map(|k| at(s, i, 0, h, k) * at(s, j, 1, h, k))
                                .sum();
                            let add = m.as_ref().map_or(0., |m| {
                                let blocks = m.len() / (t * t);
                                f64::from(m[((s % blocks) * t + i) * t + j])
                            });
                            dot + add
                        })
                        .collect();
                    let mx = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    p.iter_mut().for_each(|v| *v = (*v - mx).exp());
                    let sum: f64 = p.iter().sum();
                    for v in &mut p {
                        *v /= sum;
                        if rounded {
                            *v = f64::from(half::bf16::from_f64(*v));
                        }
                    }
                    for k in 0..HEAD_DIM {
                        out[(s * t + i) * d + h * HEAD_DIM + k] =
                            (0..t).map(|j| p[j] * at(s, j, 2, h, k)).sum();
                    }
                }
            }
        }
        Ok(out)
    }

    /// The largest difference between `got` and `want` as a share of
    /// `want`'s largest magnitude.
    fn rel_to(got: &Tensor, want: &[f64]) -> Result<f64> {
        let got: Vec<f32> = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-9f64, |a, w| a.max(w.abs()));
        Ok(got
            .iter()
            .zip(want)
            .fold(0f64, |a, (g, w)| a.max((f64::from(*g) - w).abs()))
            / scale)
    }

    /// The reference is attention as written out by hand, with its
    /// probabilities and output rounded to the storage type; in f32 it is
    /// also the GEMM path's attention (candle's matmuls over split heads),
    /// masks included.
    #[test]
    fn reference_is_attention_written_out() -> Result<()> {
        let dev = Device::Cpu;
        for (b, t, heads, mask) in [
            (2, 50, 12, None),
            (3, 77, 8, Some(causal(77, &dev)?)),
            (3, 9, 2, Some(padding(3, 9, &dev)?)),
        ] {
            let x = scaled(qkv(b, t, heads, DType::F32, &dev)?, heads)?;
            let gemm = crate::blas_ops::attention(&x, heads, mask.as_ref(), true)?;
            let ours = reference(&x, heads, mask.as_ref())?;
            assert!(
                rel_to(&ours, &by_hand(&x, heads, mask.as_ref(), false)?)? < 1e-5,
                "t {t}"
            );
            assert!(
                rel_to(&gemm, &by_hand(&x, heads, mask.as_ref(), false)?)? < 1e-5,
                "t {t}"
            );
            // bf16: within an ulp of the largest value (2^-8 of it) of the
            // same rounding of the probabilities by hand, and further from
            // the unrounded ones.
            let xb = x.to_dtype(DType::BF16)?;
            let ours = reference(&xb, heads, mask.as_ref())?;
            let rounded = rel_to(&ours, &by_hand(&xb, heads, mask.as_ref(), true)?)?;
            assert!(rounded < 1.0 / 256.0, "t {t}, bf16: {rounded}");
        }
        Ok(())
    }

    /// `qkv` with its queries scaled by 1/8, as the graph's weights scale them.
    fn scaled(x: Tensor, heads: usize) -> Result<Tensor> {
        let d = heads * HEAD_DIM;
        Tensor::cat(&[(x.narrow(2, 0, d)? * 0.125)?, x.narrow(2, d, 2 * d)?], 2)
    }

    #[test]
    fn the_kernel_takes_what_it_was_compiled_for() -> Result<()> {
        let h = |b, t, dh| Heads {
            b,
            t,
            heads: 12,
            dh,
        };
        assert!(fits(h(256, 50, 64), DType::BF16));
        assert!(fits(h(1, 77, 64), DType::F16));
        assert!(fits(h(1, 80, 64), DType::BF16));
        assert!(!fits(h(1, 81, 64), DType::BF16));
        assert!(!fits(h(1, 197, 64), DType::BF16));
        assert!(!fits(h(1, 50, 64), DType::F32));
        assert!(!fits(h(1, 50, 32), DType::BF16));
        assert!(!fits(h(0, 50, 64), DType::BF16));
        assert_eq!(padded(50), Some(64));
        assert_eq!(padded(77), Some(80));
        assert_eq!(padded(0), None);
        // Each padded length is compiled (a missing one would fail at load,
        // on a GPU).
        let src = include_str!("../kernels/attention.cu");
        for p in PADDED {
            assert!(
                src.contains(&format!("ATTENTION_KERNELS(T, NAME, {p})")),
                "{p}"
            );
        }
        // Masks are whole blocks that divide the sequences.
        let s = h(4, 3, 64);
        assert_eq!(mask_blocks(s, 9)?, 1);
        assert_eq!(mask_blocks(s, 36)?, 4);
        assert!(mask_blocks(s, 27).is_err());
        assert!(mask_blocks(s, 10).is_err());
        Ok(())
    }

    /// On a GPU (`scripts/gpu-check.sh` runs the `on_cuda` tests there;
    /// without one they say so and pass): the kernel against the
    /// reference, both precisions, every padded length, with and without
    /// masks.
    #[cfg(feature = "cuda")]
    #[test]
    fn on_cuda_the_kernel_is_the_reference() -> Result<()> {
        let Some(gpu) = crate::cuda_ops::test_device() else {
            return Ok(());
        };
        let cpu = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            // Storage-type ulps: the two sum in different orders and may
            // round a probability or an output value apart.
            let tol = if dtype == DType::BF16 { 1.6e-2 } else { 2e-3 };
            for (b, t, heads, mask) in [
                (3, 50, 12, None),
                (5, 77, 8, Some(causal(77, &cpu)?)),
                (4, 52, 12, Some(padding(4, 52, &cpu)?)),
                (2, 1, 12, None),
                (2, 16, 4, None),
                (3, 33, 2, Some(causal(33, &cpu)?)),
                (1, 80, 12, None),
            ] {
                let x = scaled(qkv(b, t, heads, dtype, &cpu)?, heads)?;
                let want = reference(&x, heads, mask.as_ref())?;
                let got = attention(
                    &x.to_device(&gpu)?,
                    heads,
                    mask.map(|m| m.to_device(&gpu)).transpose()?.as_ref(),
                )?
                .to_device(&cpu)?;
                assert_eq!(got.dims(), want.dims());
                let diff = crate::cuda_ops::largest_diff(&got, &want)?;
                eprintln!(
                    "attention {dtype:?} b {b} t {t} heads {heads}: max diff {diff:e} of the largest value"
                );
                assert!(diff < tol, "{dtype:?} b {b} t {t} heads {heads}: {diff}");
            }
        }
        Ok(())
    }
}
