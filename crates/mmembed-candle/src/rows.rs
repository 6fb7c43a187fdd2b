//! The row-wise ops of the CUDA graph ([`crate::Kernels::Cuda`]): the
//! attention softmax with its additive mask folded in, and layer norm, as
//! our own kernels (`kernels/rows.cu`, compiled to PTX by `build.rs` with
//! the toolkit that compiles candle's own kernels).
//!
//! Why: candle's kernels for both run one row per 32-thread block, which
//! caps an SM at half its threads, and its bf16/f16 softmax goes over the
//! scores five times (exponentials in the storage type, stored, read back
//! to scale); on the first H200 run softmax moved about 0.4 TB/s of the
//! chip's 4.8. Ours keep a row in one warp's registers, eight rows to a
//! block: one read, one write, f32 throughout, rounded once. The mask
//! (CLIP's causal text mask, Chinese-CLIP's padding) is added as the
//! scores are read, one `[b, t, t]` under every head, so it is neither
//! copied under each head nor accumulated by the scores' GEMM.
//!
//! On the CPU the same functions run as f32 tensor ops rounded once (what
//! the kernels compute), which is how the graph's tests check where the
//! mask goes; what only a GPU can check (the kernels themselves) the GPU
//! run's parity step does (scripts/gpu-check.sh), falling back to
//! [`crate::Kernels::Cublas`] (candle's row kernels) if they miss.

use candle_core::{D, DType, Result, Tensor};

/// `softmax(x + mask)` over the last dimension of `x`, the mask's rows
/// repeating down `x`'s: scores `[heads, b, t, t]` take a mask `[b, t,
/// t]` (or `[b, 1, t, t]`) under every head.
pub(crate) fn softmax(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    let rows = x.elem_count() / cols.max(1);
    let mask_rows = mask
        .map(|m| mask_rows(rows, cols, m.elem_count()))
        .transpose()?;
    match x.device() {
        // (Nothing to launch for no rows.)
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) if width(cols).is_some() && rows > 0 => {
            let x = x.contiguous()?;
            match mask {
                Some(m) => {
                    let m = m.to_dtype(x.dtype())?.contiguous()?;
                    x.apply_op2_no_bwd(&m, &cuda::Softmax)
                }
                None => x.apply_op1_no_bwd(&cuda::Softmax),
            }
        }
        _ => reference_softmax(x, mask, mask_rows),
    }
}

/// The softmax as the kernel computes it: in f32, rounded once.
fn reference_softmax(
    x: &Tensor,
    mask: Option<&Tensor>,
    mask_rows: Option<usize>,
) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    let xf = x.to_dtype(DType::F32)?;
    let xf = match (mask, mask_rows) {
        (Some(m), Some(mr)) => {
            let rows = x.elem_count() / cols;
            let m = m.to_dtype(DType::F32)?.reshape((1, mr, cols))?;
            xf.reshape((rows / mr, mr, cols))?
                .broadcast_add(&m)?
                .reshape(x.shape())?
        }
        _ => xf,
    };
    candle_nn::ops::softmax_last_dim(&xf)?.to_dtype(x.dtype())
}

/// Layer norm over the last dimension: `(x − mean) / √(var + eps) · w +
/// b`, the variance from the centred values.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    if w.elem_count() != cols || b.elem_count() != cols {
        candle_core::bail!(
            "layer norm: rows of {cols}, weight {:?}, bias {:?}",
            w.dims(),
            b.dims()
        );
    }
    match x.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) if width(cols).is_some() && x.elem_count() > 0 => {
            let dt = x.dtype();
            let (w, b) = (w.to_dtype(dt)?.contiguous()?, b.to_dtype(dt)?.contiguous()?);
            x.contiguous()?
                .apply_op3_no_bwd(&w, &b, &cuda::LayerNorm { eps: eps as f32 })
        }
        _ => {
            let xf = x.to_dtype(DType::F32)?;
            let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            centred
                .broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(&w.to_dtype(DType::F32)?)?
                .broadcast_add(&b.to_dtype(DType::F32)?)?
                .to_dtype(x.dtype())
        }
    }
}

