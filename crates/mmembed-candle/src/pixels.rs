//! The crops' bytes (what the embedder's batches hold: `side × side` RGB
//! crops, the channels interleaved, one after another) to the vision
//! tower's input on a GPU: `(n, 3, side, side)` in the model's dtype, each
//! value `(x · scale − mean[c]) / std[c]` computed in f32 one rounded step
//! at a time, as the host's [`ClipPreprocessor::normalize_hwc_into`] does,
//! so the same floats on every device.
//!
//! Two ways: candle's tensor ops (every GPU; also run on the CPU, where a
//! test holds them to the host's floats bit for bit), and on CUDA with our
//! graph ([`Kernels::Cuda`]) one kernel of ours (`kernels/pixels.cu`):
//! candle's ops take six passes over the batch in f32 (the cast, the
//! rescale, two per-channel broadcasts, the transpose to channels first,
//! the cast to the model's dtype), the kernel reads the bytes once and
//! writes the model's input once. What only a GPU can check (the kernel)
//! `gpu_check parity` checks against the host's floats, bit for bit, and
//! `scripts/gpu-check.sh` falls back to candle's ops if it differs.
//! `MMEMBED_CUDA_PIXELS=candle` takes candle's ops on CUDA too (a way round
//! a problem with the kernel on some GPU or driver).
//!
//! A SigLIP 2 NaFlex model's images ([`patches_from_u8`]) go the same way
//! with candle's ops, their one copy laying the pixels out as rows of
//! patches instead of channels first.

use candle_core::{DType, Device, Result, Tensor};
use mmembed_media::ClipPreprocessor;

use crate::model::Kernels;

/// The vision tower's input for `n` crops of `side × side` RGB bytes in
/// `hwc` (its length checked by the caller,
/// [`crate::LoadedClip::pixels_from_u8_rows`]), on `device` (a GPU; the
/// CPU normalises on the host instead), in `dtype`.
pub(crate) fn from_u8_rows(
    hwc: &[u8],
    n: usize,
    side: usize,
    pre: &ClipPreprocessor,
    device: &Device,
    dtype: DType,
    kernels: Kernels,
) -> Result<Tensor> {
    let (mean, std) = pre.normalize_stats();
    match device {
        // (Nothing to launch for no crops.)
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if kernels == Kernels::Cuda && n > 0 && ours() => {
            let op = cuda::NormalizeU8 {
                dtype,
                side,
                scale: pre.rescale_factor.unwrap_or(1.0),
                mean,
                std,
            };
            Tensor::from_slice(hwc, (n, side * side * 3), device)?.apply_op1_no_bwd(&op)
        }
        _ => {
            // `kernels` picks the way on CUDA only.
            let _ = kernels;
            tensor_ops(hwc, n, side, pre.rescale_factor, (mean, std), device)?.to_dtype(dtype)
        }
    }
}

/// Whether our kernel normalises on CUDA: unless `MMEMBED_CUDA_PIXELS` is
/// `candle`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn ours() -> bool {
    crate::device::our_kernel("MMEMBED_CUDA_PIXELS", "ours", "candle")
}

/// Normalised by candle's tensor ops, in f32, then one copy puts the
/// channels first.
fn tensor_ops(
    hwc: &[u8],
    n: usize,
    side: usize,
    rescale: Option<f32>,
    stats: ([f32; 3], [f32; 3]),
    device: &Device,
) -> Result<Tensor> {
    channels_last(hwc, rescale, stats, device)?
        .reshape((n, side * side, 3))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, 3, side, side))
}

/// RGB bytes normalised by candle's tensor ops, in f32, as they lie:
/// `(pixels, 3)`. Channels last, so the cast and the rescale are
/// contiguous kernels and the per-channel steps broadcast over 2
/// dimensions instead of 4 (candle's strided kernels pay an index division
/// per dimension and element); each caller's one copy lays them out.
fn channels_last(
    hwc: &[u8],
    rescale: Option<f32>,
    (mean, std): ([f32; 3], [f32; 3]),
    device: &Device,
) -> Result<Tensor> {
    let per_channel = |v: [f32; 3]| Tensor::from_slice(&v, (1, 3), device);
    let x = Tensor::from_slice(hwc, (hwc.len() / 3, 3), device)?.to_dtype(DType::F32)?;
    let x = match rescale {
        // `x · scale + 0`: the same float as `x · scale` (a fused
        // multiply-add with 0 rounds once, like the product).
        Some(scale) => x.affine(f64::from(scale), 0.0)?,
        None => x,
    };
    x.broadcast_sub(&per_channel(mean)?)?
        .broadcast_div(&per_channel(std)?)
}

