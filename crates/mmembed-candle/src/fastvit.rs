//! MobileCLIP's image tower: timm's FastViT MCi (`fastvit_mci0` …
//! `fastvit_mci4`), as open_clip's `TimmModel` wraps it (`visual.trunk.*`).
//!
//! The checkpoints hold the training-time form: every MobileOne block is a
//! sum of branches (k×k and 1×1 convolutions, an identity, each with a batch
//! norm), RepMixer subtracts one such block from another under a layer scale,
//! and the conditional position encoding adds its input back. Each of those
//! is one convolution at inference (RepVGG's reparameterisation, what timm's
//! `reparameterize_model` does), so the loader folds them, in f32, into one
//! kernel and bias each (RepMixer's and the position encoding's identity
//! kept apart, see [`RepMixerBlock`]), and also reads checkpoints already
//! folded (`reparam_conv`). Batch norms before attention fold into the QKV
//! layer, layer scales into the layer before them.
//!
//! Depths, widths, which stages downsample, carry a position encoding or
//! attend, and which norm precedes attention are read from the weights, not
//! from a table per variant: the five MCi variants and any narrower model
//! of the same family (the test fixtures) load alike. What the weights
//! cannot say is the activation after each downsampling's large-kernel
//! convolution, which every MCi variant has (`lkc_use_act`).
//!
//! Feature maps are channels-last (`[b, h, w, c]`) from the stem on, so
//! that the pointwise convolutions (three quarters of the multiply-adds)
//! are the text tower's linear layers over rows of pixels: our packed CPU
//! kernels with GELU and the residual in their epilogue, cuBLAS on CUDA;
//! attention reads the map as tokens without a transpose, and the layer
//! norms run over the last dimension. The depthwise convolutions (the 3×3
//! and 7×7 spatial mixing of every block), which candle's grouped
//! convolution would split into one convolution per channel, are a loop
//! vectorised over channels on the CPU ([`depthwise_cpu`]) and a sum of
//! shifted, scaled copies of the input elsewhere ([`depthwise_ops`]). The
//! stem's first convolution (3 input channels) is a linear layer over each
//! pixel's patch on the CPU ([`patches`]), candle's convolution elsewhere.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use rayon::prelude::*;

use crate::config::Activation;
use crate::cpu_kernels::{self, Epilogue, Visible};
use crate::model::{Dense, Input, Kernels, Norm, activate, softmax};
use crate::packed;
use crate::tiled::TiledLinear;

/// Images the CPU runs through the tower at once (see [`FastVit::forward`]).
const CPU_CHUNK: usize = 8;

/// timm's batch norms keep PyTorch's default epsilon (not stored).
const BN_EPS: f64 = 1e-5;
/// timm's FastViT attention: 32 channels per head, whatever the width.
const HEAD_DIM: usize = 32;

