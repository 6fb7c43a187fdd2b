//! The rows of an embedding job over an object table, BigQuery's
//! `AI.GENERATE_EMBEDDING` shape: one row per image and per video segment,
//! a `status` per row (empty on success), nothing lost. The `mmembed batch`
//! command and the Python package (its Ray and Daft adapters) both make
//! their rows here, so a file gets the same rows whichever ran it.
//!
//! ```
//! use mmembed_rows::{Kind, content_type};
//!
//! assert_eq!(content_type("gs://b/clip.MP4"), Some(("video/mp4", Kind::Video)));
//! assert_eq!(content_type("notes.txt"), None);
//! ```

use std::path::Path;

use chrono::{DateTime, Utc};
use mmembed_core::{EmbedError, EmbedRequest, Embedder, Media, MediaSource, VideoSegmentConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod arrow;

/// The columns every output row has; carried columns may not reuse them.
pub const STANDARD_COLUMNS: [&str; 13] = [
    "uri",
    "content_type",
    "size_bytes",
    "generation",
    "etag",
    "updated",
    "embedding",
    "status",
    "video_start_sec",
    "video_end_sec",
    "model",
    "space",
    "dimension",
];

/// What a file holds, judged by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A still image.
    Image,
    /// A video.
    Video,
}

const TYPES: &[(&str, &str, Kind)] = &[
    ("png", "image/png", Kind::Image),
    ("jpg", "image/jpeg", Kind::Image),
    ("jpeg", "image/jpeg", Kind::Image),
    ("gif", "image/gif", Kind::Image),
    ("bmp", "image/bmp", Kind::Image),
    ("webp", "image/webp", Kind::Image),
    ("tif", "image/tiff", Kind::Image),
    ("tiff", "image/tiff", Kind::Image),
    ("mp4", "video/mp4", Kind::Video),
    ("m4v", "video/mp4", Kind::Video),
    ("mov", "video/quicktime", Kind::Video),
    ("avi", "video/x-msvideo", Kind::Video),
    ("flv", "video/x-flv", Kind::Video),
    ("mkv", "video/x-matroska", Kind::Video),
    ("webm", "video/webm", Kind::Video),
    ("wmv", "video/x-ms-wmv", Kind::Video),
    ("mpeg", "video/mpeg", Kind::Video),
    ("mpg", "video/mpeg", Kind::Video),
    ("3gp", "video/3gpp", Kind::Video),
];

/// The MIME type and kind for a file name, if it is a supported type.
pub fn content_type(name: &str) -> Option<(&'static str, Kind)> {
    // Query strings of URLs are not part of the extension.
    let name = name.split(['?', '#']).next().unwrap_or(name);
    let ext = Path::new(name).extension()?.to_str()?.to_ascii_lowercase();
    TYPES
        .iter()
        .find(|(e, _, _)| *e == ext)
        .map(|(_, ct, k)| (*ct, *k))
}

/// The supported extensions, for error messages.
pub fn supported_extensions() -> String {
    TYPES.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
}

/// The status of a file whose name has no supported extension.
pub fn unsupported_type_status() -> String {
    format!(
        "unsupported file type (supported extensions: {})",
        supported_extensions()
    )
}

/// The status of an empty object: the same whether it came as a file or
/// as bytes read from a bucket.
fn empty_status(uri: &str) -> String {
    format!("cannot decode {uri}: it is empty (0 bytes)")
}

/// A local file's size and modification time, or the status of a row for
/// a file that cannot be read.
pub fn stat_file(path: &Path) -> Result<(i64, Option<DateTime<Utc>>), String> {
    let m = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok((m.len() as i64, modified(&m)))
}

/// A file's modification time as rows keep it: to the microsecond.
pub fn modified(m: &std::fs::Metadata) -> Option<DateTime<Utc>> {
    m.modified()
        .ok()
        .map(|t| to_micros(DateTime::<Utc>::from(t)))
}

/// `t` to the microsecond, as every output format keeps it (Parquet's
/// and BigQuery's timestamps) where file systems give nanoseconds: a time
/// read back from an output compares equal to the file's only this way.
pub fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    t.trunc_subsecs(6)
}

