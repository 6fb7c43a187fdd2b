//! `mmembed batch`: the counterpart of BigQuery's `AI.GENERATE_EMBEDDING`
//! over an object table. One row per image and per video segment, a status
//! per row, and crash safety through parts that are each written whole.
//!
//! Layout while a job runs, for `-o out.parquet` (a local path or a bucket
//! URI such as `gs://b/out.parquet`; object stores have no rename, so every
//! part and the final object are written in one put or one completed
//! multipart upload, which readers see whole or not at all):
//!
//! ```text
//! out.parquet.lock                        the one job writing this output
//! out.parquet.parts/part-000001.parquet   one part per chunk of inputs
//! out.parquet.parts/part-000002.parquet
//! ```
//!
//! At the end the parts (and, with `--resume`, the previous `out.parquet`)
//! are merged into `out.parquet`, written whole (a temporary file renamed,
//! or one upload), then the parts are removed. Every URI's rows live in
//! exactly one part, so merging keeps, for each URI, the rows of the newest
//! file that has it: a retried or changed object replaces its old rows, and
//! a crash between the final write and the clean-up duplicates nothing.
//! Rows of URIs the input no longer lists stay unless `--prune` (the
//! listing, sorted by URI, is then the merge's filter). The
//! merge and `--resume`'s reading are streams ([`merge`](crate::merge)):
//! memory does not grow with the output.
//!
//! Remote objects are fetched ahead of the model by a separate task,
//! concurrently and bounded by bytes in flight, so storage latency overlaps
//! compute.

use std::collections::{BTreeMap, HashSet};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use clap::Args as ClapArgs;
use futures::StreamExt;
use mmembed::{Embedder, EmbedderInfo, MediaSource};
use mmembed_store::{ObjectInfo, Stores};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::backend::{BackendArgs, SegmentArgs};
use crate::inputs::{self, Identity, Input, Kind, Shard, Version};
use crate::lock::OutputLock;
use crate::merge::{self, Kept, SpaceGroup, Staging, sources};
use crate::output::Output;
use crate::rows::{self, Format, Row};
use mmembed_rows::RowInput;

/// Flags of `mmembed batch`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed batch photos/ -o photos.parquet --model demo
  mmembed batch 'media/**/*.mp4' -o videos.jsonl --interval 8
  mmembed batch manifest.csv -o out.parquet --resume
  mmembed batch gs://bucket/photos/ -o gs://bucket/emb/photos.parquet
  mmembed batch 's3://bucket/clips/**/*.mp4' -o clips.parquet --resume
  mmembed batch media/ -o part-2.parquet --shard 2/8   # one of 8 machines
  mmembed batch gs://b/media/ -o 'gs://b/emb/part-{shard}.parquet' --shard auto   # array job")]
pub struct Args {
    /// A folder (walked recursively; hidden entries skipped), a glob
    /// (quote it), a manifest (`.csv`/`.jsonl`/`.parquet` with a `uri`,
    /// `path` or `url` column, here or in a bucket; a `content_type` column types
    /// the objects, other columns are carried to the output), one file, or
    /// a bucket prefix or glob (`gs://b/photos/`, `s3://b/**/*.jpg`,
    /// `az://c/x/`). Objects are typed by their declared type, else their
    /// extension, else (names without one) their first bytes.
    #[arg(env = "MMEMBED_INPUT")]
    pub input: String,

    /// Output file or bucket object (`gs://`, `s3://`, `az://`); `.parquet`
    /// or `.jsonl` chooses the format.
    #[arg(short, long, env = "MMEMBED_OUTPUT")]
    pub output: String,

    /// Output format, when the extension does not say.
    #[arg(long, env = "MMEMBED_FORMAT", value_enum)]
    pub format: Option<Format>,

    /// Continue an interrupted or partly failed job, or bring an output up
    /// to date: keep the rows of objects that succeeded and are unchanged
    /// (same generation/ETag, else same size and modification time), embed
    /// new and changed objects and retry failed ones. Refused when the kept
    /// rows were embedded by another model or at another `--dimension`, or
    /// (a Parquet output records them) with other decode or video settings.
    #[arg(long, env = "MMEMBED_RESUME", conflicts_with = "overwrite")]
    pub resume: bool,

