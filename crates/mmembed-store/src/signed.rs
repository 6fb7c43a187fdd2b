//! `http(s)://` URLs, read with plain GETs: plain ones, signed URLs (S3
//! presigned, GCS V4 signed, Azure SAS) and URLs whose server wants its
//! parameters (`?width=800`).
//!
//! Hand-rolled rather than through `object_store`'s HTTP client, which
//! addresses objects by path (a query would be dropped, so a signed URL's
//! read refused, and an escaped path was escaped again) and asks for
//! metadata with HEAD, which a URL signed for GET refuses. Here a read is
//! one GET whose headers are the metadata; a metadata request alone is a
//! HEAD, or when that is refused (403, 405) a GET of the first byte
//! (`Range: bytes=0-0`). A body that breaks off resumes with `Range` and
//! `If-Range`, so a changed object starts over rather than mixing two
//! versions. Retried on 408/429/5xx, timeouts and connection faults, as
//! every store is, but a host that cannot be reached only three times.
//!
//! The query is a credential for signed URLs: messages show the URL
//! without it ([`redact`](crate::redact)).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use http::HeaderMap;
use http::header::{
    CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE,
};
use mmembed_transport::without_url;
use reqwest::StatusCode;
use tokio::sync::Mutex;

use crate::{
    Attempt, Bucket, Capped, ObjectInfo, PutMode, Sink, StoreError, StoreOptions, check_size,
    redact, retrying,
};

/// Attempts at a connection to a URL's host before its read fails.
const CONNECT_TRIES: usize = 3;

pub(crate) struct UrlBucket {
    /// `scheme://host[:port]`.
    origin: String,
    http: reqwest::Client,
    max_retries: usize,
    initial_backoff: Duration,
}

