//! mmembed's one object-store access layer: every `gs://`, `s3://`,
//! `az://` and `http(s)://` read, listing and write of the workspace goes
//! through [`Stores`].
//!
//! - **S3 and Azure Blob** go through the Arrow project's
//!   [`object_store`] crate: its credential chains (the AWS chain,
//!   `AZURE_*` variables), its retries (5xx, timeouts, connection resets,
//!   also in the middle of a body) and its multipart uploads.
//! - **`http(s)://` URLs** are read with plain GETs ([`signed`](crate)
//!   module): signed URLs and URLs with parameters keep their query, and a
//!   URL signed for GET need not answer HEAD.
//! - **GCS** goes through the GCS JSON API ([`gcs`](crate) module): it is
//!   the API that reports an object's `generation` (BigQuery object tables
//!   key on it), the one the GCS emulators implement, and it takes
//!   `ifGenerationMatch=0` for create-if-absent. Credentials come from
//!   Application Default Credentials (google-cloud-auth);
//!   `STORAGE_EMULATOR_HOST` points it at an emulator without credentials,
//!   as Google's own client libraries do.
//!
//! Reads check the object's size against the caller's limit *before*
//! downloading and stop at the limit while streaming, so no object can make
//! a process allocate without bound; [`Stores::download`] and
//! [`Stores::upload`] move whole files between disk and a bucket in
//! streamed pieces, whatever their size. Credentials never appear in errors,
//! logs or `Debug` output.
//!
//! ```
//! use mmembed_store::ObjectUri;
//!
//! let u = ObjectUri::parse("gs://photos/2024/cat.jpg").unwrap();
//! assert_eq!((u.bucket.as_str(), u.key.as_str()), ("photos", "2024/cat.jpg"));
//! assert!(mmembed_store::is_remote("s3://b/k"));
//! assert!(!mmembed_store::is_remote("/data/cat.jpg"));
//! ```

mod gcs;
mod objstore;
mod signed;
#[cfg(feature = "testkit")]
pub mod testkit;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

/// What a store operation can fail with. Messages name the object, never a
/// credential.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The URI is not one this layer reads (or is malformed).
    #[error("`{uri}`: {reason}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No such object (or bucket).
    #[error("{uri}: not found")]
    NotFound {
        /// The object.
        uri: String,
    },
    /// The object is larger than the caller accepts; nothing was downloaded.
    #[error("{uri}: {size} bytes is over the {limit} byte limit")]
    TooLarge {
        /// The object.
        uri: String,
        /// Its size (or the bytes read when it grew while being read).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A read that looks at an object's first bytes before taking the rest
    /// refused them; the rest of the body was not downloaded.
    #[error("{uri}: not read further: its first bytes are not what was wanted")]
    Unwanted {
        /// The object.
        uri: String,
    },
    /// A create-if-absent write found the object already there.
    #[error("{uri} already exists")]
    AlreadyExists {
        /// The object.
        uri: String,
    },
    /// Access refused: missing or insufficient credentials.
    #[error("{uri}: access denied ({message})")]
    Denied {
        /// The object.
        uri: String,
        /// The store's reason.
        message: String,
    },
    /// The store does not support the operation (e.g. listing over HTTP).
    #[error("{uri}: {operation} is not supported by this store")]
    Unsupported {
        /// The object or prefix.
        uri: String,
        /// What was asked.
        operation: String,
    },
    /// Anything else: network faults that outlasted the retries, 5xx bursts,
    /// malformed answers.
    #[error("{uri}: {message}")]
    Transport {
        /// The object.
        uri: String,
        /// What happened.
        message: String,
        /// Whether trying again later may succeed.
        retryable: bool,
    },
}

impl StoreError {
    /// Whether a later attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Transport {
                retryable: true,
                ..
            }
        )
    }
}

/// An object's listing entry: what BigQuery's object tables call its
/// metadata columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// `scheme://bucket/key`.
    pub uri: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time.
    pub updated: Option<DateTime<Utc>>,
    /// The HTTP entity tag, when the store reports one.
    pub etag: Option<String>,
    /// GCS's `generation` or S3's version id: changes on every write.
    pub generation: Option<String>,
    /// The stored MIME type, when the store has one.
    pub content_type: Option<String>,
}

