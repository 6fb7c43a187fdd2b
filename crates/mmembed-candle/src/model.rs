//! The two towers of CLIP, SigLIP and Chinese-CLIP ([`Family`]), loading
//! Hugging Face weight names.
//!
//! Our own module rather than `candle_transformers::models::clip` because
//! that one (0.11.1) only knows `quick_gelu`, hard-codes layer-norm eps
//! 1e-5, cannot read `config.json`, and pools text at `argmax(input_ids)`,
//! which is the end-of-text position only for OpenAI's vocabulary. Here the
//! config decides the architecture and text is pooled at the first
//! end-of-text token, as transformers does for current configs.
//!
//! SigLIP shares the encoder layers (same weight names, same layer-norm /
//! attention / MLP order) and differs only around them, so it is this
//! module's second family rather than candle-transformers' `siglip`: that
//! way every linear layer, the pooling head's included, runs on our packed
//! f32 and int8 CPU kernels, and the GPU graph is the same one CLIP's
//! parity tests hold.
//!
//! Chinese-CLIP's vision tower is CLIP's; its text tower is BERT: the same
//! attention and MLP blocks under other weight names, with the layer norm
//! after each residual (post-norm) instead of before, a padding mask, and
//! token-type embeddings (always type 0, folded into the positions at load).
//! It is built from this module's layers for the same reasons.
//!
//! MobileCLIP's ViT image towers (timm's `VisionTransformer`, open_clip's
//! `visual.trunk.*`) are CLIP's vision tower too: the blocks read under
//! CLIP's names ([`crate::weights::OpenClipNames`]), the class token's
//! position zero where timm gives it none, the head a projection with
//! bias, and MobileCLIP-B's convolutional stem ([`ConvStem`]) in place of
//! the patch convolution.

use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{
    Conv2d, Conv2dConfig, Embedding, LayerNorm, Linear, VarBuilder, conv2d, conv2d_no_bias,
    embedding, linear, linear_no_bias,
};

use crate::blas_ops;
use crate::config::{Activation, ClipConfig, Family, TimmTower, TimmVit, TowerConfig};
use crate::conv_stem::ConvStem;
use crate::cpu_kernels::{self, Epilogue, Visible};
use crate::int8::QLinear;
use crate::packed::{self, PackedLinear};
use crate::rows;
use crate::tiled::{self, TiledLinear};
use crate::train_ops;
use crate::w8a8::{self, W8A8Linear};

/// Which kernels the forward pass uses.
///
/// candle's fused softmax and layer-norm kernels are the fast path for
/// inference but have no backward pass; training builds the same graph from
/// elementary ops candle can differentiate. Both compute the same function
/// (a unit test holds them to 1e-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Fused kernels, for inference.
    Fused,
    /// Fused kernels with the encoder layers' linear weights quantised to
    /// int8 (one scale per output channel) and activations to 16 bits at
    /// run time: faster on CPUs, slightly less exact (BENCHMARKS.md gives
    /// the cosine to fp32). Applies to f32 CPU models; elsewhere it is
    /// [`Kernels::Fused`].
    Int8,
    /// Differentiable elementary ops, for training.
    Differentiable,
    /// Inference with the fused kernels every candle device has (layer
    /// norm, last-dim softmax, sigmoid) and graph-level fusions: packed
    /// Q/K/V in one matmul, the attention scale folded into the query
    /// weights, 2-D matmuls over all rows, the patch embedding as one
    /// matmul. The GPU path (CUDA, Metal); on the CPU it runs the same
    /// graph through candle's CPU ops, which is how its tests check it.
    Portable,
    /// The CUDA graph: [`Kernels::Portable`]'s, with every linear layer one
    /// cuBLASLt call carrying its bias (and residual) in the epilogue, and
    /// attention as per-head cuBLAS calls that read the packed Q/K/V in
    /// place and write the merged heads in place (`blas_ops`). On the CPU
    /// the same calls run through a reference of cuBLAS's semantics: slow,
    /// and there for the tests.
    Cublas,
    /// The CUDA graph, the default there: [`Kernels::Cublas`]'s, with the
    /// row-wise ops on our own kernels (`rows`): the attention softmax
    /// with the mask added as it reads the scores (no mask copies, no
    /// accumulating scores GEMM) and layer norm, a warp per row in
    /// registers where candle's kernels run a 32-thread block per row.
    /// On the CPU they run as f32 tensor ops, for the tests.
    Cuda,
}

impl Kernels {
    fn fused(self) -> bool {
        self != Kernels::Differentiable
    }

    /// The inference kernels for a device and precision: our own CPU
    /// kernels (f32 or int8: gemm and AVX code on host memory) on the CPU,
    /// [`Kernels::Cuda`] on CUDA, [`Kernels::Portable`] on Metal.
    ///
    /// `MMEMBED_CUDA_GRAPH` picks another CUDA graph, for comparisons and
    /// as a way round a problem on some GPU or driver: `cublas`
    /// ([`Kernels::Cublas`]: candle's softmax and layer norm instead of
    /// ours) or `portable` ([`Kernels::Portable`]: candle's own ops
    /// throughout, free of the cuBLAS calls, slower; BENCHMARKS.md).
    pub fn for_device(device: &Device, precision: crate::Precision) -> Self {
        match precision {
            _ if device.is_cuda() => {
                cuda_graph(std::env::var("MMEMBED_CUDA_GRAPH").ok().as_deref())
            }
            _ if !device.is_cpu() => Kernels::Portable,
            crate::Precision::Int8 => Kernels::Int8,
            _ => Kernels::Fused,
        }
    }

    /// Whether this is a GPU graph ([`Kernels::Portable`],
    /// [`Kernels::Cublas`] or [`Kernels::Cuda`]): packed Q/K/V with the
    /// scale in the query weights, QuickGELU as one silu, broadcasts
    /// instead of repeats.
    pub fn gpu_graph(self) -> bool {
        matches!(self, Kernels::Portable | Kernels::Cublas | Kernels::Cuda)
    }

    /// Whether the GEMMs are the cuBLAS calls of `blas_ops`.
    fn cublas(self) -> bool {
        matches!(self, Kernels::Cublas | Kernels::Cuda)
    }

    /// Whether `x` goes through our own CPU kernels (fused f32 or int8).
    pub(crate) fn host(self, x: &Tensor) -> bool {
        matches!(self, Kernels::Fused | Kernels::Int8) && cpu_kernels::supported(x)
    }
}

/// The CUDA graph `MMEMBED_CUDA_GRAPH` asks for (see
/// [`Kernels::for_device`]).
fn cuda_graph(var: Option<&str>) -> Kernels {
    match var.map(str::trim) {
        None | Some("" | "cuda") => Kernels::Cuda,
        Some("cublas") => Kernels::Cublas,
        Some("portable") => Kernels::Portable,
        Some(other) => {
            tracing::warn!(
                "MMEMBED_CUDA_GRAPH={other:?}: expected cuda, cublas or portable; using cuda"
            );
            Kernels::Cuda
        }
    }
}

/// Layer norm that can run on either kernel set.
pub(crate) struct Norm {
    ln: LayerNorm,
    eps: f64,
    kernels: Kernels,
}

fn norm(d: usize, eps: f64, kernels: Kernels, vb: VarBuilder) -> Result<Norm> {
    let w = vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.))?;
    let b = vb.get_with_hints(d, "bias", candle_nn::Init::Const(0.))?;
    Ok(Norm {
        ln: LayerNorm::new(w, b, eps),
        eps,
        kernels,
    })
}

impl Norm {
    /// A layer norm from its weight and bias.
    pub(crate) fn new(w: Tensor, b: Tensor, eps: f64, kernels: Kernels) -> Self {
        Self {
            ln: LayerNorm::new(w, b, eps),
            eps,
            kernels,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernels.fused() {
            if let (true, Some(b)) = (self.kernels.host(x), self.ln.bias()) {
                return cpu_kernels::layer_norm(x, self.ln.weight(), b, self.eps);
            }
            if let (Kernels::Cuda, Some(b)) = (self.kernels, self.ln.bias()) {
                return rows::layer_norm(x, self.ln.weight(), b, self.eps);
            }
            // candle's fused layer-norm kernel needs a contiguous input
            // (else LayerNorm falls back to a chain of reductions).
            return self.ln.forward(&x.contiguous()?);
        }
        if let (true, Some(b)) = (train_ops::supported(x), self.ln.bias()) {
            return train_ops::layer_norm(x, self.ln.weight(), b, self.eps);
        }
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let d = y.dim(D::Minus1)?;
        let rows = y.elem_count() / d.max(1);
        let shape = y.shape().clone();
        let y = (y.reshape((rows, d))? * repeat_rows(self.ln.weight(), rows)?)?;
        let y = match self.ln.bias() {
            Some(b) => (y + repeat_rows(b, rows)?)?,
            None => y,
        };
        y.reshape(shape)
    }
}

/// QuickGELU's sigmoid scale: `x · σ(1.702 x)` (OpenAI CLIP).
const QUICK_GELU: f64 = 1.702;

pub(crate) fn activate(act: Activation, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::QuickGelu if kernels == Kernels::Differentiable && train_ops::supported(x) => {
            train_ops::quick_gelu(x)
        }
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * QUICK_GELU)?)?,
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
        // Our kernel in the CUDA graph (QuickGELU, 1.702 folded around it).
        Activation::Silu if kernels == Kernels::Cuda => crate::elementwise::silu(x),
        Activation::Silu => x.silu(),
    }
}