pub(crate) fn f32_of(vb: &VarBuilder, name: &str) -> Result<Tensor> {
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
pub(crate) fn conv_bn(vb: &VarBuilder) -> Result<(Tensor, Tensor)> {
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

/// The block's kernel and bias as inference exports hold them (timm's
/// `reparameterize_model`: one `reparam_conv`), if it has them.
fn reparameterized(vb: &VarBuilder) -> Result<Option<(Tensor, Tensor)>> {
    if !vb.contains_tensor("reparam_conv.weight") {
        return Ok(None);
    }
    Ok(Some((
        f32_of(vb, "reparam_conv.weight")?,
        f32_of(vb, "reparam_conv.bias")?,
    )))
}

/// A folded kernel less the identity it includes (RepMixer, RepCPE: kept
/// apart, see [`RepMixerBlock`]).
fn minus_identity((w, b): (Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
    let id = identity_kernel(w.dim(0)?, w.dim(1)?, w.dim(2)?, w.device())?;
    Ok(((w - id)?, b))
}

/// A MobileOne block's convolution (`k × k`, depthwise or dense): its
/// `reparam_conv`, or the sum of its branches (k × k convolutions, the 1×1
/// scale branch, the identity), each with its batch norm folded in.
fn mobileone(vb: &VarBuilder, k: usize, depthwise: bool) -> Result<(Tensor, Tensor)> {
    if let Some(folded) = reparameterized(vb)? {
        return Ok(folded);
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

/// A folded convolution (`[o, i / groups, k, k]` kernel, `[o]` bias) in the
/// form channels-last inference runs it.
enum Conv {
    /// A depthwise convolution, `o = m · c`: taps `[k · k, o]`.
    Depthwise {
        taps: Tensor,
        bias: Tensor,
        k: usize,
        stride: usize,
    },
    /// A 1×1 convolution: a linear layer over each pixel's channels.
    Pointwise(Dense),
    /// Any other (the stem's first): candle's, channels-first; on the CPU
    /// with our kernels, `rows`, the same convolution as a linear layer
    /// over each output pixel's patch ([`patches`]).
    Dense {
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        rows: Option<Dense>,
    },
}

impl Conv {
    fn new(
        (weight, bias): (Tensor, Tensor),
        stride: usize,
        kernels: Kernels,
        dtype: DType,
    ) -> Result<Self> {
        let (o, per_group, k, k2) = weight.dims4()?;
        if k != k2 || k % 2 == 0 {
            candle_core::bail!(
                "a convolution kernel of shape {:?}: square and odd expected",
                weight.dims()
            );
        }
        if per_group == 1 && o > 1 {
            return Ok(Self::Depthwise {
                taps: weight
                    .reshape((o, k * k))?
                    .t()?
                    .contiguous()?
                    .to_dtype(dtype)?,
                bias: bias.to_dtype(dtype)?,
                k,
                stride,
            });
        }
        if k == 1 && stride == 1 {
            let linear = Linear::new(
                weight.reshape((o, per_group))?.to_dtype(dtype)?,
                Some(bias.to_dtype(dtype)?),
            );
            return Ok(Self::Pointwise(Dense::from_linear(
                linear,
                kernels,
                Input::Narrow,
            )?));
        }
        // Why not candle's convolution on the CPU: in and out of
        // channels-first around it, then the bias and GELU as passes of
        // their own, the stem's first layer (0.6 % of the multiply-adds)
        // took 7-8 % of MobileCLIP-S1's forward.
        let rows = if matches!(kernels, Kernels::Fused | Kernels::Int8) {
            let w = weight
                .permute((0, 2, 3, 1))?
                .reshape((o, k * k * per_group))?;
            let linear = Linear::new(w.to_dtype(dtype)?, Some(bias.to_dtype(dtype)?));
            Some(Dense::from_linear(linear, kernels, Input::Narrow)?)
        } else {
            None
        };
        Ok(Self::Dense {
            weight: weight.to_dtype(dtype)?,
            bias: bias.to_dtype(dtype)?,
            stride,
            rows,
        })
    }

    /// `act(conv(x)) + residual` over a channels-last map.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
        let y = match self {
            Self::Depthwise {
                taps,
                bias,
                k,
                stride,
            } => return depthwise(x, taps, bias, (*k, *stride), gelu, residual),
            Self::Pointwise(dense) => {
                let (b, h, w, _) = x.dims4()?;
                let rows = |t: &Tensor| t.reshape((b, h * w, t.dim(3)?));
                let residual = residual.map(rows).transpose()?;
                let epilogue = if gelu {
                    Epilogue::GeluErf
                } else {
                    Epilogue::None
                };
                let y = dense.forward_fused(&rows(x)?, residual.as_ref(), epilogue)?;
                return y.reshape((b, h, w, y.dim(2)?));
            }
            Self::Dense {
                weight,
                stride,
                rows: Some(rows),
                ..
            } if cpu_kernels::supported(x) && weight.dim(1)? == x.dim(3)? => {
                let (b, k, o) = (x.dim(0)?, weight.dim(2)?, weight.dim(0)?);
                let (p, (oh, ow)) = patches(x, k, *stride)?;
                let epilogue = if gelu {
                    Epilogue::GeluErf
                } else {
                    Epilogue::None
                };
                rows.forward_fused(&p, None, epilogue)?
                    .reshape((b, oh, ow, o))?
            }
            Self::Dense {
                weight,
                bias,
                stride,
                ..
            } => {
                let k = weight.dim(2)?;
                let o = weight.dim(0)?;
                let nchw = x.permute((0, 3, 1, 2))?;
                let y = if x.device().is_cpu() && x.dtype() != DType::F32 {
                    // candle's CPU convolution has no half-precision
                    // kernel; the CPU runs half precision only to test the
                    // GPU's graphs, whose convolutions accumulate in f32.
                    let f = |t: &Tensor| t.to_dtype(DType::F32);
                    f(&nchw)?
                        .conv2d(&f(weight)?, k / 2, *stride, 1, 1)?
                        .to_dtype(x.dtype())?
                } else {
                    nchw.contiguous()?.conv2d(weight, k / 2, *stride, 1, 1)?
                };
                let y = y
                    .permute((0, 2, 3, 1))?
                    .broadcast_add(&bias.reshape((1, 1, 1, o))?)?;
                if gelu { gelu_of(&y)? } else { y }
            }
        };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

/// Exact GELU: ours (vectorised) on host f32 tensors, candle's elsewhere.
fn gelu_of(x: &Tensor) -> Result<Tensor> {
    if cpu_kernels::supported(x) {
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        v.par_chunks_mut(1 << 14)
            .for_each(|c| cpu_kernels::act_in_place(Epilogue::GeluErf, c));
        return Tensor::from_vec(v, x.shape(), x.device());
    }
    activate(Activation::Gelu, Kernels::Portable, x)
}

/// A depthwise convolution over a channels-last map: output channel `j`
/// reads input channel `j / m` (`o = m · c`), padded by `k / 2`; GELU
/// after it if `gelu`, then `residual` added.
fn depthwise(
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    (k, stride): (usize, usize),
    gelu: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if cpu_kernels::supported(x) && residual.is_none_or(cpu_kernels::supported) {
        return depthwise_cpu(x, taps, bias, (k, stride), gelu, residual);
    }
    let y = depthwise_ops(x, taps, bias, k, stride)?;
    let y = if gelu { gelu_of(&y)? } else { y };
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

fn out_side(n: usize, k: usize, stride: usize) -> Result<usize> {
    let pad = k / 2;
    if n + 2 * pad < k {
        candle_core::bail!("a {n}-pixel side is too small for a {k}×{k} kernel");
    }
    Ok((n + 2 * pad - k) / stride + 1)
}

/// The `k × k` patches of a channels-last map `x [b, h, w, c]` (padded by
/// `k / 2` with zeros, `stride` apart), one row per output pixel in
/// `(ky, kx, c)` order: `[b, oh · ow, k · k · c]`, and `(oh, ow)`. A
/// convolution is then a linear layer over these rows, its kernel permuted
/// to `[o, k, k, c]`.
fn patches(x: &Tensor, k: usize, stride: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let (oh, ow) = (out_side(h, k, stride)?, out_side(w, k, stride)?);
    let x = x.contiguous()?;
    let (kkc, pad) = (k * k * c, k / 2);
    // Zeros: the padding is whatever no copy below writes.
    let mut out = vec![0f32; b * oh * ow * kkc];
    cpu_kernels::with_f32s(&x, |xs| {
        out.par_chunks_mut(ow * kkc)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, oy) = (row / oh, row % oh);
                let src = &xs[img * h * w * c..][..h * w * c];
                for (ox, patch) in dst.chunks_exact_mut(kkc).enumerate() {
                    for ky in 0..k {
                        let Some(iy) = (oy * stride + ky).checked_sub(pad).filter(|&y| y < h)
                        else {
                            continue;
                        };
                        for kx in 0..k {
                            let Some(ix) = (ox * stride + kx).checked_sub(pad).filter(|&x| x < w)
                            else {
                                continue;
                            };
                            patch[(ky * k + kx) * c..][..c]
                                .copy_from_slice(&src[(iy * w + ix) * c..][..c]);
                        }
                    }
                }
            });
        Ok(())
    })?;
    Ok((
        Tensor::from_vec(out, (b, oh * ow, kkc), x.device())?,
        (oh, ow),
    ))
}

/// `x [b, h, w, c]` with each channel repeated `m` times in place (`[b, h,
/// w, m · c]`, channel `j` = input `j / m`).
fn repeat_channels(x: &Tensor, m: usize) -> Result<Tensor> {
    if m == 1 {
        return Ok(x.clone());
    }
    let c = x.dim(3)?;
    let idx: Vec<u32> = (0..(m * c) as u32).map(|j| j / m as u32).collect();
    x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 3)
}

/// Channels [`depthwise_cpu`] accumulates at once: eight AVX2 registers.
const LANES: usize = 64;

/// Where one output row of a depthwise convolution reads.
#[derive(Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    /// Output channels.
    o: usize,
    /// Outputs per input channel (1 or 2): output channel `j` reads input
    /// channel `j / m` of the image's `o / m`.
    m: usize,
    k: usize,
    stride: usize,
    /// The output row.
    oy: usize,
}

/// What a depthwise row reads: the image `src [h, w, o]`, the taps `ts [k ·
/// k, o]`, the bias `bs [o]` and, if given, the row's residual `res` (shaped
/// like the row).
#[derive(Clone, Copy)]
struct Inputs<'a> {
    src: &'a [f32],
    ts: &'a [f32],
    bs: &'a [f32],
    res: Option<&'a [f32]>,
}

/// One output row `dst [ow · o]` of a depthwise convolution ([`Inputs`]).
#[inline(always)]
fn depthwise_row<const FMA: bool>(g: Geometry, inp: Inputs, dst: &mut [f32]) {
    match g.m {
        1 => depthwise_row_m::<FMA, 1>(g, inp, dst),
        _ => depthwise_row_m::<FMA, 2>(g, inp, dst),
    }
}

/// [`depthwise_row`] with `M` outputs per input channel.
#[inline(always)]
fn depthwise_row_m<const FMA: bool, const M: usize>(g: Geometry, inp: Inputs, dst: &mut [f32]) {
    let Geometry {
        h,
        w,
        o,
        m,
        k,
        stride,
        oy,
    } = g;
    debug_assert_eq!(m, M);
    let c = o / M;
    let Inputs { src, ts, bs, res } = inp;
    let pad = k / 2;
    let inside = |t: usize, n: usize, i: usize| (i * stride + t).wrapping_sub(pad) < n;
    let madd = |acc: f32, s: f32, t: f32| if FMA { s.mul_add(t, acc) } else { acc + s * t };
    for (ox, px) in dst.chunks_exact_mut(o).enumerate() {
        // The residual starts the sum (added while the pixel is in
        // registers: a pass over the map fewer per RepMixer block and
        // position encoding).
        let start = |c0: usize, j: usize| bs[c0 + j] + res.map_or(0.0, |r| r[ox * o + c0 + j]);
        // The taps this pixel reads (those inside the image).
        let read = |ky: usize, kx: usize| {
            let (iy, ix) = (oy * stride + ky - pad, ox * stride + kx - pad);
            (
                &src[(iy * w + ix) * c..][..c],
                &ts[(ky * k + kx) * o..][..o],
            )
        };
        // Channels in blocks held in registers across every tap: one
        // store per block, not one per tap.
        let mut c0 = 0;
        while c0 + LANES <= o {
            let mut acc: [f32; LANES] = std::array::from_fn(|j| start(c0, j));
            for ky in (0..k).filter(|&ky| inside(ky, h, oy)) {
                for kx in (0..k).filter(|&kx| inside(kx, w, ox)) {
                    let (s, t) = read(ky, kx);
                    // Input channel `(c0 + j) / M` for output `c0 + j`
                    // (LANES is a multiple of M).
                    let s = &s[c0 / M..(c0 + LANES) / M];
                    let t: &[f32; LANES] = t[c0..c0 + LANES].try_into().unwrap_or(&[0.0; LANES]);
                    for j in 0..LANES {
                        acc[j] = madd(acc[j], s[j / M], t[j]);
                    }
                }
            }
            px[c0..c0 + LANES].copy_from_slice(&acc);
            c0 += LANES;
        }
        if c0 < o {
            for (j, d) in px[c0..].iter_mut().enumerate() {
                *d = start(c0, j);
            }
            for ky in (0..k).filter(|&ky| inside(ky, h, oy)) {
                for kx in (0..k).filter(|&kx| inside(kx, w, ox)) {
                    let (s, t) = read(ky, kx);
                    for (j, (d, t)) in px[c0..].iter_mut().zip(&t[c0..]).enumerate() {
                        *d = madd(*d, s[(c0 + j) / M], *t);
                    }
                }
            }
        }
    }
}

/// [`depthwise_row_avx512`] on 8-lane registers, for CPUs with AVX2 but
/// not AVX-512: pixels in blocks of `P` × 16 channels (two registers each;
/// `P = 6` with one output per input channel, 4 with two, whose spread
/// input takes two registers more: AVX2 has sixteen), each tap's weights
/// loaded once for the block. The one-pixel loop it replaces held 64
/// channels of one pixel and loaded the taps for every pixel: 16.5 % of
/// MobileCLIP-S1's forward at 8 images on the AVX2 kernels, now 9.2 %.
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_row_avx2(g: Geometry, inp: Inputs, dst: &mut [f32]) {
    let len = dst.len();
    let blocked = depthwise_blocks(g, inp, len, ((6, 4), 16), |inner, kys, at| {
        // SAFETY: per `depthwise_block_avx2`'s contract, which
        // `depthwise_blocks` establishes.
        unsafe {
            match (inner, g.m) {
                (true, 1) => depthwise_block_avx2::<false, 1, 6>(g, inp, dst, kys, at),
                (false, 1) => depthwise_block_avx2::<true, 1, 6>(g, inp, dst, kys, at),
                (true, _) => depthwise_block_avx2::<false, 2, 4>(g, inp, dst, kys, at),
                (false, _) => depthwise_block_avx2::<true, 2, 4>(g, inp, dst, kys, at),
            }
        }
    });
    if !blocked {
        depthwise_row::<true>(g, inp, dst)
    }
}

/// Walks one depthwise output row of `len` floats in blocks for the
/// blocked loops ([`depthwise_row_avx2`], [`depthwise_row_avx512`]):
/// `f(inner, kys, (ox0, pixels, c0))` for each block of `px.0` pixels
/// (`px.1` with two outputs per input channel) × `ch` channels, `kys` the
/// kernel rows inside the image and `inner` when every tap of every pixel
/// lies inside the row. `false`, calling nothing, where the blocks do not
/// apply: strides other than 1 and 2, other output multiples, channels not
/// a multiple of `ch`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn depthwise_blocks(
    g: Geometry,
    inp: Inputs,
    len: usize,
    ((px1, px2), ch): ((usize, usize), usize),
    mut f: impl FnMut(bool, std::ops::Range<usize>, (usize, usize, usize)),
) -> bool {
    let Geometry {
        h,
        w,
        o,
        m,
        k,
        stride,
        oy,
    } = g;
    let Inputs { src, ts, bs, res } = inp;
    if !matches!(stride, 1 | 2) || !matches!(m, 1 | 2) || o % ch != 0 {
        return false;
    }
    let ow = len / o;
    let pad = k / 2;
    // The kernel rows inside the image: `oy · stride + ky - pad` in `0..h`.
    let top = oy * stride;
    let kys = pad.saturating_sub(top)..k.min((h + pad).saturating_sub(top));
    assert!(src.len() >= h * w * o / m && ts.len() >= k * k * o && bs.len() >= o);
    assert!(res.is_none_or(|r| r.len() >= len));
    let block = if m == 1 { px1 } else { px2 };
    for ox0 in (0..ow).step_by(block) {
        let pixels = block.min(ow - ox0);
        // Every tap of every pixel inside the row: no checks.
        let inner =
            pixels == block && ox0 * stride >= pad && (ox0 + block - 1) * stride + k - pad <= w;
        for c0 in (0..o).step_by(ch) {
            f(inner, kys.clone(), (ox0, pixels, c0));
        }
    }
    true
}

