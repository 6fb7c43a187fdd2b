//! Images for remote services that take only some formats and sizes
//! (Vertex embeddings, Gemini, OpenAI-compatible and Ollama servers).

use image::{ImageFormat, imageops};
use mmembed_core::EmbedError;

use crate::image::{ImageLimits, decode_image};

/// Longest side of an image that had to be downscaled to fit a size limit
/// (CLIP-style models work at 224–512 px and Gemini tiles at 768 px, so this
/// loses nothing they would see).
const DOWNSCALE_SIDE: u32 = 1024;

/// An image ready to send: its bytes and MIME type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadImage {
    /// Encoded bytes.
    pub bytes: Vec<u8>,
    /// `image/png`, `image/jpeg`, or one of the formats kept as they are.
    pub mime_type: &'static str,
}

fn mime(f: ImageFormat) -> Option<&'static str> {
    Some(match f {
        ImageFormat::Png => "image/png",
        ImageFormat::Jpeg => "image/jpeg",
        ImageFormat::WebP => "image/webp",
        ImageFormat::Gif => "image/gif",
        _ => return None,
    })
}

/// Encodes `bytes` for a service: images in one of `keep` and within
/// `max_bytes` go as they are; others are transcoded to PNG (JPEG and
/// HEIC to JPEG); images over `max_bytes` are downscaled and re-encoded,
/// or refused when even that does not fit. Decoding validates the file.
///
/// ```
/// use mmembed_media::image_crate::ImageFormat;
/// let mut png = std::io::Cursor::new(Vec::new());
/// mmembed_media::image_crate::RgbImage::new(4, 4)
///     .write_to(&mut png, ImageFormat::Png)
///     .unwrap();
/// let up = mmembed_media::encode_for_upload(&png.into_inner(), "x.png", 1 << 20, &[ImageFormat::Png])?;
/// assert_eq!(up.mime_type, "image/png");
/// assert!(mmembed_media::encode_for_upload(b"not an image", "y", 1 << 20, &[ImageFormat::Png]).is_err());
/// # Ok::<(), mmembed_core::EmbedError>(())
/// ```
pub fn encode_for_upload(
    bytes: &[u8],
    what: &str,
    max_bytes: usize,
    keep: &[ImageFormat],
) -> Result<UploadImage, EmbedError> {
    // HEIC, which the `image` crate does not know, is a photo: it goes
    // as JPEG (as PNG it would be several times the size).
    let heic = crate::heif::is_heic(bytes);
    let format = match image::guess_format(bytes) {
        Ok(f) => f,
        Err(_) if heic => ImageFormat::Jpeg,
        Err(_) => {
            return Err(EmbedError::media(
                what,
                "not a recognised image format (expected PNG, JPEG, GIF, BMP, WebP, TIFF, ICO \
                 or HEIC)",
                None,
            ));
        }
    };
    if !heic
        && keep.contains(&format)
        && bytes.len() <= max_bytes
        && let Some(m) = mime(format)
    {
        return Ok(UploadImage {
            bytes: bytes.to_vec(),
            mime_type: m,
        });
    }
    let limits = ImageLimits {
        max_bytes: bytes.len() as u64,
        ..ImageLimits::default()
    };
    let mut img = decode_image(bytes, what, &limits)?;
    if bytes.len() > max_bytes && img.width().max(img.height()) > DOWNSCALE_SIDE {
        let (w, h) = (img.width(), img.height());
        let s = f64::from(DOWNSCALE_SIDE) / f64::from(w.max(h));
        let (nw, nh) = (
            ((f64::from(w) * s).round() as u32).max(1),
            ((f64::from(h) * s).round() as u32).max(1),
        );
        img = imageops::resize(&img, nw, nh, imageops::FilterType::CatmullRom);
        tracing::debug!(%what, from = ?(w, h), to = ?(nw, nh), "downscaled an image over the size limit");
    }
    let (out, mime_type) = if format == ImageFormat::Jpeg {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
            .encode_image(&img)
            .map_err(|e| EmbedError::media(what, format!("cannot re-encode: {e}"), None))?;
        (out, "image/jpeg")
    } else {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png)
            .map_err(|e| EmbedError::media(what, format!("cannot re-encode: {e}"), None))?;
        (out.into_inner(), "image/png")
    };
    if out.len() > max_bytes {
        return Err(EmbedError::media(
            what,
            format!(
                "{} bytes after re-encoding is still over the {max_bytes} byte limit",
                out.len()
            ),
            None,
        ));
    }
    Ok(UploadImage {
        bytes: out,
        mime_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An icon goes to a service as the PNG of the frame Pillow opens,
    /// composited onto white like any transparent image.
    #[test]
    fn icons_are_sent_as_png() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/ico-bmp");
        let ico = std::fs::read(dir.join("choice_fewest_colours.ico")).unwrap();
        let up = encode_for_upload(&ico, "a.ico", 1 << 20, &[ImageFormat::Png]).unwrap();
        assert_eq!(up.mime_type, "image/png");
        let limits = ImageLimits::default();
        let sent = decode_image(&up.bytes, "sent.png", &limits).unwrap();
        assert_eq!(sent, decode_image(&ico, "a.ico", &limits).unwrap());
        assert_eq!(sent.dimensions(), (32, 32));
    }

    /// A HEIC photo goes as JPEG (what it decodes to, re-encoded), never
    /// as it is: the services that take `keep`'s formats do not read it.
    #[cfg(feature = "heif")]
    #[test]
    fn heics_are_sent_as_jpeg() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/heic");
        let heic = std::fs::read(dir.join("yuv420_64x48.heic")).unwrap();
        let keep = [ImageFormat::Png, ImageFormat::Jpeg];
        let up = encode_for_upload(&heic, "a.heic", 1 << 20, &keep).unwrap();
        assert_eq!(up.mime_type, "image/jpeg");
        let sent = decode_image(&up.bytes, "sent.jpg", &ImageLimits::default()).unwrap();
        assert_eq!(sent.dimensions(), (64, 48));
    }
}
