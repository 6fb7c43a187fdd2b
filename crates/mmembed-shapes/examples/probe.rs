//! Which attributes a demo-style model has learnt, one at a time:
//! `cargo run --release -p mmembed-shapes --example probe -- DIR`.
//!
//! The quality test (`tests/demo_model.rs`) reports zero-shot accuracy and
//! recall@1, which mix every attribute; this tells them apart. For each of
//! the 480 attribute combinations it renders a scene the trainer never drew
//! and asks, among full captions that differ from the true one in a single
//! attribute, which one the image is nearest to. Chance: shape 1/6, colour
//! 1/8, size 1/2, position 1/5.

use mmembed_candle::{DeviceSpec, LocalEmbedder, LocalOptions};
use mmembed_core::{EmbedRequest, Embedder, cosine};
use mmembed_shapes::{Attributes, Colour, Position, Scene, Shape, Size};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encodes");
    out.into_inner()
}

async fn embed(e: &LocalEmbedder, reqs: Vec<EmbedRequest>, image: bool) -> Vec<Vec<f32>> {
    e.embed_batch(reqs)
        .await
        .into_iter()
        .map(|r| {
            let r = r.expect("embeds");
            if image { r.image } else { r.text }.expect("vector")
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/demo".into());
    let e = LocalEmbedder::load_blocking(
        LocalOptions::new(&dir)
            .with_device(DeviceSpec::Cpu)
            .with_max_batch(64),
    )
    .expect("the model loads");
    let scenes = Attributes::all();
    let mut rng = ChaCha8Rng::seed_from_u64(0x9b0be);
    let images: Vec<EmbedRequest> = scenes
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            EmbedRequest::image(png(&Scene::random(a, &mut rng).render(112, 112, i as u64)))
        })
        .collect();
    let image_vectors = embed(&e, images, true).await;
    let texts: Vec<EmbedRequest> = scenes
        .iter()
        .map(|a| EmbedRequest::text(a.full_caption()))
        .collect();
    let text_vectors = embed(&e, texts, false).await;
    let index = |a: &Attributes| {
        scenes
            .iter()
            .position(|s| s == a)
            .expect("every combination")
    };

    type Vary = fn(Attributes) -> Vec<Attributes>;
    let probes: [(&str, Vary); 4] = [
        ("shape", |a| {
            Shape::ALL
                .iter()
                .map(|&shape| Attributes { shape, ..a })
                .collect()
        }),
        ("colour", |a| {
            Colour::ALL
                .iter()
                .map(|&colour| Attributes { colour, ..a })
                .collect()
        }),
        ("size", |a| {
            Size::ALL
                .iter()
                .map(|&size| Attributes { size, ..a })
                .collect()
        }),
        ("position", |a| {
            Position::ALL
                .iter()
                .map(|&position| Attributes { position, ..a })
                .collect()
        }),
    ];
    for (name, vary) in probes {
        let mut right = 0;
        for (a, v) in scenes.iter().zip(&image_vectors) {
            let options = vary(*a);
            let best = options
                .iter()
                .max_by(|x, y| {
                    let sx = cosine(&text_vectors[index(x)], v);
                    let sy = cosine(&text_vectors[index(y)], v);
                    sx.total_cmp(&sy)
                })
                .expect("options");
            right += (best == a) as usize;
        }
        println!(
            "{name:>8}: {right}/{} = {:.1} % (chance {:.1} %)",
            scenes.len(),
            100.0 * right as f64 / scenes.len() as f64,
            100.0 / vary(scenes[0]).len() as f64
        );
    }
    // How far apart the text tower puts captions that differ only in position.
    let mut sum = 0.0;
    let mut n = 0;
    for a in &scenes {
        for p in Position::ALL {
            if p != a.position {
                let b = Attributes { position: p, ..*a };
                sum += cosine(&text_vectors[index(a)], &text_vectors[index(&b)]);
                n += 1;
            }
        }
    }
    println!(
        "text cosine between captions differing only in position: {:.4}",
        sum / n as f32
    );
}