/// Pixels `ox0 .. ox0 + pixels` (at most `P`) × channels `c0 .. c0 + 16`
/// of [`depthwise_row_avx2`]'s row: [`depthwise_block`] on 8-lane
/// registers.
///
/// # Safety
/// AVX2 and FMA must be available; otherwise as [`depthwise_block`], with
/// `c0 + 16 <= o` and `pixels <= P`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_block_avx2<const CHECK: bool, const M: usize, const P: usize>(
    g: Geometry,
    inp: Inputs,
    dst: &mut [f32],
    kys: std::ops::Range<usize>,
    (ox0, pixels, c0): (usize, usize, usize),
) {
    use std::arch::x86_64::*;
    let Geometry {
        w,
        o,
        k,
        stride,
        oy,
        ..
    } = g;
    let Inputs { src, ts, bs, res } = inp;
    let (pad, c) = (k / 2, o / M);
    // SAFETY (all loads and stores): inside the slices per the contract.
    unsafe {
        // With two outputs per input channel, output channels c0 .. c0 + 16
        // read input channels c0 / 2 .. c0 / 2 + 8, each twice in a row.
        let spread = (
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
        );
        let mut acc: [[__m256; 2]; P] = std::array::from_fn(|p| {
            std::array::from_fn(|half| {
                let c = c0 + 8 * half;
                let b = _mm256_loadu_ps(bs.as_ptr().add(c));
                match res {
                    Some(r) if p < pixels => {
                        _mm256_add_ps(b, _mm256_loadu_ps(r.as_ptr().add((ox0 + p) * o + c)))
                    }
                    _ => b,
                }
            })
        });
        for ky in kys {
            let row = src.as_ptr().add((oy * stride + ky - pad) * w * c);
            for kx in 0..k {
                let t = ts.as_ptr().add((ky * k + kx) * o + c0);
                let (t0, t1) = (_mm256_loadu_ps(t), _mm256_loadu_ps(t.add(8)));
                for (p, acc) in acc.iter_mut().enumerate() {
                    // The tap's column, wrapping below zero.
                    let ix = ((ox0 + p) * stride + kx).wrapping_sub(pad);
                    if CHECK && (p >= pixels || ix >= w) {
                        continue;
                    }
                    let sp = row.add(ix * c + c0 / M);
                    let (s0, s1) = if M == 1 {
                        (_mm256_loadu_ps(sp), _mm256_loadu_ps(sp.add(8)))
                    } else {
                        let s = _mm256_loadu_ps(sp);
                        (
                            _mm256_permutevar8x32_ps(s, spread.0),
                            _mm256_permutevar8x32_ps(s, spread.1),
                        )
                    };
                    acc[0] = _mm256_fmadd_ps(s0, t0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(s1, t1, acc[1]);
                }
            }
        }
        for (p, acc) in acc.iter().enumerate().take(pixels) {
            let d = dst.as_mut_ptr().add((ox0 + p) * o + c0);
            _mm256_storeu_ps(d, acc[0]);
            _mm256_storeu_ps(d.add(8), acc[1]);
        }
    }
}

/// Output pixels [`depthwise_row_avx512`] computes at once.
#[cfg(target_arch = "x86_64")]
const DW_PIXELS: usize = 8;

/// The portable loop ([`depthwise_row`]) for strides 1 and 2, one or two outputs per
/// input channel and whole 32-channel blocks: the row in blocks of
/// [`DW_PIXELS`] pixels × 32 channels held in sixteen registers, so each
/// tap's weights are loaded once for eight pixels (18 loads for 16 FMAs,
/// where one pixel at a time takes two loads per FMA). Blocks with a pixel
/// near the left or right edge check each tap's column; the others do not.
/// The downsampling's widening 7×7 convolutions (stride 2, two outputs per
/// input channel) ran at 4 GFLOP/s on two cores through a copy with the
/// channels repeated and the portable loop; here, about 90 (8 images of
/// MobileCLIP-S1: 45 → 2.0 ms for the three).
///
/// Tried and not kept: sliding along the row, a kernel row's taps held
/// in registers and each input pixel loaded once for every output it
/// reaches (21 loads for 56 FMAs at 7×7): no faster (8.5 → 8.3 % of
/// MobileCLIP-S1's profile, the same images/s): the loop waits on the rows
/// it reads from L2 more than on its loads.
///
/// # Safety
/// AVX2, FMA and AVX-512 F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn depthwise_row_avx512(g: Geometry, inp: Inputs, dst: &mut [f32]) {
    let len = dst.len();
    let px = (DW_PIXELS, DW_PIXELS);
    let blocked = depthwise_blocks(g, inp, len, (px, 32), |inner, kys, at| {
        // SAFETY: per `depthwise_block`'s contract, which
        // `depthwise_blocks` establishes.
        unsafe {
            match (inner, g.m) {
                (true, 1) => depthwise_block::<false, 1>(g, inp, dst, kys, at),
                (false, 1) => depthwise_block::<true, 1>(g, inp, dst, kys, at),
                (true, _) => depthwise_block::<false, 2>(g, inp, dst, kys, at),
                (false, _) => depthwise_block::<true, 2>(g, inp, dst, kys, at),
            }
        }
    });
    if !blocked {
        depthwise_row::<true>(g, inp, dst)
    }
}