impl std::fmt::Debug for UrlBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlBucket")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl UrlBucket {
    pub(crate) fn new(origin: &str, o: &StoreOptions) -> Result<Self, StoreError> {
        let http = reqwest::Client::builder()
            .timeout(o.timeout)
            .connect_timeout(o.connect_timeout)
            .build()
            .map_err(|e| StoreError::BadUri {
                uri: origin.to_string(),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Self {
            origin: origin.to_string(),
            http,
            max_retries: o.max_retries,
            initial_backoff: o.initial_backoff,
        })
    }

    /// The whole URL (`key` is its path and query).
    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.origin)
    }

    /// The URL as messages show it: without its query.
    fn shown(&self, key: &str) -> String {
        redact(&self.url(key))
    }

    async fn retrying<T, F, Fut>(&self, attempt: F) -> Result<T, StoreError>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Attempt<T>>,
    {
        retrying(self.max_retries, self.initial_backoff, "a URL", attempt).await
    }

    fn transport(&self, key: &str, e: &reqwest::Error) -> StoreError {
        StoreError::Transport {
            uri: self.shown(key),
            // reqwest's Display names the URL, query and all.
            message: format!("request failed: {}", without_url(e)),
            retryable: true,
        }
    }

    /// A request that got no answer, on attempt `n`: retried, except a
    /// connection that cannot be made (no such host, refused) after
    /// [`CONNECT_TRIES`]: in a list of web URLs dead hosts are common,
    /// and each would otherwise hold a fetch slot through every retry.
    fn fault<T>(&self, key: &str, e: &reqwest::Error, n: usize) -> Attempt<T> {
        let err = self.transport(key, e);
        match err {
            // Not worth another try by a caller either (a fallback, a
            // rerun of the request): the host is not there.
            StoreError::Transport { uri, message, .. }
                if e.is_connect() && n + 1 >= CONNECT_TRIES =>
            {
                Attempt::Fail(StoreError::Transport {
                    uri,
                    message,
                    retryable: false,
                })
            }
            err => Attempt::Retry(err),
        }
    }

    /// A non-success answer, classified; its body is not shown (a signed
    /// URL's error page may quote the signature).
    fn status_error<T>(&self, key: &str, status: StatusCode) -> Attempt<T> {
        let uri = self.shown(key);
        match status {
            StatusCode::NOT_FOUND | StatusCode::GONE => Attempt::Fail(StoreError::NotFound { uri }),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Attempt::Fail(StoreError::Denied {
                uri,
                message: format!(
                    "HTTP {status} (a signed URL that expired or was signed for another request?)"
                ),
            }),
            _ => crate::other_status(uri, status, format!("HTTP {status}")),
        }
    }

    /// One metadata request: HEAD, or a GET of the first byte.
    async fn probe(&self, key: &str, ranged: bool, n: usize) -> Attempt<ObjectInfo> {
        let url = self.url(key);
        let req = if ranged {
            self.http.get(&url).header(RANGE, "bytes=0-0")
        } else {
            self.http.head(&url)
        };
        let resp = match self.send(key, req, n).await.done() {
            Ok(r) => r,
            Err(other) => return other,
        };
        match self.info(key, &resp) {
            Some(info) => Attempt::Done(info),
            None => Attempt::Fail(self.no_size(key)),
        }
        // The ranged GET's one byte is dropped with the response.
    }

    /// Attempt `n` of `req`: its answer if a success, else the fault or
    /// the status's error.
    async fn send(
        &self,
        key: &str,
        req: reqwest::RequestBuilder,
        n: usize,
    ) -> Attempt<reqwest::Response> {
        match req.send().await {
            Ok(r) if r.status().is_success() => Attempt::Done(r),
            Ok(r) => self.status_error(key, r.status()),
            Err(e) => self.fault(key, &e, n),
        }
    }

    /// The object's metadata from an answer's headers; `None` when they do
    /// not say its size.
    fn info(&self, key: &str, resp: &reqwest::Response) -> Option<ObjectInfo> {
        let h = resp.headers();
        // A 206's length is the range's; the object's is after the slash.
        let size = match resp.status() {
            StatusCode::PARTIAL_CONTENT => header(h, CONTENT_RANGE)
                .and_then(|r| r.rsplit_once('/'))
                .and_then(|(_, total)| total.parse().ok()),
            _ => header(h, CONTENT_LENGTH).and_then(|n| n.parse().ok()),
        }?;
        Some(self.meta(key, h, size))
    }

    /// The metadata in `h`, of an object of `size` bytes.
    fn meta(&self, key: &str, h: &HeaderMap, size: u64) -> ObjectInfo {
        ObjectInfo {
            uri: self.url(key),
            size,
            updated: header(h, LAST_MODIFIED)
                .and_then(|t| DateTime::parse_from_rfc2822(t).ok())
                .map(|t| t.with_timezone(&Utc)),
            etag: header(h, ETAG).map(String::from),
            generation: None,
            content_type: header(h, CONTENT_TYPE).map(String::from),
        }
    }

    fn no_size(&self, key: &str) -> StoreError {
        StoreError::Transport {
            uri: self.shown(key),
            message: "the server did not say the object's size (no Content-Length)".into(),
            retryable: false,
        }
    }

    fn read_only(&self, key: &str, operation: &str) -> StoreError {
        StoreError::Unsupported {
            uri: self.shown(key),
            operation: format!("{operation} (a URL is read-only)"),
        }
    }
}

fn header(h: &HeaderMap, name: http::HeaderName) -> Option<&str> {
    h.get(name)?.to_str().ok()
}

#[async_trait]
impl Bucket for UrlBucket {
    async fn head(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let head = self.retrying(|n| self.probe(key, false, n)).await;
        match head {
            // A URL signed for GET refuses HEAD (S3 and GCS answer 403,
            // some servers 405): ask for its first byte instead.
            Err(StoreError::Denied { .. })
            | Err(StoreError::Transport {
                retryable: false, ..
            }) => self.retrying(|n| self.probe(key, true, n)).await,
            other => other,
        }
    }

