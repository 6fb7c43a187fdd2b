//! The rows of `mmembed batch` outputs nearest to a query vector, by
//! cosine, with memory that does not grow with the tables.
//!
//! Tables are streamed, never loaded: a Parquet table is cut into work units
//! (a row group, or a range of one when row groups are large: the page index
//! lets the reader skip to it), a JSON Lines table into chunks of lines, and
//! a pool of threads decodes and scores the units, each keeping its own top
//! `k`. Only the columns scoring and filtering need are decoded; the full
//! rows of the `k` hits are read back at the end. Peak memory is a few
//! batches per thread plus `k` rows, whatever the size of the tables.
//!
//! ```
//! use mmembed_search::{Options, Table, search};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("out.jsonl");
//! # let row = |uri: &str, v: [f32; 2]| serde_json::json!({
//! #     "uri": uri, "content_type": "image/png", "size_bytes": 3, "embedding": v,
//! #     "status": "", "video_start_sec": null, "video_end_sec": null,
//! #     "model": "demo", "space": "s1", "dimension": 2}).to_string();
//! # std::fs::write(&path, [row("a.png", [1.0, 0.0]), row("b.png", [0.0, 1.0])].join("\n")).unwrap();
//! // `out.jsonl` (or `.parquet`) as `mmembed batch` wrote it
//! let tables = [Table::new(&path)?];
//! let found = search(&tables, &[0.1, 0.9], &Options { k: 1, ..Options::default() })?;
//! assert_eq!(found.hits[0].row.uri, "b.png");
//! assert_eq!(found.scanned, 2);
//! # Ok::<(), mmembed_search::SearchError>(())
//! ```

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as Atomic};
use std::sync::{Mutex, mpsc};

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use arrow_array::{Array, RecordBatch, StringArray};
use arrow_schema::ArrowError;
use mmembed_rows::arrow::{Vectors, from_batch};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
    RowSelector,
};
use parquet::errors::ParquetError;
use parquet::file::metadata::PageIndexPolicy;

pub use mmembed_rows::Row;

/// Rows decoded per batch: 8192 rows of 512 floats are 16 MB per thread.
const BATCH_ROWS: usize = 8192;
/// Lines of a JSON Lines table handed to a thread at a time.
const CHUNK_LINES: usize = 2048;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// A table could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The table.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A Parquet table is damaged or not Parquet.
    #[error("{}: not a readable Parquet table: {source}", path.display())]
    Parquet {
        /// The table.
        path: PathBuf,
        /// Why.
        #[source]
        source: ParquetError,
    },
    /// A table lacks the columns of a batch output, or has them with other
    /// types.
    #[error("{}: not a batch output: {source}", path.display())]
    Arrow {
        /// The table.
        path: PathBuf,
        /// Why.
        #[source]
        source: ArrowError,
    },
    /// A line of a JSON Lines table is not an output row.
    #[error("{}:{line}: not an output row: {source}", path.display())]
    Json {
        /// The table.
        path: PathBuf,
        /// The line, from 1.
        line: u64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The name does not say which format a table is in.
    #[error("{}: name a .parquet or .jsonl batch output", .0.display())]
    Format(PathBuf),
    /// Rows of several embedding spaces.
    #[error(
        "the tables mix embedding spaces ({first} and {other}, in {}); vectors of different spaces are not comparable, search them separately",
        path.display()
    )]
    MixedSpaces {
        /// The space searched.
        first: String,
        /// Another space found.
        other: String,
        /// Where it was found.
        path: PathBuf,
    },
    /// A vector whose length is not the query's.
    #[error("{}: {uri} has a vector of {found} values, the query {expected}", path.display())]
    Dimension {
        /// The table.
        path: PathBuf,
        /// The row.
        uri: String,
        /// Its vector's length.
        found: usize,
        /// The query's.
        expected: usize,
    },
    /// The query vector is empty, zero or not finite.
    #[error("the query vector is empty, zero or not finite")]
    Query,
    /// A row asked for by index is not in the table.
    #[error("{}: no row {index}", path.display())]
    NoRow {
        /// The table.
        path: PathBuf,
        /// The index asked for.
        index: u64,
    },
    /// The index library failed (building, saving, loading, searching).
    #[error("index {}: {message}", path.display())]
    Index {
        /// The index.
        path: PathBuf,
        /// What the library said.
        message: String,
    },
    /// A table changed since the index was built from it.
    #[error(
        "index {} is stale: {} {why} since it was built; run `mmembed index build` again",
        index.display(),
        table.display()
    )]
    Stale {
        /// The index.
        index: PathBuf,
        /// The table.
        table: PathBuf,
        /// What changed.
        why: String,
    },
    /// A search thread panicked (a bug: reported, not propagated).
    #[error("a search thread failed: {0}")]
    Thread(String),
}