/// One output row: an image, a video segment, or a file that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The object, as the input named it.
    pub uri: String,
    /// MIME type from the extension (`application/octet-stream` if unknown).
    pub content_type: String,
    /// File size, when known.
    pub size_bytes: Option<i64>,
    /// The object's generation (GCS) or version id (S3), when it has one.
    #[serde(default)]
    pub generation: Option<String>,
    /// The object's ETag, when the store reports one.
    #[serde(default)]
    pub etag: Option<String>,
    /// The object's last modification, when known.
    #[serde(default)]
    pub updated: Option<DateTime<Utc>>,
    /// The vector; null when `status` is not empty.
    pub embedding: Option<Vec<f32>>,
    /// Empty on success, the error otherwise.
    pub status: String,
    /// Segment start for videos, null for images.
    pub video_start_sec: Option<f64>,
    /// Segment end for videos, null for images.
    pub video_end_sec: Option<f64>,
    /// The model that embedded (or would have).
    pub model: String,
    /// Its embedding space id: only vectors of one space are comparable.
    pub space: String,
    /// Vector length.
    pub dimension: Option<i32>,
    /// Manifest columns carried through.
    #[serde(flatten)]
    pub carried: Map<String, Value>,
}

impl Row {
    /// Whether the row holds a vector.
    pub fn ok(&self) -> bool {
        self.status.is_empty()
    }
}

/// One object to embed, with what its rows record about it.
#[derive(Debug, Clone)]
pub struct RowInput {
    /// The `uri` column.
    pub uri: String,
    /// The `content_type` column.
    pub content_type: String,
    /// Size in bytes, when known.
    pub size_bytes: Option<i64>,
    /// GCS generation / S3 version id.
    pub generation: Option<String>,
    /// The store's entity tag.
    pub etag: Option<String>,
    /// Last modification.
    pub updated: Option<DateTime<Utc>>,
    /// Columns carried to every row of this object.
    pub carried: Map<String, Value>,
    /// The request, or the status of an object that could not be read.
    pub request: Result<EmbedRequest, String>,
}

impl RowInput {
    /// An object named `uri` whose bytes come from `media`: the request is
    /// an image or a video (split into segments by `segments`) by the
    /// name's extension, or a failed row for an unsupported type.
    pub fn new(
        uri: impl Into<String>,
        media: impl Into<Media>,
        segments: Option<VideoSegmentConfig>,
        dimension: Option<u32>,
    ) -> Self {
        let uri = uri.into();
        let Some((ct, kind)) = content_type(&uri) else {
            return Self::failed(uri, "application/octet-stream", unsupported_type_status());
        };
        let mut media = media.into();
        if matches!(&media.source, MediaSource::Bytes(b) if b.is_empty()) {
            return Self::failed(uri.clone(), ct, empty_status(&uri));
        }
        media.mime_type.get_or_insert_with(|| ct.to_string());
        let mut req = match kind {
            Kind::Image => EmbedRequest::image(media),
            Kind::Video => EmbedRequest::video(media, segments),
        };
        if let Some(d) = dimension {
            req = req.with_dimension(d);
        }
        let mut input = Self::failed(uri, ct, String::new());
        input.request = Ok(req);
        input
    }

    /// A file on this machine, named `uri` in the rows: its size and
    /// modification time recorded, or a failed row when it cannot be read.
    pub fn file(
        uri: impl Into<String>,
        path: &Path,
        segments: Option<VideoSegmentConfig>,
        dimension: Option<u32>,
    ) -> Self {
        let mut input = Self::new(uri, path.to_path_buf(), segments, dimension);
        match stat_file(path) {
            Ok((size, updated)) => {
                input.size_bytes = Some(size);
                input.updated = updated;
                if size == 0 && input.request.is_ok() {
                    input.request = Err(empty_status(&input.uri));
                }
            }
            // An unsupported type keeps its own status, as in `mmembed batch`.
            Err(status) if input.request.is_ok() => input.request = Err(status),
            Err(_) => {}
        }
        input
    }

    /// An object that fails with `status` before reaching the model.
    pub fn failed(uri: impl Into<String>, content_type: &str, status: String) -> Self {
        Self {
            uri: uri.into(),
            content_type: content_type.into(),
            size_bytes: None,
            generation: None,
            etag: None,
            updated: None,
            carried: Map::new(),
            request: Err(status),
        }
    }
}

