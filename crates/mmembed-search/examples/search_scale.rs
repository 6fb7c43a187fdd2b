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
//! # the index: a clustered table (1000 clusters, as real embeddings group),
//! # built, then recall@10 and latency against brute force
//! target/release/examples/search_scale gen /tmp/c1m.parquet 1000000 512 --clusters 1000
//! target/release/examples/search_scale index /tmp/c1m.parquet /tmp/c1m.index
//! target/release/examples/search_scale recall /tmp/c1m.index --queries 100 --ef 64,128,256,512,1024
//! ```

use std::fs::File;
use std::time::Instant;

use mmembed_rows::Row;
use mmembed_rows::arrow::{EmbeddingLayout, to_batch};
use mmembed_search::index::{BuildOptions, Index, IndexSearch, Quantization, build};
use mmembed_search::{Options, Table, search};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

fn unit(rng: &mut fastrand::Rng, dim: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// A unit vector near `centre`: about 0.7 cosine to it at 512 dimensions,
/// as photos of one subject sit around their subject in CLIP's space.
fn near(rng: &mut fastrand::Rng, centre: &[f32]) -> Vec<f32> {
    let noise = unit(rng, centre.len());
    let v: Vec<f32> = centre.iter().zip(noise).map(|(c, n)| c + n).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn gen_table(
    path: &str,
    rows: usize,
    dim: usize,
    clusters: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = fastrand::Rng::with_seed(25);
    let centres: Vec<Vec<f32>> = (0..clusters).map(|_| unit(&mut rng, dim)).collect();
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
                embedding: Some(if centres.is_empty() {
                    unit(&mut rng, dim)
                } else {
                    let c = rng.usize(..centres.len());
                    near(&mut rng, &centres[c])
                }),
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

fn index(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let mut opts = BuildOptions::default();
    let mut paths = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quantization" => {
                opts.quantization = match it.next().map(String::as_str) {
                    Some("f32") => Quantization::F32,
                    Some("f16") => Quantization::F16,
                    Some("bf16") => Quantization::Bf16,
                    Some("i8") => Quantization::I8,
                    _ => return Err("--quantization f32|f16|bf16|i8".into()),
                }
            }
            "--threads" => opts.threads = it.next().ok_or("--threads N")?.parse()?,
            p => paths.push(p.to_string()),
        }
    }
    let dir = paths.pop().ok_or("index TABLE... DIR")?;
    let tables = paths
        .iter()
        .map(Table::new)
        .collect::<Result<Vec<_>, _>>()?;
    let r = build(&tables, std::path::Path::new(&dir), &opts)?;
    println!(
        "{:?}: {} vectors added ({} in all) in {:.1} s = {:.0} vectors/s, {:?}, {} threads; peak RSS {:.0} MiB",
        r.outcome,
        r.added,
        r.vectors,
        r.seconds,
        r.added as f64 / r.seconds,
        opts.quantization,
        opts.threads,
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn recall(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (mut queries, mut k) = (100usize, 10usize);
    let mut efs: Vec<usize> = vec![];
    let mut dir = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--queries" => queries = it.next().ok_or("--queries N")?.parse()?,
            "--ef" => {
                for e in it.next().ok_or("--ef N[,N…]")?.split(',') {
                    efs.push(e.parse()?);
                }
            }
            "--k" => k = it.next().ok_or("--k N")?.parse()?,
            p => dir = Some(p.to_string()),
        }
    }
    let t0 = Instant::now();
    let index = Index::open(dir.ok_or("recall DIR")?)?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let tables = index.tables();
    let m = index.manifest().clone();
    // Queries near random rows' clusters: rows of the tables, perturbed.
    let mut rng = fastrand::Rng::with_seed(99);
    let total = m.tables.iter().map(|t| t.rows).sum::<u64>();
    let picks: Vec<(usize, u64)> = (0..queries)
        .map(|_| {
            let mut key = rng.u64(..total);
            let mut t = 0;
            while key >= m.tables[t].rows {
                key -= m.tables[t].rows;
                t += 1;
            }
            (t, key)
        })
        .collect();
    let mut qs = vec![];
    for (t, i) in picks {
        let row = mmembed_search::rows(&tables[t], &[i])?.remove(0);
        let v = row.embedding.ok_or("a picked row has no vector")?;
        qs.push(near(&mut rng, &v));
    }
    let opts = Options {
        k,
        space: Some(m.space.clone()),
        ..Options::default()
    };
    if efs.is_empty() {
        efs.push(IndexSearch::default().expansion);
    }
    // Brute force once per query; every ef against it.
    let mut brute = vec![];
    let mut lat = vec![vec![]; efs.len()];
    let mut hit = vec![0usize; efs.len()];
    for q in &qs {
        let t = Instant::now();
        let exact = search(&tables, q, &opts)?;
        brute.push(t.elapsed().as_secs_f64() * 1e3);
        for (j, ef) in efs.iter().enumerate() {
            let search_opts = IndexSearch {
                k,
                expansion: *ef,
                ..IndexSearch::default()
            };
            let t = Instant::now();
            let found = index.search(q, &search_opts)?;
            lat[j].push(t.elapsed().as_secs_f64() * 1e3);
            let got: Vec<(usize, u64)> = found.hits.iter().map(|h| (h.table, h.index)).collect();
            hit[j] += exact
                .hits
                .iter()
                .filter(|h| got.contains(&(h.table, h.index)))
                .count();
        }
    }
    brute.sort_by(f64::total_cmp);
    println!(
        "{} vectors, {:?}, {queries} queries, k {k}; brute force p50 {:.0} ms; index open {:.0} ms",
        m.vectors,
        m.quantization,
        percentile(&brute, 0.5),
        open_ms
    );
    for (j, ef) in efs.iter().enumerate() {
        lat[j].sort_by(f64::total_cmp);
        println!(
            "  ef {ef}: recall@{k} {:.4}; p50 {:.2} ms, p99 {:.2} ms",
            hit[j] as f64 / (queries * k) as f64,
            percentile(&lat[j], 0.5),
            percentile(&lat[j], 0.99),
        );
    }
    println!("peak RSS {:.0} MiB", peak_rss_mib().unwrap_or(f64::NAN));
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gen") if args.len() == 4 || args.len() == 6 => {
            let clusters = match args.get(4).map(String::as_str) {
                Some("--clusters") => args[5].parse()?,
                Some(_) => return Err("gen PATH ROWS DIM [--clusters N]".into()),
                None => 0,
            };
            gen_table(&args[1], args[2].parse()?, args[3].parse()?, clusters)
        }
        Some("run") if args.len() > 1 => run(&args[1..]),
        Some("index") if args.len() > 2 => index(&args[1..]),
        Some("recall") if args.len() > 1 => recall(&args[1..]),
        _ => Err("usage: search_scale gen PATH ROWS DIM [--clusters N] | run TABLE... [--threads N] [--k K] [--repeat N] | index TABLE... DIR [--quantization Q] [--threads N] | recall DIR [--queries N] [--ef N,N…] [--k K]".into()),
    }
}
