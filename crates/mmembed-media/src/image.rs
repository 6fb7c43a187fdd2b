//! Image decoding with limits checked before any pixel is allocated.

use std::io::Cursor;
use std::sync::Arc;

use image::{
    DynamicImage, ImageBuffer, ImageDecoder, ImageFormat, ImageReader, RgbImage, RgbaImage,
};
use mmembed_core::EmbedError;

/// Bounds on what an image may cost to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted width × height, checked from the header before
    /// decoding (default 100 megapixels: any phone photo, not a decompression bomb).
    pub max_pixels: u64,
    /// Largest encoded input, in bytes (default 100 MiB).
    pub max_bytes: u64,
    /// Most memory the decoder may allocate, in bytes (default 1 GiB).
    pub max_alloc: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_pixels: 100_000_000,
            max_bytes: 100 << 20,
            max_alloc: 1 << 30,
        }
    }
}

/// Formats we decode: what Vertex accepts (BMP, GIF, JPEG, PNG) plus WebP
/// and TIFF, common in photo collections; and ICO, by a path of its own
/// (`crate::ico`), before these are sniffed.
const FORMATS: &[ImageFormat] = &[
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::WebP,
    ImageFormat::Tiff,
];

/// The `image` crate's decoder limits for ours: its allocations bounded.
fn decoder_limits(limits: &ImageLimits) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_alloc);
    l
}

fn corrupt(what: &str, reason: String) -> EmbedError {
    EmbedError::media(what, format!("corrupt or truncated image ({reason})"), None)
}

fn decode_error(what: &str, e: image::ImageError) -> EmbedError {
    let reason = match &e {
        image::ImageError::Limits(_) => format!("exceeds a decoding limit ({e})"),
        image::ImageError::Unsupported(_) => format!("unsupported image ({e})"),
        _ => format!("corrupt or truncated image ({e})"),
    };
    EmbedError::media(what, reason, Some(Arc::new(e)))
}

/// Decodes an image from its bytes, sniffing the format from the content
/// (never the file name), applying EXIF orientation, and converting to 8-bit
/// RGB the way Hugging Face's CLIP processor does: transparency is
/// composited onto white, grayscale is replicated, 16-bit samples keep
/// their high byte (as Pillow reads them). An icon (ICO) gives the frame
/// Pillow opens: the largest, with its AND mask or alpha as transparency;
/// 16-bit BMPs widen their 5- and 6-bit samples as Pillow does.
/// JPEGs decode with libjpeg-turbo, as in Pillow, so their pixels are
/// Pillow's (CMYK and YCCK made RGB as Pillow makes them); the rare ones it
/// does not take plainly (12-bit, lossless, corrupt data) fall back to the
/// `image` crate's decoder.
///
/// `what` names the input in error messages (a path, a URI).
///
/// ```
/// use mmembed_media::{decode_image, ImageLimits};
/// let err = decode_image(b"not an image", "notes.jpg", &ImageLimits::default()).unwrap_err();
/// assert!(err.to_string().contains("notes.jpg"));
/// ```
pub fn decode_image(
    bytes: &[u8],
    what: &str,
    limits: &ImageLimits,
) -> Result<RgbImage, EmbedError> {
    decode(bytes, what, limits, None, None, false).map(|d| d.image)
}

/// Which formats a draft decode ([`decode_image_draft`]) may take less of,
/// as Pillow's `Image.draft` does for JPEG and pillow-heif's for HEIC.
/// Each costs the inputs' fidelity differently, so each is its own choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Draft {
    /// JPEGs decoded at 1/2, 1/4 or 1/8 of their size (libjpeg's reduced
    /// inverse DCT): inputs about a level off the exact decode's on
    /// average.
    pub jpeg: bool,
    /// HEIC photos decoded as their embedded thumbnail (feature `heif`):
    /// inputs further off, as the thumbnail's encoder made it.
    pub heic_thumbnail: bool,
}

impl Draft {
    /// Every image decoded whole.
    pub const NONE: Self = Self {
        jpeg: false,
        heic_thumbnail: false,
    };
    /// JPEGs reduced, nothing else.
    pub const JPEG: Self = Self {
        jpeg: true,
        heic_thumbnail: false,
    };
    /// HEIC photos as their thumbnails, nothing else.
    pub const HEIC_THUMBNAIL: Self = Self {
        jpeg: false,
        heic_thumbnail: true,
    };

