//! HEIC (HEIF with HEVC), the format of phone photo libraries, decoded by
//! the system's libheif (with libde265), as `pillow-heif`, the Pillow
//! plugin the model libraries' users open them with, decodes them (with its
//! own, newer copy of libheif).
//!
//! Hand-rolled bindings, a dozen functions of libheif's stable C API: the
//! `libheif-rs` crate needs libheif 1.17 or later, and Debian 12 ships
//! 1.15. The functions used here have been in libheif since 1.x, with
//! these layouts.
//!
//! With a need (`Image.draft`, `--heic-thumbnail`), a photo's embedded
//! thumbnail is decoded instead when pillow-heif's `draft` would take it:
//! the smallest one at least as large as the need that is a scaled copy of
//! the image ([`not_a_copy`]). libheif 1.15 does not say which
//! transformations an item has, so the file's item properties are read
//! here ([`transforms`]).

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

/// A transformation property of an item, as pillow-heif lists them
/// (libheif's `heif_item_get_transformation_properties`).
#[cfg(feature = "heif")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    /// `irot`: quarter turns anticlockwise.
    Rotate(u8),
    /// `imir`: the mirror's axis.
    Mirror(u8),
    /// `clap` as the borders it takes off the item's `ispe` size, with it:
    /// left, top, right, bottom, width, height.
    Crop([i64; 6]),
}

/// The ISO BMFF boxes of `data`: (type, body). Stops at the first box
/// whose size does not fit.
#[cfg(feature = "heif")]
fn boxes(mut data: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    std::iter::from_fn(move || {
        let head = data.get(..8)?;
        let kind = [head[4], head[5], head[6], head[7]];
        let (size, start) = match u32::from_be_bytes([head[0], head[1], head[2], head[3]]) {
            0 => (data.len(), 8),
            1 => {
                let large = data.get(8..16)?;
                (
                    usize::try_from(u64::from_be_bytes(large.try_into().ok()?)).ok()?,
                    16,
                )
            }
            n => (n as usize, 8),
        };
        if size < start || size > data.len() {
            return None;
        }
        let body = &data[start..size];
        data = &data[size..];
        Some((kind, body))
    })
}

#[cfg(feature = "heif")]
fn child<'a>(data: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    boxes(data).find(|(k, _)| k == kind).map(|(_, body)| body)
}

#[cfg(feature = "heif")]
fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

#[cfg(feature = "heif")]
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Each item's transformation properties in the order the file's `ipma`
/// associates them (ISO/IEC 23008-12 §9.3): what libheif 1.15 applies
/// but does not tell. `None` when the file's `meta` box cannot be read.
#[cfg(feature = "heif")]
fn transforms(file: &[u8]) -> Option<std::collections::HashMap<u32, Vec<Transform>>> {
    // meta and ipma are full boxes: a version byte and 3 bytes of flags.
    let meta = child(file, b"meta")?.get(4..)?;
    let iprp = child(meta, b"iprp")?;
    let props: Vec<([u8; 4], &[u8])> = boxes(child(iprp, b"ipco")?).collect();
    let mut out = std::collections::HashMap::new();
    for (kind, ipma) in boxes(iprp) {
        if &kind != b"ipma" {
            continue;
        }
        let (version, wide) = (*ipma.first()?, ipma.get(3)? & 1 == 1);
        let mut at = 8;
        for _ in 0..be32(ipma, 4)? {
            let item = if version < 1 {
                at += 2;
                u32::from(be16(ipma, at - 2)?)
            } else {
                at += 4;
                be32(ipma, at - 4)?
            };
            let count = *ipma.get(at)? as usize;
            at += 1;
            let mut indices = Vec::with_capacity(count);
            for _ in 0..count {
                // The top bit says "essential"; 0 is no property.
                let index = if wide {
                    at += 2;
                    usize::from(be16(ipma, at - 2)? & 0x7fff)
                } else {
                    at += 1;
                    usize::from(ipma.get(at - 1)? & 0x7f)
                };
                indices.extend(index.checked_sub(1).and_then(|i| props.get(i)));
            }
            let ispe = indices
                .iter()
                .find(|(k, _)| k == b"ispe")
                .and_then(|(_, b)| Some((be32(b, 4)?, be32(b, 8)?)));
            let mut list = Vec::new();
            for (kind, body) in indices {
                list.push(match &kind {
                    b"irot" => Transform::Rotate(body.first()? & 3),
                    b"imir" => Transform::Mirror(body.first()? & 1),
                    b"clap" => Transform::Crop(crop_borders(body, ispe?)?),
                    _ => continue,
                });
            }
            out.insert(item, list);
        }
    }
    Some(out)
}

