//! The row-in, rows-out job behind `generate`, `classify` and `score`: an
//! input table, one or more output rows per input row (a video's segments),
//! parts written whole as chunks finish, `--resume` and `--shard` as in
//! `mmembed batch` (see its module docs for the layout and crash safety).
//!
//! An input row is identified by its values: output rows carry the input's
//! columns, so a rerun knows which rows are done. `--resume` keeps the rows
//! whose status is empty or names a failure that a rerun would repeat, and
//! runs again the missing ones and those whose status starts with
//! BigQuery's `A retryable error occurred:` — Google's own recipe for
//! re-running `AI.GENERATE` jobs.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use arrow_schema::SchemaRef;
use mmembed::generate::RETRYABLE_PREFIX;
use serde_json::Value;

use crate::batch::Progress;
use crate::inputs::Shard;
use crate::lock::OutputLock;
use crate::output::{Location, Output};
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

/// The identity of an input row: a hash of its values, in column order.
pub fn row_key(columns: &[String], row: &Row) -> String {
    let values: Vec<&Value> = columns
        .iter()
        .map(|c| row.get(c).unwrap_or(&Value::Null))
        .collect();
    let text = serde_json::to_string(&values).unwrap_or_default();
    blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
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

/// Makes `rows` the newest rows of their keys.
fn absorb(done: &mut HashMap<String, Vec<Row>>, columns: &[String], rows: Vec<Row>) {
    let mut fresh: HashMap<String, Vec<Row>> = HashMap::new();
    for r in rows {
        fresh.entry(row_key(columns, &r)).or_default().push(r);
    }
    done.extend(fresh);
}

fn status(r: &Row) -> &str {
    r.get("status").and_then(Value::as_str).unwrap_or("")
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

/// The rows of an earlier run's output or part, refused when that run
/// made other columns or was made with other settings.
async fn read_all(
    out: &Output,
    loc: &Location,
    expect: &[String],
    recipe: &Recipe,
) -> anyhow::Result<Vec<Row>> {
    let (names, rows, earlier) = table::decode(loc.read().await?, out.format, &loc.display())?;
    if let Some(earlier) = earlier {
        recipe.check_resume(&loc.display(), &earlier)?;
    }
    let mut got = names.clone();
    got.sort();
    let mut want = expect.to_vec();
    want.sort();
    if !rows.is_empty() && got != want {
        bail!(
            "{} was written with other columns ({}) than this job makes ({}): the input, the prompt's \
             schema or the command changed. Write to a new output or pass --overwrite",
            loc.display(),
            names.join(", "),
            expect.join(", ")
        );
    }
    Ok(rows)
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
    let mut rows: Vec<(String, Row)> = input
        .rows
        .into_iter()
        .map(|r| (row_key(&columns, &r), r))
        .filter(|r| !out.owns(r.1.get("uri").and_then(Value::as_str).unwrap_or("")))
        .collect();
    if let Some(s) = opts.shard {
        rows.retain(|(k, _)| s.contains(k));
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
    // Newest rows of every key: the output, then the parts in order.
    let mut done: HashMap<String, Vec<Row>> = HashMap::new();
    if opts.resume {
        if exists {
            absorb(
                &mut done,
                &columns,
                read_all(out, &out.path, &out_columns, &opts.recipe).await?,
            );
        }
        for (_, p) in out.part_files().await? {
            absorb(
                &mut done,
                &columns,
                read_all(out, &p, &out_columns, &opts.recipe).await?,
            );
        }
    }
    let todo: Vec<Row> = rows
        .iter()
        .filter(|(k, _)| {
            done.get(k)
                .is_none_or(|rs| rs.iter().any(|r| status(r).starts_with(RETRYABLE_PREFIX)))
        })
        .map(|(_, r)| r.clone())
        .collect();
    tracing::info!(
        rows = rows.len(),
        done = rows.len() - todo.len(),
        to_run = todo.len(),
        output = %out.path.display(),
        "row job"
    );
    if opts.resume && todo.len() < rows.len() {
        eprintln!(
            "keeping {} rows already done; running {}",
            rows.len() - todo.len(),
            todo.len()
        );
    }

    if !todo.is_empty() {
        out.prepare_parts().await?;
        let mut part = out.part_files().await?.last().map_or(1, |(n, _)| n + 1);
        let mut progress = Progress::new(todo.len() as u64);
        let mut failed = 0;
        for chunk in todo.chunks(opts.chunk_rows.max(1)) {
            let n = chunk.len();
            let produced = compute(chunk.to_vec()).await;
            if produced.len() != n {
                bail!("internal error: {} results for {n} rows", produced.len());
            }
            let flat: Vec<Row> = produced.into_iter().flatten().collect();
            failed += flat.iter().filter(|r| !status(r).is_empty()).count();
            let loc = out.part(part);
            let bytes = table::encode(out.format, &out_schema, &flat)?;
            loc.write(bytes, out.format.content_type())
                .await
                .with_context(|| format!("writing {}", loc.display()))?;
            absorb(&mut done, &columns, flat);
            part += 1;
            progress.advance(n as u64, failed);
        }
        progress.finish();
    }

    // One entry per input row, in input order (rows no longer in the input
    // are dropped; rows of other shards were never here).
    let mut merged = vec![];
    for (k, _) in &rows {
        if let Some(rs) = done.get(k) {
            merged.extend(rs.iter().cloned());
        }
    }
    let bytes = table::encode(out.format, &out_schema, &merged)?;
    out.path
        .write(bytes, out.format.content_type())
        .await
        .with_context(|| format!("writing {}", out.path.display()))?;
    out.remove_parts().await?;
    let failed = merged.iter().filter(|r| !status(r).is_empty()).count();
    Ok(Summary {
        ok: merged.len() - failed,
        failed,
    })
}