    /// Whether any format may be decoded reduced.
    pub fn any(self) -> bool {
        self.jpeg || self.heic_thumbnail
    }
}

/// [`decode_image`], except that where `draft` allows, less of the image
/// is decoded when that still covers `need(width, height)`, where
/// `(width, height)` is the image's size as displayed (after its EXIF
/// orientation or HEIF transformations) and so is the need:
///
/// **JPEG** ([`Draft::jpeg`]): decoded at 1/2, 1/4 or 1/8 of its size, as
/// Pillow's `Image.draft("RGB", need)` does: the largest reduction that
/// keeps both sides at least the need. libjpeg reduces in the inverse DCT,
/// so much of the decoding and of the resizing after it is skipped (only
/// the entropy decoding stays): a 640×480 photo that a CLIP model resizes
/// to 298×224 decodes at 320×240, and decoding plus preprocessing are 1.6×
/// as fast; a 12-megapixel one decodes at 1/8, 2.4× (BENCHMARKS.md). The
/// pixels are Pillow's for the same request, but not those of a full
/// decode resized: the DCT's reduction is a different filter from the
/// resize's, so preprocessed inputs differ, by about a level on average and
/// a few in the worst pixels. JPEGs other than the plain ones that
/// libjpeg-turbo takes (see [`decode_image`]) decode at full size.
///
/// **HEIC** ([`Draft::heic_thumbnail`], feature `heif`): decoded as its
/// embedded thumbnail (phones store one of 320×240 or so in each) where
/// pillow-heif's `Image.draft` takes it: the smallest thumbnail at least
/// the need that is a scaled copy of the photo (of the same mode, aspect
/// ratio, rotation, mirroring, crop and colour profile); else the photo
/// itself. A 12-megapixel photo, about a second's HEVC decoding a core,
/// becomes a few milliseconds'. The thumbnail is not the photo resized:
/// its encoder scaled it (how well is the encoder's business) and
/// compressed it again, so the inputs differ more than the JPEG
/// reduction's (BENCHMARKS.md, "HEIC photos"). Which thumbnail, and its
/// pixels, are held to pillow-heif's by fixtures
/// (`models/fixtures/make_heic.py`).
///
/// Other formats decode whole.
///
/// ```
/// use mmembed_media::{decode_image_draft, Draft, ImageLimits};
/// let mut jpeg = Vec::new();
/// image::RgbImage::from_pixel(640, 480, image::Rgb([200, 30, 90]))
///     .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
///     .unwrap();
/// // A model that resizes the shortest side to 224 needs 298×224 of it.
/// let need = |_, _| (298, 224);
/// let img = decode_image_draft(&jpeg, "red.jpg", &ImageLimits::default(), Draft::JPEG, need)?;
/// assert_eq!(img.dimensions(), (320, 240));
/// # Ok::<(), mmembed_core::EmbedError>(())
/// ```
pub fn decode_image_draft(
    bytes: &[u8],
    what: &str,
    limits: &ImageLimits,
    draft: Draft,
    need: impl Fn(u32, u32) -> (u32, u32),
) -> Result<RgbImage, EmbedError> {
    let need = Need { size: &need, draft };
    decode(bytes, what, limits, Some(need), None, false).map(|d| d.image)
}

/// The size needed of an image as displayed, given that size, and which
/// formats may be decoded reduced for it.
#[derive(Clone, Copy)]
pub(crate) struct Need<'a> {
    pub size: &'a dyn Fn(u32, u32) -> (u32, u32),
    pub draft: Draft,
}

/// An image decoded whole, or only its columns `x0..x0 + image.width()`
/// (all rows) of an image `width` wide.
pub(crate) struct Decoded {
    pub image: RgbImage,
    pub x0: u32,
    pub width: u32,
    /// Where the alpha was kept: its plane (as grey RGB, for the
    /// resampler); `image` holds the colours as stored.
    pub alpha: Option<RgbImage>,
}

impl Decoded {
    /// The decoded columns as the resampling reads them.
    pub fn columns(&self) -> crate::pillow::Columns<'_> {
        crate::pillow::Columns {
            image: &self.image,
            x0: self.x0,
            width: self.width,
        }
    }
}

