//! `mmembed bench`: the same workloads on several backends, side by side:
//! latency percentiles and throughput per workload, as a table, CSV and an
//! SVG chart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use mmembed::spec::BackendSpec;
use mmembed::{EmbedRequest, Embedder, VideoSegmentConfig};

/// Flags of `mmembed bench`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed bench local:demo 'local:/tmp/vit-b-32?device=cpu' 'vertex:my-proj/us-central1'
  mmembed bench local:demo --workloads text:32,image:32 --iterations 50 --csv out.csv --svg out.svg")]
pub struct Args {
    /// Backend specs to compare (see --backend of the other commands).
    #[arg(required = true)]
    pub specs: Vec<String>,

    /// Workloads as kind:size, kind one of text, image (size = batch) or
    /// video (size = segment interval in seconds, over a 60 s clip).
    #[arg(
        long,
        env = "MMEMBED_BENCH_WORKLOADS",
        value_delimiter = ',',
        default_value = "text:1,text:32,image:1,image:32,video:4,video:8,video:16"
    )]
    pub workloads: Vec<Workload>,

    /// Timed calls per backend and workload.
    #[arg(long, env = "MMEMBED_BENCH_ITERATIONS", default_value_t = 20)]
    pub iterations: usize,

    /// Untimed calls first (model warm-up, connections).
    #[arg(long, env = "MMEMBED_BENCH_WARMUP", default_value_t = 2)]
    pub warmup: usize,

    /// Stop timing a workload after this many seconds (at least 3 calls).
    #[arg(long, env = "MMEMBED_BENCH_MAX_SECS", default_value_t = 60.0)]
    pub max_secs: f64,

    /// Images to use, cycled through (files read once, in name order;
    /// default: 8 generated 640x480 PNGs).
    #[arg(long, env = "MMEMBED_BENCH_IMAGES")]
    pub images: Vec<PathBuf>,

    /// Video to use (default: a 60 s 640x360 clip made with the ffmpeg CLI).
    #[arg(long, env = "MMEMBED_BENCH_VIDEO")]
    pub video: Option<PathBuf>,

    /// Also measure the Vertex client against an in-process fake of the
    /// service that answers after this many milliseconds (no network, no
    /// credentials): the client's overhead plus a chosen service latency.
    #[arg(long, env = "MMEMBED_BENCH_FAKE_VERTEX_MS")]
    pub fake_vertex_ms: Option<u64>,

    /// Write the results as CSV.
    #[arg(long, env = "MMEMBED_BENCH_CSV")]
    pub csv: Option<PathBuf>,

    /// Write a chart of the results as SVG.
    #[arg(long, env = "MMEMBED_BENCH_SVG")]
    pub svg: Option<PathBuf>,
}