/// Softmax over the last dimension: candle's fused kernel for inference,
/// ops candle can differentiate for training.
pub(crate) fn softmax(kernels: Kernels, w: &Tensor) -> Result<Tensor> {
    match kernels {
        Kernels::Fused | Kernels::Int8 | Kernels::Portable | Kernels::Cublas => {
            candle_nn::ops::softmax_last_dim(w)
        }
        Kernels::Cuda => rows::softmax(w, None),
        Kernels::Differentiable if train_ops::supported(w) => train_ops::softmax_last_dim(w),
        Kernels::Differentiable => candle_nn::ops::softmax(w, D::Minus1),
    }
}

/// `v` (any shape) repeated as `n` rows: `[n, v.elem_count()]`.
///
/// Written as a `[n, 1] x [1, len]` matmul rather than a broadcast because
/// candle differentiates a broadcast by summing over the broadcast dims,
/// and its sum over leading dims is a slow strided loop: it was a fifth of
/// a training step. A matmul's backward is a matmul.
fn repeat_rows(v: &Tensor, n: usize) -> Result<Tensor> {
    let ones = Tensor::ones((n, 1), v.dtype(), v.device())?;
    ones.matmul(&v.reshape((1, v.elem_count()))?)
}

/// A linear layer (Hugging Face `weight`/`bias` names) on either kernel set.
pub(crate) struct Dense {
    linear: Weights,
    kernels: Kernels,
}

enum Weights {
    /// candle's tensors, for candle's ops (or the `gemm` crate).
    Float(Linear),
    /// Packed at load for our CPU tile kernels: int8 ([`QLinear`]) or f32
    /// ([`PackedLinear`]).
    Packed(Box<dyn TiledLinear>),
}

/// How wide a layer's int8 form quantises its activations.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Input {
    /// 8 bits per value where the CPU has AVX-512 VNNI (a tile with an
    /// outlier row takes 16, see [`crate::w8a8`]), else 16.
    Narrow,
    /// 16 bits always: attention's output projection. Its rows (mixtures
    /// of value vectors, not normed) were where 8 bits cost the most: on
    /// the tiny CLIP fixture 8 bits there took one text to a cosine of
    /// 0.9977 to PyTorch (0.9980 is the test's floor); 8 bits on every
    /// other layer kept it above.
    Wide,
}

/// The CPU's packed form of a layer for these kernels, if it has one:
/// int8 for [`Kernels::Int8`] (layers with a bias; activations as `input`
/// says), else f32 where the CPU runs the packed f32 kernel. The candle
/// weight is then dropped.
fn packed_layer(
    w: &Tensor,
    b: Option<&Tensor>,
    kernels: Kernels,
    input: Input,
) -> Result<Option<Box<dyn TiledLinear>>> {
    if !matches!(kernels, Kernels::Fused | Kernels::Int8) || !cpu_kernels::supported(w) {
        return Ok(None);
    }
    Ok(match b {
        Some(b) if kernels == Kernels::Int8 && input == Input::Narrow && w8a8::available() => {
            Some(Box::new(W8A8Linear::new(w, b)?))
        }
        Some(b) if kernels == Kernels::Int8 => Some(Box::new(QLinear::new(w, b)?)),
        _ if packed::available() => Some(Box::new(PackedLinear::new(w, b)?)),
        _ => None,
    })
}

impl Dense {
    /// `linear` as is, or packed for our CPU kernels ([`packed_layer`]).
    pub(crate) fn from_linear(linear: Linear, kernels: Kernels, input: Input) -> Result<Self> {
        let linear = match packed_layer(linear.weight(), linear.bias(), kernels, input)? {
            Some(p) => Weights::Packed(p),
            None => Weights::Float(linear),
        };
        Ok(Self { linear, kernels })
    }

    /// The float layer; packed layers have none.
    fn float(&self) -> Result<&Linear> {
        match &self.linear {
            Weights::Float(l) => Ok(l),
            Weights::Packed(_) => candle_core::bail!("a packed layer has no candle weight"),
        }
    }
}

fn dense(
    i: usize,
    o: usize,
    bias: bool,
    kernels: Kernels,
    input: Input,
    vb: VarBuilder,
) -> Result<Dense> {
    let mut linear = if bias {
        linear(i, o, vb)?
    } else {
        linear_no_bias(i, o, vb)?
    };
    if kernels == Kernels::Fused
        && i > o
        && bias
        && cpu_kernels::supported(linear.weight())
        && !packed::available()
    {
        // Where layers stay unpacked (no AVX2): for a layer that narrows
        // (CLIP's second MLP layer), the gemm crate runs a short batch (one
        // image: 50 rows) faster reading the weight as [in, out] rows:
        // measured 2.4 -> 2.0 ms for ViT-B/32's 3072 -> 768 at 50 rows, the
        // same at 1,600. Stored so once, kept as the transposed view
        // `Linear` expects; the fused kernel reads it through its strides.
        let kn = linear.weight().t()?.contiguous()?;
        linear = Linear::new(kn.t()?, linear.bias().cloned());
    }
    Dense::from_linear(linear, kernels, input)
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernels.fused() {
            return self.forward_fused(x, None, Epilogue::None);
        }
        // candle-nn's Linear broadcasts the weight over the batch dims and
        // the bias over every row; both gradients then go through the slow
        // leading-dim sum (see `repeat_rows`). Rows-by-weight as one 2-D
        // matmul has plain matmul gradients.
        let linear = self.float()?;
        matmul_rows(x, linear.weight(), |y, rows| match linear.bias() {
            Some(b) => y + repeat_rows(b, rows)?,
            None => Ok(y),
        })
    }
}

