//! `mmembed generate`: BigQuery's `AI.GENERATE` (and `AI.GENERATE_DOUBLE`,
//! `_INT`, `_BOOL`) over a table, on Gemini or a local LLM server. One
//! output row per input row: the input's columns, the result column(s),
//! `full_response` and `status`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use clap::{Args as ClapArgs, ValueEnum};
use mmembed::generate::{GenerateRequest, Generator, Part, status_of};
use mmembed::schema::{FieldType, OutputSchema};
use mmembed::spec::{GeneratorDefaults, GeneratorSpec};
use mmembed::{Media, MediaSource};
use serde_json::{Map, Value};

use crate::inputs::{self, Shard};
use crate::job::{self, JobOptions, Summary};
use crate::recipe::Recipe;
use crate::rows::Format;
use crate::table::{self, Row, Table};

/// Which generation backend answers: a spec string or a `.toml` file.
#[derive(Debug, Clone, ClapArgs)]
#[command(next_help_heading = "Generator")]
pub struct GeneratorArgs {
    /// Generation backend: `gemini[:PROJECT[/LOCATION]][?model=…]`,
    /// `openai:URL?model=…` (vLLM, llama.cpp server), `ollama[:URL]?model=…`,
    /// `fallback(A, B)`, `hedged(A, B)?delay_ms=…`, or a `.toml` file with the
    /// same. Concurrency and pacing go in the spec (`?concurrency=8&rpm=60`);
    /// an API key for local servers in MMEMBED_LLM_API_KEY.
    #[arg(long, short = 'g', env = "MMEMBED_GENERATOR")]
    pub generator: String,

    /// Requests in flight, for every backend of the spec that sets none
    /// (default: Gemini 8, local servers 4).
    #[arg(long, env = "MMEMBED_GENERATE_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: Option<u32>,

    /// Client-side pacing in requests per minute, for every backend that
    /// sets none (default: Gemini 120, local servers 6000).
    #[arg(long, env = "MMEMBED_GENERATE_RPM", value_parser = clap::value_parser!(u32).range(1..))]
    pub rpm: Option<u32>,

    /// Attempts per request (retries of 429/5xx/network faults; default 5).
    #[arg(long, env = "MMEMBED_GENERATE_MAX_ATTEMPTS", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: Option<u32>,

    /// Per-request timeout in seconds (default: Gemini 60, local servers 300).
    #[arg(long, env = "MMEMBED_GENERATE_TIMEOUT_SECS")]
    pub timeout_secs: Option<f64>,
}

impl GeneratorArgs {
    /// Builds the generator.
    pub async fn build(&self) -> anyhow::Result<Arc<dyn Generator>> {
        let mut spec = if self.generator.trim().ends_with(".toml") {
            let text = std::fs::read_to_string(self.generator.trim())
                .with_context(|| format!("reading generator config {}", self.generator))?;
            GeneratorSpec::from_toml(&text)?
        } else {
            self.generator.parse::<GeneratorSpec>()?
        };
        spec.fill(&GeneratorDefaults {
            concurrency: self.concurrency.map(|n| n as usize),
            rpm: self.rpm,
            max_attempts: self.max_attempts,
            timeout_secs: self.timeout_secs,
        });
        spec.build()
            .await
            .context("building the generator from its spec")
    }
}

/// `--returns`: the `AI.GENERATE_*` variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Returns {
    /// `AI.GENERATE`: free text in `result`.
    String,
    /// `AI.GENERATE_DOUBLE`: a FLOAT64 `result`.
    Double,
    /// `AI.GENERATE_INT`: an INT64 `result`.
    Int,
    /// `AI.GENERATE_BOOL`: a BOOL `result`.
    Bool,
}

/// Flags shared by the row jobs (`generate`, `classify`, `score`).
#[derive(Debug, Clone, ClapArgs)]
#[command(next_help_heading = "Job")]
pub struct JobArgs {
    /// Output file or bucket object; `.parquet` or `.jsonl` chooses the format.
    #[arg(short, long, env = "MMEMBED_OUTPUT")]
    pub output: String,

    /// Output format, when the extension does not say.
    #[arg(long, env = "MMEMBED_FORMAT", value_enum)]
    pub format: Option<Format>,

    /// Continue an earlier run: keep the rows done (or failed for a reason a
    /// rerun would repeat), run the missing ones and those whose status
    /// starts with `A retryable error occurred:`. A Parquet output records
    /// the prompt (labels, text) and model; resuming with others is refused.
    #[arg(long, env = "MMEMBED_RESUME", conflicts_with = "overwrite")]
    pub resume: bool,