impl From<RgbImage> for Decoded {
    fn from(image: RgbImage) -> Self {
        Self {
            x0: 0,
            width: image.width(),
            image,
            alpha: None,
        }
    }
}

/// [`decode_image`] or [`decode_image_draft`] (with `need`); with
/// `columns`, a plain JPEG shown as stored (no EXIF turn) may decode only
/// the columns it names for the `(width, height)` of the image as decoded,
/// and a margin. Everything else decodes whole, with `x0` 0. With
/// `keep_alpha` a transparent image keeps its alpha
/// ([`Decoded::alpha`]) instead of being composited onto white.
pub(crate) fn decode(
    bytes: &[u8],
    what: &str,
    limits: &ImageLimits,
    need: Option<Need<'_>>,
    columns: Option<&dyn Fn(u32, u32) -> std::ops::Range<u32>>,
    keep_alpha: bool,
) -> Result<Decoded, EmbedError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(EmbedError::media(
            what,
            format!(
                "{} bytes is over the {} byte limit",
                bytes.len(),
                limits.max_bytes
            ),
            None,
        ));
    }
    if crate::ico::is_ico(bytes) {
        return decode_ico(bytes, what, limits, keep_alpha);
    }
    if crate::heif::is_heic(bytes) {
        #[cfg(feature = "heif")]
        return crate::heif::decode(
            bytes,
            what,
            limits.max_pixels,
            need.filter(|n| n.draft.heic_thumbnail).map(|n| n.size),
        )
        .map(|img| finish(img, keep_alpha))
        .map_err(|e| EmbedError::media(what, format!("cannot decode HEIC ({e})"), None));
        #[cfg(not(feature = "heif"))]
        return Err(EmbedError::media(
            what,
            "HEIC images need mmembed built with the `heif` feature (the system's libheif)",
            None,
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| EmbedError::media(what, "cannot read", Some(Arc::new(e))))?;
    let Some(format) = reader.format() else {
        return Err(EmbedError::media(
            what,
            "not a recognised image format (expected PNG, JPEG, GIF, BMP, WebP, TIFF or ICO)",
            None,
        ));
    };
    if !FORMATS.contains(&format) {
        return Err(EmbedError::media(
            what,
            format!("{format:?} images are not supported"),
            None,
        ));
    }
    reader.limits(decoder_limits(limits));
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(what, e))?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 {
        return Err(EmbedError::media(
            what,
            "image has zero width or height",
            None,
        ));
    }
    if pixels > limits.max_pixels {
        return Err(EmbedError::media(
            what,
            format!(
                "{w}x{h} is {pixels} pixels, over the limit of {}",
                limits.max_pixels
            ),
            None,
        ));
    }
    let orientation = decoder.orientation().map_err(|e| decode_error(what, e))?;
    let jpeg_need = need.filter(|n| n.draft.jpeg).map(|n| n.size);
    let denominator = jpeg_need.map_or(1, |need| {
        // The need is for the image as displayed; the reduction applies to
        // it as stored, turned a quarter for orientations 5-8.
        use image::metadata::Orientation::*;
        let turned = matches!(
            orientation,
            Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH
        );
        let (nw, nh) = if turned {
            let (nw, nh) = need(h, w);
            (nh, nw)
        } else {
            need(w, h)
        };
        crate::jpeg::draft_denominator((w, h), (nw, nh))
    });
    if format == ImageFormat::Bmp
        && let Some(img) = crate::bmp::decode(bytes, limits.max_pixels)
    {
        let img = img.map_err(|e| corrupt(what, e))?;
        return Ok(finish(DynamicImage::ImageRgb8(img), keep_alpha));
    }
    if format == ImageFormat::Jpeg {
        // Columns of the image as stored are the displayed ones only when
        // it is not turned or flipped.
        let upright = orientation == image::metadata::Orientation::NoTransforms;
        let columns = columns.filter(|_| upright);
        if let Some(plain) = crate::jpeg::decode_plain(bytes, (w, h), limits, denominator, columns)
        {
            if upright {
                return Ok(plain);
            }
            let mut img = DynamicImage::ImageRgb8(plain.image);
            img.apply_orientation(orientation);
            return Ok(img.into_rgb8().into());
        }
    }
    let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(what, e))?;
    let mut img = eight_bit(img);
    img.apply_orientation(orientation);
    Ok(finish(img, keep_alpha))
}

