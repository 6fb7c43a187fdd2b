//! Local backend throughput with the ViT-B/32 architecture on random
//! weights (speed does not depend on weight values), against PyTorch
//! `transformers` measured in the same run.
//!
//! `cargo bench --bench local_clip`; figures and machine in BENCHMARKS.md.
//! Each workload is timed for candle (`model/candle/...`) and, right after
//! it, for PyTorch (`model/pytorch/...`) through a long-lived
//! `models/fixtures/bench_pytorch.py --serve` process, so both see the same
//! machine state; a ratio table is printed at the end. The Python comes
//! from `MMEMBED_BENCH_PYTHON` (default `python3`); without torch the
//! PyTorch half is skipped with a message. Both stacks use candle's thread
//! count, which `RAYON_NUM_THREADS` sets.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mmembed::local::candle_core::Device;
use mmembed::local::{
    DeviceSpec, LoadedClip, LocalEmbedder, LocalOptions, Precision, write_random_checkpoint,
};
use mmembed::{EmbedRequest, Embedder};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A `bench_pytorch.py --serve` process that times forward passes on request.
struct PyTorch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl PyTorch {
    fn start(threads: usize) -> Result<Self, String> {
        let python = std::env::var("MMEMBED_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = root().join("models/fixtures/bench_pytorch.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .args(["--serve", "--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run {python}: {e}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        if !line.starts_with("ready") {
            let _ = child.kill();
            return Err(format!(
                "{python} {} did not start (is torch with transformers installed?)",
                script.display()
            ));
        }
        eprintln!("PyTorch comparison: {}", line.trim());
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Seconds `iters` forward passes of `workload` at `batch` took.
    fn time(&mut self, workload: &str, batch: usize, iters: u64) -> Duration {
        writeln!(self.stdin, "{workload} {batch} {iters}").expect("write to PyTorch");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read from PyTorch");
        let secs: f64 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("PyTorch said {line:?}"));
        Duration::from_secs_f64(secs)
    }
}

impl Drop for PyTorch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Total time and iterations per (stack, workload), for the ratio table.
type Tally = RefCell<BTreeMap<(String, &'static str), (Duration, u64)>>;

fn record(tally: &Tally, workload: &str, stack: &'static str, took: Duration, iters: u64) {
    let mut t = tally.borrow_mut();
    let e = t.entry((workload.to_string(), stack)).or_default();
    e.0 += took;
    e.1 += iters;
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
    let clip = LoadedClip::load(&files, &Device::Cpu, Precision::F32).unwrap();
    let clip8 = LoadedClip::load(&files, &Device::Cpu, Precision::Int8).unwrap();
    int8_accuracy(&clip, &clip8, &fixtures);

    let cat = std::fs::read(fixtures.join("images/cat_451x300.png")).unwrap();
    let img = mmembed::media::decode_image(&cat, "cat", &Default::default()).unwrap();
    let pixels = clip.preprocessor.preprocess(&img);
    let long_text = ["a photo of a cat sitting on a red sofa"; 12].join(" ");
    let ids = clip.tokenizer.encode(&long_text).unwrap();
    assert_eq!(ids.len(), 77);
    let mut short_ids = ids[..15].to_vec();
    short_ids.push(clip.tokenizer.eos_id());

    let threads = mmembed::local::candle_core::utils::get_num_threads();
    let mut pytorch = match PyTorch::start(threads) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("PyTorch comparison skipped: {e}");
            None
        }
    };
    let tally = Tally::default();

    let mut g = c.benchmark_group("model");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));
    let workloads: [(&str, usize); 6] = [
        ("images", 1),
        ("images", 8),
        ("images", 32),
        ("texts77", 1),
        ("texts77", 32),
        ("texts16", 32),
    ];
    let clip = &clip;
    for (workload, batch) in workloads {
        let name = format!("{workload}/{batch}");
        g.throughput(Throughput::Elements(batch as u64));
        for (stack, clip) in [("candle", clip), ("candle-int8", &clip8)] {
            let run: Box<dyn Fn() + '_> = match workload {
                "images" => {
                    let input = vec![pixels.clone(); batch];
                    Box::new(move || drop(black_box(clip.embed_pixels(&input).unwrap())))
                }
                _ => {
                    let one = if workload == "texts77" {
                        &ids
                    } else {
                        &short_ids
                    };
                    let input = vec![one.clone(); batch];
                    Box::new(move || drop(black_box(clip.embed_token_ids(&input).unwrap())))
                }
            };
            g.bench_function(BenchmarkId::new(stack, &name), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        run();
                    }
                    let took = start.elapsed();
                    record(&tally, &name, stack, took, iters);
                    took
                })
            });
        }
        if let Some(py) = pytorch.as_mut() {
            g.bench_function(BenchmarkId::new("pytorch", &name), |b| {
                b.iter_custom(|iters| {
                    let took = py.time(workload, batch, iters);
                    record(&tally, &name, "pytorch", took, iters);
                    took
                })
            });
        }
    }
    g.finish();
    drop(pytorch);
    print_ratios(&tally.borrow(), &workloads, threads);

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

