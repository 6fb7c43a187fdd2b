//! Differentiable CPU kernels for training: softmax over the last dim, layer
//! norm and quick-GELU, each one pass forward and one pass backward.
//!
//! candle differentiates these only as chains of elementary ops (about ten
//! passes over the tensor and as many allocations each way), and its fused
//! inference kernels have no backward pass. On the demo model's training
//! step these chains, not the matmuls, were most of the time. The kernels
//! take contiguous f32 CPU tensors; [`supported`] says when a tensor is one,
//! and callers fall back to the elementary ops otherwise. Unit tests hold
//! values and gradients to the elementary-op graphs.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

/// Whether `x` can go through these kernels.
pub(crate) fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("training kernels take f32 tensors")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("training kernels take contiguous tensors"),
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("training kernels need a non-empty last dim"),
    }
}

fn owned(v: Vec<f32>, l: &Layout) -> (CpuStorage, Shape) {
    (CpuStorage::F32(v), l.shape().clone())
}

/// Softmax over the last dim.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "train-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, d) = (f32s(s, l)?, last_dim(l)?);
        let mut y = vec![0f32; x.len()];
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for (x, y) in x.iter().zip(y.iter_mut()) {
                *y = (x - max).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
        }
        Ok(owned(y, l))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            y.contiguous()?
                .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `dx = y * (g - <g, y>)` row by row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "train-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g, d) = (f32s(s1, l1)?, f32s(s2, l2)?, last_dim(l1)?);
        let mut dx = vec![0f32; y.len()];
        for ((y, g), dx) in y
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
            }
        }
        Ok(owned(dx, l1))
    }
}

/// `x * sigmoid(1.702 x)`, CLIP's quick GELU.
pub(crate) fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuickGelu)
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "train-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        Ok(owned(
            x.iter().map(|&x| x * sigmoid(1.702 * x)).collect(),
            l,
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.contiguous()?
                .apply_op2_no_bwd(&g.contiguous()?, &QuickGeluGrad)?,
        ))
    }
}

struct QuickGeluGrad;

impl CustomOp2 for QuickGeluGrad {
    fn name(&self) -> &'static str {
        "train-quick-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let dx = x
            .iter()
            .zip(g)
            .map(|(&x, &g)| {
                let s = sigmoid(1.702 * x);
                g * (s + 1.702 * x * s * (1.0 - s))
            })
            .collect();
        Ok(owned(dx, l1))
    }
}

/// Layer norm over the last dim with weight `w` and bias `b`.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of a row.
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn check_params(d: usize, w: &[f32], b: &[f32]) -> Result<()> {
    if w.len() != d || b.len() != d {
        candle_core::bail!(
            "layer norm over {d} features got {} weights and {} biases",
            w.len(),
            b.len()
        );
    }
    Ok(())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "train-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b, d) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?, last_dim(l1)?);
        check_params(d, w, b)?;
        let mut y = vec![0f32; x.len()];
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, rstd) = moments(x, self.eps);
            for i in 0..d {
                y[i] = (x[i] - mean) * rstd * w[i] + b[i];
            }
        }
        Ok(owned(y, l1))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        // One pass computes dx (same shape as x) and, packed after it, the
        // weight and bias gradients summed over rows.
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &g.contiguous()?,
            &LayerNormGrad { eps: self.eps },
        )?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + d, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of [`LayerNorm`]: `[dx (flattened), dw, db]` in one 1-D tensor.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "train-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g, d) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?, last_dim(l1)?);
        check_params(d, w, w)?;
        let n = x.len();
        let mut out = vec![0f32; n + 2 * d];
        let (dx, params) = out.split_at_mut(n);
        let (dw, db) = params.split_at_mut(d);
        let mut xhat = vec![0f32; d];
        let mut gw = vec![0f32; d];
        for ((x, g), dx) in x
            .chunks_exact(d)
            .zip(g.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let (mean, rstd) = moments(x, self.eps);
            let (mut mean_gw, mut mean_gw_xhat) = (0.0, 0.0);
            for i in 0..d {
                xhat[i] = (x[i] - mean) * rstd;
                gw[i] = g[i] * w[i];
                mean_gw += gw[i];
                mean_gw_xhat += gw[i] * xhat[i];
                dw[i] += g[i] * xhat[i];
                db[i] += g[i];
            }
            mean_gw /= d as f32;
            mean_gw_xhat /= d as f32;
            for i in 0..d {
                dx[i] = rstd * (gw[i] - mean_gw - xhat[i] * mean_gw_xhat);
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("same shapes")
    }

    /// Values and gradients of `fast` and `reference` (elementary candle
    /// ops) at the same random point, through a random linear readout so
    /// the incoming gradient is not uniform.
    fn compare(
        shape: &[usize],
        params: usize,
        fast: impl Fn(&Tensor, &[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&Tensor, &[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let d = *shape.last().expect("shape");
        let x = Var::randn(0f32, 2.0, shape, &dev)?;
        let ps: Vec<Var> = (0..params)
            .map(|_| Var::randn(0.5f32, 1.0, d, &dev))
            .collect::<Result<_>>()?;
        let pt: Vec<Tensor> = ps.iter().map(|p| p.as_tensor().clone()).collect();
        let readout = Tensor::randn(0f32, 1.0, shape, &dev)?;
        let (yf, yr) = (fast(&x, &pt)?, reference(&x, &pt)?);
        assert!(max_diff(&yf, &yr) < 1e-5, "values differ");
        let gf = (&yf * &readout)?.sum_all()?.backward()?;
        let gr = (&yr * &readout)?.sum_all()?.backward()?;
        let mut vars = vec![x.as_tensor().clone()];
        vars.extend(pt);
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (gf.get(v).expect("fast grad"), gr.get(v).expect("ref grad"));
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let diff = max_diff(a, b) / scale;
            assert!(diff < 1e-5, "gradient {i} differs by {diff} (relative)");
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_elementary_ops() -> Result<()> {
        compare(
            &[3, 4, 17],
            0,
            |x, _| softmax_last_dim(x),
            |x, _| candle_nn::ops::softmax(x, D::Minus1),
        )
    }

    #[test]
    fn softmax_handles_masked_entries() -> Result<()> {
        let x = Tensor::new(&[[0.5f32, f32::NEG_INFINITY, 1.0]], &Device::Cpu)?;
        let y = softmax_last_dim(&x)?.to_vec2::<f32>()?;
        assert_eq!(y[0][1], 0.0);
        assert!((y[0][0] + y[0][2] - 1.0).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_elementary_ops() -> Result<()> {
        compare(
            &[5, 33],
            0,
            |x, _| quick_gelu(x),
            |x, _| x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        )
    }

    #[test]
    fn layer_norm_matches_elementary_ops() -> Result<()> {
        let eps = 1e-5;
        compare(
            &[2, 7, 24],
            2,
            |x, p| layer_norm(x, &p[0], &p[1], eps),
            |x, p| {
                let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(var + eps)?.sqrt()?)?
                    .broadcast_mul(&p[0])?
                    .broadcast_add(&p[1])
            },
        )
    }

    #[test]
    fn layer_norm_rejects_mismatched_weights() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).expect("x");
        let w = Tensor::ones(3, DType::F32, &dev).expect("w");
        assert!(layer_norm(&x, &w, &w, 1e-5).is_err());
    }
}
