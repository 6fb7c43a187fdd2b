//! mmembed's local backend: Hugging Face CLIP, SigLIP and Chinese-CLIP
//! checkpoints and open_clip's MobileCLIP, run with candle on CPU, CUDA or
//! Metal, behind [`mmembed_core::Embedder`].
//!
//! - [`LocalEmbedder`] loads a checkpoint directory, a built-in model id
//!   ([`Manifest`]) or a hub repository (through `hf-hub` and its cache,
//!   honouring `HF_HUB_OFFLINE`, `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`).
//! - The architecture comes from the checkpoint's `config.json`
//!   ([`ClipConfig`], its `model_type` picks the [`Family`]), the
//!   preprocessing from its `preprocessor_config.json`, so OpenAI,
//!   LAION/OpenCLIP, SigLIP and Chinese-CLIP exports load with no code
//!   change; a MobileCLIP's both from its `open_clip_config.json`
//!   ([`ClipConfig::from_open_clip_json`]): its FastViT image tower folded
//!   from the training-time weights while loading, or its timm ViT
//!   ([`TimmTower`]) read under CLIP's names.
//! - Vectors are L2-normalised and tagged with the model's space id.

mod attention;
mod blas;
mod blas_ops;
mod config;
mod conv_stem;
mod cpu_kernels;
#[cfg(feature = "cuda")]
mod cuda_ops;
mod demo;
mod device;
mod elementwise;
mod embedder;
mod fastvit;
mod hub;
mod int8;
#[cfg(feature = "cuda")]
mod lt;
mod malloc;
mod manifest;
mod model;
mod packed;
mod pixels;
mod random;
mod rows;
mod spm;
mod tiled;
mod tokenizer;
mod train_ops;
mod w8a8;
mod weights;

pub use config::{
    Activation, ClipConfig, Family, TextConfig, TimmTower, TimmVit, TowerConfig, VisionConfig,
};
pub use demo::{DEMO_MODEL_ID, cache_dir, demo_model_dir, is_demo};
pub use device::{DeviceSpec, Precision};
pub use embedder::{CPU_MAX_BATCH, GPU_MAX_BATCH, LoadedClip, LocalEmbedder, LocalOptions};
pub use hub::{HubOptions, ModelFiles, hub_files, local_files};
pub use malloc::tune_malloc_for_inference;
pub use manifest::Manifest;
pub use model::{ClipModel, Kernels, TextTower, VisionTower};
pub use random::{VIT_B_32_CONFIG_JSON, write_random_checkpoint};
pub use tokenizer::{ClipTokenizer, TextBatch};

pub(crate) use mmembed_core::Source;

/// candle, re-exported so callers use the same version (devices, dtypes).
pub use candle_core;
