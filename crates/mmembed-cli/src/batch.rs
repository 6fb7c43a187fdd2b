//! `mmembed batch`: the counterpart of BigQuery's `AI.GENERATE_EMBEDDING`
//! over an object table. One row per image and per video segment, a status
//! per row, and crash safety through atomically written parts.
//!
//! Layout on disk while a job runs, for `-o out.parquet`:
//!
//! ```text
//! out.parquet.parts/part-000001.parquet   one part per chunk of inputs,
//! out.parquet.parts/part-000002.parquet   each renamed into place whole
//! ```
//!
//! At the end the parts (and, with `--resume`, the previous `out.parquet`)
//! are merged into `out.parquet` by another atomic rename, then the parts
//! are removed. Every URI's rows live in exactly one part, so merging keeps,
//! for each URI, the rows of the newest file that has it: a retried URI
//! replaces its failed rows, and a crash between the final rename and the
//! clean-up duplicates nothing.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use mmembed::{EmbedRequest, Embedder, Media, MediaSource};

use crate::backend::{BackendArgs, SegmentArgs};
use crate::inputs::{self, Input, Kind, Shard};
use crate::rows::{self, Format, Row};

/// Flags of `mmembed batch`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed batch photos/ -o photos.parquet --model demo
  mmembed batch 'media/**/*.mp4' -o videos.jsonl --interval 8
  mmembed batch manifest.csv -o out.parquet --resume
  mmembed batch media/ -o part-2.parquet --shard 2/8   # one of 8 machines")]
pub struct Args {
    /// A folder (walked recursively; hidden entries skipped), a glob
    /// (quote it), a manifest (`.csv`/`.jsonl` with a `uri` or `path`
    /// column; other columns are carried to the output) or one file.
    #[arg(env = "MMEMBED_INPUT")]
    pub input: String,

    /// Output file; `.parquet` or `.jsonl` chooses the format.
    #[arg(short, long, env = "MMEMBED_OUTPUT")]
    pub output: PathBuf,

    /// Output format, when the extension does not say.
    #[arg(long, env = "MMEMBED_FORMAT", value_enum)]
    pub format: Option<Format>,

    /// Continue an interrupted or partly failed job: keep rows of URIs that
    /// succeeded, embed the rest and retry failed ones.
    #[arg(long, env = "MMEMBED_RESUME", conflicts_with = "overwrite")]
    pub resume: bool,

    /// Replace an existing output instead of refusing.
    #[arg(long, env = "MMEMBED_OVERWRITE")]
    pub overwrite: bool,

    /// Take only slice i of n (`0/4` .. `3/4`), by a hash of each URI: n
    /// machines with the same input each write their own output, and the
    /// outputs together are the whole job.
    #[arg(long, env = "MMEMBED_SHARD")]
    pub shard: Option<Shard>,

    /// Output dimension (Vertex: 128, 256, 512, 1408).
    #[arg(long, env = "MMEMBED_DIMENSION")]
    pub dimension: Option<u32>,

    #[command(flatten)]
    pub segments: SegmentArgs,

    #[command(flatten)]
    pub backend: BackendArgs,

    /// Crash injection for tests: abort the process (as `kill -9` would
    /// stop it) right after writing this many parts.
    #[arg(long, env = "MMEMBED_TEST_ABORT_AFTER_PARTS", hide = true)]
    pub abort_after_parts: Option<usize>,
}

/// Rows ok / failed of a finished job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Rows with a vector.
    pub ok: usize,
    /// Rows with a status.
    pub failed: usize,
}

struct Output {
    path: PathBuf,
    parts: PathBuf,
    format: Format,
}

impl Output {
    fn new(path: PathBuf, format: Option<Format>) -> anyhow::Result<Self> {
        let format = format
            .or_else(|| Format::from_path(&path))
            .with_context(|| {
                format!(
                    "cannot tell the format of {}: name it .parquet or .jsonl, or pass --format",
                    path.display()
                )
            })?;
        let name = path
            .file_name()
            .context("the output path has no file name")?
            .to_string_lossy()
            .into_owned();
        let parts = path.with_file_name(format!("{name}.parts"));
        Ok(Self {
            path,
            parts,
            format,
        })
    }

