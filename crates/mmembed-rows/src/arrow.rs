//! Rows as an Arrow record batch: the columns of [`STANDARD_COLUMNS`]
//! in that order, then carried columns as strings.

use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, ListBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use arrow_array::{
    Array, ArrayRef, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema, TimeUnit};
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::Row;
#[cfg(doc)]
use crate::STANDARD_COLUMNS;

/// How the `embedding` column is typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingLayout {
    /// `list<float32>`: what Parquet outputs use (rows of several
    /// dimensions may share a file).
    List,
    /// `fixed_size_list<float32, N>`: what array libraries (numpy, Ray,
    /// Daft, Lance) read without copying; every vector must have `N` values.
    FixedSize(i32),
}

/// The `embedding` column's type.
pub fn embedding_type(layout: EmbeddingLayout) -> DataType {
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    match layout {
        EmbeddingLayout::List => DataType::List(item),
        EmbeddingLayout::FixedSize(n) => DataType::FixedSizeList(item, n),
    }
}

/// The schema of rows with `carried` string columns after the standard ones.
pub fn schema(carried: &[String], layout: EmbeddingLayout) -> Schema {
    let mut fields = vec![
        Field::new("uri", DataType::Utf8, false),
        Field::new("content_type", DataType::Utf8, false),
        Field::new("size_bytes", DataType::Int64, true),
        Field::new("generation", DataType::Utf8, true),
        Field::new("etag", DataType::Utf8, true),
        Field::new(
            "updated",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
        Field::new("embedding", embedding_type(layout), true),
        Field::new("status", DataType::Utf8, false),
        Field::new("video_start_sec", DataType::Float64, true),
        Field::new("video_end_sec", DataType::Float64, true),
        Field::new("model", DataType::Utf8, false),
        Field::new("space", DataType::Utf8, false),
        Field::new("dimension", DataType::Int32, true),
    ];
    fields.extend(carried.iter().map(|c| Field::new(c, DataType::Utf8, true)));
    Schema::new(fields)
}

/// A carried value as text: strings as they are, the rest as JSON.
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn embeddings(rows: &[Row], layout: EmbeddingLayout) -> Result<ArrayRef, ArrowError> {
    Ok(match layout {
        EmbeddingLayout::List => {
            let mut b = ListBuilder::with_capacity(Float32Builder::new(), rows.len());
            for r in rows {
                match &r.embedding {
                    Some(v) => {
                        b.values().append_slice(v);
                        b.append(true);
                    }
                    None => b.append(false),
                }
            }
            Arc::new(b.finish())
        }
        EmbeddingLayout::FixedSize(n) => {
            let len = usize::try_from(n)
                .map_err(|_| ArrowError::InvalidArgumentError(format!("dimension {n}")))?;
            let mut b = FixedSizeListBuilder::with_capacity(
                Float32Builder::with_capacity(rows.len() * len),
                n,
                rows.len(),
            );
            for r in rows {
                match &r.embedding {
                    Some(v) if v.len() == len => {
                        b.values().append_slice(v);
                        b.append(true);
                    }
                    Some(v) => {
                        return Err(ArrowError::InvalidArgumentError(format!(
                            "a vector of {} values in a column of {n}-value vectors ({})",
                            v.len(),
                            r.uri
                        )));
                    }
                    None => {
                        b.values().append_nulls(len);
                        b.append(false);
                    }
                }
            }
            Arc::new(b.finish())
        }
    })
}

/// `rows` as one record batch of [`schema`]`(carried, layout)`.
pub fn to_batch(
    rows: &[Row],
    carried: &[String],
    layout: EmbeddingLayout,
) -> Result<RecordBatch, ArrowError> {
    let strings = |f: &dyn Fn(&Row) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let mut cols: Vec<ArrayRef> = vec![
        strings(&|r| &r.uri),
        strings(&|r| &r.content_type),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.size_bytes))),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.generation.as_deref()),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.etag.as_deref()),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter(
                rows.iter().map(|r| r.updated.map(|t| t.timestamp_micros())),
            )
            .with_timezone("UTC"),
        ),
        embeddings(rows, layout)?,
        strings(&|r| &r.status),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.video_start_sec),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.video_end_sec),
        )),
        strings(&|r| &r.model),
        strings(&|r| &r.space),
        Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.dimension))),
    ];
    for c in carried {
        cols.push(Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.carried.get(c).and_then(as_text)),
        )));
    }
    RecordBatch::try_new(Arc::new(schema(carried, layout)), cols)
}

