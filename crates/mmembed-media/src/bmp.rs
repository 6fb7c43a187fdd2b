//! 16-bit BMPs as Pillow reads them.
//!
//! Pillow widens 5- and 6-bit samples by truncating (`v · 255 / 31`,
//! `v · 255 / 63`, its `BGR;15` and `BGR;16` unpackers); the `image` crate
//! rounds, a level higher on about half the values. The layouts Pillow
//! reads (5-5-5, the default and as bitfields, and 5-6-5) decode here; any
//! other is left to the `image` crate, which Pillow would refuse anyway.

use image::RgbImage;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The pixels of a BMP file (`BM`, a BITMAPINFOHEADER or later) of 16 bits
/// a pixel in one of Pillow's layouts, decoded as Pillow decodes them;
/// `None` for any other BMP, or one whose pixels are cut short (for the
/// `image` crate's decoder and its error). `max_pixels` is checked first.
pub(crate) fn decode_16_bit(bmp: &[u8], max_pixels: u64) -> Option<RgbImage> {
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
