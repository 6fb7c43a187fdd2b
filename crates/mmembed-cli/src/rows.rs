//! Output rows of a batch job and their two file formats: Parquet (one
//! row group per part, Snappy) and JSON Lines.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use clap::ValueEnum;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

pub use mmembed_rows::Row;

use crate::recipe::Recipe;

/// Output file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Apache Parquet, `embedding` as list<float32>.
    Parquet,
    /// JSON Lines, one row per line.
    Jsonl,
}

impl Format {
    /// The MIME type of the format, for objects written to buckets.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Parquet => "application/vnd.apache.parquet",
            Self::Jsonl => "application/x-ndjson",
        }
    }

    /// The format an output path's extension names, if any.
    pub fn from_path(p: &Path) -> Option<Self> {
        match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "parquet" | "pq" => Some(Self::Parquet),
            "jsonl" | "ndjson" | "json" => Some(Self::Jsonl),
            _ => None,
        }
    }

    /// File extension for parts.
    pub fn ext(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Jsonl => "jsonl",
        }
    }
}

pub(crate) fn to_batch(
    rows: &[Row],
    carried: &[String],
    recipe: &Recipe,
) -> anyhow::Result<RecordBatch> {
    let batch =
        mmembed_rows::arrow::to_batch(rows, carried, mmembed_rows::arrow::EmbeddingLayout::List)?;
    let schema = recipe.attach(&batch.schema());
    Ok(batch.with_schema(Arc::new(schema))?)
}

/// One record batch as a whole Parquet file (one row group, Snappy): the
/// shape of every part and output.
pub fn parquet_bytes(batch: &RecordBatch) -> anyhow::Result<Vec<u8>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    w.write(batch)?;
    w.close()?;
    Ok(out)
}

/// `rows` as the bytes of a whole file of `format` (Parquet records
/// `recipe`; JSON Lines has no place for it).
pub fn encode(
    format: Format,
    rows: &[Row],
    carried: &[String],
    recipe: &Recipe,
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Parquet => out = parquet_bytes(&to_batch(rows, carried, recipe)?)?,
        Format::Jsonl => {
            for r in rows {
                serde_json::to_writer(&mut out, r)?;
                out.push(b'\n');
            }
        }
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, flushed to disk, then renamed over `path`. A crash at any
/// point leaves either the old file or the new one, never a torn one.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = temporary_beside(path)?;
    let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("flushing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The temporary file, beside `path` and hidden, that is renamed over it.
pub fn temporary_beside(path: &Path) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("output path has no file name")?;
    Ok(path.with_file_name(format!(".{name}.tmp")))
}

/// Encodes and writes `rows` with [`write_file_atomic`].
#[cfg(test)]
pub fn write_atomic(
    path: &Path,
    format: Format,
    rows: &[Row],
    carried: &[String],
) -> anyhow::Result<()> {
    write_file_atomic(path, &encode(format, rows, carried, &Recipe::default())?)
}

/// Reads a local file written by [`write_file_atomic`], with the recipe it
/// records.
#[cfg(test)]
pub fn read(path: &Path, format: Format) -> anyhow::Result<(Vec<Row>, Option<Recipe>)> {
    let what = path.display().to_string();
    let file = crate::merge::open(path, format, &what, crate::merge::Columns::All)?;
    let recipe = file.recipe.clone();
    let mut rows = vec![];
    for b in file {
        rows.extend(b?);
    }
    Ok((rows, recipe))
}

pub(crate) fn from_batch(b: &RecordBatch) -> anyhow::Result<Vec<Row>> {
    Ok(mmembed_rows::arrow::from_batch(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use serde_json::Map;
    use serde_json::Value;

    fn sample() -> Vec<Row> {
        let mut carried = Map::new();
        carried.insert("label".into(), Value::String("cat".into()));
        vec![
            Row {
                uri: "a.png".into(),
                content_type: "image/png".into(),
                size_bytes: Some(10),
                generation: Some("1733000000123456".into()),
                etag: Some("\"abc\"".into()),
                updated: DateTime::<Utc>::from_timestamp_micros(1_733_000_000_123_456),
                embedding: Some(vec![0.5, -0.25, 1e-7]),
                status: String::new(),
                video_start_sec: None,
                video_end_sec: None,
                model: "m".into(),
                space: "s".into(),
                dimension: Some(3),
                carried,
            },
            Row {
                uri: "b.mp4".into(),
                content_type: "video/mp4".into(),
                size_bytes: None,
                generation: None,
                etag: None,
                updated: None,
                embedding: None,
                status: "cannot decode".into(),
                video_start_sec: Some(16.0),
                video_end_sec: Some(20.5),
                model: "m".into(),
                space: "s".into(),
                dimension: None,
                carried: Map::new(),
            },
        ]
    }

    #[test]
    fn both_formats_round_trip() {
        let d = tempfile::tempdir().unwrap();
        for f in [Format::Parquet, Format::Jsonl] {
            let p = d.path().join(format!("out.{}", f.ext()));
            write_atomic(&p, f, &sample(), &["label".to_string()]).unwrap();
            assert_eq!(read(&p, f).unwrap().0, sample(), "{f:?}");
            let leftovers = std::fs::read_dir(d.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".tmp")
                })
                .count();
            assert_eq!(leftovers, 0);
        }
    }

    #[test]
    fn parquet_records_the_recipe() {
        let d = tempfile::tempdir().unwrap();
        let recipe = Recipe::default().with("jpeg_draft", true);
        let p = d.path().join("o.parquet");
        let bytes = encode(Format::Parquet, &sample(), &["label".into()], &recipe).unwrap();
        write_file_atomic(&p, &bytes).unwrap();
        assert_eq!(
            read(&p, Format::Parquet).unwrap(),
            (sample(), Some(recipe.clone()))
        );
        let p = d.path().join("o.jsonl");
        let bytes = encode(Format::Jsonl, &sample(), &["label".into()], &recipe).unwrap();
        write_file_atomic(&p, &bytes).unwrap();
        assert_eq!(read(&p, Format::Jsonl).unwrap().1, None);
    }

    #[test]
    fn formats_follow_extensions() {
        assert_eq!(
            Format::from_path(Path::new("x/o.parquet")),
            Some(Format::Parquet)
        );
        assert_eq!(Format::from_path(Path::new("o.JSONL")), Some(Format::Jsonl));
        assert_eq!(Format::from_path(Path::new("o.csv")), None);
    }
}