/// A `clap`'s borders on an image `width`×`height`, rounded as libheif
/// rounds them (the left edge down, the others to nearest; its fractions'
/// integer division truncates).
#[cfg(feature = "heif")]
fn crop_borders(clap: &[u8], (width, height): (u32, u32)) -> Option<[i64; 6]> {
    let u = |i: usize| be32(clap, 4 * i).map(f64::from);
    let s = |i: usize| be32(clap, 4 * i).map(|v| f64::from(v as i32));
    let ratio = |n: f64, d: f64| (d != 0.0).then(|| n / d);
    let clean_w = ratio(u(0)?, u(1)?)?;
    let clean_h = ratio(u(2)?, u(3)?)?;
    let off_x = ratio(s(4)?, u(5)?)?;
    let off_y = ratio(s(6)?, u(7)?)?;
    let (w, h) = (f64::from(width), f64::from(height));
    let round = |x: f64| (x + 0.5).trunc() as i64;
    let left = (off_x + (w - 1.0) / 2.0 - (clean_w - 1.0) / 2.0).trunc() as i64;
    let right = round(clean_w - 1.0 + left as f64);
    let top = round(off_y + (h - 1.0) / 2.0 - (clean_h - 1.0) / 2.0);
    let bottom = round(clean_h - 1.0 + top as f64);
    let (w, h) = (i64::from(width), i64::from(height));
    // Saturating: a broken box's fractions may be anything.
    let (right, bottom) = (
        (w - 1).saturating_sub(right),
        (h - 1).saturating_sub(bottom),
    );
    Some([left, top, right, bottom, w, h])
}

/// An image or thumbnail as pillow-heif compares them: its size as
/// displayed, whether it has an alpha plane (its mode), its
/// transformations and its colour profile.
#[cfg(feature = "heif")]
#[derive(Debug, Clone)]
struct Item {
    size: (u32, u32),
    alpha: bool,
    transforms: Vec<Transform>,
    profile: Option<Profile>,
}

/// A colour profile: ICC bytes, else the nclx code points.
#[cfg(feature = "heif")]
#[derive(Debug, Clone, PartialEq, Eq)]
enum Profile {
    Icc(Vec<u8>),
    Nclx([i32; 4]),
}

