//! Gemini on Vertex AI (`generateContent`) as a [`Generator`], with
//! BigQuery's `AI.GENERATE` semantics (see `GENERATE.md`).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mmembed_core::generate::{GenerateRequest, Generation, Generator, GeneratorInfo, Part};
use mmembed_core::{EmbedError, Media, MediaSource, Modality, async_trait};
use mmembed_media::image_crate::ImageFormat;
use mmembed_media::{encode_for_upload, read_media};
use mmembed_transport::{Clock, JsonClient, TokioClock};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::VertexConfig;

/// The model a `gemini` backend uses unless told otherwise.
pub const DEFAULT_GEMINI_MODEL: &str = "gemini-2.5-flash";
/// Largest image or video sent inline, per file (current Flash models).
pub const MAX_INLINE_FILE_BYTES: usize = 7_000_000;
/// Largest request body with inline data (base64 included).
pub const MAX_INLINE_REQUEST_BYTES: usize = 20_000_000;
/// BigQuery sends at most this much of a video: its first two minutes.
pub const VIDEO_SECONDS: u32 = 120;
const BACKEND: &str = "gemini";
/// Largest media read before encoding (bigger ones belong in a bucket).
const MAX_READ_BYTES: u64 = 200 << 20;

/// A client for Gemini's `generateContent` on Vertex AI.
///
/// Shares the transport of [`crate::VertexEmbedder`] (credentials, quota
/// project, pacing, retries, error mapping). Each request is one
/// `generateContent` call; a batch runs `max_concurrency` at once.
///
/// ```no_run
/// # async fn demo() -> Result<(), mmembed_core::EmbedError> {
/// use mmembed_core::generate::{GenerateRequest, Generator};
/// use mmembed_vertex::{GeminiGenerator, VertexConfig};
/// let gemini = GeminiGenerator::new(VertexConfig::new("my-project").with_model("gemini-2.5-flash"))?;
/// let answer = gemini.generate(GenerateRequest::text("The capital of Washington state?")).await?;
/// println!("{:?} {}", answer.text, answer.status);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct GeminiGenerator {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: VertexConfig,
    url: String,
    transport: JsonClient,
    info: GeneratorInfo,
}

impl std::fmt::Debug for GeminiGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeminiGenerator")
            .field("url", &self.inner.url)
            .field("transport", &self.inner.transport)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    model_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<AnswerPart>,
}

#[derive(Debug, Default, Deserialize)]
struct AnswerPart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
    #[serde(default)]
    block_reason_message: Option<String>,
}

/// The answer text, or why there is none.
fn answer(r: &Response) -> Result<String, String> {
    let Some(c) = r.candidates.first() else {
        return Err(
            match r
                .prompt_feedback
                .as_ref()
                .and_then(|f| f.block_reason.clone())
            {
                Some(reason) => {
                    let msg = r
                        .prompt_feedback
                        .as_ref()
                        .and_then(|f| f.block_reason_message.clone())
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default();
                    format!("blocked: {reason}{msg}")
                }
                None => "the response has no candidates".to_string(),
            },
        );
    };
    match c.finish_reason.as_deref() {
        None | Some("STOP") | Some("FINISH_REASON_UNSPECIFIED") => {}
        Some(other) => return Err(format!("finish reason {other}")),
    }
    let text: String = c
        .content
        .iter()
        .flat_map(|c| &c.parts)
        .filter(|p| !p.thought)
        .filter_map(|p| p.text.as_deref())
        .collect();
    if text.is_empty() {
        return Err("the answer has no text".into());
    }
    Ok(text)
}

/// `snake_case` to `lowerCamel` (BigQuery's examples use the former, the
/// REST API the latter).
fn camel(k: &str) -> String {
    let mut out = String::with_capacity(k.len());
    let mut up = false;
    for c in k.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Renames keys to lowerCamel, except where keys are the user's own data:
/// label names, and property names inside a schema.
fn camel_keys(v: Value, user_keys: bool) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| {
                    let key = if user_keys { k } else { camel(&k) };
                    let inner_user = !user_keys && matches!(key.as_str(), "labels" | "properties");
                    (key, camel_keys(v, inner_user))
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(|v| camel_keys(v, false)).collect()),
        other => other,
    }
}

