//! Brute-force search at scale: time and peak memory of
//! `mmembed_search::search` over a large table (issue #25's measurement;
//! BENCHMARKS.md "Search at scale").
//!
//! ```sh
//! cargo build --release -p mmembed-search --example search_scale
//! # a seeded table of random unit vectors, written as `mmembed batch` writes
//! # Parquet (Snappy, list<float32>, writer's default row groups)
//! target/release/examples/search_scale gen /tmp/t1m.parquet 1000000 512
//! target/release/examples/search_scale gen /tmp/t100k.parquet 100000 512
//! # each run in its own process, so that its peak RSS is its own
//! target/release/examples/search_scale run /tmp/t100k.parquet
//! target/release/examples/search_scale run /tmp/t1m.parquet --threads 2 --repeat 3
//! ```

use std::fs::File;
use std::time::Instant;

use mmembed_rows::Row;
use mmembed_rows::arrow::{EmbeddingLayout, to_batch};
use mmembed_search::{Options, Table, search};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

fn unit(rng: &mut fastrand::Rng, dim: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn gen_table(path: &str, rows: usize, dim: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = fastrand::Rng::with_seed(25);
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = None;
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(8192);
        let batch: Vec<Row> = (done..done + n)
            .map(|i| Row {
                uri: format!("gs://bench/photos/{:03}/{i:08}.jpg", i % 1000),
                content_type: "image/jpeg".into(),
                size_bytes: Some(100_000),
                generation: None,
                etag: None,
                updated: None,
                embedding: Some(unit(&mut rng, dim)),
                status: String::new(),
                video_start_sec: None,
                video_end_sec: None,
                model: "bench".into(),
                space: "bench-space".into(),
                dimension: Some(dim as i32),
                carried: Default::default(),
            })
            .collect();
        let b = to_batch(&batch, &[], EmbeddingLayout::List)?;
        let w = match &mut writer {
            Some(w) => w,
            None => writer.insert(ArrowWriter::try_new(
                File::create(path)?,
                b.schema(),
                Some(props.clone()),
            )?),
        };
        w.write(&b)?;
        done += n;
    }
    if let Some(w) = writer {
        w.close()?;
    }
    Ok(())
}

/// Peak resident memory of this process so far (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let mut opts = Options::default();
    let mut repeat = 1;
    let mut tables = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => opts.threads = it.next().ok_or("--threads N")?.parse()?,
            "--k" => opts.k = it.next().ok_or("--k N")?.parse()?,
            "--repeat" => repeat = it.next().ok_or("--repeat N")?.parse()?,
            p => tables.push(Table::new(p)?),
        }
    }
    let summary = mmembed_search::summarize(&tables)?.ok_or("no embedded rows")?;
    let q = unit(&mut fastrand::Rng::with_seed(7), summary.dimension);
    opts.space = Some(summary.space);
    let bytes: u64 = tables
        .iter()
        .map(|t| std::fs::metadata(t.path()).map_or(0, |m| m.len()))
        .sum();
    println!(
        "tables: {} ({:.0} MiB on disk), dimension {}, k {}, threads {}",
        tables.len(),
        bytes as f64 / (1 << 20) as f64,
        summary.dimension,
        opts.k,
        opts.threads
    );
    for r in 0..repeat {
        let t0 = Instant::now();
        let found = search(&tables, &q, &opts)?;
        let s = t0.elapsed().as_secs_f64();
        println!(
            "run {}: {} rows in {:.2} s = {:.0} rows/s, {:.2} GB/s of vectors; best {:.4} {}; peak RSS {:.0} MiB",
            r + 1,
            found.scanned,
            s,
            found.scanned as f64 / s,
            found.scanned as f64 * summary.dimension as f64 * 4.0 / s / 1e9,
            found.hits.first().map_or(f32::NAN, |h| h.score),
            found.hits.first().map_or("", |h| h.row.uri.as_str()),
            peak_rss_mib().unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gen") if args.len() == 4 => gen_table(&args[1], args[2].parse()?, args[3].parse()?),
        Some("run") if args.len() > 1 => run(&args[1..]),
        _ => Err("usage: search_scale gen PATH ROWS DIM | search_scale run TABLE... [--threads N] [--k K] [--repeat N]".into()),
    }
}
