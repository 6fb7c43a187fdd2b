//! Generation next to embedding: the [`Generator`] trait every text
//! generation backend implements (Gemini on Vertex, OpenAI-compatible
//! servers, Ollama), with BigQuery's `AI.GENERATE` row semantics: one
//! result per request, a `status` that is empty on success, the typed
//! values of an output schema, and the server's `full_response`.
//!
//! ```
//! use mmembed_core::generate::{GenerateRequest, Part};
//! use mmembed_core::schema::{FieldType, OutputSchema};
//! let req = GenerateRequest::text("How many legs has a spider? Answer with a number.")
//!     .with_schema(OutputSchema::result(FieldType::Int64));
//! assert!(req.validate().is_ok());
//! assert_eq!(req.parts.len(), 1);
//! assert!(matches!(&req.parts[0], Part::Text(t) if t.starts_with("How many")));
//! ```

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::schema::{OutputSchema, quote};
use crate::{EmbedError, Media, Modality};

/// What a status starts with when a request failed in a way that may
/// succeed when re-run (quota, overload, network): BigQuery's documented
/// text, so users filter rows to retry the same way.
pub const RETRYABLE_PREFIX: &str = "A retryable error occurred: ";

/// One piece of a prompt; a prompt is their concatenation, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text or a column's value.
    Text(String),
    /// An image or a video (bytes, a path, a URI), with its MIME type when
    /// known.
    Media(Media),
}

/// One generation request: the counterpart of one BigQuery row's prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateRequest {
    /// The prompt, in order.
    pub parts: Vec<Part>,
    /// The columns to answer in; `None`: free text.
    pub output_schema: Option<OutputSchema>,
    /// Extra request fields (BigQuery's `model_params`), in the backend's
    /// own request shape; merged into the request field by field.
    pub model_params: Map<String, Value>,
}

impl GenerateRequest {
    /// A text-only prompt.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            parts: vec![Part::Text(text.into())],
            ..Self::default()
        }
    }

    /// Appends text.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.parts.push(Part::Text(text.into()));
        self
    }

    /// Appends an image or video.
    pub fn with_media(mut self, media: impl Into<Media>) -> Self {
        self.parts.push(Part::Media(media.into()));
        self
    }

    /// Sets the output schema.
    pub fn with_schema(mut self, schema: OutputSchema) -> Self {
        self.output_schema = Some(schema);
        self
    }

    /// Sets the model parameters (a JSON object).
    pub fn with_params(mut self, params: Map<String, Value>) -> Self {
        self.model_params = params;
        self
    }

    /// Checks what every backend needs: a prompt with some content.
    pub fn validate(&self) -> Result<(), EmbedError> {
        let has_content = self.parts.iter().any(|p| match p {
            Part::Text(t) => !t.trim().is_empty(),
            Part::Media(_) => true,
        });
        if !has_content {
            return Err(EmbedError::invalid(
                "prompt",
                "is empty: give text or media to generate from",
            ));
        }
        Ok(())
    }

    /// The text parts joined (for backends and messages that need it).
    pub fn prompt_text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Media(_) => None,
            })
            .collect()
    }
}

/// One answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The answer's text (thought parts left out); `None` when the model
    /// gave none (blocked, cut off before any text).
    pub text: Option<String>,
    /// With an output schema and a valid answer: the typed values, one per
    /// field. `None` otherwise (BigQuery's NULL result).
    pub fields: Option<Map<String, Value>>,
    /// The server's response body, as sent.
    pub full_response: String,
    /// Empty on success; otherwise why there is no result (`blocked:
    /// SAFETY`, `finish reason MAX_TOKENS`, `not a number: "about 4"`).
    pub status: String,
    /// The backend that answered.
    pub backend: String,
    /// The model that answered.
    pub model: String,
}

impl Generation {
    /// Builds an answer from what the backend extracted: `Ok(text)` (the
    /// answer) or `Err(reason)` (blocked, a finish reason other than a
    /// normal stop). With a schema, the text is parsed and type-checked; a
    /// text that does not fit leaves the fields NULL and the status quoting
    /// it.
    pub fn from_answer(
        answer: Result<String, String>,
        schema: Option<&OutputSchema>,
        full_response: String,
        backend: &str,
        model: &str,
    ) -> Self {
        let (text, fields, status) = match answer {
            Err(reason) => (None, None, reason),
            Ok(text) => match schema {
                None => (Some(text), None, String::new()),
                Some(s) => match s.parse_answer(&text) {
                    Ok(f) => (Some(text), Some(f), String::new()),
                    Err(e) => (Some(text), None, e.to_string()),
                },
            },
        };
        Self {
            text,
            fields,
            full_response,
            status,
            backend: backend.to_string(),
            model: model.to_string(),
        }
    }

    /// Whether there is a result (the status is empty).
    pub fn is_ok(&self) -> bool {
        self.status.is_empty()
    }

    /// The `result` column: the text without a schema, the `result` field
    /// of a one-field schema named so; `None` when there is no result.
    pub fn result(&self) -> Option<Value> {
        if !self.is_ok() {
            return None;
        }
        match &self.fields {
            Some(f) => f.get("result").cloned(),
            None => self.text.clone().map(Value::String),
        }
    }
}

/// The status text of a failed request, as BigQuery writes it: retryable
/// failures (quota, overload, timeouts, network) start with
/// [`RETRYABLE_PREFIX`].
pub fn status_of(e: &EmbedError) -> String {
    let retryable = e.is_retryable() || matches!(e, EmbedError::Overloaded { .. });
    if retryable {
        format!("{RETRYABLE_PREFIX}{e}")
    } else {
        e.to_string()
    }
}

