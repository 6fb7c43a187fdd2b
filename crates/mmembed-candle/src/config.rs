//! A dual-encoder architecture (CLIP, SigLIP, Chinese-CLIP or MobileCLIP),
//! read from a Hugging Face `config.json` or open_clip's
//! `open_clip_config.json`.

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

/// The model family, from `config.json`'s `model_type`: which layers sit
/// around the shared transformer encoder and how each tower pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// CLIP (`clip`, also the default when `model_type` is missing): class
    /// token and pre-norm in the vision tower, causal text attention pooled
    /// at the first end-of-text token, bias-free projections to
    /// `projection_dim`.
    Clip,
    /// SigLIP (`siglip`; SigLIP 2's fixed-resolution checkpoints use it
    /// too; and SigLIP 2 NaFlex, `siglip2`, see
    /// [`VisionConfig::naflex_grid`]): no class token, a multi-head attention pooling head over every
    /// patch, bidirectional text attention over a fixed-length padded
    /// sequence pooled at its last position, a text `head` with bias; the
    /// joint space is the vision width.
    Siglip,
    /// Chinese-CLIP (`chinese_clip`): CLIP's vision tower, and a BERT text
    /// tower (WordPiece tokens, post-norm layers, exact GELU, a padding
    /// mask) pooled at its first (`[CLS]`) token; bias-free projections to
    /// `projection_dim`.
    ChineseClip,
    /// MobileCLIP and MobileCLIP 2 (`mobileclip`), in open_clip's format
    /// (`open_clip_config.json`, `open_clip_model.safetensors`): a timm
    /// image tower ([`TimmTower`]: a FastViT MCi, convolutions and, in its
    /// last stages, attention, average pooled; or for B and L-14 a ViT
    /// pooled at its class token; either through a linear head with bias)
    /// and open_clip's text transformer (CLIP's, with exact GELU),
    /// attending bidirectionally over the zero-padded context (S0–S2,
    /// MobileCLIP 2) or causally, pooled at the first end-of-text token.
    MobileClip,
}

impl Family {
    fn from_model_type(t: Option<&str>) -> Result<Self, String> {
        match t {
            None | Some("clip") => Ok(Self::Clip),
            Some("siglip" | "siglip2") => Ok(Self::Siglip),
            Some("chinese_clip") => Ok(Self::ChineseClip),
            Some("mobileclip") => Err("MobileCLIP checkpoints come in open_clip's format: \
                 open_clip_config.json and open_clip_model.safetensors, not config.json"
                .into()),
            Some(other) => Err(format!(
                "model_type `{other}` is not supported (supported: clip, siglip, siglip2, \
                 chinese_clip; \
                 and mobileclip in open_clip's format)"
            )),
        }
    }

    /// The family's `model_type` value (`siglip` for SigLIP 2 NaFlex too,
    /// whose checkpoints say `siglip2`: it is SigLIP's architecture with
    /// another patch embedding; [`ClipConfig::model_type`] tells them
    /// apart).
    pub fn name(self) -> &'static str {
        match self {
            Self::Clip => "clip",
            Self::Siglip => "siglip",
            Self::ChineseClip => "chinese_clip",
            Self::MobileClip => "mobileclip",
        }
    }
}

