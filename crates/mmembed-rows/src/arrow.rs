//! Rows as an Arrow record batch: the columns of [`STANDARD_COLUMNS`]
//! in that order, then carried columns as strings.

use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, ListBuilder};
use arrow_array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema, TimeUnit};
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float32Type;

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
}
