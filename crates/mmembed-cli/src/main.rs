//! `mmembed`: multimodal embeddings from the command line.
//!
//! Subcommands: `embed` (a few inputs to JSON), `batch` (a folder, glob or
//! manifest to a Parquet/JSONL table with a status per row), `search`
//! (top-k over batch outputs), `models` (what is available), `bench`
//! (backends side by side), `serve` (a Vertex-compatible server),
//! `generate` (BigQuery's AI.GENERATE family over a table), `classify` and
//! `score` (AI.CLASSIFY / AI.SCORE, offline on CLIP or on a generator). Every flag
//! also reads an environment variable, shown in `--help`.

mod backend;
mod batch;
mod bench;
mod embed;
mod generate;
mod index;
mod inputs;
mod job;
mod job_merge;
mod lock;
mod merge;
mod models;
mod output;
mod recipe;
mod rows;
mod search;
mod serve;
mod table;
mod zeroshot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mmembed",
    version,
    about = "Multimodal (text, image, video) embeddings and generation: local CLIP on candle, Vertex AI (embeddings, Gemini), local LLM servers",
    after_help = "Examples:
  mmembed models
  mmembed embed --model demo --text 'a red star' photo.png
  mmembed batch media/ -o media.parquet --model demo
  mmembed search 'a blue square' --in media.parquet
  mmembed index build media.parquet -o media.index && mmembed search 'a blue square' --index media.index
  mmembed serve --model demo
  mmembed classify media/ --labels 'red star,blue square' -o labels.parquet --model demo
  mmembed generate cities.csv -o out.parquet -g gemini:my-proj/global \\
      --prompt 'Capital of {state}?' --output-schema 'capital STRING'

Logs go to stderr; set MMEMBED_LOG (e.g. debug, mmembed_vertex=trace) to see more."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Embed texts, images and videos; one JSON object per input on stdout.
    Embed(embed::Args),
    /// Embed every file of a folder, glob or manifest into a Parquet or
    /// JSONL table: one row per image or video segment, a status per row.
    Batch(batch::Args),
    /// Rank the rows of batch outputs by similarity to a text or image.
    Search(search::Args),
    /// Build an approximate index of batch outputs for large collections.
    Index(index::Args),
    /// List the models: the bundled demo and the built-in ids.
    Models(models::Args),
    /// Compare backends on the same inputs: p50/p95 latency and throughput
    /// per workload, as a table, CSV and SVG.
    Bench(bench::Args),
    /// Serve the backend as Vertex AI's multimodalembedding@001 (REST and
    /// gRPC on one port) with dynamic batching, health and metrics.
    Serve(serve::Args),
    /// BigQuery's AI.GENERATE (and _DOUBLE, _INT, _BOOL) over a table, on
    /// Gemini or a local LLM server: one row per input row with a status.
    Generate(generate::Args),
    /// BigQuery's AI.CLASSIFY: one label per image or video segment, by CLIP
    /// zero-shot (offline) or a generator.
    Classify(zeroshot::ClassifyArgs),
    /// BigQuery's AI.SCORE: how well each image or video segment matches a
    /// text, by CLIP (offline) or a generator.
    Score(zeroshot::ScoreArgs),
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MMEMBED_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    Ok(match cli.cmd {
        Cmd::Embed(a) => {
            let failed = embed::run(a).await?;
            if failed > 0 {
                eprintln!("{failed} inputs failed (see their \"error\")");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Cmd::Batch(a) => {
            let output = a.output.clone();
            let s = batch::run(a).await?;
            eprintln!("rows: {} ok, {} failed -> {output}", s.ok, s.failed);
            if s.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Cmd::Search(a) => {
            let json = a.json;
            search::print(&search::search(a).await?, json)?;
            ExitCode::SUCCESS
        }
        Cmd::Index(a) => {
            index::run(a).await?;
            ExitCode::SUCCESS
        }
        Cmd::Models(a) => {
            models::run(&a)?;
            ExitCode::SUCCESS
        }
        Cmd::Generate(a) => {
            let output = a.job.output.clone();
            rows_summary(generate::run(a).await?, &output)
        }
        Cmd::Classify(a) => {
            let output = a.common.job.output.clone();
            rows_summary(zeroshot::classify(a).await?, &output)
        }
        Cmd::Score(a) => {
            let output = a.common.job.output.clone();
            rows_summary(zeroshot::score(a).await?, &output)
        }
        Cmd::Serve(a) => {
            serve::run(a).await?;
            ExitCode::SUCCESS
        }
        Cmd::Bench(a) => {
            let rows = bench::run(&a).await?;
            bench::print_table(&rows)?;
            if let Some(p) = &a.csv {
                bench::write_csv(p, &rows)?;
            }
            if let Some(p) = &a.svg {
                bench::write_svg(p, &rows)?;
            }
            if rows.iter().any(|r| r.error.is_some()) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    })
}

/// Prints a row job's summary; failure exit status when a row failed.
fn rows_summary(s: job::Summary, output: &str) -> ExitCode {
    eprintln!("rows: {} ok, {} failed -> {output}", s.ok, s.failed);
    if s.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // Every command here runs batches of inference: keep the large blocks
    // each layer frees for the next one (BENCHMARKS.md, issue #8).
    let tuned = mmembed::local::tune_malloc_for_inference();
    tracing::debug!(tuned, "malloc tuned for inference");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
