//! MobileCLIP's image tower: timm's FastViT MCi (`fastvit_mci0` …
//! `fastvit_mci4`), as open_clip's `TimmModel` wraps it (`visual.trunk.*`).
//!
//! The checkpoints hold the training-time form: every MobileOne block is a
//! sum of branches (k×k and 1×1 convolutions, an identity, each with a batch
//! norm), RepMixer subtracts one such block from another under a layer scale,
//! and the conditional position encoding adds its input back. Each of those
//! is one convolution at inference (RepVGG's reparameterisation, what timm's
//! `reparameterize_model` does), so the loader folds them, in f32, into one
//! kernel and bias each, and also reads checkpoints already folded
//! (`reparam_conv`). Batch norms before attention fold into the QKV layer,
//! layer scales into the layer before them.
//!
//! Depths, widths, which stages downsample, carry a position encoding or
//! attend, and which norm precedes attention are read from the weights, not
//! from a table per variant: the five MCi variants and any narrower model
//! of the same family (the test fixtures) load alike. What the weights
//! cannot say is the activation after each downsampling's large-kernel
//! convolution, which every MCi variant has (`lkc_use_act`).
//!
//! The convolutions run as candle ops except the depthwise ones (the 3×3
//! and 7×7 spatial mixing of every block), which candle's grouped
//! convolution would split into one convolution per channel: on the CPU they
//! are a direct loop over each output plane ([`depthwise_cpu`]), elsewhere
//! a sum of shifted, scaled copies of the input ([`depthwise_ops`]).

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use rayon::prelude::*;

/// timm's batch norms keep PyTorch's default epsilon (not stored).
const BN_EPS: f64 = 1e-5;
/// timm's FastViT attention: 32 channels per head, whatever the width.
const HEAD_DIM: usize = 32;

/// A convolution with its branches and batch norms folded in: weight `[o,
/// i / groups, k, k]`, bias `[o]`, padding `k / 2` as timm pads these.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
}

fn f32_of(vb: &VarBuilder, name: &str) -> Result<Tensor> {
    vb.get_unchecked_dtype(name, DType::F32)
}

/// A batch norm as a per-channel scale and shift.
fn batch_norm(vb: &VarBuilder) -> Result<(Tensor, Tensor)> {
    let (g, b) = (f32_of(vb, "weight")?, f32_of(vb, "bias")?);
    let (mean, var) = (f32_of(vb, "running_mean")?, f32_of(vb, "running_var")?);
    let scale = (g / (var + BN_EPS)?.sqrt()?)?;
    let shift = (b - (mean * &scale)?)?;
    Ok((scale, shift))
}

/// `w [o, ..]` with output channel `i` scaled by `s[i]`.
fn scale_rows(w: &Tensor, s: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1; w.rank()];
    shape[0] = s.dim(0)?;
    w.broadcast_mul(&s.reshape(shape)?)
}

/// timm's `ConvNormAct` without activation (`conv`, `bn`) as one kernel
/// and bias.
fn conv_bn(vb: &VarBuilder) -> Result<(Tensor, Tensor)> {
    let (scale, shift) = batch_norm(&vb.pp("bn"))?;
    Ok((scale_rows(&f32_of(vb, "conv.weight")?, &scale)?, shift))
}

/// An identity as a `[c, in_per_group, k, k]` kernel (timm's `id_tensor`).
fn identity_kernel(c: usize, in_per_group: usize, k: usize, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; c * in_per_group * k * k];
    for i in 0..c {
        v[((i * in_per_group + i % in_per_group) * k + k / 2) * k + k / 2] = 1.0;
    }
    Tensor::from_vec(v, (c, in_per_group, k, k), dev)
}

/// A smaller kernel centred in a `k × k` one.
fn pad_kernel(w: &Tensor, k: usize) -> Result<Tensor> {
    let p = k.saturating_sub(w.dim(3)?) / 2;
    w.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)
}

fn add(
    (w, b): (Tensor, Tensor),
    acc: Option<(Tensor, Tensor)>,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(Some(match acc {
        None => (w, b),
        Some((aw, ab)) => ((aw + w)?, (ab + b)?),
    }))
}