/// What one timed call embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `n` texts in one batch.
    Text(usize),
    /// `n` images in one batch.
    Image(usize),
    /// One 60 s video cut into `n`-second segments.
    Video(u32),
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (k, n) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}` is not kind:size (text:32, image:1, video:16)"))?;
        let n: usize = n
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`{s}`: size must be a positive integer"))?;
        match k.trim() {
            "text" => Ok(Self::Text(n)),
            "image" => Ok(Self::Image(n)),
            "video" => Ok(Self::Video(n as u32)),
            other => Err(format!(
                "unknown workload kind `{other}` (text, image, video)"
            )),
        }
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Text(n) => write!(f, "text x{n}"),
            Self::Image(n) => write!(f, "image x{n}"),
            Self::Video(n) => write!(f, "video 60s/{n}s"),
        }
    }
}

impl Workload {
    /// Items per call: texts, images, or seconds of video.
    fn items(self) -> usize {
        match self {
            Self::Text(n) | Self::Image(n) => n,
            Self::Video(_) => 60,
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Self::Text(_) => "texts/s",
            Self::Image(_) => "images/s",
            Self::Video(_) => "video s/s",
        }
    }
}

/// One measured backend × workload.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The spec as given.
    pub backend: String,
    /// What was embedded.
    pub workload: Workload,
    /// Timed calls.
    pub calls: usize,
    /// Median call latency.
    pub p50: Duration,
    /// 95th percentile call latency.
    pub p95: Duration,
    /// Items per second over all timed calls.
    pub throughput: f64,
    /// Why it could not be measured, if so.
    pub error: Option<String>,
}

const CAPTIONS: [&str; 8] = [
    "a photo of a red circle",
    "a small blue square on the left",
    "a large green triangle",
    "a photo of a dog playing in the snow",
    "two cups of coffee on a wooden table",
    "a city street at night with neon signs",
    "a yellow star",
    "an aerial view of a river between mountains",
];

fn test_image(i: usize) -> anyhow::Result<Vec<u8>> {
    use mmembed::media::image_crate::{ImageFormat, Rgb, RgbImage};
    // A smooth pattern that differs per image: realistic decode cost, no
    // two inputs identical (no backend may cache its way to a fast figure).
    let img = RgbImage::from_fn(640, 480, |x, y| {
        let v = (x as usize * (i + 3) + y as usize * (2 * i + 1)) % 256;
        Rgb([v as u8, (x % 256) as u8, (y % 256) as u8])
    });
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn make_video(dir: &Path) -> anyhow::Result<PathBuf> {
    let out = dir.join("bench-60s.mp4");
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
        .arg(&out)
        .status()
        .context("running the ffmpeg CLI to make the bench video (or pass --video)")?;
    if !st.success() {
        bail!("ffmpeg could not make the bench video");
    }
    Ok(out)
}

fn requests(
    w: Workload,
    images: &[Vec<u8>],
    video: Option<&Path>,
) -> anyhow::Result<Vec<EmbedRequest>> {
    Ok(match w {
        Workload::Text(n) => (0..n)
            .map(|i| EmbedRequest::text(CAPTIONS[i % CAPTIONS.len()]))
            .collect(),
        Workload::Image(n) => (0..n)
            .map(|i| EmbedRequest::image(images[i % images.len()].clone()))
            .collect(),
        Workload::Video(interval) => {
            let v = video.context("no video for the video workloads")?;
            vec![EmbedRequest::video(
                v.to_path_buf(),
                Some(VideoSegmentConfig::new(0, 60, interval)?),
            )]
        }
    })
}

async fn measure(
    e: &Arc<dyn Embedder>,
    reqs: &[EmbedRequest],
    args: &Args,
) -> Result<(usize, Vec<Duration>, Duration), String> {
    let call = || async {
        let out = e.embed_batch(reqs.to_vec()).await;
        match out.into_iter().find_map(Result::err) {
            Some(err) => Err(err.to_string()),
            None => Ok(()),
        }
    };
    for _ in 0..args.warmup {
        call().await?;
    }
    let mut times = vec![];
    let started = Instant::now();
    let budget = Duration::from_secs_f64(args.max_secs.max(0.0));
    while times.len() < args.iterations.max(1) && (times.len() < 3 || started.elapsed() < budget) {
        let t = Instant::now();
        call().await?;
        times.push(t.elapsed());
    }
    let total = started.elapsed();
    times.sort();
    Ok((times.len(), times, total))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Runs every workload on every backend.
pub async fn run(args: &Args) -> anyhow::Result<Vec<Measured>> {
    for s in &args.specs {
        s.parse::<BackendSpec>()?;
    }
    let images: Vec<Vec<u8>> = if args.images.is_empty() {
        (0..8).map(test_image).collect::<anyhow::Result<_>>()?
    } else {
        let mut files = args.images.clone();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read(p).with_context(|| format!("reading --images {}", p.display())))
            .collect::<anyhow::Result<_>>()?
    };
    let tmp = tempfile::tempdir()?;
    let wants_video = args
        .workloads
        .iter()
        .any(|w| matches!(w, Workload::Video(_)));
    let video = match (&args.video, wants_video) {
        (Some(v), _) => Some(v.clone()),
        (None, true) => Some(make_video(tmp.path())?),
        (None, false) => None,
    };
    // (label, spec or a ready client): the fake needs a token the spec
    // form deliberately cannot carry.
    let mut backends: Vec<(String, Option<Arc<dyn Embedder>>)> =
        args.specs.iter().map(|s| (s.clone(), None)).collect();
    // Kept alive until the end: its server thread answers the fake's client.
    let _fake = match args.fake_vertex_ms {
        Some(ms) => {
            let f =
                mmembed_vertex::fake::FakeVertex::start().context("starting the fake Vertex")?;
            f.set_latency(Duration::from_millis(ms));
            let client = mmembed::vertex::VertexEmbedder::new(
                mmembed::vertex::VertexConfig::new("bench-project")
                    .with_base_url(&f.url)
                    .with_access_token("fake-token")
                    .with_requests_per_minute(100_000_000)
                    .with_max_concurrency(32),
            )?;
            backends.push((format!("vertex-fake+{ms}ms"), Some(Arc::new(client))));
            Some(f)
        }
        None => None,
    };
    let mut results = vec![];
    for (label, ready) in backends {
        let fail = |w: Workload, error: String| Measured {
            backend: label.clone(),
            workload: w,
            calls: 0,
            p50: Duration::ZERO,
            p95: Duration::ZERO,
            throughput: 0.0,
            error: Some(error),
        };
        let built = match ready {
            Some(e) => Ok(e),
            None => match label.parse::<BackendSpec>() {
                Ok(spec) => spec.build().await,
                Err(e) => Err(e),
            },
        };
        let embedder = match built {
            Ok(e) => e,
            Err(e) => {
                results.extend(args.workloads.iter().map(|&w| fail(w, e.to_string())));
                continue;
            }
        };
        for &w in &args.workloads {
            let reqs = requests(w, &images, video.as_deref())?;
            tracing::info!(backend = %label, workload = %w, "measuring");
            results.push(match measure(&embedder, &reqs, args).await {
                Ok((calls, times, total)) => Measured {
                    backend: label.clone(),
                    workload: w,
                    calls,
                    p50: percentile(&times, 0.5),
                    p95: percentile(&times, 0.95),
                    throughput: (calls * w.items()) as f64 / total.as_secs_f64(),
                    error: None,
                },
                Err(e) => fail(w, e),
            });
        }
    }
    Ok(results)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints the side-by-side table.
pub fn print_table(rows: &[Measured]) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let w = rows
        .iter()
        .map(|r| r.backend.len())
        .max()
        .unwrap_or(7)
        .max(7);
    writeln!(
        out,
        "{:w$}  {:15}  {:>5}  {:>10}  {:>10}  {:>12}",
        "backend", "workload", "calls", "p50 ms", "p95 ms", "throughput"
    )?;
    for r in rows {
        match &r.error {
            Some(e) => writeln!(
                out,
                "{:w$}  {:15}  failed: {e}",
                r.backend,
                r.workload.to_string()
            )?,
            None => writeln!(
                out,
                "{:w$}  {:15}  {:>5}  {:>10.2}  {:>10.2}  {:>8.1} {}",
                r.backend,
                r.workload.to_string(),
                r.calls,
                ms(r.p50),
                ms(r.p95),
                r.throughput,
                r.workload.unit()
            )?,
        }
    }
    Ok(())
}

/// Writes the CSV.
pub fn write_csv(path: &Path, rows: &[Measured]) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record([
        "backend",
        "workload",
        "calls",
        "p50_ms",
        "p95_ms",
        "throughput",
        "unit",
        "error",
    ])?;
    for r in rows {
        w.write_record([
            r.backend.clone(),
            r.workload.to_string(),
            r.calls.to_string(),
            format!("{:.3}", ms(r.p50)),
            format!("{:.3}", ms(r.p95)),
            format!("{:.3}", r.throughput),
            r.workload.unit().to_string(),
            r.error.clone().unwrap_or_default(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// Draws p50 latency per workload, one bar per backend, log scale.
pub fn write_svg(path: &Path, rows: &[Measured]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let mut workloads: Vec<Workload> = vec![];
    let mut backends: Vec<&str> = vec![];
    for r in rows {
        if !workloads.contains(&r.workload) {
            workloads.push(r.workload);
        }
        if !backends.contains(&r.backend.as_str()) {
            backends.push(&r.backend);
        }
    }
    let ok: Vec<&Measured> = rows.iter().filter(|r| r.error.is_none()).collect();
    let max = ok.iter().map(|r| ms(r.p50)).fold(1.0, f64::max) * 2.0;
    let min = ok.iter().map(|r| ms(r.p50)).fold(max, f64::min).max(1e-3) / 2.0;
    let root = SVGBackend::new(path, (220 + 120 * workloads.len() as u32, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = workloads.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "mmembed bench: p50 latency per call (ms, log scale)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, (min / 4.0..max).log_scale())?;
    // Workload names under each group of bars (the mesh's own x labels
    // would fall on round numbers, not on the groups).
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|_| String::new())
        .y_desc("ms")
        .draw()?;
    chart.draw_series(workloads.iter().enumerate().map(|(i, w)| {
        Text::new(
            w.to_string(),
            (i as f64 + 0.1, min / 2.2),
            ("sans-serif", 13),
        )
    }))?;
    let width = 0.8 / backends.len().max(1) as f64;
    for (b, name) in backends.iter().enumerate() {
        let colour = Palette99::pick(b).to_rgba();
        let bars = ok.iter().filter(|r| r.backend == *name).filter_map(|r| {
            let i = workloads.iter().position(|w| *w == r.workload)? as f64;
            let x0 = i + 0.1 + b as f64 * width;
            Some(Rectangle::new(
                [(x0, min), (x0 + width * 0.9, ms(r.p50))],
                colour.filled(),
            ))
        });
        chart
            .draw_series(bars)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
