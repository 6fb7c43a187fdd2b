//! The Vertex backend: validation, pacing, retries, windowing, merging.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mmembed_core::{
    EmbedError, EmbedRequest, Embedder, EmbedderInfo, Embeddings, Modality, SegmentEmbedding,
    SpaceId, async_trait,
};
use reqwest::StatusCode;

use crate::auth::{Auth, scrub};
use crate::config::VertexConfig;
use crate::pacing::{Clock, Pacer, TokioClock};
use crate::prepare::{DIMENSIONS, MAX_TEXT_TOKENS, NATIVE_DIMENSION, bodies};
use crate::wire::{ErrorBody, PredictRequest, PredictResponse, Prediction};

const BACKEND: &str = "vertex";

/// A client for Vertex AI's `multimodalembedding@001`, as an [`Embedder`].
///
/// Cheap to clone; clones share the HTTP connection pool, the credentials and
/// the rate limiter, so a whole program stays within one quota.
///
/// ```no_run
/// # async fn demo() -> Result<(), mmembed_core::EmbedError> {
/// use mmembed_core::{Embedder, EmbedRequest};
/// use mmembed_vertex::{VertexConfig, VertexEmbedder};
/// let vertex = VertexEmbedder::new(VertexConfig::from_env()?)?;
/// let out = vertex.embed(EmbedRequest::text("a photo of a cat").with_dimension(512)).await?;
/// assert_eq!(out.text.unwrap().len(), 512);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct VertexEmbedder {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: VertexConfig,
    endpoint: String,
    http: reqwest::Client,
    auth: Auth,
    pacer: Pacer,
    clock: Arc<dyn Clock>,
    info: EmbedderInfo,
}

impl std::fmt::Debug for VertexEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VertexEmbedder")
            .field("endpoint", &self.inner.endpoint)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

/// What one attempt ended with, when it did not succeed.
struct Failure {
    error: EmbedError,
    retry_after: Option<Duration>,
    unauthorized: bool,
}

fn remote(
    http: Option<u16>,
    status: Option<String>,
    message: String,
    retryable: bool,
) -> EmbedError {
    EmbedError::Remote {
        http_status: http,
        status,
        message,
        retryable,
    }
}

impl VertexEmbedder {
    /// A client with real time.
    pub fn new(cfg: VertexConfig) -> Result<Self, EmbedError> {
        Self::with_clock(cfg, Arc::new(TokioClock::default()))
    }