/// How many mask rows repeat down `rows` rows of `cols` values, from the
/// mask's length: a whole number of rows that divides `rows`, else an
/// error. The op checks the tensors with it, the launch its buffers.
fn mask_rows(rows: usize, cols: usize, len: usize) -> Result<usize> {
    let mr = len / cols.max(1);
    if cols == 0 || mr == 0 || len != mr * cols || !rows.is_multiple_of(mr) {
        candle_core::bail!("softmax: a mask of {len} values does not tile {rows} rows of {cols}");
    }
    Ok(mr)
}

/// The compiled widths: a kernel for rows of up to 32·N values for each N
/// here (`ROWS_WIDTHS` in `kernels/rows.cu`).
const ROW_WIDTHS: [usize; 7] = [1, 2, 4, 8, 16, 24, 32];

/// The widest row a kernel holds (32 lanes × the widest N); wider rows
/// take candle's kernels.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MAX_COLS: usize = 32 * ROW_WIDTHS[ROW_WIDTHS.len() - 1];

/// Which compiled width serves rows of `cols` values (none for empty or
/// too wide rows).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn width(cols: usize) -> Option<usize> {
    ROW_WIDTHS.into_iter().find(|n| cols > 0 && 32 * n >= cols)
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The launches. Every kernel takes contiguous rows; the ops check
    //! lengths before launching, so no kernel reads past a buffer.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape, WithDType};

    use crate::cuda_ops::{cuda_only_op, ptx, view};

    /// The module's name in candle's per-device cache of loaded PTX.
    const MODULE: &str = "mmembed_rows";

    /// Eight rows (warps) to a block.
    const WARPS_PER_BLOCK: usize = 8;

    /// `(rows, cols)` of `l`, the launch shape for them and the kernel's
    /// name, `{op}_{dtype}_{N}`.
    fn plan<T: CudaDType + WithDType>(
        op: &str,
        l: &Layout,
    ) -> Result<(i64, i32, LaunchConfig, String)> {
        let dims = l.shape().dims();
        let cols = dims.last().copied().unwrap_or(0);
        let rows = l.shape().elem_count() / cols.max(1);
        let Some(n) = super::width(cols) else {
            candle_core::bail!(
                "row kernels: rows of {cols} values exceed {}",
                super::MAX_COLS
            );
        };
        let blocks = u32::try_from(rows.div_ceil(WARPS_PER_BLOCK))
            .map_err(|_| candle_core::Error::Msg(format!("row kernels: {rows} rows")))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: ((32 * WARPS_PER_BLOCK) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let dtype = T::DTYPE.as_str();
        Ok((rows as i64, cols as i32, cfg, format!("{op}_{dtype}_{n}")))
    }

    fn out<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every row of the output is written by its warp.
        unsafe { dev.alloc::<T>(len) }
    }

    /// The softmax: op1 without a mask, op2 with one.
    pub(super) struct Softmax;

    cuda_only_op!(1, Softmax, "mmembed-softmax", "rows::softmax's reference");
    cuda_only_op!(
        2,
        Softmax,
        "mmembed-softmax-masked",
        "rows::softmax's reference"
    );

    impl Softmax {
        fn run<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            x: &CudaStorage,
            xl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            Self::launch::<T>(x, xl, None)
        }

        fn run2<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            m: &CudaStorage,
            ml: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            Self::launch::<T>(x, xl, Some((m, ml)))
        }

        fn launch<T: CudaDType + WithDType + DeviceRepr>(
            x: &CudaStorage,
            xl: &Layout,
            mask: Option<(&CudaStorage, &Layout)>,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let xv = view::<T>(x, xl)?;
            let op = if mask.is_some() {
                "softmax_masked"
            } else {
                "softmax"
            };
            let (rows, cols, cfg, name) = plan::<T>(op, xl)?;
            let mask = match mask {
                Some((m, ml)) => {
                    let mv = view::<T>(m, ml)?;
                    let mr = super::mask_rows(rows as usize, cols as usize, mv.len())?;
                    Some((mv, mr as i64))
                }
                None => None,
            };
            let y = out::<T>(&dev, xv.len())?;
            let func = dev.get_or_load_custom_func(&name, MODULE, ptx::ROWS)?;
            let mut b = func.builder();
            b.arg(&xv);
            if let Some((mv, _)) = &mask {
                b.arg(mv);
            }
            b.arg(&y);
            b.arg(&rows);
            b.arg(&cols);
            if let Some((_, mask_rows)) = &mask {
                b.arg(mask_rows);
            }
            // SAFETY: the kernel reads `rows · cols` values of `x`,
            // `mask_rows · cols` of the mask (checked above) and writes
            // `rows · cols` of `y`, all on candle's stream.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
        }
    }

    pub(super) struct LayerNorm {
        pub eps: f32,
    }

    cuda_only_op!(
        3,
        LayerNorm,
        "mmembed-layer-norm",
        "rows::layer_norm's reference"
    );

    impl LayerNorm {
        #[allow(clippy::too_many_arguments)]
        fn run3<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let (xv, wv, bv) = (view::<T>(x, xl)?, view::<T>(w, wl)?, view::<T>(b, bl)?);
            let (rows, cols, cfg, name) = plan::<T>("layer_norm", xl)?;
            if wv.len() != cols as usize || bv.len() != cols as usize {
                candle_core::bail!(
                    "layer norm: {} weights and {} biases for rows of {cols}",
                    wv.len(),
                    bv.len()
                );
            }
            let y = out::<T>(&dev, xv.len())?;
            let func = dev.get_or_load_custom_func(&name, MODULE, ptx::ROWS)?;
            let mut launch = func.builder();
            launch.arg(&xv);
            launch.arg(&wv);
            launch.arg(&bv);
            launch.arg(&y);
            launch.arg(&rows);
            launch.arg(&cols);
            launch.arg(&self.eps);
            // SAFETY: `rows · cols` values of `x` and `y`, `cols` of the
            // weight and bias (checked above), all on candle's stream.
            unsafe { launch.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The references compute softmax and layer norm as written the
    /// obvious way (on values chosen by hand, not by these functions).
    #[test]
    fn references_compute_softmax_and_layer_norm() -> Result<()> {
        let dev = Device::Cpu;
        // Two heads over one sequence of 2 tokens, causal mask.
        let x = Tensor::new(&[[1f32, 2.], [3., 5.], [0., 0.], [4., -4.]], &dev)?;
        let mask = Tensor::new(&[[0f32, f32::NEG_INFINITY], [0., 0.]], &dev)?;
        let y = softmax(&x, Some(&mask))?.to_vec2::<f32>()?;
        let e = |a: f32, b: f32| (a.exp() / (a.exp() + b.exp()), b.exp() / (a.exp() + b.exp()));
        let want = [(1., 0.), e(3., 5.), (1., 0.), e(4., -4.)];
        for (row, (a, b)) in y.iter().zip(want) {
            assert!(
                (row[0] - a).abs() < 1e-6 && (row[1] - b).abs() < 1e-6,
                "{row:?}"
            );
        }
        let plain = softmax(&x, None)?.to_vec2::<f32>()?;
        assert!((plain[0][0] - e(1., 2.).0).abs() < 1e-6);
        // A mask that does not tile the rows is refused.
        let bad = Tensor::zeros((3, 2), DType::F32, &dev)?;
        assert!(softmax(&x, Some(&bad)).is_err());

        let x = Tensor::new(&[[1f32, 2., 3., 6.]], &dev)?;
        let w = Tensor::new(&[1f32, 2., 1., 1.], &dev)?;
        let b = Tensor::new(&[0f32, 0., 1., 0.], &dev)?;
        let y = layer_norm(&x, &w, &b, 0.0)?.to_vec2::<f32>()?;
        // mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5.
        let s = 3.5f32.sqrt();
        let z = |x: f32| (x - 3.) / s;
        let want = [z(1.), 2. * z(2.), z(3.) + 1., z(6.)];
        for (got, want) in y[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert!(layer_norm(&x, &b.narrow(0, 0, 3)?, &b, 1e-5).is_err());
        Ok(())
    }

    /// On a GPU (`scripts/gpu-check.sh` runs the `on_cuda` tests there;
    /// without one they say so and pass): the kernels against the
    /// references above, every precision, rows of several widths, the
    /// softmax with and without a mask.
    #[cfg(feature = "cuda")]
    #[test]
    fn on_cuda_the_kernels_are_the_references() -> Result<()> {
        let Some(gpu) = crate::cuda_ops::test_device() else {
            return Ok(());
        };
        let cpu = Device::Cpu;
        let values = |n: usize, seed: u32, scale: f32| -> Vec<f32> {
            let mut s = seed.wrapping_mul(2_654_435_761) | 1;
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    ((s % 2000) as f32 / 1000.0 - 1.0) * scale
                })
                .collect()
        };
        let diff = crate::cuda_ops::largest_diff;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // A few ulps of the storage type.
            let tol = match dtype {
                DType::F32 => 1e-5,
                DType::F16 => 2e-3,
                _ => 1.6e-2,
            };
            for (rows, cols) in [(7, 1), (300, 50), (2 * 77, 77), (33, 768), (5, MAX_COLS)] {
                let x = Tensor::from_vec(values(rows * cols, 1, 6.0), (rows, cols), &cpu)?
                    .to_dtype(dtype)?;
                let on_gpu = |t: &Tensor| t.to_device(&gpu);
                let d = diff(&softmax(&on_gpu(&x)?, None)?, &softmax(&x, None)?)?;
                eprintln!("softmax {dtype:?} {rows}x{cols}: max diff {d:e} of the largest value");
                assert!(d < tol, "softmax {dtype:?} {rows}x{cols}: {d}");
                // A causal mask over the rows in blocks of `cols`, where
                // they tile.
                if rows % cols == 0 {
                    let mask: Vec<f32> = (0..cols * cols)
                        .map(|i| {
                            if i % cols > i / cols {
                                f32::NEG_INFINITY
                            } else {
                                0.
                            }
                        })
                        .collect();
                    let m = Tensor::from_vec(mask, (cols, cols), &cpu)?.to_dtype(dtype)?;
                    let got = softmax(&on_gpu(&x)?, Some(&on_gpu(&m)?))?;
                    let d = diff(&got, &softmax(&x, Some(&m))?)?;
                    eprintln!(
                        "masked softmax {dtype:?} {rows}x{cols}: max diff {d:e} of the largest value"
                    );
                    assert!(d < tol, "masked softmax {dtype:?} {rows}x{cols}: {d}");
                }
                let w = Tensor::from_vec(values(cols, 2, 2.0), cols, &cpu)?.to_dtype(dtype)?;
                let b = Tensor::from_vec(values(cols, 3, 1.0), cols, &cpu)?.to_dtype(dtype)?;
                let got = layer_norm(&on_gpu(&x)?, &on_gpu(&w)?, &on_gpu(&b)?, 1e-5)?;
                let d = diff(&got, &layer_norm(&x, &w, &b, 1e-5)?)?;
                eprintln!(
                    "layer norm {dtype:?} {rows}x{cols}: max diff {d:e} of the largest value"
                );
                assert!(d < tol, "layer norm {dtype:?} {rows}x{cols}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn every_row_up_to_the_widest_has_a_kernel() {
        assert_eq!(width(1), Some(1));
        assert_eq!(width(50), Some(2));
        assert_eq!(width(77), Some(4));
        assert_eq!(width(768), Some(24));
        assert_eq!(width(MAX_COLS), Some(32));
        assert_eq!(width(MAX_COLS + 1), None);
        assert_eq!(width(0), None);
        // Each width is compiled (a missing one would fail at load, on a GPU).
        let src = include_str!("../kernels/rows.cu");
        for n in ROW_WIDTHS {
            assert!(src.contains(&format!("ROWS_KERNELS(T, NAME, {n})")), "{n}");
        }
    }
}