/// `x [.., k] · wᵀ` as one 2-D matmul over all rows, `bias(product, rows)`
/// applied to the `[rows, out]` product, then back in `x`'s leading shape.
fn matmul_rows(
    x: &Tensor,
    w: &Tensor,
    bias: impl FnOnce(Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / k.max(1);
    let y = bias(x.reshape((rows, k))?.matmul(&w.t()?)?, rows)?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(out)
}

impl Dense {
    /// The layer as packed f32 for our CPU kernels, if it is (for
    /// [`packed::mlp`], which chains two).
    pub(crate) fn packed_f32(&self) -> Option<&PackedLinear> {
        match &self.linear {
            Weights::Packed(p) => p.as_packed_f32(),
            Weights::Float(_) => None,
        }
    }

    /// Inference: `act(x wᵀ + b) + residual`, in one fused CPU kernel when
    /// the tensors allow, else with candle's ops.
    pub(crate) fn forward_fused(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        epilogue: Epilogue,
    ) -> Result<Tensor> {
        let linear = match &self.linear {
            Weights::Packed(p) => return tiled::forward(p.as_ref(), x, residual, epilogue),
            Weights::Float(l) => l,
        };
        if let (true, Some(b)) = (self.kernels.host(x), linear.bias()) {
            return cpu_kernels::linear(x, linear.weight(), b, residual, epilogue);
        }
        if self.kernels.cublas() {
            // The residual rides in the GEMM only when nothing comes
            // between: an activation applies before it.
            let (inside, after) = match epilogue {
                Epilogue::None => (residual, None),
                _ => (None, residual),
            };
            let y = blas_ops::linear(x, linear.weight(), linear.bias(), inside)?;
            let y = self.activate(y, epilogue)?;
            return match after {
                Some(r) => y + r,
                None => Ok(y),
            };
        }
        // All rows as one 2-D matmul against the transposed weight (one
        // GEMM, where candle-nn's Linear broadcasts the weight into a
        // batched one), then the bias over the rows.
        let y = matmul_rows(x, linear.weight(), |y, _| match linear.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        })?;
        let y = self.activate(y, epilogue)?;
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    /// An epilogue's activation with candle's ops.
    fn activate(&self, y: Tensor, epilogue: Epilogue) -> Result<Tensor> {
        match epilogue {
            Epilogue::None => Ok(y),
            Epilogue::QuickGelu => activate(Activation::QuickGelu, self.kernels, &y),
            Epilogue::GeluTanh => activate(Activation::GeluTanh, self.kernels, &y),
            Epilogue::GeluErf => activate(Activation::Gelu, self.kernels, &y),
        }
    }
}

impl Dense {
    /// Inference: `act(norm(x) wᵀ + b) + residual`. A packed layer folds the
    /// layer norm into packing its activations; otherwise the norm runs
    /// first. Without a norm (post-norm layers) it is
    /// [`Dense::forward_fused`].
    fn forward_normed(
        &self,
        x: &Tensor,
        norm: Option<&Norm>,
        residual: Option<&Tensor>,
        epilogue: Epilogue,
    ) -> Result<Tensor> {
        let Some(norm) = norm else {
            return self.forward_fused(x, residual, epilogue);
        };
        if let (Weights::Packed(p), true, Some(b)) =
            (&self.linear, self.kernels.host(x), norm.ln.bias())
        {
            let norm = (norm.ln.weight(), b, norm.eps);
            return tiled::forward_normed(p.as_ref(), x, norm, residual, epilogue);
        }
        self.forward_fused(&norm.forward(x)?, residual, epilogue)
    }
}

/// Which keys each query attends to in one forward pass: as our CPU kernel
/// takes it, and as the additive tensor (0 or -inf) candle's ops add to the
/// scores.
struct Mask {
    visible: Visible,
    additive: Option<Tensor>,
}

impl Mask {
    fn all() -> Self {
        Self {
            visible: Visible::All,
            additive: None,
        }
    }

    /// `visible` for a batch of `b` sequences of `t` tokens.
    fn new(visible: Visible, b: usize, t: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let additive = visible.additive(b, t, dev)?.to_dtype(dtype)?;
        Ok(Self {
            visible,
            additive: Some(additive),
        })
    }
}

/// An attention block's weight names under its prefix.
struct AttentionNames {
    q: &'static str,
    k: &'static str,
    v: &'static str,
    out: &'static str,
}

/// CLIP's and SigLIP's (`self_attn.q_proj`, ...).
const CLIP_ATTENTION: AttentionNames = AttentionNames {
    q: "q_proj",
    k: "k_proj",
    v: "v_proj",
    out: "out_proj",
};

/// BERT's (`attention.self.query`, ..., `attention.output.dense`).
const BERT_ATTENTION: AttentionNames = AttentionNames {
    q: "self.query",
    k: "self.key",
    v: "self.value",
    out: "output.dense",
};

/// The query/key/value projections: three layers as in the checkpoint, or,
/// for the fused CPU kernels, one packed `[3d, d]` layer (one matmul instead
/// of three, and the attention kernel reads heads from it in place).
enum Qkv {
    Separate(Box<[Dense; 3]>),
    Packed(Dense),
}

struct Attention {
    qkv: Qkv,
    out: Dense,
    heads: usize,
    head_dim: usize,
    scale: f64,
    kernels: Kernels,
}

impl Attention {
    fn new(
        c: &TowerConfig,
        kernels: Kernels,
        vb: VarBuilder,
        names: &AttentionNames,
    ) -> Result<Self> {
        let d = c.hidden_size;
        let head_dim = d / c.num_attention_heads;
        // Quantised, if at all, after packing.
        let float = if kernels.fused() {
            Kernels::Fused
        } else {
            kernels
        };
        // candle's layers first: packed, if at all, after concatenation.
        let (ql, kl, vl) = (
            linear(d, d, vb.pp(names.q))?,
            linear(d, d, vb.pp(names.k))?,
            linear(d, d, vb.pp(names.v))?,
        );
        let scale = (head_dim as f64).powf(-0.5);
        let qkv = match (ql.bias(), kl.bias(), vl.bias()) {
            (Some(qb), Some(kb), Some(vb)) if kernels.gpu_graph() || kernels.host(ql.weight()) => {
                // The portable path scales the queries through their
                // weights, saving a pass over q (exact for CLIP's head dim
                // 64: the scale is 1/8, a power of two).
                let (qw, qb) = if kernels.gpu_graph() {
                    ((ql.weight() * scale)?, (qb * scale)?)
                } else {
                    (ql.weight().clone(), qb.clone())
                };
                // The separate tensors are dropped: packing costs no memory.
                let weight = Tensor::cat(&[&qw, kl.weight(), vl.weight()], 0)?;
                let bias = Tensor::cat(&[&qb, kb, vb], 0)?;
                Qkv::Packed(Dense::from_linear(
                    Linear::new(weight, Some(bias)),
                    kernels,
                    Input::Narrow,
                )?)
            }
            _ => Qkv::Separate(Box::new([
                Dense::from_linear(ql, float, Input::Narrow)?,
                Dense::from_linear(kl, float, Input::Narrow)?,
                Dense::from_linear(vl, float, Input::Narrow)?,
            ])),
        };
        Ok(Self {
            qkv,
            out: dense(d, d, true, kernels, Input::Wide, vb.pp(names.out))?,
            heads: c.num_attention_heads,
            head_dim,
            scale,
            kernels,
        })
    }

    /// Attention plus the residual, `x + out(attention(norm(x)))` (no norm:
    /// post-norm layers norm the sum instead).
    fn forward_residual(&self, x: &Tensor, norm: Option<&Norm>, mask: &Mask) -> Result<Tensor> {
        let heads = self.heads_output(x, norm, mask)?;
        self.project_residual(&heads, x)
    }

    /// `x + out(heads)`: the output projection of [`Self::heads_output`]'s
    /// rows, plus the residual rows `x` (the same shape).
    fn project_residual(&self, heads: &Tensor, x: &Tensor) -> Result<Tensor> {
        if self.kernels.fused() {
            return self.out.forward_fused(heads, Some(x), Epilogue::None);
        }
        x + self.out.forward(heads)?
    }

    /// The heads' outputs merged, `[b, t, d]`, before the output projection.
    fn heads_output(&self, x: &Tensor, norm: Option<&Norm>, mask: &Mask) -> Result<Tensor> {
        let (q, k, v) = match &self.qkv {
            Qkv::Packed(qkv) if self.kernels.host(x) => {
                let qkv = qkv.forward_normed(x, norm, None, Epilogue::None)?;
                return cpu_kernels::attention(&qkv, self.heads, mask.visible.clone());
            }
            Qkv::Packed(qkv) if self.kernels == Kernels::Portable => {
                let qkv = qkv.forward_normed(x, norm, None, Epilogue::None)?;
                return self.portable_attention(&qkv, mask.additive.as_ref());
            }
            Qkv::Packed(qkv) if self.kernels.cublas() => {
                let qkv = qkv.forward_normed(x, norm, None, Epilogue::None)?;
                let rows = self.kernels == Kernels::Cuda;
                return blas_ops::attention(&qkv, self.heads, mask.additive.as_ref(), rows);
            }
            Qkv::Packed(qkv) => {
                let d = self.heads * self.head_dim;
                let qkv = qkv.forward_normed(x, norm, None, Epilogue::None)?;
                (
                    qkv.narrow(2, 0, d)?,
                    qkv.narrow(2, d, d)?,
                    qkv.narrow(2, 2 * d, d)?,
                )
            }
            Qkv::Separate(qkv) => {
                let h = match norm {
                    Some(n) => n.forward(x)?,
                    None => x.clone(),
                };
                (
                    qkv[0].forward(&h)?,
                    qkv[1].forward(&h)?,
                    qkv[2].forward(&h)?,
                )
            }
        };
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let mut w = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(m) = &mask.additive {
            w = w.broadcast_add(m)?;
        }
        let w = softmax(self.kernels, &w)?;
        w.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
    }

    /// Attention from packed `[b, t, 3d]` projections whose queries are
    /// already scaled: one copy splits the heads of q, k and v at once,
    /// then two batched matmuls around candle's fused last-dim softmax.
    fn portable_attention(&self, qkv: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let (h, dh) = (self.heads, self.head_dim);
        let qkv = qkv
            .reshape((b, t, 3, h, dh))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let (q, k, v) = (qkv.i(0)?, qkv.i(1)?, qkv.i(2)?);
        let mut w = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            w = w.broadcast_add(m)?;
        }
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        w.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * dh))
    }
}

/// The MLP with its residual, `x + fc2(act(fc1(norm(x))))` (`fc1`/`fc2`:
/// BERT's `intermediate.dense` / `output.dense`).
struct Mlp {
    fc1: Dense,
    fc2: Dense,
    act: Activation,
    kernels: Kernels,
}