/// Why pillow-heif's `draft` would not take `thumb` for `image` at `need`,
/// or `None` where it would (pillow-heif 1.9's `_is_scaled_copy`): it takes
/// one at least the need, smaller than the image, of the same mode, aspect
/// ratio (to rounding), rotation and mirroring, crop (to rounding; an
/// encoder's padding anchored top-left is no crop) and colour profile
/// (where both have one).
///
/// The reason goes to the debug log, so that a user whose photos give no
/// speed-up can see why.
#[cfg(feature = "heif")]
fn not_a_copy(thumb: &Item, image: &Item, need: (u32, u32)) -> Option<&'static str> {
    // i128: products of a file's 32-bit sizes and borders.
    let (w, h) = (i128::from(image.size.0), i128::from(image.size.1));
    let (tw, th) = (i128::from(thumb.size.0), i128::from(thumb.size.1));
    if tw < i128::from(need.0) || th < i128::from(need.1) {
        return Some("smaller than the model's resize");
    }
    if thumb.alpha != image.alpha {
        return Some("an alpha plane on one side only");
    }
    if tw >= w && th >= h {
        return Some("not smaller than the photo");
    }
    if (tw * h - th * w).abs() > 2 * w.max(h) {
        return Some("another aspect ratio");
    }
    let turns = |t: &Item| -> Vec<Transform> {
        let turn = |x: &&Transform| !matches!(x, Transform::Crop(_));
        t.transforms.iter().filter(turn).copied().collect()
    };
    if turns(thumb) != turns(image) {
        return Some("another rotation or mirroring");
    }
    let crops = |t: &Item| -> Vec<[i64; 6]> {
        let crop = |x: &Transform| match *x {
            Transform::Crop(c) if c[0] != 0 || c[1] != 0 || c[2] >= 64 || c[3] >= 64 => Some(c),
            _ => None,
        };
        t.transforms.iter().filter_map(crop).collect()
    };
    let (tc, ic) = (crops(thumb), crops(image));
    if tc.len() != ic.len() {
        return Some("another crop");
    }
    for (t, c) in tc.iter().zip(&ic) {
        for (border, size) in [(0, 4), (2, 4), (1, 5), (3, 5)] {
            let (tb, ts) = (i128::from(t[border]), i128::from(t[size]));
            let (cb, cs) = (i128::from(c[border]), i128::from(c[size]));
            if (tb * cs - cb * ts).abs() > 2 * cs.max(ts) {
                return Some("another crop");
            }
        }
    }
    match (&thumb.profile, &image.profile) {
        (Some(a), Some(b)) if a != b => Some("another colour profile"),
        _ => None,
    }
}

/// The bindings and the decoder (feature `heif`: links the system's
/// libheif).
#[cfg(feature = "heif")]
mod libheif {
    use std::ffi::{CStr, c_char, c_int, c_void};
    use std::sync::Once;

    use image::{DynamicImage, ImageBuffer, Rgb, Rgba};

    use super::{Item, Profile};

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

    /// The leading fields of libheif's `heif_color_profile_nclx` (version 1
    /// on; allocated by libheif).
    #[repr(C)]
    struct Nclx {
        version: u8,
        color_primaries: c_int,
        transfer_characteristics: c_int,
        matrix_coefficients: c_int,
        full_range_flag: u8,
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
        fn heif_context_get_primary_image_ID(ctx: *mut Context, id: *mut u32) -> HeifError;
        fn heif_image_handle_get_number_of_thumbnails(handle: *const Handle) -> c_int;
        fn heif_image_handle_get_list_of_thumbnail_IDs(
            handle: *const Handle,
            ids: *mut u32,
            count: c_int,
        ) -> c_int;
        fn heif_image_handle_get_thumbnail(
            handle: *const Handle,
            id: u32,
            thumbnail: *mut *mut Handle,
        ) -> HeifError;
        fn heif_image_handle_get_raw_color_profile_size(handle: *const Handle) -> usize;
        fn heif_image_handle_get_raw_color_profile(
            handle: *const Handle,
            out: *mut c_void,
        ) -> HeifError;
        fn heif_image_handle_get_nclx_color_profile(
            handle: *const Handle,
            out: *mut *mut Nclx,
        ) -> HeifError;
        fn heif_nclx_color_profile_free(nclx: *mut Nclx);
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

    unsafe extern "C" fn free_nclx(n: *mut Nclx) {
        // SAFETY: see `Guard`.
        unsafe { heif_nclx_color_profile_free(n) }
    }

