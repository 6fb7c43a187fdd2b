//! Elementwise ops of the CUDA graph ([`crate::Kernels::Cuda`]) as our own
//! kernels (`kernels/elementwise.cu`): `silu`, which is QuickGELU once the
//! graph has folded 1.702 into the weights around it, over the MLP's widest
//! activations; the pixels unfolded into rows of patches for the patch
//! embedding's GEMM; and the text tower's first rows, token embedding plus
//! position, in one pass.
//!
//! Why: candle's bf16 `silu` launches a thread per value although each
//! thread that works takes eight, and its f16 one reads a value a thread;
//! on the first H200 run it moved about 1.6 TB/s of the chip's 4.8 (3.9 %
//! of the portable graph's kernel time, more of a graph whose other kernels
//! got faster). The unfolding is a permute that candle copies with its
//! strided kernel, which divides a 64-bit index by each of six dimensions
//! per value (its copies ran at 0.2–0.3 TB/s on that run). Ours give each
//! thread 16 bytes and size the grid to the work; `silu`'s arithmetic is
//! candle's, `x / (1 + e^-x)` in f32, rounded once, and the unfolding moves
//! values unchanged. The text rows were candle's gather and then its
//! strided broadcast add; ours reads each token's row and its position's
//! once and adds in f32. `MMEMBED_CUDA_ELEMENTWISE=candle` takes candle's
//! ops for all three instead; other devices and graphs always do.

use candle_core::{DType, Result, Tensor};

/// `x · σ(x)`, on CUDA by our kernel unless `MMEMBED_CUDA_ELEMENTWISE=candle`.
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

/// `pixels [b, c, h, w]` as rows of patches `[b · (h/p) · (w/p), c · p ·
/// p]`, each row's values in (channel, row, column) order as the patch
/// weight's: with `ours` on CUDA our kernel (where whole 16-byte pieces of
/// patch rows line up: `p` a multiple of 8 values in bf16/f16, 4 in f32),
/// otherwise candle's permute and copy.
pub(crate) fn unfold(pixels: &Tensor, p: usize, ours: bool) -> Result<Tensor> {
    let (b, c, h, w) = pixels.dims4()?;
    if p == 0 || h % p != 0 || w % p != 0 {
        candle_core::bail!(
            "pixels {:?} do not split into patches of {p}",
            pixels.dims()
        );
    }
    let (gh, gw) = (h / p, w / p);
    match pixels.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_)
            if ours
                && self::ours()
                && p.is_multiple_of(16 / pixels.dtype().size_in_bytes())
                && pixels.elem_count() > 0 =>
        {
            pixels.contiguous()?.apply_op1_no_bwd(&cuda::Unfold { p })
        }
        _ => {
            let _ = ours;
            pixels
                .reshape((b, c, gh, p, gw, p))?
                .permute((0, 2, 4, 1, 3, 5))?
                .reshape((b * gh * gw, c * p * p))
        }
    }
}

/// The text tower's input rows `[b, t, d]`: the token embeddings
/// `table [vocab, d]` of `ids [b, t]` (u32) plus the positions `pos [t,
/// d]` (the position table's first `t` rows). With `ours` on CUDA our
/// kernel (rows of whole 16-byte pieces: `d` a multiple of 8 values in
/// bf16/f16, 4 in f32), which adds in f32 and rounds once, and gives an id
/// past the table (which the tokenizer never makes) its position alone;
/// otherwise candle's gather and broadcast add.
pub(crate) fn token_rows(table: &Tensor, ids: &Tensor, pos: &Tensor, ours: bool) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let (_, d) = table.dims2()?;
    if pos.dims2()? != (t, d) || pos.dtype() != table.dtype() {
        candle_core::bail!(
            "token rows: positions {:?} {:?} for {t} tokens of a {:?} {:?} table",
            pos.dims(),
            pos.dtype(),
            table.dims(),
            table.dtype()
        );
    }
    match table.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_)
            if ours
                && self::ours()
                && ids.dtype() == DType::U32
                && d.is_multiple_of(16 / table.dtype().size_in_bytes())
                && b * t > 0 =>
        {
            table.contiguous()?.apply_op3_no_bwd(
                &ids.contiguous()?,
                &pos.contiguous()?,
                &cuda::TokenRows,
            )
        }
        _ => {
            let _ = ours;
            table
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, d))?
                .broadcast_add(pos)
        }
    }
}

