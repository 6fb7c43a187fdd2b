//! S3 and Azure Blob through the `object_store` crate.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ClientConfigKey, GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutOptions, PutPayload, RetryConfig, WriteMultipart,
};

use crate::{Bucket, ObjectInfo, ObjectUri, PutMode, Scheme, Sink, StoreError, StoreOptions};

/// Objects at least this large are written as one multipart upload (S3
/// refuses single PUTs over 5 GiB; parts also retry independently).
const MULTIPART_FROM: usize = 64 << 20;

#[derive(Debug)]
pub(crate) struct OsBucket {
    store: Arc<dyn ObjectStore>,
    base: ObjectUri,
    max_retries: usize,
    initial_backoff: std::time::Duration,
}

fn retry(o: &StoreOptions) -> RetryConfig {
    RetryConfig {
        max_retries: o.max_retries,
        retry_timeout: std::time::Duration::from_secs(300),
        backoff: object_store::BackoffConfig {
            init_backoff: o.initial_backoff,
            max_backoff: std::time::Duration::from_secs(10),
            base: 2.0,
        },
    }
}

fn secs(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl OsBucket {
    pub(crate) fn new(u: &ObjectUri, o: &StoreOptions) -> Result<Self, StoreError> {
        let err = |e: object_store::Error| StoreError::BadUri {
            uri: u.to_uri(),
            reason: format!("cannot configure the store: {e}"),
        };
        let store: Arc<dyn ObjectStore> = match u.scheme {
            Scheme::S3 => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
                // `from_env` reads the AWS chain's variables (AWS_ACCESS_KEY_ID,
                // AWS_REGION, AWS_ENDPOINT_URL, AWS_PROFILE is not read: use
                // the variables or instance/web-identity credentials).
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&u.bucket)
                    .with_retry(retry(o))
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                        secs(o.timeout),
                    )
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                        secs(o.connect_timeout),
                    );
                // S3 has honoured `If-None-Match: *` since 2024; without it a
                // create-if-absent (the output lock) cannot be atomic.
                if std::env::var_os("AWS_CONDITIONAL_PUT").is_none() {
                    b = b.with_conditional_put(S3ConditionalPut::ETagMatch);
                }
                // An explicit plain-HTTP endpoint (MinIO, moto) is allowed
                // without a second setting.
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .unwrap_or_default();
                if endpoint.starts_with("http://") && std::env::var_os("AWS_ALLOW_HTTP").is_none() {
                    b = b.with_allow_http(true);
                }
                Arc::new(b.build().map_err(err)?)
            }
            Scheme::Azure => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(&u.bucket)
                    .with_retry(retry(o))
                    .with_config(
                        AzureConfigKey::Client(ClientConfigKey::Timeout),
                        secs(o.timeout),
                    )
                    .with_config(
                        AzureConfigKey::Client(ClientConfigKey::ConnectTimeout),
                        secs(o.connect_timeout),
                    );
                Arc::new(b.build().map_err(err)?)
            }
            Scheme::Gcs | Scheme::Http => unreachable!("GCS and URLs have their own clients"),
        };
        Ok(Self {
            store,
            base: u.with_key(""),
            max_retries: o.max_retries,
            initial_backoff: o.initial_backoff,
        })
    }

    fn path(&self, key: &str) -> Result<Path, StoreError> {
        Path::parse(key).map_err(|e| StoreError::BadUri {
            uri: self.base.with_key(key).to_uri(),
            reason: format!("not a valid object key: {e}"),
        })
    }

    /// A multipart upload of `key`, not visible until completed.
    async fn start_multipart(
        &self,
        key: &str,
        content_type: &str,
    ) -> Result<Box<dyn object_store::MultipartUpload>, StoreError> {
        let p = self.path(key)?;
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, content_type.to_string().into());
        self.store
            .put_multipart_opts(
                &p,
                object_store::PutMultipartOptions {
                    attributes,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.error(key, e))
    }

    fn info(&self, m: ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            uri: self.base.with_key(m.location.as_ref()).to_uri(),
            size: m.size,
            updated: Some(m.last_modified),
            // Quoted, as HTTP sends it: Azure's listings leave the quotes
            // out of the ETags its HEAD answers quote, so one object would
            // have two.
            etag: m.e_tag.map(|e| {
                if e.starts_with('"') || e.starts_with("W/") {
                    e
                } else {
                    format!("\"{e}\"")
                }
            }),
            generation: m.version,
            content_type: None,
        }
    }

    fn error(&self, key: &str, e: object_store::Error) -> StoreError {
        let uri = self.base.with_key(key).to_uri();
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound { uri },
            object_store::Error::AlreadyExists { .. } => StoreError::AlreadyExists { uri },
            object_store::Error::Precondition { .. } => StoreError::Transport {
                uri,
                message: "the object changed while being read".into(),
                retryable: true,
            },
            object_store::Error::NotImplemented { operation, .. } => {
                StoreError::Unsupported { uri, operation }
            }
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => StoreError::Denied {
                uri,
                message: source.to_string(),
            },
            other => StoreError::Transport {
                uri,
                // object_store's messages name the request and the status,
                // never the signing key or token.
                message: other.to_string(),
                retryable: false,
            },
        }
    }
}

