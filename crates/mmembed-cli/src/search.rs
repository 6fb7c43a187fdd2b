//! `mmembed search`: top-k rows of batch outputs by cosine to a text or an
//! image query, streamed through `mmembed-search` (memory independent of
//! the tables' size).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, ValueEnum};
use mmembed::EmbedRequest;
use mmembed_search::index::{Index, IndexSearch};
use mmembed_search::{Filter, Modality, Options, Summary, Table};
use serde_json::json;

use crate::backend::{BackendArgs, BackendKind};
use crate::rows::Row;

/// Flags of `mmembed search`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed search 'a red star' --in media.parquet
  mmembed search --image query.png --in a.parquet --in b.jsonl -k 5
  mmembed search 'a goal' --in clips.parquet --modality video --where league=premier
The model defaults to the one recorded in the outputs. Tables are streamed, not
loaded: memory stays flat whatever their size (tables in buckets are copied to a
temporary file first).")]
pub struct Args {
    /// The text query.
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    pub query: Option<String>,

    /// An image as the query.
    #[arg(long, short = 'i', env = "MMEMBED_SEARCH_IMAGE")]
    pub image: Option<PathBuf>,

    /// Batch outputs to search (`.parquet`/`.jsonl`, local or in a bucket);
    /// repeatable.
    #[arg(
        long = "in",
        required_unless_present = "index",
        conflicts_with = "index",
        env = "MMEMBED_SEARCH_IN",
        value_delimiter = ','
    )]
    pub inputs: Vec<String>,

    /// Search through an index built by `mmembed index build` (over its
    /// tables) instead of scanning tables.
    #[arg(long, env = "MMEMBED_SEARCH_INDEX")]
    pub index: Option<PathBuf>,

    /// With --index: candidates kept while searching (HNSW's ef); more is
    /// slower and closer to exact.
    #[arg(long, env = "MMEMBED_SEARCH_EF", default_value_t = 512)]
    pub ef: usize,

    /// How many results.
    #[arg(short = 'k', long, env = "MMEMBED_TOP_K", default_value_t = 10)]
    pub top: usize,

    /// Only images or only video segments.
    #[arg(long, env = "MMEMBED_SEARCH_MODALITY")]
    pub modality: Option<ModalityArg>,

    /// Only rows whose uri starts with this.
    #[arg(long, env = "MMEMBED_SEARCH_URI_PREFIX")]
    pub uri_prefix: Option<String>,

    /// Only rows whose (manifest) column has this value, as COLUMN=VALUE;
    /// repeatable, all must hold.
    #[arg(long = "where", env = "MMEMBED_SEARCH_WHERE", value_delimiter = ',', value_parser = parse_equals)]
    pub equals: Vec<(String, String)>,

    /// Threads reading and scoring the tables (default: all cores; at most
    /// 256).
    #[arg(long, env = "MMEMBED_SEARCH_THREADS")]
    pub threads: Option<usize>,

    /// Print JSON lines instead of a table.
    #[arg(long, env = "MMEMBED_JSON")]
    pub json: bool,

    #[command(flatten)]
    pub backend: BackendArgs,
}

/// `--modality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModalityArg {
    /// Images only.
    Image,
    /// Video segments only.
    Video,
}

