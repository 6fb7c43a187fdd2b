//! The local backend through the `Embedder` trait: the shared conformance
//! checks, mixed requests, and a corpus of bad inputs that must each give
//! their documented result without disturbing the rest of the batch.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mmembed_candle::{DeviceSpec, LocalEmbedder, LocalOptions};
use mmembed_core::{EmbedError, EmbedRequest, Embedder, MediaSource, cosine, testkit};
use mmembed_media::Draft;
use mmembed_media::image_crate::{self as image, DynamicImage, ImageBuffer, ImageFormat, Rgb};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures")
}

fn tiny() -> LocalEmbedder {
    let dir = fixtures().join("tiny-clip");
    LocalEmbedder::load_blocking(
        LocalOptions::new(dir.to_str().unwrap())
            .with_device(DeviceSpec::Cpu)
            .with_max_batch(3),
    )
    .unwrap()
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header claims `w × h` but carries a 1×1 image's data: a
/// decompression-bomb-shaped file that must be refused from the header.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = encode(&DynamicImage::new_rgb8(1, 1), ImageFormat::Png);
    // Signature (8) + length (4) + "IHDR" (4), then width and height.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let e: Arc<dyn Embedder> = Arc::new(tiny());
    testkit::batch_contract(e.as_ref(), ["a photo of a cat", "a red square"]).await;
    testkit::refuses_unlisted_modalities(e.as_ref()).await;
    let info = e.info();
    assert_eq!(info.native_dimension, 16);
    assert_eq!(info.max_text_tokens, Some(77));
    assert!(
        info.space.as_str().starts_with("clip-blake3:"),
        "{}",
        info.space
    );
}

/// Another family's checkpoint behind the same trait: the shared contract,
/// its own dimension and context, and texts of different lengths batched
/// together giving what each gives alone (SigLIP pads every sequence to the
/// context; Chinese-CLIP masks the padding a batch adds).
async fn family_conformance(fixture: &str, dimension: usize, context: usize) {
    let dir = fixtures().join(fixture);
    let e = LocalEmbedder::load_blocking(
        LocalOptions::new(dir.to_str().unwrap())
            .with_device(DeviceSpec::Cpu)
            .with_max_batch(3),
    )
    .unwrap();
    testkit::batch_contract(&e, ["a photo of a cat", "a red square"]).await;
    testkit::refuses_unlisted_modalities(&e).await;
    let info = e.info();
    assert_eq!(info.native_dimension, dimension);
    assert_eq!(info.max_text_tokens, Some(context));
    assert!(
        info.space.as_str().starts_with("clip-blake3:"),
        "{}",
        info.space
    );
    let texts = [
        "x",
        "a photo of a cat",
        "a much longer caption about a cup of coffee on a saucer",
        "一只猫的照片",
    ];
    let batch = e
        .embed_batch(texts.iter().map(|t| EmbedRequest::text(*t)).collect())
        .await;
    for (t, r) in texts.iter().zip(batch) {
        let one = e.embed(EmbedRequest::text(*t)).await.unwrap();
        let c = cosine(
            r.unwrap().text.as_ref().unwrap(),
            one.text.as_ref().unwrap(),
        );
        assert!(c > 0.99999, "{fixture} {t}: batched vs single cosine {c}");
    }
    let img = e
        .embed(EmbedRequest::image(
            fixtures().join("images/cat_451x300.png"),
        ))
        .await
        .unwrap();
    assert_eq!(img.image.unwrap().len(), dimension);
}

/// SigLIP: the joint space is the vision width (32).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siglip_conformance() {
    family_conformance("tiny-siglip", 32, 64).await;
}

