// `mmembed._native`: the Python bindings, a thin layer over the facade.
//
// Conversion happens at the edge (Python objects to requests before the
// work, vectors to numpy/Arrow after it); the model runs with the GIL
// released, on the same backends and spec strings as the CLI, and rows of
// media come from `mmembed-rows`, exactly as `mmembed batch` makes them.
//
// Also compiled as the example `mmembed_native` (examples/mmembed_native.rs
// includes this file), so no inner attributes or `//!` docs here.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arrow_array::{Array, ArrayRef, BinaryArray, LargeBinaryArray, RecordBatch, UInt32Array};
use arrow_array::{BinaryViewArray, LargeStringArray, StringArray, StringViewArray};
use arrow_pyarrow::PyArrowType;
use arrow_schema::{DataType, Field, Schema};
use mmembed::spec::BackendSpec;
use mmembed::{EmbedError, EmbedRequest, Embeddings, Media, MediaSource, VideoSegmentConfig};
use mmembed_rows::arrow::EmbeddingLayout;
use mmembed_rows::{RowInput, STANDARD_COLUMNS};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PyString};

create_exception!(
    mmembed,
    MmembedError,
    PyException,
    "A backend, model or I/O failure (the message is the library's)."
);
create_exception!(
    mmembed,
    InvalidInputError,
    PyValueError,
    "A request the backend refuses as such: a bad spec, option, dimension or modality."
);

fn to_py(e: EmbedError) -> PyErr {
    match e {
        EmbedError::InvalidInput { .. }
        | EmbedError::UnsupportedModality { .. }
        | EmbedError::UnsupportedDimension { .. } => InvalidInputError::new_err(e.to_string()),
        other => MmembedError::new_err(other.to_string()),
    }
}

/// One runtime for every embedder of the process: the async side is light
/// (local models run on their own threads), so a small pool serves all.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mmembed")
        .enable_all()
        .build()
        .map_err(|e| MmembedError::new_err(format!("cannot start the async runtime: {e}")))?;
    Ok(RT.get_or_init(|| rt))
}

/// A local path, a URI the backend reads (`gs://`, `s3://`, `https://`), or
/// bytes.
fn media_of(item: &Bound<'_, PyAny>) -> PyResult<Media> {
    if let Ok(b) = item.cast::<PyBytes>() {
        return Ok(Media::from(b.as_bytes().to_vec()));
    }
    if let Ok(s) = item.cast::<PyString>() {
        let s = s.to_str()?;
        return Ok(if s.contains("://") {
            Media::from(MediaSource::Uri(s.to_string()))
        } else {
            Media::from(PathBuf::from(s))
        });
    }
    if let Ok(p) = item.extract::<PathBuf>() {
        return Ok(Media::from(p));
    }
    // bytearray and memoryview: copied through `bytes()` (ints, which
    // `bytes()` would also take, are not media).
    if (item.is_instance_of::<PyByteArray>() || item.is_instance_of::<PyMemoryView>())
        && let Ok(b) = item.py().get_type::<PyBytes>().call1((item,))
        && let Ok(b) = b.cast::<PyBytes>()
    {
        return Ok(Media::from(b.as_bytes().to_vec()));
    }
    Err(InvalidInputError::new_err(format!(
        "expected bytes, a path or a URI string, got {}",
        item.get_type().name()?
    )))
}

fn segment_config(
    start_sec: Option<u32>,
    end_sec: Option<u32>,
    interval_sec: Option<u32>,
) -> PyResult<Option<VideoSegmentConfig>> {
    if start_sec.is_none() && end_sec.is_none() && interval_sec.is_none() {
        return Ok(None);
    }
    let c = VideoSegmentConfig {
        start_offset_sec: start_sec,
        end_offset_sec: end_sec,
        interval_sec,
    };
    c.range().map_err(to_py)?;
    Ok(Some(c))
}

/// Rows of one call, before they become numpy arrays.
struct Flat {
    dimension: usize,
    vectors: Vec<f32>,
    status: Vec<String>,
    index: Vec<i64>,
    start: Vec<f64>,
    end: Vec<f64>,
}

impl Flat {
    fn new(dimension: usize) -> Self {
        Self {
            dimension,
            vectors: vec![],
            status: vec![],
            index: vec![],
            start: vec![],
            end: vec![],
        }
    }