/// The text tower.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Shape of the transformer.
    pub tower: TowerConfig,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length (77 for CLIP, 64 for SigLIP, 512 positions for
    /// Chinese-CLIP's BERT).
    pub max_position_embeddings: usize,
    /// `eos_token_id` from the config (2 in old OpenAI configs, which is wrong;
    /// the tokenizer's end-of-text id is preferred, see [`crate::ClipTokenizer`]).
    pub eos_token_id: Option<u32>,
    /// `pad_token_id`: what SigLIP pads every sequence to the context with,
    /// and Chinese-CLIP a batch to its longest sequence (CLIP pads with
    /// end-of-text, after the pooled position).
    pub pad_token_id: Option<u32>,
    /// Rows of BERT's token-type embedding (`type_vocab_size`, 2); only
    /// type 0 is used. Unused by CLIP and SigLIP.
    pub type_vocab_size: usize,
    /// Whether each token attends only to those before it (CLIP,
    /// MobileCLIP-B); otherwise every token attends to every other (SigLIP,
    /// MobileCLIP S0–S2 and MobileCLIP 2, BERT within its padding mask).
    pub causal: bool,
    /// Whether texts are lower-cased before the tokenizer's own
    /// normaliser: SigLIP 2 NaFlex (`model_type` `siglip2`), which
    /// transformers tokenizes with `Siglip2Tokenizer` (Gemma's
    /// `tokenizer.json` with SigLIP 2's training default, lower case,
    /// put in front of its normaliser) whatever tokenizer class the
    /// repository names.
    pub lowercase: bool,
}

/// The vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Shape of the transformer.
    pub tower: TowerConfig,
    /// Input channels (3).
    pub num_channels: usize,
    /// Input side in pixels (for NaFlex, that of the grid its positions
    /// were learned on).
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// MobileCLIP: the image tower open_clip builds with timm, by the
    /// name its config gives. `None` for the Hugging Face towers.
    pub timm: Option<TimmTower>,
    /// SigLIP 2 NaFlex (`model_type` `siglip2`): the side of the square
    /// grid of learned positions (√`num_patches`: 16 for 256), resized to
    /// each image's own grid of patches, which its preprocessing sizes to
    /// keep the aspect ratio ([`mmembed_media::ResizeTarget::Patches`]); the
    /// patch embedding is then a linear layer over patches' pixels in
    /// (row, column, channel) order. `None`: one fixed image size.
    pub naflex_grid: Option<usize>,
}

/// An image tower that open_clip builds with timm (MobileCLIP's), known by
/// its timm name. The weights give its depths and widths (every variant
/// of one name, and narrower test checkpoints, load without a table of
/// shapes); the name gives what weights cannot show.
#[derive(Debug, Clone, PartialEq)]
pub enum TimmTower {
    /// A FastViT MCi (`fastvit_mci0` … `fastvit_mci4`: MobileCLIP S0–S2,
    /// MobileCLIP 2 S0–S4), average pooled through its linear head;
    /// [`VisionConfig::tower`] and `patch_size` describe no layer then.
    FastVit(String),
    /// A timm `VisionTransformer` pooled at its class token through its
    /// linear head (with bias): MobileCLIP-B's and MobileCLIP 2 B's
    /// `vit_base_mci_224`, MobileCLIP 2 L-14's `vit_large_patch14_clip_224`.
    /// [`VisionConfig::tower`] holds the named model's shape; the weights'
    /// own (width, depth, MLP width, patch or stem) are what loads.
    Vit(TimmVit),
}

/// What a timm ViT's name fixes that its weights do not show.
#[derive(Debug, Clone, PartialEq)]
pub struct TimmVit {
    /// The timm model name.
    pub name: String,
    /// Its layer norms' epsilon (timm's default 1e-6; 1e-5 for the CLIP
    /// towers).
    pub layer_norm_eps: f64,
    /// Whether the class token has a position of its own
    /// (`no_embed_class=False`): `vit_base_mci_224` adds positions to the
    /// patches only, then prepends the class token.
    pub class_position: bool,
}

impl TimmVit {
    /// The timm ViTs MobileCLIP uses: name, the named model's shape (width,
    /// MLP width, depth, heads, patch), eps, class position.
    const KNOWN: [(&'static str, [usize; 5], f64, bool); 2] = [
        ("vit_base_mci_224", [768, 3072, 12, 12, 16], 1e-6, false),
        (
            "vit_large_patch14_clip_224",
            [1024, 4096, 24, 16, 14],
            1e-5,
            true,
        ),
    ];

    /// Attention heads are this wide in every known name; a narrower
    /// checkpoint's head count follows from its width.
    pub const HEAD_DIM: usize = 64;
}

/// A whole dual encoder: both towers and the shared embedding size.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// The architecture around the encoders.
    pub family: Family,
    /// Text tower.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Size of the joint embedding space (CLIP's `projection_dim`; SigLIP's
    /// vision width, which its text `projection_size` must equal).
    pub projection_dim: usize,
}

