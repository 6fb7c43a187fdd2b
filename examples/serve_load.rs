//! Load test of `mmembed serve`'s batching: 1, 8 and 64 concurrent clients,
//! each sending single-instance predict calls (as the Vertex SDK does),
//! against the library's own batch-32 throughput on the same model in the
//! same process, then an open-loop run at half the saturating rate for the
//! latency spread. Prints a Markdown table (BENCHMARKS.md, "Serving").
//!
//! ```text
//! cargo run --release --example serve_load -- [MODEL] [SECONDS_PER_POINT]
//! cargo run --release --example serve_load -- demo 8
//! cargo run --release --example random_vit_b32 -- /tmp/vit-b-32
//! cargo run --release --example serve_load -- /tmp/vit-b-32 20
//! ```
//!
//! Server and clients share the machine's cores, as they would behind a
//! proxy on one box; the library figure has the cores to itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use mmembed::local::{LocalEmbedder, LocalOptions};
use mmembed::{EmbedRequest, Embedder};
use mmembed_server::{Server, ServerConfig};
use serde_json::json;

const PATH: &str =
    "/v1/projects/p/locations/l/publishers/google/models/multimodalembedding@001:predict";

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Text,
    Image,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Text => "texts",
            Self::Image => "images",
        }
    }
}

struct Inputs {
    texts: Vec<String>,
    images: Vec<Vec<u8>>,
}

impl Inputs {
    fn load() -> Self {
        let colours = [
            "red", "green", "blue", "white", "orange", "purple", "black", "yellow",
        ];
        let shapes = ["star", "ring", "cross", "square", "triangle", "circle"];
        let mut texts = Vec::new();
        for (i, c) in colours.iter().enumerate() {
            for (j, s) in shapes.iter().enumerate() {
                texts.push(format!(
                    "a photo of a large {c} {s} drawn at the {} of a plain background, number {}",
                    if (i + j).is_multiple_of(2) {
                        "left"
                    } else {
                        "right"
                    },
                    i * 8 + j
                ));
            }
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fixtures/images");
        let images = [
            "cat_451x300.png",
            "rocket_640x427.jpg",
            "astronaut_small_120x90.png",
            "coffee_tall_180x400.png",
            "camera_gray_300x260.png",
        ]
        .iter()
        .map(|f| std::fs::read(format!("{dir}/{f}")).expect("fixture image"))
        .collect();
        Self { texts, images }
    }

    fn request(&self, w: Workload, i: usize) -> EmbedRequest {
        match w {
            Workload::Text => EmbedRequest::text(self.texts[i % self.texts.len()].clone()),
            Workload::Image => EmbedRequest::image(self.images[i % self.images.len()].clone()),
        }
    }

    fn bodies(&self, w: Workload) -> Vec<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        match w {
            Workload::Text => self
                .texts
                .iter()
                .map(|t| json!({"instances": [{"text": t}], "parameters": {}}).to_string())
                .collect(),
            Workload::Image => self
                .images
                .iter()
                .map(|b| {
                    json!({"instances": [{"image": {"bytesBase64Encoded": b64.encode(b)}}], "parameters": {}})
                        .to_string()
                })
                .collect(),
        }
    }
}