impl Mlp {
    fn new(
        d: usize,
        c: &TowerConfig,
        kernels: Kernels,
        fc1: VarBuilder,
        fc2: VarBuilder,
    ) -> Result<Self> {
        let inner = c.intermediate_size;
        if kernels.gpu_graph() && c.activation == Activation::QuickGelu {
            // QuickGELU(h) = h·σ(1.702 h) = silu(1.702 h) / 1.702: with
            // 1.702 folded into fc1 and 1/1.702 into fc2, the activation is
            // candle's one silu kernel instead of three (scale, sigmoid,
            // product), each a pass over the widest activations (4× the
            // hidden size) on the GPU.
            // Scaled in f32, then rounded once to the model's dtype.
            let dtype = fc1.dtype();
            let scaled = |vb: VarBuilder, i: usize, o: usize, by: f64, bias: bool| {
                let l = linear(i, o, vb.set_dtype(DType::F32))?;
                let w = (l.weight() * by)?.to_dtype(dtype)?;
                let b = match l.bias() {
                    Some(b) if bias => Some((b * by)?.to_dtype(dtype)?),
                    b => b.map(|b| b.to_dtype(dtype)).transpose()?,
                };
                Ok::<_, candle_core::Error>(Linear::new(w, b))
            };
            let (l1, l2) = (
                scaled(fc1, d, inner, QUICK_GELU, true)?,
                scaled(fc2, inner, d, 1.0 / QUICK_GELU, false)?,
            );
            return Ok(Self {
                fc1: Dense::from_linear(l1, kernels, Input::Narrow)?,
                fc2: Dense::from_linear(l2, kernels, Input::Narrow)?,
                act: Activation::Silu,
                kernels,
            });
        }
        Ok(Self {
            fc1: dense(d, inner, true, kernels, Input::Narrow, fc1)?,
            fc2: dense(inner, d, true, kernels, Input::Narrow, fc2)?,
            act: c.activation,
            kernels,
        })
    }

    fn forward_residual(&self, x: &Tensor, norm: Option<&Norm>) -> Result<Tensor> {
        if self.kernels.fused() {
            // The activations our kernels apply as they store the product
            // (in cache, on every core); others run after it.
            let fused = match self.act {
                Activation::QuickGelu => Some(Epilogue::QuickGelu),
                Activation::GeluTanh => Some(Epilogue::GeluTanh),
                Activation::Gelu => Some(Epilogue::GeluErf),
                _ => None,
            };
            let h = match fused {
                Some(epilogue) => self.fc1.forward_normed(x, norm, None, epilogue)?,
                None => activate(
                    self.act,
                    self.kernels,
                    &self.fc1.forward_normed(x, norm, None, Epilogue::None)?,
                )?,
            };
            return self.fc2.forward_fused(&h, Some(x), Epilogue::None);
        }
        let h = match norm {
            Some(n) => self.fc1.forward(&n.forward(x)?)?,
            None => self.fc1.forward(x)?,
        };
        let h = activate(self.act, self.kernels, &h)?;
        x + self.fc2.forward(&h)?
    }
}

/// One encoder layer: attention then MLP, each with its residual; the layer
/// norms before each block (CLIP, SigLIP) or after each sum (BERT).
struct Layer {
    ln1: Norm,
    attn: Attention,
    ln2: Norm,
    mlp: Mlp,
    post_norm: bool,
}

