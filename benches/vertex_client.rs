//! Client overhead of the Vertex backend against the loopback fake that
//! answers at once: what the client itself costs per request (JSON, base64,
//! auth headers, pacing, HTTP), at concurrency 1 and 16.
//!
//! `cargo bench --bench vertex_client`; figures in the README.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mmembed::media::image_crate::{self as image, ImageFormat};
use mmembed::vertex::fake::FakeVertex;
use mmembed::vertex::{VertexConfig, VertexEmbedder};
use mmembed::{EmbedRequest, Embedder};

fn jpeg_512() -> Vec<u8> {
    let cat = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/images/cat_451x300.png");
    let img = image::open(cat).expect("fixture photo").to_rgb8();
    let img = image::imageops::resize(&img, 512, 512, image::imageops::FilterType::CatmullRom);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Jpeg).expect("encode");
    out.into_inner()
}

fn bench(c: &mut Criterion) {
    let fake = FakeVertex::start().expect("fake server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = VertexEmbedder::new(
        VertexConfig::new("bench-project")
            .with_base_url(&fake.url)
            .with_access_token("bench-token")
            .with_requests_per_minute(100_000_000)
            .with_max_concurrency(16),
    )
    .unwrap();
    let jpeg = jpeg_512();

    let mut g = c.benchmark_group("vertex_client");
    g.sample_size(30).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(1));
    g.bench_function("jpeg512/concurrency1", |b| {
        b.iter(|| {
            let r = rt.block_on(client.embed(EmbedRequest::image(jpeg.clone())));
            black_box(r.expect("fake answers"))
        })
    });
    g.bench_function("text/concurrency1", |b| {
        b.iter(|| {
            let r = rt.block_on(client.embed(EmbedRequest::text("a photo of a cat")));
            black_box(r.expect("fake answers"))
        })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("jpeg512/concurrency16", |b| {
        b.iter(|| {
            let reqs = (0..64).map(|_| EmbedRequest::image(jpeg.clone())).collect();
            let out = rt.block_on(client.embed_batch(reqs));
            assert!(out.iter().all(Result::is_ok));
            black_box(out)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
