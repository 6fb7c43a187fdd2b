//! `mmembed classify` and `mmembed score`: counterparts of BigQuery's
//! `AI.CLASSIFY` and `AI.SCORE` over images and video segments. Offline on
//! a CLIP model (zero-shot: labels or the text embedded, compared with each
//! image or segment by cosine), or on a generator (Gemini, a local LLM
//! server) with an enum or number schema — the same row shapes, so one table
//! can be answered both ways and compared.

use std::sync::Arc;

use anyhow::{Context, bail};
use arrow_schema::{DataType, Field};
use clap::Args as ClapArgs;
use mmembed::generate::{GenerateRequest, Generator, Part, status_of};
use mmembed::schema::{Field as SchemaField, FieldType, OutputSchema};
use mmembed::{EmbedRequest, Embedder, Embeddings, Modality, cosine};
use serde_json::{Value, json};

use crate::backend::{BackendArgs, SegmentArgs};
use crate::generate::{GeneratorArgs, JobArgs, media_of, output_schema};
use crate::inputs;
use crate::job::{self, Summary};
use crate::recipe::Recipe;
use crate::table::{self, Row};

/// CLIP's logit scale (its learned temperature, clamped at 100 in
/// training): softmax over 100·cosine gives CLIP's zero-shot probabilities.
const LOGIT_SCALE: f32 = 100.0;

/// What the answer is made of.
#[derive(Debug, Clone, ClapArgs)]
pub struct Common {
    /// The media: a folder, glob, bucket prefix or a manifest with a `uri`
    /// (or `path`) column.
    #[arg(env = "MMEMBED_INPUT")]
    pub input: String,

    /// Answer with a generator instead of the local embedding model
    /// (`gemini:…`, `openai:URL?model=…`, `ollama?model=…`; see `generate`).
    #[arg(long, short = 'g', env = "MMEMBED_GENERATOR")]
    pub generator: Option<String>,

    #[command(flatten)]
    pub segments: SegmentArgs,

    #[command(flatten)]
    pub backend: BackendArgs,

    #[command(flatten)]
    pub job: JobArgs,
}

/// Flags of `mmembed classify`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed classify photos/ --labels cat,dog,bird -o labels.parquet --model demo
  mmembed classify photos/ --labels cat,dog,bird -o gemini.parquet -g gemini:my-proj/global")]
pub struct ClassifyArgs {
    /// The labels, comma-separated (at least two).
    #[arg(long, env = "MMEMBED_LABELS", value_delimiter = ',', required = true)]
    pub labels: Vec<String>,

    /// CLIP: the text each label is embedded as; `{}` is the label.
    #[arg(
        long,
        env = "MMEMBED_LABEL_TEMPLATE",
        default_value = "a photo of a {}"
    )]
    pub label_template: String,

    #[command(flatten)]
    pub common: Common,
}

/// Flags of `mmembed score`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed score photos/ --text 'a red star' -o scores.parquet --model demo
  mmembed score photos/ --text 'a red star' -o gemini.parquet -g gemini:my-proj/global")]
pub struct ScoreArgs {
    /// What each image or segment is scored against.
    #[arg(long, env = "MMEMBED_SCORE_TEXT")]
    pub text: String,

    #[command(flatten)]
    pub common: Common,
}

enum Task {
    Classify {
        labels: Vec<String>,
        template: String,
    },
    Score {
        text: String,
    },
}

impl Task {
    fn result_type(&self) -> DataType {
        match self {
            Task::Classify { .. } => DataType::Utf8,
            Task::Score { .. } => DataType::Float64,
        }
    }

    /// The texts CLIP embeds.
    fn texts(&self) -> Vec<String> {
        match self {
            Task::Classify { labels, template } => {
                labels.iter().map(|l| template.replace("{}", l)).collect()
            }
            Task::Score { text } => vec![text.clone()],
        }
    }

    /// A CLIP answer for one vector: the result and its `full_response`.
    fn answer(&self, v: &[f32], texts: &[Vec<f32>]) -> (Value, String) {
        let cos: Vec<f32> = texts.iter().map(|t| cosine(v, t)).collect();
        match self {
            Task::Classify { labels, .. } => {
                let m = cos.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = cos.iter().map(|c| ((c - m) * LOGIT_SCALE).exp()).collect();
                let sum: f32 = e.iter().sum();
                let best = (0..labels.len())
                    .max_by(|&a, &b| cos[a].total_cmp(&cos[b]))
                    .unwrap_or(0);
                let probs: serde_json::Map<String, Value> = labels
                    .iter()
                    .zip(&e)
                    .map(|(l, x)| (l.clone(), json!(x / sum)))
                    .collect();
                let cosines: serde_json::Map<String, Value> = labels
                    .iter()
                    .zip(&cos)
                    .map(|(l, c)| (l.clone(), json!(c)))
                    .collect();
                (
                    labels[best].clone().into(),
                    json!({"probabilities": probs, "cosine": cosines}).to_string(),
                )
            }
            Task::Score { .. } => (json!(cos[0]), json!({"cosine": cos[0]}).to_string()),
        }
    }

