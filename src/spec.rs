//! Backends from configuration: one spec string or a TOML table builds any
//! backend or combination, for the CLI and for library callers.
//!
//! String form:
//!
//! ```text
//! local[:MODEL][?device=cuda&precision=f16&max_batch=32&fps=1&keyframes_only=true&jpeg_draft=true&heic_thumbnail=true&max_patches=256]
//! vertex[:PROJECT[/LOCATION]][?dimension=512&model=…&base_url=…&concurrency=8&rpm=120&max_attempts=5&timeout_secs=60]
//! fallback(SPEC, SPEC)[?failure_threshold=3&open_secs=30&allow_mixed_spaces=false]
//! hedged(SPEC, SPEC)[?delay_ms=200&allow_mixed_spaces=false]
//! ```
//!
//! Combinations nest up to 16 deep.
//!
//! TOML form: the same fields, with `kind` naming the variant and nested
//! tables for the parts of a combination:
//!
//! ```toml
//! kind = "fallback"
//! failure_threshold = 3
//! [primary]
//! kind = "local"
//! model = "openai/clip-vit-base-patch32"
//! device = "cuda"
//! [secondary]
//! kind = "vertex"
//! project = "my-project"
//! ```
//!
//! Unset Vertex settings come from the environment as in
//! `VertexConfig::from_env`; unset local settings take `LocalOptions`'s
//! defaults.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use mmembed_core::hybrid::{Fallback, FallbackOptions, Hedged, HedgedOptions};
use mmembed_core::{EmbedError, Embedder};
use serde::Deserialize;
use serde_json::{Map, Value};

/// A local backend's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// Model id, hub repository or directory (default: the built-in default).
    pub model: Option<String>,
    /// `auto`, `cpu`, `cuda[:N]`, `metal[:N]`.
    pub device: Option<String>,
    /// `f32`, `f16`, `bf16` (GPUs), `int8` (CPU).
    pub precision: Option<String>,
    /// Largest forward batch.
    pub max_batch: Option<usize>,
    /// Video frames per second.
    pub fps: Option<f64>,
    /// Keyframe-only video sampling.
    pub keyframes_only: Option<bool>,
    /// Reduced JPEG decoding (`LocalOptions::jpeg_draft`).
    pub jpeg_draft: Option<bool>,
    /// HEIC photos as their thumbnails (`LocalOptions::heic_thumbnail`).
    pub heic_thumbnail: Option<bool>,
    /// SigLIP 2 NaFlex's patch budget (`LocalOptions::max_patches`).
    pub max_patches: Option<u32>,
}

/// A Vertex backend's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VertexSpec {
    /// Project (default `GOOGLE_CLOUD_PROJECT`).
    pub project: Option<String>,
    /// Region (default `GOOGLE_CLOUD_LOCATION` or `us-central1`).
    pub location: Option<String>,
    /// Publisher model.
    pub model: Option<String>,
    /// Output size for requests that name none.
    pub dimension: Option<u32>,
    /// Base URL instead of the regional endpoint.
    pub base_url: Option<String>,
    /// Requests in flight.
    pub concurrency: Option<usize>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Attempts per request.
    pub max_attempts: Option<u32>,
    /// Per-request timeout.
    pub timeout_secs: Option<f64>,
}

/// Any backend or combination.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendSpec {
    /// The candle backend.
    Local(LocalSpec),
    /// The Vertex AI client.
    Vertex(VertexSpec),
    /// `primary`, and `secondary` when it fails (see `Fallback`).
    Fallback {
        /// Tried first.
        primary: Box<BackendSpec>,
        /// Used when the primary fails or cannot serve a request.
        secondary: Box<BackendSpec>,
        /// Consecutive failures that open the circuit.
        failure_threshold: Option<u32>,
        /// Seconds the open circuit skips the primary.
        open_secs: Option<f64>,
        /// Accept two embedding spaces.
        allow_mixed_spaces: Option<bool>,
    },
    /// `first`, and `second` too when the first is slow (see `Hedged`).
    Hedged {
        /// Asked at once.
        first: Box<BackendSpec>,
        /// Asked after the delay.
        second: Box<BackendSpec>,
        /// Milliseconds before hedging.
        delay_ms: Option<u64>,
        /// Accept two embedding spaces.
        allow_mixed_spaces: Option<bool>,
    },
}

