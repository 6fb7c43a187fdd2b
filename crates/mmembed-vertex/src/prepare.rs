//! From an `EmbedRequest` to the JSON request(s) Vertex accepts: media
//! encoding and transcoding, and long-video windowing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mmembed_core::{EmbedError, EmbedRequest, Media, MediaSource, Modality, VideoSegmentConfig};
use mmembed_media::image_crate::ImageFormat;
use mmembed_media::{encode_for_upload, read_media};

use crate::wire::{Instance, MediaJson, Parameters, PredictRequest, VideoJson};

/// Dimensions the service produces for text and image.
pub const DIMENSIONS: [u32; 4] = [128, 256, 512, 1408];
/// The service's default (and video's only) dimension.
pub const NATIVE_DIMENSION: u32 = 1408;
/// Text beyond this many tokens is truncated by the service.
pub const MAX_TEXT_TOKENS: usize = 32;
/// Most seconds of video the service analyses per request.
pub const MAX_VIDEO_SPAN: u32 = VideoSegmentConfig::MAX_SPAN_SEC;
/// Largest video read from a local file or bytes.
const MAX_VIDEO_BYTES: u64 = 2 << 30;
/// Largest image read before any transcoding.
const MAX_IMAGE_INPUT_BYTES: u64 = 200 << 20;

fn gcs_or_error(u: &str, field: &str) -> Result<String, EmbedError> {
    if u.starts_with("gs://") && u.len() > 5 {
        Ok(u.to_string())
    } else {
        Err(EmbedError::invalid(
            field,
            format!(
                "`{u}`: Vertex reads gs:// URIs itself; other URIs are not supported (pass bytes or a path)"
            ),
        ))
    }
}

/// How the service can take an image in GCS, by the type it has here (its
/// declared MIME type, else its name's extension). The service reads BMP,
/// GIF, JPEG and PNG from a `gcsUri`, but its `mimeType` may name only JPEG
/// and PNG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GcsImage {
    /// JPEG or PNG: the URI, with this `mimeType`.
    Typed(&'static str),
    /// BMP, GIF, or a type not known here: the URI alone, for the service
    /// to read (or refuse) as it finds it.
    Untyped,
    /// A format the service does not read (WebP, TIFF, ICO, HEIC, ...):
    /// fetched here, and sent as PNG bytes (HEIC as JPEG).
    Fetch,
}

fn gcs_image(uri: &str, declared: Option<&str>) -> GcsImage {
    /// A type by the image crate's tables, or HEIC, which they lack.
    enum Type {
        Known(ImageFormat),
        Heic,
    }
    let by_mime = |m: &str| match m {
        "image/heic" | "image/heif" => Some(Type::Heic),
        m => ImageFormat::from_mime_type(m).map(Type::Known),
    };
    let by_extension = |e: &str| match e {
        "heic" | "heif" => Some(Type::Heic),
        e => ImageFormat::from_extension(e).map(Type::Known),
    };
    let declared = declared
        .and_then(|d| d.split(';').next())
        .map(|d| d.trim().to_ascii_lowercase());
    let name = uri.split(['?', '#']).next().unwrap_or(uri);
    let extension = std::path::Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let known = declared
        .as_deref()
        .and_then(by_mime)
        .or_else(|| extension.as_deref().and_then(by_extension));
    match known {
        Some(Type::Known(ImageFormat::Jpeg)) => GcsImage::Typed("image/jpeg"),
        Some(Type::Known(ImageFormat::Png)) => GcsImage::Typed("image/png"),
        Some(Type::Known(ImageFormat::Bmp | ImageFormat::Gif)) | None => GcsImage::Untyped,
        Some(Type::Known(_) | Type::Heic) => GcsImage::Fetch,
    }
}