    fn push(&mut self, index: usize, span: Option<(f64, f64)>, v: Result<&[f32], String>) {
        let status = match v {
            Ok(v) if v.len() == self.dimension => {
                self.vectors.extend_from_slice(v);
                String::new()
            }
            Ok(v) => format!(
                "the backend returned {} values where {} were expected",
                v.len(),
                self.dimension
            ),
            Err(s) => s,
        };
        if !status.is_empty() {
            self.vectors
                .extend(std::iter::repeat_n(f32::NAN, self.dimension));
        }
        self.status.push(status);
        self.index.push(index as i64);
        let (s, e) = span.unwrap_or((f64::NAN, f64::NAN));
        self.start.push(s);
        self.end.push(e);
    }

    /// Text or image answers: one row each.
    fn single(
        dimension: usize,
        results: Vec<Result<Embeddings, EmbedError>>,
        pick: fn(&Embeddings) -> Option<&Vec<f32>>,
    ) -> Self {
        let mut f = Self::new(dimension);
        for (i, r) in results.iter().enumerate() {
            let v = match r {
                Ok(e) => pick(e)
                    .map(|v| v.as_slice())
                    .ok_or_else(|| "the backend returned no vector for this input".to_string()),
                Err(e) => Err(e.to_string()),
            };
            f.push(i, None, v);
        }
        f
    }
}

/// What an `embed_*` call returns: one row per text or image, one per video
/// segment (a video that fails as a whole gets one row), in input order.
///
/// `embeddings` is a float32 array of shape (rows, dimension) whose failed
/// rows are NaN; `status` is `""` for rows with a vector, the error
/// otherwise; `input_index` says which input a row belongs to;
/// `start_sec`/`end_sec` are a segment's bounds (NaN for texts and images).
#[pyclass(module = "mmembed._native", frozen, get_all)]
struct EmbedResult {
    embeddings: Py<PyAny>,
    status: Vec<String>,
    ok: Py<PyAny>,
    input_index: Py<PyAny>,
    start_sec: Py<PyAny>,
    end_sec: Py<PyAny>,
    model: String,
    space: String,
    dimension: usize,
}

#[pymethods]
impl EmbedResult {
    fn __len__(&self) -> usize {
        self.status.len()
    }

    fn __repr__(&self) -> String {
        let failed = self.status.iter().filter(|s| !s.is_empty()).count();
        format!(
            "EmbedResult(rows={}, failed={failed}, dimension={}, model={:?}, space={:?})",
            self.status.len(),
            self.dimension,
            self.model,
            self.space
        )
    }
}

fn result_of(py: Python<'_>, f: Flat, model: String, space: String) -> PyResult<EmbedResult> {
    let rows = f.status.len();
    let ok: Vec<bool> = f.status.iter().map(|s| s.is_empty()).collect();
    // `from_vec` hands the buffer to numpy without a copy.
    let embeddings = PyArray1::from_vec(py, f.vectors).reshape([rows, f.dimension])?;
    Ok(EmbedResult {
        embeddings: embeddings.into_any().unbind(),
        status: f.status,
        ok: PyArray1::from_vec(py, ok).into_any().unbind(),
        input_index: PyArray1::from_vec(py, f.index).into_any().unbind(),
        start_sec: PyArray1::from_vec(py, f.start).into_any().unbind(),
        end_sec: PyArray1::from_vec(py, f.end).into_any().unbind(),
        model,
        space,
        dimension: f.dimension,
    })
}

/// A text column's values (utf8 of any offset width), nulls as `None`.
fn strings(a: &ArrayRef) -> Option<Vec<Option<String>>> {
    fn collect<'a>(it: impl Iterator<Item = Option<&'a str>>) -> Vec<Option<String>> {
        it.map(|s| s.map(str::to_string)).collect()
    }
    let any = a.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        return Some(collect(a.iter()));
    }
    if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        return Some(collect(a.iter()));
    }
    any.downcast_ref::<StringViewArray>()
        .map(|a| collect(a.iter()))
}

/// A binary column's values, nulls as `None`.
fn binaries(a: &ArrayRef) -> Option<Vec<Option<Vec<u8>>>> {
    fn collect<'a>(it: impl Iterator<Item = Option<&'a [u8]>>) -> Vec<Option<Vec<u8>>> {
        it.map(|b| b.map(<[u8]>::to_vec)).collect()
    }
    let any = a.as_any();
    if let Some(a) = any.downcast_ref::<BinaryArray>() {
        return Some(collect(a.iter()));
    }
    if let Some(a) = any.downcast_ref::<LargeBinaryArray>() {
        return Some(collect(a.iter()));
    }
    any.downcast_ref::<BinaryViewArray>()
        .map(|a| collect(a.iter()))
}

