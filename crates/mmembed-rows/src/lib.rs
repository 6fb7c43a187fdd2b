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
use mmembed_store::{ObjectInfo, StoreError, Stores};
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

/// What a file holds: a still image or a video.
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
    ("ico", "image/vnd.microsoft.icon", Kind::Image),
    ("heic", "image/heic", Kind::Image),
    ("heif", "image/heif", Kind::Image),
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

/// Other names stores and uploaders give the supported types, and the
/// extension whose type each is.
const ALIASES: &[(&str, &str)] = &[
    ("image/jpg", "jpg"),
    ("image/pjpeg", "jpg"),
    ("image/x-png", "png"),
    ("image/x-ms-bmp", "bmp"),
    ("image/x-bmp", "bmp"),
    ("image/x-icon", "ico"),
    ("video/x-m4v", "m4v"),
    ("video/avi", "avi"),
    ("video/msvideo", "avi"),
    ("video/matroska", "mkv"),
    ("video/x-mpeg", "mpg"),
];

/// The MIME type and kind for a file name, if its extension is a
/// supported type's.
pub fn content_type(name: &str) -> Option<(&'static str, Kind)> {
    by_extension(&extension(name)?)
}

fn by_extension(ext: &str) -> Option<(&'static str, Kind)> {
    let ext = ext.to_ascii_lowercase();
    TYPES
        .iter()
        .find(|(e, _, _)| *e == ext)
        .map(|(_, ct, k)| (*ct, *k))
}

/// A name's extension: what follows its last dot, unless that is only
/// digits (`frame.000123`, `scan.2024`: a sequence number or a date, not a
/// type).
fn extension(name: &str) -> Option<String> {
    // Query strings of URLs are not part of the extension.
    let name = name.split(['?', '#']).next().unwrap_or(name);
    let ext = Path::new(name).extension()?.to_str()?;
    (!ext.bytes().all(|b| b.is_ascii_digit())).then(|| ext.to_string())
}

/// The supported type a declared MIME type (a bucket's `Content-Type`, an
/// object table's `content_type`) names: case and parameters ignored,
/// common aliases (`image/jpg`, `video/avi`) accepted.
pub fn declared_type(declared: &str) -> Option<(&'static str, Kind)> {
    let mime = declared.split(';').next()?.trim().to_ascii_lowercase();
    if let Some(t) = TYPES.iter().find(|(_, ct, _)| *ct == mime) {
        return Some((t.1, t.2));
    }
    let (_, ext) = ALIASES.iter().find(|(alias, _)| *alias == mime)?;
    by_extension(ext)
}

/// An object's type from what is known without reading it: the type
/// declared for it when that is a supported one (BigQuery's object tables
/// type objects by their `content_type`), else its name's extension.
///
/// ```
/// use mmembed_rows::{Kind, media_type};
///
/// // An object without an extension, typed by its bucket metadata:
/// assert_eq!(media_type("s3://b/u/3f2a", Some("image/JPEG")), Some(("image/jpeg", Kind::Image)));
/// // A generic declared type leaves the extension to say:
/// assert_eq!(
///     media_type("gs://b/a.mp4", Some("application/octet-stream")),
///     Some(("video/mp4", Kind::Video))
/// );
/// assert_eq!(media_type("gs://b/notes.txt", None), None);
/// ```
pub fn media_type(name: &str, declared: Option<&str>) -> Option<(&'static str, Kind)> {
    declared
        .and_then(declared_type)
        .or_else(|| content_type(name))
}

/// Whether an object whose [`media_type`] is unknown is worth reading to
/// look at its first bytes: its name has no extension and nothing more
/// specific than `application/octet-stream` was declared for it (uploads
/// named by a hash or a number). A name with an unsupported extension
/// (`notes.txt`, `meta.json`) or a declared type that is not an image or
/// video (`text/plain`) is not read: a bucket's sidecar files cost no
/// request.
pub fn worth_sniffing(name: &str, declared: Option<&str>) -> bool {
    declared.is_none_or(mmembed_core::is_generic_type) && extension(name).is_none()
}

/// How many first bytes [`sniff`] looks at.
pub const SNIFF_LEN: usize = 512;