/// Whether our kernels run on CUDA: unless `MMEMBED_CUDA_ELEMENTWISE` is
/// `candle`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn ours() -> bool {
    crate::device::our_kernel("MMEMBED_CUDA_ELEMENTWISE", "ours", "candle")
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

    /// The launch shape for `items` threads' work: a grid as large as the
    /// work, striding past [`MAX_BLOCKS`].
    fn grid(items: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (items.div_ceil(THREADS).clamp(1, MAX_BLOCKS) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The kernels read 16 bytes at a time from where a view starts
    /// (allocations are 256-byte aligned).
    fn aligned<T>(op: &str, l: &Layout) -> Result<()> {
        if !(l.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16) {
            candle_core::bail!("{op}: a view from element {}", l.start_offset());
        }
        Ok(())
    }

    /// `[b, t, d]` rows from the table, the ids and the positions.
    pub(super) struct TokenRows;

    cuda_only_op!(
        3,
        TokenRows,
        "mmembed-token-rows",
        "candle's gather and add"
    );

    impl TokenRows {
        #[allow(clippy::too_many_arguments)]
        fn run3<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            table: &CudaStorage,
            tl: &Layout,
            ids: &CudaStorage,
            il: &Layout,
            pos: &CudaStorage,
            pl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = table.device().clone();
            let (tv, iv, pv) = (
                view::<T>(table, tl)?,
                view::<u32>(ids, il)?,
                view::<T>(pos, pl)?,
            );
            let (vocab, d) = tl.shape().dims2()?;
            let (b, t) = il.shape().dims2()?;
            aligned::<T>("mmembed-token-rows", tl)?;
            aligned::<T>("mmembed-token-rows", pl)?;
            let per16 = 16 / std::mem::size_of::<T>();
            if !d.is_multiple_of(per16)
                || pv.len() != t * d
                || iv.len() != b * t
                || tv.len() != vocab * d
            {
                candle_core::bail!(
                    "mmembed-token-rows: {:?} table, {:?} ids, {:?} positions",
                    tl.dims(),
                    il.dims(),
                    pl.dims()
                );
            }
            let rows = b * t;
            // SAFETY: every row's `d` values are written.
            let y = unsafe { dev.alloc::<T>(rows * d) }?;
            let func = dev.get_or_load_custom_func(
                &format!("token_rows_{}", T::DTYPE.as_str()),
                MODULE,
                ptx::ELEMENTWISE,
            )?;
            let int = |v: usize| i32::try_from(v).map_err(candle_core::Error::wrap);
            let (r, ti, di, vi) = (rows as i64, int(t)?, int(d)?, vocab as i64);
            let mut launch = func.builder();
            launch.arg(&iv);
            launch.arg(&tv);
            launch.arg(&pv);
            launch.arg(&y);
            launch.arg(&r);
            launch.arg(&ti);
            launch.arg(&di);
            launch.arg(&vi);
            // SAFETY: reads `rows` ids, table rows below `vocab` (the kernel
            // skips others), `t` position rows, all `d` wide and 16-byte
            // aligned (checked above); writes `rows · d` values; on
            // candle's stream.
            unsafe { launch.launch(grid(rows * d / per16)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((b, t, d))))
        }
    }

    pub(super) struct Unfold {
        pub p: usize,
    }

    cuda_only_op!(1, Unfold, "mmembed-unfold", "candle's permute");

    impl Unfold {
        fn run<T: CudaDType + WithDType + DeviceRepr>(
            &self,
            x: &CudaStorage,
            l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let xv = view::<T>(x, l)?;
            let (b, c, h, w) = l.shape().dims4()?;
            let (p, per16) = (self.p, 16 / std::mem::size_of::<T>());
            aligned::<T>("mmembed-unfold", l)?;
            if p == 0 || !p.is_multiple_of(per16) || h % p != 0 || w % p != 0 {
                candle_core::bail!("mmembed-unfold: {:?} in patches of {p}", l.dims());
            }
            let n = xv.len();
            let groups = n / per16;
            // SAFETY: every 16-byte group of the output is written once.
            let y = unsafe { dev.alloc::<T>(n) }?;
            let func = dev.get_or_load_custom_func(
                &format!("unfold_{}", T::DTYPE.as_str()),
                MODULE,
                ptx::ELEMENTWISE,
            )?;
            let int = |v: usize| i32::try_from(v).map_err(candle_core::Error::wrap);
            let (g, ci, hi, wi, pi) = (groups as i64, int(c)?, int(h)?, int(w)?, int(p)?);
            let mut launch = func.builder();
            launch.arg(&xv);
            launch.arg(&y);
            launch.arg(&g);
            for v in [&ci, &hi, &wi, &pi] {
                launch.arg(v);
            }
            // SAFETY: the groups read lie inside `x` (image < b, channel
            // < c, rows and columns inside h and w, since p divides both:
            // checked above) and the writes inside `y`, `n` values each,
            // 16-byte aligned; on candle's stream.
            unsafe { launch.launch(grid(groups)) }.w()?;
            let shape = Shape::from((b * (h / p) * (w / p), c * p * p));
            Ok((CudaStorage::wrap_cuda_slice(y, dev), shape))
        }
    }

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
            aligned::<T>("mmembed-silu", l)?;
            // SAFETY: the kernel writes every value.
            let y = unsafe { dev.alloc::<T>(n) }?;
            let cfg = grid(n.div_ceil(per_thread));
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

    /// The unfolding by hand: row (image, patch row, patch column), value
    /// (channel, row in the patch, column in the patch).
    fn unfold_by_hand(x: &[f32], (b, c, h, w): (usize, usize, usize, usize), p: usize) -> Vec<f32> {
        let mut y = Vec::with_capacity(x.len());
        for i in 0..b {
            for gy in 0..h / p {
                for gx in 0..w / p {
                    for ch in 0..c {
                        for py in 0..p {
                            for px in 0..p {
                                y.push(x[((i * c + ch) * h + gy * p + py) * w + gx * p + px]);
                            }
                        }
                    }
                }
            }
        }
        y
    }

    #[test]
    fn token_rows_are_table_rows_plus_positions() -> Result<()> {
        let dev = Device::Cpu;
        let table = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev)?;
        let pos = Tensor::new(&[[10f32, 20.], [30., 40.]], &dev)?;
        let ids = Tensor::new(&[[2u32, 0], [1, 1]], &dev)?;
        let y = token_rows(&table, &ids, &pos, true)?.to_vec3::<f32>()?;
        assert_eq!(y, [[[15., 26.], [31., 42.]], [[13., 24.], [33., 44.]]]);
        assert!(token_rows(&table, &ids, &pos.narrow(0, 0, 1)?, true).is_err());
        Ok(())
    }

    #[test]
    fn unfold_makes_rows_of_patches() -> Result<()> {
        let dims = (2, 3, 8, 12);
        let x = Tensor::arange(0f32, (2 * 3 * 8 * 12) as f32, &Device::Cpu)?.reshape(dims)?;
        let y = unfold(&x, 4, true)?;
        assert_eq!(y.dims(), &[2 * 2 * 3, 3 * 16]);
        let want = unfold_by_hand(&x.flatten_all()?.to_vec1()?, dims, 4);
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want);
        assert!(unfold(&x, 5, true).is_err());
        assert!(unfold(&x, 0, true).is_err());
        Ok(())
    }

    /// On a GPU (`scripts/gpu-check.sh` runs the `on_cuda` tests there;
    /// without one they say so and pass): the kernel's rows are the table's
    /// and the positions' sum rounded once, bit for bit, every precision;
    /// an id past the table gives the position alone.
    #[cfg(feature = "cuda")]
    #[test]
    fn on_cuda_token_rows_are_the_sums() -> Result<()> {
        let Some(gpu) = crate::cuda_ops::test_device() else {
            return Ok(());
        };
        let cpu = Device::Cpu;
        let (vocab, t, d, b) = (1000, 77, 512, 5);
        let values = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * k) % 1999) as f32 / 500. - 2.)
                .collect()
        };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let table =
                Tensor::from_vec(values(vocab * d, 7), (vocab, d), &cpu)?.to_dtype(dtype)?;
            let pos = Tensor::from_vec(values(t * d, 13), (t, d), &cpu)?.to_dtype(dtype)?;
            let mut ids: Vec<u32> = (0..b * t).map(|i| ((i * 31) % vocab) as u32).collect();
            ids[3] = vocab as u32 + 5;
            let ids_t = Tensor::from_vec(ids.clone(), (b, t), &cpu)?;
            let got = token_rows(
                &table.to_device(&gpu)?,
                &ids_t.to_device(&gpu)?,
                &pos.to_device(&gpu)?,
                true,
            )?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
            let (tf, pf) = (
                table.to_dtype(DType::F32)?.to_vec2::<f32>()?,
                pos.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            );
            let mut wrong = 0;
            for (r, &id) in ids.iter().enumerate() {
                for k in 0..d {
                    let tok = tf.get(id as usize).map_or(0., |row| row[k]);
                    // The f32 sum rounded once to the dtype (to nearest even).
                    let sum = tok + pf[r % t][k];
                    let want = match dtype {
                        DType::BF16 => half::bf16::from_f32(sum).to_f32(),
                        DType::F16 => half::f16::from_f32(sum).to_f32(),
                        _ => sum,
                    };
                    wrong += usize::from(got[r * d + k].to_bits() != want.to_bits());
                }
            }
            eprintln!(
                "token rows {dtype:?}: {wrong} of {} values differ",
                b * t * d
            );
            assert_eq!(wrong, 0, "{dtype:?}");
        }
        Ok(())
    }

    /// On a GPU (`scripts/gpu-check.sh` runs the `on_cuda` tests there;
    /// without one they say so and pass): the kernel moves every value
    /// where the unfolding by hand puts it, every precision and patch size
    /// it takes (and candle's ops where it does not: 14).
    #[cfg(feature = "cuda")]
    #[test]
    fn on_cuda_unfold_is_the_permute() -> Result<()> {
        let Some(gpu) = crate::cuda_ops::test_device() else {
            return Ok(());
        };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (dims, p) in [
                ((3, 3, 224, 224), 32),
                ((2, 3, 224, 224), 16),
                ((2, 3, 224, 224), 14),
                ((1, 2, 16, 48), 8),
            ] {
                let (b, c, h, w) = dims;
                // Integers mod 251, exact in every dtype (bf16 holds them up
                // to 256); 251 divides no dimension, so a value moved to
                // the wrong place shows.
                let x: Vec<f32> = (0..b * c * h * w).map(|i| (i % 251) as f32).collect();
                let t = Tensor::from_vec(x.clone(), dims, &Device::Cpu)?.to_dtype(dtype)?;
                let got = unfold(&t.to_device(&gpu)?, p, true)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let want = unfold_by_hand(&x, dims, p);
                let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                eprintln!("unfold {dtype:?} {dims:?} p {p}: {wrong} values misplaced");
                assert!(
                    wrong == 0 && got.len() == want.len(),
                    "{dtype:?} {dims:?} p {p}"
                );
            }
        }
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
                // 16-bit types round the same floats (nearly always) alike,
                // else an ulp apart.
                let diff = crate::cuda_ops::largest_diff(&got, &want)?;
                let tol = if dtype == DType::F32 { 2e-6 } else { 1e-2 };
                eprintln!("silu {dtype:?} n {n}: max diff {diff:e} of the largest value");
                assert!(diff <= tol, "{dtype:?} n {n}: {diff}");
            }
            // A view from element 8 (16-byte aligned for every dtype).
            let x = Tensor::arange(0f32, 40., &cpu)?.to_dtype(dtype)?;
            let got = silu(&x.to_device(&gpu)?.narrow(0, 8, 24)?)?.to_device(&cpu)?;
            let diff = crate::cuda_ops::largest_diff(&got, &reference(&x.narrow(0, 8, 24)?)?)?;
            assert!(diff <= 1e-2, "{dtype:?} view: {diff}");
        }
        Ok(())
    }
}
