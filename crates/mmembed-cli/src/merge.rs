//! The files of a batch job read and merged as streams, so that a job's
//! memory does not grow with its output: an output of a million 512-float
//! rows is 2 GB of vectors, and reading it, its parts and the merged result
//! whole took 14 GB.
//!
//! - [`open`] reads an output or a part in record batches (Parquet) or
//!   lines (JSON Lines), with or without the vectors.
//! - [`Kept`] is what `--resume` needs of earlier files: per URI, the
//!   newest file's identity, whether all its rows succeeded and in which
//!   space, without a vector.
//! - [`merge`] writes the output from the previous one and the parts,
//!   keeping each URI's rows of the newest file that has it, sorted by URI
//!   and segment start, as the whole-file merge did. Every file that is
//!   sorted (all that this version writes: the output and each part, whose
//!   rows are sorted before writing, and a job's todo is sorted so its parts
//!   follow each other) is streamed; files whose URI ranges follow each
//!   other are read one after the other as one sorted run, and the runs are
//!   merged by URI. So a job and its resumptions make a handful of runs,
//!   and memory holds a batch of each plus a row group of the output.
//!   A file that is not sorted (written by another tool or an earlier
//!   version) is read whole and sorted, as before.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow_array::{Array, RecordBatch, new_null_array};
use arrow_schema::{Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::inputs::{Identity, Version};
use crate::output::{Location, Output};
use crate::recipe::Recipe;
use crate::rows::{self, Format, Row};

/// Rows per record batch or group of lines read at once.
pub(crate) const READ_BATCH: usize = 2048;
/// Rows buffered before they are encoded into the output's row group.
pub(crate) const WRITE_BATCH: usize = 2048;
/// A row group of the output is closed once its encoded columns reach this
/// size: readers can then skip or stream whole groups, and the writer
/// holds no more than this.
pub(crate) const ROW_GROUP_BYTES: usize = 64 << 20;

/// The order of every output and part: URI, then segment start (images,
/// which have none, first).
pub(crate) fn key_cmp(a: &Row, b: &Row) -> Ordering {
    cmp_keys(
        (&a.uri, a.video_start_sec.unwrap_or(-1.0)),
        (&b.uri, b.video_start_sec.unwrap_or(-1.0)),
    )
}

/// [`key_cmp`] on a URI and a start (-1 for none).
fn cmp_keys(a: (&str, f64), b: (&str, f64)) -> Ordering {
    a.0.cmp(b.0).then(a.1.total_cmp(&b.1))
}

/// Whether the vectors are read too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Columns {
    All,
    /// Every column but `embedding` (read as null): what resuming needs.
    NoVectors,
}

/// An output or part being read: its rows in batches, in file order.
pub(crate) struct RowFile {
    batches: Box<dyn Iterator<Item = anyhow::Result<Vec<Row>>> + Send>,
    /// The settings a Parquet file records (none in JSON Lines).
    pub(crate) recipe: Option<Recipe>,
    /// How many rows it holds, where the file says (Parquet).
    pub(crate) rows: Option<usize>,
}

impl Iterator for RowFile {
    type Item = anyhow::Result<Vec<Row>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.batches.next()
    }
}

/// Opens a local output or part; `what` names it in errors.
pub(crate) fn open(
    path: &Path,
    format: Format,
    what: &str,
    columns: Columns,
) -> anyhow::Result<RowFile> {
    let file = File::open(path).with_context(|| format!("reading {what}"))?;
    let what = what.to_string();
    match format {
        Format::Jsonl => {
            let mut lines = BufReader::new(file).lines().enumerate();
            let batches = std::iter::from_fn(move || {
                let mut rows = Vec::new();
                for (i, line) in lines.by_ref() {
                    let parsed = line
                        .with_context(|| format!("reading {what}"))
                        .and_then(|line| {
                            if line.trim().is_empty() {
                                return Ok(None);
                            }
                            let mut row: Row = serde_json::from_str(&line)
                                .with_context(|| format!("{what}:{}: not an output row", i + 1))?;
                            if columns == Columns::NoVectors {
                                row.embedding = None;
                            }
                            Ok(Some(row))
                        });
                    match parsed {
                        Ok(Some(row)) => rows.push(row),
                        Ok(None) => {}
                        Err(e) => return Some(Err(e)),
                    }
                    if rows.len() == READ_BATCH {
                        break;
                    }
                }
                (!rows.is_empty()).then_some(Ok(rows))
            });
            Ok(RowFile {
                batches: Box::new(batches),
                recipe: None,
                rows: None,
            })
        }
        Format::Parquet => {
            let ctx = || format!("reading {what}");
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(ctx)?;
            let recipe = Recipe::of(builder.schema());
            let n = usize::try_from(builder.metadata().file_metadata().num_rows()).ok();
            let schema = builder.schema().clone();
            let vectors = schema.index_of("embedding").ok();
            let builder = match (columns, vectors) {
                (Columns::NoVectors, Some(v)) => {
                    let roots = (0..schema.fields().len()).filter(|&i| i != v);
                    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
                    builder.with_projection(mask)
                }
                _ => builder,
            };
            let field = vectors.map(|v| Arc::new(schema.field(v).clone()));
            let reader = builder
                .with_batch_size(READ_BATCH)
                .build()
                .with_context(ctx)?;
            let batches = reader.map(move |b| {
                let ctx = || format!("reading {what}");
                let mut b = b.with_context(ctx)?;
                if columns == Columns::NoVectors
                    && let Some(field) = &field
                {
                    b = with_null_column(&b, field).with_context(ctx)?;
                }
                rows::from_batch(&b).with_context(ctx)
            });
            Ok(RowFile {
                batches: Box::new(batches),
                recipe,
                rows: n,
            })
        }
    }
}

