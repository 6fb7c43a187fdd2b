//! The BMPs whose pixels the `image` crate makes otherwise than Pillow.
//!
//! - 16 bits a pixel: Pillow widens 5- and 6-bit samples by truncating
//!   (`v · 255 / 31`, `v · 255 / 63`, its `BGR;15` and `BGR;16`
//!   unpackers); the `image` crate rounds, a level higher on about half
//!   the values. The layouts Pillow reads (5-5-5, the default and as
//!   bitfields, and 5-6-5) decode here; any other is left to the `image`
//!   crate, which Pillow would refuse anyway.
//! - Run-length coded (RLE8, RLE4): pixels a delta skips or an end of line
//!   leaves are palette index 0 to Pillow, black to the `image` crate.
//!   Decoded here as Pillow's `BmpRleDecoder` does, step for step.
//!
//! Every other BMP (1 to 32 bits, bitfields, core headers, top-down) the
//! `image` crate decodes exactly as Pillow (`models/fixtures/make_ico_bmp.py`).

use image::RgbImage;

/// A BMP file's pixels where Pillow's differ from the `image` crate's
/// (16 bits a pixel, run-length coding), as Pillow makes them; `None` for
/// the others, which the `image` crate decodes as Pillow does.
pub(crate) fn decode(bmp: &[u8], max_pixels: u64) -> Option<Result<RgbImage, String>> {
    decode_16_bit(bmp, max_pixels)
        .map(Ok)
        .or_else(|| decode_rle(bmp, max_pixels))
}

/// The little-endian `u16` at `at`, if the bytes reach that far (BMP's and
/// ICO's headers).
pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// The little-endian `u32` at `at`, if the bytes reach that far.
pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The pixels of a BMP file (`BM`, a BITMAPINFOHEADER or later) of 16 bits
/// a pixel in one of Pillow's layouts, decoded as Pillow decodes them;
/// `None` for any other BMP, or one whose pixels are cut short (for the
/// `image` crate's decoder and its error). `max_pixels` is checked first.
fn decode_16_bit(bmp: &[u8], max_pixels: u64) -> Option<RgbImage> {
    if !bmp.starts_with(b"BM") {
        return None;
    }
    let pixels_at = u32_at(bmp, 10)? as usize;
    let dib = bmp.get(14..)?;
    let header = u32_at(dib, 0)?;
    if header < 40 || u16_at(dib, 14)? != 16 {
        return None;
    }
    let (width, height) = (u32_at(dib, 4)? as i32, u32_at(dib, 8)? as i32);
    // Where BI_BITFIELDS (3) keeps its masks: after a 40-byte header, else
    // in the header itself (V2 and later).
    let green = match u32_at(dib, 16)? {
        0 => 0x3E0,
        3 => {
            let masks = [u32_at(dib, 40)?, u32_at(dib, 44)?, u32_at(dib, 48)?];
            match masks {
                [0x7C00, 0x3E0, 0x1F] => 0x3E0,
                [0xF800, 0x7E0, 0x1F] => 0x7E0,
                _ => return None,
            }
        }
        _ => return None,
    };
    let (w, h) = (width.try_into().ok()?, height.unsigned_abs());
    if w == 0 || h == 0 || u64::from(w) * u64::from(h) > max_pixels {
        return None;
    }
    let (wu, hu) = (w as usize, h as usize);
    let stride = (wu * 2).div_ceil(4) * 4;
    let data = bmp.get(pixels_at..)?.get(..stride.checked_mul(hu)?)?;
    let mut out = RgbImage::new(w, h);
    let widen = |v: u16, max: u16| (u32::from(v) * 255 / u32::from(max)) as u8;
    for (row, line) in data.chunks_exact(stride).enumerate() {
        // Rows bottom-up unless the height is negative.
        let y = if height > 0 { hu - 1 - row } else { row };
        for (x, px) in line[..wu * 2].chunks_exact(2).enumerate() {
            let v = u16::from_le_bytes([px[0], px[1]]);
            let rgb = if green == 0x7E0 {
                [
                    widen(v >> 11, 31),
                    widen(v >> 5 & 63, 63),
                    widen(v & 31, 31),
                ]
            } else {
                [
                    widen(v >> 10 & 31, 31),
                    widen(v >> 5 & 31, 31),
                    widen(v & 31, 31),
                ]
            };
            out.put_pixel(x as u32, y as u32, image::Rgb(rgb));
        }
    }
    Some(out)
}