/// An embedding backend: `Embedder("local:demo")`, `Embedder("vertex:proj/us-central1")`,
/// `Embedder("fallback(local:demo, vertex:proj)")` or a `.toml` file, as the
/// CLI's `--backend`.
#[pyclass(module = "mmembed._native", frozen, subclass)]
struct Embedder {
    inner: Arc<dyn mmembed::Embedder>,
    spec: String,
    /// The process that built it: a forked child has none of its threads
    /// (the model's worker, the runtime's), so a call there would hang.
    pid: u32,
}

impl Embedder {
    /// The vector size of a call; a size the backend cannot make refuses
    /// the whole call (as a bad interval does) rather than failing each row.
    fn dimension_for(&self, dimension: Option<u32>) -> PyResult<usize> {
        let info = self.inner.info();
        match dimension {
            Some(d) => {
                info.check_dimension(d).map_err(to_py)?;
                Ok(d as usize)
            }
            None => Ok(info.native_dimension),
        }
    }

    /// Refuses calls in a process forked after the embedder was built.
    fn check_process(&self) -> PyResult<()> {
        if std::process::id() == self.pid {
            return Ok(());
        }
        Err(MmembedError::new_err(format!(
            "this Embedder ({}) was built in process {} and this is process {} (a fork): \
             its model threads do not exist here. Build it in the worker (Ray actors and \
             Daft classes do so in __init__), or use the 'spawn' start method",
            self.spec,
            self.pid,
            std::process::id()
        )))
    }

    fn run(
        &self,
        py: Python<'_>,
        reqs: Vec<EmbedRequest>,
    ) -> PyResult<Vec<Result<Embeddings, EmbedError>>> {
        self.check_process()?;
        let rt = runtime()?;
        let inner = self.inner.clone();
        // The GIL is released while the model runs: other Python threads
        // (Ray's and Daft's I/O among them) keep going.
        Ok(py.detach(move || {
            if reqs.is_empty() {
                vec![]
            } else {
                rt.block_on(inner.embed_batch(reqs))
            }
        }))
    }

    fn names(&self) -> (String, String) {
        let i = self.inner.info();
        (i.model_id.clone(), i.space.as_str().to_string())
    }
}

#[pymethods]
impl Embedder {
    #[new]
    fn new(py: Python<'_>, spec: &str) -> PyResult<Self> {
        let parsed: BackendSpec = if spec.trim_end().ends_with(".toml") {
            let text = std::fs::read_to_string(spec.trim()).map_err(|e| {
                InvalidInputError::new_err(format!("cannot read backend config {spec}: {e}"))
            })?;
            BackendSpec::from_toml(&text).map_err(to_py)?
        } else {
            spec.parse().map_err(to_py)?
        };
        let rt = runtime()?;
        let inner = py.detach(|| rt.block_on(parsed.build())).map_err(to_py)?;
        Ok(Self {
            inner,
            spec: spec.to_string(),
            pid: std::process::id(),
        })
    }

