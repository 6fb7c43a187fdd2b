//! Requests, responses and what a backend says about itself.

use std::fmt;
use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{EmbedError, Segment, VideoSegmentConfig};

/// A kind of input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// Free text.
    Text,
    /// A still image.
    Image,
    /// A video, embedded per time segment.
    Video,
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Image => "image",
            Self::Video => "video",
        })
    }
}

/// Where media bytes come from.
#[derive(Clone, PartialEq, Eq)]
pub enum MediaSource {
    /// The bytes themselves.
    Bytes(Bytes),
    /// A file on the local machine.
    Path(PathBuf),
    /// A URI a backend may resolve itself (`gs://` for Vertex).
    Uri(String),
}

impl fmt::Debug for MediaSource {
    // Media can be megabytes: show its size, not its content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Self::Path(p) => f.debug_tuple("Path").field(p).finish(),
            Self::Uri(u) => f.debug_tuple("Uri").field(u).finish(),
        }
    }
}

impl MediaSource {
    /// A short human description for error messages: the path, the URI, or
    /// "`<kind>` bytes".
    pub fn describe(&self, kind: Modality) -> String {
        match self {
            Self::Bytes(b) => format!("{kind} bytes ({} bytes)", b.len()),
            Self::Path(p) => p.display().to_string(),
            Self::Uri(u) => u.clone(),
        }
    }
}

impl From<Bytes> for MediaSource {
    fn from(b: Bytes) -> Self {
        Self::Bytes(b)
    }
}

impl From<Vec<u8>> for MediaSource {
    fn from(b: Vec<u8>) -> Self {
        Self::Bytes(Bytes::from(b))
    }
}

impl From<PathBuf> for MediaSource {
    fn from(p: PathBuf) -> Self {
        Self::Path(p)
    }
}

impl From<&std::path::Path> for MediaSource {
    fn from(p: &std::path::Path) -> Self {
        Self::Path(p.to_path_buf())
    }
}

/// Whether a declared content type says nothing about what an object is:
/// none, `application/octet-stream` and its kin, which stores give objects
/// uploaded without one. Such an object is typed by its name or its bytes.
///
/// ```
/// use mmembed_core::is_generic_type;
///
/// assert!(is_generic_type("application/octet-stream"));
/// assert!(is_generic_type(" Binary/Octet-Stream; charset=binary"));
/// assert!(!is_generic_type("image/png"));
/// assert!(!is_generic_type("text/plain"));
/// ```
pub fn is_generic_type(content_type: &str) -> bool {
    let mime = content_type.split(';').next().unwrap_or("").trim();
    [
        "",
        "application/octet-stream",
        "binary/octet-stream",
        "application/unknown",
    ]
    .iter()
    .any(|g| mime.eq_ignore_ascii_case(g))
}

/// An image or video input: its source and, optionally, its MIME type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// Where the bytes come from.
    pub source: MediaSource,
    /// MIME type if known (`image/png`, `video/mp4`); decoders sniff the
    /// content anyway, so this is a hint for remote services.
    pub mime_type: Option<String>,
}

impl<T: Into<MediaSource>> From<T> for Media {
    fn from(source: T) -> Self {
        Self {
            source: source.into(),
            mime_type: None,
        }
    }
}

/// A video input and how to cut it into segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoInput {
    /// The video.
    pub media: Media,
    /// Segment config; `None` means Vertex's defaults (0, 120, 16).
    pub segment_config: Option<VideoSegmentConfig>,
}

/// One embedding request: the counterpart of one Vertex instance.
///
/// Any mix of text, image and video; at least one. Each input present gets
/// its own vector(s) in the [`Embeddings`] answer.
///
/// ```
/// use mmembed_core::EmbedRequest;
/// let req = EmbedRequest::text("a photo of a cat").with_dimension(512);
/// assert!(req.validate().is_ok());
/// assert!(EmbedRequest::default().validate().is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmbedRequest {
    /// Text to embed.
    pub text: Option<String>,
    /// Image to embed.
    pub image: Option<Media>,
    /// Video to embed, per segment.
    pub video: Option<VideoInput>,
    /// Output size for text and image vectors; `None` is the model's native
    /// size. Not allowed together with a video (video vectors have a fixed size).
    pub dimension: Option<u32>,
}