impl Layer {
    /// A pre-norm layer under CLIP's names.
    fn new(c: &TowerConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        let eps = c.layer_norm_eps;
        let mlp = vb.pp("mlp");
        Ok(Self {
            ln1: norm(d, eps, kernels, vb.pp("layer_norm1"))?,
            attn: Attention::new(c, kernels, vb.pp("self_attn"), &CLIP_ATTENTION)?,
            ln2: norm(d, eps, kernels, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(d, c, kernels, mlp.pp("fc1"), mlp.pp("fc2"))?,
            post_norm: false,
        })
    }

    /// A post-norm BERT layer (`BertLayer`'s names).
    fn bert(c: &TowerConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        let eps = c.layer_norm_eps;
        let attn = vb.pp("attention");
        Ok(Self {
            ln1: norm(d, eps, kernels, attn.pp("output.LayerNorm"))?,
            attn: Attention::new(c, kernels, attn, &BERT_ATTENTION)?,
            ln2: norm(d, eps, kernels, vb.pp("output.LayerNorm"))?,
            mlp: Mlp::new(
                d,
                c,
                kernels,
                vb.pp("intermediate.dense"),
                vb.pp("output.dense"),
            )?,
            post_norm: true,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Mask) -> Result<Tensor> {
        if self.post_norm {
            let x = self
                .ln1
                .forward(&self.attn.forward_residual(x, None, mask)?)?;
            return self.ln2.forward(&self.mlp.forward_residual(&x, None)?);
        }
        let x = self.attn.forward_residual(x, Some(&self.ln1), mask)?;
        self.mlp.forward_residual(&x, Some(&self.ln2))
    }

    /// [`Self::forward`]'s output at one position per sequence, `[b, 1,
    /// d]`: row `i`'s position `pool[i]` (gathered by [`pooled_rows`]).
    /// Attention reads every position, so the keys and values are computed
    /// for all of them; the output projection and the MLP, three quarters
    /// of a layer's work, only for the rows wanted. Each row's result does
    /// not depend on the others', so it is the row `forward` would give.
    fn forward_at(&self, x: &Tensor, mask: &Mask, pool: &Tensor) -> Result<Tensor> {
        let norm = (!self.post_norm).then_some(&self.ln1);
        let heads = pooled_rows(&self.attn.heads_output(x, norm, mask)?, pool)?;
        let x = self.attn.project_residual(&heads, &pooled_rows(x, pool)?)?;
        if self.post_norm {
            let x = self.ln1.forward(&x)?;
            return self.ln2.forward(&self.mlp.forward_residual(&x, None)?);
        }
        self.mlp.forward_residual(&x, Some(&self.ln2))
    }
}

/// Flat row indices `i · t + pool[i]` into a `[b, t, ..]` batch, for
/// [`pooled_rows`].
fn pool_index(pool: &[usize], t: usize, dev: &Device) -> Result<Tensor> {
    let flat: Vec<u32> = pool
        .iter()
        .enumerate()
        .map(|(i, p)| (i * t + p) as u32)
        .collect();
    Tensor::new(flat.as_slice(), dev)
}

/// Rows `index` (from [`pool_index`]) of `x [b, t, d]`, as `[b, 1, d]`.
fn pooled_rows(x: &Tensor, index: &Tensor) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    x.reshape((b * t, d))?
        .index_select(index, 0)?
        .reshape((index.dim(0)?, 1, d))
}

struct Encoder(Vec<Layer>);

impl Encoder {
    fn new(c: &TowerConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        (0..c.num_hidden_layers)
            .map(|i| Layer::new(c, kernels, vb.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()
            .map(Self)
    }

    /// BERT's encoder (`encoder.layer.{i}`).
    fn bert(c: &TowerConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        (0..c.num_hidden_layers)
            .map(|i| Layer::bert(c, kernels, vb.pp(format!("layer.{i}"))))
            .collect::<Result<_>>()
            .map(Self)
    }

    fn forward(&self, x: &Tensor, mask: &Mask) -> Result<Tensor> {
        self.0
            .iter()
            .try_fold(x.clone(), |x, l| l.forward(&x, mask))
    }

    /// The last layer's output at one position per sequence (`pool`, from
    /// [`pool_index`]), `[b, 1, d]`: what a tower that pools one token
    /// reads. The last layer runs its output projection and MLP on those
    /// rows only ([`Layer::forward_at`]): at 77-token texts that is 6 % of
    /// the encoder's work saved, the same share at 50-patch images.
    fn forward_pooled(&self, x: &Tensor, mask: &Mask, pool: &Tensor) -> Result<Tensor> {
        match self.0.split_last() {
            Some((last, rest)) => {
                let x = rest
                    .iter()
                    .try_fold(x.clone(), |x, l| l.forward(&x, mask))?;
                last.forward_at(&x, mask, pool)
            }
            None => pooled_rows(x, pool),
        }
    }
}

/// The text tower with its projection.
pub struct TextTower {
    token: Embedding,
    /// Position embeddings; BERT's token-type 0 embedding is folded in (every
    /// token is type 0, and `(w + t) + p` and `w + (p + t)` differ only in
    /// rounding).
    position: Embedding,
    /// BERT's layer norm over the embeddings.
    embed_ln: Option<Norm>,
    encoder: Encoder,
    /// CLIP's and SigLIP's final layer norm (BERT's layers end normed).
    final_ln: Option<Norm>,
    projection: Dense,
    context: usize,
    attends: TextAttention,
    kernels: Kernels,
}

/// How a text tower's tokens attend to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextAttention {
    /// CLIP: each token to those before it.
    Causal,
    /// SigLIP, MobileCLIP S0–S2: every token to every token, padding
    /// included (as trained).
    All,
    /// BERT: every token to the sequence's own tokens, not its padding.
    Unpadded,
}

impl TextTower {
    fn new(c: &ClipConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let t = &c.text;
        let d = t.tower.hidden_size;
        let eps = t.tower.layer_norm_eps;
        let context = t.max_position_embeddings;
        if c.family == Family::ChineseClip {
            let emb = vb.pp("embeddings");
            let position = emb.get((context, d), "position_embeddings.weight")?;
            // Only type 0 is ever used: its row, not the whole table.
            let type0 = emb
                .get((t.type_vocab_size, d), "token_type_embeddings.weight")?
                .i(0)?;
            return Ok(Self {
                token: embedding(t.vocab_size, d, emb.pp("word_embeddings"))?,
                position: Embedding::new(position.broadcast_add(&type0)?, d),
                embed_ln: Some(norm(d, eps, kernels, emb.pp("LayerNorm"))?),
                encoder: Encoder::bert(&t.tower, kernels, vb.pp("encoder"))?,
                final_ln: None,
                projection: dense(
                    d,
                    c.projection_dim,
                    false,
                    kernels,
                    Input::Narrow,
                    vb.root().pp("text_projection"),
                )?,
                context,
                attends: TextAttention::Unpadded,
                kernels,
            });
        }
        // CLIP: a bias-free `text_projection` beside the tower; SigLIP: the
        // tower's own `head`, with a bias.
        let projection = match c.family {
            Family::Siglip => dense(
                d,
                c.projection_dim,
                true,
                kernels,
                Input::Narrow,
                vb.pp("head"),
            )?,
            _ => dense(
                d,
                c.projection_dim,
                false,
                kernels,
                Input::Narrow,
                vb.root().pp("text_projection"),
            )?,
        };
        Ok(Self {
            token: embedding(t.vocab_size, d, vb.pp("embeddings.token_embedding"))?,
            position: embedding(context, d, vb.pp("embeddings.position_embedding"))?,
            embed_ln: None,
            encoder: Encoder::new(&t.tower, kernels, vb.pp("encoder"))?,
            final_ln: Some(norm(d, eps, kernels, vb.pp("final_layer_norm"))?),
            projection,
            context,
            attends: if t.causal {
                TextAttention::Causal
            } else {
                TextAttention::All
            },
            kernels,
        })
    }

    /// Projected (not normalised) features for a `[batch, len]` u32 tensor of
    /// token ids, pooled at `pool[i]` for row `i` (CLIP: the first
    /// end-of-text position, after which padding cannot change the result,
    /// the mask being causal; SigLIP: the last position of a sequence padded
    /// to the context; Chinese-CLIP: the first, `[CLS]`; see
    /// [`crate::ClipTokenizer::batch`]). Every token of every row is read as
    /// part of its sequence: a batch padded for Chinese-CLIP goes through
    /// [`TextTower::forward_padded`].
    pub fn forward(&self, ids: &Tensor, pool: &[usize]) -> Result<Tensor> {
        self.forward_padded(ids, pool, None)
    }

    /// [`TextTower::forward`] for a padded batch: row `i` holds `lens[i]`
    /// tokens, then padding. A tower that masks its padding (Chinese-CLIP's
    /// BERT) hides it from attention; CLIP (causal, pooled before its
    /// padding) and SigLIP (trained on padding it attends to) read the same
    /// rows either way.
    pub fn forward_padded(
        &self,
        ids: &Tensor,
        pool: &[usize],
        lens: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.context {
            candle_core::bail!(
                "sequence of {t} tokens exceeds the context of {}",
                self.context
            );
        }
        if pool.len() != b || lens.is_some_and(|l| l.len() != b) {
            candle_core::bail!("a batch of {b} sequences needs {b} pool positions and lengths");
        }
        let dev = ids.device();
        let mut x = if self.kernels == Kernels::Cuda {
            // One pass on CUDA (our kernel), candle's ops elsewhere.
            let pos = self.position.embeddings().narrow(0, 0, t)?;
            crate::elementwise::token_rows(self.token.embeddings(), ids, &pos, true)?
        } else {
            let pos = Tensor::arange(0u32, t as u32, dev)?;
            add_positions(
                &self.token.forward(ids)?,
                &self.position.forward(&pos)?,
                self.kernels,
            )?
        };
        if let Some(ln) = &self.embed_ln {
            x = ln.forward(&x)?;
        }
        let mask = match (self.attends, lens) {
            (TextAttention::Causal, _) => Mask::new(Visible::Causal, b, t, x.dtype(), dev)?,
            (TextAttention::Unpadded, Some(lens)) if lens.iter().any(|&n| n < t) => {
                Mask::new(Visible::Prefix(lens.to_vec()), b, t, x.dtype(), dev)?
            }
            _ => Mask::all(),
        };
        if let Some(&p) = pool.iter().find(|&&p| p >= t) {
            candle_core::bail!("pool position {p} outside a sequence of {t} tokens");
        }
        let idx = pool_index(pool, t, dev)?;
        // `[b, 1, d]`; the final norm is per row, so it runs on these only.
        let mut x = self.encoder.forward_pooled(&x, &mask, &idx)?;
        if let Some(ln) = &self.final_ln {
            x = ln.forward(&x)?;
        }
        self.projection.forward(&x.squeeze(1)?)
    }
}

/// `x [b, t, d] + pos [t, d]`, broadcast over the batch.
fn add_positions(x: &Tensor, pos: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Fused | Kernels::Int8 | Kernels::Portable | Kernels::Cublas | Kernels::Cuda => {
            x.broadcast_add(pos)
        }
        Kernels::Differentiable => {
            let b = x.dim(0)?;
            x + repeat_rows(pos, b)?.reshape(x.shape())?
        }
    }
}

/// The vision tower with its pooling and projection: a transformer
/// (CLIP, SigLIP, Chinese-CLIP) or MobileCLIP's FastViT.
pub struct VisionTower(VisionKind);

enum VisionKind {
    Vit(Box<Vit>),
    FastVit(Box<crate::fastvit::FastVit>),
}

impl VisionTower {
    fn new(c: &ClipConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        Ok(Self(match &c.vision.timm {
            Some(TimmTower::FastVit(name)) => {
                VisionKind::FastVit(Box::new(crate::fastvit::FastVit::new(
                    name,
                    c.projection_dim,
                    kernels,
                    vb.root().pp("visual.trunk"),
                )?))
            }
            Some(TimmTower::Vit(t)) => VisionKind::Vit(Box::new(Vit::timm(c, t, kernels, vb)?)),
            None => VisionKind::Vit(Box::new(Vit::new(c, kernels, vb)?)),
        }))
    }

    /// Projected (not normalised) features for `[batch, 3, size, size]` pixels.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        match &self.0 {
            VisionKind::Vit(v) => v.forward(pixels),
            VisionKind::FastVit(f) => f.forward(pixels),
        }
    }

    /// SigLIP 2 NaFlex ([`crate::VisionConfig::naflex_grid`]): projected
    /// (not normalised) features for `patches [batch, gh · gw, p · p · 3]`,
    /// images of one grid `(gh, gw)` of patches, each patch's normalised
    /// pixels in (row, column, channel) order (transformers'
    /// `convert_image_to_patches`). Unpadded: images of other grids go in
    /// batches of their own, which computes what transformers' padded and
    /// masked batch does.
    pub fn forward_patches(&self, patches: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
        match &self.0 {
            VisionKind::Vit(v) => v.forward_patches(patches, grid),
            VisionKind::FastVit(_) => {
                candle_core::bail!("a FastViT tower takes pixels, not NaFlex patches")
            }
        }
    }
}

/// A transformer vision tower.
struct Vit {
    /// CLIP's class token; SigLIP has none.
    class: Option<Tensor>,
    patch: PatchEmbed,
    /// The patch embedding as a packed matmul over unfolded patches (int8
    /// or f32, see [`packed_layer`]) on the CPU.
    patch_packed: Option<Box<dyn TiledLinear>>,
    /// One row per token, the class token's first (zeros where the class
    /// token has no position, as in timm's `no_embed_class`).
    position: Embedding,
    /// CLIP's norm before the encoder; SigLIP has none.
    pre_ln: Option<Norm>,
    encoder: Encoder,
    post_ln: Norm,
    pool: VisionPool,
    positions: usize,
    patch_size: usize,
    /// NaFlex: the side of the square grid of positions, which
    /// [`Vit::forward_patches`] resizes to each image's grid.
    naflex_grid: Option<usize>,
    kernels: Kernels,
}

/// How pixels become patch tokens.
enum PatchEmbed {
    /// A convolution over non-overlapping patches (CLIP, SigLIP, timm's
    /// `PatchEmbed`).
    Conv(Conv2d),
    /// MobileCLIP-B's convolutional stem.
    Stem(ConvStem),
    /// SigLIP 2 NaFlex: a linear layer over each patch's pixels, which come
    /// unfolded.
    Linear(Dense),
}

/// How the encoder's output becomes one vector.
enum VisionPool {
    /// CLIP: the class token, normed, through a bias-free projection (timm:
    /// its head, with bias).
    Class(Dense),
    /// SigLIP: attention pooling over every normed patch.
    Attention(Box<AttentionPool>),
}

