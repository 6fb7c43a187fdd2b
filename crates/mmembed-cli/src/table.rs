//! Tables of any columns, for `generate`, `classify` and `score`: read from
//! CSV, JSON Lines, Parquet or an object listing (a folder, a glob, a
//! bucket prefix), written as Parquet (typed columns: INT64 → int64, ARRAY
//! → list, STRUCT → struct) or JSON Lines.
//!
//! Rows travel as JSON objects; Arrow's JSON decoder turns them into typed
//! record batches, so one code path serves every column type, nested ones
//! included. Rows read from a file pass through the same conversion once
//! (`normalize`), so a row read back from an output compares equal to the
//! input row it came from.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use mmembed::schema::{Field as SchemaField, FieldType, OutputSchema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};

use crate::inputs;
use crate::rows::Format;

/// One row: column name to value.
pub type Row = Map<String, Value>;

/// A table read from an input.
#[derive(Debug, Clone)]
pub struct Table {
    /// Its columns and their types.
    pub schema: SchemaRef,
    /// Its rows, in input order, typed: a million rows of two short
    /// strings take tens of MB here, and took 630 MB as JSON objects.
    /// Rows become JSON objects a chunk at a time ([`Table::take`]).
    data: RecordBatch,
    /// Where relative media names are taken from: a table's folder, or
    /// the bucket prefix it sits under.
    pub base: Option<inputs::Base>,
}

/// Rows converted to a table's typed form at a time when it is read.
const READ_CHUNK: usize = 8192;

impl Table {
    /// A table of `schema` from its rows, converted a chunk at a time.
    pub fn from_rows(
        schema: SchemaRef,
        rows: impl IntoIterator<Item = anyhow::Result<Row>>,
        base: Option<inputs::Base>,
    ) -> anyhow::Result<Self> {
        let mut batches = vec![];
        let mut chunk = Vec::with_capacity(READ_CHUNK);
        for r in rows {
            chunk.push(r?);
            if chunk.len() == READ_CHUNK {
                batches.push(rows_to_batch(&schema, &chunk, true)?);
                chunk.clear();
            }
        }
        if !chunk.is_empty() {
            batches.push(rows_to_batch(&schema, &chunk, true)?);
        }
        Self::from_batches(schema, &batches, base)
    }

    /// A table of `schema` from record batches of it.
    pub fn from_batches(
        schema: SchemaRef,
        batches: &[RecordBatch],
        base: Option<inputs::Base>,
    ) -> anyhow::Result<Self> {
        let data = arrow_select::concat::concat_batches(&schema, batches)?;
        Ok(Self { schema, data, base })
    }

    /// How many rows it has.
    pub fn len(&self) -> usize {
        self.data.num_rows()
    }

    /// The rows at `indices`, in that order, as JSON objects (NULLs kept).
    pub fn take(&self, indices: &[usize]) -> anyhow::Result<Vec<Row>> {
        let idx = arrow_array::UInt64Array::from_iter_values(indices.iter().map(|&i| i as u64));
        from_batch(&arrow_select::take::take_record_batch(&self.data, &idx)?)
    }

    /// Whether a value of the column `name` (as text) satisfies `f`; false
    /// without such a column. Read from the typed data: no rows are made.
    pub fn any_text(&self, name: &str, f: impl Fn(&str) -> bool) -> bool {
        use arrow_array::cast::AsArray;
        let Some(c) = self.data.column_by_name(name) else {
            return false;
        };
        match arrow_cast::cast(c, &DataType::Utf8) {
            Ok(c) => c.as_string::<i32>().iter().flatten().any(f),
            Err(_) => false,
        }
    }

