//! Decode and CLIP preprocessing of one image, the host's work per image in
//! `mmembed batch` (what bounds it on a GPU; see BENCHMARKS.md):
//!
//! - `decode/rocket_640x427`: libjpeg-turbo's decode of the committed photo
//!   (`models/fixtures/images`), exact and with `draft` (reduced in the
//!   IDCT as Pillow's `Image.draft` does);
//! - `resize_and_crop/noise_640x480`: ViT-B/32's preprocessing (bicubic
//!   shortest edge 224, centre crop 224) of seeded noise, the worst case for
//!   nothing and the same work as a photo of that size;
//! - `resize_and_crop/rocket_640x427`: the same for the photo;
//! - `into_row/…`: the photo to a batch row's bytes, decoded whole and then
//!   resized and cropped, or decoded only in the columns the crop reads
//!   (`decode_crop_into`, what the local backend does).
//!
//! Run: `cargo bench -p mmembed-media --bench image_preprocess`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use mmembed_media::image_crate::RgbImage;
use mmembed_media::{ClipPreprocessor, Draft, ImageLimits};

fn photo() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/fixtures/images/rocket_640x427.jpg");
    std::fs::read(&path).expect("the committed photo")
}

/// Seeded noise (xorshift), so every run filters the same bytes.
fn noise(w: u32, h: u32) -> RgbImage {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let bytes = (0..w * h * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 56) as u8
        })
        .collect();
    RgbImage::from_raw(w, h, bytes).expect("w*h*3 bytes")
}

fn bench(c: &mut Criterion) {
    let clip = ClipPreprocessor::openai(224);
    let limits = ImageLimits::default();
    let jpeg = photo();
    let mut g = c.benchmark_group("decode");
    g.bench_function("rocket_640x427", |b| {
        b.iter(|| {
            clip.decode(black_box(&jpeg), "photo", &limits, Draft::NONE)
                .unwrap()
        })
    });
    g.bench_function("rocket_640x427_draft", |b| {
        b.iter(|| {
            clip.decode(black_box(&jpeg), "photo", &limits, Draft::JPEG)
                .unwrap()
        })
    });
    g.finish();

    // The two ways into a batch row: decode whole then crop, or decode
    // only the columns the crop reads (what the local backend does).
    let (h, w) = clip.output_size();
    let mut row = vec![0u8; (h * w * 3) as usize];
    let mut g = c.benchmark_group("into_row");
    g.bench_function("decode_then_crop/rocket_640x427", |b| {
        b.iter(|| {
            let img = clip
                .decode(black_box(&jpeg), "photo", &limits, Draft::NONE)
                .unwrap();
            clip.crop_into(&img, &mut row).unwrap()
        })
    });
    g.bench_function("decode_crop_into/rocket_640x427", |b| {
        b.iter(|| {
            clip.decode_crop_into(black_box(&jpeg), "photo", &limits, Draft::NONE, &mut row)
                .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("resize_and_crop");
    let img = noise(640, 480);
    g.bench_function("noise_640x480", |b| {
        b.iter(|| clip.resize_and_crop(black_box(&img)))
    });
    let img = clip.decode(&jpeg, "photo", &limits, Draft::NONE).unwrap();
    g.bench_function("rocket_640x427", |b| {
        b.iter(|| clip.resize_and_crop(black_box(&img)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