/// Pixels `ox0 .. ox0 + pixels` (at most [`DW_PIXELS`]) × channels `c0 ..
/// c0 + 32` of [`depthwise_row_avx512`]'s row, over the taps of rows `kys`;
/// with `CHECK`, taps whose column falls outside are skipped.
///
/// # Safety
/// AVX-512 F must be available; `M == g.m`; the slices hold the image,
/// taps, bias, residual and row ([`Geometry`]); `c0 + 32 <= o`; `ox0 +
/// pixels` at most the output row's width; `kys` only rows inside the
/// image; without `CHECK`, every tap column of the pixels is inside the
/// row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn depthwise_block<const CHECK: bool, const M: usize>(
    g: Geometry,
    inp: Inputs,
    dst: &mut [f32],
    kys: std::ops::Range<usize>,
    (ox0, pixels, c0): (usize, usize, usize),
) {
    use std::arch::x86_64::*;
    let Geometry {
        w,
        o,
        k,
        stride,
        oy,
        ..
    } = g;
    let Inputs { src, ts, bs, res } = inp;
    let (pad, c) = (k / 2, o / M);
    // SAFETY (all loads and stores): inside the slices per the contract.
    unsafe {
        // With two outputs per input channel, output channels c0 .. c0 + 32
        // read input channels c0 / 2 .. c0 / 2 + 16, each twice in a row.
        let spread = (
            _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
            _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15),
        );
        let mut acc: [[__m512; 2]; DW_PIXELS] = std::array::from_fn(|p| {
            std::array::from_fn(|half| {
                let c = c0 + 16 * half;
                let b = _mm512_loadu_ps(bs.as_ptr().add(c));
                match res {
                    Some(r) if p < pixels => {
                        _mm512_add_ps(b, _mm512_loadu_ps(r.as_ptr().add((ox0 + p) * o + c)))
                    }
                    _ => b,
                }
            })
        });
        for ky in kys {
            let row = src.as_ptr().add((oy * stride + ky - pad) * w * c);
            for kx in 0..k {
                let t = ts.as_ptr().add((ky * k + kx) * o + c0);
                let (t0, t1) = (_mm512_loadu_ps(t), _mm512_loadu_ps(t.add(16)));
                for (p, acc) in acc.iter_mut().enumerate() {
                    // The tap's column, wrapping below zero.
                    let ix = ((ox0 + p) * stride + kx).wrapping_sub(pad);
                    if CHECK && (p >= pixels || ix >= w) {
                        continue;
                    }
                    let sp = row.add(ix * c + c0 / M);
                    let (s0, s1) = if M == 1 {
                        (_mm512_loadu_ps(sp), _mm512_loadu_ps(sp.add(16)))
                    } else {
                        let s = _mm512_loadu_ps(sp);
                        (
                            _mm512_permutexvar_ps(spread.0, s),
                            _mm512_permutexvar_ps(spread.1, s),
                        )
                    };
                    acc[0] = _mm512_fmadd_ps(s0, t0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(s1, t1, acc[1]);
                }
            }
        }
        for (p, acc) in acc.iter().enumerate().take(pixels) {
            let d = dst.as_mut_ptr().add((ox0 + p) * o + c0);
            _mm512_storeu_ps(d, acc[0]);
            _mm512_storeu_ps(d.add(16), acc[1]);
        }
    }
}

