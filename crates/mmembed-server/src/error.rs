//! Google-shaped errors: one `google.rpc.Status` code per failure, written
//! as `{"error": {"code", "message", "status", "details"}}` over REST (which
//! `google.api_core.exceptions` turns into `BadRequest`,
//! `ResourceExhausted`, …) and as the matching gRPC status over gRPC.

use std::time::Duration;

use mmembed_core::EmbedError;
use serde_json::json;

/// The `google.rpc.Code`s this server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// 400: the request is wrong (JSON, field, dimension, media).
    InvalidArgument,
    /// 401: no or wrong API key.
    Unauthenticated,
    /// 404: no such route or model.
    NotFound,
    /// 405 over REST (a known route, another method); `UNIMPLEMENTED` over gRPC.
    MethodNotAllowed,
    /// 429: the queue is full; retry after the `Retry-After` seconds.
    ResourceExhausted,
    /// 500: a backend failure that will not go away by retrying.
    Internal,
    /// 503: the model is still loading, or a retryable backend failure.
    Unavailable,
    /// 504: the request's deadline passed.
    DeadlineExceeded,
}

impl Code {
    /// HTTP status of this code.
    pub fn http(self) -> u16 {
        match self {
            Self::InvalidArgument => 400,
            Self::Unauthenticated => 401,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::ResourceExhausted => 429,
            Self::Internal => 500,
            Self::Unavailable => 503,
            Self::DeadlineExceeded => 504,
        }
    }

    /// The `google.rpc.Code` name.
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "UNIMPLEMENTED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
        }
    }

    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::NotFound => tonic::Code::NotFound,
            Self::MethodNotAllowed => tonic::Code::Unimplemented,
            Self::ResourceExhausted => tonic::Code::ResourceExhausted,
            Self::Internal => tonic::Code::Internal,
            Self::Unavailable => tonic::Code::Unavailable,
            Self::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        }
    }

    /// From a `google.rpc.Code` name a remote backend answered with, else
    /// from its HTTP status.
    fn from_remote(status: Option<&str>, http: Option<u16>) -> Self {
        match (status, http) {
            (Some("INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE"), _) => {
                Self::InvalidArgument
            }
            (Some("RESOURCE_EXHAUSTED"), _) | (_, Some(429)) => Self::ResourceExhausted,
            (Some("DEADLINE_EXCEEDED"), _) | (_, Some(504)) => Self::DeadlineExceeded,
            (Some("UNAVAILABLE"), _) | (_, Some(502 | 503)) => Self::Unavailable,
            (_, Some(400)) => Self::InvalidArgument,
            _ => Self::Internal,
        }
    }
}

/// A failed call: a code, a message for the caller and, for 429, when to
/// try again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} {}: {message}", code.http(), code.name())]
pub struct ApiError {
    /// What kind of failure.
    pub code: Code,
    /// What went wrong, for the caller (never a secret, never a body).
    pub message: String,
    /// Seconds to wait before retrying (`Retry-After`), for 429.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with a code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Shorthand for a 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// The REST body: `{"error": {"code", "message", "status", "details"}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "code": self.code.http(),
            "message": self.message,
            "status": self.code.name(),
            "details": [],
        }})
    }

    /// The gRPC status.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code.grpc(), self.message.clone())
    }

    /// The error of instance `i` of a request, its message prefixed with
    /// which instance failed (a predict call fails as a whole, as Vertex's does).
    pub fn for_instance(e: &EmbedError, i: usize, n: usize) -> Self {
        Self::from(e).at_instance(i, n)
    }

    /// Prefixes the message with `instances[i]: ` when the call had more
    /// than one instance (with one, there is nothing to tell apart).
    pub fn at_instance(mut self, i: usize, n: usize) -> Self {
        if n > 1 {
            self.message = format!("instances[{i}]: {}", self.message);
        }
        self
    }
}

impl From<&EmbedError> for ApiError {
    fn from(e: &EmbedError) -> Self {
        let code = match e {
            EmbedError::InvalidInput { .. }
            | EmbedError::UnsupportedModality { .. }
            | EmbedError::UnsupportedDimension { .. }
            | EmbedError::MediaDecode { .. } => Code::InvalidArgument,
            EmbedError::Overloaded { retry_after, .. } => {
                return Self {
                    code: Code::ResourceExhausted,
                    message: e.to_string(),
                    retry_after: Some(*retry_after),
                };
            }
            EmbedError::Timeout { .. } => Code::DeadlineExceeded,
            EmbedError::ModelLoad { .. } => Code::Unavailable,
            EmbedError::Backend { retryable, .. } => {
                if *retryable {
                    Code::Unavailable
                } else {
                    Code::Internal
                }
            }
            EmbedError::Remote {
                http_status,
                status,
                ..
            } => Code::from_remote(status.as_deref(), *http_status),
            _ => Code::Internal,
        };
        Self::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embed_errors_map_to_google_codes() {
        let dim = EmbedError::UnsupportedDimension {
            requested: 1408,
            supported: vec![512],
        };
        let e = ApiError::for_instance(&dim, 2, 3);
        assert_eq!(e.code, Code::InvalidArgument);
        assert_eq!(
            e.body(),
            json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "details": [],
                "message": "instances[2]: unsupported dimension 1408: this model produces [512]"}})
        );
        let over = EmbedError::Overloaded {
            queued: 9,
            limit: 8,
            retry_after: Duration::from_secs(1),
        };
        let e = ApiError::from(&over);
        assert_eq!((e.code.http(), e.code.name()), (429, "RESOURCE_EXHAUSTED"));
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        assert_eq!(e.to_status().code(), tonic::Code::ResourceExhausted);
        let remote = EmbedError::Remote {
            http_status: Some(503),
            status: None,
            message: "down".into(),
            retryable: true,
        };
        assert_eq!(ApiError::from(&remote).code, Code::Unavailable);
        let stopped = EmbedError::Backend {
            backend: "local".into(),
            message: "worker stopped".into(),
            retryable: false,
        };
        assert_eq!(ApiError::from(&stopped).code.http(), 500);
    }
}