    /// Replace an existing output instead of refusing.
    #[arg(long, env = "MMEMBED_OVERWRITE")]
    pub overwrite: bool,

    /// Take only slice i of n (`0/4` .. `3/4`), by a hash of each row; `auto`
    /// reads i and n from an array job (see `mmembed batch --help`).
    #[arg(long, env = "MMEMBED_SHARD")]
    pub shard: Option<Shard>,

    /// Input rows per part written.
    #[arg(long, env = "MMEMBED_CHUNK_ROWS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub chunk_rows: u32,

    /// Chunks of --chunk-rows asked at once, their parts written in order
    /// (a killed job loses at most these). Requests in flight are still
    /// bounded by the backend's concurrency; this keeps its slots busy
    /// while a chunk's slowest answer is awaited.
    #[arg(long, env = "MMEMBED_CHUNKS_IN_FLIGHT", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub chunks_in_flight: u32,

    /// How long a bucket output's lock stays valid without renewal (s).
    #[arg(long, env = "MMEMBED_LOCK_TTL_SECS", default_value_t = 120)]
    pub lock_ttl_secs: u64,
}

impl JobArgs {
    /// The runner's options.
    pub fn options(&self) -> JobOptions {
        JobOptions {
            output: self.output.clone(),
            format: self.format,
            resume: self.resume,
            overwrite: self.overwrite,
            shard: self.shard,
            chunk_rows: self.chunk_rows as usize,
            in_flight: self.chunks_in_flight as usize,
            lock_ttl: Duration::from_secs(self.lock_ttl_secs.max(3)),
            recipe: Recipe::default(),
        }
    }
}

/// Flags of `mmembed generate`.
#[derive(Debug, ClapArgs)]
#[command(
    after_help = "The prompt is a template: {column} inserts a column's value as text, {@column}
the image or video that column names (a path, relative to the manifest, or a
gs://, s3://, az://, http(s):// URI); {{ and }} are literal braces.

Examples:
  mmembed generate cities.csv -o out.parquet -g gemini:my-proj/global \\
      --prompt 'What is the capital of {state}?' --output-schema 'capital STRING'
  mmembed generate photos/ -o captions.jsonl -g 'ollama?model=gemma3' \\
      --prompt 'Describe {@uri} in ten words'
  mmembed generate items.jsonl -o prices.parquet --returns double \\
      -g 'openai:http://127.0.0.1:8000?model=Qwen/Qwen2.5-VL-3B-Instruct' \\
      --prompt 'Price in USD of {name}?' --model-params '{\"temperature\": 0}'"
)]
pub struct Args {
    /// The table: `.csv`, `.jsonl`, `.parquet` (here or in a bucket), or an
    /// object table (a folder, glob, media file or bucket prefix: columns
    /// `uri`, `content_type`, `size_bytes`, `generation`, `etag`,
    /// `updated`).
    #[arg(env = "MMEMBED_INPUT")]
    pub input: String,

    /// The prompt template (see below).
    #[arg(long, short = 'p', env = "MMEMBED_PROMPT")]
    pub prompt: String,

    /// Output columns in BigQuery's syntax (`name TYPE, …`; STRING, INT64,
    /// FLOAT64, BOOL, ARRAY<T>, STRUCT<…>, OPTIONS(description='…')); they
    /// replace `result`.
    #[arg(long, env = "MMEMBED_OUTPUT_SCHEMA", conflicts_with = "returns")]
    pub output_schema: Option<String>,

    /// The type of `result`: `string` (AI.GENERATE, free text), `double`,
    /// `int`, `bool` (AI.GENERATE_DOUBLE, _INT, _BOOL).
    #[arg(long, env = "MMEMBED_RETURNS", value_enum, default_value = "string")]
    pub returns: Returns,

    /// Extra request fields as JSON, merged into every request field by
    /// field (Gemini: snake_case or camelCase, e.g. `{"generation_config":
    /// {"temperature": 0}}`; OpenAI/Ollama: their own fields). `@FILE`
    /// reads them from a file.
    #[arg(long, env = "MMEMBED_MODEL_PARAMS")]
    pub model_params: Option<String>,

    #[command(flatten)]
    pub generator: GeneratorArgs,

    #[command(flatten)]
    pub job: JobArgs,
}

/// One piece of a prompt template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal text.
    Text(String),
    /// A column's value as text.
    Column(String),
    /// The media a column names.
    Media(String),
}