    /// With `--resume`: drop the earlier rows of URIs the input no longer
    /// lists (objects deleted or renamed since), so that the output holds
    /// the input's rows and no others. Without it they are kept, and the
    /// job says how many. Refused when the input lists nothing.
    #[arg(long, env = "MMEMBED_PRUNE", requires = "resume")]
    pub prune: bool,

    /// Replace an existing output instead of refusing.
    #[arg(long, env = "MMEMBED_OVERWRITE")]
    pub overwrite: bool,

    /// Take only slice i of n (`0/4` .. `3/4`), by a hash of each URI: n
    /// machines with the same input each write their own output, and the
    /// outputs together are the whole job. `auto` (or `auto/n`) takes i and
    /// n from a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` and
    /// `MMEMBED_SHARD_COUNT`) or a Slurm array (`SLURM_ARRAY_TASK_ID`,
    /// `SLURM_ARRAY_TASK_COUNT`); `{shard}` and `{shards}` in `--output`
    /// become i and n.
    #[arg(long, env = "MMEMBED_SHARD")]
    pub shard: Option<Shard>,

    /// Output dimension (Vertex: 128, 256, 512, 1408).
    #[arg(long, env = "MMEMBED_DIMENSION")]
    pub dimension: Option<u32>,

    /// Remote objects fetched at once, ahead of the model.
    #[arg(long, env = "MMEMBED_FETCH_CONCURRENCY", default_value_t = 32)]
    pub fetch_concurrency: usize,

    /// Most bytes of fetched objects held in memory, waiting for the model
    /// (MiB). An object larger than this is fetched alone.
    #[arg(long, env = "MMEMBED_FETCH_BUFFER_MIB", default_value_t = 512)]
    pub fetch_buffer_mib: u64,

    /// Backend calls (parts of `--batch-size` rows) in flight at once.
    /// Default 2 with `--backend local`: the model works on one while the
    /// next is decoded, and a part is written while the next is embedded.
    /// Default 1 for the others, which already send
    /// `MMEMBED_VERTEX_CONCURRENCY` requests at once per call.
    #[arg(long, env = "MMEMBED_CALLS_IN_FLIGHT", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub calls_in_flight: Option<u32>,