impl EmbedRequest {
    /// A text-only request.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            ..Self::default()
        }
    }

    /// An image-only request.
    pub fn image(image: impl Into<Media>) -> Self {
        Self {
            image: Some(image.into()),
            ..Self::default()
        }
    }

    /// A video-only request with the given segment config (`None`: defaults).
    pub fn video(video: impl Into<Media>, segment_config: Option<VideoSegmentConfig>) -> Self {
        Self {
            video: Some(VideoInput {
                media: video.into(),
                segment_config,
            }),
            ..Self::default()
        }
    }

    /// Adds or replaces the text.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Adds or replaces the image.
    pub fn with_image(mut self, image: impl Into<Media>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// Sets the output dimension.
    pub fn with_dimension(mut self, dimension: u32) -> Self {
        self.dimension = Some(dimension);
        self
    }

    /// The modalities present, in text, image, video order.
    pub fn modalities(&self) -> Vec<Modality> {
        let mut m = Vec::with_capacity(3);
        if self.text.is_some() {
            m.push(Modality::Text);
        }
        if self.image.is_some() {
            m.push(Modality::Image);
        }
        if self.video.is_some() {
            m.push(Modality::Video);
        }
        m
    }

    /// Checks what every backend requires, before any work: at least one
    /// input, non-blank text, no dimension with a video, a valid segment
    /// config.
    pub fn validate(&self) -> Result<(), EmbedError> {
        if self.text.is_none() && self.image.is_none() && self.video.is_none() {
            return Err(EmbedError::invalid(
                "request",
                "has no text, image or video; give at least one",
            ));
        }
        if let Some(t) = &self.text
            && t.trim().is_empty()
        {
            return Err(EmbedError::invalid(
                "text",
                "is empty or only whitespace; leave `text` out instead",
            ));
        }
        if let Some(v) = &self.video {
            if self.dimension.is_some() {
                return Err(EmbedError::invalid(
                    "dimension",
                    "cannot be set together with a video: video embeddings have a fixed size",
                ));
            }
            if let Some(cfg) = &v.segment_config {
                cfg.range()?;
            }
        }
        let media = [self.image.as_ref(), self.video.as_ref().map(|v| &v.media)];
        for m in media.into_iter().flatten() {
            if let MediaSource::Bytes(b) = &m.source
                && b.is_empty()
            {
                return Err(EmbedError::invalid("media", "has zero bytes"));
            }
        }
        Ok(())
    }
}

/// One embedded time segment of a video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentEmbedding {
    /// Where the segment starts, in seconds.
    pub start_sec: f64,
    /// Where it ends (the last one is clipped to the video's length).
    pub end_sec: f64,
    /// The vector (empty when `error` is set).
    pub embedding: Vec<f32>,
    /// Why this segment has no vector (e.g. a corrupt stretch of the video),
    /// while the others of the same video do. `None` on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SegmentEmbedding {
    /// The time range as a [`Segment`].
    pub fn segment(&self) -> Segment {
        Segment {
            start_sec: self.start_sec,
            end_sec: self.end_sec,
        }
    }
}

/// Identity of an embedding space. Vectors are comparable only within one
/// space; two different models never share one, even at the same size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SpaceId(pub String);

impl SpaceId {
    /// A space id from any string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The space of a combination of backends that was explicitly allowed
    /// to mix two spaces (each result says which one it is in).
    pub fn mixed(a: &SpaceId, b: &SpaceId) -> Self {
        Self(format!("{MIXED}{a},{b})"))
    }

    /// Whether this is a [`SpaceId::mixed`] space: its vectors are in
    /// several spaces, so no one space can be checked against it.
    ///
    /// ```
    /// use mmembed_core::SpaceId;
    /// let (a, b) = (SpaceId::new("clip-blake3:1f"), SpaceId::new("vertex:m"));
    /// assert!(SpaceId::mixed(&a, &b).is_mixed());
    /// assert!(!a.is_mixed());
    /// ```
    pub fn is_mixed(&self) -> bool {
        self.0.starts_with(MIXED)
    }
}