/// A MobileOne block's convolution (`k × k`, depthwise or dense): its
/// `reparam_conv`, or the sum of its branches (k × k convolutions, the 1×1
/// scale branch, the identity), each with its batch norm folded in.
fn mobileone(vb: &VarBuilder, k: usize, depthwise: bool) -> Result<(Tensor, Tensor)> {
    if vb.contains_tensor("reparam_conv.weight") {
        return Ok((
            f32_of(vb, "reparam_conv.weight")?,
            f32_of(vb, "reparam_conv.bias")?,
        ));
    }
    let mut acc = None;
    let mut i = 0;
    while vb.contains_tensor(&format!("conv_kxk.{i}.conv.weight")) {
        acc = add(conv_bn(&vb.pp(format!("conv_kxk.{i}")))?, acc)?;
        i += 1;
    }
    if vb.contains_tensor("conv_scale.conv.weight") {
        let (w, b) = conv_bn(&vb.pp("conv_scale"))?;
        acc = add((pad_kernel(&w, k)?, b), acc)?;
    }
    if vb.contains_tensor("identity.running_mean") {
        let (scale, shift) = batch_norm(&vb.pp("identity"))?;
        let c = scale.dim(0)?;
        let id = identity_kernel(c, if depthwise { 1 } else { c }, k, scale.device())?;
        acc = add((scale_rows(&id, &scale)?, shift), acc)?;
    }
    acc.ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{}: a MobileOne block with no branch (no conv_kxk, conv_scale, identity or \
             reparam_conv weights)",
            vb.prefix()
        ))
    })
}

impl Conv {
    fn new((weight, bias): (Tensor, Tensor), stride: usize, dtype: DType) -> Result<Self> {
        if weight.rank() != 4 || weight.dim(2)? != weight.dim(3)? || weight.dim(2)? % 2 == 0 {
            candle_core::bail!(
                "a convolution kernel of shape {:?}: square and odd expected",
                weight.dims()
            );
        }
        Ok(Self {
            weight: weight.to_dtype(dtype)?,
            bias: bias.to_dtype(dtype)?,
            stride,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, per_group, k, _) = self.weight.dims4()?;
        let c = x.dim(1)?;
        if per_group == 1 && c > 1 {
            return depthwise(x, &self.weight, &self.bias, self.stride);
        }
        if c % per_group != 0 {
            candle_core::bail!("{c} input channels for a kernel of {per_group} per group");
        }
        let bias = self.bias.reshape((1, o, 1, 1))?;
        if k == 1 && self.stride == 1 && per_group == c {
            // A pointwise convolution is one matmul over the channels.
            let (b, _, h, w) = x.dims4()?;
            let y = self
                .weight
                .reshape((o, c))?
                .broadcast_matmul(&x.reshape((b, c, h * w))?)?;
            return y.reshape((b, o, h, w))?.broadcast_add(&bias);
        }
        if x.device().is_cpu() && x.dtype() != DType::F32 {
            // candle's CPU convolution has no half-precision kernel; the CPU
            // runs half precision only to test the GPU's graphs, whose
            // convolutions accumulate in f32 too.
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let y = f(x)?.conv2d(&f(&self.weight)?, k / 2, self.stride, 1, c / per_group)?;
            return y.to_dtype(x.dtype())?.broadcast_add(&bias);
        }
        x.conv2d(&self.weight, k / 2, self.stride, 1, c / per_group)?
            .broadcast_add(&bias)
    }
}

/// A depthwise convolution (one input channel per group, `o = m · c`
/// outputs, output `j` reading input `j / m`), padded by `k / 2`.
fn depthwise(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        depthwise_cpu(x, w, b, stride)
    } else {
        depthwise_ops(x, w, b, stride)
    }
}

fn out_side(n: usize, k: usize, stride: usize) -> Result<usize> {
    let pad = k / 2;
    if n + 2 * pad < k {
        candle_core::bail!("a {n}-pixel side is too small for a {k}×{k} kernel");
    }
    Ok((n + 2 * pad - k) / stride + 1)
}