/// Replaces media the service cannot read itself by their bytes: those in
/// object stores other than GCS (`s3://`, `az://`, `http(s)://`), and
/// images in GCS of a format it does not read (WebP, TIFF, ICO, HEIC; see
/// [`GcsImage`]). Other `gs://` URIs stay as they are and go to the
/// service as `gcsUri`.
pub(crate) async fn fetch_unreadable(req: &mut EmbedRequest) -> Result<(), EmbedError> {
    let fetch = async |m: &mut Media, kind: Modality, max: u64| -> Result<(), EmbedError> {
        if let MediaSource::Uri(u) = &m.source
            && (!u.starts_with("gs://")
                || (kind == Modality::Image
                    && gcs_image(u, m.mime_type.as_deref()) == GcsImage::Fetch))
            && let Some(b) = mmembed_media::fetch_remote(&m.source, kind, max).await?
        {
            m.source = MediaSource::Bytes(b);
        }
        Ok(())
    };
    if let Some(m) = req.image.as_mut() {
        fetch(m, Modality::Image, MAX_IMAGE_INPUT_BYTES).await?;
    }
    if let Some(v) = req.video.as_mut() {
        fetch(&mut v.media, Modality::Video, MAX_VIDEO_BYTES).await?;
    }
    Ok(())
}

/// Encodes an image for the request: JPEG and PNG within the limit go as they
/// are (with their MIME type); BMP, GIF, WebP, TIFF and ICO are transcoded to PNG,
/// HEIC to JPEG
/// (the service's `mimeType` knows only JPEG and PNG); larger images are
/// downscaled and re-encoded, or rejected when even that does not fit.
pub(crate) fn image_json(m: &Media, max_bytes: usize) -> Result<MediaJson, EmbedError> {
    if let MediaSource::Uri(u) = &m.source
        && !u.starts_with("file://")
    {
        let gcs_uri = gcs_or_error(u, "image")?;
        let mime_type = match gcs_image(u, m.mime_type.as_deref()) {
            GcsImage::Typed(t) => Some(t.to_string()),
            GcsImage::Untyped => None,
            GcsImage::Fetch => {
                return Err(EmbedError::invalid(
                    "image",
                    format!(
                        "`{u}` is of a format Vertex does not read from GCS; \
                         fetch it first (the client does)"
                    ),
                ));
            }
        };
        return Ok(MediaJson {
            bytes_base64_encoded: None,
            gcs_uri: Some(gcs_uri),
            mime_type,
        });
    }
    let what = m.source.describe(Modality::Image);
    let bytes = read_media(&m.source, Modality::Image, MAX_IMAGE_INPUT_BYTES)?;
    // The service's `mimeType` knows only JPEG and PNG.
    let up = encode_for_upload(
        &bytes,
        &what,
        max_bytes,
        &[ImageFormat::Png, ImageFormat::Jpeg],
    )?;
    Ok(MediaJson {
        bytes_base64_encoded: Some(B64.encode(&up.bytes)),
        gcs_uri: None,
        mime_type: Some(up.mime_type.into()),
    })
}

fn video_media_json(m: &Media) -> Result<MediaJson, EmbedError> {
    if let MediaSource::Uri(u) = &m.source
        && !u.starts_with("file://")
    {
        return Ok(MediaJson {
            bytes_base64_encoded: None,
            gcs_uri: Some(gcs_or_error(u, "video")?),
            mime_type: m.mime_type.clone(),
        });
    }
    let bytes = read_media(&m.source, Modality::Video, MAX_VIDEO_BYTES)?;
    Ok(MediaJson {
        bytes_base64_encoded: Some(B64.encode(&bytes)),
        gcs_uri: None,
        mime_type: m.mime_type.clone(),
    })
}

/// The segment configs to send for a video: the caller's own when it spans
/// at most 120 s (the service's limit per request), else consecutive windows
/// of at most 120 s aligned to the interval, so that segments come out
/// exactly as one long request would give them.
pub(crate) fn video_windows(
    cfg: Option<VideoSegmentConfig>,
) -> Result<Vec<Option<VideoSegmentConfig>>, EmbedError> {
    let Some(cfg) = cfg else {
        return Ok(vec![None]);
    };
    let r = cfg.range()?;
    if r.interval_sec > MAX_VIDEO_SPAN {
        return Err(EmbedError::invalid(
            "video.segment_config.interval_sec",
            format!(
                "{} s is longer than the {MAX_VIDEO_SPAN} s Vertex analyses per request",
                r.interval_sec
            ),
        ));
    }
    if r.end_sec - r.start_sec <= MAX_VIDEO_SPAN {
        return Ok(vec![Some(cfg)]);
    }
    // Every window is a request: as many segments as a local video may
    // have, no more (the end may be a file header's claim, `with_real_end`).
    r.check_count(f64::from(r.end_sec))?;
    let window = MAX_VIDEO_SPAN / r.interval_sec * r.interval_sec;
    let mut out = Vec::new();
    let mut s = r.start_sec;
    while s < r.end_sec {
        let e = (s + window).min(r.end_sec);
        out.push(Some(VideoSegmentConfig::new(s, e, r.interval_sec)?));
        s = e;
    }
    Ok(out)
}