    /// Finished parts in order, removing temporary files a crash left.
    fn part_files(&self) -> anyhow::Result<Vec<(u64, PathBuf)>> {
        let mut parts = vec![];
        let Ok(dir) = std::fs::read_dir(&self.parts) else {
            return Ok(parts);
        };
        for e in dir {
            let p = e?.path();
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            if name.ends_with(".tmp") {
                std::fs::remove_file(&p).ok();
                continue;
            }
            let n = name
                .strip_prefix("part-")
                .and_then(|r| r.strip_suffix(&format!(".{}", self.format.ext())))
                .and_then(|n| n.parse().ok());
            match n {
                Some(n) => parts.push((n, p)),
                None => tracing::warn!(file = %p.display(), "ignoring a file that is not a part"),
            }
        }
        parts.sort();
        Ok(parts)
    }

    fn part_path(&self, n: u64) -> PathBuf {
        self.parts
            .join(format!("part-{n:06}.{}", self.format.ext()))
    }
}

/// Keeps, for each URI, the rows of the newest source that has it.
fn merge(sources: Vec<Vec<Row>>) -> Vec<Row> {
    let mut newest: HashMap<String, usize> = HashMap::new();
    for (i, rows) in sources.iter().enumerate() {
        for r in rows {
            newest.insert(r.uri.clone(), i);
        }
    }
    let mut out: Vec<Row> = sources
        .into_iter()
        .enumerate()
        .flat_map(|(i, rows)| rows.into_iter().map(move |r| (i, r)))
        .filter(|(i, r)| newest.get(&r.uri) == Some(i))
        .map(|(_, r)| r)
        .collect();
    // Deterministic whatever the chunking, resuming or sharding.
    out.sort_by(|a, b| {
        a.uri.cmp(&b.uri).then(
            a.video_start_sec
                .unwrap_or(-1.0)
                .total_cmp(&b.video_start_sec.unwrap_or(-1.0)),
        )
    });
    out
}

/// URIs whose rows all succeeded.
fn done_uris(rows: &[Row]) -> HashSet<String> {
    let mut failed = HashSet::new();
    let mut seen = HashSet::new();
    for r in rows {
        seen.insert(r.uri.clone());
        if !r.ok() {
            failed.insert(r.uri.clone());
        }
    }
    seen.retain(|u| !failed.contains(u));
    seen
}

struct Job {
    embedder: Arc<dyn Embedder>,
    segments: Option<mmembed::VideoSegmentConfig>,
    dimension: Option<u32>,
}

enum Planned {
    Request(EmbedRequest),
    Failed(String),
}

