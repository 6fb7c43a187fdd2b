//! CLIP's two towers, loading Hugging Face weight names.
//!
//! Our own module rather than `candle_transformers::models::clip` because
//! that one (0.11.1) only knows `quick_gelu`, hard-codes layer-norm eps
//! 1e-5, cannot read `config.json`, and pools text at `argmax(input_ids)`,
//! which is the end-of-text position only for OpenAI's vocabulary. Here the
//! config decides the architecture and text is pooled at the first
//! end-of-text token, as transformers does for current configs.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{
    Conv2d, Conv2dConfig, Embedding, LayerNorm, Linear, VarBuilder, conv2d_no_bias, embedding,
    layer_norm, linear, linear_no_bias,
};

use crate::config::{Activation, ClipConfig, TowerConfig};

fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        let head_dim = d / c.num_attention_heads;
        Ok(Self {
            q: linear(d, d, vb.pp("q_proj"))?,
            k: linear(d, d, vb.pp("k_proj"))?,
            v: linear(d, d, vb.pp("v_proj"))?,
            out: linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let mut w = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(m) = mask {
            w = w.broadcast_add(m)?;
        }
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        let o = w.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out.forward(&o)
    }
}

struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    fn new(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            ln1: layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(c, vb.pp("self_attn"))?,
            ln2: layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate_size, d, vb.pp("mlp.fc2"))?,
            act: c.activation,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let h = activate(self.act, &self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

struct Encoder(Vec<Layer>);

impl Encoder {
    fn new(c: &TowerConfig, vb: VarBuilder) -> Result<Self> {
        (0..c.num_hidden_layers)
            .map(|i| Layer::new(c, vb.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()
            .map(Self)
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.0
            .iter()
            .try_fold(x.clone(), |x, l| l.forward(&x, mask))
    }
}

/// The text tower with its projection.
pub struct TextTower {
    token: Embedding,
    position: Embedding,
    encoder: Encoder,
    final_ln: LayerNorm,
    projection: Linear,
    context: usize,
}

impl TextTower {
    fn new(c: &ClipConfig, vb: VarBuilder, proj: VarBuilder) -> Result<Self> {
        let t = &c.text;
        let d = t.tower.hidden_size;
        Ok(Self {
            token: embedding(t.vocab_size, d, vb.pp("embeddings.token_embedding"))?,
            position: embedding(
                t.max_position_embeddings,
                d,
                vb.pp("embeddings.position_embedding"),
            )?,
            encoder: Encoder::new(&t.tower, vb.pp("encoder"))?,
            final_ln: layer_norm(d, t.tower.layer_norm_eps, vb.pp("final_layer_norm"))?,
            projection: linear_no_bias(d, c.projection_dim, proj)?,
            context: t.max_position_embeddings,
        })
    }

    /// Projected (not normalised) features for a `[batch, len]` u32 tensor of
    /// token ids, pooled at `pool[i]` for row `i` (the first end-of-text
    /// position). Padding after that position cannot change the result: the
    /// mask is causal.
    pub fn forward(&self, ids: &Tensor, pool: &[usize]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.context {
            candle_core::bail!(
                "sequence of {t} tokens exceeds the context of {}",
                self.context
            );
        }
        let dev = ids.device();
        let pos = Tensor::arange(0u32, t as u32, dev)?;
        let x = self
            .token
            .forward(ids)?
            .broadcast_add(&self.position.forward(&pos)?)?;
        let mask = causal_mask(t, x.dtype(), dev)?;
        let x = self.encoder.forward(&x, Some(&mask))?;
        let x = self.final_ln.forward(&x)?;
        let flat: Vec<u32> = pool
            .iter()
            .enumerate()
            .map(|(i, p)| (i * t + p) as u32)
            .collect();
        let idx = Tensor::new(flat.as_slice(), dev)?;
        let pooled = x.reshape((b * t, ()))?.index_select(&idx, 0)?;
        self.projection.forward(&pooled)
    }
}

fn causal_mask(t: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_slice(&m, (t, t), dev)?.to_dtype(dtype)
}

/// The vision tower with its projection.
pub struct VisionTower {
    class: Tensor,
    patch: Conv2d,
    position: Embedding,
    pre_ln: LayerNorm,
    encoder: Encoder,
    post_ln: LayerNorm,
    projection: Linear,
    positions: usize,
}

impl VisionTower {
    fn new(c: &ClipConfig, vb: VarBuilder, proj: VarBuilder) -> Result<Self> {
        let v = &c.vision;
        let d = v.tower.hidden_size;
        let grid = v.image_size / v.patch_size;
        let positions = grid * grid + 1;
        let conv = Conv2dConfig {
            stride: v.patch_size,
            ..Default::default()
        };
        let eps = v.tower.layer_norm_eps;
        Ok(Self {
            class: vb.get(d, "embeddings.class_embedding")?,
            patch: conv2d_no_bias(
                v.num_channels,
                d,
                v.patch_size,
                conv,
                vb.pp("embeddings.patch_embedding"),
            )?,
            position: embedding(positions, d, vb.pp("embeddings.position_embedding"))?,
            // "pre_layrnorm" is the real (misspelt) Hugging Face name.
            pre_ln: layer_norm(d, eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(&v.tower, vb.pp("encoder"))?,
            post_ln: layer_norm(d, eps, vb.pp("post_layernorm"))?,
            projection: linear_no_bias(d, c.projection_dim, proj)?,
            positions,
        })
    }

    /// Projected (not normalised) features for `[batch, 3, size, size]` pixels.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let x = self
            .patch
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = x.dim(2)?;
        let cls = self.class.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let pos = Tensor::arange(0u32, self.positions as u32, pixels.device())?;
        let x = x.broadcast_add(&self.position.forward(&pos)?)?;
        let x = self.encoder.forward(&self.pre_ln.forward(&x)?, None)?;
        let cls = self.post_ln.forward(&x.i((.., 0, ..))?)?;
        self.projection.forward(&cls)
    }
}

/// A CLIP dual encoder.
pub struct ClipModel {
    /// Text tower.
    pub text: TextTower,
    /// Vision tower.
    pub vision: VisionTower,
}

impl ClipModel {
    /// Builds the model from Hugging Face weight names (`text_model.*`,
    /// `vision_model.*`, `text_projection`, `visual_projection`).
    pub fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            text: TextTower::new(c, vb.pp("text_model"), vb.pp("text_projection"))?,
            vision: VisionTower::new(c, vb.pp("vision_model"), vb.pp("visual_projection"))?,
        })
    }
}
