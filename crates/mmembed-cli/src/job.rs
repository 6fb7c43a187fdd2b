//! The row-in, rows-out job behind `generate`, `classify` and `score`: an
//! input table, one or more output rows per input row (a video's segments),
//! parts written whole as chunks finish, `--resume` and `--shard` as in
//! `mmembed batch` (see its module docs for the layout and crash safety).
//!
//! An input row is identified by its values: output rows carry the input's
//! columns, so a rerun knows which rows are done. Rows equal in every
//! column are one row of the job, answered once in the first one's place.
//! The output keeps the input's order; it is merged from the earlier output
//! and the parts as a stream (see [`crate::job_merge`]). `--resume` keeps the rows
//! whose status is empty or names a failure that a rerun would repeat, and
//! runs again the missing ones and those whose status starts with
//! BigQuery's `A retryable error occurred:` — Google's own recipe for
//! re-running `AI.GENERATE` jobs.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use arrow_schema::SchemaRef;
use futures::StreamExt;
use serde_json::Value;

use crate::batch::Progress;
use crate::inputs::Shard;
use crate::job_merge::{self, Index, Placed, key_of};
use crate::lock::OutputLock;
use crate::merge::{self, Source, Staging};
use crate::output::Output;
use crate::recipe::Recipe;
use crate::rows::Format;
use crate::table::{self, Row, Table};

/// Settings shared by the row jobs.
pub struct JobOptions {
    /// Output path or bucket URI.
    pub output: String,
    /// Output format, when the extension does not say.
    pub format: Option<Format>,
    /// Continue an earlier run.
    pub resume: bool,
    /// Replace an earlier output.
    pub overwrite: bool,
    /// This machine's slice.
    pub shard: Option<Shard>,
    /// Input rows per part.
    pub chunk_rows: usize,
    /// Chunks computed at once.
    pub in_flight: usize,
    /// Bucket lock validity.
    pub lock_ttl: Duration,
    /// What the results depend on beyond the input row (the prompt, the
    /// labels, the model): recorded in Parquet outputs, checked on resume.
    pub recipe: Recipe,
}

/// Rows ok / failed in the whole output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Rows with an empty status.
    pub ok: usize,
    /// Rows with a status.
    pub failed: usize,
}

/// Splits a chunk into the requests to send and, per row, the index of its
/// request or why it has none (that row fails alone, nothing is sent).
pub fn plan<T>(
    rows: &[Row],
    mut make: impl FnMut(&Row) -> Result<T, String>,
) -> (Vec<T>, Vec<Result<usize, String>>) {
    let mut reqs = vec![];
    let slots = rows
        .iter()
        .map(|r| {
            make(r).map(|q| {
                reqs.push(q);
                reqs.len() - 1
            })
        })
        .collect();
    (reqs, slots)
}

/// Runs `compute` over the input rows not yet done, in chunks; each call
/// gets a chunk of input rows and returns, per input row, its output rows
/// (each with the input's columns and those of `out_schema`).
pub async fn run<F, Fut>(
    input: Table,
    out_schema: SchemaRef,
    opts: &JobOptions,
    mut compute: F,
) -> anyhow::Result<Summary>
where
    F: FnMut(Vec<Row>) -> Fut,
    Fut: Future<Output = Vec<Vec<Row>>>,
{
    let out = Output::new(&Shard::name_output(&opts.output, opts.shard)?, opts.format)?;
    let lock = OutputLock::acquire(&out.path, opts.lock_ttl).await?;
    let out_schema = std::sync::Arc::new(opts.recipe.attach(&out_schema));
    let result = run_locked(input, out_schema, opts, &out, &mut compute).await;
    lock.release().await;
    result
}