/// A table's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Apache Parquet (`.parquet`, `.pq`).
    Parquet,
    /// JSON Lines (`.jsonl`, `.ndjson`, `.json`).
    Jsonl,
}

/// A batch output on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    path: PathBuf,
    format: Format,
}

impl Table {
    /// The table at `path`, its format from the extension.
    pub fn new(path: impl AsRef<Path>) -> Result<Self, SearchError> {
        let path = path.as_ref().to_path_buf();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let format = match ext.as_deref() {
            Some("parquet" | "pq") => Format::Parquet,
            Some("jsonl" | "ndjson" | "json") => Format::Jsonl,
            _ => return Err(SearchError::Format(path)),
        };
        Ok(Self { path, format })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> Format {
        self.format
    }

    fn io(&self, source: std::io::Error) -> SearchError {
        SearchError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn pq(&self, source: ParquetError) -> SearchError {
        SearchError::Parquet {
            path: self.path.clone(),
            source,
        }
    }

    fn arrow(&self, source: ArrowError) -> SearchError {
        SearchError::Arrow {
            path: self.path.clone(),
            source,
        }
    }

    fn open(&self) -> Result<File, SearchError> {
        File::open(&self.path).map_err(|e| self.io(e))
    }

    fn metadata(&self) -> Result<ArrowReaderMetadata, SearchError> {
        // The offset index (where each page starts) lets a reader that
        // starts inside a row group skip the pages before it instead of
        // decoding them; the column index (page statistics) is not needed.
        let opts = ArrowReaderOptions::new().with_offset_index_policy(PageIndexPolicy::Optional);
        ArrowReaderMetadata::load(&self.open()?, opts).map_err(|e| self.pq(e))
    }

    /// JSON Lines rows with their index (non-empty lines, from 0) and line
    /// number (from 1).
    fn lines(&self) -> Result<impl Iterator<Item = Result<Line, SearchError>> + '_, SearchError> {
        let mut reader = BufReader::new(self.open()?);
        let (mut line_no, mut index) = (0u64, 0u64);
        Ok(std::iter::from_fn(move || {
            loop {
                let mut text = String::new();
                match reader.read_line(&mut text) {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) => return Some(Err(self.io(e))),
                }
                line_no += 1;
                if text.trim().is_empty() {
                    continue;
                }
                index += 1;
                return Some(Ok(Line {
                    index: index - 1,
                    line: line_no,
                    text,
                }));
            }
        }))
    }

    fn parse(&self, l: &Line) -> Result<Row, SearchError> {
        serde_json::from_str(&l.text).map_err(|source| SearchError::Json {
            path: self.path.clone(),
            line: l.line,
            source,
        })
    }
}

struct Line {
    index: u64,
    line: u64,
    text: String,
}

/// What the tables hold, read from their first embedded rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The embedding space of every embedded row.
    pub space: String,
    /// The model of the first embedded row.
    pub model: String,
    /// Its vector length.
    pub dimension: usize,
}