/// How a write treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it.
    Overwrite,
    /// Fail with [`StoreError::AlreadyExists`] if it exists (GCS
    /// `ifGenerationMatch=0`, S3 `If-None-Match: *`).
    Create,
}

/// The schemes of remote objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Google Cloud Storage, `gs://bucket/key`.
    Gcs,
    /// Amazon S3 and compatible stores, `s3://bucket/key`.
    S3,
    /// Azure Blob Storage, `az://container/key`.
    Azure,
    /// Plain `http://` or `https://`; read-only, no listing.
    Http,
}

/// A parsed remote object URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUri {
    /// Which store.
    pub scheme: Scheme,
    /// Bucket or container; for HTTP, `scheme://host[:port]`.
    pub bucket: String,
    /// The object key (no leading `/`); for HTTP, the URL's path and
    /// query.
    pub key: String,
}

/// `uri` for messages: any `user:password@` replaced by `***@`, and an
/// `http(s)://` URL's query by `?…` (a signed URL's query is a credential).
///
/// ```
/// use mmembed_store::redact;
///
/// assert_eq!(
///     redact("https://b.example/k.jpg?X-Amz-Signature=abc"),
///     "https://b.example/k.jpg?…"
/// );
/// assert_eq!(redact("https://u:p@h/k"), "https://***@h/k");
/// assert_eq!(redact("gs://b/k"), "gs://b/k");
/// ```
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..end].rfind('@') {
        Some(at) => format!("***@{}", &rest[at + 1..]),
        None => rest.to_string(),
    };
    let web = scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https");
    match rest.split_once('?') {
        Some((before, _)) if web => format!("{scheme}://{before}?…"),
        _ => format!("{scheme}://{rest}"),
    }
}

/// Whether `uri` names a remote object this layer reads.
pub fn is_remote(uri: &str) -> bool {
    ObjectUri::scheme_of(uri).is_some()
}

impl ObjectUri {
    fn scheme_of(uri: &str) -> Option<(Scheme, &str)> {
        let (scheme, rest) = uri.split_once("://")?;
        let s = match scheme.to_ascii_lowercase().as_str() {
            "gs" => Scheme::Gcs,
            "s3" | "s3a" => Scheme::S3,
            "az" | "azure" => Scheme::Azure,
            "http" | "https" => Scheme::Http,
            _ => return None,
        };
        Some((s, rest))
    }