impl Vit {
    fn new(c: &ClipConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let v = &c.vision;
        let d = v.tower.hidden_size;
        let grid = v.image_size / v.patch_size;
        // CLIP's vision tower, which Chinese-CLIP shares; or SigLIP's.
        let clip = c.family != Family::Siglip;
        let positions = grid * grid + usize::from(clip);
        let conv = Conv2dConfig {
            stride: v.patch_size,
            ..Default::default()
        };
        let eps = v.tower.layer_norm_eps;
        let emb = vb.pp("embeddings");
        if let Some(g) = v.naflex_grid {
            return Self::naflex(c, g, kernels, vb);
        }
        let patch = if clip {
            conv2d_no_bias(
                v.num_channels,
                d,
                v.patch_size,
                conv,
                emb.pp("patch_embedding"),
            )?
        } else {
            conv2d(
                v.num_channels,
                d,
                v.patch_size,
                conv,
                emb.pp("patch_embedding"),
            )?
        };
        let patch_packed = packed_patches(&patch, kernels)?;
        let pool = if clip {
            VisionPool::Class(dense(
                d,
                c.projection_dim,
                false,
                kernels,
                Input::Narrow,
                vb.root().pp("visual_projection"),
            )?)
        } else {
            VisionPool::Attention(Box::new(AttentionPool::new(
                &v.tower,
                kernels,
                vb.pp("head"),
            )?))
        };
        Ok(Self {
            class: clip.then(|| emb.get(d, "class_embedding")).transpose()?,
            patch: PatchEmbed::Conv(patch),
            patch_packed,
            position: embedding(positions, d, emb.pp("position_embedding"))?,
            // "pre_layrnorm" is the real (misspelt) Hugging Face name.
            pre_ln: clip
                .then(|| norm(d, eps, kernels, vb.pp("pre_layrnorm")))
                .transpose()?,
            encoder: Encoder::new(&v.tower, kernels, vb.pp("encoder"))?,
            post_ln: norm(d, eps, kernels, vb.pp("post_layernorm"))?,
            pool,
            positions,
            patch_size: v.patch_size,
            naflex_grid: None,
            kernels,
        })
    }

    /// SigLIP 2 NaFlex's tower: SigLIP's, with a linear patch embedding
    /// and a `grid × grid` table of positions that is resized per image.
    fn naflex(c: &ClipConfig, grid: usize, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let v = &c.vision;
        let d = v.tower.hidden_size;
        let emb = vb.pp("embeddings");
        let p = v.patch_size;
        let patch = dense(
            v.num_channels * p * p,
            d,
            true,
            kernels,
            Input::Narrow,
            emb.pp("patch_embedding"),
        )?;
        Ok(Self {
            class: None,
            patch: PatchEmbed::Linear(patch),
            patch_packed: None,
            position: embedding(grid * grid, d, emb.pp("position_embedding"))?,
            pre_ln: None,
            encoder: Encoder::new(&v.tower, kernels, vb.pp("encoder"))?,
            post_ln: norm(d, v.tower.layer_norm_eps, kernels, vb.pp("post_layernorm"))?,
            pool: VisionPool::Attention(Box::new(AttentionPool::new(
                &v.tower,
                kernels,
                vb.pp("head"),
            )?)),
            positions: grid * grid,
            patch_size: p,
            naflex_grid: Some(grid),
            kernels,
        })
    }

    /// See [`VisionTower::forward_patches`].
    fn forward_patches(&self, patches: &Tensor, (gh, gw): (usize, usize)) -> Result<Tensor> {
        let (PatchEmbed::Linear(linear), Some(grid)) = (&self.patch, self.naflex_grid) else {
            candle_core::bail!("only a NaFlex tower takes patches; this one takes pixels")
        };
        let (b, n, _) = patches.dims3()?;
        if n != gh * gw || n == 0 {
            candle_core::bail!("{n} patches for a {gh}x{gw} grid");
        }
        let x = linear.forward(patches)?;
        // The positions in f32 (as transformers resizes them), then in the
        // model's dtype.
        let weights = naflex_position_weights(grid, (gh, gw));
        let weights = Tensor::from_vec(weights, (n, grid * grid), patches.device())?;
        let table = self.position.embeddings().to_dtype(DType::F32)?;
        let pos = weights.matmul(&table)?.to_dtype(x.dtype())?;
        let x = add_positions(&x, &pos, self.kernels)?;
        self.encode(x, b)
    }

    /// Projected (not normalised) features for `[batch, 3, size, size]` pixels.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        // The unfolded matmul beats candle's convolutions on every device:
        // the gemm crate's kernel against a tiled loop on the CPU, and on
        // CUDA one reshaping copy and one GEMM against an im2col kernel and
        // a GEMM (the patches do not overlap, so unfolding is a permute).
        let mut x = match &self.patch {
            PatchEmbed::Conv(conv) if self.kernels.cublas() => {
                let x = self.embed_by_cublas(conv, pixels)?;
                return self.encode(x, b);
            }
            PatchEmbed::Conv(conv) => self.patches_by_matmul(conv, pixels)?,
            PatchEmbed::Stem(stem) => stem.forward(pixels)?,
            PatchEmbed::Linear(_) => {
                candle_core::bail!("a NaFlex tower takes patches (forward_patches), not pixels")
            }
        };
        if x.dim(1)? + usize::from(self.class.is_some()) != self.positions {
            candle_core::bail!(
                "pixels {:?} make {} patches, the model has {} positions",
                pixels.dims(),
                x.dim(1)?,
                self.positions
            );
        }
        let d = x.dim(2)?;
        if let Some(class) = &self.class {
            let cls = match self.kernels {
                Kernels::Fused
                | Kernels::Int8
                | Kernels::Portable
                | Kernels::Cublas
                | Kernels::Cuda => class.reshape((1, 1, d))?.broadcast_as((b, 1, d))?,
                Kernels::Differentiable => repeat_rows(class, b)?.reshape((b, 1, d))?,
            };
            x = Tensor::cat(&[&cls, &x], 1)?;
        }
        let pos = Tensor::arange(0u32, self.positions as u32, pixels.device())?;
        let x = add_positions(&x, &self.position.forward(&pos)?, self.kernels)?;
        self.encode(x, b)
    }

    /// The encoder, pooling and projection over the embedded tokens `x
    /// [b, positions, d]`.
    fn encode(&self, mut x: Tensor, b: usize) -> Result<Tensor> {
        if let Some(pre_ln) = &self.pre_ln {
            x = pre_ln.forward(&x)?;
        }
        match &self.pool {
            VisionPool::Class(projection) => {
                // Only the class token's row of the last layer is read.
                let first = pool_index(&vec![0; b], x.dim(1)?, x.device())?;
                let cls = self.encoder.forward_pooled(&x, &Mask::all(), &first)?;
                projection.forward(&self.post_ln.forward(&cls.squeeze(1)?)?)
            }
            VisionPool::Attention(head) => {
                head.forward(&self.encoder.forward(&x, &Mask::all())?, &self.post_ln)
            }
        }
    }
}

/// The weights `[gh · gw][grid · grid]` (row-major) that resize a `grid ×
/// grid` table of positions to a `gh × gw` one: transformers'
/// `Siglip2VisionEmbeddings.resize_positional_embeddings`, i.e.
/// `F.interpolate(mode="bilinear", align_corners=False, antialias=True)`
/// written out: along each axis a triangle filter as wide as the scale
/// when shrinking (so every source cell counts), 1 when stretching,
/// normalised to sum to 1; the 2-D weights are the product of the axes'.
fn naflex_position_weights(grid: usize, (gh, gw): (usize, usize)) -> Vec<f32> {
    // f32 throughout, as transformers computes them.
    let axis = |n: usize| -> Vec<f32> {
        let scale = grid as f32 / n as f32;
        let support = scale.max(1.0);
        let mut w = vec![0f32; n * grid];
        for (i, row) in w.chunks_exact_mut(grid).enumerate() {
            let center = (i as f32 + 0.5) * scale - 0.5;
            for (j, x) in row.iter_mut().enumerate() {
                *x = (1.0 - (j as f32 - center).abs() / support).max(0.0);
            }
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= sum);
        }
        w
    };
    let (rows, cols) = (axis(gh), axis(gw));
    let mut out = Vec::with_capacity(gh * gw * grid * grid);
    for r in rows.chunks_exact(grid) {
        for c in cols.chunks_exact(grid) {
            for y in r {
                out.extend(c.iter().map(|x| y * x));
            }
        }
    }
    out
}

