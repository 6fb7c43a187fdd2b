//! The backend trait.

use async_trait::async_trait;

use crate::{EmbedError, EmbedRequest, EmbedderInfo, Embeddings};

/// A backend that turns text, images and videos into vectors.
///
/// Object safe: hold an `Arc<dyn Embedder>` and switch backends by
/// configuration. Implementations do CPU/GPU work off the async executor.
#[async_trait]
pub trait Embedder: Send + Sync {
    /// What this backend is: model, space, sizes, modalities, limits.
    fn info(&self) -> &EmbedderInfo;

    /// Embeds a batch. Always returns exactly one result per request, in
    /// input order: one bad item never fails the others (like BigQuery's
    /// per-row `status`).
    async fn embed_batch(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>>;

    /// Whether this backend reads `uri` itself (Vertex reads `gs://`
    /// objects server-side). Batch jobs fetch every other remote object
    /// ahead of the backend and pass its bytes. Default: no URI.
    fn reads_uri(&self, uri: &str) -> bool {
        let _ = uri;
        false
    }

    /// Embeds one request.
    async fn embed(&self, req: EmbedRequest) -> Result<Embeddings, EmbedError> {
        self.embed_batch(vec![req])
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
