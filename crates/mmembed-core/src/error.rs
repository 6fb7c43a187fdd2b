//! The one error type every backend returns.

use std::sync::Arc;
use std::time::Duration;

use crate::Modality;

/// A boxed, shareable error cause. `Arc` rather than `Box` so an error that
/// hit a whole model batch can be handed to every request in it.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why one embedding request failed.
///
/// Each variant carries what a caller needs to act: the field that was wrong,
/// the sizes a model can produce, whether trying again may help.
/// `#[non_exhaustive]`: new backends may add failure kinds.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EmbedError {
    /// The request itself is wrong; `field` names the offending part
    /// (`text`, `image`, `video.segment_config.interval_sec`, ...).
    #[error("invalid input `{field}`: {reason}")]
    InvalidInput {
        /// Which part of the request is wrong.
        field: String,
        /// What is wrong with it and, where possible, what would be accepted.
        reason: String,
    },

    /// The backend cannot embed this kind of input at all.
    #[error("backend `{backend}` does not support {modality} input")]
    UnsupportedModality {
        /// The modality that was asked for.
        modality: Modality,
        /// The backend that refused it.
        backend: String,
    },

    /// The backend cannot produce a vector of the requested size.
    #[error("unsupported dimension {requested}: this model produces {supported:?}")]
    UnsupportedDimension {
        /// What was asked for.
        requested: u32,
        /// What the model can produce.
        supported: Vec<u32>,
    },

    /// Media bytes could not be read or decoded (corrupt, truncated, an
    /// unsupported format, over a size limit).
    #[error("cannot decode {what}: {reason}")]
    MediaDecode {
        /// What was being decoded: a path, a URI or "image bytes".
        what: String,
        /// Why it failed.
        reason: String,
        /// The underlying decoder error, if any.
        #[source]
        source: Option<Source>,
    },

    /// The model could not be found, downloaded or loaded.
    #[error("cannot load model `{model}`: {reason}")]
    ModelLoad {
        /// Model id or directory.
        model: String,
        /// What went wrong and what to do about it.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Source>,
    },

    /// The backend failed while running (a device error, a worker that
    /// stopped). `retryable` says whether the same request may succeed later.
    #[error("backend `{backend}` failed: {message}")]
    Backend {
        /// The failing backend.
        backend: String,
        /// What happened.
        message: String,
        /// Whether trying again (here or on another backend) may help.
        retryable: bool,
    },

    /// A remote service answered with an error.
    #[error("remote error{}{}: {message}", http_status.map(|s| format!(" HTTP {s}")).unwrap_or_default(), status.as_ref().map(|s| format!(" {s}")).unwrap_or_default())]
    Remote {
        /// The HTTP status code, when there was a response.
        http_status: Option<u16>,
        /// The service's status name (e.g. `RESOURCE_EXHAUSTED`).
        status: Option<String>,
        /// The service's message.
        message: String,
        /// Whether the service said (or the code implies) a retry may help.
        retryable: bool,
    },

    /// Too much work is queued: the request was refused before any work
    /// (a bounded queue gives backpressure instead of unbounded memory).
    /// Retry later, or elsewhere.
    #[error(
        "overloaded: {queued} items already queued (limit {limit}); retry in {}s",
        retry_after.as_secs().max(1)
    )]
    Overloaded {
        /// Items waiting when the request arrived.
        queued: usize,
        /// The queue's limit.
        limit: usize,
        /// A hint for when to try again.
        retry_after: Duration,
    },

    /// The request did not finish in time.
    #[error("timed out after {after:?}")]
    Timeout {
        /// How long we waited.
        after: Duration,
    },
}

impl EmbedError {
    /// Shorthand for [`EmbedError::Remote`].
    pub fn remote(
        http_status: Option<u16>,
        status: Option<String>,
        message: impl Into<String>,
        retryable: bool,
    ) -> Self {
        Self::Remote {
            http_status,
            status,
            message: message.into(),
            retryable,
        }
    }

    /// Shorthand for [`EmbedError::InvalidInput`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`EmbedError::MediaDecode`] with an underlying cause.
    pub fn media(
        what: impl Into<String>,
        reason: impl Into<String>,
        source: Option<Source>,
    ) -> Self {
        Self::MediaDecode {
            what: what.into(),
            reason: reason.into(),
            source,
        }
    }

    /// Whether the same request may succeed if tried again, here or on another
    /// backend: timeouts, and backend/remote errors flagged retryable.
    /// Invalid input, unsupported requests and undecodable media never are.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { retryable, .. } | Self::Remote { retryable, .. } => *retryable,
            Self::Timeout { .. } | Self::Overloaded { .. } => true,
            _ => false,
        }
    }

    /// Whether the backend cannot serve this request by design (a modality or
    /// dimension it lacks), so another backend might.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Self::UnsupportedModality { .. } | Self::UnsupportedDimension { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_field_and_the_options() {
        let e = EmbedError::invalid("text", "is empty");
        assert_eq!(e.to_string(), "invalid input `text`: is empty");
        let e = EmbedError::UnsupportedDimension {
            requested: 1408,
            supported: vec![512],
        };
        assert_eq!(
            e.to_string(),
            "unsupported dimension 1408: this model produces [512]"
        );
        let e = EmbedError::Remote {
            http_status: Some(429),
            status: Some("RESOURCE_EXHAUSTED".into()),
            message: "Quota exceeded".into(),
            retryable: true,
        };
        assert_eq!(
            e.to_string(),
            "remote error HTTP 429 RESOURCE_EXHAUSTED: Quota exceeded"
        );
    }

    #[test]
    fn retryable_classification() {
        assert!(
            EmbedError::Timeout {
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
        assert!(!EmbedError::invalid("text", "empty").is_retryable());
        let unsupported = EmbedError::UnsupportedModality {
            modality: Modality::Video,
            backend: "local".into(),
        };
        assert!(!unsupported.is_retryable());
        assert!(unsupported.is_unsupported());
        assert!(
            EmbedError::Backend {
                backend: "x".into(),
                message: "worker stopped".into(),
                retryable: true
            }
            .is_retryable()
        );
    }
}