/// `b` with a column of nulls added: the vectors left unread, so that the
/// rows' reader finds the column it expects.
fn with_null_column(b: &RecordBatch, field: &Arc<Field>) -> anyhow::Result<RecordBatch> {
    let mut fields: Vec<Arc<Field>> = b.schema().fields().iter().cloned().collect();
    let mut cols = b.columns().to_vec();
    fields.push(field.clone());
    cols.push(new_null_array(field.data_type(), b.num_rows()));
    let schema = Schema::new_with_metadata(fields, b.schema().metadata().clone());
    Ok(RecordBatch::try_new(Arc::new(schema), cols)?)
}

/// An output or part of a job, named for errors; `rank` orders them (the
/// previous output 0, parts by number): of two files with rows of one URI,
/// the higher rank's rows are kept.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub(crate) rank: u64,
    pub(crate) path: PathBuf,
    pub(crate) what: String,
}

/// One URI of the earlier files, as resuming sees it.
#[derive(Debug, Clone)]
struct KeptUri {
    rank: u64,
    /// What resuming compares of its identity (64 bytes, no heap: the
    /// map holds one per URI of the earlier output).
    version: Version,
    rows: u32,
    /// Index into [`Kept::spaces`]: the model, space and dimension of its
    /// first row.
    space: u32,
    ok: bool,
}

/// What `--resume` needs of the earlier files, without their vectors.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    uris: HashMap<String, KeptUri>,
    spaces: Vec<(String, String, Option<i32>)>,
    space_index: HashMap<(String, String, Option<i32>), usize>,
    /// Carried columns of the earlier files, in the order first seen.
    pub(crate) carried: Vec<String>,
}

/// The URIs of earlier files that a listing lacks ([`Kept::outside`]).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Outside {
    /// Sorted.
    pub(crate) uris: Vec<String>,
    /// How many rows they have.
    pub(crate) rows: usize,
}

/// A model, space and dimension some kept vectors have, with how many rows
/// have it and the first URI (by URI order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpaceGroup<'a> {
    pub(crate) model: &'a str,
    pub(crate) space: &'a str,
    pub(crate) dimension: Option<i32>,
    pub(crate) rows: usize,
    pub(crate) first: &'a str,
}

impl Kept {
    /// Reads `sources` (local files) without vectors, refusing any that
    /// records other settings than `recipe`.
    pub(crate) fn read(
        sources: &[Source],
        format: Format,
        recipe: &Recipe,
    ) -> anyhow::Result<Self> {
        let mut kept = Self::default();
        // The map sized once where the files say how many rows they hold
        // (at least as many as URIs): a map that doubles holds both tables
        // while it grows. Each file is opened again below, not kept open:
        // a job may have thousands of parts.
        let mut rows = Some(0);
        for s in sources {
            let file = open(&s.path, format, &s.what, Columns::NoVectors)?;
            if let Some(earlier) = &file.recipe {
                recipe.check_resume(&s.what, earlier)?;
            }
            rows = rows.zip(file.rows).map(|(a, b)| a + b);
        }
        kept.uris.reserve(rows.unwrap_or(0));
        for s in sources {
            let file = open(&s.path, format, &s.what, Columns::NoVectors)?;
            for batch in file {
                for r in batch? {
                    kept.add(s.rank, &r);
                }
            }
        }
        Ok(kept)
    }

    /// Adds a row of the file ranked `rank`.
    pub(crate) fn add(&mut self, rank: u64, r: &Row) {
        for k in r.carried.keys() {
            if !self.carried.contains(k) {
                self.carried.push(k.clone());
            }
        }
        if let Some(k) = self.uris.get_mut(&r.uri) {
            match k.rank.cmp(&rank) {
                Ordering::Equal => {
                    k.ok &= r.ok();
                    k.rows = k.rows.saturating_add(1);
                    return;
                }
                // An older file's rows of a URI a newer one has.
                Ordering::Greater => return,
                Ordering::Less => {}
            }
        }
        let key = (r.model.clone(), r.space.clone(), r.dimension);
        let space = match self.space_index.get(&key) {
            Some(&i) => i,
            None => {
                self.spaces.push(key.clone());
                self.space_index.insert(key, self.spaces.len() - 1);
                self.spaces.len() - 1
            }
        };
        // A newer file's rows of a URI replace an older one's.
        let kept = KeptUri {
            rank,
            version: Version::of(&Identity {
                size: r.size_bytes,
                updated: r.updated,
                etag: r.etag.clone(),
                generation: r.generation.clone(),
            }),
            ok: r.ok(),
            rows: 1,
            space: space as u32,
        };
        match self.uris.get_mut(r.uri.as_str()) {
            Some(k) => *k = kept,
            None => {
                self.uris.insert(r.uri.clone(), kept);
            }
        }
    }