/// Merges `add` into `base` field by field (objects recursively, anything
/// else replaced).
fn merge(base: &mut Map<String, Value>, add: Map<String, Value>) {
    for (k, v) in add {
        match (base.get_mut(&k), v) {
            (Some(Value::Object(b)), Value::Object(a)) => merge(b, a),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// What a `gs://` object's metadata says: the type it was stored with,
/// unless that is a generic one (which says nothing Gemini could use), and
/// the object itself, to read without asking for its metadata again.
async fn stored_type(
    uri: &str,
    kind: Modality,
) -> Result<(Option<String>, mmembed_store::ObjectInfo), EmbedError> {
    let info = mmembed_store::Stores::shared()
        .head(uri)
        .await
        .map_err(|e| mmembed_media::store_error(e, kind))?;
    let typed = info
        .content_type
        .clone()
        .filter(|t| !mmembed_core::is_generic_type(t));
    Ok((typed, info))
}

fn mime_from_name(name: &str) -> Option<&'static str> {
    let ext = name.rsplit('.').next()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "mpeg" | "mpg" => "video/mpeg",
        "wmv" => "video/wmv",
        "flv" => "video/x-flv",
        "3gp" => "video/3gpp",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        _ => return None,
    })
}

fn too_big_inline(what: &str, len: usize) -> EmbedError {
    EmbedError::media(
        what,
        format!(
            "{len} bytes is over Gemini's {MAX_INLINE_FILE_BYTES} byte limit for inline files: \
             put it in a gs:// bucket"
        ),
        None,
    )
}

/// How many first bytes [`by_bytes`] looks at.
const SNIFF_LEN: usize = 512;

/// How an untyped `gs://` object goes to Gemini
/// ([`GeminiGenerator::untyped_object`]).
enum Untyped {
    /// As `fileData`, of this type (Gemini reads the object itself).
    ByUri(&'static str),
    /// Inline: the whole object, read here, to convert to PNG.
    Inline(bytes::Bytes),
}

/// What a file is to Gemini by its first bytes (magic numbers, as the
/// `infer` crate reads them).
#[derive(Debug, Clone, Copy, PartialEq)]
enum ByBytes {
    /// A type Gemini reads itself (its image and video types).
    Reads(&'static str),
    /// An image in a format Gemini does not take (GIF, BMP, TIFF, …):
    /// decoded and sent as PNG.
    Convert,
    /// Nothing Gemini takes: the type the bytes say, if any.
    Unsupported(Option<&'static str>),
}

fn by_bytes(head: &[u8]) -> ByBytes {
    let head = &head[..head.len().min(SNIFF_LEN)];
    // `infer` reads 3GPP's ISO brands as MP4's.
    if head.len() >= 12 && &head[4..8] == b"ftyp" && matches!(&head[8..11], b"3gp" | b"3g2") {
        return ByBytes::Reads("video/3gpp");
    }
    let Some(t) = infer::get(head).map(|t| t.mime_type()) else {
        return ByBytes::Unsupported(None);
    };
    match t {
        "image/png" | "image/jpeg" | "image/webp" | "image/heif" | "video/mp4"
        | "video/quicktime" | "video/webm" | "video/mpeg" | "video/x-flv" => ByBytes::Reads(t),
        "video/x-m4v" => ByBytes::Reads("video/mp4"),
        "video/x-ms-wmv" => ByBytes::Reads("video/wmv"),
        "image/gif" | "image/bmp" | "image/tiff" | "image/vnd.microsoft.icon" => ByBytes::Convert,
        other => ByBytes::Unsupported(Some(other)),
    }
}

/// The video type bytes say, for Gemini.
fn video_by_bytes(bytes: &[u8]) -> Option<&'static str> {
    match by_bytes(bytes) {
        ByBytes::Reads(t) if t.starts_with("video/") => Some(t),
        _ => None,
    }
}

impl GeminiGenerator {
    /// A client with real time. `cfg.model` names the Gemini model (the
    /// embedding default is replaced by [`DEFAULT_GEMINI_MODEL`]).
    pub fn new(cfg: VertexConfig) -> Result<Self, EmbedError> {
        Self::with_clock(cfg, Arc::new(TokioClock::default()))
    }