async fn run_locked<F, Fut>(
    input: Table,
    out_schema: SchemaRef,
    opts: &JobOptions,
    out: &Output,
    compute: &mut F,
) -> anyhow::Result<Summary>
where
    F: FnMut(Vec<Row>) -> Fut,
    Fut: Future<Output = Vec<Vec<Row>>>,
{
    let columns: Vec<String> = input
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let out_columns: Vec<String> = out_schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    // This job's distinct rows, in input order (their places), as rows of
    // the input, and their index.
    let mut index = Index::new(columns.clone(), input.len());
    let (mut at, mut keys) = (vec![], vec![]);
    let mut repeated = 0usize;
    let mut row = 0;
    for chunk in input.chunks() {
        for r in chunk? {
            row += 1;
            if out.owns(r.get("uri").and_then(Value::as_str).unwrap_or("")) {
                continue;
            }
            let key = key_of(&columns, &r);
            // Slices by the key's 32 hex digits, as earlier versions did.
            if let Some(s) = opts.shard
                && !s.contains(&format!("{key:032x}"))
            {
                continue;
            }
            if !index.insert(key, at.len() as u64) {
                repeated += 1;
                continue;
            }
            at.push(row - 1);
            keys.push(key);
        }
    }
    if repeated > 0 {
        tracing::warn!(
            repeated,
            "input rows equal to an earlier row (every column) are answered once, in the first one's place"
        );
    }

    let exists = out.path.exists().await?;
    let old_parts = out.part_files().await?;
    if (exists || !old_parts.is_empty()) && !opts.resume {
        if !opts.overwrite {
            bail!(
                "{} (or its parts) exists: pass --resume to continue that job or --overwrite to replace it",
                out.path.display()
            );
        }
        out.path.remove().await?;
        out.remove_parts().await?;
    }
    // Which file holds the newest rows of every key: the output, then the
    // parts in order.
    let mut staging = Staging::new();
    let mut files = vec![];
    if opts.resume {
        let sources = merge::sources(out, &mut staging).await?;
        let (format, recipe, expect) = (out.format, opts.recipe.clone(), out_columns.clone());
        let scanned = tokio::task::spawn_blocking(move || {
            let files = job_merge::scan(sources, format, &expect, &recipe, &mut index);
            (index, files)
        })
        .await?;
        index = scanned.0;
        let outside;
        (files, outside) = scanned.1?;
        if outside > 0 {
            eprintln!(
                "dropping the rows of {outside} earlier input rows the input no longer has \
                 (the output follows the input)"
            );
        }
    }
    let todo: Vec<usize> = (0..at.len()).filter(|&i| index.to_run(keys[i])).collect();
    tracing::info!(
        rows = at.len(),
        done = at.len() - todo.len(),
        to_run = todo.len(),
        output = %out.path.display(),
        "row job"
    );
    if opts.resume && todo.len() < at.len() {
        eprintln!(
            "keeping {} rows already done; running {}",
            at.len() - todo.len(),
            todo.len()
        );
    }

    if !todo.is_empty() {
        out.prepare_parts().await?;
        let mut part = out.part_files().await?.last().map_or(1, |(n, _)| n + 1);
        let mut progress = Progress::new(todo.len() as u64, "rows");
        let mut failed = 0;
        // Several chunks in flight, their parts written in order: waiting
        // for a chunk's slowest request before starting the next left the
        // backend's slots idle (half of them at 0–200 ms latencies).
        let mut chunks = futures::stream::iter(todo.chunks(opts.chunk_rows.max(1)))
            .map(|chunk| {
                let rows = input.take(&chunk.iter().map(|&i| at[i]).collect::<Vec<_>>());
                let computed = rows.map(&mut *compute);
                async move { anyhow::Ok((chunk, computed?.await)) }
            })
            .buffered(opts.in_flight.max(1));
        while let Some(done) = chunks.next().await {
            let (chunk, produced) = done?;
            let n = chunk.len();
            if produced.len() != n {
                bail!("internal error: {} results for {n} rows", produced.len());
            }
            // Places of the rows with output, in input order (the todo's).
            let mut range: Option<(u64, u64)> = None;
            for (&i, made) in chunk.iter().zip(&produced) {
                if !made.is_empty() {
                    index.wrote(keys[i], part, made);
                    range = Some(range.map_or((i as u64, i as u64), |(a, _)| (a, i as u64)));
                }
            }
            let flat: Vec<Row> = produced.into_iter().flatten().collect();
            failed += flat
                .iter()
                .filter(|r| !job_merge::status(r).is_empty())
                .count();
            let loc = out.part(part);
            let bytes = table::encode(out.format, &out_schema, &flat)?;
            // A bucket part's copy for the merge, so it is not downloaded.
            staging.keep(&loc, &bytes)?;
            loc.write(bytes, out.format.content_type())
                .await
                .with_context(|| format!("writing {}", loc.display()))?;
            if let Some((first, last)) = range {
                files.push(Placed {
                    source: Source {
                        rank: part,
                        path: staging.local(&loc).await?,
                        what: loc.display(),
                    },
                    first,
                    last,
                    sorted: true,
                });
            }
            part += 1;
            progress.advance(n as u64, failed);
        }
        progress.finish();
    }
    drop((input, at, keys));

    // The newest rows of every input row, in input order (rows no longer
    // in the input are dropped; rows of other shards were never here),
    // streamed into a file beside the output (or in the staging folder for
    // a bucket), flushed, then renamed over the output (or uploaded).
    let format = out.format;
    let counts = merge::write_merged(out, &mut staging, move |dest| {
        job_merge::merge(files, format, dest, &out_schema, &index)
    })
    .await?;
    Ok(Summary {
        ok: counts.ok,
        failed: counts.failed,
    })
}