/// The patch embedding as a packed layer over unfolded patches, where the
/// CPU runs packed layers: 2.6 % of ViT-B/32's multiply-adds, but 3.3 % of
/// an int8 image forward while it ran in f32 (the f32 gemm's share of the
/// profile went from 4.7 to 1.4 %).
fn packed_patches(patch: &Conv2d, kernels: Kernels) -> Result<Option<Box<dyn TiledLinear>>> {
    if !cpu_kernels::supported(patch.weight()) {
        return Ok(None);
    }
    let w = patch.weight().flatten_from(1)?;
    let bias = match patch.bias() {
        Some(b) => b.clone(),
        None => Tensor::zeros(w.dim(0)?, DType::F32, w.device())?,
    };
    packed_layer(&w, Some(&bias), kernels, Input::Narrow)
}

impl Vit {
    /// A timm `VisionTransformer` in open_clip's checkpoint
    /// (`visual.trunk.*`): its width, depth, MLP width and patch embedding
    /// (a patch convolution or MobileCLIP-B's stem) read from the weights,
    /// what they cannot show from the name ([`TimmVit`]). The blocks are
    /// CLIP's pre-norm layers (exact GELU), read under CLIP's names through
    /// [`crate::weights::OpenClipNames`]; pooled at the class token after
    /// the final norm, through the head (with bias) into the joint space.
    fn timm(c: &ClipConfig, t: &TimmVit, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let trunk = vb.root().pp("visual.trunk");
        let dtype = vb.dtype();
        let get = |name: &str| trunk.get_unchecked_dtype(name, dtype);
        for (name, what) in [
            ("blocks.0.ls1.gamma", "layer scale"),
            ("blocks.0.attn.q_norm.weight", "query/key norms"),
            ("reg_token", "register tokens"),
            ("fc_norm.weight", "a norm after pooling"),
            ("attn_pool.latent", "attention pooling"),
        ] {
            if trunk.contains_tensor(name) {
                candle_core::bail!("{}: {what} (`{name}`) is not supported", t.name);
            }
        }
        let class = get("cls_token")?;
        let d = class.elem_count();
        let class = class.reshape(d)?;
        let mut layers = 0;
        while trunk.contains_tensor(&format!("blocks.{layers}.attn.qkv.weight")) {
            layers += 1;
        }
        let mlp = get("blocks.0.mlp.fc1.weight")?.dim(0)?;
        if layers == 0 || !d.is_multiple_of(TimmVit::HEAD_DIM) {
            candle_core::bail!(
                "{}: {layers} blocks of width {d} (at least one, in heads of {})",
                t.name,
                TimmVit::HEAD_DIM
            );
        }
        let tower = TowerConfig {
            hidden_size: d,
            intermediate_size: mlp,
            num_hidden_layers: layers,
            num_attention_heads: d / TimmVit::HEAD_DIM,
            activation: Activation::Gelu,
            layer_norm_eps: t.layer_norm_eps,
        };
        let (patch, patch_packed, patch_size) = if trunk.contains_tensor("patch_embed.proj.weight")
        {
            let w = get("patch_embed.proj.weight")?;
            let (o, _, p, p2) = w.dims4()?;
            if o != d || p != p2 {
                candle_core::bail!("{}: a patch embedding of shape {:?}", t.name, w.dims());
            }
            let bias = trunk
                .contains_tensor("patch_embed.proj.bias")
                .then(|| get("patch_embed.proj.bias"))
                .transpose()?;
            let conv = Conv2d::new(
                w,
                bias,
                Conv2dConfig {
                    stride: p,
                    ..Default::default()
                },
            );
            let packed = packed_patches(&conv, kernels)?;
            (PatchEmbed::Conv(conv), packed, p)
        } else {
            let stem = ConvStem::new(&trunk.pp("patch_embed.backbone"), kernels, dtype)?;
            if stem.width() != d {
                candle_core::bail!(
                    "{}: the stem makes {}-wide tokens, not {d}",
                    t.name,
                    stem.width()
                );
            }
            let p = stem.patch_size();
            (PatchEmbed::Stem(stem), None, p)
        };
        let grid = c.vision.image_size / patch_size;
        if grid == 0 || grid * patch_size != c.vision.image_size {
            candle_core::bail!(
                "{}: {}-pixel images do not split into {patch_size}-pixel patches",
                t.name,
                c.vision.image_size
            );
        }
        let positions = grid * grid + 1;
        let pos = get("pos_embed")?;
        let pos = pos.reshape((pos.elem_count() / d, d))?;
        let pos = if t.class_position {
            pos
        } else {
            Tensor::cat(&[&Tensor::zeros((1, d), dtype, pos.device())?, &pos], 0)?
        };
        if pos.dim(0)? != positions {
            candle_core::bail!(
                "{}: {} position embeddings for {positions} tokens ({grid}×{grid} patches \
                 and the class token)",
                t.name,
                pos.dim(0)?
            );
        }
        let head_w = get("head.weight")?;
        if head_w.dims() != [c.projection_dim, d] {
            candle_core::bail!(
                "{}: a head of shape {:?}, [{}, {d}] expected (embed_dim, width)",
                t.name,
                head_w.dims(),
                c.projection_dim
            );
        }
        let head = Linear::new(head_w, Some(get("head.bias")?));
        let eps = t.layer_norm_eps;
        Ok(Self {
            class: Some(class),
            patch,
            patch_packed,
            position: Embedding::new(pos, d),
            pre_ln: trunk
                .contains_tensor("norm_pre.weight")
                .then(|| norm(d, eps, kernels, trunk.pp("norm_pre")))
                .transpose()?,
            encoder: Encoder::new(&tower, kernels, vb.pp("encoder"))?,
            post_ln: norm(d, eps, kernels, trunk.pp("norm"))?,
            pool: VisionPool::Class(Dense::from_linear(head, kernels, Input::Narrow)?),
            positions,
            patch_size,
            naflex_grid: None,
            kernels,
        })
    }
}

/// SigLIP's multi-head attention pooling (`SiglipMultiheadAttentionPoolingHead`):
/// one learnt query (`probe`) attends over every patch, then an MLP with
/// its residual. The query depends on no input: it is projected once per
/// call (one row), and only keys and values are computed per image, as one
/// packed `[2d, d]` layer with the tower's final norm folded in.
struct AttentionPool {
    probe: Tensor,
    q_weight: Tensor,
    q_bias: Tensor,
    kv: Dense,
    out: Dense,
    ln: Norm,
    mlp: Mlp,
    heads: usize,
    head_dim: usize,
    kernels: Kernels,
}

impl AttentionPool {
    fn new(c: &TowerConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        let attn = vb.pp("attention");
        // torch.nn.MultiheadAttention's names: q, k, v stacked in one tensor.
        let w = attn.get((3 * d, d), "in_proj_weight")?;
        let b = attn.get(3 * d, "in_proj_bias")?;
        let kv = Linear::new(
            w.narrow(0, d, 2 * d)?.contiguous()?,
            Some(b.narrow(0, d, 2 * d)?.contiguous()?),
        );
        Ok(Self {
            probe: vb.get((1, 1, d), "probe")?.reshape((1, d))?,
            q_weight: w.narrow(0, 0, d)?.contiguous()?,
            q_bias: b.narrow(0, 0, d)?.contiguous()?,
            kv: Dense::from_linear(kv, kernels, Input::Narrow)?,
            out: dense(d, d, true, kernels, Input::Wide, attn.pp("out_proj"))?,
            ln: norm(d, c.layer_norm_eps, kernels, vb.pp("layernorm"))?,
            mlp: Mlp::new(d, c, kernels, vb.pp("mlp.fc1"), vb.pp("mlp.fc2"))?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
            kernels,
        })
    }

    /// `[b, n, d]` encoder output (before `norm`, the tower's final norm)
    /// to `[b, d]`.
    fn forward(&self, x: &Tensor, norm: &Norm) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (h, dh) = (self.heads, self.head_dim);
        let scale = (dh as f64).powf(-0.5);
        let q = ((self.probe.matmul(&self.q_weight.t()?)? + self.q_bias.unsqueeze(0)?)? * scale)?
            .reshape((1, h, 1, dh))?
            .broadcast_as((b, h, 1, dh))?
            .contiguous()?;
        let kv = if self.kernels.fused() {
            self.kv
                .forward_normed(x, Some(norm), None, Epilogue::None)?
        } else {
            self.kv.forward(&norm.forward(x)?)?
        };
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, n, h, dh))?.transpose(1, 2)?.contiguous()
        };
        let (k, v) = (split(kv.narrow(2, 0, d)?)?, split(kv.narrow(2, d, d)?)?);
        let w = q.matmul(&k.t()?)?;
        let w = softmax(self.kernels, &w)?;
        let pooled = w.matmul(&v)?.reshape((b, d))?;
        let pooled = if self.kernels.fused() {
            self.out.forward_fused(&pooled, None, Epilogue::None)?
        } else {
            self.out.forward(&pooled)?
        };
        self.mlp.forward_residual(&pooled, Some(&self.ln))
    }
}

