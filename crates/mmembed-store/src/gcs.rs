//! Google Cloud Storage through its JSON API.
//!
//! Hand-rolled rather than `object_store`'s GCS client because that client
//! speaks the XML API: its listings carry no `generation` (the identity
//! BigQuery's object tables use), and the GCS emulators on PyPI implement
//! only the JSON API. The surface needed is six requests (metadata,
//! download, list, media upload, resumable upload, delete), each retried
//! here on 408/429/5xx, timeouts and connection faults; a download that
//! breaks off mid-body resumes with a `Range` request pinned to the same
//! generation, and a resumable upload after a fault asks the session how
//! many bytes it holds and goes on from there.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::HeaderMap;
use mmembed_transport::{Auth, CredentialsSource, STORAGE_READ_WRITE, without_url};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::{
    Attempt, Bucket, ObjectInfo, PutMode, Sink, StoreError, StoreOptions, backoff, retrying,
};

const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";
/// Characters left as they are in an object name inside a URL path.
const NAME: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

pub(crate) struct GcsBucket {
    bucket: String,
    endpoint: String,
    /// `None` against an emulator (`STORAGE_EMULATOR_HOST`).
    auth: Option<Auth>,
    http: reqwest::Client,
    max_retries: usize,
    initial_backoff: Duration,
}

impl std::fmt::Debug for GcsBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsBucket")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("authenticated", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Resource {
    name: String,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    generation: Option<String>,
    #[serde(default)]
    updated: Option<String>,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listing {
    #[serde(default)]
    items: Vec<Resource>,
    #[serde(default)]
    next_page_token: Option<String>,
}

impl GcsBucket {
    pub(crate) fn new(bucket: &str, o: &StoreOptions) -> Result<Self, StoreError> {
        let http = reqwest::Client::builder()
            .timeout(o.timeout)
            .connect_timeout(o.connect_timeout)
            .build()
            .map_err(|e| StoreError::BadUri {
                uri: format!("gs://{bucket}/"),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Self {
            bucket: bucket.to_string(),
            endpoint: o
                .gcs_endpoint
                .clone()
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            auth: o.gcs_endpoint.is_none().then(|| {
                Auth::new(
                    CredentialsSource::ApplicationDefault,
                    STORAGE_READ_WRITE,
                    None,
                )
            }),
            http,
            max_retries: o.max_retries,
            initial_backoff: o.initial_backoff,
        })
    }

    fn uri(&self, key: &str) -> String {
        format!("gs://{}/{key}", self.bucket)
    }

    fn object_url(&self, api: &str, key: &str) -> String {
        format!(
            "{}/{api}storage/v1/b/{}/o/{}",
            self.endpoint,
            utf8_percent_encode(&self.bucket, NAME),
            utf8_percent_encode(key, NAME)
        )
    }

    async fn headers(&self, key: &str) -> Result<HeaderMap, StoreError> {
        let Some(auth) = &self.auth else {
            return Ok(HeaderMap::new());
        };
        auth.headers(false).await.map_err(|e| {
            if e.is_retryable() {
                StoreError::Transport {
                    uri: self.uri(key),
                    message: e.to_string(),
                    retryable: true,
                }
            } else {
                StoreError::Denied {
                    uri: self.uri(key),
                    message: e.to_string(),
                }
            }
        })
    }

    /// Runs `attempt` until it is done, fails for good, or the retries are
    /// spent.
    async fn retrying<T, F, Fut>(&self, attempt: F) -> Result<T, StoreError>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = Attempt<T>>,
    {
        retrying(
            self.max_retries,
            self.initial_backoff,
            "a GCS request",
            attempt,
        )
        .await
    }

    fn transport(&self, key: &str, e: &reqwest::Error) -> StoreError {
        // reqwest's Display names the URL, which carries no credentials (the
        // token travels in a header).
        StoreError::Transport {
            uri: self.uri(key),
            message: format!("request failed: {}", without_url(e)),
            retryable: true,
        }
    }

    /// Classifies a non-success response.
    async fn status_error<T>(&self, key: &str, resp: reqwest::Response) -> Attempt<T> {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(String::from))
            .unwrap_or_else(|| body.chars().take(200).collect());
        let uri = self.uri(key);
        match status {
            StatusCode::NOT_FOUND => Attempt::Fail(StoreError::NotFound { uri }),
            StatusCode::PRECONDITION_FAILED => Attempt::Fail(StoreError::AlreadyExists { uri }),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Attempt::Fail(StoreError::Denied { uri, message })
            }
            _ => crate::other_status(uri, status, format!("HTTP {status}: {message}")),
        }
    }

    fn info(&self, r: Resource) -> Result<ObjectInfo, StoreError> {
        let size = r
            .size
            .as_deref()
            .unwrap_or("0")
            .parse()
            .map_err(|_| StoreError::Transport {
                uri: self.uri(&r.name),
                message: format!("GCS reported a size that is not a number: {:?}", r.size),
                retryable: false,
            })?;
        let updated = r
            .updated
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        Ok(ObjectInfo {
            uri: self.uri(&r.name),
            size,
            updated,
            etag: r.etag,
            generation: r.generation,
            content_type: r.content_type,
        })
    }
}