/// [`depthwise`] as a direct loop over output planes on the CPU threads.
fn depthwise_cpu(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (w, b) = (w.contiguous()?, b.contiguous()?);
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, k, _) = w.dims4()?;
    if o % c != 0 {
        candle_core::bail!("{o} depthwise outputs for {c} input channels");
    }
    let m = o / c;
    let pad = k / 2;
    let (oh, ow) = (out_side(h, k, stride)?, out_side(wd, k, stride)?);
    let mut out = vec![0f32; n * o * oh * ow];
    crate::cpu_kernels::with_f32s(&x, |xs| {
        crate::cpu_kernels::with_f32s(&w, |ws| {
            crate::cpu_kernels::with_f32s(&b, |bs| {
                out.par_chunks_mut(oh * ow)
                    .enumerate()
                    .for_each(|(plane, dst)| {
                        let (img, oc) = (plane / o, plane % o);
                        let src = &xs[(img * c + oc / m) * h * wd..][..h * wd];
                        let taps = &ws[oc * k * k..][..k * k];
                        dst.fill(bs[oc]);
                        for kx in 0..k {
                            // Output columns whose input column
                            // `ox · stride + kx - pad` lies inside the image.
                            let lo = pad.saturating_sub(kx).div_ceil(stride);
                            let hi = if wd + pad > kx {
                                ((wd - 1 + pad - kx) / stride + 1).min(ow)
                            } else {
                                0
                            };
                            if lo >= hi {
                                continue;
                            }
                            for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                                for ky in 0..k {
                                    let iy = (oy * stride + ky).wrapping_sub(pad);
                                    if iy >= h {
                                        continue;
                                    }
                                    let srow = &src[iy * wd..][..wd];
                                    let t = taps[ky * k + kx];
                                    let first = lo * stride + kx - pad;
                                    if stride == 1 {
                                        for (d, s) in row[lo..hi].iter_mut().zip(&srow[first..]) {
                                            *d += t * s;
                                        }
                                    } else {
                                        for (d, s) in row[lo..hi]
                                            .iter_mut()
                                            .zip(srow[first..].iter().step_by(stride))
                                        {
                                            *d += t * s;
                                        }
                                    }
                                }
                            }
                        }
                    });
                Ok(())
            })
        })
    })?;
    Tensor::from_vec(out, (n, o, oh, ow), x.device())
}

/// [`depthwise`] in candle ops (any device and dtype): the sum over the
/// `k²` taps of the shifted input scaled by that tap's weights, accumulated
/// in f32 as PyTorch's half-precision convolutions accumulate (49 sums
/// rounded to bf16 each lose the vector: cosine 0.82 on the fixtures).
fn depthwise_ops(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize) -> Result<Tensor> {
    let dtype = x.dtype();
    let (x, w, b) = (
        x.to_dtype(DType::F32)?,
        w.to_dtype(DType::F32)?,
        b.to_dtype(DType::F32)?,
    );
    let (x, w, b) = (&x, &w, &b);
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, k, _) = w.dims4()?;
    if o % c != 0 {
        candle_core::bail!("{o} depthwise outputs for {c} input channels");
    }
    let m = o / c;
    let x = if m > 1 {
        let idx: Vec<u32> = (0..o as u32).map(|j| j / m as u32).collect();
        x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 1)?
    } else {
        x.clone()
    };
    let pad = k / 2;
    let (oh, ow) = (out_side(h, k, stride)?, out_side(wd, k, stride)?);
    // Padded so that every tap's window, `stride` times the output, fits.
    let (ph, pw) = ((oh - 1) * stride + k, (ow - 1) * stride + k);
    let xp = x
        .pad_with_zeros(2, pad, (ph + stride).saturating_sub(h + pad))?
        .pad_with_zeros(3, pad, (pw + stride).saturating_sub(wd + pad))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        for kx in 0..k {
            let mut tap = xp.narrow(2, ky, oh * stride)?.narrow(3, kx, ow * stride)?;
            if stride > 1 {
                tap = tap
                    .reshape((n, o, oh, stride, ow, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((n, o, oh, ow))?;
            }
            let t = w
                .narrow(2, ky, 1)?
                .narrow(3, kx, 1)?
                .reshape((1, o, 1, 1))?;
            let term = tap.broadcast_mul(&t)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    match acc {
        Some(a) => a.broadcast_add(&b.reshape((1, o, 1, 1))?)?.to_dtype(dtype),
        None => candle_core::bail!("an empty kernel"),
    }
}

/// The mean of each channel of `[b, c, h, w]`, `[b, c]`, summed in f32.
fn mean_hw(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)?
        .flatten_from(2)?
        .mean(D::Minus1)?
        .to_dtype(x.dtype())
}

/// Squeeze-and-excitation (timm's `SEModule`): channels rescaled by a
/// sigmoid gate computed from their means.
struct SqueezeExcite {
    fc1: Linear,
    fc2: Linear,
}

impl SqueezeExcite {
    fn new(vb: &VarBuilder, dtype: DType) -> Result<Option<Self>> {
        if !vb.contains_tensor("se.fc1.weight") {
            return Ok(None);
        }
        let fc = |name: &str| -> Result<Linear> {
            let w = f32_of(vb, &format!("se.{name}.weight"))?;
            let w = w.flatten_from(1)?.to_dtype(dtype)?;
            let b = f32_of(vb, &format!("se.{name}.bias"))?.to_dtype(dtype)?;
            Ok(Linear::new(w, Some(b)))
        };
        Ok(Some(Self {
            fc1: fc("fc1")?,
            fc2: fc("fc2")?,
        }))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let mean = mean_hw(x)?;
        let gate = self.fc2.forward(&self.fc1.forward(&mean)?.relu()?)?;
        let gate = candle_nn::ops::sigmoid(&gate)?.reshape((b, c, 1, 1))?;
        x.broadcast_mul(&gate)
    }
}

/// A convolution, then squeeze-and-excitation if it has one, then GELU if
/// `act` (MobileOne blocks, the downsampling's large-kernel convolution).
struct ConvAct {
    conv: Conv,
    se: Option<SqueezeExcite>,
    act: bool,
}

impl ConvAct {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.conv.forward(x)?;
        if let Some(se) = &self.se {
            y = se.forward(&y)?;
        }
        if self.act { y.gelu_erf() } else { Ok(y) }
    }
}

