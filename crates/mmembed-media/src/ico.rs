//! Windows icons (ICO), read as Pillow reads them: the model libraries
//! open images with Pillow, so an icon's pixels should be the frame Pillow
//! picks, with the alpha Pillow gives it.
//!
//! Hand-rolled over the `image` crate's own ICO decoder, which differs from
//! Pillow where it matters here: it picks the frame of most bits a pixel
//! first (Pillow: the largest, then the one of fewest colours), refuses PNG
//! frames that are not RGBA, and lays the AND mask over 32-bit frames too
//! (Pillow takes their alpha from each pixel's fourth byte only). The
//! directory is 16 bytes a frame; the pixels are still decoded by the
//! `image` crate, a bitmap frame as the BMP file it is once given a file
//! header, a PNG frame as any PNG.

use crate::bmp::{u16_at, u32_at};

/// An ICO file's first bytes (reserved 0, type 1 = icon), which is all
/// Pillow checks before reading the directory.
const MAGIC: [u8; 4] = [0, 0, 1, 0];
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Whether `bytes` are an icon, by their first bytes (as Pillow sniffs).
pub(crate) fn is_ico(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// The frame of an icon Pillow opens.
#[derive(Debug)]
pub(crate) enum Frame<'a> {
    /// A PNG: the bytes from the frame's start to the file's end (Pillow
    /// reads it from there; its end is its own `IEND`).
    Png(&'a [u8]),
    /// A bitmap frame.
    Bitmap(Bitmap),
}

/// A bitmap frame made a BMP file, and its alpha.
#[derive(Debug)]
pub(crate) struct Bitmap {
    /// The frame's DIB behind a BMP file header, its height halved: in an
    /// icon the height counts the AND mask's rows too.
    pub bmp: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// One byte a pixel, rows top to bottom: a 32-bit frame's fourth bytes,
    /// else the AND mask (0 where its bit is set, 255 elsewhere).
    pub alpha: Vec<u8>,
}

/// One directory entry, as Pillow's `IcoFile` reads it.
struct Entry {
    /// Width × height as the directory says them (0 is 256).
    square: u32,
    /// Bits a pixel, else from the number of colours, else 256: Pillow's
    /// `color_depth`, which only breaks ties between frames alike in size.
    colour_depth: u32,
    bpp: u16,
    size: u32,
    offset: u32,
}

/// The frame Pillow's `Image.open` reads: the largest by the directory's
/// width × height; of those, the one of fewest colours; of those, the first
/// in the file (Pillow sorts the entries by colour depth, then, stably, by
/// size descending, and takes the first).
pub(crate) fn frame(bytes: &[u8], max_pixels: u64) -> Result<Frame<'_>, String> {
    let count = usize::from(u16_at(bytes, 4).ok_or("truncated icon header")?);
    if count == 0 {
        return Err("an icon with no frames".into());
    }
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let e = bytes
            .get(6 + 16 * i..6 + 16 * (i + 1))
            .ok_or_else(|| format!("truncated icon directory ({count} frames listed)"))?;
        let side = |b: u8| if b == 0 { 256 } else { u32::from(b) };
        let (colours, bpp) = (u32::from(e[2]), u16_at(e, 6).unwrap_or(0));
        let colour_depth = match (bpp, colours) {
            (0, 0 | 1) => 256,
            // ceil(log2(colours)), as Pillow computes it for 2..=255.
            (0, n) => 32 - (n - 1).leading_zeros(),
            (b, _) => u32::from(b),
        };
        entries.push(Entry {
            square: side(e[0]) * side(e[1]),
            colour_depth,
            bpp,
            size: u32_at(e, 8).unwrap_or(0),
            offset: u32_at(e, 12).unwrap_or(0),
        });
    }
    let pick = entries
        .iter()
        .enumerate()
        .min_by_key(|(i, e)| (std::cmp::Reverse(e.square), e.colour_depth, *i))
        .map(|(_, e)| e)
        .ok_or("an icon with no frames")?;
    let data = bytes
        .get(pick.offset as usize..)
        .filter(|d| d.len() >= 8)
        .ok_or("an icon frame that lies past the file's end")?;
    if data.starts_with(PNG_MAGIC) {
        return Ok(Frame::Png(data));
    }
    bitmap(bytes, pick, max_pixels).map(Frame::Bitmap)
}