    /// Parses `gs://b/k`, `s3://b/k`, `az://container/k`, `http(s)://host/path`.
    pub fn parse(uri: &str) -> Result<Self, StoreError> {
        let shown = redact(uri);
        let bad = |reason: &str| StoreError::BadUri {
            uri: shown.clone(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = Self::scheme_of(uri)
            .ok_or_else(|| bad("not a gs://, s3://, az:// or http(s):// URI"))?;
        if scheme == Scheme::Http {
            let url = url::Url::parse(uri).map_err(|e| bad(&format!("not a URL: {e}")))?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(bad(
                    "credentials in URLs are refused; they would end up in logs",
                ));
            }
            let host = url.host_str().ok_or_else(|| bad("no host"))?;
            let bucket = match url.port() {
                Some(p) => format!("{}://{host}:{p}", url.scheme()),
                None => format!("{}://{host}", url.scheme()),
            };
            // The path as sent (percent-encoded) and the query, which
            // signed URLs and some servers need.
            let mut key = url.path().trim_start_matches('/').to_string();
            if let Some(q) = url.query() {
                key = format!("{key}?{q}");
            }
            return Ok(Self {
                scheme,
                bucket,
                key,
            });
        }
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name"));
        }
        Ok(Self {
            scheme,
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The URI again, in canonical form.
    pub fn to_uri(&self) -> String {
        match self.scheme {
            Scheme::Gcs => format!("gs://{}/{}", self.bucket, self.key),
            Scheme::S3 => format!("s3://{}/{}", self.bucket, self.key),
            Scheme::Azure => format!("az://{}/{}", self.bucket, self.key),
            Scheme::Http => format!("{}/{}", self.bucket, self.key),
        }
    }

    /// The same bucket, another key.
    pub fn with_key(&self, key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            ..self.clone()
        }
    }
}

/// One bucket of one store: the operations the workspace needs.
#[async_trait]
pub(crate) trait Bucket: Send + Sync + fmt::Debug {
    async fn head(&self, key: &str) -> Result<ObjectInfo, StoreError>;
    /// The bytes of the object `info` describes (as `head` or `list` gave
    /// it: pinned to that generation/ETag where the store allows), into
    /// `sink` (which refuses bytes past its limit).
    async fn get(
        &self,
        info: &ObjectInfo,
        key: &str,
        sink: &mut dyn Sink,
    ) -> Result<(), StoreError>;
    /// The object's bytes and the metadata they are the version of,
    /// refusing an object over `max_bytes` before its body: one request
    /// where the store's answer carries the metadata (here a HEAD, then the
    /// read).
    async fn read(&self, key: &str, max_bytes: u64) -> Result<(Bytes, ObjectInfo), StoreError> {
        let info = self.head(key).await?;
        check_size(&info.uri, info.size, max_bytes)?;
        let mut buf = Capped::new(&info.uri, max_bytes, info.size);
        self.get(&info, key, &mut buf).await?;
        Ok((buf.freeze(), info))
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;
    async fn put(
        &self,
        key: &str,
        data: Bytes,
        content_type: &str,
        mode: PutMode,
    ) -> Result<(), StoreError>;
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// The size of the pieces this store takes for uploads of `chunk`.
    fn piece(&self, chunk: usize) -> usize;
    /// Writes `file` (at `path`, `size` bytes, more than one `piece`) as the
    /// object, whole: one multipart or resumable upload of pieces read from
    /// the file, so memory holds a few pieces, not the file; readers see it
    /// only once completed.
    async fn upload(
        &self,
        key: &str,
        file: std::fs::File,
        path: &Path,
        size: u64,
        piece: usize,
        content_type: &str,
    ) -> Result<(), StoreError>;
}

/// Retries and timeouts of every store; each is an environment variable.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Attempts after the first on 5xx, 429, timeouts and resets
    /// (`MMEMBED_STORE_RETRIES`, default 10).
    pub max_retries: usize,
    /// Longest a single request may take before it is retried
    /// (`MMEMBED_STORE_TIMEOUT_SECS`, default 120).
    pub timeout: Duration,
    /// Connection timeout (`MMEMBED_STORE_CONNECT_TIMEOUT_SECS`, default 10).
    pub connect_timeout: Duration,
    /// First backoff between attempts, doubled each time up to 10 s
    /// (`MMEMBED_STORE_BACKOFF_MS`, default 100).
    pub initial_backoff: Duration,
    /// GCS endpoint (`STORAGE_EMULATOR_HOST`, as Google's client libraries
    /// read it): when set, requests go there without credentials.
    pub gcs_endpoint: Option<String>,
    /// [`Stores::upload`] sends files up to this size in one request and
    /// larger ones in pieces of this size, read from the file one at a time
    /// (`MMEMBED_STORE_UPLOAD_CHUNK_MIB`, default 64 MiB; at least 5 MiB on
    /// S3, a multiple of 256 KiB on GCS, as the stores require).
    pub upload_chunk: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_retries: 10,
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(100),
            gcs_endpoint: None,
            upload_chunk: 64 << 20,
        }
    }
}