    /// A client reading time from `clock`.
    pub fn with_clock(mut cfg: VertexConfig, clock: Arc<dyn Clock>) -> Result<Self, EmbedError> {
        if cfg.model == crate::DEFAULT_MODEL {
            cfg.model = DEFAULT_GEMINI_MODEL.into();
        }
        cfg.validate()?;
        let transport = cfg.transport("Vertex AI Gemini", clock)?;
        let info = GeneratorInfo {
            backend: BACKEND.into(),
            model_id: cfg.model.clone(),
            modalities: vec![Modality::Text, Modality::Image, Modality::Video],
        };
        Ok(Self {
            inner: Arc::new(Inner {
                url: cfg.model_url("generateContent"),
                transport,
                info,
                cfg,
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &VertexConfig {
        &self.inner.cfg
    }

    /// The `generateContent` body for a request (media read and encoded).
    pub async fn body(&self, req: &GenerateRequest) -> Result<Value, EmbedError> {
        let mut parts = Vec::with_capacity(req.parts.len());
        let mut inline_total = 0usize;
        let mut videos = 0;
        for p in &req.parts {
            match p {
                Part::Text(t) => parts.push(json!({"text": t})),
                Part::Media(m) => {
                    let (part, inline) = self.media_part(m, &mut videos).await?;
                    inline_total += inline;
                    parts.push(part);
                }
            }
        }
        if inline_total > MAX_INLINE_REQUEST_BYTES {
            return Err(EmbedError::invalid(
                "prompt",
                format!(
                    "{inline_total} bytes of inline media (base64) is over the {MAX_INLINE_REQUEST_BYTES} \
                     byte request limit: put large media in a gs:// bucket"
                ),
            ));
        }
        let mut body = Map::new();
        body.insert("contents".into(), json!([{"role": "user", "parts": parts}]));
        if let Some(s) = &req.output_schema {
            body.insert(
                "generationConfig".into(),
                json!({"responseMimeType": "application/json", "responseSchema": s.to_vertex()}),
            );
        }
        let params = match camel_keys(Value::Object(req.model_params.clone()), false) {
            Value::Object(o) => o,
            _ => Map::new(),
        };
        if params.contains_key("contents") {
            return Err(EmbedError::invalid(
                "model_params",
                "cannot set `contents`: the prompt comes from the row",
            ));
        }
        if req.output_schema.is_some()
            && params
                .get("generationConfig")
                .is_some_and(|g| g.get("responseSchema").is_some())
        {
            return Err(EmbedError::invalid(
                "model_params",
                "sets generationConfig.responseSchema and an output schema is given too: use one",
            ));
        }
        merge(&mut body, params);
        Ok(Value::Object(body))
    }

    /// One media part; returns it and its inline size (0 for `fileData`).
    async fn media_part(
        &self,
        m: &Media,
        videos: &mut usize,
    ) -> Result<(Value, usize), EmbedError> {
        let name = match &m.source {
            MediaSource::Path(p) => p.to_string_lossy().into_owned(),
            MediaSource::Uri(u) => u.clone(),
            MediaSource::Bytes(_) => String::new(),
        };
        let kind = mmembed_core::generate::media_kind(m);
        // A generic type (octet-stream) says nothing: as if none was given.
        let given = m
            .mime_type
            .clone()
            .filter(|t| !mmembed_core::is_generic_type(t));
        let video_meta = json!({"endOffset": format!("{VIDEO_SECONDS}s")});
        // Gemini reads gs:// objects itself, given their type: the one
        // declared, else the name's, else the one the object was stored
        // with, else the one its first bytes say. Only an image Gemini
        // cannot read (GIF, BMP, …) is read whole here, to send as PNG.
        let mut untyped = None;
        let stored = match &m.source {
            MediaSource::Uri(u) if u.starts_with("gs://") => {
                match given
                    .clone()
                    .or_else(|| mime_from_name(u).map(String::from))
                {
                    Some(t) => Some((u, t)),
                    None => match stored_type(u, kind.unwrap_or(Modality::Image)).await? {
                        (Some(t), _) => Some((u, t)),
                        (None, info) => match self.untyped_object(&info, kind).await? {
                            Untyped::ByUri(t) => Some((u, t.to_string())),
                            Untyped::Inline(bytes) => {
                                untyped = Some(bytes);
                                None
                            }
                        },
                    },
                }
            }
            _ => None,
        };
        if let Some((u, mime)) = stored {
            let mut part = json!({"fileData": {"mimeType": mime, "fileUri": u}});
            if mime.starts_with("video/") {
                *videos += 1;
                part["videoMetadata"] = video_meta;
            }
            self.one_video(*videos)?;
            return Ok((part, 0));
        }
        let what = if name.is_empty() {
            m.source.describe(kind.unwrap_or(Modality::Image))
        } else {
            mmembed_store::redact(&name)
        };
        let read_kind = kind.unwrap_or(Modality::Image);
        let bytes = if let Some(bytes) = untyped {
            bytes
        } else {
            match mmembed_media::fetch_remote(&m.source, read_kind, MAX_READ_BYTES).await? {
                Some(b) => b,
                None => read_media(&m.source, read_kind, MAX_READ_BYTES)?,
            }
        };
        let is_video = kind == Some(Modality::Video)
            || given.as_deref().is_some_and(|t| t.starts_with("video/"))
            || (kind.is_none() && video_by_bytes(&bytes).is_some());
        let (data, mime) = if is_video {
            *videos += 1;
            self.one_video(*videos)?;
            let mime = given
                .clone()
                .or_else(|| video_by_bytes(&bytes).map(String::from))
                .or_else(|| mime_from_name(&name).map(String::from))
                .unwrap_or_else(|| "video/mp4".into());
            if bytes.len() > MAX_INLINE_FILE_BYTES {
                return Err(too_big_inline(&what, bytes.len()));
            }
            (bytes.to_vec(), mime)
        } else {
            // Gemini takes PNG, JPEG, WebP, HEIC/HEIF; others become PNG,
            // large ones are downscaled to fit the inline limit.
            let declared = given
                .clone()
                .or_else(|| mime_from_name(&name).map(String::from))
                .or_else(|| match by_bytes(&bytes) {
                    ByBytes::Reads(t) if t == "image/heif" => Some(t.into()),
                    _ => None,
                });
            if let Some(heif) = declared.filter(|t| t == "image/heic" || t == "image/heif") {
                // Gemini reads HEIC/HEIF; we cannot decode them, so they go
                // as they are, within the inline limit.
                if bytes.len() > MAX_INLINE_FILE_BYTES {
                    return Err(too_big_inline(&what, bytes.len()));
                }
                (bytes.to_vec(), heif)
            } else {
                let up = encode_for_upload(
                    &bytes,
                    &what,
                    MAX_INLINE_FILE_BYTES,
                    &[ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP],
                )?;
                (up.bytes, up.mime_type.to_string())
            }
        };
        let encoded = B64.encode(&data);
        let size = encoded.len();
        let mut part = json!({"inlineData": {"mimeType": mime, "data": encoded}});
        if is_video {
            part["videoMetadata"] = video_meta;
        }
        Ok((part, size))
    }

    /// A `gs://` object stored with a generic type, by its first bytes:
    /// [`Untyped::ByUri`] for one Gemini reads itself (one request, its
    /// body abandoned after them), [`Untyped::Inline`] for an image to
    /// convert (the same request read on to the end; pinned to the
    /// generation its metadata gave, so a rewrite in between is an error),
    /// an error for anything else, without reading on.
    async fn untyped_object(
        &self,
        info: &mmembed_store::ObjectInfo,
        kind: Option<Modality>,
    ) -> Result<Untyped, EmbedError> {
        let read_kind = kind.unwrap_or(Modality::Image);
        // What the check saw, for after it (it must own what it holds).
        let seen = Arc::new(std::sync::OnceLock::new());
        let saw = seen.clone();
        let convert = move |head: &[u8]| {
            let b = by_bytes(head);
            let _ = saw.set(b);
            b == ByBytes::Convert
        };
        let read = mmembed_store::Stores::shared()
            .read_listed_if(info, MAX_READ_BYTES, SNIFF_LEN, &convert)
            .await
            .map_err(|e| mmembed_media::store_error(e, read_kind))?;
        let what = mmembed_store::redact(&info.uri);
        match (read, seen.get().copied()) {
            (Some(bytes), _) => Ok(Untyped::Inline(bytes)),
            (None, Some(ByBytes::Reads(t))) => Ok(Untyped::ByUri(t)),
            (None, Some(ByBytes::Unsupported(Some(t)))) => Err(EmbedError::media(
                &what,
                format!("stored without a type, and its bytes are {t}, which Gemini does not read"),
                None,
            )),
            (None, _) => Err(EmbedError::media(
                &what,
                "stored without a type, and its first bytes are no image or video format",
                None,
            )),
        }
    }

    fn one_video(&self, videos: usize) -> Result<(), EmbedError> {
        if videos > 1 {
            return Err(EmbedError::invalid(
                "prompt",
                "holds more than one video; BigQuery's AI.GENERATE uses at most one",
            ));
        }
        Ok(())
    }

    async fn generate_one(&self, req: GenerateRequest) -> Result<Generation, EmbedError> {
        self.inner.info.check(&req)?;
        let body = self.body(&req).await?;
        let reply = self
            .inner
            .transport
            .post::<Response>(&self.inner.url, &body)
            .await?;
        let full = String::from_utf8_lossy(&reply.body).into_owned();
        let model = reply
            .value
            .model_version
            .clone()
            .unwrap_or_else(|| self.inner.info.model_id.clone());
        Ok(Generation::from_answer(
            answer(&reply.value),
            req.output_schema.as_ref(),
            full,
            BACKEND,
            &model,
        ))
    }
}

#[async_trait]
impl Generator for GeminiGenerator {
    fn info(&self) -> &GeneratorInfo {
        &self.inner.info
    }

    fn reads_uri(&self, uri: &str) -> bool {
        uri.starts_with("gs://")
    }

    async fn generate_batch(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> Vec<Result<Generation, EmbedError>> {
        mmembed_transport::in_order(reqs, self.inner.cfg.max_concurrency, |r| {
            self.generate_one(r)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemini's types by magic number; an ISO-BMFF HEIC is an image (an
    /// `ftyp` box alone once sent it as MP4 video), GIF is converted, AVI
    /// and unknown bytes are refused.
    #[test]
    fn files_are_typed_by_their_first_bytes() {
        let iso = |brand: &[u8; 4]| {
            let mut b = vec![0, 0, 0, 24];
            b.extend_from_slice(b"ftyp");
            b.extend_from_slice(brand);
            b.extend_from_slice(&[0, 0, 0, 0]);
            b.extend_from_slice(brand);
            b.extend_from_slice(b"mif1");
            b
        };
        let cases: [(Vec<u8>, ByBytes); 10] = [
            (
                b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(),
                ByBytes::Reads("image/png"),
            ),
            (
                vec![0xff, 0xd8, 0xff, 0xe0, 0, 0x10],
                ByBytes::Reads("image/jpeg"),
            ),
            (iso(b"heic"), ByBytes::Reads("image/heif")),
            (iso(b"isom"), ByBytes::Reads("video/mp4")),
            (iso(b"qt  "), ByBytes::Reads("video/quicktime")),
            (iso(b"3gp5"), ByBytes::Reads("video/3gpp")),
            (b"GIF89a\x01\0\x01\0".to_vec(), ByBytes::Convert),
            (
                b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0\x28\0".to_vec(),
                ByBytes::Convert,
            ),
            (
                b"RIFF\0\0\0\0AVI LIST".to_vec(),
                ByBytes::Unsupported(Some("video/x-msvideo")),
            ),
            (b"hello, world".to_vec(), ByBytes::Unsupported(None)),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                by_bytes(&bytes),
                want,
                "{:?}",
                &bytes[..bytes.len().min(12)]
            );
        }
        assert_eq!(video_by_bytes(&iso(b"heic")), None);
        assert_eq!(video_by_bytes(&iso(b"mp42")), Some("video/mp4"));
    }

    #[test]
    fn params_merge_field_by_field_in_either_case() {
        let mut body =
            json!({"contents": [], "generationConfig": {"responseMimeType": "application/json"}})
                .as_object()
                .cloned()
                .unwrap();
        let params = camel_keys(
            json!({"generation_config": {"thinking_config": {"thinking_budget": 0}, "temperature": 0},
                   "labels": {"my_job": "x"}}),
            false,
        );
        merge(&mut body, params.as_object().cloned().unwrap());
        assert_eq!(
            Value::Object(body),
            json!({"contents": [], "generationConfig": {"responseMimeType": "application/json",
                   "thinkingConfig": {"thinkingBudget": 0}, "temperature": 0},
                   "labels": {"my_job": "x"}})
        );
        // Property names inside a schema are the user's.
        let v = camel_keys(
            json!({"response_schema": {"properties": {"first_name": {"type": "STRING"}}}}),
            false,
        );
        assert_eq!(
            v,
            json!({"responseSchema": {"properties": {"first_name": {"type": "STRING"}}}})
        );
    }

    #[test]
    fn answers_skip_thoughts_and_name_what_went_wrong() {
        let r: Response = serde_json::from_value(json!({"candidates": [{"content": {"parts": [
            {"text": "hmm", "thought": true}, {"text": "Olym"}, {"text": "pia"}]}, "finishReason": "STOP"}]}))
        .unwrap();
        assert_eq!(answer(&r).unwrap(), "Olympia");
        let r: Response =
            serde_json::from_value(json!({"promptFeedback": {"blockReason": "SAFETY"}})).unwrap();
        assert_eq!(answer(&r).unwrap_err(), "blocked: SAFETY");
        let r: Response = serde_json::from_value(
            json!({"candidates": [{"content": {"parts": [{"text": "{\"a\": "}]},
            "finishReason": "MAX_TOKENS"}]}),
        )
        .unwrap();
        assert_eq!(answer(&r).unwrap_err(), "finish reason MAX_TOKENS");
    }
}