/// SigLIP 2 NaFlex: images of every aspect ratio through the pipeline's
/// batches (three a batch, so grids meet and part across batches, and a
/// broken image among them), each equal to transformers' vector for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siglip2_naflex_conformance_and_parity_through_the_pipeline() {
    family_conformance("tiny-siglip2-naflex", 32, 64).await;
    let dir = fixtures().join("tiny-siglip2-naflex");
    let e = LocalEmbedder::load_blocking(
        LocalOptions::new(dir.to_str().unwrap())
            .with_device(DeviceSpec::Cpu)
            .with_max_batch(3),
    )
    .unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let refs = candle_core::safetensors::load(
        dir.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let images: Vec<(String, String)> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["file"].as_str().unwrap().into(),
                i["key"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut reqs: Vec<_> = images
        .iter()
        .map(|(f, _)| EmbedRequest::image(fixtures().join("images").join(f)))
        .collect();
    reqs.insert(2, EmbedRequest::image(b"not an image".to_vec()));
    let got = e.embed_batch(reqs).await;
    assert!(got[2].is_err(), "{:?}", got[2]);
    let good = got
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, r)| r);
    for ((file, key), r) in images.iter().zip(good) {
        let want: Vec<f32> = refs[&format!("image.{key}")].to_vec1().unwrap();
        let c = cosine(r.as_ref().unwrap().image.as_ref().unwrap(), &want);
        assert!(c >= 0.99999, "{file}: cosine {c} to transformers");
    }

    // Another patch budget (transformers' `max_num_patches=24`): grids of
    // 2x10 to 7x3, each vector transformers' for that budget, and unlike
    // the default budget's.
    let small = LocalEmbedder::load_blocking(
        LocalOptions::new(dir.to_str().unwrap())
            .with_device(DeviceSpec::Cpu)
            .with_max_patches(24),
    )
    .unwrap();
    let reqs = images
        .iter()
        .map(|(f, _)| EmbedRequest::image(fixtures().join("images").join(f)))
        .collect();
    for ((file, key), r) in images.iter().zip(small.embed_batch(reqs).await) {
        let got = r.unwrap().image.unwrap();
        let want: Vec<f32> = refs[&format!("image24.{key}")].to_vec1().unwrap();
        let c = cosine(&got, &want);
        assert!(
            c >= 0.99999,
            "{file} in 24 patches: cosine {c} to transformers"
        );
        let other: Vec<f32> = refs[&format!("image.{key}")].to_vec1().unwrap();
        assert!(
            cosine(&got, &other) < 0.9999,
            "{file}: the budget changed nothing"
        );
    }
    // A budget out of range, or for a model of one image size, is a load
    // error that says so.
    for (fixture, n, needle) in [
        ("tiny-siglip2-naflex", 0, "1 to 16384"),
        ("tiny-siglip2-naflex", 16_385, "1 to 16384"),
        ("tiny-siglip", 64, "is for SigLIP 2 NaFlex models"),
    ] {
        let e = LocalEmbedder::load_blocking(
            LocalOptions::new(fixtures().join(fixture).to_str().unwrap())
                .with_device(DeviceSpec::Cpu)
                .with_max_patches(n),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(needle), "{fixture} {n}: {e}");
    }
}

/// Chinese-CLIP: BERT text tower, CLIP vision tower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chinese_clip_conformance() {
    family_conformance("tiny-chinese-clip", 16, 64).await;
}