impl StoreOptions {
    /// Defaults overridden by the environment variables named on each field.
    pub fn from_env() -> Self {
        let mut o = Self::default();
        let num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(n) = num("MMEMBED_STORE_RETRIES") {
            o.max_retries = n as usize;
        }
        if let Some(n) = num("MMEMBED_STORE_TIMEOUT_SECS") {
            o.timeout = Duration::from_secs(n.max(1));
        }
        if let Some(n) = num("MMEMBED_STORE_CONNECT_TIMEOUT_SECS") {
            o.connect_timeout = Duration::from_secs(n.max(1));
        }
        if let Some(n) = num("MMEMBED_STORE_BACKOFF_MS") {
            o.initial_backoff = Duration::from_millis(n);
        }
        if let Some(n) = num("MMEMBED_STORE_UPLOAD_CHUNK_MIB") {
            o.upload_chunk = (n.clamp(1, 4096) as usize) << 20;
        }
        o.gcs_endpoint = std::env::var("STORAGE_EMULATOR_HOST")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                let v = v.trim().trim_end_matches('/');
                if v.contains("://") {
                    v.to_string()
                } else {
                    format!("http://{v}")
                }
            });
        o
    }
}

/// The stores of a process: one client per bucket, made on first use.
pub struct Stores {
    options: StoreOptions,
    buckets: Mutex<HashMap<(Scheme, String), Arc<dyn Bucket>>>,
}

impl fmt::Debug for Stores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stores")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Characters that never start a glob in our listings.
fn glob_start(key: &str) -> Option<usize> {
    key.find(['*', '?', '['])
}

fn hidden(key: &str) -> bool {
    key.split('/').any(|c| c.starts_with('.'))
}

impl Stores {
    /// Stores configured by `options`.
    pub fn new(options: StoreOptions) -> Self {
        Self {
            options,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The process's stores, configured from the environment on first use.
    pub fn shared() -> &'static Stores {
        static S: OnceLock<Stores> = OnceLock::new();
        S.get_or_init(|| Stores::new(StoreOptions::from_env()))
    }

    /// The options in use.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    fn bucket(&self, u: &ObjectUri) -> Result<Arc<dyn Bucket>, StoreError> {
        let k = (u.scheme, u.bucket.clone());
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(&k) {
            return Ok(b.clone());
        }
        let b: Arc<dyn Bucket> = match u.scheme {
            Scheme::Gcs => Arc::new(gcs::GcsBucket::new(&u.bucket, &self.options)?),
            Scheme::Http => Arc::new(signed::UrlBucket::new(&u.bucket, &self.options)?),
            Scheme::S3 | Scheme::Azure => Arc::new(objstore::OsBucket::new(u, &self.options)?),
        };
        map.insert(k, b.clone());
        Ok(b)
    }

    /// An object's metadata.
    pub async fn head(&self, uri: &str) -> Result<ObjectInfo, StoreError> {
        let u = ObjectUri::parse(uri)?;
        self.bucket(&u)?.head(&u.key).await
    }

