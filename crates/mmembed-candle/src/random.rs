//! Checkpoints with random weights, for benchmarks and tests where only the
//! architecture matters (speed does not depend on weight values).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use mmembed_core::EmbedError;

use crate::config::ClipConfig;
use crate::model::ClipModel;

/// The Hugging Face `config.json` of OpenAI's ViT-B/32 CLIP (the keys that
/// differ from the defaults), for [`write_random_checkpoint`]: benchmarks of
/// the real architecture without its pretrained weights.
pub const VIT_B_32_CONFIG_JSON: &str = r#"{"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
 "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                 "num_hidden_layers": 12, "hidden_act": "quick_gelu", "eos_token_id": 49407},
 "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                   "num_hidden_layers": 12, "patch_size": 32, "image_size": 224, "hidden_act": "quick_gelu"}}"#;

/// Writes a complete checkpoint directory (`config.json`,
/// `model.safetensors`, `tokenizer.json`, `preprocessor_config.json`) whose
/// architecture is `config_json` (Hugging Face format) and whose weights are
/// random, initialised the way candle-nn initialises fresh layers.
/// `tokenizer_json` and `preprocessor_json` are copied as given.
///
/// The result loads through the normal path ([`crate::local_files`],
/// [`crate::LocalEmbedder`]), memory map included.
pub fn write_random_checkpoint(
    dir: &Path,
    config_json: &str,
    tokenizer_json: &Path,
    preprocessor_json: &str,
) -> Result<(), EmbedError> {
    let fail = |reason: String| EmbedError::ModelLoad {
        model: dir.display().to_string(),
        reason,
        source: None,
    };
    let config = ClipConfig::from_json(config_json).map_err(fail)?;
    let io = |e: std::io::Error| EmbedError::ModelLoad {
        model: dir.display().to_string(),
        reason: "cannot write the checkpoint".into(),
        source: Some(Arc::new(e)),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    ClipModel::new(&config, vb).map_err(|e| fail(format!("cannot build the model: {e}")))?;
    varmap
        .save(dir.join("model.safetensors"))
        .map_err(|e| fail(format!("cannot save weights: {e}")))?;
    std::fs::write(dir.join("config.json"), config_json).map_err(io)?;
    std::fs::write(dir.join("preprocessor_config.json"), preprocessor_json).map_err(io)?;
    std::fs::copy(tokenizer_json, dir.join("tokenizer.json")).map_err(io)?;
    Ok(())
}