    /// The version the rows of `uri` recorded, if they all succeeded.
    pub(crate) fn done(&self, uri: &str) -> Option<&Version> {
        self.uris.get(uri).filter(|k| k.ok).map(|k| &k.version)
    }

    /// URIs of the earlier files that are not `listed` (objects deleted or
    /// renamed since, or rows of another input), sorted, and their rows.
    pub(crate) fn outside(&self, listed: impl Fn(&str) -> bool) -> Outside {
        let mut out = Outside::default();
        for (uri, k) in &self.uris {
            if !listed(uri) {
                out.uris.push(uri.clone());
                out.rows += k.rows as usize;
            }
        }
        out.uris.sort_unstable();
        out
    }

    /// The spaces of the vectors that stay (URIs that succeeded and that
    /// `stays` keeps), ordered by model, space and dimension.
    pub(crate) fn spaces_kept(&self, stays: impl Fn(&str) -> bool) -> Vec<SpaceGroup<'_>> {
        let mut groups: Vec<Option<SpaceGroup<'_>>> = vec![None; self.spaces.len()];
        for (uri, k) in &self.uris {
            if !k.ok || !stays(uri) {
                continue;
            }
            let (model, space, dimension) = &self.spaces[k.space as usize];
            let g = groups[k.space as usize].get_or_insert(SpaceGroup {
                model,
                space,
                dimension: *dimension,
                rows: 0,
                first: uri,
            });
            g.rows += k.rows as usize;
            if uri.as_str() < g.first {
                g.first = uri;
            }
        }
        let mut groups: Vec<SpaceGroup<'_>> = groups.into_iter().flatten().collect();
        groups
            .sort_by(|a, b| (a.model, a.space, a.dimension).cmp(&(b.model, b.space, b.dimension)));
        groups
    }
}

/// Where a source's URIs lie, and whether its rows are in order.
#[derive(Debug)]
struct Scanned {
    source: Source,
    first: String,
    last: String,
    sorted: bool,
}

/// The URI range of a file, and whether its rows are sorted, from its
/// `uri` and `video_start_sec` columns only (a Parquet projection; JSON
/// Lines are parsed whole, a batch at a time). `None` for a file with no
/// rows.
fn scan(s: &Source, format: Format) -> anyhow::Result<Option<Scanned>> {
    let keys: Box<dyn Iterator<Item = anyhow::Result<Vec<(String, f64)>>>> = match format {
        Format::Jsonl => Box::new(
            open(&s.path, format, &s.what, Columns::NoVectors)?.map(|b| {
                b.map(|rows| {
                    rows.into_iter()
                        .map(|r| (r.uri, r.video_start_sec.unwrap_or(-1.0)))
                        .collect()
                })
            }),
        ),
        Format::Parquet => {
            let what = s.what.clone();
            let ctx = move || format!("reading {what}");
            let file = File::open(&s.path).with_context(ctx.clone())?;
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(file).with_context(ctx.clone())?;
            let schema = builder.schema().clone();
            let roots = ["uri", "video_start_sec"]
                .iter()
                .map(|c| schema.index_of(c).with_context(ctx.clone()))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            let reader = builder
                .with_projection(mask)
                .with_batch_size(8192)
                .build()
                .with_context(ctx.clone())?;
            Box::new(reader.map(move |b| {
                let b = b.with_context(ctx.clone())?;
                let uri = b
                    .column_by_name("uri")
                    .and_then(|c| c.as_any().downcast_ref::<arrow_array::StringArray>())
                    .with_context(|| format!("{}: `uri` is not a string column", ctx()))?;
                let start = b
                    .column_by_name("video_start_sec")
                    .and_then(|c| c.as_any().downcast_ref::<arrow_array::Float64Array>())
                    .with_context(|| format!("{}: `video_start_sec` is not float64", ctx()))?;
                Ok((0..b.num_rows())
                    .map(|i| {
                        let t = if start.is_valid(i) {
                            start.value(i)
                        } else {
                            -1.0
                        };
                        (uri.value(i).to_string(), t)
                    })
                    .collect())
            }))
        }
    };
    let mut out: Option<Scanned> = None;
    let mut prev: Option<(String, f64)> = None;
    for batch in keys {
        for (uri, start) in batch? {
            let o = out.get_or_insert_with(|| Scanned {
                source: s.clone(),
                first: uri.clone(),
                last: uri.clone(),
                sorted: true,
            });
            if let Some((pu, ps)) = &prev
                && cmp_keys((pu, *ps), (&uri, start)) == Ordering::Greater
            {
                o.sorted = false;
            }
            if uri < o.first {
                o.first.clone_from(&uri);
            }
            if uri > o.last {
                o.last.clone_from(&uri);
            }
            prev = Some((uri, start));
        }
    }
    Ok(out)
}