// Raw forms: every field optional, filled with the family's defaults as
// transformers' config classes have them (CLIPTextConfig, SiglipTextConfig,
// ...), so short old configs load as transformers loads them.
#[derive(Deserialize)]
struct RawTower {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

#[derive(Deserialize)]
struct RawText {
    #[serde(flatten)]
    tower: RawTower,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    projection_size: Option<usize>,
    type_vocab_size: Option<usize>,
}

#[derive(Deserialize)]
struct RawVision {
    #[serde(flatten)]
    tower: RawTower,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    vision_use_head: Option<bool>,
    /// SigLIP 2 NaFlex: the learned positions (a square number).
    num_patches: Option<usize>,
}

/// One family's defaults for the fields a config may leave out.
struct Defaults {
    vocab: usize,
    text: [usize; 4],
    context: usize,
    vision: [usize; 4],
    patch: usize,
    /// `hidden_act` and `layer_norm_eps`, text tower then vision tower.
    act: [&'static str; 2],
    eps: [f64; 2],
    pad: Option<u32>,
}

impl Defaults {
    fn of(family: Family) -> Self {
        match family {
            // MobileCLIP never reads these (its configs are open_clip's).
            Family::Clip | Family::MobileClip => Self {
                vocab: 49408,
                text: [512, 2048, 12, 8],
                context: 77,
                vision: [768, 3072, 12, 12],
                patch: 32,
                act: ["quick_gelu"; 2],
                eps: [1e-5; 2],
                pad: None,
            },
            Family::Siglip => Self {
                vocab: 32000,
                text: [768, 3072, 12, 12],
                context: 64,
                vision: [768, 3072, 12, 12],
                patch: 16,
                act: ["gelu_pytorch_tanh"; 2],
                eps: [1e-6; 2],
                pad: Some(1),
            },
            // ChineseCLIPTextConfig (BERT-base) and ChineseCLIPVisionConfig.
            Family::ChineseClip => Self {
                vocab: 30522,
                text: [768, 3072, 12, 12],
                context: 512,
                vision: [768, 3072, 12, 12],
                patch: 32,
                act: ["gelu", "quick_gelu"],
                eps: [1e-12, 1e-5],
                pad: Some(0),
            },
        }
    }
}

impl RawTower {
    /// The tower's shape, the family's defaults for tower `which` (0 text,
    /// 1 vision: width, MLP width, layers, heads, activation, eps) where the
    /// config is silent.
    fn resolve(&self, name: &str, which: usize, d: &Defaults) -> Result<TowerConfig, String> {
        let defaults = [d.text, d.vision][which];
        tower(
            name,
            [
                self.hidden_size.unwrap_or(defaults[0]),
                self.intermediate_size.unwrap_or(defaults[1]),
                self.num_hidden_layers.unwrap_or(defaults[2]),
                self.num_attention_heads.unwrap_or(defaults[3]),
            ],
            self.hidden_act.as_deref().unwrap_or(d.act[which]),
            self.layer_norm_eps.unwrap_or(d.eps[which]),
        )
    }
}

fn tower(
    name: &str,
    [hidden, inter, layers, heads]: [usize; 4],
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
    /// The `model_type` a checkpoint of this architecture says: the
    /// family's name, and `siglip2` for SigLIP 2 NaFlex (which
    /// [`Family::name`] calls `siglip`).
    ///
    /// ```
    /// use mmembed_candle::ClipConfig;
    ///
    /// let c = ClipConfig::from_json(r#"{"model_type": "siglip2"}"#).unwrap();
    /// assert_eq!((c.family.name(), c.model_type()), ("siglip", "siglip2"));
    /// ```
    pub fn model_type(&self) -> &'static str {
        match (self.family, self.vision.naflex_grid) {
            (Family::Siglip, Some(_)) => "siglip2",
            (family, _) => family.name(),
        }
    }