/// Parses a prompt template.
pub fn parse_template(t: &str) -> anyhow::Result<Vec<Segment>> {
    let mut out = vec![];
    let mut text = String::new();
    let mut chars = t.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|x| x.1) == Some('{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek().map(|x| x.1) == Some('}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for (_, c) in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    bail!("prompt: `{{` at character {i} is not closed (write `{{{{` for a brace)");
                }
                if !text.is_empty() {
                    out.push(Segment::Text(std::mem::take(&mut text)));
                }
                let name = name.trim();
                match name.strip_prefix('@') {
                    Some(m) if !m.trim().is_empty() => out.push(Segment::Media(m.trim().into())),
                    None if !name.is_empty() => out.push(Segment::Column(name.into())),
                    _ => bail!("prompt: empty `{{}}` at character {i}: name a column"),
                }
            }
            '}' => bail!("prompt: `}}` at character {i} has no `{{` (write `}}}}` for a brace)"),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        out.push(Segment::Text(text));
    }
    if out.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(out)
}

/// A column value as prompt text: strings as they are, NULL as nothing,
/// the rest as JSON.
fn as_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// The media a value names, or why it names none; relative names are
/// taken from `base` (a table's folder or bucket prefix).
pub fn media_of(base: Option<&inputs::Base>, row: &Row, column: &str) -> Result<Media, String> {
    let name = match row.get(column) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => return Err(format!("column `{column}` names no media in this row")),
    };
    // An object table's own content type wins; else the extension's.
    let mime_type = (column == "uri")
        .then(|| row.get("content_type").and_then(Value::as_str))
        .flatten()
        .filter(|t| !mmembed::core::is_generic_type(t))
        .map(String::from)
        .or_else(|| inputs::content_type(&name).map(|c| c.0.to_string()));
    // Relative names are taken from the table's folder or bucket prefix;
    // an object table's names are whole already.
    let here = inputs::Base::Dir(std::path::PathBuf::new());
    let source = match base.unwrap_or(&here).locate(&name) {
        inputs::Located::File(p) => MediaSource::Path(p),
        inputs::Located::Object(uri) => MediaSource::Uri(uri),
    };
    // A local file named without an extension: its first bytes (as
    // `mmembed batch` types it). Objects in buckets are not read here.
    let mime_type = match (&source, mime_type) {
        (MediaSource::Path(p), None) if mmembed_rows::worth_sniffing(&name, None) => {
            mmembed_rows::sniff_file(p)
                .ok()
                .flatten()
                .map(|t| t.0.to_string())
        }
        (_, m) => m,
    };
    Ok(Media { source, mime_type })
}

/// The request for one row, or why there is none.
fn request(
    base: Option<&inputs::Base>,
    template: &[Segment],
    row: &Row,
    schema: Option<&OutputSchema>,
    params: &Map<String, Value>,
) -> Result<GenerateRequest, String> {
    let mut parts: Vec<Part> = vec![];
    for s in template {
        match s {
            Segment::Text(t) => parts.push(Part::Text(t.clone())),
            Segment::Column(c) => parts.push(Part::Text(as_text(row.get(c)))),
            Segment::Media(c) => parts.push(Part::Media(media_of(base, row, c)?)),
        }
    }
    // Adjacent text pieces are one part, as BigQuery's concatenation reads.
    let mut merged: Vec<Part> = vec![];
    for p in parts {
        match (merged.last_mut(), p) {
            (Some(Part::Text(a)), Part::Text(b)) => a.push_str(&b),
            (_, p) => merged.push(p),
        }
    }
    Ok(GenerateRequest {
        parts: merged,
        output_schema: schema.cloned(),
        model_params: params.clone(),
    })
}

/// The output schema: the input's columns, `extra`, `full_response`,
/// `status`; an error naming any input column that collides.
pub fn output_schema(input: &Table, extra: Vec<Field>) -> anyhow::Result<SchemaRef> {
    let mut fields: Vec<Field> = input
        .schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut tail = extra;
    tail.push(Field::new("full_response", DataType::Utf8, true));
    tail.push(Field::new("status", DataType::Utf8, true));
    for f in &tail {
        if input.schema.field_with_name(f.name()).is_ok() {
            bail!(
                "the input has a column `{}`, which the output makes too: rename it",
                f.name()
            );
        }
    }
    fields.extend(tail);
    Ok(Arc::new(Schema::new(fields)))
}

fn parse_params(p: Option<&str>) -> anyhow::Result<Map<String, Value>> {
    let Some(p) = p else {
        return Ok(Map::new());
    };
    let text = match p.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?,
        None => p.to_string(),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => bail!("--model-params must be a JSON object"),
        Err(e) => bail!("--model-params is not JSON: {e}"),
    }
}