/// The space, model and vector length of the tables' embedded rows, from
/// the first one of each table (a query must be embedded by a model of that
/// space before searching); `None` when no table has an embedded row.
/// Tables of different spaces are an error. Reads only until each table's
/// first embedded row.
pub fn summarize(tables: &[Table]) -> Result<Option<Summary>, SearchError> {
    let mut found: Option<Summary> = None;
    for t in tables {
        let Some(s) = first_embedded(t)? else {
            continue;
        };
        match &found {
            None => found = Some(s),
            Some(f) if f.space != s.space => {
                return Err(SearchError::MixedSpaces {
                    first: f.space.clone(),
                    other: s.space,
                    path: t.path.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(found)
}

fn first_embedded(t: &Table) -> Result<Option<Summary>, SearchError> {
    let of_row = |r: &Row| {
        let v = r.embedding.as_ref().filter(|_| r.ok())?;
        Some(Summary {
            space: r.space.clone(),
            model: r.model.clone(),
            dimension: v.len(),
        })
    };
    match t.format {
        Format::Jsonl => {
            for l in t.lines()? {
                if let Some(s) = of_row(&t.parse(&l?)?) {
                    return Ok(Some(s));
                }
            }
            Ok(None)
        }
        Format::Parquet => {
            let reader = ParquetRecordBatchReaderBuilder::try_new(t.open()?)
                .map_err(|e| t.pq(e))?
                .with_batch_size(1024)
                .build()
                .map_err(|e| t.pq(e))?;
            for b in reader {
                let b = b.map_err(|e| t.arrow(e))?;
                if let Some(s) = from_batch(&b)
                    .map_err(|e| t.arrow(e))?
                    .iter()
                    .find_map(of_row)
                {
                    return Ok(Some(s));
                }
            }
            Ok(None)
        }
    }
}

/// Which kind of media a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    /// An image (`content_type` `image/*`).
    Image,
    /// A video segment (`content_type` `video/*` or segment times set).
    Video,
}

/// Which rows may be hits; applied while streaming (rows that fail it are
/// never kept).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only images, or only video segments.
    pub modality: Option<Modality>,
    /// Only rows whose `uri` starts with this.
    pub uri_prefix: Option<String>,
    /// Only rows whose column (a manifest column carried into the output)
    /// has this value; a table without the column has no such rows.
    pub equals: Vec<(String, String)>,
}

impl Filter {
    fn columns(&self) -> impl Iterator<Item = &str> {
        self.equals.iter().map(|(c, _)| c.as_str())
    }

    /// Whether no row is filtered out.
    pub fn is_empty(&self) -> bool {
        self.modality.is_none() && self.uri_prefix.is_none() && self.equals.is_empty()
    }

    /// Whether `row` passes (what the streaming scan applies column by
    /// column).
    pub fn matches(&self, row: &Row) -> bool {
        self.modality_ok(&row.content_type, row.video_start_sec.is_some())
            && self.uri_ok(&row.uri)
            && self.equals.iter().all(|(c, want)| {
                matches!(row.carried.get(c), Some(serde_json::Value::String(s)) if s == want)
            })
    }

    fn modality_ok(&self, content_type: &str, segment: bool) -> bool {
        match self.modality {
            None => true,
            Some(Modality::Video) => segment || content_type.starts_with("video/"),
            Some(Modality::Image) => !segment && content_type.starts_with("image/"),
        }
    }

    fn uri_ok(&self, uri: &str) -> bool {
        self.uri_prefix
            .as_deref()
            .is_none_or(|p| uri.starts_with(p))
    }
}

/// The most threads a search starts, whatever [`Options::threads`] asks:
/// past the cores they only wait on each other, and a hundred thousand of
/// them (`--threads 100000`) exhausted memory and aborted the process.
pub const MAX_THREADS: usize = 256;

/// How to search.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many hits.
    pub k: usize,
    /// Which rows may be hits.
    pub filter: Filter,
    /// The space the query was embedded in; rows of another space are an
    /// error. `None`: the space of [`summarize`].
    pub space: Option<String>,
    /// Threads decoding and scoring (default: the machine's cores; at most
    /// [`MAX_THREADS`]).
    pub threads: usize,
    /// Most rows of a Parquet table in one work unit: row groups larger than
    /// this are split so that every thread gets work.
    pub unit_rows: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            k: 10,
            filter: Filter::default(),
            space: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            unit_rows: 1 << 16,
        }
    }
}