/// The supported type an object's first bytes (up to [`SNIFF_LEN`]) say it
/// is, by their magic numbers: PNG, JPEG, GIF, BMP, WebP, TIFF, MP4/M4V,
/// QuickTime, 3GP, AVI, FLV, Matroska, WebM, WMV, MPEG.
///
/// ```
/// use mmembed_rows::{Kind, sniff};
///
/// assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), Some(("image/png", Kind::Image)));
/// assert_eq!(sniff(b"hello"), None);
/// ```
pub fn sniff(head: &[u8]) -> Option<(&'static str, Kind)> {
    let head = &head[..head.len().min(SNIFF_LEN)];
    // `infer` knows the ISO media brands of MP4 but not 3GPP's.
    if head.len() >= 12 && &head[4..8] == b"ftyp" && matches!(&head[8..11], b"3gp" | b"3g2") {
        return by_extension("3gp");
    }
    by_extension(infer::get(head)?.extension())
}

/// The supported type of the file at `path` by its first bytes; `None`
/// when they are no supported format's.
pub fn sniff_file(path: &Path) -> std::io::Result<Option<(&'static str, Kind)>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(SNIFF_LEN);
    std::fs::File::open(path)?
        .take(SNIFF_LEN as u64)
        .read_to_end(&mut head)?;
    Ok(sniff(&head))
}

/// The type of a remote object as jobs type one: by `declared` (else the
/// type the store declares for it) or its name, else by its first bytes
/// when it is [`worth_sniffing`] (one request, abandoned after them).
/// `None` when nothing says a supported type.
pub async fn object_type(
    info: &ObjectInfo,
    declared: Option<&str>,
) -> Result<Option<(&'static str, Kind)>, StoreError> {
    let declared = declared.or(info.content_type.as_deref());
    if let Some(t) = media_type(&info.uri, declared) {
        return Ok(Some(t));
    }
    if !worth_sniffing(&info.uri, declared) {
        return Ok(None);
    }
    let head = Stores::shared().read_head(info, SNIFF_LEN).await?;
    Ok(sniff(&head))
}

/// A store failure as a row's status.
pub fn store_status(e: &StoreError) -> String {
    match e {
        StoreError::Transport { .. } => format!("{e} (after retries)"),
        _ => e.to_string(),
    }
}

/// [`RowInput::remote`] for many objects, up to 16 at a time, in order.
pub async fn remote_inputs(
    objects: Vec<(String, Option<String>)>,
    segments: Option<VideoSegmentConfig>,
    dimension: Option<u32>,
) -> Vec<RowInput> {
    use futures::StreamExt;
    futures::stream::iter(objects)
        .map(|(uri, declared)| async move {
            RowInput::remote(uri, declared.as_deref(), segments, dimension).await
        })
        .buffered(16)
        .collect()
        .await
}

/// The supported extensions, for error messages.
pub fn supported_extensions() -> String {
    TYPES.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
}