    /// Parses a Hugging Face `config.json` of a supported family
    /// ([`Family`], from `model_type`).
    ///
    /// Reads `text_config` / `vision_config` (or the older `*_config_dict`),
    /// fills in transformers' defaults for the family where fields are
    /// missing, and checks that the shapes are consistent.
    ///
    /// ```
    /// use mmembed_candle::{ClipConfig, Family};
    /// let c = ClipConfig::from_json(r#"{"model_type": "siglip", "text_config": {}, "vision_config": {}}"#)?;
    /// assert_eq!(c.family, Family::Siglip);
    /// assert_eq!((c.text.max_position_embeddings, c.vision.patch_size, c.projection_dim), (64, 16, 768));
    /// # Ok::<(), String>(())
    /// ```
    pub fn from_json(json: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| format!("config.json is not valid JSON: {e}"))?;
        let family = Family::from_model_type(v.get("model_type").and_then(|t| t.as_str()))?;
        let d = Defaults::of(family);
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
        let text_tower = t.tower.resolve("text_config", 0, &d)?;
        let vision_tower = vi.tower.resolve("vision_config", 1, &d)?;
        let projection_dim = match family {
            Family::Clip | Family::ChineseClip | Family::MobileClip => v
                .get("projection_dim")
                .and_then(|p| p.as_u64())
                .map_or(512, |p| p as usize),
            Family::Siglip => {
                if vi.vision_use_head == Some(false) {
                    return Err(
                        "vision_config: vision_use_head is false, so the vision tower \
                         has no pooled embedding"
                            .into(),
                    );
                }
                let width = vision_tower.hidden_size;
                let text = t.projection_size.unwrap_or(text_tower.hidden_size);
                if text != width {
                    return Err(format!(
                        "text_config: projection_size {text} differs from the vision width \
                         {width}: the towers would not share a space"
                    ));
                }
                width
            }
        };
        if projection_dim == 0 {
            return Err("projection_dim must be positive".into());
        }
        let naflex = v.get("model_type").and_then(|t| t.as_str()) == Some("siglip2");
        let patch_size = vi.patch_size.unwrap_or(d.patch);
        let naflex_grid = if naflex {
            let n = vi.num_patches.unwrap_or(256);
            let side = n.isqrt();
            if side == 0 || side * side != n {
                return Err(format!(
                    "vision_config: num_patches {n} is not a square grid of positions"
                ));
            }
            Some(side)
        } else {
            None
        };
        let image_size = match naflex_grid {
            Some(side) => side.saturating_mul(patch_size),
            None => vi.image_size.unwrap_or(224),
        };
        if patch_size == 0 || image_size == 0 || !image_size.is_multiple_of(patch_size) {
            return Err(format!(
                "vision_config: image_size {image_size} is not a multiple of patch_size {patch_size}"
            ));
        }
        let context = t.max_position_embeddings.unwrap_or(d.context);
        let (vocab_size, num_channels) = (
            t.vocab_size.unwrap_or(d.vocab),
            vi.num_channels.unwrap_or(3),
        );
        if context < 2 || vocab_size == 0 || num_channels == 0 || t.type_vocab_size == Some(0) {
            return Err("text_config/vision_config: sizes must be positive".into());
        }
        Ok(Self {
            family,
            text: TextConfig {
                tower: text_tower,
                vocab_size,
                max_position_embeddings: context,
                eos_token_id: t.eos_token_id,
                pad_token_id: t.pad_token_id.or(d.pad),
                type_vocab_size: t.type_vocab_size.unwrap_or(2),
                causal: family == Family::Clip,
                lowercase: naflex,
            },
            vision: VisionConfig {
                tower: vision_tower,
                num_channels,
                image_size,
                patch_size,
                timm: None,
                naflex_grid,
            },
            projection_dim,
        })
    }