    /// The generator request and schema for one media item.
    fn request(&self, kind: &str, media: mmembed::Media) -> GenerateRequest {
        let (text, schema) = match self {
            Task::Classify { labels, .. } => {
                let mut f = SchemaField::new("result", FieldType::String);
                f.allowed = labels.clone();
                (
                    format!(
                        "Classify this {kind} into exactly one of these labels: {}. Answer with the label.",
                        labels.join(", ")
                    ),
                    OutputSchema { fields: vec![f] },
                )
            }
            Task::Score { text } => (
                format!(
                    "On a scale from 0 (not at all) to 1 (perfectly), how well does this {kind} \
                     match the description \"{text}\"? Answer with the number."
                ),
                OutputSchema::result(FieldType::Float64),
            ),
        };
        GenerateRequest {
            parts: vec![Part::Text(text), Part::Media(media)],
            output_schema: Some(schema),
            model_params: Default::default(),
        }
    }
}

/// Runs `mmembed classify`.
pub async fn classify(a: ClassifyArgs) -> anyhow::Result<Summary> {
    let labels: Vec<String> = a
        .labels
        .iter()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if labels.len() < 2 {
        bail!("--labels needs at least two labels, comma-separated");
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = labels.iter().find(|l| !seen.insert(*l)) {
        bail!("--labels names `{d}` twice");
    }
    run(
        Task::Classify {
            labels,
            template: a.label_template,
        },
        a.common,
    )
    .await
}

/// Runs `mmembed score`.
pub async fn score(a: ScoreArgs) -> anyhow::Result<Summary> {
    if a.text.trim().is_empty() {
        bail!("--text is empty");
    }
    run(Task::Score { text: a.text }, a.common).await
}

fn kind_of(row: &Row) -> Option<Modality> {
    let ct = row
        .get("content_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = row.get("uri").and_then(Value::as_str).unwrap_or("");
    let ct = if ct.is_empty() || ct == "application/octet-stream" {
        crate::inputs::content_type(name).map_or("", |c| c.0)
    } else {
        ct
    };
    if ct.starts_with("image/") {
        Some(Modality::Image)
    } else if ct.starts_with("video/") {
        Some(Modality::Video)
    } else {
        None
    }
}

/// The image or video a row names, or why it names none.
fn media(base: Option<&inputs::Base>, row: &Row) -> Result<(mmembed::Media, Modality), String> {
    let m = media_of(base, row, "uri")?;
    // Else the type `media_of` found in a local file's first bytes.
    let sniffed = || match m.mime_type.as_deref()?.split('/').next()? {
        "image" => Some(Modality::Image),
        "video" => Some(Modality::Video),
        _ => None,
    };
    match kind_of(row).or_else(sniffed) {
        Some(kind @ (Modality::Image | Modality::Video)) => Ok((m, kind)),
        _ => {
            Err("not an image or video (by its content type, extension or first bytes)".to_string())
        }
    }
}

fn out_row(
    input: &Row,
    start: Option<f64>,
    end: Option<f64>,
    result: Value,
    model: &str,
    full: Value,
    status: String,
) -> Row {
    let mut r = input.clone();
    r.insert("video_start_sec".into(), start.into());
    r.insert("video_end_sec".into(), end.into());
    r.insert("result".into(), result);
    r.insert("model".into(), model.into());
    r.insert("full_response".into(), full);
    r.insert("status".into(), status.into());
    r
}

async fn run(task: Task, c: Common) -> anyhow::Result<Summary> {
    let mut input = table::read_input(&c.input).await?;
    if input.schema.field_with_name("uri").is_err() {
        // A manifest naming files by `path` or `url`: the same column under
        // the object table's name.
        let Some(name) = inputs::NAME_COLUMNS
            .into_iter()
            .find(|n| input.schema.field_with_name(n).is_ok())
        else {
            bail!(
                "{}: the input has no `uri`, `path` or `url` column naming the media",
                c.input
            );
        };
        input.rename(name, "uri")?;
    }
    let out_schema = output_schema(
        &input,
        vec![
            Field::new("video_start_sec", DataType::Float64, true),
            Field::new("video_end_sec", DataType::Float64, true),
            Field::new("result", task.result_type(), true),
            Field::new("model", DataType::Utf8, true),
        ],
    )?;
    // What the results depend on beyond the input row: the texts compared
    // (labels in their template, or the text scored), and the model.
    let asked = match &task {
        Task::Classify { .. } => ("labels", Value::from(task.texts()).to_string()),
        Task::Score { text } => ("text", text.clone()),
    };
    let with_task = |r: Recipe| r.with(asked.0, &asked.1);
    let video = input.any_text("uri", inputs::is_video);
    let mut opts = c.job.options();
    let task = Arc::new(task);
    let shared = Arc::new(input.base.clone());
    match &c.generator {
        Some(spec) => {
            // Concurrency and pacing of a generator go in its spec here
            // (the backend flags are the embedding model's).
            let g = GeneratorArgs {
                generator: spec.clone(),
                concurrency: None,
                rpm: None,
                max_attempts: None,
                timeout_secs: None,
            }
            .build()
            .await?;
            opts.recipe = with_task(Recipe::default()).with("generator", g.info().model_id.clone());
            job::run(input, out_schema, &opts, |rows| {
                on_generator(task.clone(), shared.clone(), g.clone(), rows)
            })
            .await
        }
        None => {
            let segments = c.segments.config()?;
            let e = c.backend.build().await?;
            let texts = e
                .embed_batch(task.texts().into_iter().map(EmbedRequest::text).collect())
                .await
                .into_iter()
                .map(|r| r.map(|x| x.text.unwrap_or_default()))
                .collect::<Result<Vec<_>, _>>()
                .context("embedding the labels / text")?;
            let texts = Arc::new(texts);
            opts.recipe = with_task(c.backend.recipe(video.then_some(&c.segments)))
                .with("model", e.info().model_id.clone());
            job::run(input, out_schema, &opts, |rows| {
                on_embedder(
                    task.clone(),
                    shared.clone(),
                    e.clone(),
                    texts.clone(),
                    segments,
                    rows,
                )
            })
            .await
        }
    }
}

async fn on_embedder(
    task: Arc<Task>,
    base: Arc<Option<inputs::Base>>,
    e: Arc<dyn Embedder>,
    texts: Arc<Vec<Vec<f32>>>,
    segments: Option<mmembed::VideoSegmentConfig>,
    rows: Vec<Row>,
) -> Vec<Vec<Row>> {
    let model = e.info().model_id.clone();
    let (reqs, slots) = job::plan(&rows, |r| {
        media(base.as_ref().as_ref(), r).map(|(m, kind)| match kind {
            Modality::Video => EmbedRequest::video(m, segments),
            _ => EmbedRequest::image(m),
        })
    });
    let answers: Vec<Result<Embeddings, mmembed::EmbedError>> = e.embed_batch(reqs).await;
    rows.iter()
        .zip(slots)
        .map(|(row, slot)| {
            let fail = |s: String| {
                vec![out_row(
                    row,
                    None,
                    None,
                    Value::Null,
                    &model,
                    Value::Null,
                    s,
                )]
            };
            let Ok(i) = slot else {
                return fail(slot.unwrap_err());
            };
            match answers.get(i) {
                None => fail("the backend returned fewer answers than requests".into()),
                Some(Err(err)) => fail(status_of(err)),
                Some(Ok(emb)) => {
                    if let Some(v) = &emb.image {
                        let (res, full) = task.answer(v, &texts);
                        return vec![out_row(
                            row,
                            None,
                            None,
                            res,
                            &emb.model,
                            full.into(),
                            String::new(),
                        )];
                    }
                    if emb.video.is_empty() {
                        return fail("the backend returned no vector".into());
                    }
                    emb.video
                        .iter()
                        .map(|s| match &s.error {
                            Some(err) => out_row(
                                row,
                                Some(s.start_sec),
                                Some(s.end_sec),
                                Value::Null,
                                &emb.model,
                                Value::Null,
                                err.clone(),
                            ),
                            None => {
                                let (res, full) = task.answer(&s.embedding, &texts);
                                out_row(
                                    row,
                                    Some(s.start_sec),
                                    Some(s.end_sec),
                                    res,
                                    &emb.model,
                                    full.into(),
                                    String::new(),
                                )
                            }
                        })
                        .collect()
                }
            }
        })
        .collect()
}

async fn on_generator(
    task: Arc<Task>,
    base: Arc<Option<inputs::Base>>,
    g: Arc<dyn Generator>,
    rows: Vec<Row>,
) -> Vec<Vec<Row>> {
    let model = g.info().model_id.clone();
    let (reqs, slots) = job::plan(&rows, |r| {
        media(base.as_ref().as_ref(), r).map(|(m, kind)| task.request(&kind.to_string(), m))
    });
    let answers = g.generate_batch(reqs).await;
    rows.iter()
        .zip(slots)
        .map(|(row, slot)| {
            let r = match slot {
                Err(s) => out_row(row, None, None, Value::Null, &model, Value::Null, s),
                Ok(i) => match answers.get(i) {
                    None => out_row(
                        row,
                        None,
                        None,
                        Value::Null,
                        &model,
                        Value::Null,
                        "the backend returned fewer answers than requests".into(),
                    ),
                    Some(Err(err)) => out_row(
                        row,
                        None,
                        None,
                        Value::Null,
                        &model,
                        Value::Null,
                        status_of(err),
                    ),
                    Some(Ok(a)) => out_row(
                        row,
                        None,
                        None,
                        a.result().unwrap_or(Value::Null),
                        &a.model,
                        a.full_response.clone().into(),
                        a.status.clone(),
                    ),
                },
            };
            vec![r]
        })
        .collect()
}