    /// Whether the object exists.
    pub async fn exists(&self, uri: &str) -> Result<bool, StoreError> {
        match self.head(uri).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The object's bytes and metadata, refusing objects over `max_bytes`
    /// before downloading them. One request on S3, Azure and URLs (the
    /// metadata comes with the answer), a metadata request first on GCS.
    pub async fn read(&self, uri: &str, max_bytes: u64) -> Result<(Bytes, ObjectInfo), StoreError> {
        let u = ObjectUri::parse(uri)?;
        self.bucket(&u)?.read(&u.key, max_bytes).await
    }

    /// The bytes of an object as a listing described it (one request less
    /// than [`read`](Self::read); pinned to the listed generation/ETag where
    /// the store allows, so a concurrent rewrite is an error, not a mix).
    pub async fn read_listed(
        &self,
        info: &ObjectInfo,
        max_bytes: u64,
    ) -> Result<Bytes, StoreError> {
        check_size(&info.uri, info.size, max_bytes)?;
        let u = ObjectUri::parse(&info.uri)?;
        let mut buf = Capped::new(&info.uri, max_bytes, info.size);
        self.bucket(&u)?.get(info, &u.key, &mut buf).await?;
        Ok(buf.freeze())
    }

    /// The first `len` bytes of an object as a listing described it (all of
    /// it, if shorter): one request whose body is abandoned once they have
    /// come, for a caller that looks at an object's type and leaves the
    /// rest to someone else (Vertex reads `gs://` objects itself). Not a
    /// ranged read: signed URLs and some servers answer those with the
    /// whole body anyway, and one code path is one to test.
    pub async fn read_head(&self, info: &ObjectInfo, len: usize) -> Result<Bytes, StoreError> {
        let u = ObjectUri::parse(&info.uri)?;
        let refuse: &HeadCheck = &|_| false;
        let expected = info.size.min(len as u64);
        let mut buf = Capped::new(&info.uri, u64::MAX, expected).with_head(len, refuse);
        match self.bucket(&u)?.get(info, &u.key, &mut buf).await {
            Ok(()) | Err(StoreError::Unwanted { .. }) => {}
            Err(e) => return Err(e),
        }
        let mut head = buf.freeze();
        head.truncate(len);
        Ok(head)
    }

    /// As [`read_listed`](Self::read_listed), for an object worth reading
    /// only if its first `head` bytes (or all of it, if shorter) satisfy
    /// `wanted`: `None` when they do not, and the body is abandoned there
    /// (one request, a chunk of it transferred, not the whole object). For
    /// objects whose type only their bytes can tell.
    pub async fn read_listed_if(
        &self,
        info: &ObjectInfo,
        max_bytes: u64,
        head: usize,
        wanted: &HeadCheck,
    ) -> Result<Option<Bytes>, StoreError> {
        check_size(&info.uri, info.size, max_bytes)?;
        let u = ObjectUri::parse(&info.uri)?;
        // Room for the head first; the rest once it is wanted.
        let first = info.size.min(head as u64);
        let mut buf = Capped::new(&info.uri, max_bytes, first).with_head(head, wanted);
        buf.expect_after_head(info.size);
        match self.bucket(&u)?.get(info, &u.key, &mut buf).await {
            Err(StoreError::Unwanted { .. }) => return Ok(None),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        if !buf.head_checked() && !wanted(&buf.buf) {
            return Ok(None);
        }
        Ok(Some(buf.freeze()))
    }

    /// Downloads an object to a local file (created or truncated), streamed:
    /// memory holds a chunk of the body, whatever the object's size. Pinned
    /// to the generation/ETag its metadata gave, and resumed where a body
    /// breaks off, as [`read`](Self::read) is.
    pub async fn download(&self, uri: &str, path: &Path) -> Result<ObjectInfo, StoreError> {
        let u = ObjectUri::parse(uri)?;
        let b = self.bucket(&u)?;
        let info = b.head(&u.key).await?;
        let mut sink = FileSink::create(uri, path)?;
        b.get(&info, &u.key, &mut sink).await?;
        Ok(info)
    }

    /// Uploads a local file as an object, streamed from the file; readers
    /// see the old object or the whole new one, never a part (one put up to
    /// [`StoreOptions::upload_chunk`] bytes, else one multipart upload on
    /// S3 and Azure, one resumable upload on GCS, completed at the end).
    pub async fn upload(
        &self,
        uri: &str,
        path: &Path,
        content_type: &str,
    ) -> Result<(), StoreError> {
        let u = ObjectUri::parse(uri)?;
        let b = self.bucket(&u)?;
        let local = |doing: &str, e: std::io::Error| local_error(uri, path, doing, &e);
        let file = std::fs::File::open(path).map_err(|e| local("opening", e))?;
        let size = file.metadata().map_err(|e| local("reading", e))?.len();
        let piece = b.piece(self.options.upload_chunk);
        if size <= piece as u64 {
            let data = std::fs::read(path).map_err(|e| local("reading", e))?;
            return b
                .put(&u.key, Bytes::from(data), content_type, PutMode::Overwrite)
                .await;
        }
        b.upload(&u.key, file, path, size, piece, content_type)
            .await
    }

    /// Lists `spec`: a prefix (`gs://b/photos/`: everything under it), a
    /// glob over keys (`s3://b/photos/**/*.jpg`, `*` within one level, `**`
    /// across levels) or one object. Keys with a component starting with `.`
    /// and folder placeholders (keys ending in `/`) are skipped, as hidden
    /// entries are in local folders. Sorted by URI.
    pub async fn list(&self, spec: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let u = ObjectUri::parse(spec)?;
        let b = self.bucket(&u)?;
        let mut out = match glob_start(&u.key) {
            Some(i) => {
                let prefix = &u.key[..u.key[..i].rfind('/').map_or(0, |j| j + 1)];
                let pattern = glob::Pattern::new(&u.key).map_err(|e| StoreError::BadUri {
                    uri: spec.into(),
                    reason: format!("bad glob: {e}"),
                })?;
                let opts = glob::MatchOptions {
                    case_sensitive: true,
                    require_literal_separator: true,
                    require_literal_leading_dot: true,
                };
                b.list(prefix)
                    .await?
                    .into_iter()
                    .filter(|o| {
                        let key = ObjectUri::parse(&o.uri).map(|x| x.key).unwrap_or_default();
                        pattern.matches_with(&key, opts)
                    })
                    .collect()
            }
            None => {
                let dir = if u.key.is_empty() || u.key.ends_with('/') {
                    u.key.clone()
                } else {
                    format!("{}/", u.key)
                };
                let listed = b.list(&dir).await?;
                if listed.is_empty() && !u.key.is_empty() && !u.key.ends_with('/') {
                    match b.head(&u.key).await {
                        Ok(one) => vec![one],
                        Err(StoreError::NotFound { .. }) => vec![],
                        Err(e) => return Err(e),
                    }
                } else {
                    listed
                }
            }
        };
        out.retain(|o| {
            let key = ObjectUri::parse(&o.uri).map(|x| x.key).unwrap_or_default();
            !key.ends_with('/') && !hidden(&key)
        });
        out.sort_by(|a, b| a.uri.cmp(&b.uri));
        Ok(out)
    }

    /// Writes an object whole: readers see the old object or the new one,
    /// never a part (a single PUT; large ones as one multipart upload that
    /// becomes visible only when completed).
    pub async fn put(
        &self,
        uri: &str,
        data: Bytes,
        content_type: &str,
        mode: PutMode,
    ) -> Result<(), StoreError> {
        let u = ObjectUri::parse(uri)?;
        self.bucket(&u)?.put(&u.key, data, content_type, mode).await
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete(&self, uri: &str) -> Result<(), StoreError> {
        let u = ObjectUri::parse(uri)?;
        self.bucket(&u)?.delete(&u.key).await
    }
}

/// Refuses an object whose size is over the limit, before downloading it.
pub(crate) fn check_size(uri: &str, size: u64, limit: u64) -> Result<(), StoreError> {
    if size > limit {
        return Err(StoreError::TooLarge {
            uri: redact(uri),
            size,
            limit,
        });
    }
    Ok(())
}

/// Where a download's bytes go.
pub(crate) trait Sink: Send {
    fn push(&mut self, chunk: &[u8]) -> Result<(), StoreError>;
    /// Bytes received so far (where a broken-off body resumes).
    fn len(&self) -> usize;
    /// Drops what was received (a server that ignored a resume range).
    fn clear(&mut self) -> Result<(), StoreError>;
}

impl Sink for Capped<'_> {
    fn push(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        Capped::push(self, chunk)
    }

    fn len(&self) -> usize {
        Capped::len(self)
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        Capped::clear(self);
        Ok(())
    }
}

/// A download written to a local file as it arrives.
struct FileSink {
    uri: String,
    path: std::path::PathBuf,
    file: std::fs::File,
    len: usize,
}

impl FileSink {
    fn create(uri: &str, path: &Path) -> Result<Self, StoreError> {
        let file =
            std::fs::File::create(path).map_err(|e| local_error(uri, path, "creating", &e))?;
        Ok(Self {
            uri: uri.to_string(),
            path: path.to_path_buf(),
            file,
            len: 0,
        })
    }
}

/// A local file's fault during a download or upload, naming both.
pub(crate) fn local_error(uri: &str, path: &Path, doing: &str, e: &std::io::Error) -> StoreError {
    StoreError::Transport {
        uri: uri.to_string(),
        message: format!("{doing} the local file {}: {e}", path.display()),
        retryable: false,
    }
}

impl Sink for FileSink {
    fn push(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        use std::io::Write;
        self.file
            .write_all(chunk)
            .map_err(|e| local_error(&self.uri, &self.path, "writing", &e))?;
        self.len += chunk.len();
        Ok(())
    }

    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        use std::io::Seek;
        self.file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .map_err(|e| local_error(&self.uri, &self.path, "truncating", &e))?;
        self.len = 0;
        Ok(())
    }
}

/// Says whether an object's first bytes are worth the rest of it.
pub type HeadCheck = dyn Fn(&[u8]) -> bool + Send + Sync;

/// A download buffer that refuses to grow past the limit (an object that
/// grows while being read, or a server that sends more than it said).
pub(crate) struct Capped<'a> {
    uri: &'a str,
    limit: u64,
    buf: bytes::BytesMut,
    /// How many first bytes `wanted` looks at, once they have come.
    head: Option<(usize, &'a HeadCheck)>,
    checked: bool,
    /// The size to make room for once the head is wanted (not before: an
    /// unwanted body is abandoned after its head).
    after_head: u64,
}

impl<'a> Capped<'a> {
    pub(crate) fn new(uri: &'a str, limit: u64, expected: u64) -> Self {
        Self {
            uri,
            limit,
            buf: bytes::BytesMut::with_capacity(expected.min(limit) as usize),
            head: None,
            checked: false,
            after_head: 0,
        }
    }