fn schema_error(msg: String) -> ArrowError {
    ArrowError::SchemaError(msg)
}

/// The `embedding` column's vectors, whichever [`EmbeddingLayout`] wrote
/// it: row `i`'s values are `values[offsets[i]..offsets[i + 1]]`.
#[derive(Debug)]
pub struct Vectors<'a> {
    array: &'a dyn Array,
    values: &'a Float32Array,
    kind: VectorsKind<'a>,
}

#[derive(Debug)]
enum VectorsKind<'a> {
    List(&'a [i32]),
    Fixed(usize),
}

impl<'a> Vectors<'a> {
    /// The `embedding` column of `b` (`list<float32>` or
    /// `fixed_size_list<float32, N>`).
    pub fn of(b: &'a RecordBatch) -> Result<Self, ArrowError> {
        let col = b
            .column_by_name("embedding")
            .ok_or_else(|| schema_error("no `embedding` column".into()))?;
        let not_f32 = || schema_error("`embedding` items are not float32".into());
        if let Some(l) = col.as_list_opt::<i32>() {
            Ok(Self {
                array: col.as_ref(),
                values: l
                    .values()
                    .as_primitive_opt::<Float32Type>()
                    .ok_or_else(not_f32)?,
                kind: VectorsKind::List(l.value_offsets()),
            })
        } else if let Some(l) = col.as_fixed_size_list_opt() {
            Ok(Self {
                array: col.as_ref(),
                values: l
                    .values()
                    .as_primitive_opt::<Float32Type>()
                    .ok_or_else(not_f32)?,
                kind: VectorsKind::Fixed(usize::try_from(l.value_length()).unwrap_or(0)),
            })
        } else {
            Err(schema_error(format!(
                "`embedding` is {}, not a list of float32",
                col.data_type()
            )))
        }
    }

    /// Row `i`'s vector; `None` when it is null.
    pub fn get(&self, i: usize) -> Option<&'a [f32]> {
        if !self.array.is_valid(i) {
            return None;
        }
        let v = self.values.values();
        // Offsets of a valid array lie within its values: slicing cannot
        // fail, but a corrupt file must not panic either.
        match self.kind {
            VectorsKind::List(off) => {
                let (a, b) = (off[i], off[i + 1]);
                v.get(usize::try_from(a).ok()?..usize::try_from(b).ok()?)
            }
            VectorsKind::Fixed(n) => v.get(i * n..(i + 1) * n),
        }
    }
}