/// The status of an object whose type is not a supported one: by its
/// name's extension, its declared type (when it had one), nor (when they
/// were read) its first bytes.
pub fn unsupported_type_status(declared: Option<&str>) -> String {
    let declared = declared.map(str::trim).filter(|d| !d.is_empty());
    match declared {
        Some(d) => format!(
            "unsupported file type (content type {d:?}; supported extensions: {})",
            supported_extensions()
        ),
        None => format!(
            "unsupported file type (supported extensions: {})",
            supported_extensions()
        ),
    }
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
    /// The supported MIME type the object was taken for ([`media_type`],
    /// [`sniff`]); for an unsupported object its declared type, else
    /// `application/octet-stream`.
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
    /// An object named `uri` whose bytes come from `media`, with the MIME
    /// type declared for it if any (a bucket's `Content-Type`, an object
    /// table's `content_type`): the request is an image or a video (split
    /// into segments by `segments`) by its [`media_type`], or for a name
    /// without an extension by its first bytes ([`sniff`]; bytes and files
    /// are looked at, URIs are not); a failed row for an unsupported type.
    pub fn new(
        uri: impl Into<String>,
        media: impl Into<Media>,
        declared: Option<&str>,
        segments: Option<VideoSegmentConfig>,
        dimension: Option<u32>,
    ) -> Self {
        let uri = uri.into();
        let mut media = media.into();
        let declared = declared.map(str::trim).filter(|d| !d.is_empty());
        let untyped = declared.unwrap_or("application/octet-stream");
        let empty = matches!(&media.source, MediaSource::Bytes(b) if b.is_empty());
        let typed = match media_type(&uri, declared) {
            Some(t) => Some(t),
            None if !worth_sniffing(&uri, declared) => None,
            None if empty => return Self::failed(uri.clone(), untyped, empty_status(&uri)),
            None => match &media.source {
                MediaSource::Bytes(b) => sniff(b),
                MediaSource::Path(p) => match sniff_file(p) {
                    Ok(t) => t,
                    Err(e) => {
                        let status = format!("cannot read {}: {e}", p.display());
                        return Self::failed(uri, untyped, status);
                    }
                },
                _ => None,
            },
        };
        let Some((ct, kind)) = typed else {
            return Self::unsupported(uri, declared);
        };
        if empty {
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

    /// A file on this machine, named `uri` in the rows (typed as by
    /// [`new`](Self::new)): its size and
    /// modification time recorded, or a failed row when it cannot be read.
    pub fn file(
        uri: impl Into<String>,
        path: &Path,
        declared: Option<&str>,
        segments: Option<VideoSegmentConfig>,
        dimension: Option<u32>,
    ) -> Self {
        let mut input = Self::new(uri, path.to_path_buf(), declared, segments, dimension);
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

    /// A remote object that the backend reads by its URI (`gs://`, `s3://`,
    /// `az://`, `http(s)://`), typed as [`new`](Self::new) types it; when
    /// its name and `declared` say nothing, typed by [`object_type`] (its
    /// metadata, then perhaps its first bytes), its identity recorded.
    pub async fn remote(
        uri: String,
        declared: Option<&str>,
        segments: Option<VideoSegmentConfig>,
        dimension: Option<u32>,
    ) -> Self {
        let declared = declared.map(str::trim).filter(|d| !d.is_empty());
        if media_type(&uri, declared).is_some() || !worth_sniffing(&uri, declared) {
            let source = MediaSource::Uri(uri.clone());
            return Self::new(uri, source, declared, segments, dimension);
        }
        match Stores::shared().head(&uri).await {
            Ok(info) => Self::object(uri, &info, declared, segments, dimension).await,
            Err(e) => {
                let untyped = declared.unwrap_or("application/octet-stream");
                Self::failed(uri, untyped, store_status(&e))
            }
        }
    }

    /// The remote object `uri` as its listing or metadata `info` describes
    /// it, read by the backend by its URI: typed by [`object_type`], its
    /// identity recorded.
    pub async fn object(
        uri: String,
        info: &ObjectInfo,
        declared: Option<&str>,
        segments: Option<VideoSegmentConfig>,
        dimension: Option<u32>,
    ) -> Self {
        let declared = declared.or(info.content_type.as_deref());
        let mut input = match object_type(info, declared).await {
            Ok(Some((ct, _))) => {
                let source = MediaSource::Uri(uri.clone());
                Self::new(uri, source, Some(ct), segments, dimension)
            }
            Ok(None) => Self::unsupported(uri, declared),
            Err(e) => {
                let untyped = declared.unwrap_or("application/octet-stream");
                return Self::failed(uri, untyped, store_status(&e));
            }
        };
        input.size_bytes = i64::try_from(info.size).ok();
        input.generation = info.generation.clone();
        input.etag = info.etag.clone();
        input.updated = info.updated;
        input
    }

    /// An object of no supported type (by [`media_type`] or [`sniff`]):
    /// a failed row that keeps the type declared for it.
    pub fn unsupported(uri: impl Into<String>, declared: Option<&str>) -> Self {
        let declared = declared.map(str::trim).filter(|d| !d.is_empty());
        let ct = declared.unwrap_or("application/octet-stream");
        Self::failed(uri, ct, unsupported_type_status(declared))
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
        let i = RowInput::new("notes.txt", vec![1u8, 2], None, None, None);
        assert_eq!(i.content_type, "application/octet-stream");
        assert!(i.request.unwrap_err().contains("unsupported file type"));
        let i = RowInput::new("a.png", vec![1u8], None, None, Some(128));
        let req = i.request.unwrap();
        assert_eq!(req.dimension, Some(128));
        assert_eq!(
            req.image.unwrap().mime_type.as_deref(),
            Some("image/png"),
            "the type comes from the name"
        );
    }

    #[test]
    fn declared_types_win_over_extensions_and_accept_aliases() {
        for (declared, want) in [
            ("image/jpeg", Some("image/jpeg")),
            ("IMAGE/JPG", Some("image/jpeg")),
            ("image/png; charset=binary", Some("image/png")),
            (" video/avi ", Some("video/x-msvideo")),
            ("video/x-m4v", Some("video/mp4")),
            ("video/matroska", Some("video/x-matroska")),
            ("image/x-icon", Some("image/vnd.microsoft.icon")),
            ("image/heic", Some("image/heic")),
            ("image/avif", None),
            ("application/octet-stream", None),
            ("", None),
        ] {
            assert_eq!(declared_type(declared).map(|t| t.0), want, "{declared:?}");
        }
        assert_eq!(
            media_type("gs://b/clip.mp4", Some("image/png")),
            Some(("image/png", Kind::Image)),
            "an object table's type decides, as in BigQuery"
        );
        assert_eq!(
            media_type("gs://b/clip.mp4", Some("text/plain")),
            Some(("video/mp4", Kind::Video)),
            "an unsupported declared type leaves the extension to say"
        );
        assert_eq!(
            media_type("gs://b/3f2a", Some("image/webp")).unwrap().1,
            Kind::Image
        );
    }

    #[test]
    fn only_names_without_an_extension_and_a_specific_type_are_sniffed() {
        assert!(worth_sniffing("s3://b/uploads/3f2a9c", None));
        assert!(worth_sniffing(
            "s3://b/uploads/3f2a9c",
            Some("binary/octet-stream")
        ));
        assert!(worth_sniffing("frames/frame.000123", Some("")));
        assert!(worth_sniffing("https://h/p/abc?x=y.json", None));
        assert!(!worth_sniffing("gs://b/meta.json", None));
        assert!(!worth_sniffing("gs://b/3f2a9c", Some("text/plain")));
        assert_eq!(content_type("scan.2024"), None);
    }

    /// The committed fixtures of every format the decoders are tested on,
    /// named without their extension, are told by their first bytes.
    #[test]
    fn first_bytes_tell_the_formats_of_the_fixtures() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures");
        let mut seen = 0;
        for dir in ["jpeg", "images", "bad-input", "ico-bmp"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for e in entries {
                let path = e.unwrap().path();
                let name = path.to_string_lossy().to_string();
                let Some((want, _)) = content_type(&name) else {
                    continue;
                };
                let got = sniff_file(&path).unwrap();
                assert_eq!(got.map(|t| t.0), Some(want), "{name}");
                seen += 1;
            }
        }
        assert!(
            seen >= 20,
            "found only {seen} fixtures under {}",
            root.display()
        );
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"not an image at all"), None);
        let mut three_gp = b"\0\0\0\x18ftyp3gp4\0\0\0\0".to_vec();
        three_gp.resize(64, 0);
        assert_eq!(sniff(&three_gp), Some(("video/3gpp", Kind::Video)));
    }

    #[test]
    fn names_without_an_extension_are_typed_by_their_bytes() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01".to_vec();
        let i = RowInput::new("s3://b/u/3f2a", png.clone(), None, None, None);
        assert_eq!(i.content_type, "image/png");
        assert!(i.request.unwrap().image.is_some());
        // Declared types are believed without a look.
        let i = RowInput::new("s3://b/u/3f2a", png.clone(), Some("video/mp4"), None, None);
        assert!(i.request.unwrap().video.is_some());
        // A specific unsupported type is not second-guessed, and is kept.
        let i = RowInput::new("s3://b/u/3f2a", png.clone(), Some("text/plain"), None, None);
        assert_eq!(i.content_type, "text/plain");
        let status = i.request.unwrap_err();
        assert!(status.contains("content type \"text/plain\""), "{status}");
        let i = RowInput::new("s3://b/u/3f2a", b"plain text".to_vec(), None, None, None);
        assert_eq!(i.content_type, "application/octet-stream");
        assert!(i.request.unwrap_err().contains("unsupported file type"));
        let i = RowInput::new("s3://b/u/3f2a", Vec::<u8>::new(), None, None, None);
        assert!(i.request.unwrap_err().contains("it is empty"));
        // URIs the backend reads are not fetched to be looked at.
        let uri = MediaSource::Uri("gs://b/u/3f2a".into());
        let i = RowInput::new("gs://b/u/3f2a", uri, None, None, None);
        assert!(i.request.unwrap_err().contains("unsupported file type"));

        let dir = std::env::temp_dir().join(format!("mmembed-rows-sniff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("IMG_0001");
        std::fs::write(&file, &png).unwrap();
        let i = RowInput::file("IMG_0001", &file, None, None, None);
        assert_eq!(
            (i.content_type.as_str(), i.size_bytes),
            ("image/png", Some(png.len() as i64))
        );
        assert!(i.request.is_ok());
        let i = RowInput::file("gone", &dir.join("gone"), None, None, None);
        assert!(i.request.unwrap_err().starts_with("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