    /// All rows in order, a chunk at a time, as JSON objects.
    pub fn chunks(&self) -> impl Iterator<Item = anyhow::Result<Vec<Row>>> + '_ {
        (0..self.len())
            .step_by(READ_CHUNK)
            .map(|start| from_batch(&self.data.slice(start, READ_CHUNK.min(self.len() - start))))
    }

    /// Names column `from` `to` (its values and type stay).
    pub fn rename(&mut self, from: &str, to: &str) -> anyhow::Result<()> {
        let fields: Vec<Field> = self
            .schema
            .fields()
            .iter()
            .map(|f| {
                if f.name() == from {
                    f.as_ref().clone().with_name(to)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        let schema = Arc::new(Schema::new_with_metadata(
            fields,
            self.schema.metadata().clone(),
        ));
        // Not `with_schema`: it takes only a schema whose names include the
        // old ones, which a renamed column's does not.
        self.data = RecordBatch::try_new(schema.clone(), self.data.columns().to_vec())?;
        self.schema = schema;
        Ok(())
    }
}

/// The Arrow type of an output schema type.
pub fn arrow_type(t: &FieldType) -> DataType {
    match t {
        FieldType::String => DataType::Utf8,
        FieldType::Int64 => DataType::Int64,
        FieldType::Float64 => DataType::Float64,
        FieldType::Bool => DataType::Boolean,
        FieldType::Array(inner) => {
            DataType::List(Arc::new(Field::new("item", arrow_type(inner), true)))
        }
        FieldType::Struct(fields) => DataType::Struct(arrow_fields(fields).into()),
    }
}

fn arrow_fields(fields: &[SchemaField]) -> Vec<Field> {
    fields
        .iter()
        .map(|f| Field::new(&f.name, arrow_type(&f.ty), true))
        .collect()
}

/// The columns of an output schema as Arrow fields.
pub fn result_fields(s: &OutputSchema) -> Vec<Field> {
    arrow_fields(&s.fields)
}

fn object_table_schema() -> Schema {
    Schema::new(vec![
        Field::new("uri", DataType::Utf8, true),
        Field::new("content_type", DataType::Utf8, true),
        Field::new("size_bytes", DataType::Int64, true),
        Field::new("generation", DataType::Utf8, true),
        Field::new("etag", DataType::Utf8, true),
        Field::new(
            "updated",
            // An offset rather than "UTC": Arrow's JSON reader parses named
            // zones only with chrono-tz, a large table we do not need.
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())),
            true,
        ),
    ])
}

/// Rows into one record batch of `schema` (fields a row lacks are NULL).
pub fn to_batch(schema: &SchemaRef, rows: &[Row]) -> anyhow::Result<RecordBatch> {
    rows_to_batch(schema, rows, false)
}

/// [`to_batch`]; with `coerce`, numbers and booleans in a string column
/// become their text (an input's column of mixed values, which Arrow's
/// inference types as strings, as BigQuery's loads do).
fn rows_to_batch(schema: &SchemaRef, rows: &[Row], coerce: bool) -> anyhow::Result<RecordBatch> {
    let mut d = arrow_json::ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len().max(1))
        .with_coerce_primitive(coerce)
        .build_decoder()?;
    d.serialize(rows)
        .context("a value does not fit its column's type")?;
    Ok(d.flush()?
        .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())))
}

/// A record batch as rows (NULLs kept, so every row has every column).
pub fn from_batch(b: &RecordBatch) -> anyhow::Result<Vec<Row>> {
    let mut w = arrow_json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow_json::writer::JsonArray>(Vec::new());
    w.write(b)?;
    w.finish()?;
    let bytes = w.into_inner();
    if bytes.is_empty() {
        return Ok(vec![]);
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// Rows as their typed form would read back (see the module docs).
pub fn normalize(schema: &SchemaRef, rows: &[Row]) -> anyhow::Result<Vec<Row>> {
    if rows.is_empty() {
        return Ok(vec![]);
    }
    from_batch(&to_batch(schema, rows)?)
}

/// A Parquet file's schema and record batches, dictionary columns (a
/// pandas categorical) decoded to their values and timestamps in a named
/// zone labelled UTC: rows travel as JSON, and Arrow's JSON decoder has no
/// dictionary type nor (without a zone database) named zones.
pub(crate) fn read_parquet(
    bytes: Bytes,
    what: &str,
) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
    let ctx = || format!("reading {what}");
    let b = ParquetRecordBatchReaderBuilder::try_new(bytes).with_context(ctx)?;
    let stored = b.schema().clone();
    let fields: Vec<Field> = stored
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Dictionary(_, values) => f.as_ref().clone().with_data_type(*values.clone()),
            // A zone by name (pandas and pyarrow write "UTC") is relabelled
            // UTC: Arrow's JSON writer knows only offsets without a time
            // zone database, and failed on them. The instants stay (Arrow
            // stores them in UTC whatever the label); they are written in
            // UTC, as BigQuery writes a TIMESTAMP.
            DataType::Timestamp(unit, Some(tz)) if !tz.starts_with(['+', '-']) => f
                .as_ref()
                .clone()
                .with_data_type(DataType::Timestamp(*unit, Some("+00:00".into()))),
            _ => f.as_ref().clone(),
        })
        .collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, stored.metadata().clone()));
    let mut batches = vec![];
    for batch in b.build().with_context(ctx)? {
        let batch = batch.with_context(ctx)?;
        let columns = batch
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| arrow_cast::cast(c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()
            .with_context(ctx)?;
        batches.push(RecordBatch::try_new(schema.clone(), columns).with_context(ctx)?);
    }
    Ok((schema, batches))
}