    /// A client reading time from `clock` (tests and simulations run retries
    /// and pacing in virtual time this way).
    pub fn with_clock(cfg: VertexConfig, clock: Arc<dyn Clock>) -> Result<Self, EmbedError> {
        cfg.validate()?;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .user_agent(concat!("mmembed/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                remote(
                    None,
                    None,
                    format!("cannot build the HTTP client: {e}"),
                    false,
                )
            })?;
        let info = EmbedderInfo {
            backend: BACKEND.into(),
            model_id: cfg.model.clone(),
            space: SpaceId::new(format!("vertex:{}", cfg.model)),
            native_dimension: NATIVE_DIMENSION as usize,
            supported_dimensions: DIMENSIONS.to_vec(),
            modalities: vec![Modality::Text, Modality::Image, Modality::Video],
            max_text_tokens: Some(MAX_TEXT_TOKENS),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint: cfg.endpoint(),
                http,
                auth: Auth::new(cfg.credentials.clone(), cfg.quota_project.clone()),
                pacer: Pacer::new(cfg.requests_per_minute),
                clock,
                info,
                cfg,
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &VertexConfig {
        &self.inner.cfg
    }

    async fn attempt(&self, body: &PredictRequest, refresh: bool) -> Result<Prediction, Failure> {
        let i = &self.inner;
        let plain = |error: EmbedError| Failure {
            error,
            retry_after: None,
            unauthorized: false,
        };
        let headers = i.auth.headers(refresh).await.map_err(plain)?;
        let sent = i
            .http
            .post(&i.endpoint)
            .headers(headers)
            .json(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(plain(EmbedError::Timeout {
                    after: i.cfg.timeout,
                }));
            }
            Err(e) => {
                return Err(plain(remote(
                    None,
                    Some("UNAVAILABLE".into()),
                    format!("request failed: {e}"),
                    true,
                )));
            }
        };
        let code = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) if e.is_timeout() => {
                return Err(plain(EmbedError::Timeout {
                    after: i.cfg.timeout,
                }));
            }
            Err(e) => {
                return Err(plain(remote(
                    Some(code.as_u16()),
                    Some("UNAVAILABLE".into()),
                    format!("connection lost while reading the response: {e}"),
                    true,
                )));
            }
        };
        if code.is_success() {
            let parsed: PredictResponse = serde_json::from_slice(&bytes).map_err(|e| {
                plain(remote(
                    Some(code.as_u16()),
                    None,
                    format!("malformed response from the service: {e}"),
                    false,
                ))
            })?;
            return parsed.predictions.into_iter().next().ok_or_else(|| {
                plain(remote(
                    Some(code.as_u16()),
                    None,
                    "the service returned no prediction".into(),
                    false,
                ))
            });
        }
        let (status, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.error.status, b.error.message),
            Err(_) => (
                None,
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
            ),
        };
        let message = scrub(message, i.auth.static_token());
        let retryable = matches!(
            code,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::INTERNAL_SERVER_ERROR
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        );
        Err(Failure {
            error: remote(Some(code.as_u16()), status, message, retryable),
            retry_after,
            unauthorized: code == StatusCode::UNAUTHORIZED,
        })
    }

    /// One `:predict` call with pacing, retries and one token refresh.
    async fn predict(&self, body: &PredictRequest) -> Result<Prediction, EmbedError> {
        let i = &self.inner;
        let policy = i.cfg.retry;
        let mut retries = 0u32;
        let mut refreshed = false;
        let mut refresh = false;
        loop {
            i.pacer.acquire(i.clock.as_ref()).await;
            match self.attempt(body, refresh).await {
                Ok(p) => return Ok(p),
                Err(f) if f.unauthorized && !refreshed => {
                    tracing::debug!("401 from Vertex: refreshing credentials once");
                    refreshed = true;
                    refresh = true;
                }
                Err(f) if f.error.is_retryable() && retries + 1 < policy.max_attempts => {
                    let wait = policy.delay(retries, f.retry_after);
                    tracing::debug!(error = %f.error, attempt = retries + 1, ?wait, "retrying Vertex request");
                    i.clock.sleep(wait).await;
                    retries += 1;
                    refresh = false;
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    async fn embed_one(&self, mut req: EmbedRequest) -> Result<Embeddings, EmbedError> {
        req.validate()?;
        self.inner.info.check(&req)?;
        crate::prepare::fetch_non_gcs(&mut req).await?;
        let dimension = req.dimension.unwrap_or(NATIVE_DIMENSION) as usize;
        let max_image = self.inner.cfg.max_image_bytes;
        let bodies = bodies(&req, max_image)?;
        let mut text = None;
        let mut image = None;
        let mut video = Vec::new();
        for (n, body) in bodies.iter().enumerate() {
            let p = self.predict(body).await?;
            if n == 0 {
                text = p.text_embedding;
                image = p.image_embedding;
            }
            video.extend(p.video_embeddings.into_iter().map(|s| SegmentEmbedding {
                start_sec: s.start_offset_sec,
                end_sec: s.end_offset_sec,
                embedding: s.embedding,
                error: None,
            }));
        }
        let check =
            |what: &str, present: bool, v: Option<&Vec<f32>>, want: usize| match (present, v) {
                (false, _) => Ok(()),
                (true, None) => Err(remote(
                    None,
                    None,
                    format!("the service returned no {what} embedding"),
                    false,
                )),
                (true, Some(v)) if v.len() != want => Err(remote(
                    None,
                    None,
                    format!(
                        "the service returned a {what} embedding of {} values, expected {want}",
                        v.len()
                    ),
                    false,
                )),
                _ => Ok(()),
            };
        check("text", req.text.is_some(), text.as_ref(), dimension)?;
        check("image", req.image.is_some(), image.as_ref(), dimension)?;
        if req.video.is_some() {
            if video.is_empty() {
                return Err(remote(
                    None,
                    None,
                    "the service returned no video segments".into(),
                    false,
                ));
            }
            for s in &video {
                check("video", true, Some(&s.embedding), NATIVE_DIMENSION as usize)?;
            }
        }
        Ok(Embeddings {
            text,
            image,
            video,
            dimension,
            space: self.inner.info.space.clone(),
            model: self.inner.info.model_id.clone(),
            backend: BACKEND.into(),
        })
    }
}

#[async_trait]
impl Embedder for VertexEmbedder {
    fn info(&self) -> &EmbedderInfo {
        &self.inner.info
    }

    fn reads_uri(&self, uri: &str) -> bool {
        uri.starts_with("gs://")
    }

    async fn embed_batch(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>> {
        futures::stream::iter(reqs.into_iter().map(|r| self.embed_one(r)))
            .buffered(self.inner.cfg.max_concurrency)
            .collect()
            .await
    }
}