/// Rows of a record batch written by [`to_batch`] (or read back from a
/// batch output): the inverse of [`to_batch`] for either layout. Columns
/// outputs written before identities were recorded lack (`generation`,
/// `etag`, `updated`) are read as null.
pub fn from_batch(b: &RecordBatch) -> Result<Vec<Row>, ArrowError> {
    let col = |name: &str| -> Result<&ArrayRef, ArrowError> {
        b.column_by_name(name)
            .ok_or_else(|| schema_error(format!("no `{name}` column")))
    };
    let text = |name: &str| -> Result<&StringArray, ArrowError> {
        col(name)?
            .as_string_opt::<i32>()
            .ok_or_else(|| schema_error(format!("`{name}` is not a string column")))
    };
    let typed = |what: &str| schema_error(format!("`{what}`"));
    let (uri, ct, status, model, space) = (
        text("uri")?,
        text("content_type")?,
        text("status")?,
        text("model")?,
        text("space")?,
    );
    let size = col("size_bytes")?
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| typed("size_bytes` is not int64"))?;
    let optional_text = |name: &str| -> Result<Option<&StringArray>, ArrowError> {
        b.column_by_name(name)
            .map(|c| {
                c.as_string_opt::<i32>()
                    .ok_or_else(|| schema_error(format!("`{name}` is not a string column")))
            })
            .transpose()
    };
    let generation = optional_text("generation")?;
    let etag = optional_text("etag")?;
    let updated = b
        .column_by_name("updated")
        .map(|c| {
            c.as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| typed("updated` is not a microsecond timestamp"))
        })
        .transpose()?;
    let start = col("video_start_sec")?
        .as_primitive_opt::<Float64Type>()
        .ok_or_else(|| typed("video_start_sec` is not float64"))?;
    let end = col("video_end_sec")?
        .as_primitive_opt::<Float64Type>()
        .ok_or_else(|| typed("video_end_sec` is not float64"))?;
    let dim = col("dimension")?
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| typed("dimension` is not int32"))?;
    let emb = Vectors::of(b)?;
    let schema = b.schema();
    let carried: Vec<(&str, &StringArray)> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|n| !crate::STANDARD_COLUMNS.contains(n))
        .map(|n| Ok((n, text(n)?)))
        .collect::<Result<_, ArrowError>>()?;
    let opt = |a: &dyn Array, i: usize| a.is_valid(i);
    let mut rows = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        if uri.value(i).is_empty() {
            return Err(ArrowError::InvalidArgumentError(
                "a row has an empty uri".into(),
            ));
        }
        rows.push(Row {
            uri: uri.value(i).to_string(),
            content_type: ct.value(i).to_string(),
            size_bytes: opt(size, i).then(|| size.value(i)),
            generation: generation
                .filter(|a| a.is_valid(i))
                .map(|a| a.value(i).to_string()),
            etag: etag
                .filter(|a| a.is_valid(i))
                .map(|a| a.value(i).to_string()),
            updated: updated
                .filter(|a| a.is_valid(i))
                .and_then(|a| DateTime::<Utc>::from_timestamp_micros(a.value(i))),
            embedding: emb.get(i).map(<[f32]>::to_vec),
            status: status.value(i).to_string(),
            video_start_sec: opt(start, i).then(|| start.value(i)),
            video_end_sec: opt(end, i).then(|| end.value(i)),
            model: model.value(i).to_string(),
            space: space.value(i).to_string(),
            dimension: opt(dim, i).then(|| dim.value(i)),
            carried: carried
                .iter()
                .filter(|(_, a)| a.is_valid(i))
                .map(|(n, a)| (n.to_string(), Value::String(a.value(i).to_string())))
                .collect(),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uri: &str, v: Option<Vec<f32>>) -> Row {
        Row {
            uri: uri.into(),
            content_type: "image/png".into(),
            size_bytes: Some(3),
            generation: None,
            etag: None,
            updated: None,
            status: if v.is_some() { "" } else { "broken" }.into(),
            embedding: v,
            video_start_sec: None,
            video_end_sec: None,
            model: "m".into(),
            space: "s".into(),
            dimension: Some(2),
            carried: [("k".to_string(), Value::from(7))].into_iter().collect(),
        }
    }

    #[test]
    fn fixed_size_vectors_with_null_rows() {
        let rows = [row("a.png", Some(vec![1.0, 2.0])), row("b.png", None)];
        let b = to_batch(&rows, &["k".into()], EmbeddingLayout::FixedSize(2)).unwrap();
        let emb = b.column_by_name("embedding").unwrap().as_fixed_size_list();
        assert!(emb.is_valid(0) && emb.is_null(1));
        assert_eq!(
            emb.value(0).as_primitive::<Float32Type>().values().to_vec(),
            vec![1.0, 2.0]
        );
        assert_eq!(
            b.column_by_name("k").unwrap().as_string::<i32>().value(0),
            "7"
        );
        let wrong = [row("c.png", Some(vec![1.0]))];
        let err = to_batch(&wrong, &[], EmbeddingLayout::FixedSize(2)).unwrap_err();
        assert!(err.to_string().contains("c.png"), "{err}");
    }

    #[test]
    fn rows_read_back_from_either_layout() {
        let mut rows = vec![row("a.png", Some(vec![1.0, 2.0])), row("b.png", None)];
        // Carried values come back as the strings the batch stores.
        for r in &mut rows {
            r.carried.insert("k".into(), Value::String("7".into()));
        }
        for layout in [EmbeddingLayout::List, EmbeddingLayout::FixedSize(2)] {
            let b = to_batch(&rows, &["k".into()], layout).unwrap();
            assert_eq!(from_batch(&b).unwrap(), rows, "{layout:?}");
            let v = Vectors::of(&b).unwrap();
            assert_eq!(v.get(0), Some(&[1.0f32, 2.0][..]));
            assert_eq!(v.get(1), None);
        }
        let mut empty = rows[..1].to_vec();
        empty[0].uri.clear();
        let b = to_batch(&empty, &["k".into()], EmbeddingLayout::List).unwrap();
        assert!(
            from_batch(&b)
                .unwrap_err()
                .to_string()
                .contains("empty uri")
        );
    }
}