impl GcsBucket {
    /// One attempt of a request: credentials, send, the status classified
    /// (a success is `Done` with the response, to read).
    async fn send(
        &self,
        key: &str,
        request: impl FnOnce(HeaderMap) -> reqwest::RequestBuilder,
    ) -> Attempt<reqwest::Response> {
        let h = match self.headers(key).await {
            Ok(h) => h,
            Err(e) if e.is_retryable() => return Attempt::Retry(e),
            Err(e) => return Attempt::Fail(e),
        };
        match request(h).send().await {
            Ok(resp) if resp.status().is_success() => Attempt::Done(resp),
            Ok(resp) => self.status_error(key, resp).await,
            Err(e) => Attempt::Retry(self.transport(key, &e)),
        }
    }

    /// [`send`](Self::send) and parse a JSON answer (a body cut off is
    /// retried like any transport fault).
    async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        request: impl FnOnce(HeaderMap) -> reqwest::RequestBuilder,
    ) -> Attempt<T> {
        match self.send(key, request).await {
            Attempt::Done(resp) => match resp.json().await {
                Ok(v) => Attempt::Done(v),
                Err(e) => Attempt::Retry(self.transport(key, &e)),
            },
            Attempt::Retry(e) => Attempt::Retry(e),
            Attempt::Fail(e) => Attempt::Fail(e),
        }
    }
}

/// What a resumable upload's session answered.
enum Resumable {
    /// The object is complete.
    Done,
    /// GCS holds this many bytes, and wants the rest.
    Has(u64),
}

/// Why a request to a resumable session did not get an answer.
enum Fault {
    /// Worth asking again (a transport fault, 408/429/5xx).
    Retry(StoreError),
    /// Not (an expired session, access refused).
    Fail(StoreError),
}

/// GCS's unit for a resumable upload's pieces.
const RESUMABLE_UNIT: usize = 256 << 10;

impl GcsBucket {
    /// Starts a resumable upload of `size` bytes; its session URL.
    async fn start_resumable(
        &self,
        key: &str,
        content_type: &str,
        size: u64,
    ) -> Result<String, StoreError> {
        let url = format!(
            "{}/upload/storage/v1/b/{}/o",
            self.endpoint,
            utf8_percent_encode(&self.bucket, NAME)
        );
        let q = [("uploadType", "resumable"), ("name", key)];
        self.retrying(|_| async {
            let resp = match self
                .send(key, |h| {
                    self.http
                        .post(&url)
                        .headers(h)
                        .query(&q)
                        .header("X-Upload-Content-Type", content_type)
                        .header("X-Upload-Content-Length", size)
                        .header(http::header::CONTENT_LENGTH, 0)
                })
                .await
            {
                Attempt::Done(r) => r,
                Attempt::Retry(e) => return Attempt::Retry(e),
                Attempt::Fail(e) => return Attempt::Fail(e),
            };
            match resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
            {
                Some(l) => Attempt::Done(l.to_string()),
                None => Attempt::Fail(StoreError::Transport {
                    uri: self.uri(key),
                    message: "GCS started an upload without naming its session".into(),
                    retryable: false,
                }),
            }
        })
        .await
    }