/// For a local video whose config leaves the end open, the end is the
/// video's real length (probed with FFmpeg), so a long video is covered
/// whole rather than only its first 120 s. `gs://` videos keep the service's
/// own default (one request).
#[cfg(feature = "video")]
fn with_real_end(
    media: &Media,
    cfg: Option<VideoSegmentConfig>,
) -> Result<Option<VideoSegmentConfig>, EmbedError> {
    use mmembed_media::video::{VideoBytes, probe};
    if cfg.is_some_and(|c| c.end_offset_sec.is_some()) {
        return Ok(cfg);
    }
    let info = match &media.source {
        MediaSource::Path(p) => probe(&VideoBytes::Path(p))?,
        MediaSource::Bytes(b) => probe(&VideoBytes::Bytes(b.clone()))?,
        MediaSource::Uri(_) => return Ok(cfg),
    };
    let c = cfg.unwrap_or_default();
    let end = info.duration_sec.ceil().max(1.0) as u32;
    Ok(Some(VideoSegmentConfig {
        start_offset_sec: Some(c.start_offset_sec.unwrap_or(0)),
        end_offset_sec: Some(end),
        interval_sec: c.interval_sec,
    }))
}

#[cfg(not(feature = "video"))]
fn with_real_end(
    _media: &Media,
    cfg: Option<VideoSegmentConfig>,
) -> Result<Option<VideoSegmentConfig>, EmbedError> {
    Ok(cfg)
}

