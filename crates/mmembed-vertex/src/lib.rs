//! mmembed's Vertex AI backends: a typed client for
//! `multimodalembedding@001` behind [`mmembed_core::Embedder`], and Gemini's
//! `generateContent` behind [`mmembed_core::Generator`] ([`GeminiGenerator`]).
//!
//! - Credentials: Application Default Credentials through the official
//!   `google-cloud-auth` crate, or a plain access token; the quota project
//!   goes in `x-goog-user-project`; a 401 refreshes the token once.
//! - Validation before any network call; BMP/GIF/WebP/TIFF/ICO transcoded
//!   to PNG and HEIC to JPEG, oversized images downscaled; `gs://` URIs
//!   passed through, except images of formats the service does not read
//!   from GCS (WebP, TIFF, ICO, HEIC), which are fetched and transcoded.
//! - Video ranges over 120 s are split into interval-aligned windows and
//!   merged into one ordered answer.
//! - Retries with truncated exponential backoff and full jitter, honouring
//!   `Retry-After`; evenly paced requests shared by all clones.

mod client;
mod config;
mod gemini;
mod prepare;
mod wire;

pub use client::VertexEmbedder;
pub use config::{CredentialsSource, DEFAULT_MODEL, RetryPolicy, VertexConfig};
pub use gemini::{
    DEFAULT_GEMINI_MODEL, GeminiGenerator, MAX_INLINE_FILE_BYTES, MAX_INLINE_REQUEST_BYTES,
    VIDEO_SECONDS,
};
/// Time and pacing (the shared transport's).
pub use mmembed_transport::pacing;
pub use mmembed_transport::{Clock, TokioClock, VirtualClock};
pub use prepare::{DIMENSIONS, MAX_TEXT_TOKENS, NATIVE_DIMENSION};
#[cfg(feature = "fake")]
pub mod fake;