/// [`depthwise`] on the CPU threads: one task per output row, each pixel
/// accumulating `k²` taps over all its channels at once (contiguous, so the
/// loop is vectorised), GELU applied as the row is done.
fn depthwise_cpu(
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    (k, stride): (usize, usize),
    gelu: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    let o = bias.dim(0)?;
    if o % c != 0 {
        candle_core::bail!("{o} depthwise outputs for {c} input channels");
    }
    // Two outputs per input channel (FastViT's downsampling) are read in
    // the loop; other multiples from a copy with the channels repeated.
    let (x, m) = match o / c {
        m @ (1 | 2) => (x.contiguous()?, m),
        m => (repeat_channels(x, m)?.contiguous()?, 1),
    };
    let (taps, bias) = (taps.contiguous()?, bias.contiguous()?);
    let (oh, ow) = (out_side(h, k, stride)?, out_side(w, k, stride)?);
    let residual = match residual {
        Some(r) if r.dims() != [n, oh, ow, o] => {
            candle_core::bail!(
                "a residual {:?} for a {:?} output",
                r.dims(),
                [n, oh, ow, o]
            )
        }
        Some(r) => Some(r.contiguous()?),
        None => None,
    };
    // Zeros for no residual: one borrow below either way.
    let no_residual = Tensor::zeros(0, DType::F32, x.device())?;
    let mut out = vec![0f32; n * oh * ow * o];
    cpu_kernels::with_f32s(residual.as_ref().unwrap_or(&no_residual), |rs| {
        let rs = residual.is_some().then_some(rs);
        cpu_kernels::with_f32s(&x, |xs| {
            cpu_kernels::with_f32s(&taps, |ts| {
                cpu_kernels::with_f32s(&bias, |bs| {
                    out.par_chunks_mut(ow * o)
                        .enumerate()
                        .for_each(|(row, dst)| {
                            let res = rs.map(|r| &r[row * ow * o..][..ow * o]);
                            let (img, oy) = (row / oh, row % oh);
                            let src = &xs[img * h * w * o / m..][..h * w * o / m];
                            let geo = Geometry {
                                h,
                                w,
                                o,
                                m,
                                k,
                                stride,
                                oy,
                            };
                            // GELU comes before the residual: never both here.
                            let inp = Inputs {
                                src,
                                ts,
                                bs,
                                res: if gelu { None } else { res },
                            };
                            depthwise_row_host(geo, inp, dst);
                            if gelu {
                                cpu_kernels::act_in_place(Epilogue::GeluErf, dst);
                            }
                        });
                    Ok(())
                })
            })
        })
    })?;
    if gelu && let Some(r) = residual {
        // No FastViT layer has both; kept correct all the same.
        return Tensor::from_vec(out, (n, oh, ow, o), x.device())? + r;
    }
    Tensor::from_vec(out, (n, oh, ow, o), x.device())
}

/// One output row of a depthwise convolution on this CPU's best loop.
fn depthwise_row_host(geo: Geometry, inp: Inputs, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu_kernels::has_avx512f() {
        // SAFETY: the CPU has the features this copy was compiled for.
        unsafe { depthwise_row_avx512(geo, inp, dst) };
    } else if cpu_kernels::has_avx2_fma() {
        // SAFETY: as above.
        unsafe { depthwise_row_avx2(geo, inp, dst) };
    } else {
        depthwise_row::<false>(geo, inp, dst);
    }
    #[cfg(not(target_arch = "x86_64"))]
    depthwise_row::<false>(geo, inp, dst);
}

/// [`depthwise`] in candle ops (any device and dtype): the sum over the
/// `k²` taps of the shifted input scaled by that tap's weights, accumulated
/// in f32 as PyTorch's half-precision convolutions accumulate (49 sums
/// rounded to bf16 each lose the vector).
fn depthwise_ops(
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    k: usize,
    stride: usize,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let (n, h, w, c) = x.dims4()?;
    let o = bias.dim(0)?;
    if o % c != 0 {
        candle_core::bail!("{o} depthwise outputs for {c} input channels");
    }
    let x = repeat_channels(&x.to_dtype(DType::F32)?, o / c)?;
    let taps = taps.to_dtype(DType::F32)?;
    let pad = k / 2;
    let (oh, ow) = (out_side(h, k, stride)?, out_side(w, k, stride)?);
    // Padded so that every tap's window, `stride` times the output, fits.
    let (ph, pw) = ((oh - 1) * stride + k, (ow - 1) * stride + k);
    let xp = x
        .pad_with_zeros(1, pad, (ph + stride).saturating_sub(h + pad))?
        .pad_with_zeros(2, pad, (pw + stride).saturating_sub(w + pad))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        for kx in 0..k {
            let mut tap = xp.narrow(1, ky, oh * stride)?.narrow(2, kx, ow * stride)?;
            if stride > 1 {
                tap = tap
                    .reshape((n, oh, stride, ow, stride, o))?
                    .narrow(2, 0, 1)?
                    .narrow(4, 0, 1)?
                    .reshape((n, oh, ow, o))?;
            }
            let t = taps.narrow(0, ky * k + kx, 1)?.reshape((1, 1, 1, o))?;
            let term = tap.broadcast_mul(&t)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    match acc {
        Some(a) => a
            .broadcast_add(&bias.to_dtype(DType::F32)?.reshape((1, 1, 1, o))?)?
            .to_dtype(dtype),
        None => candle_core::bail!("an empty kernel"),
    }
}

/// The mean of each channel of `[b, h, w, c]`, `[b, c]`, summed in f32.
fn mean_hw(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.to_dtype(DType::F32)?
        .reshape((b, h * w, c))?
        .mean(1)?
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
        let (b, _, _, c) = x.dims4()?;
        let gate = self.fc2.forward(&self.fc1.forward(&mean_hw(x)?)?.relu()?)?;
        let gate = candle_nn::ops::sigmoid(&gate)?.reshape((b, 1, 1, c))?;
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
        match &self.se {
            // The activation follows the gate.
            Some(se) => {
                let y = se.forward(&self.conv.forward(x, None, false)?)?;
                if self.act { gelu_of(&y) } else { Ok(y) }
            }
            None => self.conv.forward(x, None, self.act),
        }
    }
}