/// An 8-bit image, turned as displayed, made RGB: its alpha kept apart
/// (with `keep_alpha`) or composited onto white.
fn finish(img: DynamicImage, keep_alpha: bool) -> Decoded {
    if keep_alpha && img.color().has_alpha() {
        let (image, alpha) = split_alpha(img);
        return Decoded {
            alpha: Some(alpha),
            ..image.into()
        };
    }
    to_rgb_on_white(img).into()
}

/// An icon: the frame Pillow reads ([`crate::ico::frame`]), a PNG decoded
/// as any PNG, a bitmap as the BMP it is with the alpha Pillow gives it.
fn decode_ico(
    bytes: &[u8],
    what: &str,
    limits: &ImageLimits,
    keep_alpha: bool,
) -> Result<Decoded, EmbedError> {
    let bad_icon =
        |reason: String| EmbedError::media(what, format!("corrupt icon: {reason}"), None);
    let bitmap = match crate::ico::frame(bytes, limits.max_pixels).map_err(bad_icon)? {
        crate::ico::Frame::Png(png) => return decode(png, what, limits, None, None, keep_alpha),
        crate::ico::Frame::Bitmap(b) => b,
    };
    let colours = match crate::bmp::decode(&bitmap.bmp, limits.max_pixels) {
        Some(c) => c.map_err(|e| corrupt(what, e))?,
        None => {
            let mut reader = ImageReader::with_format(Cursor::new(&bitmap.bmp), ImageFormat::Bmp);
            reader.limits(decoder_limits(limits));
            reader
                .decode()
                .map_err(|e| decode_error(what, e))?
                .into_rgb8()
        }
    };
    if colours.dimensions() != (bitmap.width, bitmap.height) {
        return Err(bad_icon(format!(
            "its bitmap decodes to {:?}, its header says {:?}",
            colours.dimensions(),
            (bitmap.width, bitmap.height)
        )));
    }
    let mut rgba = RgbaImage::new(bitmap.width, bitmap.height);
    for ((out, c), a) in rgba.pixels_mut().zip(colours.pixels()).zip(&bitmap.alpha) {
        *out = image::Rgba([c[0], c[1], c[2], *a]);
    }
    Ok(finish(DynamicImage::ImageRgba8(rgba), keep_alpha))
}

/// 16-bit samples as 8-bit ones the way Pillow reads them (its `;16B`
/// and `;16L` raw modes keep each sample's high byte), not rounded as the
/// `image` crate's conversions round them: one level apart on about half
/// the values (60000 is 234 to Pillow, 233 rounded). 16-bit grey is the
/// exception: Pillow opens it as "I;16" and its conversion to RGB clips
/// every value over 255 to white, which no model was meant to see, so
/// here it keeps its high byte like the colours.
fn eight_bit(img: DynamicImage) -> DynamicImage {
    fn high<P: image::Pixel<Subpixel = u16>, Q: image::Pixel<Subpixel = u8>>(
        b: ImageBuffer<P, Vec<u16>>,
    ) -> ImageBuffer<Q, Vec<u8>> {
        let (w, h) = b.dimensions();
        let bytes = b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect();
        ImageBuffer::from_raw(w, h, bytes)
            .unwrap_or_else(|| unreachable!("as many samples as the 16-bit image"))
    }
    match img {
        DynamicImage::ImageRgb16(b) => DynamicImage::ImageRgb8(high(b)),
        DynamicImage::ImageRgba16(b) => DynamicImage::ImageRgba8(high(b)),
        DynamicImage::ImageLuma16(b) => DynamicImage::ImageLuma8(high(b)),
        DynamicImage::ImageLumaA16(b) => DynamicImage::ImageLumaA8(high(b)),
        other => other,
    }
}

