//! timm's `ConvStem` as MobileCLIP-B's ViT (`vit_base_mci_224`) uses it in
//! place of a patch embedding: three convolutions whose kernels equal their
//! strides (4, 2, 2: each reads a block of the one before that no other
//! output reads), batch norm and GELU after the first two.
//!
//! Because the blocks do not overlap, each convolution is a linear layer
//! over its blocks' values, run as one of our [`Dense`] layers (packed CPU
//! kernels with GELU in their epilogue, cuBLAS on CUDA) over the blocks
//! laid out as rows; the batch norm is folded into the layer at load. A
//! 16-pixel patch's token depends on that patch only, as a patch
//! embedding's does.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::cpu_kernels::Epilogue;
use crate::fastvit::{conv_bn, f32_of};
use crate::model::{Dense, Input, Kernels};

/// One convolution of the stem as a linear layer over blocks.
struct Step {
    dense: Dense,
    /// Kernel side = stride.
    k: usize,
    /// GELU after it (and the folded batch norm): all but the last.
    gelu: bool,
}

pub(crate) struct ConvStem {
    steps: Vec<Step>,
    /// Output channels: the token width.
    width: usize,
    kernels: Kernels,
}

impl ConvStem {
    /// Loads `{i}.conv.weight` (`[o, c, k, k]`), with `{i}.bn.*` folded in
    /// or `{i}.conv.bias`, for `i = 0, 1, …` under `vb`
    /// (`visual.trunk.patch_embed.backbone`).
    pub(crate) fn new(vb: &VarBuilder, kernels: Kernels, dtype: DType) -> Result<Self> {
        let mut steps = Vec::new();
        let mut channels = 3;
        loop {
            let layer = vb.pp(steps.len().to_string());
            if !layer.contains_tensor("conv.weight") {
                break;
            }
            let gelu = layer.contains_tensor("bn.running_mean");
            let (w, b) = if gelu {
                conv_bn(&layer)?
            } else if layer.contains_tensor("conv.bias") {
                (f32_of(&layer, "conv.weight")?, f32_of(&layer, "conv.bias")?)
            } else {
                let w = f32_of(&layer, "conv.weight")?;
                let zero = Tensor::zeros(w.dim(0)?, DType::F32, w.device())?;
                (w, zero)
            };
            let (o, c, k, k2) = w.dims4()?;
            if c != channels || k != k2 || k == 0 {
                candle_core::bail!(
                    "{}: a stem convolution of shape {:?} after {channels} channels \
                     (square kernels over the previous output expected)",
                    layer.prefix(),
                    w.dims()
                );
            }
            // Rows of blocks are laid out as the unfolding gives them:
            // channel, row, column for the first (channels-first pixels),
            // row, column, channel after it (channels-last maps).
            let w = if steps.is_empty() {
                w.flatten_from(1)?
            } else {
                w.permute((0, 2, 3, 1))?.flatten_from(1)?
            };
            let linear = Linear::new(w.to_dtype(dtype)?, Some(b.to_dtype(dtype)?));
            steps.push(Step {
                dense: Dense::from_linear(linear, kernels, Input::Narrow)?,
                k,
                gelu,
            });
            channels = o;
        }
        if steps.is_empty() {
            candle_core::bail!("{}: no stem convolutions (`0.conv.weight`)", vb.prefix());
        }
        Ok(Self {
            steps,
            width: channels,
            kernels,
        })
    }

    /// Pixels per token side: the product of the strides.
    pub(crate) fn patch_size(&self) -> usize {
        self.steps.iter().map(|s| s.k).product()
    }

    /// Token width.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// `[b, c, h, w]` pixels to `[b, (h / p) · (w / p), width]` tokens, row
    /// by row of patches (timm's `flatten(2).transpose(1, 2)`).
    pub(crate) fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let p = self.patch_size();
        if h % p != 0 || w % p != 0 {
            candle_core::bail!(
                "pixels {:?} do not split into {p}-pixel patches",
                pixels.dims()
            );
        }
        let (mut gh, mut gw) = (h, w);
        let mut x = pixels.clone();
        for (i, step) in self.steps.iter().enumerate() {
            let k = step.k;
            let rows = if i == 0 {
                crate::elementwise::unfold(&x, k, self.kernels == Kernels::Cuda)?
            } else {
                let c = x.dim(3)?;
                x.reshape((b, gh / k, k, gw / k, k, c))?
                    .permute((0, 1, 3, 2, 4, 5))?
                    .reshape((b * (gh / k) * (gw / k), k * k * c))?
            };
            (gh, gw) = (gh / k, gw / k);
            let epilogue = if step.gelu {
                Epilogue::GeluErf
            } else {
                Epilogue::None
            };
            let y = step.dense.forward_fused(&rows, None, epilogue)?;
            let o = y.dim(1)?;
            x = y.reshape((b, gh, gw, o))?;
        }
        x.reshape((b, gh * gw, self.width))
    }
}