    /// Decodes a HEIC file's primary image to 8-bit RGB (RGBA where it has an
    /// alpha), its transformations (rotation, mirroring, crop) applied as
    /// libheif applies them by default, and 10- and 12-bit images brought to 8
    /// bits by libheif. Refuses an image over `max_pixels` before decoding.
    ///
    /// With `need` (the size needed of the image as displayed, given that
    /// size), decodes instead the smallest embedded thumbnail that
    /// pillow-heif's `draft` would take for it ([`super::not_a_copy`]);
    /// the image itself when there is none, or none decodes.
    pub(crate) fn decode(
        bytes: &[u8],
        what: &str,
        max_pixels: u64,
        need: Option<&dyn Fn(u32, u32) -> (u32, u32)>,
    ) -> Result<DynamicImage, String> {
        static INIT: Once = Once::new();
        // SAFETY: heif_init takes no parameters here (null is allowed) and is
        // reference counted; it is never matched by heif_deinit, so libheif
        // stays initialised for the process.
        INIT.call_once(|| {
            let _ = unsafe { heif_init(std::ptr::null_mut()) };
        });
        // SAFETY: each call below gets pointers that libheif gave, or `bytes`,
        // which outlives the context that reads it without a copy; every
        // allocation is freed by a guard.
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
            // Each out-pointer is guarded before its error is looked at:
            // libheif may fill it and still fail (its nclx getter does,
            // for code points it does not know: found by fuzzing).
            let mut handle = std::ptr::null_mut();
            let e = heif_context_get_primary_image_handle(ctx.0, &mut handle);
            let handle = Guard(handle, release_handle);
            check(e)?;
            let (w, h) = size(handle.0);
            let pixels = u64::from(w) * u64::from(h);
            if pixels == 0 {
                return Err("image has zero width or height".into());
            }
            if pixels > max_pixels {
                return Err(format!(
                    "{w}x{h} is {pixels} pixels, over the limit of {max_pixels}"
                ));
            }
            if let Some(need) = need
                && heif_image_handle_get_number_of_thumbnails(handle.0) > 0
            {
                for thumb in thumbnails(ctx.0, handle.0, bytes, what, need(w, h)) {
                    // pillow-heif goes on to the next when one fails.
                    match decode_handle(thumb.0) {
                        Ok(img) => {
                            tracing::debug!(%what, thumbnail = ?size(thumb.0), photo = ?(w, h), "a HEIC photo decoded as its thumbnail");
                            return Ok(img);
                        }
                        Err(e) => {
                            tracing::debug!(%what, error = %e, "a HEIC thumbnail did not decode")
                        }
                    }
                }
            }
            decode_handle(handle.0)
        }
    }

    /// The size of an image as displayed (libheif applies the
    /// transformations to it).
    unsafe fn size(handle: *const Handle) -> (u32, u32) {
        // SAFETY: a handle libheif gave.
        let (w, h) = unsafe {
            (
                heif_image_handle_get_width(handle),
                heif_image_handle_get_height(handle),
            )
        };
        (w.max(0) as u32, h.max(0) as u32)
    }