    /// Parses open_clip's `open_clip_config.json` (`{"model_cfg": ...,
    /// "preprocess_cfg": ...}`, as the hub's open_clip repositories hold
    /// it) of a MobileCLIP: a timm image tower ([`TimmTower`]) and
    /// open_clip's own text transformer. Options that would change the function and
    /// that no MobileCLIP uses (a Hugging Face text tower, layer scale in
    /// the text tower, other pooling, a projection after the timm head) are
    /// refused by name rather than ignored.
    ///
    /// ```
    /// use mmembed_candle::{ClipConfig, Family};
    /// let c = ClipConfig::from_open_clip_json(r#"{"model_cfg": {"embed_dim": 512,
    ///     "vision_cfg": {"timm_model_name": "fastvit_mci1", "timm_pool": "avg", "timm_proj": null, "image_size": 256},
    ///     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
    ///                  "no_causal_mask": true}, "custom_text": true}}"#)?;
    /// assert_eq!((c.family, c.projection_dim, c.vision.image_size), (Family::MobileClip, 512, 256));
    /// assert!(!c.text.causal);
    /// # Ok::<(), String>(())
    /// ```
    pub fn from_open_clip_json(json: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| format!("open_clip_config.json is not valid JSON: {e}"))?;
        let m = v.get("model_cfg").unwrap_or(&v);
        let object = |x: Option<&serde_json::Value>, what: &str| {
            x.and_then(|x| x.as_object())
                .cloned()
                .ok_or_else(|| format!("open_clip_config.json: no `{what}` object"))
        };
        let (vc, tc) = (
            object(m.get("vision_cfg"), "vision_cfg")?,
            object(m.get("text_cfg"), "text_cfg")?,
        );
        let int =
            |o: &serde_json::Map<String, serde_json::Value>, k: &str, d: Option<usize>| match o
                .get(k)
            {
                None | Some(serde_json::Value::Null) => {
                    d.ok_or_else(|| format!("open_clip_config.json: `{k}` is missing"))
                }
                Some(x) => x
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| format!("open_clip_config.json: `{k}` must be a whole number")),
            };
        let set = |o: &serde_json::Map<String, serde_json::Value>, k: &str| {
            o.get(k).is_some_and(|x| {
                !(x.is_null() || x == &serde_json::json!(false) || x == &serde_json::json!(""))
            })
        };
        let supported = "MobileCLIP's: FastViT MCi `fastvit_mci0` … `fastvit_mci4`, \
                         `vit_base_mci_224`, `vit_large_patch14_clip_224`";
        let (timm, shape, pool) = match vc.get("timm_model_name").and_then(|x| x.as_str()) {
            Some(t) if t.starts_with("fastvit_mci") => {
                (TimmTower::FastVit(t.to_string()), None, "avg")
            }
            Some(t) => match TimmVit::KNOWN.iter().find(|k| k.0 == t) {
                Some(&(name, shape, eps, class_position)) => (
                    TimmTower::Vit(TimmVit {
                        name: name.to_string(),
                        layer_norm_eps: eps,
                        class_position,
                    }),
                    Some(shape),
                    "token",
                ),
                None => {
                    return Err(format!(
                        "vision_cfg: timm model `{t}` is not supported ({supported})"
                    ));
                }
            },
            None => {
                return Err(format!(
                    "vision_cfg: no `timm_model_name`: only open_clip checkpoints with a \
                     timm image tower are supported ({supported})"
                ));
            }
        };
        match vc.get("timm_pool").and_then(|x| x.as_str()) {
            None => {}
            Some(p) if p == pool => {}
            Some(p) => {
                return Err(format!(
                    "vision_cfg: timm_pool `{p}` is not supported for this tower ({pool} is)"
                ));
            }
        }
        if vc
            .get("timm_proj")
            .is_some_and(|p| !(p.is_null() || p == "none" || p == ""))
        {
            return Err(
                "vision_cfg: a `timm_proj` head after the trunk is not supported \
                 (MobileCLIP's trunk ends in its own linear head)"
                    .into(),
            );
        }
        let image_size = match vc.get("image_size") {
            Some(serde_json::Value::Array(hw)) if hw.len() == 2 && hw[0] == hw[1] => {
                hw[0].as_u64().unwrap_or(0) as usize
            }
            Some(serde_json::Value::Array(_)) => {
                return Err("vision_cfg: only square image sizes are supported".into());
            }
            _ => int(&vc, "image_size", Some(224))?,
        };
        for (k, why) in [
            ("hf_model_name", "a Hugging Face text tower"),
            ("ls_init_value", "layer scale in the text tower"),
            ("embed_cls", "a class token in the text tower"),
            ("use_pad_mask", "a padding mask"),
            ("proj_bias", "a text projection with bias"),
            ("norm_kwargs", "non-default layer norms"),
            ("act_kwargs", "non-default activations"),
        ] {
            if set(&tc, k) {
                return Err(format!("text_cfg: `{k}` ({why}) is not supported"));
            }
        }
        for (k, want) in [("pool_type", "argmax"), ("proj_type", "linear")] {
            match tc.get(k).and_then(|x| x.as_str()) {
                None => {}
                Some(p) if p == want => {}
                Some(p) => return Err(format!("text_cfg: {k} `{p}` is not supported ({want} is)")),
            }
        }
        let width = int(&tc, "width", Some(512))?;
        let heads = int(&tc, "heads", Some(8))?;
        let mlp_ratio = match tc.get("mlp_ratio") {
            None | Some(serde_json::Value::Null) => 4.0,
            Some(x) => x
                .as_f64()
                .ok_or("open_clip_config.json: `mlp_ratio` must be a number")?,
        };
        let act = if m.get("quick_gelu").and_then(|q| q.as_bool()) == Some(true) {
            "quick_gelu"
        } else {
            "gelu"
        };
        let text_tower = tower(
            "text_cfg",
            [
                width,
                (width as f64 * mlp_ratio) as usize,
                int(&tc, "layers", Some(12))?,
                heads,
            ],
            act,
            1e-5,
        )?;
        let projection_dim = int(&object(Some(m), "model_cfg")?, "embed_dim", None)?;
        let (context, vocab_size) = (
            int(&tc, "context_length", Some(77))?,
            int(&tc, "vocab_size", Some(49408))?,
        );
        if projection_dim == 0 || image_size == 0 || context < 2 || vocab_size == 0 {
            return Err("open_clip_config.json: sizes must be positive".into());
        }
        Ok(Self {
            family: Family::MobileClip,
            text: TextConfig {
                tower: text_tower,
                vocab_size,
                max_position_embeddings: context,
                // open_clip's tokenizer: end-of-text is the largest id, the
                // position `argmax` pools at; padding is id 0.
                eos_token_id: None,
                pad_token_id: Some(int(&tc, "pad_id", Some(0))? as u32),
                type_vocab_size: 0,
                causal: tc.get("no_causal_mask").and_then(|x| x.as_bool()) != Some(true),
                lowercase: false,
            },
            vision: VisionConfig {
                tower: match (shape, &timm) {
                    (Some([d, mlp, layers, heads, _]), TimmTower::Vit(v)) => TowerConfig {
                        hidden_size: d,
                        intermediate_size: mlp,
                        num_hidden_layers: layers,
                        num_attention_heads: heads,
                        activation: Activation::Gelu,
                        layer_norm_eps: v.layer_norm_eps,
                    },
                    // Unused: the FastViT tower reads its shapes from the weights.
                    _ => no_transformer(),
                },
                num_channels: 3,
                image_size,
                patch_size: shape.map_or(1, |s| s[4]),
                timm: Some(timm),
                naflex_grid: None,
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

/// What [`VisionConfig::tower`] holds for a FastViT tower, which has no
/// transformer shape to give (a 1-wide, 1-layer shape no layer reads).
fn no_transformer() -> TowerConfig {
    TowerConfig {
        hidden_size: 1,
        intermediate_size: 1,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        activation: Activation::Gelu,
        layer_norm_eps: 1e-5,
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
    fn siglip_defaults_are_transformers_siglip_defaults() {
        // google/siglip-base-patch16-224's config.json leaves most fields out.
        let c = ClipConfig::from_json(
            r#"{"model_type": "siglip", "text_config": {"model_type": "siglip_text_model"},
                "vision_config": {"model_type": "siglip_vision_model"}}"#,
        )
        .unwrap();
        assert_eq!(c.family, Family::Siglip);
        assert_eq!(c.text.vocab_size, 32000);
        assert_eq!(c.text.max_position_embeddings, 64);
        assert_eq!(c.text.pad_token_id, Some(1));
        assert_eq!(c.text.tower.activation, Activation::GeluTanh);
        assert_eq!(c.vision.tower.layer_norm_eps, 1e-6);
        assert_eq!(c.vision.patch_size, 16);
        assert_eq!(c.projection_dim, 768);
        // CLIP keeps its own defaults.
        let clip = ClipConfig::vit_b_32();
        assert_eq!((clip.family, clip.text.pad_token_id), (Family::Clip, None));
    }

    #[test]
    fn chinese_clip_defaults_are_transformers_defaults() {
        let c = ClipConfig::from_json(r#"{"model_type": "chinese_clip"}"#).unwrap();
        assert_eq!(c.family, Family::ChineseClip);
        // BERT-base text tower, CLIP ViT-B/32 vision tower.
        assert_eq!(c.text.vocab_size, 30522);
        assert_eq!(c.text.max_position_embeddings, 512);
        assert_eq!(c.text.pad_token_id, Some(0));
        assert_eq!(c.text.tower.activation, Activation::Gelu);
        assert_eq!(c.text.tower.layer_norm_eps, 1e-12);
        assert_eq!(c.vision.tower.activation, Activation::QuickGelu);
        assert_eq!(c.vision.tower.layer_norm_eps, 1e-5);
        assert_eq!((c.vision.patch_size, c.projection_dim), (32, 512));
    }

    #[test]
    fn siglip_shapes_that_share_no_space_are_refused() {
        for (json, needle) in [
            (
                r#"{"model_type": "siglip", "text_config": {"projection_size": 512}}"#,
                "projection_size 512 differs from the vision width 768",
            ),
            (
                r#"{"model_type": "siglip", "vision_config": {"vision_use_head": false}}"#,
                "vision_use_head",
            ),
            (
                r#"{"model_type": "siglip2", "vision_config": {"num_patches": 250}}"#,
                "num_patches 250 is not a square",
            ),
            (
                r#"{"model_type": "blip"}"#,
                "model_type `blip` is not supported",
            ),
        ] {
            let e = ClipConfig::from_json(json).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    /// The hub's MobileCLIP configs load; options that would change the
    /// function and that no MobileCLIP uses are refused by name.
    #[test]
    fn open_clip_configs_load_or_say_what_they_lack() {
        let s1 = r#"{"model_cfg": {"embed_dim": 512,
            "vision_cfg": {"timm_model_name": "fastvit_mci1", "timm_model_pretrained": false,
                "timm_pool": "avg", "timm_proj": null, "timm_drop": 0.0, "timm_drop_path": 0.0,
                "image_size": 256},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                "layers": 12, "no_causal_mask": true},
            "custom_text": true},
            "preprocess_cfg": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                "interpolation": "bilinear", "resize_mode": "shortest"}}"#;
        let c = ClipConfig::from_open_clip_json(s1).unwrap();
        assert_eq!(c.family, Family::MobileClip);
        assert_eq!(
            c.vision.timm,
            Some(TimmTower::FastVit("fastvit_mci1".into()))
        );
        assert_eq!((c.vision.image_size, c.projection_dim), (256, 512));
        let t = &c.text;
        assert!(!t.causal);
        assert_eq!((t.max_position_embeddings, t.pad_token_id), (77, Some(0)));
        assert_eq!(t.tower.intermediate_size, 2048);
        assert_eq!(t.tower.activation, Activation::Gelu);
        // MobileCLIP-B: causal text and a ViT image tower pooled at its
        // class token; MobileCLIP 2 L-14 has another ViT.
        let b = s1
            .replace("fastvit_mci1", "vit_base_mci_224")
            .replace("\"no_causal_mask\": true", "\"no_causal_mask\": false")
            .replace("\"timm_pool\": \"avg\"", "\"timm_pool\": \"token\"")
            .replace("\"image_size\": 256", "\"image_size\": 224");
        let c = ClipConfig::from_open_clip_json(&b).unwrap();
        let Some(TimmTower::Vit(v)) = &c.vision.timm else {
            panic!("{:?}", c.vision.timm)
        };
        assert_eq!((v.layer_norm_eps, v.class_position), (1e-6, false));
        assert_eq!((c.vision.tower.hidden_size, c.vision.patch_size), (768, 16));
        assert!(c.text.causal);
        let l14 = b.replace("vit_base_mci_224", "vit_large_patch14_clip_224");
        let c = ClipConfig::from_open_clip_json(&l14).unwrap();
        let Some(TimmTower::Vit(v)) = &c.vision.timm else {
            panic!("{:?}", c.vision.timm)
        };
        assert_eq!((v.layer_norm_eps, v.class_position), (1e-5, true));
        assert_eq!(c.vision.tower.num_hidden_layers, 24);
        for (json, needle) in [
            (b.replace("\"token\"", "\"avg\""), "timm_pool `avg`"),
            (
                b.replace("vit_base_mci_224", "vit_huge_patch14_clip_224"),
                "vit_huge",
            ),
            (
                b.replace("\"timm_model_name\": \"vit_base_mci_224\",", ""),
                "no `timm_model_name`",
            ),
        ] {
            let e = ClipConfig::from_open_clip_json(&json).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let causal = s1.replace("\"no_causal_mask\": true", "\"no_causal_mask\": false");
        assert!(
            ClipConfig::from_open_clip_json(&causal)
                .unwrap()
                .text
                .causal
        );
        for (from, to, needle) in [
            ("\"custom_text\": true", "\"quick_gelu\": true", ""),
            (
                "\"timm_proj\": null",
                "\"timm_proj\": \"linear\"",
                "timm_proj",
            ),
            (
                "\"timm_pool\": \"avg\"",
                "\"timm_pool\": \"token\"",
                "timm_pool",
            ),
            (
                "\"layers\": 12,",
                "\"layers\": 12, \"ls_init_value\": 0.1,",
                "ls_init_value",
            ),
            (
                "\"layers\": 12,",
                "\"layers\": 12, \"hf_model_name\": \"x\",",
                "hf_model_name",
            ),
            (
                "\"layers\": 12,",
                "\"layers\": 12, \"pool_type\": \"last\",",
                "pool_type",
            ),
            ("\"embed_dim\": 512,", "", "embed_dim"),
            ("\"heads\": 8", "\"heads\": 7", "not divisible"),
        ] {
            let json = s1.replace(from, to);
            match ClipConfig::from_open_clip_json(&json) {
                Ok(c) => {
                    assert!(needle.is_empty(), "{to}: accepted");
                    assert_eq!(c.text.tower.activation, Activation::QuickGelu);
                }
                Err(e) => assert!(!needle.is_empty() && e.contains(needle), "{to}: {e}"),
            }
        }
        let e = ClipConfig::from_json(r#"{"model_type": "mobileclip"}"#).unwrap_err();
        assert!(e.contains("open_clip_config.json"), "{e}");
        assert!(ClipConfig::from_open_clip_json("{").is_err());
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