/// timm's `ConvMlp`: a 7×7 depthwise convolution (batch norm folded), a
/// pointwise expansion, GELU, a pointwise projection (the block's layer
/// scale folded in).
struct ConvMlp {
    conv: Conv,
    fc1: Conv,
    fc2: Conv,
}

impl ConvMlp {
    fn new(vb: &VarBuilder, layer_scale: Option<Tensor>, dtype: DType) -> Result<Self> {
        let (mut w2, mut b2) = (f32_of(vb, "fc2.weight")?, f32_of(vb, "fc2.bias")?);
        if let Some(g) = layer_scale {
            w2 = scale_rows(&w2, &g)?;
            b2 = (b2 * g)?;
        }
        Ok(Self {
            conv: Conv::new(conv_bn(&vb.pp("conv"))?, 1, dtype)?,
            fc1: Conv::new(
                (f32_of(vb, "fc1.weight")?, f32_of(vb, "fc1.bias")?),
                1,
                dtype,
            )?,
            fc2: Conv::new((w2, b2), 1, dtype)?,
        })
    }

    /// `x + mlp(x)`.
    fn forward_residual(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(&self.conv.forward(x)?)?.gelu_erf()?;
        x + self.fc2.forward(&h)?
    }
}

/// A layer scale (`gamma [c, 1, 1]`) as a `[c]` vector, if the block has one.
fn layer_scale(vb: &VarBuilder, name: &str) -> Result<Option<Tensor>> {
    let key = format!("{name}.gamma");
    if !vb.contains_tensor(&key) {
        return Ok(None);
    }
    f32_of(vb, &key)?.flatten_all().map(Some)
}

/// The norm before attention.
enum AttentionNorm {
    /// A batch norm, folded into the QKV layer.
    Folded,
    /// `LayerNorm2d` (MCi3/MCi4): over the channels of each position.
    Layer(LayerNorm),
}

/// timm's FastViT `AttentionBlock`: `x + proj(attention(norm(x)))`, then
/// `x + mlp(x)`, over the positions of a feature map.
struct AttentionBlock {
    norm: AttentionNorm,
    qkv: Linear,
    proj: Linear,
    heads: usize,
    mlp: ConvMlp,
}