impl Vit {
    /// The tokens `[b, positions, d]` on [`Kernels::Cublas`]: the patch
    /// embedding's GEMM writes each image's patches after its class row
    /// and adds the positions in its epilogue ([`blas_ops::patch_embed`]),
    /// where the other graphs concatenate and broadcast-add.
    fn embed_by_cublas(&self, patch: &Conv2d, pixels: &Tensor) -> Result<Tensor> {
        let (unfolded, weight, (b, n)) = self.unfold(patch, pixels)?;
        let class = usize::from(self.class.is_some());
        if n + class != self.positions {
            candle_core::bail!(
                "pixels {:?} in patches of {}: {} positions, the model has {}",
                pixels.dims(),
                self.patch_size,
                n + class,
                self.positions
            );
        }
        let d = weight.dim(0)?;
        let pos = Tensor::arange(0u32, self.positions as u32, pixels.device())?;
        let pos = self.position.forward(&pos)?;
        // The class token rides on its row's position.
        let first = match &self.class {
            Some(class) => {
                let zeros = Tensor::zeros((n, d), pos.dtype(), pos.device())?;
                (pos + Tensor::cat(&[&class.reshape((1, d))?, &zeros], 0)?)?
            }
            None => pos,
        };
        blas_ops::patch_embed(&unfolded, &weight, patch.bias(), &first, b)
    }

    /// `pixels [b, c, h, w]` as rows of unfolded patches `[b · n, c · p ·
    /// p]` (the patches do not overlap, so unfolding is a permute), the
    /// patch weight as `[d, c · p · p]` to match, and `(b, n)`.
    fn unfold(&self, patch: &Conv2d, pixels: &Tensor) -> Result<(Tensor, Tensor, (usize, usize))> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let unfolded = crate::elementwise::unfold(pixels, p, self.kernels == Kernels::Cuda)?;
        let weight = patch.weight();
        let weight = weight.reshape((weight.dim(0)?, c * p * p))?;
        Ok((unfolded, weight, (b, gh * gw)))
    }

    /// The patch embedding as one matmul over unfolded patches: the same
    /// function as the strided convolution, and its backward pass is several
    /// times cheaper in candle than the convolution's.
    fn patches_by_matmul(&self, patch: &Conv2d, pixels: &Tensor) -> Result<Tensor> {
        let (unfolded, weight, (b, n)) = self.unfold(patch, pixels)?;
        if let (Some(p), true) = (&self.patch_packed, self.kernels.host(&unfolded)) {
            let x = tiled::forward(p.as_ref(), &unfolded, None, Epilogue::None)?;
            let d = x.dim(1)?;
            return x.reshape((b, n, d));
        }
        let d = weight.dim(0)?;
        // One 2-D matmul: a weight broadcast over the batch would be
        // differentiated by candle's slow leading-dim sum.
        let mut y = unfolded.matmul(&weight.t()?)?;
        if let Some(bias) = patch.bias() {
            y = match self.kernels {
                Kernels::Differentiable => (y + repeat_rows(bias, b * n)?)?,
                _ => y.broadcast_add(bias)?,
            };
        }
        y.reshape((b, n, d))
    }
}

/// A dual encoder (CLIP, SigLIP, Chinese-CLIP or MobileCLIP, see [`Family`]).
pub struct ClipModel {
    /// Text tower.
    pub text: TextTower,
    /// Vision tower.
    pub vision: VisionTower,
}

impl ClipModel {
    /// Builds the model from Hugging Face weight names (`text_model.*`,
    /// `vision_model.*`, and for CLIP `text_projection`,
    /// `visual_projection`).
    pub fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_kernels(c, Kernels::Fused, vb)
    }

    /// Builds the model for training: the same weights and function as
    /// [`ClipModel::new`], computed with ops candle can differentiate (the
    /// fused softmax and layer-norm kernels have no backward pass). With a
    /// `VarBuilder` over a [`candle_nn::VarMap`], missing weights are created
    /// with candle-nn's initialisers.
    pub fn for_training(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_kernels(c, Kernels::Differentiable, vb)
    }

    /// Builds the model on the given kernel set.
    pub fn with_kernels(c: &ClipConfig, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            text: TextTower::new(c, kernels, vb.pp("text_model"))?,
            vision: VisionTower::new(c, kernels, vb.pp("vision_model"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    /// `MMEMBED_CUDA_GRAPH`: ours unless `cublas` or `portable` is asked
    /// for (an unknown value warns and keeps the default).
    #[test]
    fn cuda_graph_is_chosen_by_its_variable() {
        assert_eq!(cuda_graph(None), Kernels::Cuda);
        assert_eq!(cuda_graph(Some("")), Kernels::Cuda);
        assert_eq!(cuda_graph(Some("cuda")), Kernels::Cuda);
        assert_eq!(cuda_graph(Some("cublas")), Kernels::Cublas);
        assert_eq!(cuda_graph(Some(" portable ")), Kernels::Portable);
        assert_eq!(cuda_graph(Some("fast")), Kernels::Cuda);
    }

    /// The GPU graphs (portable, and CUDA's two with their cuBLAS calls
    /// and row kernels through their CPU references), run on the CPU,
    /// against our CPU kernels: same weights, same function (texts through
    /// the causal mask, images through the patch matmul), with a head dim
    /// of 64 as in every CLIP tower so the folded attention scale is the
    /// real one.
    #[test]
    fn portable_kernels_compute_the_same_function() -> Result<()> {
        let cfg = ClipConfig::from_json(
            r#"{"projection_dim": 8,
                "text_config": {"vocab_size": 20, "hidden_size": 128, "intermediate_size": 96,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 8},
                "vision_config": {"hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 2,
                    "num_attention_heads": 1, "image_size": 16, "patch_size": 8,
                    "hidden_act": "gelu"}}"#,
        )
        .expect("config");
        let varmap = VarMap::new();
        let dev = Device::Cpu;
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        // Training-style init, then widened so activations are O(1) and a
        // missing scale or a wrong head split shows.
        let _ = ClipModel::for_training(&cfg, vb.clone())?;
        for var in varmap.all_vars() {
            let t = var.as_tensor();
            var.set(&Tensor::randn(0f32, 0.3, t.shape(), &dev)?)?;
        }
        let fused = ClipModel::new(&cfg, vb.clone())?;
        let ids = Tensor::new(&[[3u32, 7, 1, 19, 0, 0], [5, 5, 5, 5, 5, 2]], &dev)?;
        let pixels = Tensor::randn(0f32, 1., (3, 3, 16, 16), &dev)?;
        let rel = |a: Tensor, b: Tensor| -> Result<f32> {
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(scale > 0.1, "degenerate output");
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
        };
        // The CUDA graphs' cuBLAS calls and row kernels run through their
        // CPU references.
        for kernels in [Kernels::Portable, Kernels::Cublas, Kernels::Cuda] {
            let gpu = ClipModel::with_kernels(&cfg, kernels, vb.clone())?;
            let t = rel(
                fused.text.forward(&ids, &[3, 5])?,
                gpu.text.forward(&ids, &[3, 5])?,
            )?;
            let v = rel(fused.vision.forward(&pixels)?, gpu.vision.forward(&pixels)?)?;
            assert!(t < 1e-5 && v < 1e-5, "{kernels:?}: text {t}, vision {v}");
        }
        Ok(())
    }

    #[test]
    fn differentiable_kernels_compute_the_same_function() -> Result<()> {
        let cfg = ClipConfig::from_json(
            r#"{"projection_dim": 8,
                "text_config": {"vocab_size": 20, "hidden_size": 16, "intermediate_size": 32,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 8},
                "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "image_size": 16, "patch_size": 8}}"#,
        )
        .expect("config");
        let varmap = VarMap::new();
        let dev = Device::Cpu;
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let fused = ClipModel::new(&cfg, vb.clone())?;
        let diff = ClipModel::for_training(&cfg, vb)?;
        let ids = Tensor::new(&[[3u32, 7, 1, 19, 0, 0], [5, 5, 5, 5, 5, 2]], &dev)?;
        let pixels = Tensor::randn(0f32, 1., (2, 3, 16, 16), &dev)?;
        let a = fused.text.forward(&ids, &[3, 5])?;
        let b = diff.text.forward(&ids, &[3, 5])?;
        let t = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let a = fused.vision.forward(&pixels)?;
        let b = diff.vision.forward(&pixels)?;
        let v = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(t < 1e-5 && v < 1e-5, "text {t}, vision {v}");
        // And the training graph has gradients for every weight.
        let loss = diff.vision.forward(&pixels)?.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let vision_vars = varmap
            .data()
            .lock()
            .expect("varmap")
            .iter()
            .filter(|(k, _)| k.starts_with("vision_model") || k.starts_with("visual"))
            .map(|(_, v)| v.as_tensor().clone())
            .collect::<Vec<_>>();
        assert!(vision_vars.len() > 10);
        for v in vision_vars {
            assert!(grads.get(&v).is_some(), "no gradient for a vision weight");
        }
        Ok(())
    }
}
