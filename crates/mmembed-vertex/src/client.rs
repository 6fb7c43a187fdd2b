//! The Vertex backend: validation, pacing, retries, windowing, merging.

use std::sync::Arc;

use mmembed_core::{
    EmbedError, EmbedRequest, Embedder, EmbedderInfo, Embeddings, Modality, SegmentEmbedding,
    SpaceId, async_trait,
};
use mmembed_transport::{Clock, JsonClient, TokioClock};

use crate::config::VertexConfig;
use crate::prepare::{DIMENSIONS, MAX_TEXT_TOKENS, NATIVE_DIMENSION, bodies};
use crate::wire::{PredictRequest, PredictResponse, Prediction};

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
    transport: JsonClient,
    info: EmbedderInfo,
}

impl std::fmt::Debug for VertexEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VertexEmbedder")
            .field("endpoint", &self.inner.endpoint)
            .field("transport", &self.inner.transport)
            .finish_non_exhaustive()
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
        let transport = cfg.transport("Vertex AI", clock)?;
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

    /// One `:predict` call (pacing, retries and credentials are the
    /// transport's).
    async fn predict(&self, body: &PredictRequest) -> Result<Prediction, EmbedError> {
        let reply = self
            .inner
            .transport
            .post::<PredictResponse>(&self.inner.endpoint, body)
            .await?;
        reply.value.predictions.into_iter().next().ok_or_else(|| {
            EmbedError::remote(Some(200), None, "the service returned no prediction", false)
        })
    }

    async fn embed_one(&self, mut req: EmbedRequest) -> Result<Embeddings, EmbedError> {
        req.validate()?;
        self.inner.info.check(&req)?;
        crate::prepare::fetch_unreadable(&mut req).await?;
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
                (true, None) => Err(EmbedError::remote(
                    None,
                    None,
                    format!("the service returned no {what} embedding"),
                    false,
                )),
                (true, Some(v)) if v.len() != want => Err(EmbedError::remote(
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
                return Err(EmbedError::remote(
                    None,
                    None,
                    "the service returned no video segments",
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
        mmembed_transport::in_order(reqs, self.inner.cfg.max_concurrency, |r| self.embed_one(r))
            .await
    }
}