/// timm's `ConvMlp`: a 7×7 depthwise convolution (batch norm folded), a
/// pointwise expansion with GELU, a pointwise projection (the block's layer
/// scale folded in) added to the input.
struct ConvMlp {
    conv: Conv,
    fc1: Conv,
    fc2: Conv,
}

impl ConvMlp {
    fn new(
        vb: &VarBuilder,
        layer_scale: Option<Tensor>,
        kernels: Kernels,
        dtype: DType,
    ) -> Result<Self> {
        let (mut w2, mut b2) = (f32_of(vb, "fc2.weight")?, f32_of(vb, "fc2.bias")?);
        if let Some(g) = layer_scale {
            w2 = scale_rows(&w2, &g)?;
            b2 = (b2 * g)?;
        }
        let conv = |wb| Conv::new(wb, 1, kernels, dtype);
        Ok(Self {
            conv: conv(conv_bn(&vb.pp("conv"))?)?,
            fc1: conv((f32_of(vb, "fc1.weight")?, f32_of(vb, "fc1.bias")?))?,
            fc2: conv((w2, b2))?,
        })
    }

    /// `x + mlp(x)`.
    fn forward_residual(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_fused(x)? {
            return Ok(y);
        }
        let h = self.conv.forward(x, None, false)?;
        let h = self.fc1.forward(&h, None, true)?;
        self.fc2.forward(&h, Some(x), false)
    }

