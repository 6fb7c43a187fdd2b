//! `mmembed index build`: an approximate nearest-neighbour index (HNSW,
//! `mmembed_search::index`) over batch outputs, for `mmembed search --index`.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use mmembed_search::Table;
use mmembed_search::index::{BuildOptions, Outcome, Quantization, build};

/// Flags of `mmembed index`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: IndexCmd,
}

/// What `mmembed index` does.
#[derive(Debug, Subcommand)]
pub enum IndexCmd {
    /// Build an index of batch outputs in a folder, or bring one up to date
    /// (new tables are added; a changed or dropped table rebuilds it).
    Build(BuildArgs),
}

/// Flags of `mmembed index build`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed index build media.parquet -o media.index
  mmembed index build media.parquet more.parquet -o media.index   # adds more.parquet
  mmembed search 'a red star' --index media.index
Scores are exact cosines (hits are rescored from their tables); the index only
chooses the candidates. Tables of another embedding space are refused.")]
pub struct BuildArgs {
    /// Batch outputs to index (`.parquet`/`.jsonl`, local files).
    #[arg(required = true)]
    pub tables: Vec<PathBuf>,

    /// The index folder (`vectors.usearch` and `manifest.json`).
    #[arg(short = 'o', long, env = "MMEMBED_INDEX")]
    pub output: PathBuf,

    /// How vectors are stored in the index: f16 halves f32's memory at no
    /// measurable recall cost for unit vectors; i8 quarters it.
    #[arg(long, env = "MMEMBED_INDEX_QUANTIZATION", default_value = "f16")]
    pub quantization: QuantizationArg,

    /// Graph edges per vector (HNSW's M).
    #[arg(long, env = "MMEMBED_INDEX_CONNECTIVITY", default_value_t = 16)]
    pub connectivity: usize,

    /// Candidates kept while inserting (HNSW's efConstruction).
    #[arg(long, env = "MMEMBED_INDEX_EXPANSION_ADD", default_value_t = 128)]
    pub expansion_add: usize,

    /// Inserting threads (default: all cores; at most 256).
    #[arg(long, env = "MMEMBED_INDEX_THREADS")]
    pub threads: Option<usize>,
}

/// `--quantization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizationArg {
    /// 4 bytes a value.
    F32,
    /// 2 bytes a value.
    F16,
    /// 2 bytes a value, fewer significant bits.
    Bf16,
    /// 1 byte a value.
    I8,
}

/// Runs `mmembed index …`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        IndexCmd::Build(a) => {
            let tables = a
                .tables
                .iter()
                .map(Table::new)
                .collect::<Result<Vec<_>, _>>()?;
            let mut opts = BuildOptions {
                quantization: match a.quantization {
                    QuantizationArg::F32 => Quantization::F32,
                    QuantizationArg::F16 => Quantization::F16,
                    QuantizationArg::Bf16 => Quantization::Bf16,
                    QuantizationArg::I8 => Quantization::I8,
                },
                connectivity: a.connectivity,
                expansion_add: a.expansion_add,
                ..BuildOptions::default()
            };
            if let Some(t) = a.threads {
                opts.threads = t;
            }
            let dir = a.output.clone();
            let r = tokio::task::spawn_blocking(move || build(&tables, &dir, &opts)).await??;
            let what = match &r.outcome {
                Outcome::Built { reason: None } => "built".to_string(),
                Outcome::Built { reason: Some(w) } => format!("rebuilt ({w})"),
                Outcome::Extended { tables } => format!("extended with {tables} tables"),
                Outcome::Unchanged => "up to date".to_string(),
            };
            eprintln!(
                "index {what}: {} vectors added, {} in all, {:.1} s -> {}",
                r.added,
                r.vectors,
                r.seconds,
                a.output.display()
            );
            Ok(())
        }
    }
}