/// A JSON object's keys in the order they are written (`serde_json::Map`
/// sorts them), for the column order of a JSON Lines table.
struct KeyOrder(Vec<String>);

impl<'de> serde::Deserialize<'de> for KeyOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<KeyOrder, A::Error> {
                let mut keys = vec![];
                while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(KeyOrder(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// The columns of JSON Lines in the order the lines first name them.
pub(crate) fn jsonl_columns(text: &str) -> Vec<String> {
    let mut order: Vec<String> = vec![];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Ok(KeyOrder(keys)) = serde_json::from_str::<KeyOrder>(line) {
            for k in keys {
                if !order.contains(&k) {
                    order.push(k);
                }
            }
        }
    }
    order
}

/// The rows of JSON Lines text, one object a line (blank lines skipped).
fn jsonl_rows<'a>(text: &'a str, what: &'a str) -> impl Iterator<Item = anyhow::Result<Row>> + 'a {
    text.lines()
        .enumerate()
        .filter_map(move |(i, line)| jsonl_row(line, what, i + 1))
}

/// Line `n` of a JSON Lines table as a row; `None` for a blank line.
pub(crate) fn jsonl_row(line: &str, what: &str, n: usize) -> Option<anyhow::Result<Row>> {
    if line.trim().is_empty() {
        return None;
    }
    Some(match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(anyhow::anyhow!("{what}:{n}: not a JSON object")),
        Err(e) => Err(anyhow::anyhow!("{what}:{n}: not JSON ({e})")),
    })
}

#[cfg(test)]
fn read_jsonl(text: &str, what: &str) -> anyhow::Result<Vec<Row>> {
    jsonl_rows(text, what).collect()
}

/// Reads the input of a job: a `.csv` (every column a string), `.jsonl`
/// (types inferred), `.parquet` (types kept) table, on this machine or one
/// object in a bucket, or anything `mmembed batch` lists (a folder, glob,
/// media file, bucket prefix), which becomes an object table (`uri`,
/// `content_type`, `size_bytes`, `generation`, `etag`, `updated`).
pub async fn read_input(spec: &str) -> anyhow::Result<Table> {
    let path = Path::new(spec);
    let remote = mmembed_store::is_remote(spec);
    // A table here, or one object in a bucket named like a table.
    let kind = inputs::ManifestKind::of(spec).filter(|_| {
        if remote {
            !spec.contains(['*', '?', '['])
        } else {
            path.is_file()
        }
    });
    let bytes = match kind {
        None => None,
        Some(_) if remote => Some(
            mmembed_store::Stores::shared()
                .read(spec, u64::MAX)
                .await
                .with_context(|| format!("reading {spec}"))?
                .0,
        ),
        Some(_) => Some(Bytes::from(
            std::fs::read(path).with_context(|| format!("reading {spec}"))?,
        )),
    };
    let base = kind.map(|_| inputs::Base::of(spec));
    let ctx = || format!("reading {spec}");
    match (kind, bytes) {
        (Some(inputs::ManifestKind::Csv), Some(bytes)) => {
            let mut rd = csv::Reader::from_reader(bytes.as_ref());
            let headers = rd.headers().with_context(ctx)?.clone();
            let fields: Vec<Field> = headers
                .iter()
                .map(|h| Field::new(h, DataType::Utf8, true))
                .collect();
            let rows = rd.records().map(|rec| {
                let rec = rec.with_context(ctx)?;
                Ok(headers
                    .iter()
                    .zip(rec.iter())
                    .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
                    .collect())
            });
            Table::from_rows(Arc::new(Schema::new(fields)), rows, base).with_context(ctx)
        }
        (Some(inputs::ManifestKind::Jsonl), Some(bytes)) => {
            let text =
                std::str::from_utf8(&bytes).with_context(|| format!("{spec} is not UTF-8 text"))?;
            let text = inputs::without_bom(text);
            // The lines are parsed once for the types, once for the column
            // order and once for the rows: no copy of them is held whole.
            let mut bad = None;
            let values = jsonl_rows(text, spec).map_while(|r| match r {
                Ok(o) => Some(Ok(Value::Object(o))),
                Err(e) => {
                    bad = Some(e);
                    None
                }
            });
            let inferred = arrow_json::reader::infer_json_schema_from_iterator(values)
                .with_context(|| format!("{spec}: the columns have no consistent types"));
            if let Some(e) = bad {
                return Err(e);
            }
            let inferred = inferred?;
            let order = jsonl_columns(text);
            let fields: Vec<Field> = order
                .iter()
                .filter_map(|n| inferred.field_with_name(n).ok().cloned())
                .collect();
            Table::from_rows(Arc::new(Schema::new(fields)), jsonl_rows(text, spec), base)
                .with_context(ctx)
        }
        (Some(inputs::ManifestKind::Parquet), Some(bytes)) => {
            let (schema, batches) = read_parquet(bytes, spec)?;
            // The input's columns go into every output row: a type that
            // cannot make that trip is refused now, not after the first
            // chunk's answers (types are per column, so a few rows tell).
            if let Some(b) = batches.iter().find(|b| b.num_rows() > 0) {
                normalize(&schema, &from_batch(&b.slice(0, b.num_rows().min(64)))?)
                    .with_context(|| format!("{spec}: a column's type cannot be written back"))?;
            }
            Table::from_batches(schema, &batches, base).with_context(ctx)
        }
        _ => {
            let listed = inputs::list(spec).await?;
            let rows = listed.inputs.iter().map(|i| {
                let mut r = Row::new();
                r.insert("uri".into(), i.uri.clone().into());
                r.insert("content_type".into(), i.table_content_type().into());
                r.insert("size_bytes".into(), i.identity.size.into());
                r.insert("generation".into(), i.identity.generation.clone().into());
                r.insert("etag".into(), i.identity.etag.clone().into());
                r.insert(
                    "updated".into(),
                    i.identity
                        .updated
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                        .into(),
                );
                Ok(r)
            });
            Table::from_rows(Arc::new(object_table_schema()), rows, base).with_context(ctx)
        }
    }
}

/// Encodes rows of `schema` as a whole file.
pub fn encode(format: Format, schema: &SchemaRef, rows: &[Row]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        Format::Parquet => out = crate::rows::parquet_bytes(&to_batch(schema, rows)?)?,
        Format::Jsonl => write_jsonl(&mut out, schema, rows)?,
    }
    Ok(out)
}