impl AttentionBlock {
    fn new(vb: &VarBuilder, dtype: DType) -> Result<Self> {
        let mixer = vb.pp("token_mixer");
        let mut qkv_w = f32_of(&mixer, "qkv.weight")?;
        let c = qkv_w.dim(1)?;
        if qkv_w.dim(0)? != 3 * c || c % HEAD_DIM != 0 {
            candle_core::bail!(
                "{}: attention over {c} channels with a QKV layer of {:?} (3·{c} rows, \
                 heads of {HEAD_DIM} expected)",
                vb.prefix(),
                qkv_w.dims()
            );
        }
        let mut qkv_b = if mixer.contains_tensor("qkv.bias") {
            f32_of(&mixer, "qkv.bias")?
        } else {
            Tensor::zeros(3 * c, DType::F32, qkv_w.device())?
        };
        let norm = if vb.contains_tensor("norm.running_mean") {
            // qkv(s ⊙ x + t) = (W · diag(s)) x + W t.
            let (s, t) = batch_norm(&vb.pp("norm"))?;
            qkv_b = (qkv_b + qkv_w.matmul(&t.unsqueeze(1)?)?.squeeze(1)?)?;
            qkv_w = qkv_w.broadcast_mul(&s.unsqueeze(0)?)?;
            AttentionNorm::Folded
        } else {
            let w = f32_of(vb, "norm.weight")?.to_dtype(dtype)?;
            let b = f32_of(vb, "norm.bias")?.to_dtype(dtype)?;
            AttentionNorm::Layer(LayerNorm::new(w, b, BN_EPS))
        };
        let (mut proj_w, mut proj_b) =
            (f32_of(&mixer, "proj.weight")?, f32_of(&mixer, "proj.bias")?);
        if let Some(g) = layer_scale(vb, "layer_scale_1")? {
            proj_w = scale_rows(&proj_w, &g)?;
            proj_b = (proj_b * g)?;
        }
        Ok(Self {
            norm,
            qkv: Linear::new(qkv_w.to_dtype(dtype)?, Some(qkv_b.to_dtype(dtype)?)),
            proj: Linear::new(proj_w.to_dtype(dtype)?, Some(proj_b.to_dtype(dtype)?)),
            heads: c / HEAD_DIM,
            mlp: ConvMlp::new(&vb.pp("mlp"), layer_scale(vb, "layer_scale_2")?, dtype)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        let mut t = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        if let AttentionNorm::Layer(ln) = &self.norm {
            t = ln.forward(&t)?;
        }
        let qkv = self
            .qkv
            .forward(&t)?
            .reshape((b, n, 3, self.heads, HEAD_DIM))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)? * (HEAD_DIM as f64).powf(-0.5))?.contiguous()?;
        let (k, v) = (qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let att = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        let y = self
            .proj
            .forward(&y)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        self.mlp.forward_residual(&(x + y)?)
    }
}

/// timm's `RepMixerBlock`: a 3×3 depthwise mixing, `x + γ · (mixer(x) −
/// norm(x))` with the branches folded into one convolution but the identity
/// kept apart, then `x + mlp(x)`.
///
/// Why not the identity in the kernel too, as timm's reparameterisation
/// does: its centre tap is then 1 + γ·(…) with γ a small layer scale, and
/// in bf16 (8 significant bits) the mixing term rounds away (the fixtures'
/// images fell to cosine 0.81 against PyTorch's 0.9987 in bf16). The same
/// holds for the position encoding.
struct RepMixerBlock {
    mixer: Conv,
    mlp: ConvMlp,
}

impl RepMixerBlock {
    fn new(vb: &VarBuilder, dtype: DType) -> Result<Self> {
        let tm = vb.pp("token_mixer");
        let mixer = if tm.contains_tensor("reparam_conv.weight") {
            let w = f32_of(&tm, "reparam_conv.weight")?;
            let id = identity_kernel(w.dim(0)?, 1, w.dim(2)?, w.device())?;
            ((w - id)?, f32_of(&tm, "reparam_conv.bias")?)
        } else {
            let (mw, mb) = mobileone(&tm.pp("mixer"), 3, true)?;
            let (nw, nb) = mobileone(&tm.pp("norm"), 3, true)?;
            let (mut dw, mut db) = ((mw - nw)?, (mb - nb)?);
            if let Some(g) = layer_scale(&tm, "layer_scale")? {
                dw = scale_rows(&dw, &g)?;
                db = (db * g)?;
            }
            (dw, db)
        };
        Ok(Self {
            mixer: Conv::new(mixer, 1, dtype)?,
            mlp: ConvMlp::new(&vb.pp("mlp"), layer_scale(vb, "layer_scale")?, dtype)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.mlp.forward_residual(&(x + self.mixer.forward(x)?)?)
    }
}

enum Block {
    RepMixer(RepMixerBlock),
    Attention(AttentionBlock),
}

/// One stage: an optional downsampling (`PatchEmbed`: a large-kernel
/// convolution with activation, then a pointwise MobileOne block), an
/// optional conditional position encoding (`RepCPE`, a 7×7 depthwise
/// convolution plus its input, folded), and its blocks.
struct Stage {
    downsample: Vec<ConvAct>,
    pos_emb: Option<Conv>,
    blocks: Vec<Block>,
}

impl Stage {
    fn new(vb: &VarBuilder, dtype: DType) -> Result<Self> {
        let mut downsample = Vec::new();
        let ds = vb.pp("downsample.proj");
        let large = ds.pp("0");
        if large.contains_tensor("reparam_conv.weight")
            || large.contains_tensor("large_conv.conv.weight")
        {
            let folded = if large.contains_tensor("reparam_conv.weight") {
                (
                    f32_of(&large, "reparam_conv.weight")?,
                    f32_of(&large, "reparam_conv.bias")?,
                )
            } else {
                let (w, b) = conv_bn(&large.pp("large_conv"))?;
                let k = w.dim(3)?;
                match large.contains_tensor("small_conv.conv.weight") {
                    true => {
                        let (sw, sb) = conv_bn(&large.pp("small_conv"))?;
                        ((w + pad_kernel(&sw, k)?)?, (b + sb)?)
                    }
                    false => (w, b),
                }
            };
            downsample.push(ConvAct {
                conv: Conv::new(folded, 2, dtype)?,
                se: SqueezeExcite::new(&large, dtype)?,
                // `lkc_use_act`: every MCi variant has it.
                act: true,
            });
            let point = ds.pp("1");
            downsample.push(ConvAct {
                conv: Conv::new(mobileone(&point, 1, false)?, 1, dtype)?,
                se: SqueezeExcite::new(&point, dtype)?,
                act: true,
            });
        }
        let pe = vb.pp("pos_emb");
        // `x + pos_enc(x)`, the identity kept apart (see RepMixerBlock).
        let pos_emb = if pe.contains_tensor("reparam_conv.weight") {
            let w = f32_of(&pe, "reparam_conv.weight")?;
            let id = identity_kernel(w.dim(0)?, w.dim(1)?, w.dim(2)?, w.device())?;
            Some(Conv::new(
                ((w - id)?, f32_of(&pe, "reparam_conv.bias")?),
                1,
                dtype,
            )?)
        } else if pe.contains_tensor("pos_enc.weight") {
            Some(Conv::new(
                (f32_of(&pe, "pos_enc.weight")?, f32_of(&pe, "pos_enc.bias")?),
                1,
                dtype,
            )?)
        } else {
            None
        };
        let mut blocks = Vec::new();
        loop {
            let b = vb.pp(format!("blocks.{}", blocks.len()));
            if b.contains_tensor("token_mixer.qkv.weight") {
                blocks.push(Block::Attention(AttentionBlock::new(&b, dtype)?));
            } else if b.contains_tensor("mlp.fc1.weight") {
                blocks.push(Block::RepMixer(RepMixerBlock::new(&b, dtype)?));
            } else {
                break;
            }
        }
        Ok(Self {
            downsample,
            pos_emb,
            blocks,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for d in &self.downsample {
            x = d.forward(&x)?;
        }
        if let Some(pe) = &self.pos_emb {
            x = (&x + pe.forward(&x)?)?;
        }
        for b in &self.blocks {
            x = match b {
                Block::RepMixer(r) => r.forward(&x)?,
                Block::Attention(a) => a.forward(&x)?,
            };
        }
        Ok(x)
    }
}

/// The whole trunk: stem, stages, the final SE convolution, average
/// pooling and the linear head into the joint space.
pub(crate) struct FastVit {
    stem: Vec<ConvAct>,
    stages: Vec<Stage>,
    final_conv: ConvAct,
    head: Linear,
}

impl FastVit {
    /// Loads the trunk under `vb` (`visual.trunk`) as timm variant `name`,
    /// its head projecting to `embed_dim`.
    pub(crate) fn new(name: &str, embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        if !name.starts_with("fastvit_mci") {
            candle_core::bail!("timm model `{name}` is not a FastViT MCi tower");
        }
        let dtype = vb.dtype();
        let stem = [(3, 2, false), (3, 2, true), (1, 1, false)]
            .iter()
            .enumerate()
            .map(|(i, &(k, stride, depthwise))| {
                let b = vb.pp(format!("stem.{i}"));
                Ok(ConvAct {
                    conv: Conv::new(mobileone(&b, k, depthwise)?, stride, dtype)?,
                    se: SqueezeExcite::new(&b, dtype)?,
                    act: true,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut stages = Vec::new();
        while vb.contains_tensor(&format!("stages.{}.blocks.0.mlp.fc1.weight", stages.len())) {
            stages.push(Stage::new(
                &vb.pp(format!("stages.{}", stages.len())),
                dtype,
            )?);
        }
        if stages.is_empty() {
            candle_core::bail!(
                "{}: no FastViT stages (`stages.0.blocks.0.*`) in the weights",
                vb.prefix()
            );
        }
        let fc = vb.pp("final_conv");
        let final_conv = ConvAct {
            conv: Conv::new(mobileone(&fc, 3, true)?, 1, dtype)?,
            se: SqueezeExcite::new(&fc, dtype)?,
            act: true,
        };
        let head_w = f32_of(&vb, "head.fc.weight")?;
        if head_w.dim(0)? != embed_dim {
            candle_core::bail!(
                "the image head projects to {} dimensions, the config's embed_dim is {embed_dim}",
                head_w.dim(0)?
            );
        }
        let head = Linear::new(
            head_w.to_dtype(dtype)?,
            Some(f32_of(&vb, "head.fc.bias")?.to_dtype(dtype)?),
        );
        Ok(Self {
            stem,
            stages,
            final_conv,
            head,
        })
    }

    /// `[b, 3, s, s]` pixels to `[b, embed_dim]` (not normalised).
    pub(crate) fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = pixels.clone();
        for s in &self.stem {
            x = s.forward(&x)?;
        }
        for s in &self.stages {
            x = s.forward(&x)?;
        }
        let x = self.final_conv.forward(&x)?;
        let pooled = mean_hw(&x)?;
        self.head.forward(&pooled)
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

    /// The CPU loop and the candle-op sum against candle's own grouped
    /// convolution, for the shapes FastViT uses: 3×3 and 7×7, stride 1 and
    /// 2, one or two outputs per input channel, odd and even sides.
    #[test]
    fn depthwise_paths_match_candles_grouped_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (c, m, k, stride, h, w) in [
            (4, 1, 3, 1, 9, 7),
            (4, 2, 7, 2, 16, 16),
            (3, 1, 7, 1, 5, 6),
            (2, 2, 3, 2, 7, 9),
            (5, 1, 7, 2, 3, 4),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (c * m, 1, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, c * m, &dev)?;
            let want = x
                .conv2d(&wt, k / 2, stride, 1, c)?
                .broadcast_add(&b.reshape((1, c * m, 1, 1))?)?;
            let cpu = depthwise_cpu(&x, &wt, &b, stride)?;
            let ops = depthwise_ops(&x, &wt, &b, stride)?;
            assert_eq!(cpu.dims(), want.dims(), "{c} {m} {k} {stride} {h} {w}");
            assert_eq!(ops.dims(), want.dims(), "{c} {m} {k} {stride} {h} {w}");
            assert!(
                max_diff(&cpu, &want) < 1e-4,
                "cpu {c} {m} {k} {stride} {h} {w}"
            );
            assert!(
                max_diff(&ops, &want) < 1e-4,
                "ops {c} {m} {k} {stride} {h} {w}"
            );
        }
        Ok(())
    }

    /// An identity branch folds to the kernel that copies its input.
    #[test]
    fn identity_kernels_copy_their_input() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 5, 5), &dev)?;
        for (per_group, groups) in [(1, 4), (4, 1)] {
            let id = identity_kernel(4, per_group, 3, &dev)?;
            let y = x.conv2d(&id, 1, 1, 1, groups)?;
            assert!(max_diff(&x, &y) == 0.0);
        }
        Ok(())
    }
}