/// Rows of one source in key order: streamed when the file is sorted,
/// else read whole and sorted.
fn sorted_rows(
    s: &Scanned,
    format: Format,
) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<Row>> + Send>> {
    let file = open(&s.source.path, format, &s.source.what, Columns::All)?;
    if s.sorted {
        return Ok(Box::new(file.flat_map(|b| match b {
            Ok(rows) => Box::new(rows.into_iter().map(Ok)) as Box<dyn Iterator<Item = _> + Send>,
            Err(e) => Box::new(std::iter::once(Err(e))),
        })));
    }
    let mut rows = vec![];
    for b in file {
        rows.extend(b?);
    }
    rows.sort_by(key_cmp);
    Ok(Box::new(rows.into_iter().map(Ok)))
}

/// Sources whose URI ranges follow each other, read one after the other.
struct Run {
    sources: VecDeque<Scanned>,
    rows: Option<Box<dyn Iterator<Item = anyhow::Result<Row>> + Send>>,
    /// The rank of the source the head row came from.
    rank: u64,
    head: Option<Row>,
    /// The key of the row before the head.
    last: Option<(String, f64)>,
}

impl Run {
    fn new(first: Scanned) -> Self {
        Self {
            sources: VecDeque::from([first]),
            rows: None,
            rank: 0,
            head: None,
            last: None,
        }
    }

    /// Moves to the next row, checking that the run stays in order (a
    /// file changed since it was scanned would otherwise be merged wrong
    /// without a word).
    fn advance(&mut self, format: Format) -> anyhow::Result<()> {
        if let Some(h) = self.head.take() {
            self.last = Some((h.uri, h.video_start_sec.unwrap_or(-1.0)));
        }
        loop {
            if let Some(rows) = &mut self.rows
                && let Some(r) = rows.next()
            {
                let r = r?;
                if let Some((uri, start)) = &self.last
                    && cmp_keys((uri, *start), (&r.uri, r.video_start_sec.unwrap_or(-1.0)))
                        == Ordering::Greater
                {
                    bail!(
                        "the rows of {} went out of order at {} (did it change during the merge?)",
                        self.sources
                            .front()
                            .map_or("a part", |s| s.source.what.as_str()),
                        r.uri
                    );
                }
                self.head = Some(r);
                return Ok(());
            }
            let Some(s) = self.sources.front() else {
                self.rows = None;
                return Ok(());
            };
            if self.rows.is_some() {
                // The source just read is done; the next one opens.
                self.sources.pop_front();
                self.rows = None;
                continue;
            }
            self.rank = s.source.rank;
            self.rows = Some(sorted_rows(s, format)?);
        }
    }

    /// Takes the head row and moves on.
    fn take(&mut self, format: Format) -> anyhow::Result<Option<Row>> {
        let Some(h) = self.head.take() else {
            return Ok(None);
        };
        self.last = Some((h.uri.clone(), h.video_start_sec.unwrap_or(-1.0)));
        self.advance(format)?;
        Ok(Some(h))
    }
}

/// Rows with a vector and rows with a status in a written output.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) ok: usize,
    pub(crate) failed: usize,
}

/// Whether `uri` is one of `uris` (sorted).
pub(crate) fn among(uris: &[String], uri: &str) -> bool {
    uris.binary_search_by(|u| u.as_str().cmp(uri)).is_ok()
}

/// Writes the merge of `sources` (local files, any order) to the new file
/// `dest`, streamed, and flushes it to disk: for each URI the rows of the
/// highest-ranked source that has it, sorted by URI and segment start,
/// but none of the URIs in `dropped` (sorted).
pub(crate) fn merge(
    sources: Vec<Source>,
    format: Format,
    dest: &Path,
    carried: &[String],
    recipe: &Recipe,
    dropped: &[String],
) -> anyhow::Result<Counts> {
    let mut scanned = vec![];
    for s in sources {
        scanned.extend(scan(&s, format)?);
    }
    scanned.sort_by_key(|s| s.source.rank);
    // Files written by earlier versions (or other tools) may not be
    // sorted; they are read whole, which for a large output costs memory.
    let unsorted: Vec<&str> = scanned
        .iter()
        .filter(|s| !s.sorted)
        .map(|s| s.source.what.as_str())
        .collect();
    if let Some(first) = unsorted.first() {
        tracing::warn!(
            files = unsorted.len(),
            first,
            "files whose rows are not sorted by URI (written by an earlier version or another tool) \
             are read whole to merge them"
        );
    }
    // Each source joins the first run it can follow (all its URIs after
    // the run's last). A job's parts make one run, a resumption another.
    let mut runs: Vec<Run> = vec![];
    for s in scanned {
        match runs
            .iter_mut()
            .find(|r| r.sources.back().is_some_and(|l| l.last < s.first))
        {
            Some(r) => r.sources.push_back(s),
            None => runs.push(Run::new(s)),
        }
    }
    if runs.len() > 16 {
        tracing::info!(
            runs = runs.len(),
            "merging many overlapping runs of parts (written by an earlier version?)"
        );
    }
    let mut out = StreamWriter::create(
        dest,
        format,
        Vectors {
            carried: carried.to_vec(),
            recipe: recipe.clone(),
        },
    )?;
    let mut heap = BinaryHeap::new();
    for (i, r) in runs.iter_mut().enumerate() {
        r.advance(format)?;
        if let Some(h) = &r.head {
            heap.push(Reverse((h.uri.clone(), i)));
        }
    }
    let mut members = vec![];
    while let Some(Reverse((uri, i))) = heap.pop() {
        members.clear();
        members.push(i);
        while heap.peek().is_some_and(|Reverse((u, _))| *u == uri) {
            if let Some(Reverse((_, j))) = heap.pop() {
                members.push(j);
            }
        }
        // The run whose rows of `uri` are written: the newest, unless the
        // URI is dropped (then every run's rows are skipped).
        let written = (!among(dropped, &uri))
            .then(|| members.iter().copied().max_by_key(|&j| runs[j].rank))
            .flatten();
        for &j in &members {
            let run = &mut runs[j];
            while run.head.as_ref().is_some_and(|h| h.uri == uri) {
                if let Some(row) = run.take(format)?
                    && written == Some(j)
                {
                    out.push(row)?;
                }
            }
            if let Some(h) = &run.head {
                heap.push(Reverse((h.uri.clone(), j)));
            }
        }
    }
    out.finish()
}