impl Job {
    fn plan(&self, input: &Input) -> (String, Option<i64>, Planned) {
        let Some((ct, kind)) = inputs::content_type(&input.uri) else {
            return (
                "application/octet-stream".into(),
                input
                    .path
                    .as_ref()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len() as i64),
                Planned::Failed(format!(
                    "unsupported file type (supported extensions: {})",
                    inputs::supported_extensions()
                )),
            );
        };
        let (source, size) = match &input.path {
            Some(p) => match std::fs::metadata(p) {
                Ok(m) => (MediaSource::Path(p.clone()), Some(m.len() as i64)),
                Err(e) => {
                    return (
                        ct.into(),
                        None,
                        Planned::Failed(format!("cannot read {}: {e}", p.display())),
                    );
                }
            },
            None => (MediaSource::Uri(input.uri.clone()), None),
        };
        let media = Media {
            source,
            mime_type: Some(ct.into()),
        };
        let mut req = match kind {
            Kind::Image => EmbedRequest::image(media),
            Kind::Video => EmbedRequest::video(media, self.segments),
        };
        if let Some(d) = self.dimension {
            req = req.with_dimension(d);
        }
        (ct.into(), size, Planned::Request(req))
    }

    /// Embeds one chunk of inputs into rows; never fails as a whole.
    async fn run(&self, chunk: &[Input]) -> Vec<Row> {
        let info = self.embedder.info();
        let planned: Vec<_> = chunk.iter().map(|i| self.plan(i)).collect();
        let reqs: Vec<EmbedRequest> = planned
            .iter()
            .filter_map(|(_, _, p)| match p {
                Planned::Request(r) => Some(r.clone()),
                Planned::Failed(_) => None,
            })
            .collect();
        let n_reqs = reqs.len();
        let mut results = if reqs.is_empty() {
            vec![]
        } else {
            self.embedder.embed_batch(reqs).await
        }
        .into_iter();
        let base = |input: &Input, ct: &str, size: Option<i64>| Row {
            uri: input.uri.clone(),
            content_type: ct.to_string(),
            size_bytes: size,
            embedding: None,
            status: String::new(),
            video_start_sec: None,
            video_end_sec: None,
            model: info.model_id.clone(),
            space: info.space.as_str().to_string(),
            dimension: Some(
                self.dimension
                    .map_or(info.native_dimension as i32, |d| d as i32),
            ),
            carried: input.carried.clone(),
        };
        let mut rows = vec![];
        for (input, (ct, size, planned)) in chunk.iter().zip(planned) {
            let mut row = base(input, &ct, size);
            let result = match planned {
                Planned::Failed(status) => Err(status),
                Planned::Request(_) => match results.next() {
                    Some(r) => r.map_err(|e| e.to_string()),
                    None => Err(format!(
                        "the backend returned fewer results than the {n_reqs} requests sent"
                    )),
                },
            };
            match result {
                Err(status) => {
                    row.status = status;
                    rows.push(row);
                }
                Ok(e) => {
                    row.model = e.model.clone();
                    row.space = e.space.as_str().to_string();
                    row.dimension = Some(e.dimension as i32);
                    if let Some(v) = e.image {
                        row.embedding = Some(v);
                        rows.push(row);
                    } else if e.video.is_empty() {
                        row.status = "the backend returned no vector for this input".into();
                        rows.push(row);
                    } else {
                        for s in e.video {
                            let mut r = row.clone();
                            r.video_start_sec = Some(s.start_sec);
                            r.video_end_sec = Some(s.end_sec);
                            match s.error {
                                Some(err) => r.status = err,
                                None => r.embedding = Some(s.embedding),
                            }
                            rows.push(r);
                        }
                    }
                }
            }
        }
        rows
    }
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} files  {per_sec}  eta {eta}  {msg}",
                )
                .expect("the template is valid"),
            );
            b
        });
        Self {
            bar,
            total,
            done: 0,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    fn advance(&mut self, n: u64, failed_rows: usize) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.set_position(self.done);
            if failed_rows > 0 {
                b.set_message(format!("{failed_rows} failed rows"));
            }
            return;
        }
        // Not a terminal (CI, a log file): a line every few seconds and at the end.
        if self.last_log.elapsed() >= Duration::from_secs(5) || self.done == self.total {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            let rate = self.done as f64 / secs.max(1e-9);
            let eta = (self.total - self.done) as f64 / rate.max(1e-9);
            tracing::info!(
                "{}/{} files, {rate:.1} files/s, eta {eta:.0} s, {failed_rows} failed rows so far",
                self.done,
                self.total
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Runs the job; the summary counts the rows of the whole output.
pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let out = Output::new(args.output.clone(), args.format)?;
    let segments = args.segments.config()?;
    let mut table = inputs::list(&args.input)?;
    if let Some(shard) = args.shard {
        table.inputs.retain(|i| shard.contains(&i.uri));
    }

    let exists = out.path.exists();
    let old_parts = out.part_files()?;
    if (exists || !old_parts.is_empty()) && !args.resume {
        if !args.overwrite {
            bail!(
                "{} (or its parts) exists: pass --resume to continue that job or --overwrite to replace it",
                out.path.display()
            );
        }
        if exists {
            std::fs::remove_file(&out.path)
                .with_context(|| format!("removing {}", out.path.display()))?;
        }
        if out.parts.exists() {
            std::fs::remove_dir_all(&out.parts)
                .with_context(|| format!("removing {}", out.parts.display()))?;
        }
    }
    let mut sources = vec![];
    if args.resume {
        if exists {
            sources.push(rows::read(&out.path, out.format)?);
        }
        for (_, p) in out.part_files()? {
            sources.push(rows::read(&p, out.format)?);
        }
    }
    let previous = merge(sources.clone());
    let done = done_uris(&previous);
    let todo: Vec<Input> = table
        .inputs
        .iter()
        .filter(|i| !done.contains(&i.uri))
        .cloned()
        .collect();
    // Columns carried by earlier runs stay, new ones are added.
    let mut carried = table.carried_columns.clone();
    for r in &previous {
        for k in r.carried.keys() {
            if !carried.contains(k) {
                carried.push(k.clone());
            }
        }
    }
    if table.inputs.is_empty() {
        tracing::warn!(input = %args.input, "the input lists no files");
    }
    tracing::info!(
        inputs = table.inputs.len(),
        already_done = table.inputs.len() - todo.len(),
        to_embed = todo.len(),
        output = %out.path.display(),
        "batch job"
    );

    if !todo.is_empty() {
        std::fs::create_dir_all(&out.parts)
            .with_context(|| format!("creating {}", out.parts.display()))?;
        let job = Job {
            embedder: args.backend.build().await?,
            segments,
            dimension: args.dimension,
        };
        let first_part = out.part_files()?.last().map_or(1, |(n, _)| n + 1);
        let mut progress = Progress::new(todo.len() as u64);
        let mut failed_rows = 0;
        let chunks = todo.chunks(args.backend.batch_size as usize);
        for (written, (part, chunk)) in (first_part..).zip(chunks).enumerate() {
            let rows = job.run(chunk).await;
            failed_rows += rows.iter().filter(|r| !r.ok()).count();
            rows::write_atomic(&out.part_path(part), out.format, &rows, &carried)?;
            progress.advance(chunk.len() as u64, failed_rows);
            if args.abort_after_parts == Some(written + 1) {
                std::process::abort();
            }
        }
        progress.finish();
    }

    // Merge everything there is: the previous output and all parts.
    let mut all = vec![];
    if out.path.exists() {
        all.push(rows::read(&out.path, out.format)?);
    }
    for (_, p) in out.part_files()? {
        all.push(rows::read(&p, out.format)?);
    }
    let merged = merge(all);
    rows::write_atomic(&out.path, out.format, &merged, &carried)?;
    if out.parts.exists() {
        std::fs::remove_dir_all(&out.parts)
            .with_context(|| format!("removing {}", out.parts.display()))?;
    }
    let failed = merged.iter().filter(|r| !r.ok()).count();
    Ok(Summary {
        ok: merged.len() - failed,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uri: &str, start: Option<f64>, status: &str) -> Row {
        Row {
            uri: uri.into(),
            content_type: "x".into(),
            size_bytes: None,
            embedding: status.is_empty().then(|| vec![1.0]),
            status: status.into(),
            video_start_sec: start,
            video_end_sec: start.map(|s| s + 1.0),
            model: "m".into(),
            space: "s".into(),
            dimension: Some(1),
            carried: Default::default(),
        }
    }

    #[test]
    fn merge_keeps_the_newest_rows_of_each_uri() {
        let old = vec![
            row("v.mp4", Some(0.0), ""),
            row("v.mp4", Some(1.0), "corrupt"),
            row("a.png", None, ""),
        ];
        let retry = vec![row("v.mp4", Some(1.0), ""), row("v.mp4", Some(0.0), "")];
        let m = merge(vec![old.clone(), retry]);
        assert_eq!(m.len(), 3);
        assert!(m.iter().all(Row::ok));
        assert_eq!(m[0].uri, "a.png");
        assert_eq!(m[1].video_start_sec, Some(0.0));
        assert_eq!(done_uris(&old), HashSet::from(["a.png".to_string()]));
    }
}