const MIXED: &str = "mixed(";

impl fmt::Display for SpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The answer to one [`EmbedRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    /// Vector for the request's text.
    pub text: Option<Vec<f32>>,
    /// Vector for the request's image.
    pub image: Option<Vec<f32>>,
    /// One vector per video segment, in time order.
    pub video: Vec<SegmentEmbedding>,
    /// Size of every vector in this answer.
    pub dimension: usize,
    /// The space these vectors live in.
    pub space: SpaceId,
    /// The model that made them.
    pub model: String,
    /// The backend that ran the model.
    pub backend: String,
}

/// What a backend is and can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedderInfo {
    /// Backend name (`local`, `vertex`, ...).
    pub backend: String,
    /// Model id (a hub id, a directory, `multimodalembedding@001`).
    pub model_id: String,
    /// Space id of the vectors it makes.
    pub space: SpaceId,
    /// Vector size when no dimension is requested.
    pub native_dimension: usize,
    /// Sizes a request may ask for.
    pub supported_dimensions: Vec<u32>,
    /// Input kinds it accepts.
    pub modalities: Vec<Modality>,
    /// Text longer than this many tokens is truncated (`None`: unknown).
    pub max_text_tokens: Option<usize>,
}

impl EmbedderInfo {
    /// Checks a request against what this backend supports: modalities and
    /// dimension. Backends call it before doing any work.
    pub fn check(&self, req: &EmbedRequest) -> Result<(), EmbedError> {
        for m in req.modalities() {
            if !self.modalities.contains(&m) {
                return Err(EmbedError::UnsupportedModality {
                    modality: m,
                    backend: self.backend.clone(),
                });
            }
        }
        match req.dimension {
            Some(d) => self.check_dimension(d),
            None => Ok(()),
        }
    }

    /// Whether this backend can make vectors of size `d`; a job checks its
    /// dimension once up front rather than failing every row with it.
    pub fn check_dimension(&self, d: u32) -> Result<(), EmbedError> {
        if self.supported_dimensions.contains(&d) {
            return Ok(());
        }
        Err(EmbedError::UnsupportedDimension {
            requested: d,
            supported: self.supported_dimensions.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> EmbedderInfo {
        EmbedderInfo {
            backend: "local".into(),
            model_id: "m".into(),
            space: SpaceId::new("s"),
            native_dimension: 512,
            supported_dimensions: vec![512],
            modalities: vec![Modality::Text, Modality::Image],
            max_text_tokens: Some(77),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let field = |r: EmbedRequest| match r.validate() {
            Err(EmbedError::InvalidInput { field, .. }) => field,
            other => panic!("expected invalid input, got {other:?}"),
        };
        assert_eq!(field(EmbedRequest::default()), "request");
        assert_eq!(field(EmbedRequest::text("  \n")), "text");
        assert_eq!(
            field(EmbedRequest::video(Vec::new(), None).with_dimension(128)),
            "dimension"
        );
        assert_eq!(field(EmbedRequest::image(Vec::new())), "media");
        let bad_interval = VideoSegmentConfig {
            interval_sec: Some(2),
            ..Default::default()
        };
        assert_eq!(
            field(EmbedRequest::video(vec![1u8], Some(bad_interval))),
            "video.segment_config.interval_sec"
        );
    }

    #[test]
    fn check_refuses_missing_modality_and_dimension() {
        let i = info();
        assert!(i.check(&EmbedRequest::text("x")).is_ok());
        assert!(matches!(
            i.check(&EmbedRequest::video(vec![1u8], None)),
            Err(EmbedError::UnsupportedModality {
                modality: Modality::Video,
                ..
            })
        ));
        match i.check(&EmbedRequest::text("x").with_dimension(1408)) {
            Err(EmbedError::UnsupportedDimension {
                requested,
                supported,
            }) => {
                assert_eq!((requested, supported), (1408, vec![512]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn debug_of_bytes_shows_size_not_content() {
        let s = format!("{:?}", MediaSource::from(vec![7u8; 1000]));
        assert_eq!(s, "Bytes(1000 bytes)");
    }
}