/// The colours as stored (not premultiplied), and the alpha as grey RGB,
/// for the resampler. (Grey with alpha is grey in every channel, as
/// Pillow's "LA" converts.)
fn split_alpha(img: DynamicImage) -> (RgbImage, RgbImage) {
    let rgba: RgbaImage = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let (mut colours, mut alpha) = (RgbImage::new(w, h), RgbImage::new(w, h));
    for ((c, a), p) in colours
        .pixels_mut()
        .zip(alpha.pixels_mut())
        .zip(rgba.pixels())
    {
        *c = image::Rgb([p[0], p[1], p[2]]);
        *a = image::Rgb([p[3]; 3]);
    }
    (colours, alpha)
}

/// Premultiplies colours by `alpha` as Pillow's `convert("RGBa")` does
/// (`MULDIV255`: `c · a / 255`, rounded).
pub(crate) fn premultiply(colours: &mut RgbImage, alpha: &RgbImage) {
    for (c, a) in colours.pixels_mut().zip(alpha.pixels()) {
        let k = u32::from(a[0]);
        for v in c.0.iter_mut() {
            let t = u32::from(*v) * k + 128;
            *v = (((t >> 8) + t) >> 8) as u8;
        }
    }
}

/// Divides colours premultiplied by `alpha` (both resized alike) by it,
/// as Pillow's `convert("RGBA")` from "RGBa" does (`255 · c / a`, clipped;
/// kept as they are where the alpha is 0 or 255), and drops the alpha.
pub(crate) fn unpremultiply(colours: &mut RgbImage, alpha: &RgbImage) {
    for (c, a) in colours.pixels_mut().zip(alpha.pixels()) {
        let k = u32::from(a[0]);
        if k == 0 || k == 255 {
            continue;
        }
        for v in c.0.iter_mut() {
            *v = (255 * u32::from(*v) / k).min(255) as u8;
        }
    }
}

/// Converts to RGB8, compositing any alpha onto white with Pillow's integer
/// arithmetic (`Image.alpha_composite` onto an opaque white background), so
/// transparent images match Hugging Face's processor bit for bit.
pub fn to_rgb_on_white(img: DynamicImage) -> RgbImage {
    let img = eight_bit(img);
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba: RgbaImage = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(p[3]);
        for c in 0..3 {
            o[c] = composite_on_white(u32::from(p[c]), a);
        }
    }
    out
}