fn bad(spec: &str, why: impl std::fmt::Display) -> EmbedError {
    EmbedError::invalid("backend spec", format!("`{spec}`: {why}"))
}

const NUMBERS: [&str; 12] = [
    "max_batch",
    "max_patches",
    "fps",
    "dimension",
    "concurrency",
    "rpm",
    "max_attempts",
    "timeout_secs",
    "failure_threshold",
    "open_secs",
    "delay_ms",
    "delay",
];
const BOOLS: [&str; 4] = [
    "keyframes_only",
    "jpeg_draft",
    "heic_thumbnail",
    "allow_mixed_spaces",
];

/// `a=1&b=x` into typed JSON values.
fn params(spec: &str, query: &str, into: &mut Map<String, Value>) -> Result<(), EmbedError> {
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(spec, format!("`{kv}` is not key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        let value = if NUMBERS.contains(&k) {
            let n: f64 = v
                .parse()
                .map_err(|_| bad(spec, format!("`{k}` must be a number, got `{v}`")))?;
            serde_json::Number::from_f64(n)
                .map(|n| {
                    if n.as_f64().is_some_and(|f| f.fract() == 0.0 && f >= 0.0) {
                        Value::from(n.as_f64().unwrap_or_default() as u64)
                    } else {
                        Value::Number(n)
                    }
                })
                .ok_or_else(|| bad(spec, format!("`{k}` must be finite")))?
        } else if BOOLS.contains(&k) {
            Value::Bool(
                v.parse()
                    .map_err(|_| bad(spec, format!("`{k}` must be true or false")))?,
            )
        } else {
            Value::String(v.to_string())
        };
        if into.insert(k.to_string(), value).is_some() {
            return Err(bad(spec, format!("`{k}` is given twice")));
        }
    }
    Ok(())
}

/// Splits `a, b` at the top-level comma (parentheses nest).
fn split_pair(spec: &str, inner: &str) -> Result<(String, String), EmbedError> {
    let mut depth = 0i32;
    let mut commas = vec![];
    for (i, c) in inner.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => commas.push(i),
            _ => {}
        }
        if depth < 0 {
            return Err(bad(spec, "unbalanced parentheses"));
        }
    }
    let cut = match commas[..] {
        [cut] => cut,
        [] => return Err(bad(spec, "a combination takes two backends, `(A, B)`")),
        _ => return Err(bad(spec, "a combination takes exactly two backends")),
    };
    Ok((
        inner[..cut].trim().to_string(),
        inner[cut + 1..].trim().to_string(),
    ))
}

/// How deep combinations may nest in the string form (`fallback(fallback(…),
/// …)`): far past any real use, and a bound on [`to_json`]'s recursion (and
/// on the deserialiser's after it), so a mistyped or hostile spec is an
/// error rather than a stack overflow. The TOML form has the `toml` crate's
/// own recursion limit.
const MAX_NESTING: usize = 16;

fn to_json(spec: &str) -> Result<Value, EmbedError> {
    to_json_nested(spec, 0)
}