/// Items per second of `embed_batch` with 32 requests per call.
async fn library_rate(e: &Arc<dyn Embedder>, inputs: &Inputs, w: Workload, secs: f64) -> f64 {
    let batch = |k: usize| -> Vec<EmbedRequest> {
        (0..32).map(|i| inputs.request(w, k * 32 + i)).collect()
    };
    e.embed_batch(batch(0)).await; // warm-up
    let t0 = Instant::now();
    let mut n = 0usize;
    let mut k = 0;
    while t0.elapsed().as_secs_f64() < secs {
        let out = e.embed_batch(batch(k)).await;
        assert!(out.iter().all(Result::is_ok), "library call failed");
        n += out.len();
        k += 1;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// One request per `embed` call, back to back: the library's own latency
/// floor, to set beside one HTTP client.
async fn library_single(e: &Arc<dyn Embedder>, inputs: &Inputs, w: Workload, secs: f64) -> Point {
    let _ = e.embed(inputs.request(w, 0)).await;
    let t0 = Instant::now();
    let mut lat = Vec::new();
    let mut i = 0;
    while t0.elapsed().as_secs_f64() < secs {
        let s = Instant::now();
        e.embed(inputs.request(w, i))
            .await
            .expect("library call failed");
        lat.push(s.elapsed().as_secs_f64());
        i += 1;
    }
    point(lat, 0, t0.elapsed().as_secs_f64())
}

struct Point {
    rate: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    errors: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn point(lat: Vec<f64>, errors: usize, elapsed: f64) -> Point {
    let mut l = lat;
    l.sort_by(f64::total_cmp);
    Point {
        rate: l.len() as f64 / elapsed,
        p50: percentile(&l, 0.50) * 1e3,
        p95: percentile(&l, 0.95) * 1e3,
        p99: percentile(&l, 0.99) * 1e3,
        errors,
    }
}

async fn send(client: &reqwest::Client, url: &str, body: &str) -> bool {
    match client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
    {
        Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
        Err(_) => false,
    }
}

/// `clients` closed-loop clients for `secs`.
async fn closed_loop(url: &str, bodies: &Arc<Vec<String>>, clients: usize, secs: f64) -> Point {
    let client = reqwest::Client::new();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0usize));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, url, bodies, lat, errors) = (
            client.clone(),
            url.to_string(),
            bodies.clone(),
            lat.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < end {
                let s = Instant::now();
                let ok = send(&client, &url, &bodies[i % bodies.len()]).await;
                if ok {
                    lat.lock().unwrap().push(s.elapsed().as_secs_f64());
                } else {
                    *errors.lock().unwrap() += 1;
                }
                i += clients;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let l = std::mem::take(&mut *lat.lock().unwrap());
    let e = *errors.lock().unwrap();
    point(l, e, elapsed)
}

/// Requests arriving at a fixed `rate` per second for `secs`, each its own task.
async fn open_loop(url: &str, bodies: &Arc<Vec<String>>, rate: f64, secs: f64) -> Point {
    let client = reqwest::Client::new();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0usize));
    let n = (rate * secs).round() as usize;
    let gap = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + gap * i as u32)).await;
        let (client, url, bodies, lat, errors) = (
            client.clone(),
            url.to_string(),
            bodies.clone(),
            lat.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let s = Instant::now();
            if send(&client, &url, &bodies[i % bodies.len()]).await {
                lat.lock().unwrap().push(s.elapsed().as_secs_f64());
            } else {
                *errors.lock().unwrap() += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let l = std::mem::take(&mut *lat.lock().unwrap());
    let e = *errors.lock().unwrap();
    point(l, e, elapsed)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "demo".into());
    let secs: f64 = args.next().map_or(Ok(8.0), |s| s.parse())?;
    mmembed::local::tune_malloc_for_inference();
    let e: Arc<dyn Embedder> =
        Arc::new(LocalEmbedder::load(LocalOptions::new(model.clone()).with_max_batch(32)).await?);
    let inputs = Inputs::load();
    let server = Server::bind(ServerConfig {
        addr: "127.0.0.1:0".parse()?,
        ..ServerConfig::default()
    })
    .await?;
    let url = format!("http://{}{PATH}", server.local_addr());
    let served = e.clone();
    tokio::spawn(server.run(async move { Ok(served) }, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(200)).await;

    println!(
        "model `{model}`, {secs} s per point, {} cores\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| workload | clients | req/s | vs library batch-32 | p50 ms | p95 ms | p99 ms | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // `SERVE_LOAD_WORKLOADS=texts` (or `images`) runs one of the two.
    let only = std::env::var("SERVE_LOAD_WORKLOADS").unwrap_or_default();
    for w in [Workload::Text, Workload::Image] {
        if !only.is_empty() && !only.split(',').any(|o| o == w.name()) {
            continue;
        }
        let lib = library_rate(&e, &inputs, w, secs).await;
        println!(
            "| {} | library, batch 32 | {lib:.1} | 1.00 | | | | |",
            w.name()
        );
        let one = library_single(&e, &inputs, w, secs / 2.0).await;
        println!(
            "| {} | library, 1 per call | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | |",
            w.name(),
            one.rate,
            one.rate / lib,
            one.p50,
            one.p95,
            one.p99
        );
        let bodies = Arc::new(inputs.bodies(w));
        // Warm the server path (connections, allocator).
        closed_loop(&url, &bodies, 8, 1.0).await;
        let mut saturated = 0.0f64;
        for clients in [1, 8, 64] {
            let p = closed_loop(&url, &bodies, clients, secs).await;
            saturated = saturated.max(p.rate);
            println!(
                "| {} | {clients} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {} |",
                w.name(),
                p.rate,
                p.rate / lib,
                p.p50,
                p.p95,
                p.p99,
                p.errors
            );
        }
        let half = saturated / 2.0;
        let p = open_loop(&url, &bodies, half, secs).await;
        println!(
            "| {} | open loop at {half:.1}/s (half of saturation) | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} | {} |",
            w.name(),
            p.rate,
            p.rate / lib,
            p.p50,
            p.p95,
            p.p99,
            p.errors
        );
    }
    Ok(())
}