/// Writes rows of `schema` as JSON Lines: values as their typed form reads
/// back, columns in schema order, every one present (NULL as null).
pub fn write_jsonl(out: &mut impl Write, schema: &SchemaRef, rows: &[Row]) -> anyhow::Result<()> {
    let mut line = Vec::new();
    for r in normalize(schema, rows)? {
        line.clear();
        line.push(b'{');
        for (i, f) in schema.fields().iter().enumerate() {
            if i > 0 {
                line.push(b',');
            }
            serde_json::to_writer(&mut line, f.name())?;
            line.push(b':');
            serde_json::to_writer(&mut line, r.get(f.name()).unwrap_or(&Value::Null))?;
        }
        line.extend_from_slice(b"}\n");
        out.write_all(&line)?;
    }
    Ok(())
}

/// Decodes a whole file written by [`encode`]: its column names, rows and
/// recipe (Parquet only).
#[cfg(test)]
pub fn decode(
    bytes: Bytes,
    format: Format,
    what: &str,
) -> anyhow::Result<(Vec<String>, Vec<Row>, Option<crate::recipe::Recipe>)> {
    match format {
        Format::Parquet => {
            let (schema, batches) = read_parquet(bytes, what)?;
            let mut rows = vec![];
            for b in &batches {
                rows.extend(from_batch(b)?);
            }
            Ok((
                schema.fields().iter().map(|f| f.name().clone()).collect(),
                rows,
                crate::recipe::Recipe::of(&schema),
            ))
        }
        Format::Jsonl => {
            let text = std::str::from_utf8(&bytes).with_context(|| format!("reading {what}"))?;
            Ok((jsonl_columns(text), read_jsonl(text, what)?, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_jsonl_table_may_start_with_a_byte_order_mark() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl");
        std::fs::write(&p, "\u{feff}{\"name\": \"pear\", \"n\": 2}\r\n").unwrap();
        let t = read_input(p.to_str().unwrap()).await.unwrap();
        let names: Vec<&String> = t.schema.fields().iter().map(|f| f.name()).collect();
        assert_eq!(names, ["name", "n"]);
        assert_eq!(t.take(&[0]).unwrap()[0]["name"], "pear");
    }

    #[tokio::test]
    async fn any_text_reads_a_column_as_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl");
        std::fs::write(
            &p,
            "{\"uri\": \"a.png\", \"n\": 1}\n{\"uri\": null, \"n\": 20}\n",
        )
        .unwrap();
        let t = read_input(p.to_str().unwrap()).await.unwrap();
        assert!(!t.any_text("uri", inputs::is_video));
        assert!(t.any_text("uri", |u| u == "a.png"));
        assert!(t.any_text("n", |n| n == "20"));
        assert!(!t.any_text("gone", |_| true));
        std::fs::write(&p, "{\"uri\": \"a.png\"}\n{\"uri\": \"gs://b/c.MP4\"}\n").unwrap();
        let t = read_input(p.to_str().unwrap()).await.unwrap();
        assert!(t.any_text("uri", inputs::is_video));
    }

    #[tokio::test]
    async fn a_jsonl_column_of_strings_and_numbers_is_read_as_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl");
        std::fs::write(
            &p,
            "{\"q\": \"a\", \"n\": 1}\n{\"q\": 3, \"n\": 2.5}\n{\"q\": true}\n",
        )
        .unwrap();
        let t = read_input(p.to_str().unwrap()).await.unwrap();
        let rows = t.take(&[0, 1, 2]).unwrap();
        let q: Vec<&Value> = rows.iter().map(|r| &r["q"]).collect();
        assert_eq!(q, ["a", "3", "true"]);
        assert_eq!(rows[0]["n"], 1.0);
        // Objects and strings in one column have no common type.
        std::fs::write(&p, "{\"q\": \"a\"}\n{\"q\": {\"x\": 1}}\n").unwrap();
        let e = format!("{:#}", read_input(p.to_str().unwrap()).await.unwrap_err());
        assert!(e.contains("t.jsonl"), "{e}");
    }

    #[test]
    fn typed_columns_round_trip_through_both_formats() {
        let s: OutputSchema =
            "n INT64, x FLOAT64, ok BOOL, tags ARRAY<STRING>, p STRUCT<a INT64, b STRING>"
                .parse()
                .unwrap();
        let mut fields = vec![Field::new("uri", DataType::Utf8, true)];
        fields.extend(result_fields(&s));
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let rows: Vec<Row> = vec![
            serde_json::json!({"uri": "a", "n": 2, "x": 2.0, "ok": true, "tags": ["t"], "p": {"a": 1, "b": "z"}}),
            serde_json::json!({"uri": "b"}),
        ]
        .into_iter()
        .map(|v| v.as_object().cloned().unwrap())
        .collect();
        let want = normalize(&schema, &rows).unwrap();
        assert_eq!(want[1]["n"], Value::Null);
        for format in [Format::Parquet, Format::Jsonl] {
            let bytes = encode(format, &schema, &rows).unwrap();
            let (names, back, _) = decode(Bytes::from(bytes), format, "t").unwrap();
            assert_eq!(names.len(), 6, "{format:?}");
            assert_eq!(back, want, "{format:?}");
        }
        let batch = to_batch(&schema, &rows).unwrap();
        assert_eq!(
            batch.schema().field_with_name("n").unwrap().data_type(),
            &DataType::Int64
        );
        assert!(matches!(
            batch.schema().field_with_name("tags").unwrap().data_type(),
            DataType::List(_)
        ));
        assert!(matches!(
            batch.schema().field_with_name("p").unwrap().data_type(),
            DataType::Struct(_)
        ));
        // A value of the wrong type is an error, not a silent NULL.
        let bad = vec![
            serde_json::json!({"uri": "c", "n": "many"})
                .as_object()
                .cloned()
                .unwrap(),
        ];
        assert!(to_batch(&schema, &bad).is_err());
    }

    #[tokio::test]
    async fn dictionary_columns_of_a_parquet_table_are_read_as_their_values() {
        use arrow_array::{DictionaryArray, Int64Array, types::Int32Type};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.parquet");
        // A pandas categorical is stored as a dictionary column.
        let kinds: DictionaryArray<Int32Type> =
            vec![Some("cat"), None, Some("cat")].into_iter().collect();
        let batch = RecordBatch::try_from_iter([
            ("kind", Arc::new(kinds) as arrow_array::ArrayRef),
            (
                "n",
                Arc::new(Int64Array::from(vec![1, 2, 3])) as arrow_array::ArrayRef,
            ),
        ])
        .unwrap();
        std::fs::write(&p, crate::rows::parquet_bytes(&batch).unwrap()).unwrap();
        let t = read_input(p.to_str().unwrap()).await.unwrap();
        assert_eq!(
            t.schema.field_with_name("kind").unwrap().data_type(),
            &DataType::Utf8
        );
        let rows = t.take(&[0, 1, 2]).unwrap();
        assert_eq!(rows[0]["kind"], "cat");
        assert_eq!(rows[1]["kind"], Value::Null);
        assert_eq!(rows[2]["n"], 3);
        // And they go into output rows.
        let back = encode(Format::Parquet, &t.schema, &rows).unwrap();
        let (_, again, _) = decode(Bytes::from(back), Format::Parquet, "t").unwrap();
        assert_eq!(again, rows);
    }

    #[tokio::test]
    async fn timestamps_in_a_named_zone_are_read_as_utc() {
        use arrow_array::TimestampMicrosecondArray;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.parquet");
        // pandas writes "UTC"; the instant is 2024-05-01T12:34:56.5Z.
        let at = 1_714_566_896_500_000;
        let batch = RecordBatch::try_from_iter([
            (
                "utc",
                Arc::new(TimestampMicrosecondArray::from(vec![at]).with_timezone("UTC"))
                    as arrow_array::ArrayRef,
            ),
            (
                "ny",
                Arc::new(
                    TimestampMicrosecondArray::from(vec![at]).with_timezone("America/New_York"),
                ),
            ),
            (
                "plus",
                Arc::new(TimestampMicrosecondArray::from(vec![at]).with_timezone("+02:00")),
            ),
        ])
        .unwrap();
        std::fs::write(&p, crate::rows::parquet_bytes(&batch).unwrap()).unwrap();
        let t = read_input(p.to_str().unwrap()).await.unwrap();
        let rows = t.take(&[0]).unwrap();
        assert_eq!(rows[0]["utc"], "2024-05-01T12:34:56.500Z");
        assert_eq!(rows[0]["ny"], "2024-05-01T12:34:56.500Z");
        assert_eq!(rows[0]["plus"], "2024-05-01T14:34:56.500+02:00");
        let back = encode(Format::Parquet, &t.schema, &rows).unwrap();
        let (_, again, _) = decode(Bytes::from(back), Format::Parquet, "t").unwrap();
        assert_eq!(again, rows);
    }
}