#[async_trait]
impl Bucket for OsBucket {
    async fn head(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let p = self.path(key)?;
        match self.store.head(&p).await {
            Ok(m) => Ok(self.info(m)),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn get(
        &self,
        info: &ObjectInfo,
        key: &str,
        sink: &mut dyn Sink,
    ) -> Result<(), StoreError> {
        let p = self.path(key)?;
        let opts = GetOptions {
            if_match: info.etag.clone(),
            version: info.generation.clone(),
            ..Default::default()
        };
        let got = self
            .store
            .get_opts(&p, opts)
            .await
            .map_err(|e| self.error(key, e))?;
        // object_store resumes a body that breaks off mid-way (a reset, a
        // timeout) with a ranged request pinned to the same ETag.
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            sink.push(&chunk.map_err(|e| self.error(key, e))?)?;
        }
        Ok(())
    }

    async fn read(&self, key: &str, max_bytes: u64) -> Result<(Bytes, ObjectInfo), StoreError> {
        // One GET: its answer's headers are the object's metadata, read
        // before its body, so the size limit still refuses it unread.
        let p = self.path(key)?;
        let got = self
            .store
            .get_opts(&p, GetOptions::default())
            .await
            .map_err(|e| self.error(key, e))?;
        let content_type = got
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string());
        let info = ObjectInfo {
            content_type,
            ..self.info(got.meta.clone())
        };
        crate::check_size(&info.uri, info.size, max_bytes)?;
        let mut buf = crate::Capped::new(&info.uri, max_bytes, info.size);
        // Resumed as in `get`: pinned to the ETag of this answer.
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            buf.push(&chunk.map_err(|e| self.error(key, e))?)?;
        }
        Ok((buf.freeze(), info))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        // object_store lists by whole path segments; a partial last segment
        // is filtered here.
        let (dir, rest) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let dir_path = if dir.is_empty() {
            None
        } else {
            Some(self.path(dir)?)
        };
        let mut stream = self.store.list(dir_path.as_ref());
        let mut out = vec![];
        while let Some(m) = stream.next().await {
            let m = m.map_err(|e| self.error(prefix, e))?;
            if m.location.as_ref().starts_with(prefix) || rest.is_empty() {
                out.push(self.info(m));
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
        let p = self.path(key)?;
        if data.len() >= MULTIPART_FROM && mode == PutMode::Overwrite {
            let upload = self.start_multipart(key, content_type).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
            w.put(data);
            // Not visible until completed; a failure aborts the upload.
            w.finish().await.map_err(|e| self.error(key, e))?;
            return Ok(());
        }
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, content_type.to_string().into());
        let opts = PutOptions {
            mode: match mode {
                PutMode::Overwrite => object_store::PutMode::Overwrite,
                PutMode::Create => object_store::PutMode::Create,
            },
            attributes,
            ..Default::default()
        };
        self.store
            .put_opts(&p, PutPayload::from_bytes(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.error(key, e))
    }

    fn piece(&self, chunk: usize) -> usize {
        // S3 refuses parts under 5 MiB (but the last).
        chunk.max(5 << 20)
    }

    async fn upload(
        &self,
        key: &str,
        mut file: std::fs::File,
        path: &std::path::Path,
        _size: u64,
        chunk: usize,
        content_type: &str,
    ) -> Result<(), StoreError> {
        let uri = self.base.with_key(key).to_uri();
        let local = |doing: &str, e: std::io::Error| crate::local_error(&uri, path, doing, &e);
        let upload = self.start_multipart(key, content_type).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, chunk);
        let mut buf = vec![0u8; chunk];
        let sent: Result<(), StoreError> = async {
            loop {
                let n = read_full(&mut file, &mut buf).map_err(|e| local("reading", e))?;
                if n == 0 {
                    return Ok(());
                }
                // At most a few parts in flight: memory stays a few chunks.
                w.wait_for_capacity(4)
                    .await
                    .map_err(|e| self.error(key, e))?;
                w.write(&buf[..n]);
            }
        }
        .await;
        match sent {
            // Not visible until completed; a failure aborts the upload.
            Ok(()) => w.finish().await.map(|_| ()).map_err(|e| self.error(key, e)),
            Err(e) => {
                w.abort().await.ok();
                Err(e)
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        // S3 deletes go out as a bulk-delete POST, which object_store does
        // not retry once it may have been sent (a timeout, a reset). Deleting
        // is idempotent for us, so it is retried here.
        let mut attempt = 0;
        loop {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e @ object_store::Error::Generic { .. }) if attempt < self.max_retries => {
                    tracing::debug!(error = %e, attempt = attempt + 1, "retrying a delete");
                    tokio::time::sleep(crate::backoff(self.initial_backoff, attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.error(key, e)),
            }
        }
    }
}

/// Fills `buf` from `r` as far as it goes (short only at the end).
pub(crate) fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
