//! Checkpoints with random weights, for benchmarks and tests where only the
//! architecture matters (speed does not depend on weight values).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use mmembed_core::EmbedError;

use crate::config::ClipConfig;
use crate::model::ClipModel;

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