/// [`to_json`] of a part `level` combinations deep.
fn to_json_nested(spec: &str, level: usize) -> Result<Value, EmbedError> {
    let s = spec.trim();
    let mut obj = Map::new();
    for kind in ["fallback", "hedged"] {
        let Some(rest) = s
            .strip_prefix(kind)
            .and_then(|r| r.trim_start().strip_prefix('('))
        else {
            continue;
        };
        if level == MAX_NESTING {
            return Err(bad(
                spec,
                format!("combinations nested more than {MAX_NESTING} deep"),
            ));
        }
        // The matching closing parenthesis, then optional `?params`.
        let mut depth = 1i32;
        let close = rest
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map(|(i, _)| i)
            .ok_or_else(|| bad(spec, "unbalanced parentheses"))?;
        let (a, b) = split_pair(spec, &rest[..close])?;
        let tail = rest[close + 1..].trim();
        if !tail.is_empty() {
            let q = tail
                .strip_prefix('?')
                .ok_or_else(|| bad(spec, format!("unexpected `{tail}` after `)`")))?;
            params(spec, q, &mut obj)?;
        }
        let (ka, kb) = if kind == "fallback" {
            ("primary", "secondary")
        } else {
            ("first", "second")
        };
        obj.insert("kind".into(), kind.into());
        obj.insert(ka.into(), to_json_nested(&a, level + 1)?);
        obj.insert(kb.into(), to_json_nested(&b, level + 1)?);
        return Ok(Value::Object(obj));
    }
    let (head, query) = s.split_once('?').unwrap_or((s, ""));
    let (kind, body) = head.split_once(':').unwrap_or((head, ""));
    let body = body.trim();
    match kind.trim() {
        "local" => {
            if !body.is_empty() {
                obj.insert("model".into(), body.into());
            }
        }
        "vertex" | "gemini" => {
            if !body.is_empty() {
                let (project, location) = body.split_once('/').unwrap_or((body, ""));
                obj.insert("project".into(), project.into());
                if !location.is_empty() {
                    obj.insert("location".into(), location.into());
                }
            }
        }
        "openai" | "ollama" => {
            if !body.is_empty() {
                obj.insert("url".into(), body.into());
            }
        }
        other => {
            return Err(bad(
                spec,
                format!(
                    "unknown backend `{other}` (embedding: local, vertex; generation: gemini, \
                     openai, ollama; either: fallback(A, B), hedged(A, B))"
                ),
            ));
        }
    }
    params(spec, query, &mut obj)?;
    obj.insert("kind".into(), kind.trim().into());
    Ok(Value::Object(obj))
}

impl FromStr for BackendSpec {
    type Err = EmbedError;

    /// Parses the string form.
    ///
    /// ```
    /// use mmembed::spec::BackendSpec;
    /// let s: BackendSpec = "fallback(local:demo?device=cpu, vertex:my-proj/europe-west4?dimension=512)?failure_threshold=5"
    ///     .parse()?;
    /// let BackendSpec::Fallback { primary, failure_threshold, .. } = s else { unreachable!() };
    /// assert_eq!(failure_threshold, Some(5));
    /// assert!(matches!(*primary, BackendSpec::Local(ref l) if l.model.as_deref() == Some("demo")));
    /// # Ok::<(), mmembed::EmbedError>(())
    /// ```
    fn from_str(spec: &str) -> Result<Self, EmbedError> {
        let v = to_json(spec)?;
        serde_json::from_value(v).map_err(|e| bad(spec, e))
    }
}

type BuildFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Arc<dyn Embedder>, EmbedError>> + Send + 'a>>;

impl BackendSpec {
    /// Parses the TOML form.
    pub fn from_toml(text: &str) -> Result<Self, EmbedError> {
        toml::from_str(text).map_err(|e| EmbedError::invalid("backend config", e.to_string()))
    }