    async fn get(
        &self,
        info: &ObjectInfo,
        key: &str,
        sink: &mut dyn Sink,
    ) -> Result<(), StoreError> {
        let url = &self.url(key);
        let buf = &Mutex::new(sink);
        self.retrying(|n| async move {
            let mut buf = buf.lock().await;
            let resume_at = buf.len();
            let mut req = self.http.get(url);
            if resume_at > 0 {
                // The rest, if the object is still the one begun; else the
                // server sends it whole (200) and the start is dropped.
                req = req.header(RANGE, format!("bytes={resume_at}-"));
                if let Some(etag) = &info.etag {
                    req = req.header(IF_RANGE, etag);
                }
            }
            let resp = match self.send(key, req, n).await.done() {
                Ok(r) => r,
                Err(other) => return other,
            };
            let fault = |e: &reqwest::Error| self.transport(key, e);
            let shown = self.shown(key);
            crate::take_body(&mut **buf, resp, resume_at > 0, info.size, &shown, &fault).await
        })
        .await
    }

    async fn read(&self, key: &str, max_bytes: u64) -> Result<(Bytes, ObjectInfo), StoreError> {
        // One GET, its headers the metadata (a HEAD first would double the
        // requests of a list of URLs, and a URL signed for GET refuses
        // it); a body that breaks off is resumed by `get`.
        let url = &self.url(key);
        let resp = self
            .retrying(|n| self.send(key, self.http.get(url), n))
            .await?;
        let Some(info) = self.info(key, &resp) else {
            // No size (a chunked answer): the whole body, capped; a
            // broken one is an error (nothing to resume against).
            let headers = resp.headers().clone();
            let mut buf = Capped::new(url, max_bytes, 0);
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                buf.push(&chunk.map_err(|e| self.transport(key, &e))?)?;
            }
            let bytes = buf.freeze();
            let info = self.meta(key, &headers, bytes.len() as u64);
            return Ok((bytes, info));
        };
        check_size(url, info.size, max_bytes)?;
        let mut buf = Capped::new(url, max_bytes, info.size);
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => buf.push(&c)?,
                // The rest below, from where it broke off.
                Err(_) => break,
            }
        }
        if (buf.len() as u64) < info.size {
            self.get(&info, key, &mut buf).await?;
        }
        Ok((buf.freeze(), info))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        Err(StoreError::Unsupported {
            uri: self.shown(prefix),
            operation: "listing (plain HTTP has no listing; give a manifest of URLs)".into(),
        })
    }

    async fn put(&self, key: &str, _: Bytes, _: &str, _: PutMode) -> Result<(), StoreError> {
        Err(self.read_only(key, "writing"))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        Err(self.read_only(key, "deleting"))
    }

    fn piece(&self, chunk: usize) -> usize {
        chunk
    }

    async fn upload(
        &self,
        key: &str,
        _: std::fs::File,
        _: &std::path::Path,
        _: u64,
        _: usize,
        _: &str,
    ) -> Result<(), StoreError> {
        Err(self.read_only(key, "writing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_host_that_cannot_be_reached_is_tried_three_times_not_every_retry() {
        // Nothing listens on a port once its listener is dropped.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let origin = format!("http://127.0.0.1:{port}");
        let b = UrlBucket::new(&origin, &StoreOptions::default()).unwrap();
        let e = b
            .http
            .get(b.url("x.png?sig=secret"))
            .send()
            .await
            .unwrap_err();
        assert!(e.is_connect(), "{e}");
        let kinds: Vec<&str> = (0..4)
            .map(|n| match b.fault::<()>("x.png?sig=secret", &e, n) {
                Attempt::Retry(_) => "retry",
                Attempt::Fail(_) => "fail",
                Attempt::Done(()) => "done",
            })
            .collect();
        assert_eq!(kinds, ["retry", "retry", "fail", "fail"]);
        let Attempt::Fail(err) = b.fault::<()>("x.png?sig=secret", &e, 2) else {
            unreachable!()
        };
        assert!(!format!("{err} {err:?}").contains("secret"), "{err:?}");
        assert!(
            !err.is_retryable(),
            "a caller need not try it again: {err:?}"
        );
    }
}