    /// Makes room for `size` bytes once the head is wanted.
    fn expect_after_head(&mut self, size: u64) {
        self.after_head = size;
    }

    /// Refuses the body ([`StoreError::Unwanted`]) once its first `len`
    /// bytes have come and `wanted` says no.
    fn with_head(mut self, len: usize, wanted: &'a HeadCheck) -> Self {
        self.head = Some((len, wanted));
        self
    }

    /// Whether the head was looked at (a body shorter than it is not,
    /// until the caller does).
    fn head_checked(&self) -> bool {
        self.checked
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        check_size(self.uri, (self.buf.len() + chunk.len()) as u64, self.limit)?;
        self.buf.extend_from_slice(chunk);
        if let Some((len, wanted)) = self.head.filter(|_| !self.checked)
            && self.buf.len() >= len
        {
            self.checked = true;
            if !wanted(&self.buf[..len]) {
                return Err(StoreError::Unwanted {
                    uri: redact(self.uri),
                });
            }
            let rest = self.after_head.min(self.limit) as usize;
            self.buf.reserve(rest.saturating_sub(self.buf.len()));
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.checked = false;
    }

    pub(crate) fn freeze(self) -> Bytes {
        self.buf.freeze()
    }
}

/// One attempt's outcome, before retrying (the stores whose requests are
/// made here: GCS's JSON API, URLs with a query string).
pub(crate) enum Attempt<T> {
    Done(T),
    Retry(StoreError),
    Fail(StoreError),
}

impl<T> Attempt<T> {
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Attempt<U> {
        match self {
            Attempt::Done(v) => Attempt::Done(f(v)),
            Attempt::Retry(e) => Attempt::Retry(e),
            Attempt::Fail(e) => Attempt::Fail(e),
        }
    }