    /// [`Self::forward_residual`] in one pass over blocks of image rows on
    /// the CPU ([`packed::mlp`]): each block's depthwise rows, expansion
    /// and projection in the core's cache. `None` where the layers or the
    /// map do not allow it.
    fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (
            Conv::Depthwise {
                taps,
                bias,
                k,
                stride: 1,
            },
            Conv::Pointwise(fc1),
            Conv::Pointwise(fc2),
        ) = (&self.conv, &self.fc1, &self.fc2)
        else {
            return Ok(None);
        };
        let (Some(p1), Some(p2)) = (fc1.packed_f32(), fc2.packed_f32()) else {
            return Ok(None);
        };
        let (b, h, w, c) = x.dims4()?;
        if !cpu_kernels::supported(x)
            || !cpu_kernels::supported(taps)
            || bias.dims() != [c]
            || p1.k() != c
            || p2.n() != c
        {
            return Ok(None);
        }
        let (x, taps, bias) = (x.contiguous()?, taps.contiguous()?, bias.contiguous()?);
        let rows = cpu_kernels::with_f32s(&x, |xs| {
            cpu_kernels::with_f32s(&taps, |ts| {
                cpu_kernels::with_f32s(&bias, |bs| {
                    // Rows of pixels, whole image rows at a time.
                    let input = |rows: std::ops::Range<usize>, dst: &mut [f32]| {
                        for (j, dst) in dst.chunks_exact_mut(w * c).enumerate() {
                            let row = rows.start / w + j;
                            let (img, oy) = (row / h, row % h);
                            let geo = Geometry {
                                h,
                                w,
                                o: c,
                                m: 1,
                                k: *k,
                                stride: 1,
                                oy,
                            };
                            let src = &xs[img * h * w * c..][..h * w * c];
                            let inp = Inputs {
                                src,
                                ts,
                                bs,
                                res: None,
                            };
                            depthwise_row_host(geo, inp, dst);
                        }
                    };
                    let layers = (p1, p2);
                    Ok(packed::mlp(
                        layers,
                        b * h * w,
                        (&input, w),
                        Epilogue::GeluErf,
                        xs,
                    ))
                })
            })
        })?;
        rows.map(|r| r.into_tensor(x.shape(), x.device()))
            .transpose()
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

/// timm's FastViT `AttentionBlock`: `x + proj(attention(norm(x)))`, then
/// `x + mlp(x)`, over the positions of a feature map as tokens.
struct AttentionBlock {
    /// `LayerNorm2d` (MCi3/MCi4), over each position's channels; a batch
    /// norm (MCi0–2) is folded into the QKV layer instead.
    norm: Option<Norm>,
    qkv: Dense,
    proj: Dense,
    heads: usize,
    kernels: Kernels,
    mlp: ConvMlp,
}

impl AttentionBlock {
    fn new(vb: &VarBuilder, kernels: Kernels, dtype: DType) -> Result<Self> {
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
            None
        } else {
            let w = f32_of(vb, "norm.weight")?.to_dtype(dtype)?;
            let b = f32_of(vb, "norm.bias")?.to_dtype(dtype)?;
            Some(Norm::new(w, b, BN_EPS, kernels))
        };
        let (mut proj_w, mut proj_b) =
            (f32_of(&mixer, "proj.weight")?, f32_of(&mixer, "proj.bias")?);
        if let Some(g) = layer_scale(vb, "layer_scale_1")? {
            proj_w = scale_rows(&proj_w, &g)?;
            proj_b = (proj_b * g)?;
        }
        let dense = |w: Tensor, b: Tensor, input| {
            Dense::from_linear(
                Linear::new(w.to_dtype(dtype)?, Some(b.to_dtype(dtype)?)),
                kernels,
                input,
            )
        };
        Ok(Self {
            norm,
            qkv: dense(qkv_w, qkv_b, Input::Narrow)?,
            proj: dense(proj_w, proj_b, Input::Wide)?,
            heads: c / HEAD_DIM,
            kernels,
            mlp: ConvMlp::new(
                &vb.pp("mlp"),
                layer_scale(vb, "layer_scale_2")?,
                kernels,
                dtype,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let n = h * w;
        let tokens = x.reshape((b, n, c))?;
        let normed = match &self.norm {
            Some(norm) => norm.forward(&tokens)?,
            None => tokens.clone(),
        };
        let qkv = self.qkv.forward_fused(&normed, None, Epilogue::None)?;
        let heads = if self.kernels.host(&qkv) {
            cpu_kernels::attention(&qkv, self.heads, Visible::All)?
        } else {
            let qkv = qkv
                .reshape((b, n, 3, self.heads, HEAD_DIM))?
                .permute((2, 0, 3, 1, 4))?;
            let q = (qkv.get(0)? * (HEAD_DIM as f64).powf(-0.5))?.contiguous()?;
            let (k, v) = (qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
            let att = softmax(self.kernels, &q.matmul(&k.t()?)?)?;
            att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?
        };
        let y = self
            .proj
            .forward_fused(&heads, Some(&tokens), Epilogue::None)?;
        self.mlp.forward_residual(&y.reshape((b, h, w, c))?)
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
    fn new(vb: &VarBuilder, kernels: Kernels, dtype: DType) -> Result<Self> {
        let tm = vb.pp("token_mixer");
        let mixer = if let Some(folded) = reparameterized(&tm)? {
            minus_identity(folded)?
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
            mixer: Conv::new(mixer, 1, kernels, dtype)?,
            mlp: ConvMlp::new(
                &vb.pp("mlp"),
                layer_scale(vb, "layer_scale")?,
                kernels,
                dtype,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.mlp
            .forward_residual(&self.mixer.forward(x, Some(x), false)?)
    }
}

enum Block {
    RepMixer(RepMixerBlock),
    Attention(AttentionBlock),
}

/// One stage: an optional downsampling (`PatchEmbed`: a large-kernel
/// convolution with activation, then a pointwise MobileOne block), an
/// optional conditional position encoding (`RepCPE`: `x` plus a 7×7
/// depthwise convolution of it), and its blocks.
struct Stage {
    downsample: Vec<ConvAct>,
    pos_emb: Option<Conv>,
    blocks: Vec<Block>,
}

impl Stage {
    fn new(vb: &VarBuilder, kernels: Kernels, dtype: DType) -> Result<Self> {
        let mut downsample = Vec::new();
        let ds = vb.pp("downsample.proj");
        let large = ds.pp("0");
        if large.contains_tensor("reparam_conv.weight")
            || large.contains_tensor("large_conv.conv.weight")
        {
            let folded = if let Some(folded) = reparameterized(&large)? {
                folded
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
                conv: Conv::new(folded, 2, kernels, dtype)?,
                se: SqueezeExcite::new(&large, dtype)?,
                // `lkc_use_act`: every MCi variant has it.
                act: true,
            });
            let point = ds.pp("1");
            downsample.push(ConvAct {
                conv: Conv::new(mobileone(&point, 1, false)?, 1, kernels, dtype)?,
                se: SqueezeExcite::new(&point, dtype)?,
                act: true,
            });
        }
        // `x + pos_enc(x)`, the identity kept apart (see RepMixerBlock).
        let pe = vb.pp("pos_emb");
        let pos_emb = if let Some(folded) = reparameterized(&pe)? {
            Some(Conv::new(minus_identity(folded)?, 1, kernels, dtype)?)
        } else if pe.contains_tensor("pos_enc.weight") {
            let w = (f32_of(&pe, "pos_enc.weight")?, f32_of(&pe, "pos_enc.bias")?);
            Some(Conv::new(w, 1, kernels, dtype)?)
        } else {
            None
        };
        let mut blocks = Vec::new();
        loop {
            let b = vb.pp(format!("blocks.{}", blocks.len()));
            if b.contains_tensor("token_mixer.qkv.weight") {
                blocks.push(Block::Attention(AttentionBlock::new(&b, kernels, dtype)?));
            } else if b.contains_tensor("mlp.fc1.weight") {
                blocks.push(Block::RepMixer(RepMixerBlock::new(&b, kernels, dtype)?));
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
            x = pe.forward(&x, Some(&x), false)?;
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
    /// its head projecting to `embed_dim`. Int8 applies to the text tower
    /// only: the image tower runs f32 ([`Kernels::Fused`]) then.
    pub(crate) fn new(
        name: &str,
        embed_dim: usize,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        if !name.starts_with("fastvit_mci") {
            candle_core::bail!("timm model `{name}` is not a FastViT MCi tower");
        }
        let kernels = match kernels {
            Kernels::Int8 => Kernels::Fused,
            k => k,
        };
        let dtype = vb.dtype();
        let stem = [(3, 2, false), (3, 2, true), (1, 1, false)]
            .iter()
            .enumerate()
            .map(|(i, &(k, stride, depthwise))| {
                let b = vb.pp(format!("stem.{i}"));
                Ok(ConvAct {
                    conv: Conv::new(mobileone(&b, k, depthwise)?, stride, kernels, dtype)?,
                    se: SqueezeExcite::new(&b, dtype)?,
                    act: true,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut stages = Vec::new();
        while vb.contains_tensor(&format!("stages.{}.blocks.0.mlp.fc1.weight", stages.len())) {
            let s = vb.pp(format!("stages.{}", stages.len()));
            stages.push(Stage::new(&s, kernels, dtype)?);
        }
        if stages.is_empty() {
            candle_core::bail!(
                "{}: no FastViT stages (`stages.0.blocks.0.*`) in the weights",
                vb.prefix()
            );
        }
        let fc = vb.pp("final_conv");
        let final_conv = ConvAct {
            conv: Conv::new(mobileone(&fc, 3, true)?, 1, kernels, dtype)?,
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

    /// `[b, 3, s, s]` pixels (channels-first, as every tower takes them) to
    /// `[b, embed_dim]` (not normalised).
    pub(crate) fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        if pixels.device().is_cpu() && b > CPU_CHUNK {
            // The first stages' maps of a large batch outgrow the caches
            // (at 256 px, 32 images' MLP expansion in stage 0 is 100 MB):
            // a few images at a time, each chunk its own passes.
            let parts = (0..b)
                .step_by(CPU_CHUNK)
                .map(|i| self.forward(&pixels.narrow(0, i, CPU_CHUNK.min(b - i))?))
                .collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&parts, 0);
        }
        let mut x = pixels.permute((0, 2, 3, 1))?;
        for s in &self.stem {
            x = s.forward(&x)?;
        }
        for s in &self.stages {
            x = s.forward(&x)?;
        }
        let x = self.final_conv.forward(&x)?;
        self.head.forward(&mean_hw(&x)?)
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

    /// The MLP fused per block of image rows (depthwise rows, expansion,
    /// projection in cache) is the three layers one after the other, with
    /// AVX-512's blocked depthwise loop (32-channel blocks) and the
    /// portable one (24 channels).
    #[test]
    fn fused_conv_mlp_is_the_layers_in_a_row() -> Result<()> {
        let dev = Device::Cpu;
        // Enough blocks of three 16-pixel rows for any thread count.
        let b = 4 * cpu_kernels::threads() * 48 / 256 + 1;
        for c in [32, 24] {
            let conv = |o, i, k| -> Result<Conv> {
                let w = Tensor::randn(0f32, 1.0, (o, i, k, k), &dev)?;
                let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
                Conv::new((w, bias), 1, Kernels::Fused, DType::F32)
            };
            let mlp = ConvMlp {
                conv: conv(c, 1, 7)?,
                fc1: conv(3 * c, c, 1)?,
                fc2: conv(c, 3 * c, 1)?,
            };
            let x = Tensor::randn(0f32, 1.0, (b, 16, 16, c), &dev)?;
            let want = {
                let h = mlp.conv.forward(&x, None, false)?;
                let h = mlp.fc1.forward(&h, None, true)?;
                mlp.fc2.forward(&h, Some(&x), false)?
            };
            match mlp.forward_fused(&x)? {
                Some(got) => assert!(max_diff(&got, &want) < 1e-5, "{c} channels"),
                // Only the x86 kernels read rows in place; elsewhere the
                // layer-by-layer path is the only one.
                #[cfg(target_arch = "x86_64")]
                None => assert!(!cpu_kernels::has_avx2_fma(), "fused on AVX2"),
                #[cfg(not(target_arch = "x86_64"))]
                None => {}
            }
            assert!(max_diff(&mlp.forward_residual(&x)?, &want) < 1e-5);
        }
        Ok(())
    }

    /// A dense convolution as a linear layer over patches (the CPU's) against
    /// candle's convolution (the other kernels'), both channels-last in
    /// and out: stride 1 and 2, kernels 1, 3 and 5, odd and even sides, with
    /// and without GELU and a residual.
    #[test]
    fn dense_convolution_over_patches_is_candles() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, k, stride, (h, w)) in [
            (3, 16, 3, 2, (17, 20)),
            (3, 8, 3, 1, (6, 5)),
            (4, 20, 5, 2, (9, 12)),
            (2, 3, 1, 2, (4, 3)),
            (3, 17, 3, 2, (2, 2)),
        ] {
            let weight = Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
            let x = Tensor::randn(0f32, 1.0, (2, h, w, c), &dev)?;
            // From channels-first pixels, as the stem gets them.
            let x_view = x
                .permute((0, 3, 1, 2))?
                .contiguous()?
                .permute((0, 2, 3, 1))?;
            let make =
                |kernels| Conv::new((weight.clone(), bias.clone()), stride, kernels, DType::F32);
            let (ours, candles) = (make(Kernels::Fused)?, make(Kernels::Portable)?);
            assert!(matches!(ours, Conv::Dense { rows: Some(_), .. }));
            assert!(matches!(candles, Conv::Dense { rows: None, .. }));
            for gelu in [false, true] {
                let want = candles.forward(&x, None, gelu)?;
                let (oh, ow) = (out_side(h, k, stride)?, out_side(w, k, stride)?);
                assert_eq!(want.dims(), [2, oh, ow, o]);
                let res = Tensor::randn(0f32, 1.0, want.shape(), &dev)?;
                for x in [&x, &x_view] {
                    let got = ours.forward(x, None, gelu)?;
                    assert!(max_diff(&got, &want) < 1e-4, "{k}x{k}/{stride} on {h}x{w}");
                    let got = ours.forward(x, Some(&res), gelu)?;
                    assert!(max_diff(&got, &(&want + &res)?) < 1e-4);
                }
            }
        }
        Ok(())
    }

    /// The CPU loop and the candle-op sum (channels-last) against candle's
    /// own grouped convolution (channels-first), for the shapes FastViT
    /// uses: 3×3 and 7×7, stride 1 and 2, one or two outputs per input
    /// channel, odd and even sides.
    #[test]
    fn depthwise_paths_match_candles_grouped_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (c, m, k, stride, h, w) in [
            (4, 1, 3, 1, 9, 7),
            (4, 2, 7, 2, 16, 16),
            (3, 1, 7, 1, 5, 6),
            (2, 2, 3, 2, 7, 9),
            (5, 1, 7, 2, 3, 4),
            // Wider than a register block, with a tail.
            (80, 1, 3, 1, 6, 5),
            (64, 2, 7, 2, 9, 8),
            // 32-channel blocks in rows of whole 8-pixel blocks (AVX-512's
            // blocked loop: inner blocks, edge blocks, a short last one).
            (32, 1, 7, 1, 12, 17),
            (64, 1, 3, 1, 5, 20),
            (16, 2, 7, 1, 9, 16),
            // ... and at stride 2, with and without two outputs per input
            // channel (the downsampling's widening convolutions).
            (16, 2, 7, 2, 10, 40),
            (32, 1, 3, 2, 7, 37),
            // The last inner block's last tap on the row's last pixel.
            (16, 2, 7, 2, 6, 33),
            (32, 1, 7, 1, 5, 18),
            // The same for AVX2's blocks of 6 pixels (4 with two outputs
            // per input channel) × 16 channels.
            (32, 1, 7, 1, 5, 15),
            (8, 2, 7, 2, 6, 18),
            // Two outputs per input channel are read in the loop, more from
            // a copy with the channels repeated.
            (24, 2, 3, 1, 4, 5),
            (3, 3, 3, 1, 5, 5),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (c * m, 1, k, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, c * m, &dev)?;
            let want = x
                .conv2d(&wt, k / 2, stride, 1, c)?
                .broadcast_add(&b.reshape((1, c * m, 1, 1))?)?;
            let taps = wt.reshape((c * m, k * k))?.t()?.contiguous()?;
            let nhwc = x.permute((0, 2, 3, 1))?.contiguous()?;
            let back = |t: Tensor| t.permute((0, 3, 1, 2));
            let cpu = back(depthwise_cpu(&nhwc, &taps, &b, (k, stride), false, None)?)?;
            let ops = back(depthwise_ops(&nhwc, &taps, &b, k, stride)?)?;
            assert_eq!(cpu.dims(), want.dims(), "{c} {m} {k} {stride} {h} {w}");
            // A residual added in the loop: the sum, whichever path; GELU
            // then residual where both are asked for.
            let r = Tensor::randn(0f32, 1.0, want.permute((0, 2, 3, 1))?.dims(), &dev)?;
            let with_r = depthwise(&nhwc, &taps, &b, (k, stride), false, Some(&r))?;
            let want_r = (want.permute((0, 2, 3, 1))? + &r)?;
            assert!(
                max_diff(&with_r, &want_r) < 1e-4,
                "residual {c} {m} {k} {stride}"
            );
            let both = depthwise(&nhwc, &taps, &b, (k, stride), true, Some(&r))?;
            let want_both = (want.permute((0, 2, 3, 1))?.gelu_erf()? + &r)?;
            assert!(
                max_diff(&both, &want_both) < 1e-4,
                "gelu + residual {c} {m} {k}"
            );
            let short = r.narrow(2, 0, r.dim(2)? - 1)?;
            assert!(depthwise(&nhwc, &taps, &b, (k, stride), false, Some(&short)).is_err());
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
