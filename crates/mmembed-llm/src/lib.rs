//! Generation on self-hosted LLM servers, for the same prompts as Gemini
//! (BigQuery's `AI.GENERATE` family run offline):
//!
//! - [`OpenAiGenerator`]: OpenAI-compatible `/v1/chat/completions` (vLLM,
//!   llama.cpp's `llama-server`, LM Studio, …). Prompt parts keep their
//!   order (text and `image_url` data URIs); an output schema goes as
//!   `response_format: {"type": "json_schema", …}`.
//! - [`OllamaGenerator`]: Ollama's `/api/chat` with `format` set to the
//!   schema. Ollama takes text and images separately, so images come after
//!   the whole text.
//!
//! Both go through the shared transport (pacing, retries with
//! `Retry-After`, error mapping, API key redaction) and accept images
//! (videos are refused per row: these servers take none).
//!
//! ```no_run
//! # async fn demo() -> Result<(), mmembed_core::EmbedError> {
//! use mmembed_core::generate::{GenerateRequest, Generator};
//! use mmembed_llm::{LlmConfig, OpenAiGenerator};
//! let llm = OpenAiGenerator::new(LlmConfig::new("http://127.0.0.1:8000", "Qwen/Qwen2.5-VL-3B-Instruct"))?;
//! let out = llm
//!     .generate(GenerateRequest::text("Is this a cat?").with_schema("is_cat BOOL".parse().unwrap()))
//!     .await?;
//! println!("{:?} {}", out.fields, out.status);
//! # Ok(()) }
//! ```

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mmembed_core::generate::{GenerateRequest, Generation, GeneratorInfo, Part};
use mmembed_core::{EmbedError, Modality};
use mmembed_media::image_crate::ImageFormat;
use mmembed_media::{encode_for_upload, fetch_remote, read_media};
use mmembed_transport::{Auth, ClientOptions, CredentialsSource, JsonClient, RetryPolicy};
use secrecy::SecretString;
use serde_json::{Map, Value};

#[cfg(feature = "fake")]
pub mod fake;
mod ollama;
mod openai;

pub use ollama::OllamaGenerator;
pub use openai::OpenAiGenerator;

/// Largest image read before encoding.
const MAX_READ_BYTES: u64 = 200 << 20;

/// Settings of a local LLM backend.
#[derive(Clone)]
pub struct LlmConfig {
    /// The server's base URL (`http://127.0.0.1:8000`, `http://127.0.0.1:11434`).
    pub url: String,
    /// Model name as the server knows it.
    pub model: String,
    /// Bearer API key (vLLM `--api-key`, llama.cpp `--api-key`), from
    /// `MMEMBED_LLM_API_KEY` by default; never printed.
    pub api_key: Option<SecretString>,
    /// Per-request timeout (default 300 s: local models are slow on CPUs).
    pub timeout: Duration,
    /// Retries of 429/5xx/network faults.
    pub retry: RetryPolicy,
    /// Client-side pacing (default 6000 per minute: local servers queue).
    pub requests_per_minute: u32,
    /// Requests in flight at once in a batch (default 4).
    pub max_concurrency: usize,
    /// Largest image sent, in bytes (larger ones are downscaled).
    pub max_image_bytes: usize,
}

impl std::fmt::Debug for LlmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmConfig")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

impl LlmConfig {
    /// Defaults for a server and model; the API key from `MMEMBED_LLM_API_KEY`.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            api_key: std::env::var("MMEMBED_LLM_API_KEY")
                .ok()
                .filter(|k| !k.trim().is_empty())
                .map(SecretString::from),
            timeout: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            requests_per_minute: 6000,
            max_concurrency: 4,
            max_image_bytes: 20 << 20,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), EmbedError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(EmbedError::invalid(
                "url",
                format!("`{}` must be an http:// or https:// URL", self.url),
            ));
        }
        if self.model.trim().is_empty() {
            return Err(EmbedError::invalid(
                "model",
                "is empty: name the model the server serves (`?model=…`)",
            ));
        }
        if self.max_concurrency == 0 {
            return Err(EmbedError::invalid("max_concurrency", "must be at least 1"));
        }
        Ok(())
    }

    fn transport(&self, service: &str) -> Result<JsonClient, EmbedError> {
        self.validate()?;
        let source = match &self.api_key {
            Some(k) => CredentialsSource::AccessToken(k.clone()),
            None => CredentialsSource::Anonymous,
        };
        JsonClient::new(
            // The scope only matters for Google credentials, which these never are.
            Auth::new(source, mmembed_transport::CLOUD_PLATFORM, None),
            ClientOptions {
                timeout: self.timeout,
                retry: self.retry,
                requests_per_minute: self.requests_per_minute,
                max_in_flight: self.max_concurrency,
                service: service.to_string(),
            },
        )
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

/// A prompt part as these servers take it.
enum Piece {
    Text(String),
    /// `(mime, base64)`.
    Image(&'static str, String),
}

/// Reads and encodes the media of a prompt (images only).
async fn pieces(req: &GenerateRequest, max_image_bytes: usize) -> Result<Vec<Piece>, EmbedError> {
    let mut out = Vec::with_capacity(req.parts.len());
    for p in &req.parts {
        match p {
            Part::Text(t) => out.push(Piece::Text(t.clone())),
            Part::Media(m) => {
                let what = m.source.describe(Modality::Image);
                let bytes = match fetch_remote(&m.source, Modality::Image, MAX_READ_BYTES).await? {
                    Some(b) => b,
                    None => read_media(&m.source, Modality::Image, MAX_READ_BYTES)?,
                };
                let up = encode_for_upload(
                    &bytes,
                    &what,
                    max_image_bytes,
                    &[ImageFormat::Png, ImageFormat::Jpeg],
                )?;
                out.push(Piece::Image(up.mime_type, B64.encode(&up.bytes)));
            }
        }
    }
    Ok(out)
}

/// What a backend reads from its response: the answer (or why there is
/// none) and the model that answered.
type Extract<R> = fn(&R) -> (Result<String, String>, Option<String>);

/// Sends `body`, parses the answer with `answer`, and builds the row's
/// result: the shared last step of both backends.
async fn complete<R: serde::de::DeserializeOwned>(
    transport: &JsonClient,
    url: &str,
    body: &Value,
    req: &GenerateRequest,
    info: &GeneratorInfo,
    answer: Extract<R>,
) -> Result<Generation, EmbedError> {
    let reply = transport.post::<R>(url, body).await?;
    let (text, model) = answer(&reply.value);
    Ok(Generation::from_answer(
        text,
        req.output_schema.as_ref(),
        String::from_utf8_lossy(&reply.body).into_owned(),
        &info.backend,
        model.as_deref().unwrap_or(&info.model_id),
    ))
}

/// Merges `add` into `base` field by field (objects recursively).
fn merge(base: &mut Map<String, Value>, add: &Map<String, Value>) {
    for (k, v) in add {
        match (base.get_mut(k), v) {
            (Some(Value::Object(b)), Value::Object(a)) => merge(b, a),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Refuses model parameters that would replace the prompt.
fn check_params(params: &Map<String, Value>, reserved: &[&str]) -> Result<(), EmbedError> {
    for r in reserved {
        if params.contains_key(*r) {
            return Err(EmbedError::invalid(
                "model_params",
                format!("cannot set `{r}`: it comes from the row and the output schema"),
            ));
        }
    }
    Ok(())
}