    /// Asks a resumable session of `size` bytes what it holds; `None` when
    /// no answer came (a fault worth asking again).
    async fn resumable_held(
        &self,
        key: &str,
        session: &str,
        size: u64,
    ) -> Result<Option<Resumable>, StoreError> {
        let question = format!("bytes */{size}");
        match self
            .resumable_put(key, session, &question, Bytes::new())
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(Fault::Fail(e)) => Err(e),
            Err(Fault::Retry(_)) => Ok(None),
        }
    }

    /// One request to a resumable session (a piece, or with an empty body
    /// and `bytes */SIZE`, a question): 200/201 when the object is
    /// complete, 308 with the bytes held. `Err(Retry)` for faults worth
    /// trying again, `Err(Fail)` for the rest (an expired session: 404/410).
    async fn resumable_put(
        &self,
        key: &str,
        session: &str,
        range: &str,
        body: Bytes,
    ) -> Result<Resumable, Fault> {
        let h = match self.headers(key).await {
            Ok(h) => h,
            Err(e) if e.is_retryable() => return Err(Fault::Retry(e)),
            Err(e) => return Err(Fault::Fail(e)),
        };
        let resp = match self
            .http
            .put(session)
            .headers(h)
            .header(http::header::CONTENT_RANGE, range)
            .body(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Err(Fault::Retry(self.transport(key, &e))),
        };
        match resp.status().as_u16() {
            200 | 201 => Ok(Resumable::Done),
            // `Range: bytes=0-N` once GCS holds N + 1 bytes; none before.
            308 => Ok(Resumable::Has(
                resp.headers()
                    .get(http::header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit('-').next())
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .map_or(0, |last| last + 1),
            )),
            _ => match self.status_error::<()>(key, resp).await {
                Attempt::Retry(e) => Err(Fault::Retry(e)),
                Attempt::Fail(e) => Err(Fault::Fail(e)),
                // status_error classifies failures only.
                Attempt::Done(()) => Err(Fault::Fail(StoreError::Transport {
                    uri: self.uri(key),
                    message: "GCS answered an upload with an unexpected status".into(),
                    retryable: false,
                })),
            },
        }
    }
}

#[async_trait]
impl Bucket for GcsBucket {
    async fn head(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let url = self.object_url("", key);
        let r: Resource = self
            .retrying(|_| self.send_json(key, |h| self.http.get(&url).headers(h)))
            .await?;
        self.info(r)
    }