    /// What the backend is: `backend`, `model`, `space`, `dimension`,
    /// `supported_dimensions`, `modalities`, `max_text_tokens`.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let i = self.inner.info();
        let d = PyDict::new(py);
        d.set_item("backend", &i.backend)?;
        d.set_item("model", &i.model_id)?;
        d.set_item("space", i.space.as_str())?;
        d.set_item("dimension", i.native_dimension)?;
        d.set_item("supported_dimensions", &i.supported_dimensions)?;
        d.set_item(
            "modalities",
            i.modalities
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>(),
        )?;
        d.set_item("max_text_tokens", i.max_text_tokens)?;
        Ok(d)
    }

    /// The spec this embedder was built from.
    #[getter]
    fn spec(&self) -> &str {
        &self.spec
    }

    fn __repr__(&self) -> String {
        let i = self.inner.info();
        format!(
            "Embedder({:?}: model={:?}, space={:?}, dimension={})",
            self.spec,
            i.model_id,
            i.space.as_str(),
            i.native_dimension
        )
    }

    /// Embeds texts: one row each.
    #[pyo3(signature = (texts, *, dimension=None))]
    fn embed_texts(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        dimension: Option<u32>,
    ) -> PyResult<EmbedResult> {
        let dim = self.dimension_for(dimension)?;
        let reqs = texts
            .into_iter()
            .map(|t| {
                let r = EmbedRequest::text(t);
                match dimension {
                    Some(d) => r.with_dimension(d),
                    None => r,
                }
            })
            .collect();
        let out = self.run(py, reqs)?;
        let (model, space) = self.names();
        let f = Flat::single(dim, out, |e| e.text.as_ref());
        result_of(py, f, model, space)
    }

    /// Embeds images given as bytes, paths or URIs: one row each.
    #[pyo3(signature = (images, *, dimension=None))]
    fn embed_images(
        &self,
        py: Python<'_>,
        images: Vec<Bound<'_, PyAny>>,
        dimension: Option<u32>,
    ) -> PyResult<EmbedResult> {
        let dim = self.dimension_for(dimension)?;
        let mut reqs = Vec::with_capacity(images.len());
        for item in &images {
            let r = EmbedRequest::image(media_of(item)?);
            reqs.push(match dimension {
                Some(d) => r.with_dimension(d),
                None => r,
            });
        }
        let out = self.run(py, reqs)?;
        let (model, space) = self.names();
        let f = Flat::single(dim, out, |e| e.image.as_ref());
        result_of(py, f, model, space)
    }

    /// Embeds videos (bytes, paths or URIs): one row per segment of
    /// `interval_sec` between `start_sec` and `end_sec` (Vertex's defaults:
    /// 0, 120, 16), one row with a status for a video that fails.
    #[pyo3(signature = (videos, *, start_sec=None, end_sec=None, interval_sec=None))]
    fn embed_videos(
        &self,
        py: Python<'_>,
        videos: Vec<Bound<'_, PyAny>>,
        start_sec: Option<u32>,
        end_sec: Option<u32>,
        interval_sec: Option<u32>,
    ) -> PyResult<EmbedResult> {
        let cfg = segment_config(start_sec, end_sec, interval_sec)?;
        let mut reqs = Vec::with_capacity(videos.len());
        for item in &videos {
            reqs.push(EmbedRequest::video(media_of(item)?, cfg));
        }
        let out = self.run(py, reqs)?;
        let (model, space) = self.names();
        let mut f = Flat::new(self.dimension_for(None)?);
        for (i, r) in out.iter().enumerate() {
            match r {
                Err(e) => f.push(i, None, Err(e.to_string())),
                Ok(e) if e.video.is_empty() => f.push(
                    i,
                    None,
                    Err("the backend returned no vector for this input".into()),
                ),
                Ok(e) => {
                    for s in &e.video {
                        let v = match &s.error {
                            Some(err) => Err(err.clone()),
                            None => Ok(s.embedding.as_slice()),
                        };
                        f.push(i, Some((s.start_sec, s.end_sec)), v);
                    }
                }
            }
        }
        result_of(py, f, model, space)
    }

    /// The rows `mmembed batch` makes for a record batch of media: `uri`
    /// (or `path`) names each object and chooses image or video by its
    /// extension; an optional `bytes` column holds its content (else it is
    /// read from the path or URI). Other columns are carried to every row
    /// of their object. Returns the rows (`embedding` as
    /// fixed_size_list<float32>) and, per row, its input row's index.
    #[pyo3(signature = (batch, *, start_sec=None, end_sec=None, interval_sec=None, dimension=None))]
    fn embed_record_batch<'py>(
        &self,
        py: Python<'py>,
        batch: PyArrowType<RecordBatch>,
        start_sec: Option<u32>,
        end_sec: Option<u32>,
        interval_sec: Option<u32>,
        dimension: Option<u32>,
    ) -> PyResult<(PyArrowType<RecordBatch>, Bound<'py, PyArray1<i64>>)> {
        let batch = batch.0;
        self.check_process()?;
        let cfg = segment_config(start_sec, end_sec, interval_sec)?;
        let dim = self.dimension_for(dimension)? as i32;
        let schema = batch.schema();
        let (name_col, names) = ["uri", "path", "url", "URL"]
            .iter()
            .find_map(|c| Some((*c, strings(batch.column_by_name(c)?)?)))
            .ok_or_else(|| {
                InvalidInputError::new_err(
                    "the batch needs a string column `uri`, `path` or `url` naming each object",
                )
            })?;
        let mut contents =
            match batch.column_by_name("bytes") {
                Some(c) => Some(binaries(c).ok_or_else(|| {
                    InvalidInputError::new_err("the `bytes` column must be binary")
                })?),
                None => None,
            };
        // An object table's `content_type` types its objects, as in
        // `mmembed batch` (and becomes the output's, not a carried column).
        let declared = match batch.column_by_name("content_type") {
            Some(c) => Some(strings(c).ok_or_else(|| {
                InvalidInputError::new_err("the `content_type` column must be strings")
            })?),
            None => None,
        };
        let carried: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| !matches!(f.name().as_str(), "bytes" | "content_type"))
            .filter(|(_, f)| f.name() != name_col)
            .map(|(i, _)| i)
            .collect();
        if let Some(f) = carried
            .iter()
            .map(|&i| schema.field(i))
            .find(|f| STANDARD_COLUMNS.contains(&f.name().as_str()))
        {
            return Err(InvalidInputError::new_err(format!(
                "the input column `{}` has the name of an output column; rename it",
                f.name()
            )));
        }
        let mut inputs = Vec::with_capacity(batch.num_rows());
        // Remote objects without bytes: typed (and, where their names say
        // nothing, looked at) on the runtime below; their rows here until then.
        let mut remote: Vec<(usize, (String, Option<String>))> = vec![];
        for (i, name) in names.into_iter().enumerate() {
            let Some(uri) = name else {
                inputs.push(RowInput::failed(
                    "",
                    "application/octet-stream",
                    format!("row {i} has no {name_col}"),
                ));
                continue;
            };
            // Bytes when the batch has them; else the file (stat'ed like
            // `mmembed batch` does) or the URI, read by the backend.
            // Taken, not cloned: each object's bytes are copied out of Arrow once.
            let ct = declared.as_ref().and_then(|d| d[i].as_deref());
            inputs.push(match contents.as_mut().and_then(|c| c[i].take()) {
                Some(b) => {
                    let size = b.len() as i64;
                    let mut input = RowInput::new(uri, b, ct, cfg, dimension);
                    input.size_bytes = Some(size);
                    input
                }
                None if uri.contains("://") => {
                    remote.push((i, (uri.clone(), ct.map(String::from))));
                    RowInput::failed(uri, "application/octet-stream", String::new())
                }
                None => {
                    let path = PathBuf::from(&uri);
                    RowInput::file(uri, &path, ct, cfg, dimension)
                }
            });
        }
        let rt = runtime()?;
        let inner = self.inner.clone();
        let rows = py.detach(move || {
            rt.block_on(async move {
                let (at, objects): (Vec<usize>, Vec<_>) = remote.into_iter().unzip();
                let typed = mmembed_rows::remote_inputs(objects, cfg, dimension).await;
                for (i, input) in at.into_iter().zip(typed) {
                    inputs[i] = input;
                }
                mmembed_rows::embed_rows(inner.as_ref(), dimension, inputs).await
            })
        });
        let index: Vec<u32> = rows.iter().map(|(i, _)| *i as u32).collect();
        let rows: Vec<_> = rows.into_iter().map(|(_, r)| r).collect();
        let out = mmembed_rows::arrow::to_batch(&rows, &[], EmbeddingLayout::FixedSize(dim))
            .map_err(|e| MmembedError::new_err(e.to_string()))?;
        // Carried columns keep their Arrow types: each input row's values,
        // repeated for each of its rows.
        let take = UInt32Array::from(index.clone());
        let mut fields: Vec<Field> = out
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut cols: Vec<ArrayRef> = out.columns().to_vec();
        for &c in &carried {
            let col = arrow_select::take::take(batch.column(c).as_ref(), &take, None)
                .map_err(|e| MmembedError::new_err(e.to_string()))?;
            let f = schema.field(c);
            fields.push(Field::new(f.name(), col.data_type().clone(), true));
            cols.push(col);
        }
        let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
            .map_err(|e| MmembedError::new_err(e.to_string()))?;
        let index = PyArray1::from_vec(py, index.into_iter().map(i64::from).collect());
        Ok((PyArrowType(out), index))
    }
}

/// The type of the `embedding` column for `dimension`, for callers that
/// declare schemas up front.
#[pyfunction]
fn embedding_dtype(dimension: i32) -> PyArrowType<DataType> {
    PyArrowType(mmembed_rows::arrow::embedding_type(
        EmbeddingLayout::FixedSize(dimension),
    ))
}

/// glibc's allocator set for batches of inference (`mmembed` the CLI does
/// the same at start): large activation blocks freed by one layer are
/// reused by the next instead of being unmapped and faulted back in page by
/// page. Process-wide; returns whether it took effect (false off
/// Linux/glibc). `mmembed.Embedder` calls it unless `MMEMBED_TUNE_MALLOC=0`.
#[pyfunction]
fn tune_malloc_for_inference() -> bool {
    mmembed::local::tune_malloc_for_inference()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Embedder>()?;
    m.add_class::<EmbedResult>()?;
    m.add_function(wrap_pyfunction!(embedding_dtype, m)?)?;
    m.add_function(wrap_pyfunction!(tune_malloc_for_inference, m)?)?;
    m.add("MmembedError", m.py().get_type::<MmembedError>())?;
    m.add("InvalidInputError", m.py().get_type::<InvalidInputError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