    /// Builds the backend (loading local models, setting up clients).
    pub fn build(&self) -> BuildFuture<'_> {
        Box::pin(async move {
            let built: Arc<dyn Embedder> = match self {
                #[cfg(feature = "local")]
                Self::Local(l) => Arc::new(crate::local::LocalEmbedder::load(l.options()?).await?),
                #[cfg(feature = "vertex")]
                Self::Vertex(v) => {
                    let client: Arc<dyn Embedder> =
                        Arc::new(crate::vertex::VertexEmbedder::new(v.config()?)?);
                    match v.dimension {
                        Some(d) => {
                            Arc::new(mmembed_core::hybrid::DefaultDimension::new(client, d)?)
                        }
                        None => client,
                    }
                }
                Self::Fallback {
                    primary,
                    secondary,
                    failure_threshold,
                    open_secs,
                    allow_mixed_spaces,
                } => {
                    let d = FallbackOptions::default();
                    let open_for = match open_secs {
                        Some(s) => std::time::Duration::try_from_secs_f64(*s).map_err(|_| {
                            EmbedError::invalid("open_secs", "must be a non-negative number")
                        })?,
                        None => d.open_for,
                    };
                    let opts = FallbackOptions {
                        failure_threshold: failure_threshold.unwrap_or(d.failure_threshold),
                        open_for,
                        allow_mixed_spaces: allow_mixed_spaces.unwrap_or(false),
                    };
                    Arc::new(Fallback::new(
                        primary.build().await?,
                        secondary.build().await?,
                        opts,
                    )?)
                }
                Self::Hedged {
                    first,
                    second,
                    delay_ms,
                    allow_mixed_spaces,
                } => {
                    let d = HedgedOptions::default();
                    let opts = HedgedOptions {
                        delay: delay_ms.map_or(d.delay, std::time::Duration::from_millis),
                        allow_mixed_spaces: allow_mixed_spaces.unwrap_or(false),
                    };
                    Arc::new(Hedged::new(
                        first.build().await?,
                        second.build().await?,
                        opts,
                    )?)
                }
                #[allow(unreachable_patterns)]
                other => {
                    return Err(EmbedError::invalid(
                        "backend spec",
                        format!("{other:?} needs a cargo feature this build lacks"),
                    ));
                }
            };
            Ok(built)
        })
    }
}

#[cfg(feature = "local")]
impl LocalSpec {
    /// The local options this spec describes.
    pub fn options(&self) -> Result<crate::local::LocalOptions, EmbedError> {
        use crate::local::{DeviceSpec, LocalOptions, Manifest, Precision};
        let model = self
            .model
            .clone()
            .unwrap_or_else(|| Manifest::default_model().id);
        let mut o = LocalOptions::new(model);
        if let Some(d) = &self.device {
            o = o.with_device(
                DeviceSpec::from_str(d).map_err(|e| EmbedError::invalid("device", e))?,
            );
        }
        if let Some(p) = &self.precision {
            o = o.with_precision(
                Precision::from_str(p).map_err(|e| EmbedError::invalid("precision", e))?,
            );
        }
        if let Some(b) = self.max_batch {
            o = o.with_max_batch(b);
        }
        if let Some(f) = self.fps {
            o = o.with_video_fps(f);
        }
        if let Some(k) = self.keyframes_only {
            o = o.with_video_keyframes_only(k);
        }
        if let Some(d) = self.jpeg_draft {
            o = o.with_jpeg_draft(d);
        }
        if let Some(t) = self.heic_thumbnail {
            o = o.with_heic_thumbnail(t);
        }
        if let Some(n) = self.max_patches {
            o = o.with_max_patches(n);
        }
        Ok(o)
    }
}

#[cfg(feature = "vertex")]
impl VertexSpec {
    /// The client settings this spec describes, over the environment's.
    pub fn config(&self) -> Result<crate::vertex::VertexConfig, EmbedError> {
        let mut c = crate::vertex::VertexConfig::from_env_with_project(self.project.clone())?;
        if let Some(l) = &self.location {
            c = c.with_location(l.clone());
        }
        if let Some(m) = &self.model {
            c = c.with_model(m.clone());
        }
        if let Some(u) = &self.base_url {
            c = c.with_base_url(u.clone());
        }
        if let Some(n) = self.concurrency {
            c = c.with_max_concurrency(n);
        }
        if let Some(n) = self.rpm {
            c = c.with_requests_per_minute(n);
        }
        if let Some(n) = self.max_attempts {
            c.retry.max_attempts = n.max(1);
        }
        if let Some(t) = self.timeout_secs {
            c = c.with_timeout(
                std::time::Duration::try_from_secs_f64(t)
                    .ok()
                    .filter(|t| !t.is_zero())
                    .ok_or_else(|| EmbedError::invalid("timeout_secs", "must be positive"))?,
            );
        }
        c.validate()?;
        Ok(c)
    }
}