/// Pillow's AlphaComposite.c for an opaque white destination: with
/// PRECISION_BITS = 7, coef1 = a·128 and coef2 = (255−a)·128.
fn composite_on_white(c: u32, a: u32) -> u8 {
    if a == 0 {
        return 255;
    }
    let tmp = (c * a + 255 * (255 - a)) * 128 + (0x80 << 7);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> 7) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgba};

    fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn composite_matches_pillow_reference_values() {
        // Values printed by Pillow 13's Image.alpha_composite(white, (c, c, c, a)).
        assert_eq!(composite_on_white(0, 255), 0);
        assert_eq!(composite_on_white(200, 255), 200);
        assert_eq!(composite_on_white(0, 0), 255);
        assert_eq!(composite_on_white(0, 128), 127);
        assert_eq!(composite_on_white(100, 128), 177);
        assert_eq!(composite_on_white(37, 3), 252);
        assert_eq!(composite_on_white(250, 254), 250);
    }

    #[test]
    fn premultiplying_and_dividing_match_pillow() {
        // Values printed by Pillow 13: `convert("RGBa")` of these RGBA
        // pixels, and `convert("RGBA")` of that.
        let stored = [
            [200, 100, 50, 0],
            [200, 100, 50, 255],
            [200, 100, 50, 128],
            [37, 250, 1, 3],
            [255, 255, 255, 1],
            [10, 20, 30, 254],
        ];
        let premultiplied = [
            [0, 0, 0],
            [200, 100, 50],
            [100, 50, 25],
            [0, 3, 0],
            [1, 1, 1],
            [10, 20, 30],
        ];
        let divided = [
            [0, 0, 0],
            [200, 100, 50],
            [199, 99, 49],
            [0, 255, 0],
            [255, 255, 255],
            [10, 20, 30],
        ];
        let img = DynamicImage::ImageRgba8(RgbaImage::from_fn(6, 1, |x, _| {
            image::Rgba(stored[x as usize])
        }));
        let (mut colours, alpha) = split_alpha(img);
        premultiply(&mut colours, &alpha);
        let got: Vec<[u8; 3]> = colours.pixels().map(|p| p.0).collect();
        assert_eq!(got, premultiplied);
        unpremultiply(&mut colours, &alpha);
        let got: Vec<[u8; 3]> = colours.pixels().map(|p| p.0).collect();
        assert_eq!(got, divided);
    }

    #[test]
    fn sixteen_bit_samples_become_what_pillow_reads() {
        // Pillow 13's 8-bit values for these 16-bit samples of an RGB, an
        // RGBA (opaque) and a grey-with-alpha PNG (`Image.open(...)`): the
        // high byte, where rounding would give 1, 233 and 254 for 255,
        // 60000 and 65280.
        let samples: [u16; 12] = [
            0, 127, 128, 255, 256, 383, 384, 20000, 40000, 60000, 65280, 65535,
        ];
        let pillow: [u8; 12] = [0, 0, 0, 0, 1, 1, 1, 78, 156, 234, 255, 255];
        let w = samples.len() as u32;
        let rgb16 = ImageBuffer::from_fn(w, 1, |x, _| image::Rgb([samples[x as usize]; 3]));
        let rgba16 = ImageBuffer::from_fn(w, 1, |x, _| {
            let v = samples[x as usize];
            Rgba([v, v, v, u16::MAX])
        });
        for img in [
            DynamicImage::ImageRgb16(rgb16),
            DynamicImage::ImageRgba16(rgba16),
        ] {
            let got = decode_image(&png(&img), "16", &ImageLimits::default()).unwrap();
            let got: Vec<u8> = got.pixels().map(|p| p[0]).collect();
            assert_eq!(got, pillow, "{:?}", img.color());
        }
        // Grey with alpha 40000 (156 to Pillow), kept for open_clip's way.
        let la16 = ImageBuffer::from_fn(w, 1, |x, _| image::LumaA([samples[x as usize], 40000]));
        let d = decode(
            &png(&DynamicImage::ImageLumaA16(la16)),
            "la16",
            &ImageLimits::default(),
            None,
            None,
            true,
        )
        .unwrap();
        let got: Vec<u8> = d.image.pixels().map(|p| p[0]).collect();
        assert_eq!(got, pillow);
        assert!(d.alpha.unwrap().pixels().all(|p| p.0 == [156; 3]));
    }

    #[test]
    fn gray_16bit_and_alpha_convert() {
        let g16: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(4, 3, |x, _| Luma([(x as u16) * 20000]));
        let rgb = decode_image(
            &png(&DynamicImage::ImageLuma16(g16)),
            "g16",
            &ImageLimits::default(),
        )
        .unwrap();
        assert_eq!(rgb.dimensions(), (4, 3));
        // 16-bit to 8-bit (the high byte), replicated to three channels.
        assert_eq!(rgb.get_pixel(3, 0).0, [234, 234, 234]);
        let rgba: RgbaImage = ImageBuffer::from_pixel(2, 2, Rgba([0, 0, 0, 0]));
        let rgb = decode_image(
            &png(&DynamicImage::ImageRgba8(rgba)),
            "t",
            &ImageLimits::default(),
        )
        .unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
    }

    #[test]
    fn pixel_limit_is_checked_from_the_header() {
        let img = DynamicImage::new_rgb8(100, 100);
        let limits = ImageLimits {
            max_pixels: 9_999,
            ..ImageLimits::default()
        };
        let e = decode_image(&png(&img), "big.png", &limits).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
    }

    /// Pillow's pixels for small JPEGs of every subsampling, progressive,
    /// restart markers, grayscale, odd sizes and EXIF orientation
    /// (models/fixtures/make_jpeg.py): exact, since both decode with
    /// libjpeg-turbo. The one file libjpeg warns about (junk before its end
    /// marker) takes the lenient fallback and is only close.
    #[test]
    fn jpeg_pixels_match_pillow() {
        let fx = crate::fixture::Fixture::open("jpeg", "decoded.bin");
        assert!(fx.cases.len() >= 26);
        let mut bad = Vec::new();
        for case in &fx.cases {
            let ((w, h), want) = fx.pixels(case, 3);
            let (file, bytes) = fx.file(case);
            let file = file.as_str();
            let limits = ImageLimits::default();
            let (got, file) = match case.get("draft") {
                // Reduced as Pillow's draft reduces it, for this need.
                Some(d) => {
                    let need = (d[0].as_u64().unwrap() as u32, d[1].as_u64().unwrap() as u32);
                    let got = decode_image_draft(&bytes, file, &limits, Draft::JPEG, |_, _| need)
                        .unwrap();
                    (got, format!("{file} (draft {need:?})"))
                }
                None => (
                    decode_image(&bytes, file, &limits).unwrap(),
                    file.to_string(),
                ),
            };
            assert_eq!(got.dimensions(), (w, h), "{file}");
            let max = got
                .as_raw()
                .iter()
                .zip(want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            let exact = case["exact"].as_bool().unwrap();
            if (exact && max != 0) || max > 8 {
                bad.push(format!("{file}: max difference {max} levels"));
            }
            if !exact {
                // Else the fallback is not what this case exercises.
                assert!(max > 0, "{file} decoded exactly: not by the fallback?");
            }
        }
        assert!(bad.is_empty(), "differ from Pillow:\n{}", bad.join("\n"));
    }

    /// CMYK JPEGs beyond the Pillow fixture: a crop from only the columns
    /// it reads equals the whole decode's (the fixture, whole and
    /// reduced), and a YCCK file (libjpeg's default for CMYK, which
    /// Pillow cannot write) decodes on the same path, within a level or
    /// two of the `image` crate's own decoder (an independent one).
    #[test]
    fn cmyk_and_ycck_jpegs() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/jpeg");
        let jpeg = std::fs::read(dir.join("cmyk.jpg")).unwrap();
        let limits = ImageLimits::default();
        let pre = crate::ClipPreprocessor::from_json(
            r#"{"size": {"shortest_edge": 20}, "crop_size": 12, "resample": 2}"#,
        )
        .unwrap();
        for draft in [Draft::NONE, Draft::JPEG] {
            let whole = pre.decode(&jpeg, "cmyk", &limits, draft).unwrap();
            let mut want = vec![0u8; 12 * 12 * 3];
            pre.crop_into(&whole, &mut want).unwrap();
            let mut got = vec![0u8; want.len()];
            pre.decode_crop_into(&jpeg, "cmyk", &limits, draft, &mut got)
                .unwrap();
            assert_eq!(got, want, "draft {draft:?}");
        }
        let cols = |_, _| 16..30;
        let part = decode(&jpeg, "cmyk", &limits, None, Some(&cols), false).unwrap();
        assert!(part.image.width() < part.width, "decoded whole");

        let (w, h) = (40u32, 24u32);
        let cmyk: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [
                    (x * 6) as u8,
                    (y * 10) as u8,
                    (x * 3 + y * 4) as u8,
                    255 - (x + y) as u8,
                ]
            })
            .collect();
        let ycck = crate::jpeg::make::encode_ycck(&cmyk, (w, h), 95);
        let got = decode_image(&ycck, "ycck", &limits).unwrap();
        let other = image::load_from_memory(&ycck).unwrap().into_rgb8();
        let max = got
            .as_raw()
            .iter()
            .zip(other.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max <= 2, "YCCK {max} levels from the image crate's decode");
        // Decoded on libjpeg's path, not by the fallback.
        assert!(crate::jpeg::decode_plain(&ycck, (w, h), &limits, 1, None).is_some());
    }

    /// The need is asked for the image as displayed, and the reduction is
    /// Pillow's rule on the stored one; files the JPEG path does not take
    /// decode whole.
    #[test]
    fn draft_asks_for_the_displayed_size() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures");
        // Stored 30 × 20, displayed 20 × 30 (EXIF orientation 6).
        let jpg = std::fs::read(dir.join("jpeg/exif_orientation_6.jpg")).unwrap();
        let asked = std::cell::Cell::new(None);
        let img = decode_image_draft(
            &jpg,
            "turned.jpg",
            &ImageLimits::default(),
            Draft::JPEG,
            |w, h| {
                asked.set(Some((w, h)));
                (w / 2, h / 2)
            },
        )
        .unwrap();
        assert_eq!(asked.get(), Some((20, 30)));
        assert_eq!(img.dimensions(), (10, 15));
        // The thread's decompressor does not keep the reduction.
        let whole = decode_image(&jpg, "turned.jpg", &ImageLimits::default()).unwrap();
        assert_eq!(whole.dimensions(), (20, 30));

        assert_eq!(crate::jpeg::draft_denominator((640, 480), (298, 224)), 2);
        assert_eq!(crate::jpeg::draft_denominator((4000, 3000), (298, 224)), 8);
        assert_eq!(crate::jpeg::draft_denominator((1200, 900), (298, 224)), 4);
        assert_eq!(crate::jpeg::draft_denominator((597, 448), (298, 224)), 2);
        assert_eq!(crate::jpeg::draft_denominator((595, 448), (298, 224)), 1);
        assert_eq!(crate::jpeg::draft_denominator((5, 5), (0, 0)), 4);

        // CMYK reduces too, as Pillow's draft reduces it.
        let cmyk = std::fs::read(dir.join("bad-input/cmyk.jpg")).unwrap();
        let img = decode_image_draft(
            &cmyk,
            "cmyk.jpg",
            &ImageLimits::default(),
            Draft::JPEG,
            |_, _| (1, 1),
        );
        assert_eq!(img.unwrap().dimensions(), (15, 10));
        // What the JPEG path does not take decodes whole.
        let jpg = std::fs::read(dir.join("jpeg/junk_before_eoi.jpg")).unwrap();
        let img = decode_image_draft(
            &jpg,
            "junk.jpg",
            &ImageLimits::default(),
            Draft::JPEG,
            |_, _| (1, 1),
        );
        assert_eq!(img.unwrap().dimensions(), (32, 24));
    }

    /// What the JPEG path does not take goes to the `image` crate's decoder
    /// and is accepted or refused as before: truncated data, more than 100
    /// progressive scans. (CMYK, which went there before, is on the JPEG
    /// path now: `cmyk_and_ycck_jpegs`.)
    #[test]
    fn other_jpegs_take_the_fallback() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures");
        let cmyk = std::fs::read(dir.join("bad-input/cmyk.jpg")).unwrap();
        assert!(
            crate::jpeg::decode_plain(&cmyk, (120, 80), &ImageLimits::default(), 1, None).is_some()
        );

        let jpg = std::fs::read(dir.join("jpeg/progressive_420.jpg")).unwrap();
        let cut = &jpg[..jpg.len() * 2 / 3];
        assert!(
            crate::jpeg::decode_plain(cut, (48, 33), &ImageLimits::default(), 1, None).is_none()
        );
        // Refused as before (and as Pillow refuses it by default).
        let e = decode_image(cut, "cut.jpg", &ImageLimits::default()).unwrap_err();
        assert!(e.to_string().contains("corrupt or truncated"), "{e}");
        // A decode that fails must not spoil the next one on this thread.
        assert!(
            crate::jpeg::decode_plain(&jpg, (48, 33), &ImageLimits::default(), 1, None).is_some()
        );
        // A header that disagrees with the caller's, or a limit the
        // progressive coefficients would pass, sends it the other way too.
        assert!(
            crate::jpeg::decode_plain(&jpg, (33, 48), &ImageLimits::default(), 1, None).is_none()
        );
        let tight = ImageLimits {
            max_alloc: 48 * 33 * 3 * 2,
            ..ImageLimits::default()
        };
        assert!(crate::jpeg::decode_plain(&jpg, (48, 33), &tight, 1, None).is_none());

        // A valid progressive JPEG of 128 scans (no decoder warning; made by
        // models/fixtures/make_many_scans.py): past 100 scans it stops here
        // and is refused on the other path, as before libjpeg-turbo.
        let many = std::fs::read(dir.join("bad-input/scans_128.jpg")).unwrap();
        assert!(
            crate::jpeg::decode_plain(&many, (40, 24), &ImageLimits::default(), 1, None).is_none()
        );
        let e = decode_image(&many, "scans.jpg", &ImageLimits::default()).unwrap_err();
        assert!(e.to_string().contains("Too many scans"), "{e}");
        // And the thread's next decode is fine.
        assert!(
            crate::jpeg::decode_plain(&jpg, (48, 33), &ImageLimits::default(), 1, None).is_some()
        );
    }
}
