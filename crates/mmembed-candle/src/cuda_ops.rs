//! What the CUDA-only ops share (`blas_ops`, `rows`, `pixels`,
//! `attention`, `elementwise`): our kernels' PTX, tensor storage as device
//! views, CUDA errors as candle's, the `CustomOp` impls of an op that runs
//! on CUDA only (the CPU runs a reference function instead), and the GPU
//! for the `on_cuda` tests.

use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::{CudaStorage, Layout, Result, Storage};

/// Our kernels (`kernels/*.cu`) as PTX, one constant per file (build.rs).
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The GPU for the `on_cuda` tests, which only a machine with one runs
/// (`scripts/gpu-check.sh`): `None`, said on stderr, where there is none or
/// no driver to ask (cudarc panics when it cannot load `libcuda`).
#[cfg(test)]
pub(crate) fn test_device() -> Option<candle_core::Device> {
    match std::panic::catch_unwind(|| candle_core::Device::new_cuda(0)) {
        Ok(Ok(dev)) => Some(dev),
        Ok(Err(e)) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
        Err(_) => {
            eprintln!("skipped: no CUDA driver");
            None
        }
    }
}

/// For the `on_cuda` tests: the largest difference between `got` and
/// `want`, compared as f32, as a share of `want`'s largest magnitude.
#[cfg(test)]
pub(crate) fn largest_diff(got: &candle_core::Tensor, want: &candle_core::Tensor) -> Result<f32> {
    use candle_core::DType;
    let (g, w) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
    let scale = w.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
    Ok((g - w)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
}

/// A CUDA library's error as candle's.
pub(crate) fn cu<E: std::error::Error + Send + Sync + 'static>(e: E) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// A contiguous tensor's elements on the device.
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("our CUDA ops take contiguous tensors"),
    }
}

/// A tensor's storage, if it is on a CUDA device.
pub(crate) fn storage_of(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => candle_core::bail!("our CUDA ops take CUDA tensors"),
    }
}

/// `CustomOp1`, `CustomOp2` or `CustomOp3` (by the arity given first) for
/// an op that runs on CUDA only: its name, the CPU's refusal naming the
/// reference the CPU takes instead, and `cuda_fwd` dispatching on the
/// first input's dtype to the op's `run`, `run2` or `run3::<T>` for f32,
/// f16 and bf16 (others are refused).
macro_rules! cuda_only_op {
    (@dispatch $name:literal, $dtype:expr, |$t:ident| $call:expr) => {{
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $call
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $call
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $call
            }
            dt => candle_core::bail!("{}: no {dt:?}", $name),
        }
    }};
    (1, $op:ty, $name:literal, $reference:literal) => {
        impl candle_core::CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                candle_core::bail!(concat!($name, " runs on CUDA; the CPU takes ", $reference))
            }

            fn cuda_fwd(
                &self,
                a: &candle_core::CudaStorage,
                al: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::cuda_ops::cuda_only_op!(@dispatch $name, a.dtype(), |T| self.run::<T>(a, al))
            }
        }
    };
    (2, $op:ty, $name:literal, $reference:literal) => {
        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                candle_core::bail!(concat!($name, " runs on CUDA; the CPU takes ", $reference))
            }

            fn cuda_fwd(
                &self,
                a: &candle_core::CudaStorage,
                al: &candle_core::Layout,
                b: &candle_core::CudaStorage,
                bl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::cuda_ops::cuda_only_op!(@dispatch $name, a.dtype(), |T| self.run2::<T>(a, al, b, bl))
            }
        }
    };
    (3, $op:ty, $name:literal, $reference:literal) => {
        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                candle_core::bail!(concat!($name, " runs on CUDA; the CPU takes ", $reference))
            }

            #[allow(clippy::too_many_arguments)]
            fn cuda_fwd(
                &self,
                a: &candle_core::CudaStorage,
                al: &candle_core::Layout,
                b: &candle_core::CudaStorage,
                bl: &candle_core::Layout,
                c: &candle_core::CudaStorage,
                cl: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                $crate::cuda_ops::cuda_only_op!(@dispatch $name, a.dtype(), |T| self.run3::<T>(a, al, b, bl, c, cl))
            }
        }
    };
}

pub(crate) use cuda_only_op;