/// A NaFlex model's input for `n` images of one grid of `gh × gw` patches
/// of `p` pixels, their RGB bytes one after another in `hwc` (each `gh·p`
/// rows of `gw·p` pixels, the channels interleaved; its length checked by
/// the caller, [`crate::LoadedClip::embed_u8_images`]): `(n, gh·gw,
/// p·p·3)` in `dtype` on `device`, a row per patch in (row, column,
/// channel) order with the floats of the host's NaFlex rows. A GPU is sent
/// the bytes, a quarter of the f32 rows the host would make; on the CPU
/// the host makes the rows itself.
pub(crate) fn patches_from_u8(
    hwc: &[u8],
    n: usize,
    (gh, gw): (usize, usize),
    p: usize,
    pre: &ClipPreprocessor,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    if hwc.len() != n * gh * gw * p * p * 3 {
        candle_core::bail!(
            "{} bytes for {n} images of {gh}x{gw} patches of {p} pixels",
            hwc.len()
        );
    }
    // Per image: (patch row, pixel row, patch column, pixel column and
    // channel) to (patch row, patch column, pixel row, the rest).
    channels_last(hwc, pre.rescale_factor, pre.normalize_stats(), device)?
        .reshape((n * gh, p, gw, p * 3))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, gh * gw, p * p * 3))?
        .to_dtype(dtype)
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The kernel's launch.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CpuStorage, CudaStorage, DType, Layout, Result, Shape, WithDType};

    use crate::cuda_ops::{ptx, view};

    /// The module's name in candle's per-device cache of loaded PTX.
    const MODULE: &str = "mmembed_pixels";

    /// Threads to a block; the grid strides over the pixels.
    const THREADS: usize = 256;

    /// The most blocks launched: past that each thread takes more pixels.
    const MAX_BLOCKS: usize = 1 << 20;

    /// Crops of `side × side` RGB bytes, `[n, side·side·3]`, to `[n, 3,
    /// side, side]` in `dtype`.
    pub(super) struct NormalizeU8 {
        pub dtype: DType,
        pub side: usize,
        pub scale: f32,
        pub mean: [f32; 3],
        pub std: [f32; 3],
    }

    impl candle_core::CustomOp1 for NormalizeU8 {
        fn name(&self) -> &'static str {
            "mmembed-normalize-u8"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("mmembed-normalize-u8 runs on CUDA; the CPU normalises on the host")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            match self.dtype {
                DType::F32 => self.launch::<f32>(s, l),
                DType::F16 => self.launch::<half::f16>(s, l),
                DType::BF16 => self.launch::<half::bf16>(s, l),
                dt => candle_core::bail!("mmembed-normalize-u8: no {dt:?}"),
            }
        }
    }

    impl NormalizeU8 {
        fn launch<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = s.device().clone();
            let hwc = view::<u8>(s, l)?;
            let plane = self.side * self.side;
            let n = l.dims().first().copied().unwrap_or(0);
            if plane == 0 || hwc.len() != n * plane * 3 {
                candle_core::bail!(
                    "mmembed-normalize-u8: {} bytes for {n} crops of {side}x{side}",
                    hwc.len(),
                    side = self.side
                );
            }
            let pixels = n * plane;
            // SAFETY: the kernel writes every value (three per pixel).
            let y = unsafe { dev.alloc::<T>(pixels * 3) }?;
            let blocks = pixels.div_ceil(THREADS).clamp(1, MAX_BLOCKS) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let name = format!("normalize_u8_{}", T::DTYPE.as_str());
            let func = dev.get_or_load_custom_func(&name, MODULE, ptx::PIXELS)?;
            let (images, plane) = (n as i64, plane as i64);
            let [m0, m1, m2] = self.mean;
            let [s0, s1, s2] = self.std;
            let mut b = func.builder();
            b.arg(&hwc);
            b.arg(&y);
            b.arg(&images);
            b.arg(&plane);
            b.arg(&self.scale);
            for v in [&m0, &m1, &m2, &s0, &s1, &s2] {
                b.arg(v);
            }
            // SAFETY: the kernel reads `3 · pixels` bytes of `hwc` and
            // writes `3 · pixels` values of `y` (lengths checked above),
            // on candle's stream.
            unsafe { b.launch(cfg) }.w()?;
            let shape = Shape::from((n, 3, self.side, self.side));
            Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
        }
    }
}
