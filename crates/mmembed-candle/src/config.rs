//! A CLIP architecture, read from a Hugging Face `config.json`.

use serde::Deserialize;

/// The MLP activation, as `hidden_act` names it.
///
/// OpenAI checkpoints say `quick_gelu`; LAION/OpenCLIP exports say `gelu`.
/// Using the wrong one runs without error and gives subtly wrong vectors,
/// so the config decides, never a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact erf GELU (`gelu`).
    Gelu,
    /// Tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// Parses a `hidden_act` value.
    pub fn from_hf(name: &str) -> Result<Self, String> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => return Err(format!("unsupported hidden_act `{other}`")),
        })
    }
}

/// One transformer tower's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TowerConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// MLP activation.
    pub activation: Activation,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
}

/// The text tower.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Shape of the transformer.
    pub tower: TowerConfig,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length (77 for CLIP).
    pub max_position_embeddings: usize,
    /// `eos_token_id` from the config (2 in old OpenAI configs, which is wrong;
    /// the tokenizer's end-of-text id is preferred, see [`crate::ClipTokenizer`]).
    pub eos_token_id: Option<u32>,
}

/// The vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Shape of the transformer.
    pub tower: TowerConfig,
    /// Input channels (3).
    pub num_channels: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
}

/// A whole CLIP model: both towers and the shared embedding size.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Text tower.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Size of the joint embedding space.
    pub projection_dim: usize,
}