    /// The thumbnails pillow-heif's `draft` may take for `need`, smallest
    /// first (a stable sort by area, as its own).
    unsafe fn thumbnails(
        ctx: *mut Context,
        handle: *const Handle,
        bytes: &[u8],
        what: &str,
        need: (u32, u32),
    ) -> Vec<Guard<Handle>> {
        let Some(transforms) = super::transforms(bytes) else {
            return Vec::new();
        };
        // SAFETY: `ctx` and `handle` are libheif's; the list is written
        // into a buffer of the count it is given.
        unsafe {
            let mut primary = 0u32;
            if check(heif_context_get_primary_image_ID(ctx, &mut primary)).is_err() {
                return Vec::new();
            }
            let item = |h: *const Handle, id: u32| Item {
                size: size(h),
                alpha: heif_image_handle_has_alpha_channel(h) != 0,
                transforms: transforms.get(&id).cloned().unwrap_or_default(),
                profile: profile(h),
            };
            let image = item(handle, primary);
            let n = heif_image_handle_get_number_of_thumbnails(handle).max(0);
            let mut ids = vec![0u32; n as usize];
            let n = heif_image_handle_get_list_of_thumbnail_IDs(handle, ids.as_mut_ptr(), n);
            ids.truncate(n.max(0) as usize);
            let mut found = Vec::new();
            for id in ids {
                let mut thumb = std::ptr::null_mut();
                let e = heif_image_handle_get_thumbnail(handle, id, &mut thumb);
                let thumb = Guard(thumb, release_handle);
                if check(e).is_err() {
                    continue;
                }
                let t = item(thumb.0, id);
                match super::not_a_copy(&t, &image, need) {
                    None => found.push((u64::from(t.size.0) * u64::from(t.size.1), thumb)),
                    Some(why) => tracing::debug!(
                        %what,
                        thumbnail = ?t.size,
                        photo = ?image.size,
                        ?need,
                        why,
                        "a HEIC thumbnail not taken"
                    ),
                }
            }
            found.sort_by_key(|(area, _)| *area);
            found.into_iter().map(|(_, t)| t).collect()
        }
    }

    /// An image's colour profile: its ICC profile, else its nclx one.
    unsafe fn profile(handle: *const Handle) -> Option<Profile> {
        // SAFETY: the ICC profile is copied into a buffer of the size
        // libheif gives; the nclx one is libheif's, freed by a guard.
        unsafe {
            let n = heif_image_handle_get_raw_color_profile_size(handle);
            if n > 0 {
                let mut icc = vec![0u8; n];
                if check(heif_image_handle_get_raw_color_profile(
                    handle,
                    icc.as_mut_ptr().cast(),
                ))
                .is_ok()
                {
                    return Some(Profile::Icc(icc));
                }
            }
            let mut nclx = std::ptr::null_mut();
            let e = heif_image_handle_get_nclx_color_profile(handle, &mut nclx);
            let nclx = Guard(nclx, free_nclx);
            check(e).ok()?;
            let n = nclx.0.as_ref()?;
            Some(Profile::Nclx([
                n.color_primaries,
                n.transfer_characteristics,
                n.matrix_coefficients,
                i32::from(n.full_range_flag),
            ]))
        }
    }

    /// Decodes an image (or thumbnail) to interleaved 8-bit RGB(A).
    unsafe fn decode_handle(handle: *const Handle) -> Result<DynamicImage, String> {
        // SAFETY: `handle` is libheif's; every allocation is freed by a
        // guard; the plane is read within the bounds libheif reports
        // (stride × height).
        unsafe {
            let alpha = heif_image_handle_has_alpha_channel(handle) != 0;
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
            let e = heif_decode_image(handle, &mut image, COLORSPACE_RGB, chroma, options.0);
            let image = Guard(image, release_image);
            check(e)?;
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
    /// with alpha, turned by a HEIF rotation, 10-bit; and with a need, the
    /// thumbnail (or image) its `draft` chose, of photos with thumbnails
    /// (grid, turned, alpha, and two whose thumbnail is no scaled copy). Its libheif (1.23) and Debian 12's (1.15) make
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
            // With a need, pillow-heif's `draft` chose a thumbnail or the
            // image: ours must choose the same (the size says which).
            let need = case.get("draft").map(|d| {
                let d: Vec<u32> = serde_json::from_value(d.clone()).unwrap();
                (d[0], d[1])
            });
            let file = match need {
                Some(n) => format!("{file} (draft {n:?})"),
                None => file,
            };
            let need_of = need.map(|n| move |_: u32, _: u32| n);
            let need_fn = need_of
                .as_ref()
                .map(|f| f as &dyn Fn(u32, u32) -> (u32, u32));
            let got = super::decode(&bytes, "t.heic", u64::MAX, need_fn)
                .unwrap()
                .into_rgba8();
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
        let e = super::decode(&bytes, "t.heic", 100, None).unwrap_err();
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
        let _ = super::decode(&flipped, "t.heic", u64::MAX, None);
    }

    /// Thumbnails are taken only where the draft says HEIC: a JPEG draft
    /// decodes a HEIC photo whole.
    #[cfg(feature = "heif")]
    #[test]
    fn only_a_heic_draft_takes_thumbnails() {
        use crate::{Draft, ImageLimits, decode_image_draft};
        let bytes = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/fixtures/heic/thumbs_160x120.heic"),
        )
        .unwrap();
        let limits = ImageLimits::default();
        let size = |draft| {
            decode_image_draft(&bytes, "t.heic", &limits, draft, |_, _| (10, 10))
                .unwrap()
                .dimensions()
        };
        assert_eq!(size(Draft::NONE), (160, 120));
        assert_eq!(size(Draft::JPEG), (160, 120));
        assert_eq!(size(Draft::HEIC_THUMBNAIL), (64, 48));
    }