/// MobileCLIP (open_clip's format): FastViT image towers (and ViT ones:
/// MobileCLIP-B's stem, MobileCLIP 2 L-14's patches), bidirectional or
/// causal text over the zero-padded context of 77.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mobileclip_conformance() {
    family_conformance("tiny-mobileclip", 16, 77).await;
    family_conformance("tiny-mobileclip2", 16, 77).await;
    family_conformance("tiny-mobileclip-b", 16, 77).await;
    family_conformance("tiny-mobileclip2-l14", 16, 77).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_image_in_one_request_and_across_batches() {
    let e = tiny();
    let cat = fixtures().join("images/cat_451x300.png");
    // Seven images with max_batch 3: three model batches; order must hold.
    let files = [
        "cat_451x300.png",
        "coffee_tall_180x400.png",
        "coffee_panorama_600x120.png",
        "astronaut_small_120x90.png",
        "camera_gray_300x260.png",
        "cat_rgba_451x300.png",
        "rocket_640x427.jpg",
    ];
    let reqs: Vec<_> = files
        .iter()
        .map(|f| EmbedRequest::image(fixtures().join("images").join(f)))
        .collect();
    let batch = e.embed_batch(reqs).await;
    for (f, r) in files.iter().zip(&batch) {
        let one = e
            .embed(EmbedRequest::image(fixtures().join("images").join(f)))
            .await
            .unwrap();
        let c = cosine(
            r.as_ref().unwrap().image.as_ref().unwrap(),
            one.image.as_ref().unwrap(),
        );
        assert!(c > 0.99999, "{f}: batched vs single cosine {c}");
    }
    // A broken image in the middle (decoded while the model runs the batch
    // before it) fails alone; the rest are unchanged and in place.
    let mut reqs: Vec<_> = files
        .iter()
        .map(|f| EmbedRequest::image(fixtures().join("images").join(f)))
        .collect();
    reqs.insert(4, EmbedRequest::image(b"not an image at all".to_vec()));
    let with_bad = e.embed_batch(reqs).await;
    assert_eq!(with_bad.len(), files.len() + 1);
    assert!(with_bad[4].is_err(), "{:?}", with_bad[4]);
    let good: Vec<_> = with_bad
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 4)
        .map(|(_, r)| r)
        .collect();
    for ((f, a), b) in files.iter().zip(&batch).zip(good) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let c = cosine(a.image.as_ref().unwrap(), b.image.as_ref().unwrap());
        assert!(c > 0.99999, "{f}: cosine {c} with a bad image in the batch");
    }

    let both = e
        .embed(EmbedRequest::text("a photo of a cat").with_image(cat.clone()))
        .await
        .unwrap();
    let t = both.text.unwrap();
    let i = both.image.unwrap();
    assert_eq!((t.len(), i.len(), both.dimension), (16, 16, 16));
    let norm: f32 = i.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "unit length, got {norm}");
    // Same image from bytes and from a path: same vector.
    let from_bytes = e
        .embed(EmbedRequest::image(std::fs::read(&cat).unwrap()))
        .await
        .unwrap();
    assert_eq!(from_bytes.image.unwrap(), i);
    assert_eq!(
        e.embed(EmbedRequest::text("a photo of a cat").with_dimension(16))
            .await
            .unwrap()
            .text
            .unwrap(),
        t
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_corpus_gives_documented_results_and_spares_the_batch() {
    let e = tiny();
    let dir = tempfile::tempdir().unwrap();
    let text_as_jpg = dir.path().join("notes.jpg");
    std::fs::write(&text_as_jpg, "this is a shopping list, not a photo\n").unwrap();
    let cat_png = std::fs::read(fixtures().join("images/cat_451x300.png")).unwrap();
    let one_px = encode(
        &DynamicImage::ImageRgb8(ImageBuffer::from_pixel(1, 1, Rgb([200, 10, 10]))),
        ImageFormat::Png,
    );
    let gray16 = encode(
        &DynamicImage::ImageLuma16(ImageBuffer::from_fn(64, 48, |x, y| {
            image::Luma([(x * 1000 + y * 300) as u16])
        })),
        ImageFormat::Png,
    );
    let rgba16 = encode(
        &DynamicImage::ImageRgba16(ImageBuffer::from_fn(40, 30, |x, _| {
            image::Rgba([60000, (x * 1500) as u16, 0, 30000])
        })),
        ImageFormat::Png,
    );
    let long = ["a very long caption that keeps going"; 30].join(" ");
    let longer = ["a very long caption that keeps going"; 60].join(" ");

    type Check = Box<dyn Fn(&Result<mmembed_core::Embeddings, EmbedError>) -> bool>;
    let invalid = |field: &'static str| -> Check {
        Box::new(move |r| matches!(r, Err(EmbedError::InvalidInput { field: f, .. }) if f == field))
    };
    let decode = |needle: &'static str| -> Check {
        Box::new(
            move |r| matches!(r, Err(e @ EmbedError::MediaDecode { .. }) if e.to_string().contains(needle)),
        )
    };
    let ok = || -> Check { Box::new(|r| r.is_ok()) };
    let cases: Vec<(&str, EmbedRequest, Check)> = vec![
        ("no modality", EmbedRequest::default(), invalid("request")),
        ("empty text", EmbedRequest::text(""), invalid("text")),
        (
            "whitespace text",
            EmbedRequest::text(" \t\n"),
            invalid("text"),
        ),
        ("long text", EmbedRequest::text(long.clone()), ok()),
        (
            "garbage bytes",
            EmbedRequest::image(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3]),
            decode("not a recognised image format"),
        ),
        (
            "text file named .jpg",
            EmbedRequest::image(text_as_jpg.clone()),
            decode("notes.jpg"),
        ),
        (
            "truncated PNG",
            EmbedRequest::image(cat_png[..cat_png.len() / 2].to_vec()),
            decode("corrupt or truncated"),
        ),
        (
            "PNG signature only",
            EmbedRequest::image(cat_png[..8].to_vec()),
            decode(""),
        ),
        ("1x1 image", EmbedRequest::image(one_px), ok()),
        (
            "20000x20000 header",
            EmbedRequest::image(png_claiming(20_000, 20_000)),
            decode("over the limit"),
        ),
        (
            "zero-size header",
            EmbedRequest::image(png_claiming(0, 5)),
            decode(""),
        ),
        ("16-bit grayscale", EmbedRequest::image(gray16), ok()),
        ("16-bit RGBA", EmbedRequest::image(rgba16), ok()),
        (
            "CMYK JPEG",
            EmbedRequest::image(fixtures().join("bad-input/cmyk.jpg")),
            ok(),
        ),
        (
            "zero bytes",
            EmbedRequest::image(Vec::new()),
            invalid("media"),
        ),
        (
            "missing file",
            EmbedRequest::image(dir.path().join("nope.png")),
            decode("file not found"),
        ),
        (
            "directory",
            EmbedRequest::image(dir.path().to_path_buf()),
            invalid("image"),
        ),
        (
            // gs://, s3://, az:// and http(s):// objects are fetched (see the
            // CLI's bucket tests); other schemes are refused.
            "ftp:// URI",
            EmbedRequest::image(MediaSource::Uri("ftp://host/cat.png".into())),
            invalid("image"),
        ),
        (
            // A still image is not a video: refused by the decoder with the
            // `video` feature, by the backend without it.
            "PNG as video",
            EmbedRequest::video(cat_png.clone(), None),
            Box::new(|r| {
                if cfg!(feature = "video") {
                    matches!(r, Err(EmbedError::MediaDecode { .. }))
                } else {
                    matches!(r, Err(EmbedError::UnsupportedModality { .. }))
                }
            }),
        ),
        (
            "dimension 1408",
            EmbedRequest::text("x").with_dimension(1408),
            Box::new(
                |r| matches!(r, Err(EmbedError::UnsupportedDimension { supported, .. }) if supported == &vec![16]),
            ),
        ),
        (
            "text ok + image bad",
            EmbedRequest::text("fine").with_image(vec![1u8, 2, 3]),
            decode(""),
        ),
        ("longer text", EmbedRequest::text(longer.clone()), ok()),
    ];
    let (names, (reqs, checks)): (Vec<_>, (Vec<_>, Vec<_>)) =
        cases.into_iter().map(|(n, r, c)| (n, (r, c))).unzip();
    let out = e.embed_batch(reqs).await;
    assert_eq!(out.len(), names.len());
    for ((name, check), r) in names.iter().zip(&checks).zip(&out) {
        assert!(check(r), "{name}: unexpected {r:?}");
        if let Err(err) = r {
            // Every error message is something a user can act on.
            assert!(!err.to_string().is_empty());
        }
    }
    // Truncation at 77 tokens keeps end-of-text: past the limit, more text
    // changes nothing.
    let at = |i: usize| out[i].as_ref().unwrap().text.clone().unwrap();
    let (li, lli) = (
        names.iter().position(|n| *n == "long text").unwrap(),
        names.iter().position(|n| *n == "longer text").unwrap(),
    );
    assert_eq!(at(li), at(lli));
}