/// The result columns of a generation's answer.
pub fn result_row(
    g: &Result<mmembed::Generation, mmembed::EmbedError>,
    schema: Option<&OutputSchema>,
) -> Row {
    let mut r = Row::new();
    let names: Vec<String> = match schema {
        Some(s) => s.fields.iter().map(|f| f.name.clone()).collect(),
        None => vec!["result".into()],
    };
    match g {
        Ok(g) => {
            for n in &names {
                let v = match (&g.fields, schema) {
                    _ if !g.is_ok() => Value::Null,
                    (Some(f), Some(_)) => f.get(n).cloned().unwrap_or(Value::Null),
                    (_, None) => g.text.clone().map_or(Value::Null, Value::String),
                    _ => Value::Null,
                };
                r.insert(n.clone(), v);
            }
            r.insert("full_response".into(), g.full_response.clone().into());
            r.insert("status".into(), g.status.clone().into());
        }
        Err(e) => {
            for n in &names {
                r.insert(n.clone(), Value::Null);
            }
            r.insert("full_response".into(), Value::Null);
            r.insert("status".into(), status_of(e).into());
        }
    }
    r
}

/// Runs `mmembed generate`.
pub async fn run(args: Args) -> anyhow::Result<Summary> {
    let template = parse_template(&args.prompt)?;
    let schema: Option<OutputSchema> = match (&args.output_schema, args.returns) {
        (Some(s), _) => Some(s.parse().context("--output-schema")?),
        (None, Returns::String) => None,
        (None, Returns::Double) => Some(OutputSchema::result(FieldType::Float64)),
        (None, Returns::Int) => Some(OutputSchema::result(FieldType::Int64)),
        (None, Returns::Bool) => Some(OutputSchema::result(FieldType::Bool)),
    };
    let params = parse_params(args.model_params.as_deref())?;
    let input = table::read_input(&args.input).await?;
    for s in &template {
        if let Segment::Column(c) | Segment::Media(c) = s
            && input.schema.field_with_name(c).is_err()
        {
            let have: Vec<&str> = input
                .schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect();
            bail!(
                "the prompt names column `{c}`, which the input lacks (it has: {})",
                have.join(", ")
            );
        }
    }
    let extra = match &schema {
        Some(s) => table::result_fields(s),
        None => vec![Field::new("result", DataType::Utf8, true)],
    };
    let out_schema = output_schema(&input, extra)?;
    let generator = args.generator.build().await?;
    tracing::info!(backend = %generator.info().backend, model = %generator.info().model_id, "generating");
    let opts = JobOptions {
        recipe: Recipe::default()
            .with("prompt", &args.prompt)
            .with(
                "output_schema",
                args.output_schema
                    .clone()
                    .unwrap_or_else(|| format!("{:?}", args.returns).to_lowercase()),
            )
            // Parsed, so that spacing and key order do not count.
            .with("model_params", Value::Object(params.clone()))
            .with("generator", generator.info().model_id.clone()),
        ..args.job.options()
    };
    // Only the base travels with each chunk: a copy of the input per chunk
    // made a job of n rows cost n²/32 row copies.
    let base = Arc::new(input.base.clone());
    job::run(input, out_schema, &opts, |rows: Vec<Row>| {
        let generator = generator.clone();
        let base = base.clone();
        let template = template.clone();
        let schema = schema.clone();
        let params = params.clone();
        async move {
            let (reqs, slots) = job::plan(&rows, |row| {
                request(
                    base.as_ref().as_ref(),
                    &template,
                    row,
                    schema.as_ref(),
                    &params,
                )
            });
            let answers = generator.generate_batch(reqs).await;
            rows.into_iter()
                .zip(slots)
                .map(|(row, slot)| {
                    let mut out = row;
                    let res = match slot {
                        Ok(i) => result_row(
                            answers.get(i).unwrap_or(&Err(mmembed::EmbedError::Backend {
                                backend: "generator".into(),
                                message: "returned fewer answers than requests".into(),
                                retryable: false,
                            })),
                            schema.as_ref(),
                        ),
                        Err(e) => result_row(
                            &Err(mmembed::EmbedError::invalid("prompt", e)),
                            schema.as_ref(),
                        ),
                    };
                    out.extend(res);
                    vec![out]
                })
                .collect()
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        assert_eq!(
            parse_template("Describe {@uri} for {name}, {{literally}}").unwrap(),
            vec![
                Segment::Text("Describe ".into()),
                Segment::Media("uri".into()),
                Segment::Text(" for ".into()),
                Segment::Column("name".into()),
                Segment::Text(", {literally}".into()),
            ]
        );
        for (bad, says) in [
            ("{name", "not closed"),
            ("a}", "has no `{`"),
            ("{}", "empty"),
            ("{@}", "empty"),
            ("", "empty"),
        ] {
            let e = parse_template(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