// Raw forms with Hugging Face's defaults (transformers' CLIPTextConfig /
// CLIPVisionConfig), so short old configs load as transformers loads them.
#[derive(Deserialize)]
struct RawText {
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    #[serde(default = "d_512")]
    hidden_size: usize,
    #[serde(default = "d_2048")]
    intermediate_size: usize,
    #[serde(default = "d_12")]
    num_hidden_layers: usize,
    #[serde(default = "d_8")]
    num_attention_heads: usize,
    #[serde(default = "d_77")]
    max_position_embeddings: usize,
    #[serde(default = "d_act")]
    hidden_act: String,
    #[serde(default = "d_eps")]
    layer_norm_eps: f64,
    eos_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawVision {
    #[serde(default = "d_768")]
    hidden_size: usize,
    #[serde(default = "d_3072")]
    intermediate_size: usize,
    #[serde(default = "d_12")]
    num_hidden_layers: usize,
    #[serde(default = "d_12")]
    num_attention_heads: usize,
    #[serde(default = "d_3")]
    num_channels: usize,
    #[serde(default = "d_224")]
    image_size: usize,
    #[serde(default = "d_32")]
    patch_size: usize,
    #[serde(default = "d_act")]
    hidden_act: String,
    #[serde(default = "d_eps")]
    layer_norm_eps: f64,
}

fn d_vocab() -> usize {
    49408
}
fn d_512() -> usize {
    512
}
fn d_2048() -> usize {
    2048
}
fn d_12() -> usize {
    12
}
fn d_8() -> usize {
    8
}
fn d_77() -> usize {
    77
}
fn d_768() -> usize {
    768
}
fn d_3072() -> usize {
    3072
}
fn d_3() -> usize {
    3
}
fn d_224() -> usize {
    224
}
fn d_32() -> usize {
    32
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

fn tower(
    name: &str,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    act: &str,
    eps: f64,
) -> Result<TowerConfig, String> {
    if hidden == 0 || inter == 0 || layers == 0 || heads == 0 {
        return Err(format!("{name}: sizes must be positive"));
    }
    if !hidden.is_multiple_of(heads) {
        return Err(format!(
            "{name}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        ));
    }
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(format!("{name}: layer_norm_eps must be positive"));
    }
    Ok(TowerConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        activation: Activation::from_hf(act).map_err(|e| format!("{name}: {e}"))?,
        layer_norm_eps: eps,
    })
}

impl ClipConfig {
    /// Parses a Hugging Face CLIP `config.json`.
    ///
    /// Reads `text_config` / `vision_config` (or the older `*_config_dict`),
    /// fills in transformers' defaults for missing fields, and checks that
    /// the shapes are consistent.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| format!("config.json is not valid JSON: {e}"))?;
        let section = |a: &str, b: &str| -> serde_json::Value {
            [a, b]
                .iter()
                .filter_map(|k| v.get(*k))
                .find(|x| x.is_object())
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}))
        };
        let t: RawText = serde_json::from_value(section("text_config", "text_config_dict"))
            .map_err(|e| format!("text_config: {e}"))?;
        let vi: RawVision = serde_json::from_value(section("vision_config", "vision_config_dict"))
            .map_err(|e| format!("vision_config: {e}"))?;
        let projection_dim = v
            .get("projection_dim")
            .and_then(|p| p.as_u64())
            .map_or(512, |p| p as usize);
        if projection_dim == 0 {
            return Err("projection_dim must be positive".into());
        }
        if vi.patch_size == 0 || vi.image_size == 0 || !vi.image_size.is_multiple_of(vi.patch_size)
        {
            return Err(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                vi.image_size, vi.patch_size
            ));
        }
        if t.max_position_embeddings < 2 || t.vocab_size == 0 || vi.num_channels == 0 {
            return Err("text_config/vision_config: sizes must be positive".into());
        }
        Ok(Self {
            text: TextConfig {
                tower: tower(
                    "text_config",
                    t.hidden_size,
                    t.intermediate_size,
                    t.num_hidden_layers,
                    t.num_attention_heads,
                    &t.hidden_act,
                    t.layer_norm_eps,
                )?,
                vocab_size: t.vocab_size,
                max_position_embeddings: t.max_position_embeddings,
                eos_token_id: t.eos_token_id,
            },
            vision: VisionConfig {
                tower: tower(
                    "vision_config",
                    vi.hidden_size,
                    vi.intermediate_size,
                    vi.num_hidden_layers,
                    vi.num_attention_heads,
                    &vi.hidden_act,
                    vi.layer_norm_eps,
                )?,
                num_channels: vi.num_channels,
                image_size: vi.image_size,
                patch_size: vi.patch_size,
            },
            projection_dim,
        })
    }

    /// OpenAI CLIP ViT-B/32's architecture (for benches and random-weight
    /// checkpoints; loading always uses the checkpoint's own config).
    pub fn vit_b_32() -> Self {
        Self::from_json(r#"{"text_config": {}, "vision_config": {}, "projection_dim": 512}"#)
            .unwrap_or_else(|e| unreachable!("defaults are ViT-B/32: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vit_b_32() {
        let c = ClipConfig::vit_b_32();
        assert_eq!(c.vision.tower.hidden_size, 768);
        assert_eq!(c.vision.patch_size, 32);
        assert_eq!(c.text.tower.hidden_size, 512);
        assert_eq!(c.text.tower.activation, Activation::QuickGelu);
        assert_eq!(c.projection_dim, 512);
    }

    #[test]
    fn laion_style_config() {
        // Shape of laion/CLIP-ViT-B-32-laion2B-s34B-b79K's config.json.
        let c = ClipConfig::from_json(
            r#"{"projection_dim": 512,
                "text_config": {"hidden_act": "gelu", "layer_norm_eps": 1e-05, "eos_token_id": 2},
                "vision_config": {"hidden_act": "gelu", "patch_size": 32},
                "text_config_dict": null}"#,
        )
        .unwrap();
        assert_eq!(c.text.tower.activation, Activation::Gelu);
        assert_eq!(c.vision.tower.activation, Activation::Gelu);
        assert_eq!(c.text.eos_token_id, Some(2));
    }

    #[test]
    fn vit_l_14_shape() {
        let c = ClipConfig::from_json(
            r#"{"projection_dim": 768,
                "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
                "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                  "num_attention_heads": 16, "patch_size": 14}}"#,
        )
        .unwrap();
        assert_eq!(c.vision.image_size / c.vision.patch_size, 16);
        assert_eq!(c.projection_dim, 768);
    }

    #[test]
    fn inconsistent_configs_are_refused_with_reasons() {
        for (json, needle) in [
            (r#"{"vision_config": {"patch_size": 30}}"#, "not a multiple"),
            (
                r#"{"text_config": {"num_attention_heads": 7}}"#,
                "not divisible",
            ),
            (
                r#"{"text_config": {"hidden_act": "tanh"}}"#,
                "unsupported hidden_act `tanh`",
            ),
            (r#"{"projection_dim": 0}"#, "projection_dim"),
            ("[", "not valid JSON"),
        ] {
            let e = ClipConfig::from_json(json).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }
}