fn copy_fixture(to: &Path) {
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixtures().join("tiny-clip").join(f), to.join(f)).unwrap();
    }
}

fn load_dir(dir: &Path) -> Result<LocalEmbedder, EmbedError> {
    LocalEmbedder::load_blocking(
        LocalOptions::new(dir.to_str().unwrap()).with_device(DeviceSpec::Cpu),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_checkpoint_with_another_architecture_loads_unchanged() {
    // A LAION-style tower (gelu, eps 1e-6), patch 16, 4 heads: nothing in the
    // code names these; config.json alone describes them.
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"projection_dim": 24,
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-6},
        "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1,
                          "num_attention_heads": 4, "patch_size": 16, "image_size": 64,
                          "hidden_act": "gelu", "layer_norm_eps": 1e-6}}"#;
    mmembed_candle::write_random_checkpoint(
        dir.path(),
        config,
        &fixtures().join("tiny-clip/tokenizer.json"),
        r#"{"size": 64, "crop_size": 64, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#,
    )
    .unwrap();
    let e = load_dir(dir.path()).unwrap();
    assert_eq!(e.info().native_dimension, 24);
    let r = e
        .embed(
            EmbedRequest::text("a photo of a cat")
                .with_image(fixtures().join("images/cat_451x300.png")),
        )
        .await
        .unwrap();
    assert_eq!(r.image.unwrap().len(), 24);
    assert_ne!(
        e.info().space,
        tiny().info().space,
        "different weights, different space"
    );
}

