//! JSON over HTTP POST with pacing, retries and one token refresh.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mmembed_core::EmbedError;
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth::{Auth, scrub};
use crate::pacing::{Clock, Pacer, TokioClock};
use crate::retry::RetryPolicy;

/// Settings of a [`JsonClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Per-attempt timeout (connect, send, whole body).
    pub timeout: Duration,
    /// Retries of retryable failures.
    pub retry: RetryPolicy,
    /// Client-side pacing shared by every request of the client.
    pub requests_per_minute: u32,
    /// Requests sent at once by the client and all its clones together
    /// (an attempt holds a slot; a retry's backoff holds none). A bound per
    /// batch instead let concurrent batches (a server's callers, a row
    /// job's chunks) multiply it.
    pub max_in_flight: usize,
    /// Service name used in messages (`Vertex AI`, `Ollama`).
    pub service: String,
}

/// A successful answer: the parsed value and the body as the server sent it
/// (BigQuery's `full_response` is the server's bytes, not a re-serialisation).
#[derive(Debug, Clone)]
pub struct Reply<T> {
    /// The parsed body.
    pub value: T,
    /// The raw body.
    pub body: Bytes,
}

/// The one HTTP+JSON client of every remote backend: Google's APIs and
/// self-hosted model servers.
///
/// - credentials from an [`Auth`] (a 401 refreshes them once);
/// - requests evenly paced and at most `max_in_flight` at once (both
///   shared by all clones: one quota per program);
/// - 429, 500, 502, 503, 504, timeouts, dropped connections and — because
///   every API we call through it is idempotent per request — a 200 whose
///   body is cut off or not the expected JSON are retried with truncated
///   exponential backoff and full jitter, never sooner than `Retry-After`;
/// - errors mapped to [`EmbedError::Remote`] with the service's status name
///   and message (Google's `google.rpc.Status`, OpenAI's and Ollama's
///   `error`), any static token scrubbed from them.
///
/// Cheap to clone.
#[derive(Clone)]
pub struct JsonClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    auth: Auth,
    pacer: Pacer,
    slots: tokio::sync::Semaphore,
    clock: Arc<dyn Clock>,
    opts: ClientOptions,
}

impl std::fmt::Debug for JsonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonClient")
            .field("service", &self.inner.opts.service)
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

/// The status name and message of an error body: Google's
/// `{"error": {"status", "message"}}`, OpenAI's `{"error": {"type",
/// "message"}}`, Ollama's `{"error": "…"}`, or the start of the text.
pub fn error_message(body: &[u8]) -> (Option<String>, String) {
    let raw = || {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        if text.trim().is_empty() {
            "(empty body)".to_string()
        } else {
            text
        }
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, raw());
    };
    let e = &v["error"];
    if let Some(s) = e.as_str() {
        return (None, s.to_string());
    }
    let status = e["status"]
        .as_str()
        .or_else(|| e["type"].as_str())
        .map(String::from);
    match e["message"].as_str() {
        Some(m) => (status, m.to_string()),
        None => (status, raw()),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by these APIs).
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    h.get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

impl JsonClient {
    /// A client with real time.
    pub fn new(auth: Auth, opts: ClientOptions) -> Result<Self, EmbedError> {
        Self::with_clock(auth, opts, Arc::new(TokioClock::default()))
    }

