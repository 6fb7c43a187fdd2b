#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use mmembed_core::{
    EmbedError, EmbedRequest, Embedder, EmbedderInfo, Embeddings, GenerateRequest, Generation,
    Generator, GeneratorInfo, Media, MediaSource, Modality, Part, Segment, SegmentEmbedding,
    SpaceId, VideoInput, VideoSegmentConfig, cosine, l2_normalize,
};

/// Backends and combinations from a spec string or TOML.
pub mod spec;

/// Hybrid combinators: fallback with a circuit breaker, hedging.
pub use mmembed_core::hybrid;

/// The core crate: trait, types, errors, conformance kit.
pub use mmembed_core as core;

/// Media decoding and CLIP preprocessing (feature `local`).
#[cfg(feature = "local")]
pub use mmembed_media as media;

/// The local candle backend (feature `local`).
#[cfg(feature = "local")]
pub mod local {
    pub use mmembed_candle::*;
}

/// Generation: the trait, requests, answers, statuses.
pub use mmembed_core::generate;

/// BigQuery-style output schemas for generation.
pub use mmembed_core::schema;

/// Generation on self-hosted LLM servers (feature `llm`).
#[cfg(feature = "llm")]
pub mod llm {
    pub use mmembed_llm::*;
}

/// The Vertex AI backends, embeddings and Gemini (feature `vertex`).
#[cfg(feature = "vertex")]
pub mod vertex {
    pub use mmembed_vertex::*;
}