/// One hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Cosine similarity to the query.
    pub score: f32,
    /// Which of the tables it is in.
    pub table: usize,
    /// Its index in that table (row of a Parquet file; non-empty line of a
    /// JSON Lines file, from 0): [`rows`] reads it again.
    pub index: u64,
    /// The row.
    pub row: Row,
}

/// What a search found.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Best first; ties in table and row order.
    pub hits: Vec<Hit>,
    /// Embedded rows looked at (rows with a failure status are skipped).
    pub scanned: u64,
    /// Those that passed the filter.
    pub matched: u64,
}

/// A candidate: ordered so that greater is better (higher score, then the
/// earlier table and row, so that results do not depend on thread timing).
#[derive(Debug, Clone, Copy)]
struct Cand {
    score: f32,
    table: usize,
    index: u64,
}

impl From<&Hit> for Cand {
    fn from(h: &Hit) -> Self {
        Self {
            score: h.score,
            table: h.table,
            index: h.index,
        }
    }
}

/// Hits best first, ties in table and row order (as the scan ranks them).
pub(crate) fn rank(hits: &mut [Hit]) {
    hits.sort_by(|a, b| Cand::from(b).cmp(&Cand::from(a)));
}

impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then(o.table.cmp(&self.table))
            .then(o.index.cmp(&self.index))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}

/// The best `k` candidates seen (a min-heap of them: the root is the one
/// to beat).
#[derive(Debug, Default)]
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Cand>>,
    scanned: u64,
    matched: u64,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            // Room for the first hits only: `k` is the caller's (`-k`) and
            // may be far more than the rows there are, or than memory holds.
            heap: BinaryHeap::with_capacity(k.min(4096) + 1),
            ..Self::default()
        }
    }

    fn push(&mut self, c: Cand) {
        if self.heap.len() < self.k {
            self.heap.push(Reverse(c));
        } else if let Some(Reverse(worst)) = self.heap.peek()
            && c > *worst
        {
            self.heap.pop();
            self.heap.push(Reverse(c));
        }
    }

    fn merge(&mut self, other: TopK) {
        self.scanned += other.scanned;
        self.matched += other.matched;
        for Reverse(c) in other.heap {
            self.push(c);
        }
    }
}

/// Cosine of a unit query `q` and `v` (`v` need not be unit length: rows
/// from other tools may not be). Eight lanes so that the compiler keeps it
/// in vector registers.
pub(crate) fn cosine_to_unit(q: &[f32], v: &[f32]) -> f32 {
    let (mut dot, mut norm) = ([0f32; 8], [0f32; 8]);
    let (qc, qr) = q.as_chunks::<8>();
    let (vc, vr) = v.as_chunks::<8>();
    for (a, b) in qc.iter().zip(vc) {
        for l in 0..8 {
            dot[l] += a[l] * b[l];
            norm[l] += b[l] * b[l];
        }
    }
    let (mut d, mut n) = (dot.iter().sum::<f32>(), norm.iter().sum::<f32>());
    for (a, b) in qr.iter().zip(vr) {
        d += a * b;
        n += b * b;
    }
    if n > 0.0 { d / n.sqrt() } else { 0.0 }
}

/// What every thread shares.
struct Ctx<'a> {
    tables: &'a [Table],
    query: Vec<f32>,
    space: String,
    filter: &'a Filter,
    k: usize,
}