    /// Colour profiles, which no fixture differs in (pillow-heif writes
    /// thumbnails without one): a thumbnail whose profile is another than
    /// the photo's is no scaled copy; one of them without a profile is no
    /// objection (pillow-heif 1.9's `_is_scaled_copy`).
    #[cfg(feature = "heif")]
    #[test]
    fn thumbnails_of_another_colour_profile_are_no_copy() {
        use super::{Item, Profile, not_a_copy};
        let scaled_copy = |t: &Item, i: &Item, n| not_a_copy(t, i, n).is_none();
        let item = |size, profile| Item {
            size,
            alpha: false,
            transforms: Vec::new(),
            profile,
        };
        let srgb = Some(Profile::Nclx([1, 13, 6, 1]));
        let photo = item((4032, 3024), Some(Profile::Icc(b"display p3".to_vec())));
        let need = (298, 224);
        assert!(scaled_copy(&item((320, 240), None), &photo, need));
        assert!(scaled_copy(
            &item((320, 240), photo.profile.clone()),
            &photo,
            need
        ));
        assert!(!scaled_copy(&item((320, 240), srgb.clone()), &photo, need));
        assert!(!scaled_copy(
            &item((320, 240), Some(Profile::Icc(b"srgb".to_vec()))),
            &photo,
            need
        ));
        let untagged = item((4032, 3024), None);
        assert!(scaled_copy(&item((320, 240), srgb), &untagged, need));
    }

    /// The item properties of the files with thumbnails, cut short or with
    /// bytes of their `meta` box changed (seeded), read without a panic,
    /// and such files decode with a need or fail without one.
    #[cfg(feature = "heif")]
    #[test]
    fn broken_thumbnail_properties_are_no_panic() {
        let fx = crate::fixture::Fixture::open("heic", "decoded.bin");
        let mut next = crate::fixture::xorshift(0x2545_f491_4f6c_dd1d);
        let need = |_: u32, _: u32| (1, 1);
        for case in fx.cases.iter().filter(|c| c.get("draft").is_some()) {
            let (file, bytes) = fx.file(case);
            let t = super::transforms(&bytes).unwrap_or_else(|| panic!("{file}"));
            assert!(!t.is_empty(), "{file}");
            for cut in (0..bytes.len().min(2048)).step_by(7) {
                let _ = super::transforms(&bytes[..cut]);
            }
            // ftyp, then meta: its first 1,000 bytes or so hold every
            // property and association.
            let meta = 8 + usize::from(bytes[3]);
            for _ in 0..300 {
                let mut b = bytes.clone();
                for _ in 0..1 + next() % 4 {
                    let at = meta + (next() as usize) % (b.len() - meta).min(1200);
                    b[at] = next() as u8;
                }
                let _ = super::transforms(&b);
                let _ = super::decode(&b, "t.heic", u64::MAX, Some(&need));
            }
        }
    }
}