#[test]
fn weights_config_and_preprocessor_mismatches_are_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"hidden_size\": 16", "\"hidden_size\": 32"),
    )
    .unwrap();
    let e = load_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("do not match config.json"), "{e}");

    copy_fixture(dir.path());
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"size": 256, "crop_size": 256}"#,
    )
    .unwrap();
    let e = load_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("vision tower expects 224x224"), "{e}");

    copy_fixture(dir.path());
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{}garbage",
    )
    .unwrap();
    assert!(matches!(
        load_dir(dir.path()),
        Err(EmbedError::ModelLoad { .. })
    ));

    copy_fixture(dir.path());
    std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
    let e = load_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

/// A video sampling rate that is not a rate, or one no camera films at
/// (1e12 asked for 16 TB of sample times for a 2 s video), is refused before the
/// weights are read (the model named here does not exist).
#[test]
fn video_rates_are_checked_before_loading() {
    for fps in [0.0, -1.0, f64::NAN, f64::INFINITY, 1000.5, 1e12] {
        let opts = LocalOptions::new("/nonexistent/model").with_video_fps(fps);
        let e = LocalEmbedder::load_blocking(opts).unwrap_err().to_string();
        assert!(e.contains("between 0 and 1000"), "{fps}: {e}");
    }
    let e = LocalEmbedder::load_blocking(
        LocalOptions::new("/nonexistent/model").with_video_fps(1000.0),
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains("frame rate"), "{e}");
}

/// Concurrent callers' calls are merged into shared model batches by the
/// worker; each caller must still get exactly its own answers, bad items
/// included, equal to what it gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_get_their_own_answers() {
    let e = Arc::new(tiny());
    let call = |i: usize| -> Vec<EmbedRequest> {
        let mut v = vec![EmbedRequest::text(format!(
            "caller {i} says a photo of a cat"
        ))];
        if i.is_multiple_of(3) {
            v.push(EmbedRequest::image(b"not an image".to_vec()));
        }
        if i.is_multiple_of(4) {
            v.push(EmbedRequest::image(
                std::fs::read(fixtures().join("images/cat_451x300.png")).unwrap(),
            ));
        }
        v
    };
    let mut alone = Vec::new();
    for i in 0..24 {
        alone.push(e.embed_batch(call(i)).await);
    }
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let e = e.clone();
            tokio::spawn(async move { e.embed_batch(call(i)).await })
        })
        .collect();
    for (i, (t, want)) in tasks.into_iter().zip(alone).enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got.len(), want.len(), "caller {i}");
        for (g, w) in got.iter().zip(&want) {
            match (g, w) {
                (Ok(g), Ok(w)) => {
                    for (a, b) in [(&g.text, &w.text), (&g.image, &w.image)] {
                        if let (Some(a), Some(b)) = (a, b) {
                            assert!(cosine(a, b) > 0.99999, "caller {i}");
                        } else {
                            assert_eq!(a.is_some(), b.is_some(), "caller {i}");
                        }
                    }
                }
                (Err(g), Err(w)) => assert_eq!(g.to_string(), w.to_string()),
                other => panic!("caller {i}: {other:?}"),
            }
        }
    }
}