impl Ctx<'_> {
    /// Checks an embedded row's space and length; true if it is to be
    /// scored.
    fn admit(
        &self,
        t: &Table,
        uri: &str,
        space: &str,
        v: &[f32],
        top: &mut TopK,
    ) -> Result<(), SearchError> {
        if space != self.space {
            return Err(SearchError::MixedSpaces {
                first: self.space.clone(),
                other: space.to_string(),
                path: t.path.clone(),
            });
        }
        if v.len() != self.query.len() {
            return Err(SearchError::Dimension {
                path: t.path.clone(),
                uri: uri.to_string(),
                found: v.len(),
                expected: self.query.len(),
            });
        }
        top.scanned += 1;
        Ok(())
    }

    fn score_batch(
        &self,
        table: usize,
        first: u64,
        b: &RecordBatch,
        top: &mut TopK,
    ) -> Result<(), SearchError> {
        let t = &self.tables[table];
        let cols = Columns::of(t, b)?;
        let (uri, space) = (cols.uri, cols.space);
        let ct = text_column(t, b, "content_type")?;
        let start = b
            .column_by_name("video_start_sec")
            .and_then(|c| c.as_primitive_opt::<Float64Type>());
        // A filter column a table lacks (or holds as non-strings) matches
        // none of its rows.
        let equals: Vec<(Option<&StringArray>, &str)> = self
            .filter
            .equals
            .iter()
            .map(|(c, v)| {
                (
                    b.column_by_name(c).and_then(|a| a.as_string_opt::<i32>()),
                    v.as_str(),
                )
            })
            .collect();
        for i in 0..b.num_rows() {
            let Some(v) = cols.embedded(i) else { continue };
            self.admit(t, uri.value(i), space.value(i), v, top)?;
            let segment = start.is_some_and(|s| s.is_valid(i));
            if !self.filter.modality_ok(ct.value(i), segment)
                || !self.filter.uri_ok(uri.value(i))
                || !equals
                    .iter()
                    .all(|(col, want)| col.is_some_and(|c| c.is_valid(i) && c.value(i) == *want))
            {
                continue;
            }
            top.matched += 1;
            top.push(Cand {
                score: cosine_to_unit(&self.query, v),
                table,
                index: first + i as u64,
            });
        }
        Ok(())
    }

    fn score_lines(&self, table: usize, lines: &[Line], top: &mut TopK) -> Result<(), SearchError> {
        let t = &self.tables[table];
        for l in lines {
            let r = t.parse(l)?;
            let Some(v) = r.embedding.as_deref().filter(|_| r.ok()) else {
                continue;
            };
            self.admit(t, &r.uri, &r.space, v, top)?;
            if !self.filter.matches(&r) {
                continue;
            }
            top.matched += 1;
            top.push(Cand {
                score: cosine_to_unit(&self.query, v),
                table,
                index: l.index,
            });
        }
        Ok(())
    }

    fn run(&self, unit: Unit, top: &mut TopK) -> Result<(), SearchError> {
        match unit {
            Unit::Lines { table, lines } => self.score_lines(table, &lines, top),
            Unit::Parquet {
                table,
                meta,
                mask,
                row_group,
                first,
                skip,
                take,
                whole,
            } => {
                let t = &self.tables[table];
                let mut b = ParquetRecordBatchReaderBuilder::new_with_metadata(t.open()?, meta)
                    .with_row_groups(vec![row_group])
                    .with_projection(mask)
                    .with_batch_size(BATCH_ROWS);
                if !whole {
                    b = b.with_row_selection(RowSelection::from(vec![
                        RowSelector::skip(skip),
                        RowSelector::select(take),
                    ]));
                }
                let mut at = first;
                for batch in b.build().map_err(|e| t.pq(e))? {
                    let batch = batch.map_err(|e| t.arrow(e))?;
                    self.score_batch(table, at, &batch, top)?;
                    at += batch.num_rows() as u64;
                }
                Ok(())
            }
        }
    }
}