/// A Gemini backend's settings (unset ones from the environment, as for
/// `vertex`; the model defaults to `gemini-2.5-flash`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeminiSpec {
    /// Project (default `GOOGLE_CLOUD_PROJECT`).
    pub project: Option<String>,
    /// Location (default `GOOGLE_CLOUD_LOCATION` or `us-central1`; `global` works).
    pub location: Option<String>,
    /// Gemini model.
    pub model: Option<String>,
    /// Base URL instead of the regional endpoint.
    pub base_url: Option<String>,
    /// Requests in flight.
    pub concurrency: Option<usize>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Attempts per request.
    pub max_attempts: Option<u32>,
    /// Per-request timeout.
    pub timeout_secs: Option<f64>,
}

/// An OpenAI-compatible or Ollama server's settings; the API key comes
/// from `MMEMBED_LLM_API_KEY`, never from the spec.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSpec {
    /// Base URL (default `http://127.0.0.1:8000` for openai,
    /// `http://127.0.0.1:11434` for ollama).
    pub url: Option<String>,
    /// Model name as the server knows it (required).
    pub model: Option<String>,
    /// Requests in flight.
    pub concurrency: Option<usize>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Attempts per request.
    pub max_attempts: Option<u32>,
    /// Per-request timeout.
    pub timeout_secs: Option<f64>,
}

/// Any generation backend or combination:
///
/// ```text
/// gemini[:PROJECT[/LOCATION]][?model=gemini-2.5-flash&concurrency=8&rpm=60&max_attempts=5&timeout_secs=60&base_url=…]
/// openai[:URL]?model=NAME[&concurrency=4&rpm=…&max_attempts=…&timeout_secs=…]
/// ollama[:URL]?model=NAME[&…]
/// fallback(SPEC, SPEC)[?failure_threshold=3&open_secs=30]
/// hedged(SPEC, SPEC)[?delay_ms=200]
/// ```
///
/// ```
/// use mmembed::spec::GeneratorSpec;
/// let s: GeneratorSpec = "fallback(ollama:http://127.0.0.1:11434?model=gemma3, gemini:my-proj/global)".parse()?;
/// assert!(matches!(s, GeneratorSpec::Fallback { .. }));
/// # Ok::<(), mmembed::EmbedError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum GeneratorSpec {
    /// Gemini on Vertex AI.
    Gemini(GeminiSpec),
    /// An OpenAI-compatible chat-completions server.
    Openai(LlmSpec),
    /// An Ollama server.
    Ollama(LlmSpec),
    /// `primary`, and `secondary` when it fails.
    Fallback {
        /// Tried first.
        primary: Box<GeneratorSpec>,
        /// Used when the primary fails.
        secondary: Box<GeneratorSpec>,
        /// Consecutive failures that open the circuit.
        failure_threshold: Option<u32>,
        /// Seconds the open circuit skips the primary.
        open_secs: Option<f64>,
    },
    /// `first`, and `second` too when the first is slow.
    Hedged {
        /// Asked at once.
        first: Box<GeneratorSpec>,
        /// Asked after the delay.
        second: Box<GeneratorSpec>,
        /// Milliseconds before hedging.
        delay_ms: Option<u64>,
    },
}

impl FromStr for GeneratorSpec {
    type Err = EmbedError;

    fn from_str(spec: &str) -> Result<Self, EmbedError> {
        let v = to_json(spec)?;
        serde_json::from_value(v).map_err(|e| bad(spec, e))
    }
}