    /// How long a bucket output's lock stays valid without its job renewing
    /// it (seconds; the job renews it every third of this). A lock of a
    /// process that died on this machine is taken over at once.
    #[arg(long, env = "MMEMBED_LOCK_TTL_SECS", default_value_t = 120)]
    pub lock_ttl_secs: u64,

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

/// Refuses to add this run's vectors to an output whose kept vectors are
/// in another embedding space or of another size: they could not be
/// compared, and a search or an index over the output would refuse it (or,
/// at one size, rank nonsense). `kept` are the groups of vectors that stay
/// (the URIs this run embeds again are replaced, so they do not count). A
/// combination allowed to mix spaces is checked for the size only.
fn check_same_space(
    output: &str,
    kept: &[SpaceGroup<'_>],
    info: &EmbedderInfo,
    dimension: Option<u32>,
) -> anyhow::Result<()> {
    let dim = dimension.unwrap_or(info.native_dimension as u32) as i32;
    // (model, space, dimension) of the kept vectors this run could not make,
    // with how many there are and the first URI.
    let mut other: BTreeMap<(&str, &str, Option<i32>), (usize, &str)> = BTreeMap::new();
    for g in kept {
        if (info.space.is_mixed() || g.space == info.space.as_str()) && g.dimension == Some(dim) {
            continue;
        }
        other.insert((g.model, g.space, g.dimension), (g.rows, g.first));
    }
    let Some(((model, space, d), (n, uri))) = other.first_key_value() else {
        return Ok(());
    };
    let more: usize = other.values().skip(1).map(|(n, _)| n).sum();
    let more = if more > 0 {
        format!(" (and {more} more of other models or sizes)")
    } else {
        String::new()
    };
    let d = d.map_or("?".to_string(), |d| d.to_string());
    bail!(
        "{output} holds {n} vectors of model `{model}` in space {space} at dimension {d} \
         (the first: {uri}){more}; this run embeds with `{}` into space {} at dimension {dim}. \
         Vectors of two spaces or sizes cannot be compared, so they do not go into one output: \
         resume with the model and --dimension that made it, or write another output (-o) or \
         replace this one (--overwrite)",
        info.model_id,
        info.space
    )
}

/// Largest remote image / video fetched for the local backend; the same
/// defaults as its own limits (`ImageLimits`, `LocalOptions::max_video_bytes`).
const MAX_REMOTE_IMAGE: u64 = 100 << 20;
const MAX_REMOTE_VIDEO: u64 = 2 << 30;
/// The largest remote object of `kind` read.
fn max_remote(kind: Kind) -> u64 {
    match kind {
        Kind::Image => MAX_REMOTE_IMAGE,
        Kind::Video => MAX_REMOTE_VIDEO,
    }
}

/// A remote object of unknown size (named by a manifest) counts as this
/// much of the fetch buffer until its size is known.
const UNKNOWN_SIZE: u64 = 1 << 20;

/// One input, read or ready to be read by the backend.
struct Prepared {
    row: RowInput,
    /// The share of the fetch buffer its bytes take, until it is embedded.
    permit: Option<OwnedSemaphorePermit>,
}

/// Turns inputs into requests: stats local files, fetches remote objects
/// the backend does not read itself.
struct Fetcher {
    embedder: Arc<dyn Embedder>,
    segments: Option<mmembed::VideoSegmentConfig>,
    dimension: Option<u32>,
    buffer: Arc<Semaphore>,
    /// The buffer's size in KiB permits.
    buffer_kib: u32,
}

impl Fetcher {
    fn permits_for(&self, input: &Input) -> u32 {
        let remote = input.path.is_none() && !self.embedder.reads_uri(&input.uri);
        if !remote {
            return 0;
        }
        let size = match (input.listed, input.identity.size) {
            (true, Some(n)) => n.max(0) as u64,
            _ => UNKNOWN_SIZE,
        };
        // An object larger than the whole buffer takes all of it: alone.
        (size.div_ceil(1024).max(1)).min(u64::from(self.buffer_kib)) as u32
    }

    async fn prepare(&self, input: Input, permit: Option<OwnedSemaphorePermit>) -> Prepared {
        let (segments, dimension) = (self.segments, self.dimension);
        let uri = input.uri.clone();
        let declared = input.content_type.clone();
        let known = mmembed_rows::media_type(&uri, declared.as_deref());
        if known.is_none() && !mmembed_rows::worth_sniffing(&uri, declared.as_deref()) {
            // Not an image or a video by its name or declared type: failed
            // without a request (a bucket's sidecar files cost nothing).
            let row = RowInput::unsupported(uri, declared.as_deref());
            return Prepared {
                row: with_identity(row, input.identity, input.carried.into_map()),
                permit: None,
            };
        }
        // A manifest's remote object of a known type is read in one request.
        let one_request = if input.listed { None } else { known };
        let (row, identity) = match (&input.path, one_request) {
            // Its size and modification time are read now, not at listing.
            (Some(p), _) => {
                let row = RowInput::file(uri, p, declared.as_deref(), segments, dimension);
                (row, None)
            }
            // A backend that reads the object itself (Vertex, gs://) gets
            // its URI; one of unknown type is typed below first.
            (None, _) if known.is_some() && self.embedder.reads_uri(&uri) => {
                let source = MediaSource::Uri(uri.clone());
                let row = RowInput::new(uri, source, declared.as_deref(), segments, dimension);
                (row, Some(input.identity))
            }
            // A manifest's object of a known type: one request, its
            // metadata from the answer (not a HEAD first: half the requests
            // for a list of URLs, and URLs signed for GET refuse HEAD).
            (None, Some((ct, kind))) => {
                let mut identity = input.identity;
                let row = match Stores::shared().read(&uri, max_remote(kind)).await {
                    Ok((bytes, info)) => {
                        identity = Identity::of(&info);
                        let source = MediaSource::Bytes(bytes);
                        RowInput::new(uri, source, declared.as_deref(), segments, dimension)
                    }
                    Err(e) => RowInput::failed(uri, ct, mmembed_rows::store_status(&e)),
                };
                (row, Some(identity))
            }
            (None, None) => {
                let stores = Stores::shared();
                let listing = input.listing();
                let mut identity = input.identity;
                let info = match listing {
                    Some(o) => Ok(o),
                    None => stores.head(&uri).await,
                };
                let row = match info {
                    Ok(info) => {
                        identity = Identity::of(&info);
                        // A manifest's declared type, else the store's.
                        let declared = declared.as_deref().or(info.content_type.as_deref());
                        if self.embedder.reads_uri(&uri) {
                            // Typed here (perhaps by its first bytes); read there.
                            let (s, d) = (self.segments, self.dimension);
                            RowInput::object(uri, &info, declared, s, d).await
                        } else {
                            self.fetch(uri, &info, declared).await
                        }
                    }
                    Err(e) => {
                        let ct = known.map(|k| k.0).or(declared.as_deref());
                        let ct = ct.unwrap_or("application/octet-stream");
                        RowInput::failed(uri, ct, mmembed_rows::store_status(&e))
                    }
                };
                (row, Some(identity))
            }
        };
        let row = match identity {
            Some(id) => with_identity(row, id, input.carried.into_map()),
            None => RowInput {
                carried: input.carried.into_map(),
                ..row
            },
        };
        let permit = if row.request.is_ok() { permit } else { None };
        Prepared { row, permit }
    }

    /// The row of a remote object read here, typed by `declared` or its
    /// name, else by its first bytes (the body abandoned there when they
    /// are no image's or video's).
    async fn fetch(&self, uri: String, info: &ObjectInfo, declared: Option<&str>) -> RowInput {
        let (segments, dimension) = (self.segments, self.dimension);
        let stores = Stores::shared();
        let typed = mmembed_rows::media_type(&uri, declared);
        let got = match typed {
            Some((_, kind)) => stores.read_listed(info, max_remote(kind)).await.map(Some),
            None if mmembed_rows::worth_sniffing(&uri, declared) => {
                let media = |head: &[u8]| mmembed_rows::sniff(head).is_some();
                let head = mmembed_rows::SNIFF_LEN;
                stores
                    .read_listed_if(info, MAX_REMOTE_VIDEO, head, &media)
                    .await
            }
            None => Ok(None),
        };
        match got {
            Ok(Some(bytes)) => RowInput::new(
                uri,
                MediaSource::Bytes(bytes),
                declared,
                segments,
                dimension,
            ),
            // Not an image or a video: the row says what it was taken for.
            Ok(None) => RowInput::unsupported(uri, declared),
            Err(e) => {
                let ct = typed.map(|t| t.0).or(declared);
                let ct = ct.unwrap_or("application/octet-stream");
                RowInput::failed(uri, ct, mmembed_rows::store_status(&e))
            }
        }
    }
}

/// `row` with an object's identity and carried columns.
fn with_identity(
    row: RowInput,
    id: Identity,
    carried: serde_json::Map<String, serde_json::Value>,
) -> RowInput {
    RowInput {
        size_bytes: id.size,
        generation: id.generation,
        etag: id.etag,
        updated: id.updated,
        carried,
        ..row
    }
}

/// Embeds one chunk of prepared inputs into rows; never fails as a whole.
async fn embed_chunk(
    embedder: &dyn Embedder,
    dimension: Option<u32>,
    chunk: Vec<Prepared>,
) -> Vec<Row> {
    let (inputs, permits): (Vec<_>, Vec<_>) = chunk.into_iter().map(|p| (p.row, p.permit)).unzip();
    let rows = mmembed_rows::embed_rows(embedder, dimension, inputs).await;
    // The bytes were in the backend's hands until now (or dropped).
    drop(permits);
    rows.into_iter().map(|(_, row)| row).collect()
}

/// Prepares `todo` on its own task, `concurrency` objects at a time, and
/// hands chunks of at most `batch` to the returned channel. Buffer permits
/// are taken in input order, so later objects never starve earlier ones.
fn prefetch(
    fetcher: Arc<Fetcher>,
    todo: Vec<Input>,
    concurrency: usize,
    batch: usize,
) -> mpsc::Receiver<Vec<Prepared>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let f = fetcher.clone();
        let chunks = futures::stream::iter(todo)
            .then(move |input| {
                let f = f.clone();
                async move {
                    let n = f.permits_for(&input);
                    let permit = if n == 0 {
                        None
                    } else {
                        f.buffer.clone().acquire_many_owned(n).await.ok()
                    };
                    (input, permit)
                }
            })
            .map(move |(input, permit)| {
                let f = fetcher.clone();
                async move { f.prepare(input, permit).await }
            })
            .buffered(concurrency.max(1))
            // Whatever is ready, up to a batch: the model never waits for a
            // full chunk while objects trickle in.
            .ready_chunks(batch.max(1));
        let mut chunks = std::pin::pin!(chunks);
        while let Some(chunk) = chunks.next().await {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    rx
}

pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
    /// What is counted: `files` (a batch job), `rows` (a row job).
    unit: &'static str,
}

impl Progress {
    pub(crate) fn new(total: u64, unit: &'static str) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{bar:40}} {{pos}}/{{len}} {unit}  {{per_sec}}  eta {{eta}}  {{msg}}"
                ))
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
            unit,
        }
    }

    pub(crate) fn advance(&mut self, n: u64, failed_rows: usize) {
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
                "{}/{} {unit}, {rate:.1} {unit}/s, eta {eta:.0} s, {failed_rows} failed rows so far",
                self.done,
                self.total,
                unit = self.unit
            );
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Runs the job; the summary counts the rows of the whole output.
pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let out = Output::new(&Shard::name_output(&args.output, args.shard)?, args.format)?;
    let lock =
        OutputLock::acquire(&out.path, Duration::from_secs(args.lock_ttl_secs.max(3))).await?;
    let result = run_locked(&args, &out).await;
    lock.release().await;
    result
}