/// A bitmap frame (a DIB: BITMAPINFOHEADER or a later one, or OS/2's
/// 12-byte core header), as Pillow's `DibImageFile` and `IcoFile.frame`
/// read it.
fn bitmap(bytes: &[u8], e: &Entry, max_pixels: u64) -> Result<Bitmap, String> {
    let dib = &bytes[e.offset as usize..];
    let truncated = || "truncated icon bitmap".to_string();
    let header = u32_at(dib, 0).ok_or_else(truncated)?;
    let (width, height_at, height, bits, compression, colours_used) = match header {
        12 => (
            i32::from(u16_at(dib, 4).ok_or_else(truncated)?),
            8,
            i32::from(u16_at(dib, 6).ok_or_else(truncated)? as i16),
            u16_at(dib, 10).ok_or_else(truncated)?,
            0,
            0,
        ),
        40 | 52 | 56 | 64 | 108 | 124 => (
            u32_at(dib, 4).ok_or_else(truncated)? as i32,
            8,
            u32_at(dib, 8).ok_or_else(truncated)? as i32,
            u16_at(dib, 14).ok_or_else(truncated)?,
            u32_at(dib, 16).ok_or_else(truncated)?,
            u32_at(dib, 32).ok_or_else(truncated)?,
        ),
        other => {
            return Err(format!(
                "an icon bitmap with an unknown {other}-byte header"
            ));
        }
    };
    // The directory's height counts the AND mask's rows; the image is the
    // first half (Pillow: `int(height / 2)`), top-down if negative.
    let (w, h) = (width.unsigned_abs(), height.unsigned_abs() / 2);
    if w == 0 || h == 0 {
        return Err("an icon frame of zero width or height".into());
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(format!(
            "{w}x{h} is {pixels} pixels, over the limit of {max_pixels}"
        ));
    }
    // Where the pixels start, as Pillow finds them: after the header, the
    // colour masks of a 40-byte header's BI_BITFIELDS (3) or
    // BI_ALPHABITFIELDS (6), and the palette (4 bytes a colour, 3 after a
    // core header; as many as the header says, else 2^bits).
    let masks = match (header, compression) {
        (40, 3) => 12,
        (40, 6) => 16,
        _ => 0,
    };
    let palette = if bits <= 8 {
        let n = if colours_used != 0 {
            colours_used
        } else {
            1 << bits
        };
        n.saturating_mul(if header == 12 { 3 } else { 4 })
    } else {
        0
    };
    let pixels_at = header.saturating_add(masks).saturating_add(palette);
    let mut bmp = Vec::with_capacity(14 + dib.len());
    bmp.extend_from_slice(b"BM");
    bmp.extend_from_slice(
        &u32::try_from(14 + dib.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    bmp.extend_from_slice(&[0; 4]);
    bmp.extend_from_slice(&pixels_at.saturating_add(14).to_le_bytes());
    bmp.extend_from_slice(dib);
    let half = if height < 0 { -(h as i32) } else { h as i32 };
    let at = 14 + height_at;
    if header == 12 {
        bmp[at - 2..at].copy_from_slice(&(half as i16).to_le_bytes());
    } else {
        bmp[at..at + 4].copy_from_slice(&half.to_le_bytes());
    }
    let (wu, hu) = (w as usize, h as usize);
    // Both are read bottom row first whatever the bitmap's own direction
    // (as Pillow's raw modes with orientation -1 read them), and only once
    // the file is known to hold them: the alpha is never larger than 8
    // times the bytes it comes from.
    let mut alpha = Vec::new();
    if e.bpp == 32 {
        // The pixels' fourth bytes, unpadded rows of 4-byte pixels.
        let start = e.offset as usize + pixels_at as usize;
        let raw = bytes
            .get(start..)
            .and_then(|b| b.get(..wu * hu * 4))
            .ok_or("an icon's 32-bit pixels end before the frame's size")?;
        alpha.reserve_exact(wu * hu);
        for row in raw.chunks_exact(wu * 4).rev() {
            alpha.extend(row.chunks_exact(4).map(|px| px[3]));
        }
    } else {
        // The AND mask: the last bytes of the frame as the directory sizes
        // it, rows of bits padded to 32, 1 transparent.
        let row_bytes = wu.div_ceil(32) * 4;
        let total = row_bytes * hu;
        let end = u64::from(e.offset) + u64::from(e.size);
        let raw = end
            .checked_sub(total as u64)
            .and_then(|start| bytes.get(start as usize..end as usize))
            .ok_or("an icon's AND mask lies outside the file")?;
        alpha.reserve_exact(wu * hu);
        for row in raw.chunks_exact(row_bytes).rev() {
            alpha.extend((0..wu).map(|x| match row[x / 8] >> (7 - x % 8) & 1 {
                1 => 0,
                _ => 255,
            }));
        }
    }
    Ok(Bitmap {
        bmp,
        width: w,
        height: h,
        alpha,
    })
}

#[cfg(test)]
mod tests {
    use crate::image::{ImageLimits, decode};

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/ico-bmp")
    }

    /// Pillow 13's `Image.open(f).convert("RGBA")` of icons and BMPs
    /// written byte by byte (models/fixtures/make_ico_bmp.py): icons of
    /// bitmaps of 1 to 32 bits a pixel with their AND masks, of PNG frames
    /// of four modes, and of several frames; BMP files of 16 and 32 bits,
    /// core headers, grey palettes, top-down rows and run-length coding.
    /// The frame, its colours and its alpha, all exact.
    #[test]
    fn icons_match_pillow() {
        let fx = crate::fixture::Fixture::open("ico-bmp", "decoded.bin");
        assert!(fx.cases.len() >= 25);
        let mut bad = Vec::new();
        for case in &fx.cases {
            let ((w, h), want) = fx.pixels(case, 4);
            let (file, bytes) = fx.file(case);
            let got = decode(&bytes, &file, &ImageLimits::default(), None, None, true).unwrap();
            assert_eq!(got.image.dimensions(), (w, h), "{file}");
            let alpha = |i: usize| got.alpha.as_ref().map_or(255, |a| a.as_raw()[3 * i]);
            let wrong = want
                .chunks_exact(4)
                .zip(got.image.as_raw().chunks_exact(3))
                .enumerate()
                .filter(|(i, (p, c))| p[..3] != c[..] || p[3] != alpha(*i))
                .count();
            if wrong > 0 {
                bad.push(format!("{file}: {wrong} of {} pixels differ", w * h));
            }
        }
        assert!(bad.is_empty(), "differ from Pillow:\n{}", bad.join("\n"));
    }

    /// Broken icons are errors that say so, never panics: every prefix of
    /// a few fixtures, and directories that point nowhere.
    #[test]
    fn broken_icons_are_errors() {
        let limits = ImageLimits::default();
        let refuse = |bytes: &[u8], says: &str| {
            let e = crate::decode_image(bytes, "x.ico", &limits).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
            assert!(e.to_string().contains("x.ico"), "{e}");
        };
        refuse(&[0, 0, 1, 0, 0, 0], "no frames");
        refuse(&[0, 0, 1, 0, 2, 0, 16, 16], "truncated icon directory");
        let mut past = vec![0, 0, 1, 0, 1, 0, 16, 16, 0, 0, 1, 0, 32, 0, 40, 0, 0, 0];
        past.extend_from_slice(&1000u32.to_le_bytes());
        refuse(&past, "past the file's end");
        // The 24-bit fixture with its directory's size past the file's end
        // (the AND mask is read from the end of the frame as sized there).
        let mut long = std::fs::read(fixtures().join("bmp24.ico")).unwrap();
        long[14..18].copy_from_slice(&100_000u32.to_le_bytes());
        refuse(&long, "AND mask");
        // A header claiming a bitmap far over the pixel limit.
        let mut huge = std::fs::read(fixtures().join("bmp24.ico")).unwrap();
        huge[22 + 4..22 + 8].copy_from_slice(&100_000u32.to_le_bytes());
        huge[22 + 8..22 + 12].copy_from_slice(&200_000u32.to_le_bytes());
        refuse(&huge, "over the limit");
        // Runs that stop before the image is full fail as in Pillow ("not
        // enough image data"); without only the end-of-bitmap code, the
        // image is whole and decodes (as in Pillow 13, both checked).
        let rle = std::fs::read(fixtures().join("bmp8_rle.bmp")).unwrap();
        let e = crate::decode_image(&rle[..rle.len() - 30], "x.bmp", &limits).unwrap_err();
        assert!(e.to_string().contains("not enough image data"), "{e}");
        let whole = crate::decode_image(&rle, "x.bmp", &limits).unwrap();
        let no_end = crate::decode_image(&rle[..rle.len() - 2], "x.bmp", &limits).unwrap();
        assert_eq!(whole, no_end);
        for name in [
            "bmp32.ico",
            "bmp8.ico",
            "bmp1.ico",
            "png_rgba.ico",
            "bmp4_rle.bmp",
        ] {
            let bytes = std::fs::read(fixtures().join(name)).unwrap();
            for n in 0..bytes.len() {
                for keep_alpha in [false, true] {
                    let _ = decode(&bytes[..n], name, &limits, None, None, keep_alpha);
                }
            }
        }
        // Every fixture with bytes of its directory and headers changed at
        // random (a fixed seed): errors or images, never a panic. A smaller
        // pixel limit keeps headers that claim huge bitmaps cheap.
        let small = ImageLimits {
            max_pixels: 1 << 16,
            ..limits
        };
        let mut next = crate::fixture::xorshift(0x2545_f491_4f6c_dd1d);
        for entry in std::fs::read_dir(fixtures()).unwrap() {
            let path = entry.unwrap().path();
            if !path.extension().is_some_and(|x| x == "ico" || x == "bmp") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for _ in 0..200 {
                let mut b = bytes.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % b.len().min(80) as u64) as usize;
                    b[at] = next() as u8;
                }
                let _ = decode(&b, "mutated", &small, None, None, next().is_multiple_of(2));
            }
        }
    }
}