    /// The value of a success, else the outcome as an attempt of any
    /// type (for the caller to return).
    pub(crate) fn done<U>(self) -> Result<T, Attempt<U>> {
        match self {
            Attempt::Done(v) => Ok(v),
            Attempt::Retry(e) => Err(Attempt::Retry(e)),
            Attempt::Fail(e) => Err(Attempt::Fail(e)),
        }
    }
}

/// An HTTP error status that is none of a store's known ones, for the
/// stores whose requests are made here: timeouts, throttling and server
/// errors are retried, anything else fails for good.
pub(crate) fn other_status<T>(
    uri: String,
    status: http::StatusCode,
    message: String,
) -> Attempt<T> {
    use http::StatusCode;
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    let err = StoreError::Transport {
        uri,
        message,
        retryable,
    };
    if retryable {
        Attempt::Retry(err)
    } else {
        Attempt::Fail(err)
    }
}

/// Runs `attempt` until it is done, fails for good, or `max_retries` are
/// spent, waiting [`backoff`] between tries.
pub(crate) async fn retrying<T, F, Fut>(
    max_retries: usize,
    initial_backoff: Duration,
    what: &str,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Attempt<T>>,
{
    let mut n = 0;
    loop {
        match attempt(n).await {
            Attempt::Done(v) => return Ok(v),
            Attempt::Fail(e) => return Err(e),
            Attempt::Retry(e) if n >= max_retries => return Err(e),
            Attempt::Retry(e) => {
                let wait = backoff(initial_backoff, n);
                tracing::debug!(error = %e, attempt = n + 1, ?wait, "retrying {what}");
                tokio::time::sleep(wait).await;
                n += 1;
            }
        }
    }
}

/// One attempt of a resumable download: `resp`'s body into `buf`. An
/// answer other than 206 to a resumed request (`resumed`) is the whole
/// object again, so what `buf` holds is dropped first; a body that breaks
/// off (`fault` names it) or ends before `size` bytes is tried again from
/// where it stopped.
pub(crate) async fn take_body(
    buf: &mut dyn Sink,
    resp: reqwest::Response,
    resumed: bool,
    size: u64,
    uri: &str,
    fault: &(dyn Fn(&reqwest::Error) -> StoreError + Sync),
) -> Attempt<()> {
    use futures::StreamExt;
    if resumed
        && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT
        && let Err(e) = buf.clear()
    {
        return Attempt::Fail(e);
    }
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                if let Err(e) = buf.push(&c) {
                    return Attempt::Fail(e);
                }
            }
            Err(e) => return Attempt::Retry(fault(&e)),
        }
    }
    if (buf.len() as u64) < size {
        return Attempt::Retry(StoreError::Transport {
            uri: redact(uri),
            message: format!("the body ended after {} of {size} bytes", buf.len()),
            retryable: true,
        });
    }
    Attempt::Done(())
}

