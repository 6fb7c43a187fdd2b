//! Elementwise ops of the CUDA graph ([`crate::Kernels::Cuda`]) as our own
//! kernels (`kernels/elementwise.cu`): `silu`, which is QuickGELU once the
//! graph has folded 1.702 into the weights around it, over the MLP's widest
//! activations.
//!
//! Why: candle's bf16 `silu` launches a thread per value although each
//! thread that works takes eight, and its f16 one reads a value a thread;
//! on the first H200 run it moved about 1.6 TB/s of the chip's 4.8 (3.9 %
//! of the portable graph's kernel time, more of a graph whose other kernels
//! got faster). Ours give each thread 16 bytes and size the grid to the
//! work; the arithmetic is candle's, `x / (1 + e^-x)` in f32, rounded once.
//! `MMEMBED_CUDA_SILU=candle` takes candle's kernel instead; other devices
//! and graphs always do.

use candle_core::{DType, Result, Tensor};

/// `x · σ(x)`, on CUDA by our kernel unless `MMEMBED_CUDA_SILU=candle`.
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    match x.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) if ours() && x.elem_count() > 0 => {
            x.contiguous()?.apply_op1_no_bwd(&cuda::Silu)
        }
        _ => x.silu(),
    }
}

/// What the kernel computes: candle's formula in f32, rounded once.
#[cfg_attr(not(all(test, feature = "cuda")), allow(dead_code))]
fn reference(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)?.silu()?.to_dtype(x.dtype())
}

/// Whether our kernel runs on CUDA: unless `MMEMBED_CUDA_SILU` is `candle`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn ours() -> bool {
    match std::env::var("MMEMBED_CUDA_SILU").as_deref().map(str::trim) {
        Ok("candle") => false,
        Ok("" | "ours") | Err(_) => true,
        Ok(other) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("MMEMBED_CUDA_SILU={other:?}: expected ours or candle; using ours")
            });
            true
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The launch.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape, WithDType};

    use crate::cuda_ops::{cuda_only_op, ptx, view};

    /// The module's name in candle's per-device cache of loaded PTX.
    const MODULE: &str = "mmembed_elementwise";

    /// Threads to a block; a thread takes 16 bytes, the grid strides past
    /// [`MAX_BLOCKS`].
    const THREADS: usize = 256;
    const MAX_BLOCKS: usize = 1 << 20;

    pub(super) struct Silu;

    cuda_only_op!(1, Silu, "mmembed-silu", "candle's silu");

    impl Silu {
        fn run<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            x: &CudaStorage,
            l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let xv = view::<T>(x, l)?;
            let n = xv.len();
            let per_thread = 16 / std::mem::size_of::<T>();
            // The kernel reads 16 bytes at a time from where the view
            // starts (allocations are 256-byte aligned).
            if !(l.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16) {
                candle_core::bail!("mmembed-silu: a view from element {}", l.start_offset());
            }
            // SAFETY: the kernel writes every value.
            let y = unsafe { dev.alloc::<T>(n) }?;
            let blocks = n
                .div_ceil(per_thread)
                .div_ceil(THREADS)
                .clamp(1, MAX_BLOCKS) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let name = format!("silu_{}", T::DTYPE.as_str());
            let func = dev.get_or_load_custom_func(&name, MODULE, ptx::ELEMENTWISE)?;
            let len = n as i64;
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(&y);
            b.arg(&len);
            // SAFETY: `n` values of `x` (from a 16-byte aligned start,
            // checked above) and of `y`, on candle's stream.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// On a CPU, candle's `silu` (what the graph runs there); the
    /// reference is the formula written out.
    #[test]
    fn silu_is_x_times_its_sigmoid() -> Result<()> {
        let v = [-30f32, -2.5, -0.1, 0., 0.3, 1., 4., 30.];
        let x = Tensor::new(&v, &Device::Cpu)?;
        for (got, x) in reference(&x)?.to_vec1::<f32>()?.iter().zip(v) {
            let want = x / (1. + (-x).exp());
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.),
                "{x}: {got} vs {want}"
            );
        }
        let cpu = silu(&x)?.to_vec1::<f32>()?;
        assert_eq!(cpu, reference(&x)?.to_vec1::<f32>()?);
        Ok(())
    }

    /// On a GPU (`scripts/gpu-check.sh` runs the `on_cuda` tests there;
    /// without one they say so and pass): the kernel against the reference,
    /// every precision, lengths with and without a tail past the 16-byte
    /// groups, and a view that starts inside its buffer.
    #[cfg(feature = "cuda")]
    #[test]
    fn on_cuda_silu_is_the_reference() -> Result<()> {
        let Some(gpu) = crate::cuda_ops::test_device() else {
            return Ok(());
        };
        let cpu = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for n in [1usize, 7, 8, 4099, 256 * 50 * 3072 / 16] {
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 37) % 2001) as f32 / 100. - 10.)
                    .collect();
                let x = Tensor::from_vec(v, n, &cpu)?.to_dtype(dtype)?;
                let got = silu(&x.to_device(&gpu)?)?.to_device(&cpu)?;
                let want = reference(&x)?;
                // f32: the GPU's expf is within 2 ulps of the host's; the
                // 16-bit types round the same floats (nearly always) alike.
                let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                let tol = if dtype == DType::F32 { 1e-5 } else { 8e-2 };
                eprintln!("silu {dtype:?} n {n}: max abs diff {diff:e}");
                assert!(diff <= tol, "{dtype:?} n {n}: {diff}");
            }
            // A view from element 8 (16-byte aligned for every dtype but
            // f32's 32 bytes: still a multiple of 16).
            let x = Tensor::arange(0f32, 40., &cpu)?.to_dtype(dtype)?;
            let got = silu(&x.to_device(&gpu)?.narrow(0, 8, 24)?)?.to_device(&cpu)?;
            let want = reference(&x.narrow(0, 8, 24)?)?;
            let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff <= 0.125, "{dtype:?} view: {diff}");
        }
        Ok(())
    }
}