/// A piece of work for one thread.
enum Unit {
    Parquet {
        table: usize,
        meta: ArrowReaderMetadata,
        mask: ProjectionMask,
        row_group: usize,
        /// The file row index of its first row.
        first: u64,
        skip: usize,
        take: usize,
        whole: bool,
    },
    Lines {
        table: usize,
        lines: Vec<Line>,
    },
}

/// The columns a scan reads, as root indices of the Parquet schema.
fn projection(
    t: &Table,
    meta: &ArrowReaderMetadata,
    filter: &Filter,
) -> Result<ProjectionMask, SearchError> {
    let schema = meta.schema();
    let mut roots = vec![];
    for name in ["uri", "content_type", "status", "space", "embedding"] {
        let (i, _) = schema
            .column_with_name(name)
            .ok_or_else(|| t.arrow(ArrowError::SchemaError(format!("no `{name}` column"))))?;
        roots.push(i);
    }
    for name in std::iter::once("video_start_sec").chain(filter.columns()) {
        if let Some((i, _)) = schema.column_with_name(name) {
            roots.push(i);
        }
    }
    Ok(ProjectionMask::roots(meta.parquet_schema(), roots))
}

/// Feeds the threads: Parquet units first (all known from the footers),
/// then JSON Lines chunks as they are read. Stops early when a thread
/// failed.
fn produce(
    tables: &[Table],
    filter: &Filter,
    unit_rows: usize,
    tx: &mpsc::SyncSender<Unit>,
    stop: &AtomicBool,
) -> Result<(), SearchError> {
    for (table, t) in tables.iter().enumerate() {
        if t.format != Format::Parquet {
            continue;
        }
        let meta = t.metadata()?;
        let mask = projection(t, &meta, filter)?;
        let mut first = 0u64;
        for (row_group, rg) in meta.metadata().row_groups().iter().enumerate() {
            let rows = usize::try_from(rg.num_rows()).unwrap_or(0);
            let unit = unit_rows.max(1);
            let mut skip = 0;
            while skip < rows {
                let take = unit.min(rows - skip);
                if stop.load(Atomic::Relaxed) {
                    return Ok(());
                }
                let u = Unit::Parquet {
                    table,
                    meta: meta.clone(),
                    mask: mask.clone(),
                    row_group,
                    first: first + skip as u64,
                    skip,
                    take,
                    whole: take == rows,
                };
                if tx.send(u).is_err() {
                    return Ok(());
                }
                skip += take;
            }
            first += rows as u64;
        }
    }
    for (table, t) in tables.iter().enumerate() {
        if t.format != Format::Jsonl {
            continue;
        }
        let mut lines = Vec::with_capacity(CHUNK_LINES);
        for l in t.lines()? {
            lines.push(l?);
            if lines.len() == CHUNK_LINES {
                if stop.load(Atomic::Relaxed) {
                    return Ok(());
                }
                let full = std::mem::replace(&mut lines, Vec::with_capacity(CHUNK_LINES));
                if tx.send(Unit::Lines { table, lines: full }).is_err() {
                    return Ok(());
                }
            }
        }
        if !lines.is_empty() && tx.send(Unit::Lines { table, lines }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn text_column<'b>(
    t: &Table,
    b: &'b RecordBatch,
    name: &str,
) -> Result<&'b StringArray, SearchError> {
    b.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| {
            t.arrow(ArrowError::SchemaError(format!(
                "no string column `{name}`"
            )))
        })
}

/// The columns of a batch that say whether a row has a vector, which, and
/// where it is from.
struct Columns<'b> {
    uri: &'b StringArray,
    space: &'b StringArray,
    status: &'b StringArray,
    vectors: Vectors<'b>,
}