    /// A client reading time from `clock` (tests run retries and pacing in
    /// virtual time this way).
    pub fn with_clock(
        auth: Auth,
        opts: ClientOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, EmbedError> {
        if opts.retry.max_attempts == 0 {
            return Err(EmbedError::invalid("max_attempts", "must be at least 1"));
        }
        if opts.timeout.is_zero() {
            return Err(EmbedError::invalid("timeout", "must be positive"));
        }
        if opts.max_in_flight == 0 {
            return Err(EmbedError::invalid("max_concurrency", "must be at least 1"));
        }
        let http = reqwest::Client::builder()
            .timeout(opts.timeout)
            .user_agent(concat!("mmembed/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                EmbedError::remote(
                    None,
                    None,
                    format!("cannot build the HTTP client: {e}"),
                    false,
                )
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                pacer: Pacer::new(opts.requests_per_minute),
                slots: tokio::sync::Semaphore::new(opts.max_in_flight),
                auth,
                clock,
                opts,
            }),
        })
    }

    /// The settings.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// The credentials.
    pub fn auth(&self) -> &Auth {
        &self.inner.auth
    }

    /// POSTs `body` as JSON to `url` and parses the answer as `T`, with
    /// pacing, retries and one credentials refresh after a 401.
    pub async fn post<T: DeserializeOwned>(
        &self,
        url: &str,
        body: &impl Serialize,
    ) -> Result<Reply<T>, EmbedError> {
        let i = &self.inner;
        let policy = i.opts.retry;
        let body = serde_json::to_vec(body).map_err(|e| {
            EmbedError::invalid("request", format!("cannot serialise the request: {e}"))
        })?;
        let mut retries = 0u32;
        let mut refreshed = false;
        let mut refresh = false;
        loop {
            let outcome = {
                // The semaphore is never closed; `ok()` only names that.
                let _slot = i.slots.acquire().await.ok();
                i.pacer.acquire(i.clock.as_ref()).await;
                self.attempt(url, &body, refresh).await
            };
            match outcome {
                Ok(r) => return Ok(r),
                Err(f) if f.unauthorized && !refreshed => {
                    tracing::debug!(service = %i.opts.service, "401: refreshing credentials once");
                    refreshed = true;
                    refresh = true;
                }
                Err(f) if f.error.is_retryable() && retries + 1 < policy.max_attempts => {
                    let wait = policy.delay(retries, f.retry_after);
                    tracing::debug!(service = %i.opts.service, error = %f.error, attempt = retries + 1, ?wait, "retrying");
                    i.clock.sleep(wait).await;
                    retries += 1;
                    refresh = false;
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    async fn attempt<T: DeserializeOwned>(
        &self,
        url: &str,
        body: &[u8],
        refresh: bool,
    ) -> Result<Reply<T>, Failure> {
        let i = &self.inner;
        let plain = |error: EmbedError| Failure {
            error,
            retry_after: None,
            unauthorized: false,
        };
        let timeout = || EmbedError::Timeout {
            after: i.opts.timeout,
        };
        let headers = i.auth.headers(refresh).await.map_err(plain)?;
        let sent = i
            .http
            .post(url)
            .headers(headers)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(plain(timeout())),
            Err(e) => {
                return Err(plain(EmbedError::remote(
                    None,
                    Some("UNAVAILABLE".into()),
                    format!("request to {} failed: {}", i.opts.service, without_url(&e)),
                    true,
                )));
            }
        };
        let code = resp.status();
        let retry_after = retry_after(resp.headers());
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) if e.is_timeout() => return Err(plain(timeout())),
            Err(e) => {
                return Err(plain(EmbedError::remote(
                    Some(code.as_u16()),
                    Some("UNAVAILABLE".into()),
                    format!(
                        "connection lost while reading the response: {}",
                        without_url(&e)
                    ),
                    true,
                )));
            }
        };
        if code.is_success() {
            return match serde_json::from_slice::<T>(&bytes) {
                Ok(value) => Ok(Reply { value, body: bytes }),
                // Idempotent requests: a cut-off or garbled body is a
                // transport fault like a dropped connection.
                Err(e) => Err(plain(EmbedError::remote(
                    Some(code.as_u16()),
                    Some("UNAVAILABLE".into()),
                    format!(
                        "malformed response from {} ({} bytes): {e}",
                        i.opts.service,
                        bytes.len()
                    ),
                    true,
                ))),
            };
        }
        let (status, message) = error_message(&bytes);
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
            error: EmbedError::remote(Some(code.as_u16()), status, message, retryable),
            retry_after,
            unauthorized: code == StatusCode::UNAUTHORIZED,
        })
    }
}

/// reqwest's message without the URL it appends, with its causes (the URL
/// carries no secret, but it is long and callers name the request already).
pub fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(i) = s.find(" for url (") {
        s.truncate(i);
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Runs `one` over `items`, at most `limit` at once, and returns the
/// results in the items' order. Unlike `buffered`, a slow item does not
/// hold back the start of the ones after it.
pub async fn in_order<T, R, F, Fut>(items: Vec<T>, limit: usize, one: F) -> Vec<R>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    use futures::StreamExt;
    let one = &one;
    let mut done: Vec<(usize, R)> = futures::stream::iter(items.into_iter().enumerate())
        .map(|(i, t)| async move { (i, one(t).await) })
        .buffer_unordered(limit.max(1))
        .collect()
        .await;
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_each_dialect() {
        let g =
            br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            error_message(g),
            (Some("RESOURCE_EXHAUSTED".into()), "Quota exceeded".into())
        );
        let o = br#"{"error":{"message":"model not found","type":"NotFoundError"}}"#;
        assert_eq!(
            error_message(o),
            (Some("NotFoundError".into()), "model not found".into())
        );
        assert_eq!(
            error_message(br#"{"error":"model 'x' not found"}"#),
            (None, "model 'x' not found".into())
        );
        assert_eq!(
            error_message(b"<html>bad gateway</html>").1,
            "<html>bad gateway</html>"
        );
        assert_eq!(error_message(b"").1, "(empty body)");
    }
}
