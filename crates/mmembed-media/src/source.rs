//! Getting media bytes from wherever a request says they are.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use mmembed_core::{EmbedError, MediaSource, Modality};

/// Fetches a media source that lives in an object store (`gs://`, `s3://`,
/// `az://`, `http(s)://`) through [`mmembed_store::Stores::shared`],
/// refusing objects over `max_bytes` before downloading them. Returns
/// `Ok(None)` for sources that are not remote (bytes, paths, `file://`),
/// which [`read_media`] reads.
pub async fn fetch_remote(
    source: &MediaSource,
    kind: Modality,
    max_bytes: u64,
) -> Result<Option<Bytes>, EmbedError> {
    let MediaSource::Uri(u) = source else {
        return Ok(None);
    };
    if !mmembed_store::is_remote(u) {
        return Ok(None);
    }
    match mmembed_store::Stores::shared().read(u, max_bytes).await {
        Ok((bytes, _)) => Ok(Some(bytes)),
        Err(e) => Err(store_error(e, kind)),
    }
}

/// A store failure as the error of the request that needed the object.
pub fn store_error(e: mmembed_store::StoreError, kind: Modality) -> EmbedError {
    use mmembed_store::StoreError as S;
    match e {
        S::Denied { .. } => EmbedError::Remote {
            http_status: None,
            status: Some("PERMISSION_DENIED".into()),
            message: e.to_string(),
            retryable: false,
        },
        S::Transport { retryable, .. } => EmbedError::Remote {
            http_status: None,
            status: Some("UNAVAILABLE".into()),
            message: e.to_string(),
            retryable,
        },
        S::BadUri { .. } | S::Unsupported { .. } => {
            EmbedError::invalid(kind.to_string(), e.to_string())
        }
        S::NotFound { ref uri }
        | S::TooLarge { ref uri, .. }
        | S::AlreadyExists { ref uri }
        | S::Unwanted { ref uri } => {
            let uri = uri.clone();
            let reason = e.to_string();
            let reason = reason
                .strip_prefix(&format!("{uri}: "))
                .unwrap_or(&reason)
                .to_string();
            EmbedError::media(uri, reason, None)
        }
    }
}

/// Reads the bytes of a local media source, refusing anything over
/// `max_bytes` before reading it all.
///
/// `file://` URIs are read as paths; remote URIs are fetched with
/// [`fetch_remote`] first (async), so here they are an `InvalidInput` error.
pub fn read_media(
    source: &MediaSource,
    kind: Modality,
    max_bytes: u64,
) -> Result<Bytes, EmbedError> {
    let field = kind.to_string();
    match source {
        MediaSource::Bytes(b) => {
            if b.len() as u64 > max_bytes {
                return Err(EmbedError::media(
                    source.describe(kind),
                    format!("{} bytes is over the {max_bytes} byte limit", b.len()),
                    None,
                ));
            }
            Ok(b.clone())
        }
        MediaSource::Path(p) => read_path(p, &field, max_bytes),
        MediaSource::Uri(u) => match u.strip_prefix("file://") {
            Some(path) => read_path(std::path::Path::new(path), &field, max_bytes),
            None => Err(EmbedError::invalid(
                field,
                format!(
                    "cannot read `{u}`: not a path, a file:// URI or a gs://, s3://, az:// \
                     or http(s):// object"
                ),
            )),
        },
    }
}

fn read_path(path: &std::path::Path, field: &str, max_bytes: u64) -> Result<Bytes, EmbedError> {
    let what = path.display().to_string();
    let io_err = |e: std::io::Error| {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
            _ => format!("cannot read: {e}"),
        };
        EmbedError::media(what.clone(), reason, Some(Arc::new(e)))
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if meta.is_dir() {
        return Err(EmbedError::invalid(field, format!("{what} is a directory")));
    }
    if meta.len() > max_bytes {
        return Err(EmbedError::media(
            what.clone(),
            format!("{} bytes is over the {max_bytes} byte limit", meta.len()),
            None,
        ));
    }
    // `take` guards against a file that grows while we read it.
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    if buf.len() as u64 > max_bytes {
        return Err(EmbedError::media(
            what,
            "grew past the size limit while being read",
            None,
        ));
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_paths_and_file_uris_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        std::fs::write(&p, b"12345").unwrap();
        let got = read_media(&MediaSource::Path(p.clone()), Modality::Image, 100).unwrap();
        assert_eq!(&got[..], b"12345");
        let uri = format!("file://{}", p.display());
        assert_eq!(
            read_media(&MediaSource::Uri(uri), Modality::Image, 100).unwrap(),
            got
        );
        let e = read_media(&MediaSource::Path(p), Modality::Image, 4).unwrap_err();
        assert!(e.to_string().contains("over the 4 byte limit"), "{e}");
        let e = read_media(
            &MediaSource::Uri("gs://b/o.png".into()),
            Modality::Image,
            100,
        )
        .unwrap_err();
        assert!(
            matches!(e, EmbedError::InvalidInput { ref field, .. } if field == "image"),
            "{e}"
        );
        let e = read_media(
            &MediaSource::Path(dir.path().join("missing.png")),
            Modality::Image,
            9,
        )
        .unwrap_err();
        assert!(e.to_string().contains("file not found"), "{e}");
        let e = read_media(
            &MediaSource::Path(dir.path().to_path_buf()),
            Modality::Image,
            9,
        )
        .unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
    }
}
