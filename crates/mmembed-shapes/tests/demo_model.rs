//! Quality of the bundled demo model (`models/demo`), measured on scenes the
//! trainer never drew (other seeds), through the public local backend: the
//! same loading, preprocessing and tokenizing path as any CLIP checkpoint.

use std::path::{Path, PathBuf};

use mmembed_candle::{DeviceSpec, LocalEmbedder, LocalOptions, Precision};
use mmembed_core::{EmbedRequest, Embedder, VideoSegmentConfig, cosine, testkit};
use mmembed_shapes::{Attributes, Colour, Position, Scene, Shape, Size};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// `models/demo`, or the model directory in `MMEMBED_DEMO_MODEL_DIR` (to
/// measure a retrained model before it replaces the committed one).
fn demo_dir() -> PathBuf {
    match std::env::var_os("MMEMBED_DEMO_MODEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo"),
    }
}

fn demo() -> LocalEmbedder {
    demo_at(Precision::F32)
}

fn demo_at(precision: Precision) -> LocalEmbedder {
    LocalEmbedder::load_blocking(
        LocalOptions::new(demo_dir().to_str().expect("utf-8 path"))
            .with_device(DeviceSpec::Cpu)
            .with_precision(precision)
            .with_max_batch(64),
    )
    .expect("models/demo loads")
}

/// Both CPU precisions: the quantised path is held to the same floors.
const PRECISIONS: [Precision; 2] = [Precision::F32, Precision::Int8];

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encodes");
    out.into_inner()
}

async fn embed_texts(e: &LocalEmbedder, texts: &[String]) -> Vec<Vec<f32>> {
    let reqs = texts
        .iter()
        .map(|t| EmbedRequest::text(t.clone()))
        .collect();
    e.embed_batch(reqs)
        .await
        .into_iter()
        .map(|r| r.expect("text embeds").text.expect("text vector"))
        .collect()
}

async fn embed_images(e: &LocalEmbedder, images: &[image::RgbImage]) -> Vec<Vec<f32>> {
    let reqs = images.iter().map(|i| EmbedRequest::image(png(i))).collect();
    e.embed_batch(reqs)
        .await
        .into_iter()
        .map(|r| r.expect("image embeds").image.expect("image vector"))
        .collect()
}

// Issue #5's targets: >= 95 % zero-shot top-1 and >= 90 % recall@1. The
// committed model measures 99.4 % and 94 (see models/demo/README.md); a
// broken loader, tokenizer or preprocessing drops it to chance (~2 % and
// ~1 %).
const ZERO_SHOT_FLOOR: f64 = 0.95;
const RECALL_AT_1_FLOOR: usize = 90;