type GenFuture<'a> = Pin<
    Box<
        dyn Future<Output = Result<Arc<dyn mmembed_core::generate::Generator>, EmbedError>>
            + Send
            + 'a,
    >,
>;

#[cfg(any(feature = "vertex", feature = "llm"))]
fn positive_secs(field: &str, t: f64) -> Result<std::time::Duration, EmbedError> {
    std::time::Duration::try_from_secs_f64(t)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| EmbedError::invalid(field, "must be a positive number"))
}

/// Settings given once for every backend of a [`GeneratorSpec`] (the
/// CLI's flags); a backend's own setting in the spec wins.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GeneratorDefaults {
    /// Requests in flight per backend.
    pub concurrency: Option<usize>,
    /// Requests per minute per backend.
    pub rpm: Option<u32>,
    /// Attempts per request.
    pub max_attempts: Option<u32>,
    /// Per-request timeout in seconds.
    pub timeout_secs: Option<f64>,
}

impl GeneratorSpec {
    /// Fills the settings no backend of the spec gives from `d`.
    ///
    /// ```
    /// use mmembed::spec::{GeneratorDefaults, GeneratorSpec};
    /// let mut s: GeneratorSpec = "fallback(ollama?model=a&rpm=10, gemini:p)".parse()?;
    /// s.fill(&GeneratorDefaults { rpm: Some(60), ..Default::default() });
    /// let GeneratorSpec::Fallback { primary, secondary, .. } = s else { unreachable!() };
    /// assert!(matches!(*primary, GeneratorSpec::Ollama(ref l) if l.rpm == Some(10)));
    /// assert!(matches!(*secondary, GeneratorSpec::Gemini(ref g) if g.rpm == Some(60)));
    /// # Ok::<(), mmembed::EmbedError>(())
    /// ```
    pub fn fill(&mut self, d: &GeneratorDefaults) {
        match self {
            Self::Gemini(g) => {
                g.concurrency = g.concurrency.or(d.concurrency);
                g.rpm = g.rpm.or(d.rpm);
                g.max_attempts = g.max_attempts.or(d.max_attempts);
                g.timeout_secs = g.timeout_secs.or(d.timeout_secs);
            }
            Self::Openai(l) | Self::Ollama(l) => {
                l.concurrency = l.concurrency.or(d.concurrency);
                l.rpm = l.rpm.or(d.rpm);
                l.max_attempts = l.max_attempts.or(d.max_attempts);
                l.timeout_secs = l.timeout_secs.or(d.timeout_secs);
            }
            Self::Fallback {
                primary, secondary, ..
            } => {
                primary.fill(d);
                secondary.fill(d);
            }
            Self::Hedged { first, second, .. } => {
                first.fill(d);
                second.fill(d);
            }
        }
    }

    /// Parses the TOML form (as [`BackendSpec::from_toml`]).
    pub fn from_toml(text: &str) -> Result<Self, EmbedError> {
        toml::from_str(text).map_err(|e| EmbedError::invalid("generator config", e.to_string()))
    }