/// Prints the mean cosine of int8 to f32 embeddings over the fixture
/// images and a few texts (random ViT-B/32 weights).
fn int8_accuracy(f32: &LoadedClip, int8: &LoadedClip, fixtures: &Path) {
    let mut pixels = Vec::new();
    for entry in std::fs::read_dir(fixtures.join("images")).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !["png", "jpg"].contains(&ext) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let img = mmembed::media::decode_image(&bytes, "fixture", &Default::default()).unwrap();
        pixels.push(f32.preprocessor.preprocess(&img));
    }
    let texts = [
        "a photo of a cat",
        "a cup of coffee on a saucer, seen from above",
        "an astronaut riding a rocket into space",
        "a camera on a tripod",
        "two dogs playing in the snow",
        "a city street at night in the rain",
    ];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| f32.tokenizer.encode(t).unwrap())
        .collect();
    let mean = |a: Vec<Vec<f32>>, b: Vec<Vec<f32>>| {
        let n = a.len();
        let sum: f32 = a.iter().zip(&b).map(|(a, b)| mmembed::cosine(a, b)).sum();
        (sum / n as f32, n)
    };
    let (img, ni) = mean(
        f32.embed_pixels(&pixels).unwrap(),
        int8.embed_pixels(&pixels).unwrap(),
    );
    let (txt, nt) = mean(
        f32.embed_token_ids(&ids).unwrap(),
        int8.embed_token_ids(&ids).unwrap(),
    );
    println!(
        "int8 vs f32 on ViT-B/32: mean cosine {img:.6} over {ni} images, {txt:.6} over {nt} texts"
    );
}

fn print_ratios(
    tally: &BTreeMap<(String, &'static str), (Duration, u64)>,
    workloads: &[(&str, usize)],
    threads: usize,
) {
    println!("\nthroughput, {threads} threads (mean over all timed calls, warm-up included)");
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "workload", "f32/s", "int8/s", "pytorch/s", "f32/pt", "int8/pt"
    );
    for (workload, batch) in workloads {
        let name = format!("{workload}/{batch}");
        let rate = |stack| {
            tally
                .get(&(name.clone(), stack))
                .map(|(d, n)| *batch as f64 * *n as f64 / d.as_secs_f64())
        };
        let (Some(c), Some(q)) = (rate("candle"), rate("candle-int8")) else {
            continue;
        };
        match rate("pytorch") {
            Some(p) => println!(
                "{name:<12} {c:>10.2} {q:>10.2} {p:>10.2} {:>7.2}x {:>7.2}x",
                c / p,
                q / p
            ),
            None => println!(
                "{name:<12} {c:>10.2} {q:>10.2} {:>10} {:>8} {:>8}",
                "-", "-", "-"
            ),
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