fn argmax(scores: impl Iterator<Item = f32>) -> usize {
    scores
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
        .expect("non-empty")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_shot_classification_over_every_colour_and_shape() {
    let mut f32_vectors = Vec::new();
    for precision in PRECISIONS {
        let vectors = zero_shot(precision).await;
        if precision == Precision::F32 {
            f32_vectors = vectors;
        } else {
            let n = vectors.len() as f32;
            let mean = f32_vectors
                .iter()
                .zip(&vectors)
                .map(|(a, b)| cosine(a, b))
                .sum::<f32>()
                / n;
            eprintln!("{precision:?} image embeddings: mean cosine to f32 {mean:.6}");
            assert!(mean >= 0.999, "{precision:?}: mean cosine to f32 {mean}");
        }
    }
}

/// Zero-shot accuracy at one precision (asserted); returns the image
/// embeddings.
async fn zero_shot(precision: Precision) -> Vec<Vec<f32>> {
    let e = demo_at(precision);
    let classes: Vec<(Shape, Colour)> = Shape::ALL
        .iter()
        .flat_map(|&s| Colour::ALL.iter().map(move |&c| (s, c)))
        .collect();
    let captions: Vec<String> = classes
        .iter()
        .map(|&(shape, colour)| {
            Attributes {
                shape,
                colour,
                size: Size::Small,
                position: Position::Center,
            }
            .class_caption()
        })
        .collect();
    let text = embed_texts(&e, &captions).await;

    // Every attribute combination once (480 scenes), rendered at a side the
    // trainer never used.
    let mut rng = ChaCha8Rng::seed_from_u64(0xe7a1);
    let scenes: Vec<Attributes> = Attributes::all();
    let images: Vec<_> = scenes
        .iter()
        .enumerate()
        .map(|(i, &a)| Scene::random(a, &mut rng).render(112, 112, i as u64))
        .collect();
    let vectors = embed_images(&e, &images).await;
    let mut correct = 0;
    for (a, v) in scenes.iter().zip(&vectors) {
        let best = argmax(text.iter().map(|t| cosine(t, v)));
        if classes[best] == (a.shape, a.colour) {
            correct += 1;
        } else if std::env::var_os("MMEMBED_DEMO_ERRORS").is_some() {
            eprintln!("{a:?} -> {:?}", classes[best]);
        }
    }
    let acc = correct as f64 / scenes.len() as f64;
    eprintln!(
        "{precision:?} zero-shot top-1 over {} classes: {correct}/{} = {:.1} %",
        classes.len(),
        scenes.len(),
        acc * 100.0
    );
    assert!(
        acc >= ZERO_SHOT_FLOOR,
        "{precision:?} zero-shot top-1 {acc:.3} < {ZERO_SHOT_FLOOR}"
    );
    vectors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_to_image_retrieval_among_100_distinct_scenes() {
    for precision in PRECISIONS {
        retrieval(precision).await;
    }
}

async fn retrieval(precision: Precision) {
    let e = demo_at(precision);
    let mut rng = ChaCha8Rng::seed_from_u64(0x7e7);
    let mut combos = Attributes::all();
    combos.shuffle(&mut rng);
    combos.truncate(100);
    let images: Vec<_> = combos
        .iter()
        .enumerate()
        .map(|(i, &a)| Scene::random(a, &mut rng).render(128, 128, 1000 + i as u64))
        .collect();
    let captions: Vec<String> = combos.iter().map(Attributes::full_caption).collect();
    let text = embed_texts(&e, &captions).await;
    let vectors = embed_images(&e, &images).await;
    let mut hits = 0;
    for (i, t) in text.iter().enumerate() {
        let best = argmax(vectors.iter().map(|v| cosine(t, v)));
        if best == i {
            hits += 1;
        } else if std::env::var_os("MMEMBED_DEMO_ERRORS").is_some() {
            eprintln!("{:?} -> {:?}", combos[i], combos[best]);
        }
    }
    eprintln!("{precision:?} text->image recall@1 among 100 scenes: {hits}/100");
    assert!(
        hits >= RECALL_AT_1_FLOOR,
        "{precision:?} recall@1 {hits}/100 < {RECALL_AT_1_FLOOR}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_model_is_an_ordinary_checkpoint_with_its_own_space() {
    let e = demo();
    let info = e.info();
    assert_eq!(info.native_dimension, 64);
    assert!(
        info.space.as_str().starts_with("clip-blake3:"),
        "{}",
        info.space
    );
    testkit::batch_contract(&e, ["a red circle", "a small blue star on the left"]).await;
    let size: u64 = std::fs::read_dir(demo_dir())
        .expect("models/demo")
        .map(|f| f.expect("entry").metadata().expect("metadata").len())
        .sum();
    assert!(size <= 5 * 1024 * 1024, "models/demo is {size} bytes");
}

/// Scene i shown from 4·i to 4·(i+1) s, H.264 at 25 fps.
fn slideshow(dir: &Path, scenes: &[image::RgbImage], seconds: u32) -> PathBuf {
    for (i, img) in scenes.iter().enumerate() {
        img.save(dir.join(format!("scene{i:02}.png")))
            .expect("PNG writes");
    }
    let out = dir.join("shapes.mp4");
    let rate = format!("1/{seconds}");
    let pattern = dir.join("scene%02d.png");
    testkit::ffmpeg([
        "-framerate".as_ref(),
        rate.as_ref(),
        "-i".as_ref(),
        pattern.as_os_str(),
        "-vf".as_ref(),
        "fps=25,format=yuv420p".as_ref(),
        "-c:v".as_ref(),
        "libx264".as_ref(),
        "-g".as_ref(),
        "50".as_ref(),
        out.as_os_str(),
    ]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_slideshow_segment_is_nearest_to_its_own_caption() {
    let e = demo();
    let mut rng = ChaCha8Rng::seed_from_u64(0x51de);
    let shown: Vec<Attributes> = [
        (Shape::Circle, Colour::Red),
        (Shape::Star, Colour::Yellow),
        (Shape::Square, Colour::Blue),
        (Shape::Triangle, Colour::Green),
        (Shape::Cross, Colour::Purple),
        (Shape::Ring, Colour::Orange),
        (Shape::Square, Colour::White),
        (Shape::Star, Colour::Black),
    ]
    .into_iter()
    .map(|(shape, colour)| Attributes {
        shape,
        colour,
        size: Size::Large,
        position: Position::Center,
    })
    .collect();
    let frames: Vec<_> = shown
        .iter()
        .enumerate()
        .map(|(i, &a)| Scene::random(a, &mut rng).render(320, 240, i as u64))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let video = slideshow(dir.path(), &frames, 4);
    let cfg = VideoSegmentConfig::new(0, 4 * shown.len() as u32, 4).expect("valid config");
    let out = e
        .embed(EmbedRequest::video(video, Some(cfg)))
        .await
        .expect("video embeds");
    assert_eq!(out.video.len(), shown.len());
    let captions: Vec<String> = shown.iter().map(Attributes::class_caption).collect();
    let text = embed_texts(&e, &captions).await;
    for (i, seg) in out.video.iter().enumerate() {
        assert_eq!(seg.error, None);
        let v = &seg.embedding;
        let best = argmax(text.iter().map(|t| cosine(t, v)));
        assert_eq!(
            best, i,
            "segment {}..{} s is nearest to `{}`, not `{}`",
            seg.start_sec, seg.end_sec, captions[best], captions[i]
        );
    }
}