fn parse_equals(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((c, v)) if !c.trim().is_empty() => Ok((c.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}`: write COLUMN=VALUE")),
    }
}

/// One hit.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Cosine similarity to the query.
    pub score: f32,
    /// The row.
    pub row: Row,
}

/// A row's URI for people: local paths under the working directory
/// relative to it (rows store absolute paths).
fn readable(uri: &str) -> String {
    if let Ok(cwd) = std::env::current_dir()
        && let Ok(rel) = std::path::Path::new(uri).strip_prefix(&cwd)
    {
        return rel.display().to_string();
    }
    uri.to_string()
}

/// The tables as local files: bucket objects are copied to `tmp` first.
async fn local_tables(inputs: &[String], tmp: &tempfile::TempDir) -> anyhow::Result<Vec<Table>> {
    let mut tables = vec![];
    for (i, p) in inputs.iter().enumerate() {
        let table = match crate::output::Location::parse(p) {
            crate::output::Location::Local(path) => Table::new(path),
            remote @ crate::output::Location::Remote(_) => {
                let name = p.rsplit('/').next().unwrap_or_default();
                let local = tmp.path().join(format!("{i}-{name}"));
                // The format is the object's, from its name.
                let t = Table::new(&local)?;
                std::fs::write(&local, remote.read().await?)
                    .with_context(|| format!("copying {p} to {}", local.display()))?;
                Ok(t)
            }
        };
        tables.push(table.with_context(|| format!("searching {p}"))?);
    }
    Ok(tables)
}

/// What a search runs over.
enum Source {
    Tables(Vec<Table>),
    Index(Index),
}

/// Ranks the rows of `args.inputs` (or `args.index`) for the query.
pub async fn search(mut args: Args) -> anyhow::Result<Vec<Hit>> {
    let tmp = tempfile::tempdir()?;
    let (source, summary) = match &args.index {
        Some(dir) => {
            let index = Index::open(dir)?;
            index.check_fresh()?;
            let m = index.manifest();
            let s = Summary {
                space: m.space.clone(),
                model: m.model.clone(),
                dimension: m.dimension,
            };
            (Source::Index(index), Some(s))
        }
        None => {
            let tables = local_tables(&args.inputs, &tmp).await?;
            let s = mmembed_search::summarize(&tables)?;
            (Source::Tables(tables), s)
        }
    };
    let Some(Summary {
        space,
        model,
        dimension,
    }) = summary
    else {
        bail!("the outputs hold no embedded rows");
    };
    if args.backend.model.is_none()
        && args.backend.backend == BackendKind::Local
        && space.starts_with("vertex:")
    {
        bail!(
            "these outputs were embedded by Vertex AI ({space}): search them with --backend vertex \
             (and --project)"
        );
    }
    if args.backend.model.is_none() && args.backend.backend == BackendKind::Local {
        args.backend.model = Some(model);
    }
    let embedder = args.backend.build().await?;
    let info = embedder.info();
    if info.space.as_str() != space {
        bail!(
            "the query model `{}` embeds into space {}, the outputs are in {space}; pass the \
             outputs' model with --model",
            info.model_id,
            info.space
        );
    }
    let mut req = match (&args.query, &args.image) {
        (Some(q), None) => EmbedRequest::text(q.as_str()),
        (None, Some(p)) => EmbedRequest::image(p.clone()),
        _ => bail!("give either a text query or --image"),
    };
    if dimension != info.native_dimension {
        req = req.with_dimension(dimension as u32);
    }
    let e = embedder.embed(req).await.context("embedding the query")?;
    let q = e
        .text
        .or(e.image)
        .context("the backend returned no vector for the query")?;
    let filter = Filter {
        modality: args.modality.map(|m| match m {
            ModalityArg::Image => Modality::Image,
            ModalityArg::Video => Modality::Video,
        }),
        uri_prefix: args.uri_prefix.take(),
        equals: std::mem::take(&mut args.equals),
    };
    let mut opts = Options {
        k: args.top,
        space: Some(space),
        filter,
        ..Options::default()
    };
    if let Some(t) = args.threads {
        opts.threads = t;
    }
    let ef = args.ef;
    let found = tokio::task::spawn_blocking(move || match source {
        Source::Tables(tables) => mmembed_search::search(&tables, &q, &opts),
        Source::Index(index) => index.search(
            &q,
            &IndexSearch {
                k: opts.k,
                filter: opts.filter,
                expansion: ef,
            },
        ),
    })
    .await
    .context("the search thread failed")??;
    tracing::info!(
        scanned = found.scanned,
        matched = found.matched,
        hits = found.hits.len(),
        "searched"
    );
    Ok(found
        .hits
        .into_iter()
        .map(|h| Hit {
            score: h.score,
            row: h.row,
        })
        .collect())
}

fn when(r: &Row) -> Option<String> {
    Some(format!(
        "{:.1}-{:.1} s",
        r.video_start_sec?, r.video_end_sec?
    ))
}

/// Prints the hits.
pub fn print(hits: &[Hit], as_json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (i, h) in hits.iter().enumerate() {
        if as_json {
            let mut o = json!({
                "rank": i + 1,
                "score": h.score,
                "uri": h.row.uri,
                "video_start_sec": h.row.video_start_sec,
                "video_end_sec": h.row.video_end_sec,
            });
            for (k, v) in &h.row.carried {
                o[k] = v.clone();
            }
            writeln!(out, "{o}")?;
        } else {
            let at = when(&h.row).map(|w| format!("  [{w}]")).unwrap_or_default();
            writeln!(
                out,
                "{:>3}  {:.4}  {}{at}",
                i + 1,
                h.score,
                readable(&h.row.uri)
            )?;
        }
    }
    Ok(())
}