/// The request bodies for one `EmbedRequest`, in order: text and image ride
/// with the first; each further one carries the next video window.
pub(crate) fn bodies(
    req: &EmbedRequest,
    max_image_bytes: usize,
) -> Result<Vec<PredictRequest>, EmbedError> {
    if let Some(t) = &req.text {
        let words = t.split_whitespace().count();
        if words > MAX_TEXT_TOKENS {
            tracing::debug!(
                words,
                "text is likely over Vertex's 32 tokens; the service truncates it"
            );
        }
    }
    let image = req
        .image
        .as_ref()
        .map(|m| image_json(m, max_image_bytes))
        .transpose()?;
    let (video_media, windows) = match &req.video {
        Some(v) => (
            Some(video_media_json(&v.media)?),
            video_windows(with_real_end(&v.media, v.segment_config)?)?,
        ),
        None => (None, vec![None]),
    };
    let parameters = req.dimension.map(|dimension| Parameters { dimension });
    Ok(windows
        .into_iter()
        .enumerate()
        .map(|(i, w)| PredictRequest {
            instances: [Instance {
                text: if i == 0 { req.text.clone() } else { None },
                image: if i == 0 { image.clone() } else { None },
                video: video_media.clone().map(|media| VideoJson {
                    media,
                    video_segment_config: w,
                }),
            }],
            parameters: parameters.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmembed_media::image_crate as image;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn windows_split_long_ranges_on_interval_boundaries() {
        let w = video_windows(Some(VideoSegmentConfig::new(0, 300, 16).unwrap())).unwrap();
        let spans: Vec<_> = w
            .iter()
            .map(|c| {
                let r = c.unwrap().range().unwrap();
                (r.start_sec, r.end_sec)
            })
            .collect();
        assert_eq!(spans, vec![(0, 112), (112, 224), (224, 300)]);
        let w = video_windows(Some(VideoSegmentConfig::new(10, 130, 10).unwrap())).unwrap();
        assert_eq!(w.len(), 1, "exactly 120 s is one request");
        assert_eq!(video_windows(None).unwrap(), vec![None]);
        assert!(video_windows(Some(VideoSegmentConfig::new(0, 600, 200).unwrap())).is_err());
        // Not millions of requests for a range as long as a u32 allows (or
        // a video's header claims): as many segments as a local video.
        let e = video_windows(Some(VideoSegmentConfig::new(0, u32::MAX, 4).unwrap()));
        assert!(e.unwrap_err().to_string().contains("over the limit"));
        let w = video_windows(Some(VideoSegmentConfig::new(0, 400_000, 4).unwrap())).unwrap();
        assert_eq!(w.len(), 400_000usize.div_ceil(120));
    }

    #[test]
    fn png_and_jpeg_pass_through_others_are_transcoded() {
        let p = png(8, 6);
        let j = image_json(&Media::from(p.clone()), 1 << 20).unwrap();
        assert_eq!(j.mime_type.as_deref(), Some("image/png"));
        assert_eq!(B64.decode(j.bytes_base64_encoded.unwrap()).unwrap(), p);

        let mut bmp = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(image::RgbImage::new(4, 4))
            .write_to(&mut bmp, ImageFormat::Bmp)
            .unwrap();
        let j = image_json(&Media::from(bmp.into_inner()), 1 << 20).unwrap();
        assert_eq!(j.mime_type.as_deref(), Some("image/png"));
        let decoded = B64.decode(j.bytes_base64_encoded.unwrap()).unwrap();
        assert_eq!(image::guess_format(&decoded).unwrap(), ImageFormat::Png);
    }

    #[test]
    fn oversized_images_are_downscaled_or_rejected() {
        let big = png(2000, 1500);
        let limit = big.len() - 1;
        let j = image_json(&Media::from(big), limit).unwrap();
        let bytes = B64.decode(j.bytes_base64_encoded.unwrap()).unwrap();
        assert!(bytes.len() <= limit);
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (1024, 768));
        let e = image_json(&Media::from(png(64, 64)), 10).unwrap_err();
        assert!(e.to_string().contains("still over"), "{e}");
    }

    #[test]
    fn uris_and_garbage() {
        let j = image_json(&Media::from(MediaSource::Uri("gs://b/c.JPG".into())), 10).unwrap();
        assert_eq!(j.gcs_uri.as_deref(), Some("gs://b/c.JPG"));
        assert_eq!(j.mime_type.as_deref(), Some("image/jpeg"));
        // The service reads GIF and BMP from GCS, but `mimeType` names only
        // JPEG and PNG: the URI goes alone. WebP, TIFF and ICO it does not
        // read: those are fetched first (`fetch_unreadable`).
        let typed = |uri: &str, declared: Option<&str>| {
            let mut m = Media::from(MediaSource::Uri(uri.into()));
            m.mime_type = declared.map(String::from);
            m
        };
        for (uri, declared, want) in [
            ("gs://b/a.gif", None, GcsImage::Untyped),
            ("gs://b/a", Some("image/gif"), GcsImage::Untyped),
            ("gs://b/a.bmp?x=1", None, GcsImage::Untyped),
            ("gs://b/a", None, GcsImage::Untyped),
            (
                "gs://b/a.png",
                Some("image/jpeg"),
                GcsImage::Typed("image/jpeg"),
            ),
            (
                "gs://b/a.png",
                Some("application/octet-stream"),
                GcsImage::Typed("image/png"),
            ),
            ("gs://b/a.webp", None, GcsImage::Fetch),
            ("gs://b/a", Some("image/tiff"), GcsImage::Fetch),
            ("gs://b/a.ico", None, GcsImage::Fetch),
            (
                "gs://b/a",
                Some("image/x-icon; charset=binary"),
                GcsImage::Fetch,
            ),
            ("gs://b/IMG_0001.HEIC", None, GcsImage::Fetch),
            ("gs://b/a", Some("image/heif"), GcsImage::Fetch),
            (
                "gs://b/a.heic",
                Some("image/jpeg"),
                GcsImage::Typed("image/jpeg"),
            ),
        ] {
            assert_eq!(gcs_image(uri, declared), want, "{uri} {declared:?}");
            let j = image_json(&typed(uri, declared), 10);
            match want {
                GcsImage::Typed(t) => assert_eq!(j.unwrap().mime_type.as_deref(), Some(t)),
                GcsImage::Untyped => assert_eq!(j.unwrap().mime_type, None),
                GcsImage::Fetch => assert!(j.unwrap_err().to_string().contains("does not read")),
            }
        }
        assert!(image_json(&Media::from(MediaSource::Uri("https://x/y.png".into())), 10).is_err());
        let e = image_json(&Media::from(b"hello".to_vec()), 100).unwrap_err();
        assert!(matches!(e, EmbedError::MediaDecode { .. }), "{e}");
    }
}