    /// Builds the generator.
    pub fn build(&self) -> GenFuture<'_> {
        use mmembed_core::generate::Generator;
        Box::pin(async move {
            let built: Arc<dyn Generator> = match self {
                #[cfg(feature = "vertex")]
                Self::Gemini(g) => Arc::new(crate::vertex::GeminiGenerator::new(g.config()?)?),
                #[cfg(feature = "llm")]
                Self::Openai(l) => Arc::new(crate::llm::OpenAiGenerator::new(
                    l.config("http://127.0.0.1:8000")?,
                )?),
                #[cfg(feature = "llm")]
                Self::Ollama(l) => Arc::new(crate::llm::OllamaGenerator::new(
                    l.config("http://127.0.0.1:11434")?,
                )?),
                Self::Fallback {
                    primary,
                    secondary,
                    failure_threshold,
                    open_secs,
                } => {
                    let d = FallbackOptions::default();
                    let opts = FallbackOptions {
                        failure_threshold: failure_threshold.unwrap_or(d.failure_threshold),
                        open_for: match open_secs {
                            Some(s) => {
                                std::time::Duration::try_from_secs_f64(*s).map_err(|_| {
                                    EmbedError::invalid(
                                        "open_secs",
                                        "must be a non-negative number",
                                    )
                                })?
                            }
                            None => d.open_for,
                        },
                        allow_mixed_spaces: false,
                    };
                    Arc::new(Fallback::for_generators(
                        primary.build().await?,
                        secondary.build().await?,
                        opts,
                    )?)
                }
                Self::Hedged {
                    first,
                    second,
                    delay_ms,
                } => {
                    let d = HedgedOptions::default();
                    Arc::new(Hedged::for_generators(
                        first.build().await?,
                        second.build().await?,
                        HedgedOptions {
                            delay: delay_ms.map_or(d.delay, std::time::Duration::from_millis),
                            allow_mixed_spaces: false,
                        },
                    )?)
                }
                #[allow(unreachable_patterns)]
                other => {
                    return Err(EmbedError::invalid(
                        "generator spec",
                        format!("{other:?} needs a cargo feature this build lacks"),
                    ));
                }
            };
            Ok(built)
        })
    }
}

#[cfg(feature = "vertex")]
impl GeminiSpec {
    /// The client settings this spec describes, over the environment's.
    pub fn config(&self) -> Result<crate::vertex::VertexConfig, EmbedError> {
        // The same settings as a Vertex embedding client, but
        // MMEMBED_VERTEX_MODEL names the embedding model: Gemini has its own.
        let model = self
            .model
            .clone()
            .or_else(|| {
                std::env::var("MMEMBED_GEMINI_MODEL")
                    .ok()
                    .filter(|m| !m.is_empty())
            })
            .unwrap_or_else(|| crate::vertex::DEFAULT_GEMINI_MODEL.to_string());
        VertexSpec {
            project: self.project.clone(),
            location: self.location.clone(),
            model: Some(model),
            dimension: None,
            base_url: self.base_url.clone(),
            concurrency: self.concurrency,
            rpm: self.rpm,
            max_attempts: self.max_attempts,
            timeout_secs: self.timeout_secs,
        }
        .config()
    }
}

