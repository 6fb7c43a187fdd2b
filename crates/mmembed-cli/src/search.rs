//! `mmembed search`: top-k rows of batch outputs by cosine to a text or an
//! image query.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use mmembed::{EmbedRequest, cosine};
use serde_json::json;

use crate::backend::{BackendArgs, BackendKind};
use crate::rows::{self, Format, Row};

/// Flags of `mmembed search`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed search 'a red star' --in media.parquet
  mmembed search --image query.png --in a.parquet --in b.jsonl -k 5
The model defaults to the one recorded in the outputs.")]
pub struct Args {
    /// The text query.
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    pub query: Option<String>,

    /// An image as the query.
    #[arg(long, short = 'i', env = "MMEMBED_SEARCH_IMAGE")]
    pub image: Option<PathBuf>,

    /// Batch outputs to search (`.parquet`/`.jsonl`); repeatable.
    #[arg(
        long = "in",
        required = true,
        env = "MMEMBED_SEARCH_IN",
        value_delimiter = ','
    )]
    pub inputs: Vec<String>,

    /// How many results.
    #[arg(short = 'k', long, env = "MMEMBED_TOP_K", default_value_t = 10)]
    pub top: usize,

    /// Print JSON lines instead of a table.
    #[arg(long, env = "MMEMBED_JSON")]
    pub json: bool,

    #[command(flatten)]
    pub backend: BackendArgs,
}

/// One hit.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Cosine similarity to the query.
    pub score: f32,
    /// The row.
    pub row: Row,
}

async fn load(inputs: &[String]) -> anyhow::Result<Vec<Row>> {
    let mut all = vec![];
    for p in inputs {
        let f = Format::from_path(std::path::Path::new(p))
            .with_context(|| format!("{p}: name a .parquet or .jsonl batch output"))?;
        let loc = crate::output::Location::parse(p);
        all.extend(
            rows::decode(loc.read().await?, f, p)?
                .into_iter()
                .filter(|r| r.ok() && r.embedding.is_some()),
        );
    }
    Ok(all)
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

/// Ranks the rows of `args.inputs` for the query.
pub async fn search(mut args: Args) -> anyhow::Result<Vec<Hit>> {
    let rows = load(&args.inputs).await?;
    if rows.is_empty() {
        bail!("the outputs hold no embedded rows");
    }
    let spaces: BTreeSet<&str> = rows.iter().map(|r| r.space.as_str()).collect();
    if spaces.len() > 1 {
        bail!(
            "the outputs mix embedding spaces ({}); vectors of different spaces are not comparable, \
             search them separately",
            spaces.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let space = rows[0].space.clone();
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
        let models: BTreeSet<&str> = rows.iter().map(|r| r.model.as_str()).collect();
        if models.len() == 1 {
            args.backend.model = Some(rows[0].model.clone());
        }
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
    let dims: BTreeSet<usize> = rows
        .iter()
        .filter_map(|r| r.embedding.as_ref().map(Vec::len))
        .collect();
    let mut req = match (&args.query, &args.image) {
        (Some(q), None) => EmbedRequest::text(q.as_str()),
        (None, Some(p)) => EmbedRequest::image(p.clone()),
        _ => bail!("give either a text query or --image"),
    };
    if let [d] = dims.iter().copied().collect::<Vec<_>>()[..]
        && d != info.native_dimension
    {
        req = req.with_dimension(d as u32);
    } else if dims.len() > 1 {
        bail!("the outputs mix vector lengths {dims:?}");
    }
    let e = embedder.embed(req).await.context("embedding the query")?;
    let q = e
        .text
        .or(e.image)
        .context("the backend returned no vector for the query")?;
    let mut hits: Vec<Hit> = rows
        .into_iter()
        .filter_map(|row| {
            let v = row.embedding.as_ref()?;
            Some(Hit {
                score: cosine(&q, v),
                row,
            })
        })
        .collect();
    hits.sort_by(|a, b| b.score.total_cmp(&a.score));
    hits.truncate(args.top);
    Ok(hits)
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
