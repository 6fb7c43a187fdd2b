//! Getting media bytes from wherever a request says they are.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use mmembed_core::{EmbedError, MediaSource, Modality};

/// Reads the bytes of a local media source, refusing anything over
/// `max_bytes` before reading it all.
///
/// `file://` URIs are read as paths; other URIs (`gs://`, `https://`) are
/// for backends that fetch them themselves, so this returns an
/// `InvalidInput` error naming the scheme.
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
                    "cannot read `{u}` locally: only paths and file:// URIs are read here \
                     (gs:// URIs are for the Vertex backend)"
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