impl<'b> Columns<'b> {
    fn of(t: &Table, b: &'b RecordBatch) -> Result<Self, SearchError> {
        Ok(Self {
            uri: text_column(t, b, "uri")?,
            space: text_column(t, b, "space")?,
            status: text_column(t, b, "status")?,
            vectors: Vectors::of(b).map_err(|e| t.arrow(e))?,
        })
    }

    /// Row `i`'s vector, unless the row failed or has none.
    fn embedded(&self, i: usize) -> Option<&'b [f32]> {
        if self.status.is_valid(i) && !self.status.value(i).is_empty() {
            return None;
        }
        self.vectors.get(i)
    }
}

/// Calls `f(index, uri, space, vector)` for every embedded row of `t`, in
/// order, reading only the columns it needs (what an index is built from).
pub(crate) fn each_vector(
    t: &Table,
    mut f: impl FnMut(u64, &str, &str, &[f32]) -> Result<(), SearchError>,
) -> Result<(), SearchError> {
    match t.format {
        Format::Jsonl => {
            for l in t.lines()? {
                let l = l?;
                let r = t.parse(&l)?;
                if let Some(v) = r.embedding.as_deref().filter(|_| r.ok()) {
                    f(l.index, &r.uri, &r.space, v)?;
                }
            }
        }
        Format::Parquet => {
            let meta = t.metadata()?;
            let mask = projection(t, &meta, &Filter::default())?;
            let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(t.open()?, meta)
                .with_projection(mask)
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| t.pq(e))?;
            let mut at = 0u64;
            for b in reader {
                let b = b.map_err(|e| t.arrow(e))?;
                let cols = Columns::of(t, &b)?;
                for i in 0..b.num_rows() {
                    if let Some(v) = cols.embedded(i) {
                        f(at + i as u64, cols.uri.value(i), cols.space.value(i), v)?;
                    }
                }
                at += b.num_rows() as u64;
            }
        }
    }
    Ok(())
}

/// The number of rows of `t` ([`Hit::index`] runs below it).
pub(crate) fn row_count(t: &Table) -> Result<u64, SearchError> {
    match t.format {
        Format::Parquet => {
            Ok(u64::try_from(t.metadata()?.metadata().file_metadata().num_rows()).unwrap_or(0))
        }
        Format::Jsonl => {
            let mut n = 0;
            for l in t.lines()? {
                l?;
                n += 1;
            }
            Ok(n)
        }
    }
}

/// `query` scaled to unit length; empty, zero or non-finite is an error.
pub(crate) fn unit(query: &[f32]) -> Result<Vec<f32>, SearchError> {
    let norm = query.iter().map(|x| x * x).sum::<f32>().sqrt();
    if query.is_empty() || !norm.is_finite() || norm == 0.0 {
        return Err(SearchError::Query);
    }
    Ok(query.iter().map(|x| x / norm).collect())
}

