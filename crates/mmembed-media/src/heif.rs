//! HEIC (HEIF with HEVC), the format of phone photo libraries, decoded by
//! the system's libheif (with libde265), as `pillow-heif`, the Pillow
//! plugin the model libraries' users open them with, decodes them (with its
//! own, newer copy of libheif).
//!
//! Hand-rolled bindings, a dozen functions of libheif's stable C API: the
//! `libheif-rs` crate needs libheif 1.17 or later, and Debian 12 ships
//! 1.15. The functions used here have been in libheif since 1.x, with
//! these layouts.

/// Whether `bytes` are a HEIF file whose brands say HEVC (HEIC): an ISO
/// BMFF `ftyp` box whose major brand, or with `mif1`/`msf1` one of whose
/// compatible brands, is `heic`, `heix`, `heim`, `heis`, `hevc`, `hevx`,
/// `hevm` or `hevs`. (AVIF, the same container with AV1, is not taken
/// here: Pillow reads it with its own decoder.)
pub(crate) fn is_heic(bytes: &[u8]) -> bool {
    const HEVC: [&[u8; 4]; 8] = [
        b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
    ];
    let Some(size) = bytes
        .get(..4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    else {
        return false;
    };
    if bytes.get(4..8) != Some(b"ftyp") {
        return false;
    }
    let hevc = |b: &[u8]| HEVC.iter().any(|h| &h[..] == b);
    let Some(major) = bytes.get(8..12) else {
        return false;
    };
    if hevc(major) {
        return true;
    }
    let end = (size as usize).min(bytes.len()).min(256);
    (major == b"mif1" || major == b"msf1")
        && bytes
            .get(16..end)
            .is_some_and(|brands| brands.chunks_exact(4).any(hevc))
}

#[cfg(feature = "heif")]
pub(crate) use libheif::decode;

/// The bindings and the decoder (feature `heif`: links the system's
/// libheif).
#[cfg(feature = "heif")]
mod libheif {
    use std::ffi::{CStr, c_char, c_int, c_void};
    use std::sync::Once;

    use image::{DynamicImage, ImageBuffer, Rgb, Rgba};

    #[repr(C)]
    struct HeifError {
        code: c_int,
        subcode: c_int,
        message: *const c_char,
    }

    /// The leading fields of libheif's `heif_decoding_options` (version 2 on):
    /// the struct is always allocated by libheif, which fills in its defaults;
    /// only `convert_hdr_to_8bit` is set here.
    #[repr(C)]
    struct DecodingOptions {
        version: u8,
        ignore_transformations: u8,
        start_progress: *const c_void,
        on_progress: *const c_void,
        end_progress: *const c_void,
        progress_user_data: *mut c_void,
        convert_hdr_to_8bit: u8,
    }

    enum Context {}
    enum Handle {}
    enum Image {}

    const COLORSPACE_RGB: c_int = 1;
    const CHROMA_INTERLEAVED_RGB: c_int = 10;
    const CHROMA_INTERLEAVED_RGBA: c_int = 11;
    const CHANNEL_INTERLEAVED: c_int = 10;

    #[link(name = "heif")]
    unsafe extern "C" {
        fn heif_init(params: *mut c_void) -> HeifError;
        fn heif_context_alloc() -> *mut Context;
        fn heif_context_free(ctx: *mut Context);
        fn heif_context_read_from_memory_without_copy(
            ctx: *mut Context,
            mem: *const c_void,
            size: usize,
            options: *const c_void,
        ) -> HeifError;
        fn heif_context_get_primary_image_handle(
            ctx: *mut Context,
            handle: *mut *mut Handle,
        ) -> HeifError;
        fn heif_image_handle_release(handle: *const Handle);
        fn heif_image_handle_get_width(handle: *const Handle) -> c_int;
        fn heif_image_handle_get_height(handle: *const Handle) -> c_int;
        fn heif_image_handle_has_alpha_channel(handle: *const Handle) -> c_int;
        fn heif_decoding_options_alloc() -> *mut DecodingOptions;
        fn heif_decoding_options_free(options: *mut DecodingOptions);
        fn heif_decode_image(
            handle: *const Handle,
            out: *mut *mut Image,
            colorspace: c_int,
            chroma: c_int,
            options: *const DecodingOptions,
        ) -> HeifError;
        fn heif_image_release(image: *const Image);
        fn heif_image_get_width(image: *const Image, channel: c_int) -> c_int;
        fn heif_image_get_height(image: *const Image, channel: c_int) -> c_int;
        fn heif_image_get_plane_readonly(
            image: *const Image,
            channel: c_int,
            stride: *mut c_int,
        ) -> *const u8;
    }

    /// libheif's error as text, or `Ok` for its success code (0).
    fn check(e: HeifError) -> Result<(), String> {
        if e.code == 0 {
            return Ok(());
        }
        let message = if e.message.is_null() {
            String::new()
        } else {
            // SAFETY: libheif's messages are static, NUL-terminated strings
            // ("is always defined", heif.h).
            unsafe { CStr::from_ptr(e.message) }
                .to_string_lossy()
                .into_owned()
        };
        Err(format!("libheif error {}.{}: {message}", e.code, e.subcode))
    }

    /// Frees what libheif allocated, on every way out.
    struct Guard<T>(*mut T, unsafe extern "C" fn(*mut T));

    impl<T> Drop for Guard<T> {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: the pointer came from the matching libheif allocator
                // and is freed once, here.
                unsafe { (self.1)(self.0) }
            }
        }
    }

    unsafe extern "C" fn release_handle(h: *mut Handle) {
        // SAFETY: see `Guard`.
        unsafe { heif_image_handle_release(h) }
    }

    unsafe extern "C" fn release_image(i: *mut Image) {
        // SAFETY: see `Guard`.
        unsafe { heif_image_release(i) }
    }

    /// Decodes a HEIC file's primary image to 8-bit RGB (RGBA where it has an
    /// alpha), its transformations (rotation, mirroring, crop) applied as
    /// libheif applies them by default, and 10- and 12-bit images brought to 8
    /// bits by libheif. Refuses an image over `max_pixels` before decoding.
    pub(crate) fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, String> {
        static INIT: Once = Once::new();
        // SAFETY: heif_init takes no parameters here (null is allowed) and is
        // reference counted; it is never matched by heif_deinit, so libheif
        // stays initialised for the process.
        INIT.call_once(|| {
            let _ = unsafe { heif_init(std::ptr::null_mut()) };
        });
        // SAFETY: each call below gets pointers that libheif gave, or `bytes`,
        // which outlives the context that reads it without a copy; every
        // allocation is freed by a guard; the plane is read within the
        // bounds libheif reports (stride × height).
        unsafe {
            let ctx = Guard(heif_context_alloc(), heif_context_free);
            if ctx.0.is_null() {
                return Err("libheif could not allocate a context".into());
            }
            check(heif_context_read_from_memory_without_copy(
                ctx.0,
                bytes.as_ptr().cast(),
                bytes.len(),
                std::ptr::null(),
            ))?;
            let mut handle = std::ptr::null_mut();
            check(heif_context_get_primary_image_handle(ctx.0, &mut handle))?;
            let handle = Guard(handle, release_handle);
            let (w, h) = (
                heif_image_handle_get_width(handle.0),
                heif_image_handle_get_height(handle.0),
            );
            let pixels = u64::from(w.max(0) as u32) * u64::from(h.max(0) as u32);
            if pixels == 0 {
                return Err("image has zero width or height".into());
            }
            if pixels > max_pixels {
                return Err(format!(
                    "{w}x{h} is {pixels} pixels, over the limit of {max_pixels}"
                ));
            }
            let alpha = heif_image_handle_has_alpha_channel(handle.0) != 0;
            let options = Guard(heif_decoding_options_alloc(), heif_decoding_options_free);
            if options.0.is_null() {
                return Err("libheif could not allocate decoding options".into());
            }
            if (*options.0).version >= 2 {
                (*options.0).convert_hdr_to_8bit = 1;
            }
            let chroma = if alpha {
                CHROMA_INTERLEAVED_RGBA
            } else {
                CHROMA_INTERLEAVED_RGB
            };
            let mut image = std::ptr::null_mut();
            check(heif_decode_image(
                handle.0,
                &mut image,
                COLORSPACE_RGB,
                chroma,
                options.0,
            ))?;
            let image = Guard(image, release_image);
            let (w, h) = (
                heif_image_get_width(image.0, CHANNEL_INTERLEAVED),
                heif_image_get_height(image.0, CHANNEL_INTERLEAVED),
            );
            let mut stride: c_int = 0;
            let plane = heif_image_get_plane_readonly(image.0, CHANNEL_INTERLEAVED, &mut stride);
            let channels = if alpha { 4 } else { 3 };
            let (wu, hu, su) = (w.max(0) as usize, h.max(0) as usize, stride.max(0) as usize);
            if plane.is_null() || wu == 0 || hu == 0 || su < wu * channels {
                return Err("libheif gave no interleaved 8-bit plane".into());
            }
            let rows = std::slice::from_raw_parts(plane, su * (hu - 1) + wu * channels);
            let mut raw = Vec::with_capacity(wu * hu * channels);
            for y in 0..hu {
                raw.extend_from_slice(&rows[y * su..y * su + wu * channels]);
            }
            let (w, h) = (wu as u32, hu as u32);
            let img = if alpha {
                ImageBuffer::<Rgba<u8>, _>::from_raw(w, h, raw).map(DynamicImage::ImageRgba8)
            } else {
                ImageBuffer::<Rgb<u8>, _>::from_raw(w, h, raw).map(DynamicImage::ImageRgb8)
            };
            img.ok_or_else(|| "libheif's plane is not the image's size".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_heic;

    #[test]
    fn heic_brands_are_recognised() {
        let ftyp = |major: &[u8; 4], compatible: &[&[u8; 4]]| {
            let mut b = Vec::new();
            b.extend_from_slice(&(16 + 4 * compatible.len() as u32).to_be_bytes());
            b.extend_from_slice(b"ftyp");
            b.extend_from_slice(major);
            b.extend_from_slice(&[0; 4]);
            for c in compatible {
                b.extend_from_slice(&c[..]);
            }
            b
        };
        assert!(is_heic(&ftyp(b"heic", &[b"mif1", b"heic"])));
        assert!(is_heic(&ftyp(b"mif1", &[b"mif1", b"heic"])));
        assert!(is_heic(&ftyp(b"heix", &[])));
        assert!(!is_heic(&ftyp(b"avif", &[b"mif1", b"avif"])));
        assert!(!is_heic(&ftyp(b"mif1", &[b"mif1", b"avif"])));
        assert!(!is_heic(&ftyp(b"isom", &[b"isom", b"mp41"])));
        assert!(!is_heic(b"\0\0\0\x18ftyp"));
        assert!(!is_heic(b""));
    }

    /// pillow-heif's pixels of HEIC files it wrote
    /// (models/fixtures/make_heic.py): 4:2:0 at odd sizes, 4:4:4, grey,
    /// with alpha, turned by a HEIF rotation, 10-bit. Its libheif (1.23) and Debian 12's (1.15) make
    /// 4:4:4 and grey alike to the bit; 4:2:0 a level apart on a few
    /// percent of the values (their YCbCr conversions round differently),
    /// 10-bit up to two (their reductions to 8 bits do).
    #[cfg(feature = "heif")]
    #[test]
    fn heic_pixels_match_pillow_heif() {
        let fx = crate::fixture::Fixture::open("heic", "decoded.bin");
        assert!(fx.cases.len() >= 7);
        let mut bad = Vec::new();
        for case in &fx.cases {
            let ((w, h), want) = fx.pixels(case, 4);
            let (file, bytes) = fx.file(case);
            assert!(is_heic(&bytes), "{file}");
            let got = super::decode(&bytes, u64::MAX).unwrap().into_rgba8();
            assert_eq!(got.dimensions(), (w, h), "{file}");
            let d: Vec<u8> = got
                .as_raw()
                .iter()
                .zip(want)
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let max = d.iter().max().copied().unwrap_or(0);
            let share = d.iter().filter(|&&x| x > 0).count() as f64 / d.len() as f64;
            let (max_ok, share_ok) = match &file[..4] {
                "yuv4" if file.starts_with("yuv444") => (0, 0.0),
                "grey" | "rota" => (0, 0.0),
                "tenb" => (2, 0.5),
                _ => (1, 0.05),
            };
            if max > max_ok || share > share_ok {
                bad.push(format!(
                    "{file}: max {max}, {:.1} % of values differ",
                    100.0 * share
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "differ from pillow-heif:\n{}",
            bad.join("\n")
        );
    }

    /// Built without libheif, a HEIC photo is an error that says what
    /// would read it.
    #[cfg(not(feature = "heif"))]
    #[test]
    fn without_libheif_heics_are_a_clear_error() {
        let fx = crate::fixture::Fixture::open("heic", "decoded.bin");
        let (_, bytes) = fx.file(&fx.cases[0]);
        let e = crate::decode_image(&bytes, "x.heic", &crate::ImageLimits::default());
        let e = e.unwrap_err().to_string();
        assert!(e.contains("x.heic") && e.contains("`heif` feature"), "{e}");
    }

    /// Broken files are errors, and a picture over the pixel limit is
    /// refused before it is decoded.
    #[cfg(feature = "heif")]
    #[test]
    fn broken_and_huge_heics_are_errors() {
        let fx = crate::fixture::Fixture::open("heic", "decoded.bin");
        let (_, bytes) = fx.file(&fx.cases[0]);
        let e = super::decode(&bytes, 100).unwrap_err();
        assert!(e.contains("over the limit"), "{e}");
        for cut in [40, bytes.len() / 2, bytes.len() - 10] {
            let e = crate::decode_image(&bytes[..cut], "x.heic", &crate::ImageLimits::default());
            let e = e.unwrap_err().to_string();
            assert!(e.contains("x.heic") && e.contains("HEIC"), "{e}");
        }
        let mut flipped = bytes.clone();
        for b in flipped[bytes.len() / 2..].iter_mut() {
            *b ^= 0x5A;
        }
        let _ = super::decode(&flipped, u64::MAX);
    }
}