    async fn get(
        &self,
        info: &ObjectInfo,
        key: &str,
        sink: &mut dyn Sink,
    ) -> Result<(), StoreError> {
        let mut url = format!("{}?alt=media", self.object_url("download/", key));
        if let Some(g) = &info.generation {
            url.push_str(&format!("&generation={g}"));
        }
        let buf = Mutex::new(sink);
        self.retrying(|_| async {
            let mut buf = buf.lock().await;
            let resume_at = buf.len();
            let resp = match self
                .send(key, |h| {
                    let req = self.http.get(&url).headers(h);
                    // Resume where a broken-off body stopped.
                    if resume_at > 0 {
                        req.header(http::header::RANGE, format!("bytes={resume_at}-"))
                    } else {
                        req
                    }
                })
                .await
            {
                Attempt::Done(r) => r,
                Attempt::Retry(e) => return Attempt::Retry(e),
                Attempt::Fail(e) => return Attempt::Fail(e),
            };
            let fault = |e: &reqwest::Error| self.transport(key, e);
            crate::take_body(
                &mut **buf,
                resp,
                resume_at > 0,
                info.size,
                &info.uri,
                &fault,
            )
            .await
        })
        .await?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let url = format!(
            "{}/storage/v1/b/{}/o",
            self.endpoint,
            utf8_percent_encode(&self.bucket, NAME)
        );
        let mut out = vec![];
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![
                ("prefix", prefix.to_string()),
                ("maxResults", "1000".into()),
            ];
            if let Some(t) = &token {
                q.push(("pageToken", t.clone()));
            }
            let page: Listing = self
                .retrying(|_| self.send_json(prefix, |h| self.http.get(&url).headers(h).query(&q)))
                .await?;
            for r in page.items {
                out.push(self.info(r)?);
            }
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn put(
        &self,
        key: &str,
        data: Bytes,
        content_type: &str,
        mode: PutMode,
    ) -> Result<(), StoreError> {
        let url = format!(
            "{}/upload/storage/v1/b/{}/o",
            self.endpoint,
            utf8_percent_encode(&self.bucket, NAME)
        );
        let mut q = vec![("uploadType", "media"), ("name", key)];
        if mode == PutMode::Create {
            // Atomic create-if-absent on GCS. A 412 is AlreadyExists, also
            // for a create retried after a lost answer that had in fact
            // succeeded; callers that care (the output lock) read it back.
            q.push(("ifGenerationMatch", "0"));
        }
        self.retrying(|_| async {
            self.send(key, |h| {
                self.http
                    .post(&url)
                    .headers(h)
                    .query(&q)
                    .header(http::header::CONTENT_TYPE, content_type)
                    .body(data.clone())
            })
            .await
            .map(|_| ())
        })
        .await
    }

    fn piece(&self, chunk: usize) -> usize {
        // GCS takes a resumable upload's pieces in multiples of 256 KiB.
        (chunk / RESUMABLE_UNIT).max(1) * RESUMABLE_UNIT
    }

    async fn upload(
        &self,
        key: &str,
        mut file: std::fs::File,
        path: &std::path::Path,
        size: u64,
        chunk: usize,
        content_type: &str,
    ) -> Result<(), StoreError> {
        let uri = self.uri(key);
        let local = |doing: &str, e: std::io::Error| crate::local_error(&uri, path, doing, &e);
        let session = self.start_resumable(key, content_type, size).await?;
        // The bytes GCS holds; each piece is read from the file there, so a
        // piece it kept only part of is sent again from where it stopped.
        let mut offset: u64 = 0;
        let mut buf = vec![0u8; chunk];
        let mut failures = 0;
        loop {
            use std::io::Seek;
            if offset >= size {
                // GCS says it holds every byte but has not said the object
                // is complete: ask it (the answer completes it), a bounded
                // number of times, so a session that claims more than was
                // sent ends with an error rather than a bad range.
                if failures >= self.max_retries {
                    return Err(StoreError::Transport {
                        uri,
                        message: format!(
                            "GCS holds {offset} of {size} bytes but did not complete the object"
                        ),
                        retryable: true,
                    });
                }
                failures += 1;
                match self.resumable_held(key, &session, size).await? {
                    Some(Resumable::Done) => return Ok(()),
                    Some(Resumable::Has(held)) => offset = held,
                    None => {}
                }
                continue;
            }
            file.seek(std::io::SeekFrom::Start(offset))
                .map_err(|e| local("reading", e))?;
            let want = chunk.min((size - offset) as usize);
            let n = crate::objstore::read_full(&mut file, &mut buf[..want])
                .map_err(|e| local("reading", e))?;
            if n < want {
                return Err(local(
                    "reading",
                    std::io::Error::other("the file shrank during the upload"),
                ));
            }
            let range = format!("bytes {offset}-{}/{size}", offset + n as u64 - 1);
            let body = Bytes::copy_from_slice(&buf[..n]);
            let sent = self.resumable_put(key, &session, &range, body).await;
            match sent {
                Ok(Resumable::Done) => return Ok(()),
                Ok(Resumable::Has(held)) if held > offset => {
                    offset = held;
                    failures = 0;
                    continue;
                }
                // A piece taken without progress: counted as a fault, so a
                // session that never moves ends.
                Ok(Resumable::Has(held)) => {
                    offset = held;
                    if failures >= self.max_retries {
                        return Err(StoreError::Transport {
                            uri,
                            message: format!("GCS kept {held} of {size} bytes and took no more"),
                            retryable: true,
                        });
                    }
                    failures += 1;
                    continue;
                }
                Err(Fault::Fail(e)) => return Err(e),
                Err(Fault::Retry(e)) => {
                    if failures >= self.max_retries {
                        return Err(e);
                    }
                    let wait = backoff(self.initial_backoff, failures);
                    tracing::debug!(error = %e, attempt = failures + 1, ?wait, "resuming a GCS upload");
                    tokio::time::sleep(wait).await;
                    failures += 1;
                }
            }
            // After a fault: ask how much GCS holds, and go on from there
            // (no answer: the same piece again; GCS ignores bytes it has).
            match self.resumable_held(key, &session, size).await? {
                Some(Resumable::Done) => return Ok(()),
                Some(Resumable::Has(held)) => offset = held,
                None => {}
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let url = self.object_url("", key);
        let r = self
            .retrying(|_| async {
                self.send(key, |h| self.http.delete(&url).headers(h))
                    .await
                    .map(|_| ())
            })
            .await;
        match r {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