/// How a job's rows go into a file: record batches of a schema (Parquet)
/// or lines (JSON Lines), and which rows count as failed.
pub(crate) trait Encoding {
    type Row;
    /// The schema of the Parquet file.
    fn schema(&self) -> anyhow::Result<SchemaRef>;
    /// Rows as one record batch of that schema.
    fn batch(&self, rows: &[Self::Row]) -> anyhow::Result<RecordBatch>;
    /// Rows as JSON Lines.
    fn lines(&self, out: &mut BufWriter<File>, rows: &[Self::Row]) -> anyhow::Result<()>;
    /// Whether a row succeeded (its status is empty).
    fn ok(row: &Self::Row) -> bool;
}

/// A batch job's rows: vectors, carried columns and the recipe.
pub(crate) struct Vectors {
    pub(crate) carried: Vec<String>,
    pub(crate) recipe: Recipe,
}

impl Encoding for Vectors {
    type Row = Row;

    fn schema(&self) -> anyhow::Result<SchemaRef> {
        Ok(rows::to_batch(&[], &self.carried, &self.recipe)?.schema())
    }

    fn batch(&self, rows: &[Row]) -> anyhow::Result<RecordBatch> {
        rows::to_batch(rows, &self.carried, &self.recipe)
    }

    fn lines(&self, out: &mut BufWriter<File>, rows: &[Row]) -> anyhow::Result<()> {
        for r in rows {
            serde_json::to_writer(&mut *out, r)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    fn ok(row: &Row) -> bool {
        row.ok()
    }
}

/// An output written as a stream: rows go out in record batches, row
/// groups close at [`ROW_GROUP_BYTES`].
pub(crate) struct StreamWriter<E: Encoding> {
    sink: Sink,
    encoding: E,
    pending: Vec<E::Row>,
    counts: Counts,
}

enum Sink {
    Parquet(Box<ArrowWriter<BufWriter<File>>>),
    Jsonl(BufWriter<File>),
}

impl<E: Encoding> StreamWriter<E> {
    /// Creates `path` (replacing a file there).
    pub(crate) fn create(path: &Path, format: Format, encoding: E) -> anyhow::Result<Self> {
        let file = BufWriter::with_capacity(
            1 << 20,
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        let sink = match format {
            Format::Jsonl => Sink::Jsonl(file),
            Format::Parquet => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .build();
                Sink::Parquet(Box::new(ArrowWriter::try_new(
                    file,
                    encoding.schema()?,
                    Some(props),
                )?))
            }
        };
        Ok(Self {
            sink,
            encoding,
            pending: Vec::with_capacity(WRITE_BATCH),
            counts: Counts::default(),
        })
    }

    pub(crate) fn push(&mut self, row: E::Row) -> anyhow::Result<()> {
        if E::ok(&row) {
            self.counts.ok += 1;
        } else {
            self.counts.failed += 1;
        }
        self.pending.push(row);
        if self.pending.len() >= WRITE_BATCH {
            self.write_pending()?;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        match &mut self.sink {
            Sink::Parquet(w) => {
                w.write(&self.encoding.batch(&self.pending)?)?;
                if w.in_progress_size() >= ROW_GROUP_BYTES {
                    w.flush()?;
                }
            }
            Sink::Jsonl(w) => self.encoding.lines(w, &self.pending)?,
        }
        self.pending.clear();
        Ok(())
    }

    /// Writes what is left, closes the file and flushes it to disk.
    pub(crate) fn finish(mut self) -> anyhow::Result<Counts> {
        self.write_pending()?;
        let file = match self.sink {
            Sink::Parquet(w) => w.into_inner()?,
            Sink::Jsonl(w) => w,
        };
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(self.counts)
    }
}

/// Writes the output of a job from its merge: `merge` streams the merged
/// rows into a new file beside a local output (or in the staging folder
/// for a bucket) and flushes it; the file is then renamed over the output
/// (or uploaded) and the parts are removed. A merge that fails leaves no
/// file behind.
pub(crate) async fn write_merged(
    out: &Output,
    staging: &mut Staging,
    merge: impl FnOnce(&Path) -> anyhow::Result<Counts> + Send + 'static,
) -> anyhow::Result<Counts> {
    let dest = match &out.path {
        Location::Local(p) => rows::temporary_beside(p)?,
        Location::Remote(_) => staging.file("merged")?,
    };
    let target = dest.clone();
    let counts = tokio::task::spawn_blocking(move || merge(&target)).await?;
    let counts = match counts {
        Ok(c) => c,
        Err(e) => {
            std::fs::remove_file(&dest).ok();
            return Err(e);
        }
    };
    out.path
        .upload(&dest, out.format.content_type())
        .await
        .with_context(|| format!("writing {}", out.path.display()))?;
    out.remove_parts().await?;
    Ok(counts)
}

/// The staging folders' names: this, the process id, `-` and a random tail.
const STAGING: &str = "mmembed-merge-";

/// Removes the staging folders in `base` of processes that no longer run
/// on this machine (a job killed with `kill -9` leaves its copies behind).
/// Where `/proc` cannot tell, nothing is removed.
fn clear_stale(base: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(STAGING))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => tracing::info!(
                folder = %e.path().display(),
                "removed the merge folder of a job that no longer runs"
            ),
            Err(err) => {
                tracing::debug!(folder = %e.path().display(), %err, "cannot remove a stale merge folder")
            }
        }
    }
}