/// The `opts.k` embedded rows of `tables` nearest to `query` by cosine.
///
/// Rows with a failure status or no vector are skipped; a row of another
/// space than `opts.space` (or, without one, the space of [`summarize`]) or
/// with a vector of another length than the query's is an error, as mixing
/// them would rank incomparable scores. The first error stops the search.
pub fn search(tables: &[Table], query: &[f32], opts: &Options) -> Result<Found, SearchError> {
    let query = unit(query)?;
    let space = match &opts.space {
        Some(s) => s.clone(),
        None => match summarize(tables)? {
            Some(s) => s.space,
            None => {
                return Ok(Found {
                    hits: vec![],
                    scanned: 0,
                    matched: 0,
                });
            }
        },
    };
    let ctx = Ctx {
        tables,
        query,
        space,
        filter: &opts.filter,
        k: opts.k,
    };
    let threads = opts.threads.clamp(1, MAX_THREADS);
    let (tx, rx) = mpsc::sync_channel::<Unit>(threads * 2);
    let rx = Mutex::new(rx);
    let stop = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let (produced, results) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut top = TopK::new(ctx.k);
                    let mut failed = None;
                    loop {
                        // The lock is held only to take the next unit.
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(unit) = next else { break };
                        // After a failure, keep draining so that the
                        // producer never blocks on a full channel.
                        if failed.is_some() || stop.load(Atomic::Relaxed) {
                            continue;
                        }
                        if let Err(e) = ctx.run(unit, &mut top) {
                            stop.store(true, Atomic::Relaxed);
                            failed = Some(e);
                        }
                    }
                    match failed {
                        Some(e) => Err(e),
                        None => Ok(top),
                    }
                })
            })
            .collect();
        let produced = produce(tables, &opts.filter, opts.unit_rows, &tx, &stop);
        if produced.is_err() {
            stop.store(true, Atomic::Relaxed);
        }
        drop(tx);
        let results: Vec<_> = workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(SearchError::Thread(msg))
                })
            })
            .collect();
        (produced, results)
    });
    produced?;
    let mut top = TopK::new(opts.k);
    for r in results {
        top.merge(r?);
    }
    let mut best: Vec<Cand> = top.heap.into_iter().map(|Reverse(c)| c).collect();
    best.sort_by(|a, b| b.cmp(a));
    tracing::debug!(
        tables = tables.len(),
        scanned = top.scanned,
        matched = top.matched,
        threads,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "scanned"
    );
    // The hits' full rows, read back per table.
    let mut by_table: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for c in &best {
        by_table.entry(c.table).or_default().push(c.index);
    }
    let mut full: BTreeMap<(usize, u64), Row> = BTreeMap::new();
    for (table, indices) in by_table {
        for (i, r) in indices.iter().zip(rows(&tables[table], &indices)?) {
            full.insert((table, *i), r);
        }
    }
    let hits = best
        .into_iter()
        .filter_map(|c| {
            Some(Hit {
                score: c.score,
                table: c.table,
                index: c.index,
                row: full.remove(&(c.table, c.index))?,
            })
        })
        .collect();
    Ok(Found {
        hits,
        scanned: top.scanned,
        matched: top.matched,
    })
}

/// The rows of `table` at `indices` (as [`Hit::index`] numbers them), in the
/// order asked. Reads only the pages holding them from a Parquet table.
pub fn rows(table: &Table, indices: &[u64]) -> Result<Vec<Row>, SearchError> {
    let mut wanted: Vec<u64> = indices.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let mut got: BTreeMap<u64, Row> = BTreeMap::new();
    match table.format {
        Format::Jsonl => {
            let mut next = wanted.iter().peekable();
            for l in table.lines()? {
                let Some(&&want) = next.peek() else { break };
                let l = l?;
                if l.index == want {
                    got.insert(want, table.parse(&l)?);
                    next.next();
                }
            }
        }
        Format::Parquet => {
            let meta = table.metadata()?;
            let total = u64::try_from(meta.metadata().file_metadata().num_rows()).unwrap_or(0);
            if let Some(&last) = wanted.last()
                && last >= total
            {
                return Err(SearchError::NoRow {
                    path: table.path.clone(),
                    index: last,
                });
            }
            let ranges = wanted.iter().map(|&i| i as usize..i as usize + 1);
            let selection = RowSelection::from_consecutive_ranges(ranges, total as usize);
            let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(table.open()?, meta)
                .with_row_selection(selection)
                .build()
                .map_err(|e| table.pq(e))?;
            let mut order = wanted.iter();
            for b in reader {
                let b = b.map_err(|e| table.arrow(e))?;
                for r in from_batch(&b).map_err(|e| table.arrow(e))? {
                    if let Some(&i) = order.next() {
                        got.insert(i, r);
                    }
                }
            }
        }
    }
    indices
        .iter()
        .map(|i| {
            got.get(i).cloned().ok_or(SearchError::NoRow {
                path: table.path.clone(),
                index: *i,
            })
        })
        .collect()
}

pub mod index;

#[cfg(test)]
mod tests;