/// `jpeg_draft` reaches the decoder with the model's resize as the need: a
/// 640×480 JPEG embeds as its 320×240 reduction (decoded alone, as Pillow
/// would decode it; `mmembed-media`'s fixtures hold those pixels to
/// Pillow's) does without the option, and not as the whole image does.
#[tokio::test]
async fn jpeg_draft_embeds_the_reduced_decode() {
    let photo = image::RgbImage::from_fn(640, 480, |x, y| {
        let n = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) % 97;
        Rgb([(x / 3) as u8, (y / 2) as u8, (n * 2) as u8])
    });
    let jpeg = encode(&DynamicImage::ImageRgb8(photo), ImageFormat::Jpeg);
    let limits = mmembed_media::ImageLimits::default();
    // CLIP's 224 shortest edge: 298×224 of 640×480, so halved.
    let reduced =
        mmembed_media::decode_image_draft(&jpeg, "photo.jpg", &limits, Draft::JPEG, |_, _| {
            (298, 224)
        })
        .unwrap();
    assert_eq!(reduced.dimensions(), (320, 240));
    let png = encode(&DynamicImage::ImageRgb8(reduced), ImageFormat::Png);

    let dir = fixtures().join("tiny-clip");
    let draft = LocalEmbedder::load_blocking(
        LocalOptions::new(dir.to_str().unwrap())
            .with_device(DeviceSpec::Cpu)
            .with_jpeg_draft(true),
    )
    .unwrap();
    let exact = tiny();
    async fn embed(e: &LocalEmbedder, bytes: Vec<u8>) -> Vec<f32> {
        let mut r = e.embed_batch(vec![EmbedRequest::image(bytes)]).await;
        r.remove(0).unwrap().image.unwrap()
    }
    let drafted = embed(&draft, jpeg.clone()).await;
    assert_eq!(drafted, embed(&exact, png).await);
    let whole = embed(&exact, jpeg).await;
    assert_ne!(drafted, whole);
}

/// With `heic_thumbnail`, a HEIC photo whose embedded thumbnail covers
/// the model's resize embeds as that thumbnail (pillow-heif's `draft`;
/// `mmembed-media`'s fixtures hold the choice and the pixels to it): the
/// 400×300 fixture's 320×240 thumbnail for CLIP's 299×224. `jpeg_draft`
/// alone decodes it whole.
#[cfg(feature = "heif")]
#[tokio::test]
async fn heic_thumbnail_embeds_the_thumbnail() {
    let heic = std::fs::read(fixtures().join("heic/photo_400x300.heic")).unwrap();
    let limits = mmembed_media::ImageLimits::default();
    let thumb = mmembed_media::decode_image_draft(
        &heic,
        "photo.heic",
        &limits,
        Draft::HEIC_THUMBNAIL,
        |_, _| (299, 224),
    )
    .unwrap();
    assert_eq!(thumb.dimensions(), (320, 240));
    let png = encode(&DynamicImage::ImageRgb8(thumb), ImageFormat::Png);
    let dir = fixtures().join("tiny-clip");
    let load =
        |o: LocalOptions| LocalEmbedder::load_blocking(o.with_device(DeviceSpec::Cpu)).unwrap();
    let thumbnails = load(LocalOptions::new(dir.to_str().unwrap()).with_heic_thumbnail(true));
    let jpeg_draft = load(LocalOptions::new(dir.to_str().unwrap()).with_jpeg_draft(true));
    let exact = tiny();
    let embed = async |e: &LocalEmbedder, bytes: Vec<u8>| {
        let mut r = e.embed_batch(vec![EmbedRequest::image(bytes)]).await;
        r.remove(0).unwrap().image.unwrap()
    };
    let drafted = embed(&thumbnails, heic.clone()).await;
    assert_eq!(drafted, embed(&exact, png).await);
    let whole = embed(&exact, heic.clone()).await;
    assert_ne!(drafted, whole);
    assert_eq!(embed(&jpeg_draft, heic).await, whole);
}