/// A short reason for an answer that was not usable, quoting it.
pub fn unusable(what: &str, text: &str) -> String {
    format!("{what}: {}", quote(text))
}

/// What a generation backend is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorInfo {
    /// Backend name (`gemini`, `openai`, `ollama`, `fallback(…)`).
    pub backend: String,
    /// Model name.
    pub model_id: String,
    /// Media kinds a prompt may hold besides text.
    pub modalities: Vec<Modality>,
}

impl GeneratorInfo {
    /// Checks a request against what this backend takes (media kinds are
    /// known only from MIME types or file names, so unknown ones pass: the
    /// backend decides).
    pub fn check(&self, req: &GenerateRequest) -> Result<(), EmbedError> {
        req.validate()?;
        for p in &req.parts {
            if let Part::Media(m) = p
                && let Some(kind) = media_kind(m)
                && !self.modalities.contains(&kind)
            {
                return Err(EmbedError::UnsupportedModality {
                    modality: kind,
                    backend: self.backend.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Image or video, from the MIME type or the file name's extension.
pub fn media_kind(m: &Media) -> Option<Modality> {
    if let Some(t) = &m.mime_type {
        if t.starts_with("image/") {
            return Some(Modality::Image);
        }
        if t.starts_with("video/") {
            return Some(Modality::Video);
        }
    }
    let name = match &m.source {
        crate::MediaSource::Path(p) => p.to_string_lossy().to_string(),
        crate::MediaSource::Uri(u) => u.clone(),
        crate::MediaSource::Bytes(_) => return None,
    };
    let ext = name
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" | "jpg" | "jpeg" | "webp" | "gif" | "bmp" | "tif" | "tiff" | "ico" | "heic"
        | "heif" => Some(Modality::Image),
        "mp4" | "mov" | "webm" | "mkv" | "avi" | "mpeg" | "mpg" | "wmv" | "flv" | "3gp" | "m4v" => {
            Some(Modality::Video)
        }
        _ => None,
    }
}

/// A backend that answers prompts (text and media) with text or typed
/// values.
///
/// Object safe: hold an `Arc<dyn Generator>`. Like [`crate::Embedder`],
/// one result per request, in order; one bad request never fails the
/// others. `Err` is for requests that got no answer (invalid, refused,
/// network, quota): [`status_of`] turns it into a row's status. An answer
/// that was blocked or does not fit the schema is an `Ok` whose
/// [`Generation::status`] says so.
#[async_trait]
pub trait Generator: Send + Sync {
    /// What this backend is.
    fn info(&self) -> &GeneratorInfo;

    /// Answers a batch.
    async fn generate_batch(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> Vec<Result<Generation, EmbedError>>;

    /// Whether this backend reads `uri` itself (Gemini reads `gs://`);
    /// callers fetch the others and pass bytes.
    fn reads_uri(&self, uri: &str) -> bool {
        let _ = uri;
        false
    }

    /// Answers one request.
    async fn generate(&self, req: GenerateRequest) -> Result<Generation, EmbedError> {
        self.generate_batch(vec![req])
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                Err(EmbedError::Backend {
                    backend: self.info().backend.clone(),
                    message: "returned no result for a one-item batch".into(),
                    retryable: false,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::FieldType;

    #[test]
    fn answers_become_rows() {
        let s = OutputSchema::result(FieldType::Float64);
        let g = Generation::from_answer(
            Ok("{\"result\": 2}".into()),
            Some(&s),
            "{}".into(),
            "b",
            "m",
        );
        assert!(g.is_ok());
        assert_eq!(g.result(), Some(serde_json::json!(2.0)));
        let g = Generation::from_answer(Ok("about 4".into()), Some(&s), "{}".into(), "b", "m");
        assert!(!g.is_ok() && g.result().is_none());
        assert!(g.status.contains("\"about 4\""), "{}", g.status);
        let g = Generation::from_answer(Err("blocked: SAFETY".into()), None, "{}".into(), "b", "m");
        assert_eq!(g.status, "blocked: SAFETY");
        assert!(g.result().is_none());
        let g = Generation::from_answer(Ok("Olympia".into()), None, "{}".into(), "b", "m");
        assert_eq!(g.result(), Some("Olympia".into()));
    }

    #[test]
    fn retryable_failures_carry_bigquerys_prefix() {
        let quota = EmbedError::Remote {
            http_status: Some(429),
            status: Some("RESOURCE_EXHAUSTED".into()),
            message: "Quota exceeded".into(),
            retryable: true,
        };
        assert!(status_of(&quota).starts_with("A retryable error occurred: "));
        let bad = EmbedError::invalid("prompt", "is empty");
        assert!(!status_of(&bad).starts_with("A retryable"));
        assert!(GenerateRequest::text("  ").validate().is_err());
        assert!(
            GenerateRequest::default()
                .with_media(std::path::PathBuf::from("a.png"))
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn media_kinds_from_type_or_name() {
        let m = |s: &str| Media::from(std::path::PathBuf::from(s));
        assert_eq!(media_kind(&m("a/b.JPG")), Some(Modality::Image));
        assert_eq!(media_kind(&m("clip.mp4")), Some(Modality::Video));
        assert_eq!(media_kind(&m("notes.txt")), None);
        let info = GeneratorInfo {
            backend: "x".into(),
            model_id: "m".into(),
            modalities: vec![Modality::Image],
        };
        let e = info
            .check(&GenerateRequest::text("describe").with_media(std::path::PathBuf::from("v.mp4")))
            .unwrap_err();
        assert!(matches!(e, EmbedError::UnsupportedModality { .. }), "{e}");
    }
}