/// The previous output (rank 0) and the parts (ranked by number), as
/// local files.
pub(crate) async fn sources(out: &Output, staging: &mut Staging) -> anyhow::Result<Vec<Source>> {
    let mut sources = vec![];
    if out.path.exists().await? {
        sources.push(Source {
            rank: 0,
            path: staging.local(&out.path).await?,
            what: out.path.display(),
        });
    }
    for (n, p) in out.part_files().await? {
        sources.push(Source {
            rank: n,
            path: staging.local(&p).await?,
            what: p.display(),
        });
    }
    Ok(sources)
}

/// Local copies of a bucket output's files, downloaded as streams, for the
/// merge to read in batches (our store layer has no ranged reads for a
/// Parquet footer and its row groups; a local copy serves them). Local
/// outputs are read where they are.
pub(crate) struct Staging {
    dir: Option<tempfile::TempDir>,
    copies: HashMap<String, PathBuf>,
}

impl Staging {
    pub(crate) fn new() -> Self {
        Self {
            dir: None,
            copies: HashMap::new(),
        }
    }

    fn dir(&mut self) -> anyhow::Result<&Path> {
        if self.dir.is_none() {
            let base = std::env::temp_dir();
            clear_stale(&base);
            self.dir = Some(
                tempfile::Builder::new()
                    .prefix(&format!("{STAGING}{}-", std::process::id()))
                    .tempdir_in(&base)
                    .context("creating a temporary folder for the merge (TMPDIR)")?,
            );
        }
        Ok(self
            .dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new(".")))
    }

    /// A new file in the staging folder.
    pub(crate) fn file(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.dir()?.join(name))
    }

    /// The local path of `loc`: itself, or a copy of the object (made
    /// once).
    pub(crate) async fn local(&mut self, loc: &Location) -> anyhow::Result<PathBuf> {
        match loc {
            Location::Local(p) => Ok(p.clone()),
            Location::Remote(u) => {
                if let Some(p) = self.copies.get(u) {
                    return Ok(p.clone());
                }
                let n = self.copies.len();
                let path = self.dir()?.join(format!("{n:06}"));
                mmembed_store::Stores::shared().download(u, &path).await?;
                self.copies.insert(u.clone(), path.clone());
                Ok(path)
            }
        }
    }

    /// Keeps a copy of the bytes just written to `loc` (a bucket part), so
    /// the merge does not download them again.
    pub(crate) fn keep(&mut self, loc: &Location, bytes: &[u8]) -> anyhow::Result<()> {
        let Location::Remote(u) = loc else {
            return Ok(());
        };
        let n = self.copies.len();
        let path = self.dir()?.join(format!("{n:06}"));
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        self.copies.insert(u.clone(), path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    fn row(uri: &str, start: Option<f64>, status: &str, tag: f32) -> Row {
        Row {
            uri: uri.into(),
            content_type: "image/png".into(),
            size_bytes: Some(7),
            generation: Some(format!("g{tag}")),
            etag: None,
            updated: None,
            embedding: status.is_empty().then(|| vec![tag, 0.5]),
            status: status.into(),
            video_start_sec: start,
            video_end_sec: start.map(|s| s + 1.0),
            model: "m".into(),
            space: "s".into(),
            dimension: Some(2),
            carried: Map::new(),
        }
    }

    /// The version `row` records with generation `generation`.
    fn version(generation: &str) -> Version {
        Version::of(&Identity {
            size: Some(7),
            generation: Some(generation.into()),
            ..Identity::default()
        })
    }

    fn write(dir: &Path, name: &str, format: Format, rows: &[Row], carried: &[String]) -> PathBuf {
        let p = dir.join(name);
        let bytes = rows::encode(format, rows, carried, &Recipe::default()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn read_all(p: &Path, format: Format, columns: Columns) -> Vec<Row> {
        let mut out = vec![];
        for b in open(p, format, "f", columns).unwrap() {
            out.extend(b.unwrap());
        }
        out
    }

    /// The merge written out plainly: for each URI the rows of the
    /// highest-ranked source that has it, then a stable sort.
    fn reference(sources: &[(u64, Vec<Row>)]) -> Vec<Row> {
        let mut newest: HashMap<&str, u64> = HashMap::new();
        for (rank, rows) in sources {
            for r in rows {
                let n = newest.entry(&r.uri).or_insert(*rank);
                *n = (*n).max(*rank);
            }
        }
        let mut out: Vec<Row> = sources
            .iter()
            .flat_map(|(rank, rows)| rows.iter().filter(|r| newest[r.uri.as_str()] == *rank))
            .cloned()
            .collect();
        out.sort_by(key_cmp);
        out
    }

    /// `sources` written as files in `dir`.
    fn written(
        dir: &Path,
        format: Format,
        sources: &[(u64, Vec<Row>)],
        carried: &[String],
    ) -> Vec<Source> {
        sources
            .iter()
            .map(|(rank, rows)| Source {
                rank: *rank,
                path: write(
                    dir,
                    &format!("s{rank}.{}", format.ext()),
                    format,
                    rows,
                    carried,
                ),
                what: format!("s{rank}"),
            })
            .collect()
    }

    fn merged(
        dir: &Path,
        format: Format,
        sources: &[(u64, Vec<Row>)],
        carried: &[String],
        dropped: &[String],
    ) -> (Vec<Row>, Counts) {
        let files = written(dir, format, sources, carried);
        let dest = dir.join(format!("out.{}", format.ext()));
        let counts = merge(files, format, &dest, carried, &Recipe::default(), dropped).unwrap();
        (read_all(&dest, format, Columns::All), counts)
    }

    #[test]
    fn merge_keeps_the_newest_rows_of_each_uri() {
        for format in [Format::Parquet, Format::Jsonl] {
            let d = tempfile::tempdir().unwrap();
            let old = vec![
                row("a.png", None, "", 0.0),
                row("v.mp4", Some(0.0), "", 0.0),
                row("v.mp4", Some(1.0), "corrupt", 0.0),
            ];
            // A retry written out of order, and a new object.
            let retry = vec![
                row("v.mp4", Some(1.0), "", 1.0),
                row("v.mp4", Some(0.0), "", 1.0),
            ];
            let new = vec![row("b.png", None, "", 2.0)];
            let sources = [(0, old), (1, retry), (2, new)];
            let (got, counts) = merged(d.path(), format, &sources, &[], &[]);
            assert_eq!(got, reference(&sources), "{format:?}");
            let uris: Vec<_> = got
                .iter()
                .map(|r| (r.uri.as_str(), r.video_start_sec))
                .collect();
            assert_eq!(
                uris,
                [
                    ("a.png", None),
                    ("b.png", None),
                    ("v.mp4", Some(0.0)),
                    ("v.mp4", Some(1.0))
                ]
            );
            assert!(
                got[2..]
                    .iter()
                    .all(|r| r.embedding.as_ref().unwrap()[0] == 1.0)
            );
            assert_eq!(counts, Counts { ok: 4, failed: 0 });
        }
    }

    #[test]
    fn merge_matches_the_plain_merge_on_random_jobs() {
        let mut rng = fastrand::Rng::with_seed(7);
        for case in 0..60 {
            let format = if case % 3 == 0 {
                Format::Jsonl
            } else {
                Format::Parquet
            };
            let d = tempfile::tempdir().unwrap();
            let carried = vec!["label".to_string()];
            let pool = rng.usize(1..40);
            // URI number `u` (a video every third).
            let name = |u: usize| {
                format!(
                    "gs://b/{u:03}.{}",
                    if u.is_multiple_of(3) { "mp4" } else { "png" }
                )
            };
            let mut sources = vec![];
            let mut rank = 0;
            for _ in 0..rng.usize(0..7) {
                // Some sources follow each other (a job's parts), some
                // overlap (a resumption, a retry), some are empty.
                let (lo, hi) = if rng.bool() {
                    let lo = rng.usize(0..pool);
                    (lo, rng.usize(lo..=pool))
                } else {
                    (0, pool)
                };
                let mut rows = vec![];
                for u in lo..hi {
                    if rng.u8(..) < 100 {
                        continue;
                    }
                    let uri = name(u);
                    let status = if rng.u8(..) < 40 { "cannot decode" } else { "" };
                    let tag = rank as f32 + u as f32 / 100.0;
                    if u % 3 == 0 {
                        for s in 0..rng.usize(1..4) {
                            rows.push(row(&uri, Some(s as f64 * 2.0), status, tag));
                        }
                    } else {
                        let mut r = row(&uri, None, status, tag);
                        if rng.bool() {
                            r.carried
                                .insert("label".into(), Value::String(format!("l{u}")));
                        }
                        rows.push(r);
                    }
                }
                if rng.bool() {
                    rng.shuffle(&mut rows);
                }
                sources.push((rank, rows));
                rank += rng.u64(1..3);
            }
            rng.shuffle(&mut sources);
            // A listing of part of the URIs (and of some no source has);
            // half the cases prune the others, the rest keep them.
            let listing: Vec<String> = (0..pool + 3)
                .filter(|_| rng.u8(..) < 200)
                .map(name)
                .collect();
            let prune = rng.bool();
            let mut dropped: Vec<String> = (0..pool + 3)
                .map(name)
                .filter(|u| prune && !listing.contains(u))
                .collect();
            dropped.sort();
            let (got, counts) = merged(d.path(), format, &sources, &carried, &dropped);
            let mut want = reference(&sources);
            let everything = want.len();
            if prune {
                want.retain(|r| listing.contains(&r.uri));
            }
            assert_eq!(got, want, "case {case}");
            // What resuming says of the URIs the listing lacks.
            let kept = Kept::read(
                &written(d.path(), format, &sources, &carried),
                format,
                &Recipe::default(),
            )
            .unwrap();
            let all = reference(&sources);
            let outside: Vec<&Row> = all.iter().filter(|r| !listing.contains(&r.uri)).collect();
            let mut uris: Vec<String> = outside.iter().map(|r| r.uri.clone()).collect();
            uris.sort();
            uris.dedup();
            assert_eq!(
                kept.outside(|u| listing.iter().any(|l| l == u)),
                Outside {
                    uris,
                    rows: outside.len()
                },
                "case {case}"
            );
            assert_eq!(all.len(), everything);
            let failed = want.iter().filter(|r| !r.ok()).count();
            assert_eq!(
                counts,
                Counts {
                    ok: want.len() - failed,
                    failed
                },
                "case {case}"
            );
        }
    }

    #[test]
    fn resuming_reads_no_vectors_and_keeps_the_newest_file() {
        let d = tempfile::tempdir().unwrap();
        let format = Format::Parquet;
        let mut labelled = row("c.png", None, "", 0.0);
        labelled
            .carried
            .insert("label".into(), Value::String("cat".into()));
        let old = vec![
            row("a.png", None, "cannot decode", 0.0),
            row("b.png", None, "", 0.0),
            labelled,
        ];
        let retry = vec![
            row("a.png", None, "", 3.0),
            row("b.png", None, "timeout", 3.0),
        ];
        let sources = vec![
            Source {
                rank: 0,
                path: write(d.path(), "o.parquet", format, &old, &["label".into()]),
                what: "o".into(),
            },
            Source {
                rank: 3,
                path: write(d.path(), "p.parquet", format, &retry, &[]),
                what: "p".into(),
            },
        ];
        let rows = read_all(&sources[0].path, format, Columns::NoVectors);
        assert!(rows.iter().all(|r| r.embedding.is_none()));
        assert_eq!(rows.len(), 3);
        let kept = Kept::read(&sources, format, &Recipe::default()).unwrap();
        let done: Vec<_> = ["a.png", "b.png", "c.png"]
            .into_iter()
            .map(|u| kept.done(u).copied())
            .collect();
        // a.png's retry succeeded; b.png's failed, so it is done no more.
        assert_eq!(done, [Some(version("g3")), None, Some(version("g0"))]);
        assert_eq!(kept.carried, ["label"]);
        let groups = kept.spaces_kept(|u| u != "c.png");
        assert_eq!(
            groups,
            [SpaceGroup {
                model: "m",
                space: "s",
                dimension: Some(2),
                rows: 1,
                first: "a.png"
            }]
        );
        // A file made with other settings is refused, naming it.
        let other = Recipe::default().with("jpeg_draft", true);
        let bytes = rows::encode(format, &old, &[], &other).unwrap();
        std::fs::write(&sources[0].path, bytes).unwrap();
        let e = Kept::read(
            &sources,
            format,
            &Recipe::default().with("jpeg_draft", false),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains('o'), "{e}");
    }

    #[test]
    fn kept_takes_the_newest_file_whatever_the_order_read() {
        let (failed, retried) = (row("a.png", None, "x", 0.0), row("a.png", None, "", 5.0));
        for order in [[(0, &failed), (5, &retried)], [(5, &retried), (0, &failed)]] {
            let mut kept = Kept::default();
            for (rank, r) in order {
                kept.add(rank, r);
            }
            assert_eq!(kept.done("a.png"), Some(&version("g5")));
        }
    }

    #[test]
    fn stale_staging_folders_of_dead_processes_are_removed() {
        let base = tempfile::tempdir().unwrap();
        let mine = base
            .path()
            .join(format!("{STAGING}{}-abc", std::process::id()));
        // Above Linux's largest process id (2^22): never a running process.
        let dead = base.path().join(format!("{STAGING}999999999-xyz"));
        let other = base.path().join("mmembed-merge-notapid-1");
        for d in [&mine, &dead, &other] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
            std::fs::write(d.join("sub/f"), b"x").unwrap();
        }
        clear_stale(base.path());
        assert!(mine.exists() && other.exists());
        assert_eq!(dead.exists(), !Path::new("/proc/self").exists());
    }
}
