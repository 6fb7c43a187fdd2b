//! Backends side by side on the same inputs: texts (batch 1 and 32), images
//! (batch 1 and 32), a 60 s video at intervals of 4, 8 and 16 s.
//!
//! Backends, each when available in the build and on the machine:
//! - `local-demo`: the bundled demo model on CPU;
//! - `local-vit-b32`: the ViT-B/32 architecture with random weights on CPU
//!   (the cost of a real CLIP, without pretrained weights);
//! - `local-vit-b32-cuda` / `-metal`: the same on a GPU (features `cuda`,
//!   `metal`);
//! - `vertex-fake`: the Vertex client against the loopback fake answering
//!   after `MMEMBED_BENCH_FAKE_LATENCY_MS` (default 50) ms;
//! - `vertex-live`: the real service, when `GOOGLE_CLOUD_PROJECT` and
//!   credentials are set (billed!).
//!
//! `cargo bench --bench backends` (add a filter such as `-- text` to run a
//! part); figures in BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mmembed::local::{DeviceSpec, LocalEmbedder, LocalOptions, write_random_checkpoint};
use mmembed::media::image_crate::{self as image, ImageFormat};
use mmembed::vertex::fake::FakeVertex;
use mmembed::vertex::{VertexConfig, VertexEmbedder};
use mmembed::{EmbedRequest, Embedder, VideoSegmentConfig};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The 60 s clip, made once with the ffmpeg CLI.
fn video() -> PathBuf {
    let dir = root().join("target/bench-media");
    let out = dir.join("sixty-seconds-640x360.mp4");
    if !out.exists() {
        std::fs::create_dir_all(&dir).expect("target/bench-media");
        let tmp = dir.join("partial-60s.mp4");
        let st = std::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
            ])
            .arg("testsrc2=size=640x360:rate=25:duration=60")
            .args([
                "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
            ])
            .arg(&tmp)
            .status()
            .expect("the ffmpeg CLI runs");
        assert!(st.success(), "ffmpeg failed to make the bench video");
        std::fs::rename(&tmp, &out).expect("rename");
    }
    out
}

fn photos() -> Vec<Vec<u8>> {
    let dir = root().join("models/fixtures/images");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("fixture images")
        .filter_map(|e| {
            let p = e.ok()?.path();
            matches!(p.extension()?.to_str()?, "png" | "jpg").then(|| std::fs::read(p).ok())?
        })
        .collect();
    // Vertex wants at most 20 MB; the fixtures are small. Re-encode the
    // first as JPEG too, the usual format of photo collections.
    let img = image::load_from_memory(&out[0]).expect("decodes").to_rgb8();
    let mut jpeg = std::io::Cursor::new(Vec::new());
    img.write_to(&mut jpeg, ImageFormat::Jpeg).expect("encode");
    out.push(jpeg.into_inner());
    out
}

const CAPTIONS: [&str; 4] = [
    "a photo of a red circle",
    "a small blue square on the left",
    "a photo of a dog playing in the snow",
    "two cups of coffee on a wooden table",
];

fn backends(
    rt: &tokio::runtime::Runtime,
    tmp: &Path,
) -> Vec<(String, Arc<dyn Embedder>, Option<FakeVertex>)> {
    let mut out: Vec<(String, Arc<dyn Embedder>, Option<FakeVertex>)> = vec![];
    let load = |model: &str, device: DeviceSpec| {
        rt.block_on(LocalEmbedder::load(
            LocalOptions::new(model).with_device(device),
        ))
    };
    out.push((
        "local-demo".into(),
        Arc::new(load("mmembed/demo", DeviceSpec::Cpu).expect("demo model")),
        None,
    ));
    let fixtures = root().join("models/fixtures/tiny-clip");
    let vit = tmp.join("vit-b-32");
    std::fs::create_dir_all(&vit).unwrap();
    let preprocessor = std::fs::read_to_string(fixtures.join("preprocessor_config.json")).unwrap();
    write_random_checkpoint(
        &vit,
        mmembed::local::VIT_B_32_CONFIG_JSON,
        &fixtures.join("tokenizer.json"),
        &preprocessor,
    )
    .expect("random ViT-B/32");
    let vit = vit.to_string_lossy().into_owned();
    out.push((
        "local-vit-b32".into(),
        Arc::new(load(&vit, DeviceSpec::Cpu).expect("ViT-B/32")),
        None,
    ));
    if cfg!(feature = "cuda")
        && let Ok(e) = load(&vit, DeviceSpec::Cuda(0))
    {
        out.push(("local-vit-b32-cuda".into(), Arc::new(e), None));
    }
    if cfg!(feature = "metal")
        && let Ok(e) = load(&vit, DeviceSpec::Metal(0))
    {
        out.push(("local-vit-b32-metal".into(), Arc::new(e), None));
    }
    let latency: u64 = std::env::var("MMEMBED_BENCH_FAKE_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let fake = FakeVertex::start().expect("fake server");
    fake.set_latency(Duration::from_millis(latency));
    let client = VertexEmbedder::new(
        VertexConfig::new("bench-project")
            .with_base_url(&fake.url)
            .with_access_token("bench-token")
            .with_requests_per_minute(100_000_000)
            .with_max_concurrency(32),
    )
    .expect("client");
    out.push((
        format!("vertex-fake-{latency}ms"),
        Arc::new(client),
        Some(fake),
    ));
    if std::env::var_os("GOOGLE_CLOUD_PROJECT").is_some() {
        match VertexConfig::from_env().and_then(VertexEmbedder::new) {
            Ok(c) => out.push(("vertex-live".into(), Arc::new(c), None)),
            Err(e) => eprintln!("vertex-live skipped: {e}"),
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().expect("temp dir");
    let video = video();
    let photos = photos();
    let backends = backends(&rt, tmp.path());

    let mut workloads: Vec<(String, u64, Vec<EmbedRequest>)> = vec![];
    for n in [1usize, 32] {
        let texts = (0..n)
            .map(|i| EmbedRequest::text(CAPTIONS[i % CAPTIONS.len()]))
            .collect();
        workloads.push((format!("text/{n}"), n as u64, texts));
        let images = (0..n)
            .map(|i| EmbedRequest::image(photos[i % photos.len()].clone()))
            .collect();
        workloads.push((format!("image/{n}"), n as u64, images));
    }
    for interval in [4u32, 8, 16] {
        let cfg = VideoSegmentConfig::new(0, 60, interval).unwrap();
        workloads.push((
            format!("video60s/interval{interval}"),
            1,
            vec![EmbedRequest::video(video.clone(), Some(cfg))],
        ));
    }

    for (name, n, reqs) in &workloads {
        let mut g = c.benchmark_group(name.as_str());
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5))
            .throughput(Throughput::Elements(*n));
        for (backend, e, _) in &backends {
            // A backend that cannot serve the workload (an error) is left out
            // with a note rather than timed.
            if let Some(err) = rt
                .block_on(e.embed_batch(reqs.clone()))
                .into_iter()
                .find_map(Result::err)
            {
                eprintln!("{name} on {backend} skipped: {err}");
                continue;
            }
            g.bench_with_input(BenchmarkId::from_parameter(backend), reqs, |b, reqs| {
                b.iter(|| rt.block_on(e.embed_batch(reqs.clone())))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