/// A run-length coded BMP (RLE8, or RLE4) with a colour palette, as
/// Pillow decodes it; `None` for any other BMP (and for a grey palette of
/// two colours, which Pillow reads as mode "1", left to the `image`
/// crate). `Some(Err)` where Pillow fails too: runs that end before the
/// image is filled ("not enough image data").
fn decode_rle(bmp: &[u8], max_pixels: u64) -> Option<Result<RgbImage, String>> {
    if !bmp.starts_with(b"BM") {
        return None;
    }
    let offset = u32_at(bmp, 10)? as usize;
    let dib = bmp.get(14..)?;
    let header = u32_at(dib, 0)? as usize;
    if !matches!(header, 40 | 52 | 56 | 64 | 108 | 124) {
        return None;
    }
    let four = match (u16_at(dib, 14)?, u32_at(dib, 16)?) {
        (8, 1) => false,
        (4, 2) => true,
        _ => return None,
    };
    let width = u32_at(dib, 4)? as i32;
    let raw_height = u32_at(dib, 8)?;
    // Pillow: a height whose top byte is 0xFF is stored top-down.
    let top_down = raw_height >> 24 == 0xFF;
    let height = if top_down {
        raw_height.wrapping_neg()
    } else {
        raw_height
    };
    let (w, h) = (u32::try_from(width).ok()?, height);
    if w == 0 || h == 0 || u64::from(w) * u64::from(h) > max_pixels {
        return None;
    }
    let colours = match u32_at(dib, 32)? {
        0 => 1 << if four { 4 } else { 8 },
        n => n,
    } as usize;
    let palette_at = 14 + header;
    let palette = bmp.get(palette_at..(palette_at + 4 * colours).min(bmp.len()))?;
    let entry = |i: usize| palette.get(4 * i..4 * i + 3).map(|c| [c[2], c[1], c[0]]);
    let grey = (0..colours).all(|i| {
        let v = if colours == 2 { [0, 255][i] } else { i as u8 };
        entry(i) == Some([v; 3])
    });
    if grey && colours <= 2 {
        return None;
    }
    // Pillow takes the file's pixel offset, unless it points at the
    // palette (then the pixels follow it).
    let start = if offset == palette_at {
        palette_at + 4 * colours
    } else {
        offset
    };
    let (wu, hu) = (w as usize, h as usize);
    let dest = wu * hu;
    let mut data: Vec<u8> = Vec::with_capacity(dest.min(bmp.len().saturating_mul(510)));
    let mut at = start;
    let mut x = 0usize;
    let next = |at: &mut usize| {
        let b = bmp.get(*at).copied();
        *at += 1;
        b
    };
    while data.len() < dest {
        let (Some(count), Some(byte)) = (next(&mut at), next(&mut at)) else {
            break;
        };
        let count = usize::from(count);
        if count > 0 {
            // Encoded: `count` pixels of one index (RLE4: two alternating).
            let n = count.min(wu.saturating_sub(x));
            let pair = if four {
                [byte >> 4, byte & 0x0F]
            } else {
                [byte, byte]
            };
            data.extend((0..n).map(|i| pair[i % 2]));
            x += n;
            continue;
        }
        match byte {
            0 => {
                // End of line: the rest of the row is index 0.
                let row_end = data.len().div_ceil(wu) * wu;
                data.resize(row_end, 0);
                x = 0;
            }
            1 => break,
            2 => {
                let (Some(right), Some(up)) = (next(&mut at), next(&mut at)) else {
                    break;
                };
                let skip = usize::from(right) + usize::from(up) * wu;
                data.resize(data.len() + skip.min(dest - data.len()), 0);
                x = data.len() % wu;
            }
            n => {
                // Absolute: `n` indices as they are, then to a word boundary
                // (of the file, as Pillow's position in it).
                let n = usize::from(n);
                let count = n.min(dest - data.len());
                let bytes = if four { count.div_ceil(2) } else { count };
                let read = &bmp[at.min(bmp.len())..(at + bytes).min(bmp.len())];
                at += bytes;
                if four {
                    for (i, b) in read.iter().enumerate() {
                        data.push(b >> 4);
                        if i * 2 + 1 < count {
                            data.push(b & 0x0F);
                        }
                    }
                } else {
                    data.extend_from_slice(read);
                }
                if read.len() < bytes || data.len() == dest {
                    break;
                }
                x += n;
                at += at % 2;
            }
        }
    }
    if data.len() < dest {
        return Some(Err("not enough image data in its runs".into()));
    }
    data.truncate(dest);
    let mut out = RgbImage::new(w, h);
    for (row, line) in data.chunks_exact(wu).enumerate() {
        let y = if top_down { row } else { hu - 1 - row };
        for (xx, &i) in line.iter().enumerate() {
            // A grey palette is mode "L" to Pillow: the index is the grey.
            // Indices past a colour palette are black.
            let rgb = if grey {
                [i; 3]
            } else {
                entry(usize::from(i))
                    .filter(|_| usize::from(i) < colours)
                    .unwrap_or([0; 3])
            };
            out.put_pixel(xx as u32, y as u32, image::Rgb(rgb));
        }
    }
    Some(Ok(out))
}