#[cfg(feature = "llm")]
impl LlmSpec {
    /// The client settings this spec describes.
    pub fn config(&self, default_url: &str) -> Result<crate::llm::LlmConfig, EmbedError> {
        let model = self.model.clone().ok_or_else(|| {
            EmbedError::invalid(
                "model",
                "is required: name the model the server serves (`?model=…`)",
            )
        })?;
        let mut c = crate::llm::LlmConfig::new(
            self.url.clone().unwrap_or_else(|| default_url.to_string()),
            model,
        );
        if let Some(n) = self.concurrency {
            c.max_concurrency = n;
        }
        if let Some(n) = self.rpm {
            c.requests_per_minute = n.max(1);
        }
        if let Some(n) = self.max_attempts {
            c.retry.max_attempts = n.max(1);
        }
        if let Some(t) = self.timeout_secs {
            c.timeout = positive_secs("timeout_secs", t)?;
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_and_toml_forms_agree() {
        let s: BackendSpec = "hedged(local:models/demo?device=cpu&max_batch=8&jpeg_draft=true&heic_thumbnail=true&max_patches=576, fallback(vertex:p/us-east1?dimension=512&rpm=600, local))?delay_ms=150"
            .parse()
            .unwrap();
        let t = BackendSpec::from_toml(
            r#"
            kind = "hedged"
            delay_ms = 150
            [first]
            kind = "local"
            model = "models/demo"
            device = "cpu"
            max_batch = 8
            jpeg_draft = true
            heic_thumbnail = true
            max_patches = 576
            [second]
            kind = "fallback"
            [second.primary]
            kind = "vertex"
            project = "p"
            location = "us-east1"
            dimension = 512
            rpm = 600
            [second.secondary]
            kind = "local"
            "#,
        )
        .unwrap();
        assert_eq!(s, t);
        #[cfg(feature = "local")]
        {
            let BackendSpec::Hedged { first, .. } = s else {
                unreachable!()
            };
            let BackendSpec::Local(l) = *first else {
                unreachable!()
            };
            let o = l.options().unwrap();
            assert!(o.jpeg_draft && o.heic_thumbnail);
            assert_eq!((o.max_batch, o.max_patches), (Some(8), Some(576)));
        }
    }

    #[test]
    fn generator_specs() {
        let s: GeneratorSpec =
            "hedged(openai:http://127.0.0.1:8000?model=qwen&concurrency=2, ollama?model=gemma3)?delay_ms=50"
                .parse()
                .unwrap();
        let GeneratorSpec::Hedged {
            first,
            second,
            delay_ms,
        } = s
        else {
            panic!()
        };
        assert_eq!(delay_ms, Some(50));
        assert!(matches!(*first, GeneratorSpec::Openai(ref l)
            if l.url.as_deref() == Some("http://127.0.0.1:8000") && l.model.as_deref() == Some("qwen") && l.concurrency == Some(2)));
        assert!(matches!(*second, GeneratorSpec::Ollama(ref l) if l.url.is_none()));
        let g: GeneratorSpec = "gemini:p/global?model=gemini-2.5-pro".parse().unwrap();
        assert!(matches!(g, GeneratorSpec::Gemini(ref s)
            if s.project.as_deref() == Some("p") && s.location.as_deref() == Some("global")));
        let e = "local:demo"
            .parse::<GeneratorSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `local`"), "{e}");
        let e = "openai?modle=x"
            .parse::<GeneratorSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("modle"), "{e}");
        let e = "gemini:p?dimension=5"
            .parse::<GeneratorSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("dimension"), "{e}");
    }

    #[test]
    fn mistakes_are_named() {
        let err = |s: &str| s.parse::<BackendSpec>().unwrap_err().to_string();
        assert!(err("cloud:x").contains("unknown backend `cloud`"));
        assert!(
            err("local?devcie=cpu").contains("devcie"),
            "{}",
            err("local?devcie=cpu")
        );
        assert!(err("vertex?dimension=big").contains("must be a number"));
        assert!(err("fallback(local)").contains("two backends"));
        assert!(err("fallback(local, vertex").contains("unbalanced"));
        assert!(err("hedged(local, local, local)").contains("exactly two"));
        assert!(err("local?fps=1&fps=2").contains("twice"));
        assert!(BackendSpec::from_toml("kind = 'local'\nmodle = 'x'").is_err());
    }

    /// Combinations nest 16 deep and no deeper: fifty thousand levels (which
    /// overflowed the stack) are refused, in both string forms.
    #[test]
    fn nesting_is_bounded() {
        let nested = |n: usize, kind: &str, leaf: &str| {
            format!(
                "{}{leaf}{}",
                format!("{kind}(").repeat(n),
                format!(", {leaf})").repeat(n)
            )
        };
        let s: BackendSpec = nested(16, "fallback", "local").parse().unwrap();
        assert!(matches!(s, BackendSpec::Fallback { .. }));
        let g: GeneratorSpec = nested(16, "hedged", "ollama").parse().unwrap();
        assert!(matches!(g, GeneratorSpec::Hedged { .. }));
        for n in [17, 50_000] {
            let e = nested(n, "fallback", "local")
                .parse::<BackendSpec>()
                .unwrap_err();
            assert!(e.to_string().contains("nested more than 16 deep"), "{e}");
            let e = nested(n, "hedged", "ollama")
                .parse::<GeneratorSpec>()
                .unwrap_err();
            assert!(e.to_string().contains("nested more than 16 deep"), "{e}");
        }
    }
}