/// Embeds `inputs` in one backend call and makes their rows, in input
/// order: one per image, one per video segment, one with a status for each
/// object or segment that failed. Never fails as a whole. Each row comes
/// with the index of the input it belongs to.
pub async fn embed_rows(
    embedder: &dyn Embedder,
    dimension: Option<u32>,
    inputs: Vec<RowInput>,
) -> Vec<(usize, Row)> {
    let info = embedder.info();
    let mut reqs = vec![];
    let mut planned = Vec::with_capacity(inputs.len());
    // Objects read ahead (bytes) are named by their URI in statuses, as
    // files are by their path, rather than as "image bytes (N bytes)".
    let mut from_bytes = vec![];
    for input in inputs {
        let status = match input.request {
            Ok(r) => {
                let media = r.image.as_ref().or(r.video.as_ref().map(|v| &v.media));
                from_bytes.push(media.is_some_and(|m| matches!(m.source, MediaSource::Bytes(_))));
                reqs.push(r);
                None
            }
            Err(s) => Some(s),
        };
        // The row as it is before the answer: the backend's model and space,
        // the size asked for.
        let row = Row {
            uri: input.uri,
            content_type: input.content_type,
            size_bytes: input.size_bytes,
            generation: input.generation,
            etag: input.etag,
            updated: input.updated,
            embedding: None,
            status: String::new(),
            video_start_sec: None,
            video_end_sec: None,
            model: info.model_id.clone(),
            space: info.space.as_str().to_string(),
            dimension: Some(dimension.map_or(info.native_dimension as i32, |d| d as i32)),
            carried: input.carried,
        };
        planned.push((row, status));
    }
    let n_reqs = reqs.len();
    let mut from_bytes = from_bytes.into_iter();
    let mut results = if reqs.is_empty() {
        vec![]
    } else {
        embedder.embed_batch(reqs).await
    }
    .into_iter();
    let mut rows = vec![];
    for (index, (mut row, status)) in planned.into_iter().enumerate() {
        let result = match status {
            Some(status) => Err(status),
            None => match (results.next(), from_bytes.next()) {
                (Some(Err(EmbedError::MediaDecode { reason, .. })), Some(true)) => {
                    Err(format!("cannot decode {}: {reason}", row.uri))
                }
                (Some(r), _) => r.map_err(|e| e.to_string()),
                (None, _) => Err(format!(
                    "the backend returned fewer results than the {n_reqs} requests sent"
                )),
            },
        };
        match result {
            Err(status) => {
                row.status = status;
                rows.push((index, row));
            }
            Ok(e) => {
                row.model = e.model.clone();
                row.space = e.space.as_str().to_string();
                row.dimension = Some(e.dimension as i32);
                if let Some(v) = e.image {
                    row.embedding = Some(v);
                    rows.push((index, row));
                } else if e.video.is_empty() {
                    row.status = "the backend returned no vector for this input".into();
                    rows.push((index, row));
                } else {
                    for s in e.video {
                        let mut r = row.clone();
                        r.video_start_sec = Some(s.start_sec);
                        r.video_end_sec = Some(s.end_sec);
                        match s.error {
                            Some(err) => r.status = err,
                            None => r.embedding = Some(s.embedding),
                        }
                        rows.push((index, r));
                    }
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_by_extension() {
        assert_eq!(content_type("a/b.JPG"), Some(("image/jpeg", Kind::Image)));
        assert_eq!(
            content_type("https://h/x.webm?sig=1"),
            Some(("video/webm", Kind::Video))
        );
        assert_eq!(content_type("x.txt"), None);
        assert_eq!(content_type("noext"), None);
    }

    #[test]
    fn unsupported_names_fail_before_the_model() {
        let i = RowInput::new("notes.txt", vec![1u8, 2], None, None);
        assert_eq!(i.content_type, "application/octet-stream");
        assert!(i.request.unwrap_err().contains("unsupported file type"));
        let i = RowInput::new("a.png", vec![1u8], None, Some(128));
        let req = i.request.unwrap();
        assert_eq!(req.dimension, Some(128));
        assert_eq!(
            req.image.unwrap().mime_type.as_deref(),
            Some("image/png"),
            "the type comes from the name"
        );
    }
}
