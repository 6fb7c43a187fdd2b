//! Core of mmembed: the [`Embedder`] trait every backend implements, the
//! request and response types (one request mirrors one Vertex AI
//! `multimodalembedding` instance), video segment semantics and errors.
//!
//! Callers hold an `Arc<dyn Embedder>` and switch backends at run time:
//!
//! ```
//! use std::sync::Arc;
//! use mmembed_core::{Embedder, EmbedRequest};
//!
//! async fn caption_vector(e: Arc<dyn Embedder>) -> Result<Vec<f32>, mmembed_core::EmbedError> {
//!     let out = e.embed(EmbedRequest::text("a photo of a cat")).await?;
//!     Ok(out.text.expect("a text request gets a text vector"))
//! }
//! ```

pub mod batching;
mod embedder;
mod error;
pub mod generate;
pub mod hybrid;
pub mod schema;
mod segments;
#[cfg(feature = "testkit")]
pub mod testkit;
mod types;

pub use embedder::Embedder;
pub use error::{EmbedError, Source};
pub use generate::{GenerateRequest, Generation, Generator, GeneratorInfo, Part};
pub use segments::{Segment, SegmentRange, VideoSegmentConfig};
pub use types::{
    EmbedRequest, EmbedderInfo, Embeddings, Media, MediaSource, Modality, SegmentEmbedding,
    SpaceId, VideoInput, is_generic_type,
};

/// Re-exported so implementors need not depend on `async-trait` themselves.
pub use async_trait::async_trait;

/// Scales `v` to unit L2 norm in place (cosine similarity is then a dot
/// product). A zero vector is left as it is.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Cosine similarity of two vectors of the same length (0 if either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_and_cosine() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-7);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-6);
        let mut z = vec![0.0; 3];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
        assert_eq!(cosine(&z, &[1.0, 2.0, 3.0]), 0.0);
    }
}