async fn run_locked(args: &Args, out: &Output) -> anyhow::Result<Summary> {
    let segments = args.segments.config()?;
    let mut table = inputs::list(&args.input).await?;
    let listed = table.inputs.len();
    table.inputs.retain(|i| !out.owns(&i.uri));
    if table.inputs.len() != listed {
        tracing::info!(
            left_out = listed - table.inputs.len(),
            "the input holds this job's own output, parts or lock; they are not inputs"
        );
    }
    if let Some(shard) = args.shard {
        table.inputs.retain(|i| shard.contains(&i.uri));
    }

    let exists = out.path.exists().await?;
    let old_parts = out.part_files().await?;
    if (exists || !old_parts.is_empty()) && !args.resume {
        if !args.overwrite {
            bail!(
                "{} (or its parts) exists: pass --resume to continue that job or --overwrite to replace it",
                out.path.display()
            );
        }
        out.path.remove().await?;
        out.remove_parts().await?;
    }
    // What the vectors depend on beyond the model and size each row says.
    let video = table.inputs.iter().any(Input::may_be_video);
    let recipe = args.backend.recipe(video.then_some(&args.segments));
    let mut staging = Staging::new();
    let kept = if args.resume {
        let sources = sources(out, &mut staging).await?;
        let (format, recipe) = (out.format, recipe.clone());
        tokio::task::spawn_blocking(move || Kept::read(&sources, format, &recipe)).await??
    } else {
        Kept::default()
    };
    // Rows of URIs this input does not list: kept unless `--prune`.
    let outside = kept.outside(|uri| {
        table
            .inputs
            .binary_search_by(|i| i.uri.as_str().cmp(uri))
            .is_ok()
    });
    let (outside_rows, outside) = (outside.rows, outside.uris);
    if !outside.is_empty() {
        let n = outside.len();
        if !args.prune {
            eprintln!(
                "keeping {outside_rows} rows of {n} URIs the input no longer lists (deleted \
                 or renamed since, or another input's); --prune drops them"
            );
        } else if table.inputs.is_empty() {
            bail!(
                "the input lists no files, so --prune would empty {}: check the input, or \
                 remove the output",
                out.path.display()
            );
        } else {
            eprintln!(
                "dropping {outside_rows} rows of {n} URIs the input no longer lists (--prune)"
            );
        }
    }
    // With `--prune` the URIs the input no longer lists (sorted; usually
    // few) say which earlier rows go: not the listing's URIs, a copy of
    // which would cost about 80 bytes a listed object.
    let dropped = if args.prune { outside } else { Vec::new() };
    // The listing is taken apart: what is to embed moves on (not copied:
    // ten million listed objects hold about 3 GB).
    let listed = std::mem::take(&mut table.inputs);
    let inputs_total = listed.len();
    let (mut changed, mut unknown) = (0, 0);
    let mut todo: Vec<Input> = listed
        .into_iter()
        .filter(|i| match kept.done(&i.uri) {
            Some(v) if v.same(&Version::of(&i.identity)) => {
                // A manifest's remote object, without identity columns.
                unknown += usize::from(i.path.is_none() && i.identity == Identity::default());
                false
            }
            Some(_) => {
                changed += 1;
                true
            }
            None => true,
        })
        .collect();
    // In URI order, so that this run's parts follow each other and the
    // final merge streams them as one run.
    todo.sort_by(|a, b| a.uri.cmp(&b.uri));
    // Columns carried by earlier runs stay, new ones are added.
    let mut carried = table.carried_columns.clone();
    for k in &kept.carried {
        if !carried.contains(k) {
            carried.push(k.clone());
        }
    }
    if inputs_total == 0 {
        tracing::warn!(input = %args.input, "the input lists no files");
    }
    tracing::info!(
        inputs = inputs_total,
        unchanged_and_done = inputs_total - todo.len(),
        changed,
        to_embed = todo.len(),
        output = %out.path.display(),
        "batch job"
    );
    if args.resume && todo.len() < inputs_total {
        eprintln!(
            "skipping {} objects already embedded and unchanged; embedding {} ({changed} changed since)",
            inputs_total - todo.len(),
            todo.len()
        );
    }
    if unknown > 0 {
        eprintln!(
            "{unknown} of the skipped objects are named by the manifest without their version \
             (no generation, etag, size or updated column, as an object table has): they are \
             taken as unchanged"
        );
    }

    // What resuming read of the earlier files is needed once more, to check
    // the vectors that stay, and only when there is something to embed.
    let kept = (!todo.is_empty()).then_some(kept);
    if !todo.is_empty() {
        let embedder = args.backend.build_for(args.dimension).await?;
        if let Some(kept) = kept {
            let redo: HashSet<&str> = todo.iter().map(|i| i.uri.as_str()).collect();
            let stays = |uri: &str| !redo.contains(uri) && !merge::among(&dropped, uri);
            check_same_space(
                &out.path.display(),
                &kept.spaces_kept(stays),
                embedder.info(),
                args.dimension,
            )?;
        }
        out.prepare_parts().await?;
        let buffer_kib = (args.fetch_buffer_mib.max(1) * 1024).min(u64::from(u32::MAX >> 3)) as u32;
        let fetcher = Arc::new(Fetcher {
            embedder: embedder.clone(),
            segments,
            dimension: args.dimension,
            buffer: Arc::new(Semaphore::new(buffer_kib as usize)),
            buffer_kib,
        });
        let first_part = out.part_files().await?.last().map_or(1, |(n, _)| n + 1);
        let mut progress = Progress::new(todo.len() as u64, "files");
        let mut failed_rows = 0;
        let batch = args.backend.batch_size();
        let chunks = prefetch(fetcher, todo, args.fetch_concurrency, batch);
        let in_flight = args
            .calls_in_flight
            .map_or_else(|| args.backend.default_calls_in_flight(), |n| n as usize);
        // Parts come back in input order; while one is written the next
        // ones are with the backend (a local model prepares a queued call's
        // first batch while it finishes the call before).
        let embedded = futures::stream::unfold(chunks, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        })
        .map(|chunk| {
            let n = chunk.len() as u64;
            let embedder = embedder.as_ref();
            async move { (n, embed_chunk(embedder, args.dimension, chunk).await) }
        })
        .buffered(in_flight);
        let mut embedded = std::pin::pin!(embedded);
        let mut part = first_part;
        let mut written = 0;
        while let Some((n, mut rows)) = embedded.next().await {
            failed_rows += rows.iter().filter(|r| !r.ok()).count();
            // Sorted, as the merge reads parts (a video's segments by start).
            rows.sort_by(merge::key_cmp);
            let loc = out.part(part);
            let bytes = rows::encode(out.format, &rows, &carried, &recipe)?;
            staging.keep(&loc, &bytes)?;
            loc.write(bytes, out.format.content_type())
                .await
                .with_context(|| format!("writing {}", loc.display()))?;
            part += 1;
            written += 1;
            progress.advance(n, failed_rows);
            if args.abort_after_parts == Some(written) {
                std::process::abort();
            }
        }
        progress.finish();
    }

    // Merge everything there is: the previous output and all parts,
    // streamed into a file beside the output (or in the staging folder for
    // a bucket), flushed, then renamed over the output (or uploaded).
    let sources = sources(out, &mut staging).await?;
    tracing::info!(
        files = sources.len(),
        output = %out.path.display(),
        "merging the earlier output and the parts into the output"
    );
    let format = out.format;
    let counts = merge::write_merged(out, &mut staging, move |dest| {
        merge::merge(sources, format, dest, &carried, &recipe, &dropped)
    })
    .await?;
    Ok(Summary {
        ok: counts.ok,
        failed: counts.failed,
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
            generation: None,
            etag: None,
            updated: None,
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
    fn resuming_refuses_vectors_of_another_space_or_size() {
        let info = |space: &str, dim: usize| EmbedderInfo {
            backend: "local".into(),
            model_id: "n".into(),
            space: mmembed::SpaceId::new(space),
            native_dimension: dim,
            supported_dimensions: vec![dim as u32],
            modalities: vec![],
            max_text_tokens: None,
        };
        let mut other = row("b.png", None, "");
        other.space = "t".into();
        let kept = vec![row("a.png", None, ""), row("v.mp4", Some(0.0), "")];
        let none = HashSet::new();
        let check = |rows: &[Row], redo: &HashSet<&str>, i: &EmbedderInfo, d: Option<u32>| {
            let mut kept = Kept::default();
            for r in rows {
                kept.add(0, r);
            }
            check_same_space("out.jsonl", &kept.spaces_kept(|u| !redo.contains(u)), i, d)
                .map_err(|e| e.to_string())
        };

        // The same space and size, the size asked for or the native one.
        assert!(check(&kept, &none, &info("s", 1), None).is_ok());
        assert!(check(&kept, &none, &info("s", 8), Some(1)).is_ok());
        // Another space: the error names both and the first row.
        let e = check(&kept, &none, &info("t", 1), None).unwrap_err();
        assert!(
            e.contains("2 vectors of model `m` in space s at dimension 1 (the first: a.png)")
                && e.contains("`n` into space t at dimension 1")
                && e.contains("--overwrite"),
            "{e}"
        );
        // Another size.
        let e = check(&kept, &none, &info("s", 1), Some(4)).unwrap_err();
        assert!(e.contains("at dimension 4"), "{e}");
        // Two groups: the first is named, the rest counted.
        let mixed_rows = [kept.clone(), vec![other.clone()]].concat();
        let e = check(&mixed_rows, &none, &info("u", 1), None).unwrap_err();
        assert!(e.contains("(and 1 more of other models or sizes)"), "{e}");
        // Failed rows hold no vector; rows embedded again are replaced.
        let failed = vec![row("a.png", None, "cannot decode")];
        assert!(check(&failed, &none, &info("t", 1), None).is_ok());
        let redo: HashSet<&str> = ["a.png", "v.mp4"].into();
        assert!(check(&kept, &redo, &info("t", 1), None).is_ok());
        // A combination allowed to mix spaces: the size is still checked.
        let both =
            mmembed::SpaceId::mixed(&mmembed::SpaceId::new("s"), &mmembed::SpaceId::new("t"));
        let mut m = info("", 1);
        m.space = both;
        assert!(check(&mixed_rows, &none, &m, None).is_ok());
        assert!(check(&mixed_rows, &none, &m, Some(2)).is_err());
    }
}
