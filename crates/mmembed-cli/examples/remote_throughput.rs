//! Throughput of `mmembed batch` over a bucket whose every request takes
//! 50 ms more, against the same files on local disk (issue #21's goal:
//! at least 90 %). Both runs in the same process, alternating, best of
//! three; the figure goes to BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p mmembed-cli
//! # an S3 endpoint with a bucket `mmembed-test`, e.g. moto:
//! moto_server -p 5501 & curl -X PUT http://127.0.0.1:5501/mmembed-test
//! MMEMBED_TEST_S3=http://127.0.0.1:5501 \
//!   cargo run --release -p mmembed-cli --example remote_throughput
//! ```
//!
//! Settings (environment): `MMEMBED_BIN` (default `target/release/mmembed`),
//! `N` (objects, 500), `DELAY_MS` (50), `MODEL` (demo), `RUNS` (3).
//!
//! Also measured: the same objects from a plain-HTTP server in this process
//! (8 threads serving from memory) behind the same delaying proxy, named by
//! a manifest. It serves thousands of requests per second where moto, a
//! Python server, serves about two hundred on 2 cores, so it shows what the
//! pipeline itself sustains with a fast model.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mmembed_shapes::{Attributes, Colour, Position, Scene, Shape, Size};
use mmembed_store::testkit::{FaultProxy, Faults, FileServer};
use mmembed_store::{PutMode, StoreOptions, Stores};
use rand::SeedableRng;

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn run(bin: &str, model: &str, input: &str, out: &Path, endpoint: &str, cache: &Path) -> f64 {
    let _ = std::fs::remove_file(out);
    let t = Instant::now();
    let o = Command::new(bin)
        .args(["batch", input, "-o"])
        .arg(out)
        .args(["--model", model, "--device", "cpu", "--overwrite"])
        .env("MMEMBED_CACHE_DIR", cache)
        .env("HF_HUB_OFFLINE", "1")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("the mmembed binary runs");
    assert!(
        o.status.success(),
        "{input}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let endpoint = std::env::var("MMEMBED_TEST_S3").expect("MMEMBED_TEST_S3: an S3 endpoint");
    let bin = env_or("MMEMBED_BIN", "target/release/mmembed");
    let n: usize = env_or("N", "500").parse().unwrap();
    let delay: u64 = env_or("DELAY_MS", "50").parse().unwrap();
    let model = env_or("MODEL", "demo");
    let runs: usize = env_or("RUNS", "3").parse().unwrap();
    // SAFETY: set before any store is built, read by this process only.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let stores = Stores::new(StoreOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    let prefix = format!("s3://mmembed-test/throughput-{}/", std::process::id());
    let shapes = [Shape::Star, Shape::Square, Shape::Circle, Shape::Triangle];
    let colours = [Colour::Red, Colour::Blue, Colour::Green, Colour::Yellow];
    eprintln!("writing {n} images to {} and {prefix}", media.display());
    for i in 0..n {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
        let a = Attributes {
            shape: shapes[i % 4],
            colour: colours[(i / 4) % 4],
            size: Size::Large,
            position: Position::Center,
        };
        let img = Scene::random(a, &mut rng).render(224, 224, i as u64);
        let mut png = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        std::fs::write(media.join(format!("{i:04}.png")), &png).unwrap();
        stores
            .put(
                &format!("{prefix}{i:04}.png"),
                Bytes::from(png),
                "image/png",
                PutMode::Overwrite,
            )
            .await
            .unwrap();
    }
    let proxy = FaultProxy::start(
        &endpoint,
        Faults {
            delay: Duration::from_millis(delay),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    // The media folder over plain HTTP (the page cache holds it).
    let files = FileServer::start(media.clone()).await.unwrap();
    let http = files.url.clone();
    let http_proxy = FaultProxy::start(
        &http,
        Faults {
            delay: Duration::from_millis(delay),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let manifest = dir.path().join("http.csv");
    let mut csv = String::from("uri\n");
    for i in 0..n {
        csv.push_str(&format!("{}/{i:04}.png\n", http_proxy.url));
    }
    std::fs::write(&manifest, csv).unwrap();
    let manifest = manifest.to_string_lossy().into_owned();

    let cache = dir.path().join("cache");
    let out = dir.path().join("out.parquet");
    let local_in = media.to_string_lossy().into_owned();
    let (mut local, mut remote, mut over_http) = (f64::MAX, f64::MAX, f64::MAX);
    // Warm-up: the demo model's files and the page cache.
    run(&bin, &model, &local_in, &out, &proxy.url, &cache);
    for _ in 0..runs {
        local = local.min(run(&bin, &model, &local_in, &out, &proxy.url, &cache));
        remote = remote.min(run(&bin, &model, &prefix, &out, &proxy.url, &cache));
        over_http = over_http.min(run(&bin, &model, &manifest, &out, &proxy.url, &cache));
    }
    let count = |p: &FaultProxy| p.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    println!("model {model}, {n} images of 224x224, +{delay} ms per storage request");
    println!(
        "local disk : {local:.2} s  {:.1} images/s",
        n as f64 / local
    );
    println!(
        "S3 (moto)  : {remote:.2} s  {:.1} images/s  {:.3} of local  ({} requests)",
        n as f64 / remote,
        local / remote,
        count(&proxy)
    );
    println!(
        "HTTP       : {over_http:.2} s  {:.1} images/s  {:.3} of local  ({} requests)",
        n as f64 / over_http,
        local / over_http,
        count(&http_proxy)
    );
}