/// Exponential backoff with jitter: `initial * 2^attempt`, at most 10 s.
pub(crate) fn backoff(initial: Duration, attempt: usize) -> Duration {
    let base = initial.saturating_mul(1u32 << attempt.min(16));
    let capped = base.min(Duration::from_secs(10));
    capped.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        let u = ObjectUri::parse("s3://bkt/a/b.png").unwrap();
        assert_eq!(u.scheme, Scheme::S3);
        assert_eq!(u.to_uri(), "s3://bkt/a/b.png");
        let u = ObjectUri::parse("az://ctr/x/y.mp4").unwrap();
        assert_eq!(
            (u.scheme, u.bucket.as_str(), u.key.as_str()),
            (Scheme::Azure, "ctr", "x/y.mp4")
        );
        let u = ObjectUri::parse("http://127.0.0.1:8080/m/c.jpg").unwrap();
        assert_eq!(u.bucket, "http://127.0.0.1:8080");
        assert_eq!(u.key, "m/c.jpg");
        assert_eq!(u.to_uri(), "http://127.0.0.1:8080/m/c.jpg");
        assert!(ObjectUri::parse("gs:///k").is_err());
        assert!(ObjectUri::parse("ftp://h/k").is_err());
        // A signed URL keeps its query (and its path's encoding).
        let u = ObjectUri::parse("https://h/a%20b.png?X-Amz-Signature=abc&x=1").unwrap();
        assert_eq!(u.key, "a%20b.png?X-Amz-Signature=abc&x=1");
        assert_eq!(u.to_uri(), "https://h/a%20b.png?X-Amz-Signature=abc&x=1");
        let e = ObjectUri::parse("https://user:hunter2@h/k.png").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("https://***@h/k.png"), "{e}");
        assert!(!is_remote("file:///x"));
    }

    #[test]
    fn hidden_and_glob_helpers() {
        assert!(hidden("a/.parts/p"));
        assert!(!hidden("a/b.c"));
        assert_eq!(glob_start("a/b/*.png"), Some(4));
        assert_eq!(glob_start("a/b/"), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let i = Duration::from_millis(100);
        assert!(backoff(i, 0) <= Duration::from_millis(100));
        assert!(backoff(i, 3) >= Duration::from_millis(400));
        assert!(backoff(i, 30) <= Duration::from_secs(10));
    }
}
