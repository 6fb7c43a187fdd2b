//! Local backend throughput with the ViT-B/32 architecture on random
//! weights (speed does not depend on weight values).
//!
//! `cargo bench --bench local_clip` — figures and the PyTorch comparison
//! (`models/fixtures/bench_pytorch.py`) are in the README's Performance
//! section. Set `MMEMBED_BENCH_THREADS` to pin candle's thread count
//! (it reads `RAYON_NUM_THREADS`).

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mmembed::local::candle_core::{DType, Device};
use mmembed::local::{
    DeviceSpec, LoadedClip, LocalEmbedder, LocalOptions, write_random_checkpoint,
};
use mmembed::{EmbedRequest, Embedder};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let fixtures = root().join("models/fixtures");
    let preprocessor =
        std::fs::read_to_string(fixtures.join("tiny-clip/preprocessor_config.json")).unwrap();
    write_random_checkpoint(
        dir.path(),
        mmembed::local::VIT_B_32_CONFIG_JSON,
        &fixtures.join("tiny-clip/tokenizer.json"),
        &preprocessor,
    )
    .expect("random ViT-B/32 checkpoint");
    let files = mmembed::local::local_files(dir.path()).unwrap();
    let clip = LoadedClip::load(&files, &Device::Cpu, DType::F32).unwrap();

    let cat = std::fs::read(fixtures.join("images/cat_451x300.png")).unwrap();
    let img = mmembed::media::decode_image(&cat, "cat", &Default::default()).unwrap();
    let pixels = clip.preprocessor.preprocess(&img);
    let long_text = ["a photo of a cat sitting on a red sofa"; 12].join(" ");
    let ids = clip.tokenizer.encode(&long_text).unwrap();
    assert_eq!(ids.len(), 77);
    let short_ids = clip.tokenizer.encode("a photo of a cat").unwrap();

    let mut g = c.benchmark_group("model");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));
    for batch in [1usize, 8, 32] {
        let input: Vec<Vec<f32>> = vec![pixels.clone(); batch];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("images", batch), &input, |b, input| {
            b.iter(|| black_box(clip.embed_pixels(input).unwrap()))
        });
    }
    for batch in [1usize, 32] {
        let input = vec![ids.clone(); batch];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("texts77", batch), &input, |b, input| {
            b.iter(|| black_box(clip.embed_token_ids(input).unwrap()))
        });
    }
    let input = vec![short_ids.clone(); 32];
    g.throughput(Throughput::Elements(32));
    g.bench_with_input(BenchmarkId::new("texts7", 32), &input, |b, input| {
        b.iter(|| black_box(clip.embed_token_ids(input).unwrap()))
    });
    g.finish();

    // End to end through the trait: PNG decode + resize + model, on the
    // worker thread, awaited from tokio.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let local = LocalEmbedder::load_blocking(
        LocalOptions::new(dir.path().to_str().unwrap()).with_device(DeviceSpec::Cpu),
    )
    .unwrap();
    let mut g = c.benchmark_group("embedder");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));
    g.throughput(Throughput::Elements(8));
    g.bench_function("png_images/8", |b| {
        b.iter(|| {
            let reqs = (0..8).map(|_| EmbedRequest::image(cat.clone())).collect();
            let out = rt.block_on(local.embed_batch(reqs));
            assert!(out.iter().all(Result::is_ok));
            black_box(out)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
