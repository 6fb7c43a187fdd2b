//! The files of a row job (`generate`, `classify`, `score`) read and
//! merged as streams, so that a job's memory does not grow with its
//! output: a million rows of generated text (33 MB of Parquet) read whole,
//! kept in a map and encoded whole took 5.4 GB.
//!
//! A row job's output holds each distinct input row's output rows (one, or
//! a video's segments) at that input row's place in the input. What the
//! job keeps in memory is an [`Index`]: per distinct input row (by its key,
//! a hash of its values), its place, the newest file that has rows of it
//! and whether those rows failed for a reason a rerun might not repeat.
//!
//! - [`scan`] fills the index from the earlier output and parts (for
//!   `--resume`): a Parquet projection of the input columns and `status`,
//!   or JSON Lines a batch of lines at a time; it also notes each file's
//!   range of places and whether its rows are in input order.
//! - [`merge`] writes the output: each key's rows of its newest file, in
//!   input order. Files in input order (every part, and an output whose
//!   input kept its order) are streamed; files whose ranges follow each
//!   other are read one after the other as one run, and the runs are merged
//!   by place. A file out of input order (the input was reordered since it
//!   was written) is read whole, as before.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::Path;

use anyhow::{Context, bail};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use mmembed::generate::RETRYABLE_PREFIX;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

use crate::merge::{Counts, Encoding, READ_BATCH, Source, StreamWriter};
use crate::recipe::Recipe;
use crate::rows::Format;
use crate::table::{self, Row};

/// The identity of an input row: the first 128 bits of a hash of its
/// values in column order (`--shard` slices by its 32 hex digits).
pub(crate) type Key = u128;

/// The [`Key`] of `row` over `columns`.
pub(crate) fn key_of(columns: &[String], row: &Row) -> Key {
    let values: Vec<&Value> = columns
        .iter()
        .map(|c| row.get(c).unwrap_or(&Value::Null))
        .collect();
    let text = serde_json::to_string(&values).unwrap_or_default();
    let mut b = [0u8; 16];
    b.copy_from_slice(&blake3::hash(text.as_bytes()).as_bytes()[..16]);
    Key::from_be_bytes(b)
}

/// The status of an output row ("" when it succeeded).
pub(crate) fn status(r: &Row) -> &str {
    r.get("status").and_then(Value::as_str).unwrap_or("")
}

/// No file has rows of this key.
const NONE: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
struct Entry {
    place: u64,
    /// The rank of the newest file with rows of this key, or [`NONE`].
    rank: u64,
    /// Whether one of those rows failed with a retryable error.
    retry: bool,
}

/// Per distinct input row of this job: its place and its newest rows.
#[derive(Debug)]
pub(crate) struct Index {
    columns: Vec<String>,
    map: HashMap<Key, Entry>,
}

impl Index {
    /// An empty index of rows over `columns`, with room for `rows`.
    pub(crate) fn new(columns: Vec<String>, rows: usize) -> Self {
        Self {
            columns,
            map: HashMap::with_capacity(rows),
        }
    }

    /// Adds an input row at `place`; false when its key is there already
    /// (the row repeats an earlier one).
    pub(crate) fn insert(&mut self, key: Key, place: u64) -> bool {
        use std::collections::hash_map::Entry as E;
        match self.map.entry(key) {
            E::Occupied(_) => false,
            E::Vacant(v) => {
                v.insert(Entry {
                    place,
                    rank: NONE,
                    retry: false,
                });
                true
            }
        }
    }

    /// Records rows of `key` in the file ranked `rank`, read in rank order:
    /// a newer file's rows replace an older one's. The place of the key,
    /// or `None` for a row that is not this job's.
    fn saw(&mut self, key: Key, rank: u64, retry: bool) -> Option<u64> {
        let e = self.map.get_mut(&key)?;
        if e.rank != rank {
            e.rank = rank;
            e.retry = false;
        }
        e.retry |= retry;
        Some(e.place)
    }

    /// Records the rows just written for `key` in the part ranked `rank`.
    pub(crate) fn wrote(&mut self, key: Key, rank: u64, rows: &[Row]) {
        let retry = rows.iter().any(|r| status(r).starts_with(RETRYABLE_PREFIX));
        self.saw(key, rank, retry);
    }

    /// Whether the row of `key` is to be run: no file has its rows, or
    /// one of them failed with a retryable error.
    pub(crate) fn to_run(&self, key: Key) -> bool {
        self.map.get(&key).is_none_or(|e| e.rank == NONE || e.retry)
    }

    /// The place of `row` in the output when the file ranked `rank` holds
    /// its newest rows; `None` when another file does or the row is not
    /// this job's.
    fn winner(&self, row: &Row, rank: u64) -> Option<u64> {
        let e = self.map.get(&key_of(&self.columns, row))?;
        (e.rank == rank).then_some(e.place)
    }
}

/// A file of the job: where its rows lie in the input order and whether
/// they are in that order.
#[derive(Debug, Clone)]
pub(crate) struct Placed {
    pub(crate) source: Source,
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) sorted: bool,
}

/// Rows of an output or part in batches, in file order.
type Batches = Box<dyn Iterator<Item = anyhow::Result<Vec<Row>>> + Send>;

fn other_columns(what: &str, got: &[String], expect: &[String]) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} was written with other columns ({}) than this job makes ({}): the input, the \
         prompt's schema or the command changed. Write to a new output or pass --overwrite",
        got.join(", "),
        expect.join(", ")
    )
}

/// Opens a local output or part of the job, refusing one with other
/// columns than `expect` or other settings than `recipe`; `only` reads
/// those columns alone (Parquet; JSON Lines rows are parsed whole).
pub(crate) fn open(
    path: &Path,
    format: Format,
    what: &str,
    expect: &[String],
    recipe: &Recipe,
    only: Option<&[String]>,
) -> anyhow::Result<Batches> {
    let file = File::open(path).with_context(|| format!("reading {what}"))?;
    let what = what.to_string();
    match format {
        Format::Jsonl => {
            let expect = expect.to_vec();
            let mut lines = BufReader::new(file).lines().enumerate();
            Ok(Box::new(std::iter::from_fn(move || {
                let mut rows = Vec::new();
                for (i, line) in lines.by_ref() {
                    let line = match line.with_context(|| format!("reading {what}")) {
                        Ok(l) => l,
                        Err(e) => return Some(Err(e)),
                    };
                    let row = match table::jsonl_row(&line, &what, i + 1) {
                        None => continue,
                        Some(Ok(row)) => row,
                        Some(Err(e)) => return Some(Err(e)),
                    };
                    // Every row written has every column (NULL as null).
                    if row.len() != expect.len() || !expect.iter().all(|c| row.contains_key(c)) {
                        let got: Vec<String> = row.keys().cloned().collect();
                        return Some(Err(other_columns(&what, &got, &expect)));
                    }
                    rows.push(row);
                    if rows.len() == READ_BATCH {
                        break;
                    }
                }
                (!rows.is_empty()).then_some(Ok(rows))
            })))
        }
        Format::Parquet => {
            let ctx = || format!("reading {what}");
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(ctx)?;
            let schema = builder.schema().clone();
            if let Some(earlier) = Recipe::of(&schema) {
                recipe.check_resume(&what, &earlier)?;
            }
            let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
            let (mut got, mut want) = (names.clone(), expect.to_vec());
            got.sort();
            want.sort();
            if builder.metadata().file_metadata().num_rows() > 0 && got != want {
                return Err(other_columns(&what, &names, expect));
            }
            let builder = match only {
                Some(cols) => {
                    let roots = cols.iter().filter_map(|c| schema.index_of(c).ok());
                    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
                    builder.with_projection(mask)
                }
                None => builder,
            };
            let reader = builder
                .with_batch_size(READ_BATCH)
                .build()
                .with_context(ctx)?;
            Ok(Box::new(reader.map(move |b| {
                let ctx = || format!("reading {what}");
                table::from_batch(&b.with_context(ctx)?).with_context(ctx)
            })))
        }
    }
}

/// Reads the earlier files of the job (local, in any order) into `index`:
/// which file holds each key's newest rows and whether they are to be run
/// again. Returns the files that hold rows of this job, with their places,
/// and how many distinct input rows the files have rows of that are not
/// this job's (the input changed since; the merge leaves them out).
pub(crate) fn scan(
    mut sources: Vec<Source>,
    format: Format,
    expect: &[String],
    recipe: &Recipe,
    index: &mut Index,
) -> anyhow::Result<(Vec<Placed>, usize)> {
    sources.sort_by_key(|s| s.rank);
    let mut only = index.columns.clone();
    only.push("status".into());
    let mut placed = vec![];
    let mut outside = HashSet::new();
    for s in sources {
        let mut p: Option<Placed> = None;
        for batch in open(&s.path, format, &s.what, expect, recipe, Some(&only))? {
            for row in batch? {
                let key = key_of(&index.columns, &row);
                let retry = status(&row).starts_with(RETRYABLE_PREFIX);
                let Some(place) = index.saw(key, s.rank, retry) else {
                    outside.insert(key);
                    continue;
                };
                let p = p.get_or_insert_with(|| Placed {
                    source: s.clone(),
                    first: place,
                    last: place,
                    sorted: true,
                });
                // Input order: a key's rows together, keys in input order.
                p.sorted &= place >= p.last;
                p.first = p.first.min(place);
                p.last = p.last.max(place);
            }
        }
        placed.extend(p);
    }
    Ok((placed, outside.len()))
}

/// A placed file opened again, every column, to merge it (its recipe was
/// checked when it was scanned, or it is this run's part).
fn reopen(p: &Placed, format: Format, expect: &[String]) -> anyhow::Result<Batches> {
    let s = &p.source;
    open(&s.path, format, &s.what, expect, &Recipe::default(), None)
}

/// Files whose places follow each other, read one after the other; or a
/// file out of order, read whole and sorted.
struct Run {
    files: VecDeque<Placed>,
    rows: Option<Batches>,
    rank: u64,
    what: String,
    ready: VecDeque<(u64, Row)>,
    /// The place of the last row taken, to check the run's order.
    last: u64,
}

impl Run {
    fn new(first: Placed) -> Self {
        Self {
            files: VecDeque::from([first]),
            rows: None,
            rank: NONE,
            what: String::new(),
            ready: VecDeque::new(),
            last: 0,
        }
    }

    /// The rows of `p` that are the newest of their keys, read whole and
    /// put in input order (stably: a key's rows keep their file order).
    fn whole(p: &Placed, format: Format, expect: &[String], index: &Index) -> anyhow::Result<Self> {
        let mut rows = vec![];
        for batch in reopen(p, format, expect)? {
            for row in batch? {
                if let Some(place) = index.winner(&row, p.source.rank) {
                    rows.push((place, row));
                }
            }
        }
        rows.sort_by_key(|(place, _)| *place);
        Ok(Self {
            files: VecDeque::new(),
            rows: None,
            rank: p.source.rank,
            what: p.source.what.clone(),
            ready: rows.into(),
            last: 0,
        })
    }

    /// The next row of the run that is the newest of its key, with its
    /// place.
    fn next(
        &mut self,
        format: Format,
        expect: &[String],
        index: &Index,
    ) -> anyhow::Result<Option<(u64, Row)>> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Ok(Some(r));
            }
            if let Some(rows) = &mut self.rows {
                match rows.next() {
                    Some(batch) => {
                        for row in batch? {
                            let Some(place) = index.winner(&row, self.rank) else {
                                continue;
                            };
                            // A file changed since it was scanned would
                            // otherwise be merged wrong without a word.
                            if place < self.last {
                                bail!(
                                    "the rows of {} went out of input order (did it change during \
                                     the merge?)",
                                    self.what
                                );
                            }
                            self.last = place;
                            self.ready.push_back((place, row));
                        }
                        continue;
                    }
                    None => self.rows = None,
                }
            }
            let Some(p) = self.files.pop_front() else {
                return Ok(None);
            };
            self.rows = Some(reopen(&p, format, expect)?);
            self.rank = p.source.rank;
            self.what = p.source.what;
        }
    }
}

/// Writes the newest rows of every key in `index` from `files` (local)
/// to the new file `dest` of `schema`, in input order, streamed, and
/// flushes it to disk.
pub(crate) fn merge(
    mut files: Vec<Placed>,
    format: Format,
    dest: &Path,
    schema: &SchemaRef,
    index: &Index,
) -> anyhow::Result<Counts> {
    let expect: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    files.sort_by_key(|p| p.source.rank);
    let unsorted: Vec<&str> = files
        .iter()
        .filter(|p| !p.sorted)
        .map(|p| p.source.what.as_str())
        .collect();
    if let Some(first) = unsorted.first() {
        tracing::warn!(
            files = unsorted.len(),
            first,
            "files whose rows are not in the input's order (the input was reordered since they \
             were written) are read whole to merge them"
        );
    }
    let mut runs: Vec<Run> = vec![];
    for p in files {
        if !p.sorted {
            runs.push(Run::whole(&p, format, &expect, index)?);
            continue;
        }
        // Each file joins the first run it can follow (all its places
        // after the run's last): a job's parts make one run, the output
        // another.
        match runs
            .iter_mut()
            .find(|r| r.files.back().is_some_and(|l| l.last < p.first))
        {
            Some(r) => r.files.push_back(p),
            None => runs.push(Run::new(p)),
        }
    }
    let mut out = StreamWriter::create(dest, format, Typed(schema.clone()))?;
    let mut heads: Vec<Option<Row>> = Vec::with_capacity(runs.len());
    let mut heap = BinaryHeap::new();
    for (i, r) in runs.iter_mut().enumerate() {
        let head = r.next(format, &expect, index)?;
        if let Some((place, _)) = &head {
            heap.push(Reverse((*place, i)));
        }
        heads.push(head.map(|(_, row)| row));
    }
    // A key's rows are in one file, so one run: no two runs meet at a
    // place, and a run's rows of one place come out in file order.
    while let Some(Reverse((_, i))) = heap.pop() {
        if let Some(row) = heads[i].take() {
            out.push(row)?;
        }
        if let Some((place, row)) = runs[i].next(format, &expect, index)? {
            heap.push(Reverse((place, i)));
            heads[i] = Some(row);
        }
    }
    out.finish()
}

/// A row job's rows: typed columns of the output's schema.
pub(crate) struct Typed(pub(crate) SchemaRef);

impl Encoding for Typed {
    type Row = Row;

    fn schema(&self) -> anyhow::Result<SchemaRef> {
        Ok(self.0.clone())
    }

    fn batch(&self, rows: &[Row]) -> anyhow::Result<RecordBatch> {
        table::to_batch(&self.0, rows)
    }

    fn lines(&self, out: &mut BufWriter<File>, rows: &[Row]) -> anyhow::Result<()> {
        table::write_jsonl(out, &self.0, rows)
    }

    fn ok(row: &Row) -> bool {
        status(row).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_schema::{DataType, Field, Schema};
    use serde_json::json;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("segment", DataType::Int64, true),
            Field::new("result", DataType::Utf8, true),
            Field::new("status", DataType::Utf8, true),
        ]))
    }

    fn input_row(i: usize) -> Row {
        // Even rows have no `n`: NULLs take part in the key too.
        let n = if i.is_multiple_of(2) {
            Value::Null
        } else {
            json!(i * 7)
        };
        json!({"id": format!("row {i}"), "n": n})
            .as_object()
            .cloned()
            .unwrap()
    }

    fn columns() -> Vec<String> {
        vec!["id".into(), "n".into()]
    }

    /// The whole-file merge, written plainly: every file's rows grouped by
    /// key, a newer file's groups replacing an older one's; the rows to run;
    /// the output in input order.
    fn reference(inputs: &[Row], files: &[(u64, Vec<Row>)]) -> (Vec<usize>, Vec<Row>) {
        let cols = columns();
        let mut ordered: Vec<&(u64, Vec<Row>)> = files.iter().collect();
        ordered.sort_by_key(|f| f.0);
        let mut done: HashMap<Key, Vec<Row>> = HashMap::new();
        for (_, rows) in ordered {
            let mut fresh: HashMap<Key, Vec<Row>> = HashMap::new();
            for r in rows {
                fresh.entry(key_of(&cols, r)).or_default().push(r.clone());
            }
            done.extend(fresh);
        }
        let mut seen = HashSet::new();
        let (mut todo, mut merged) = (vec![], vec![]);
        for (i, r) in inputs.iter().enumerate() {
            let k = key_of(&cols, r);
            if !seen.insert(k) {
                continue;
            }
            match done.get(&k) {
                Some(rows) => {
                    if rows.iter().any(|r| status(r).starts_with(RETRYABLE_PREFIX)) {
                        todo.push(i);
                    }
                    merged.extend(rows.iter().cloned());
                }
                None => todo.push(i),
            }
        }
        (todo, merged)
    }

    #[test]
    fn merge_matches_the_plain_merge_on_random_jobs() {
        let mut rng = fastrand::Rng::with_seed(11);
        let schema = schema();
        for case in 0..80 {
            let format = if case % 3 == 0 {
                Format::Jsonl
            } else {
                Format::Parquet
            };
            let d = tempfile::tempdir().unwrap();
            // The input: some rows repeated, some earlier rows gone.
            let pool = rng.usize(1..60);
            let mut inputs: Vec<Row> = (0..pool).map(input_row).collect();
            for _ in 0..rng.usize(0..3) {
                let r = inputs[rng.usize(0..pool)].clone();
                inputs.push(r);
            }
            if rng.u8(..) < 40 {
                rng.shuffle(&mut inputs);
            }
            let mut files = vec![];
            let mut rank = 0;
            for _ in 0..rng.usize(0..7) {
                // Parts follow each other (a job), overlap (a resumption)
                // or are empty; rows of rows no longer in the input (ids
                // past the pool); a file in another order than the input.
                let (lo, hi) = if rng.bool() {
                    let lo = rng.usize(0..pool + 5);
                    (lo, rng.usize(lo..=pool + 5))
                } else {
                    (0, pool + 5)
                };
                let mut rows = vec![];
                let mut order: Vec<usize> = (lo..hi).collect();
                if rng.u8(..) < 30 {
                    rng.shuffle(&mut order);
                }
                for i in order {
                    if rng.u8(..) < 90 {
                        continue;
                    }
                    let status = match rng.u8(..) {
                        0..30 => format!("{RETRYABLE_PREFIX} 503"),
                        30..50 => "cannot decode".to_string(),
                        _ => String::new(),
                    };
                    for s in 0..if i.is_multiple_of(4) {
                        rng.usize(1..4)
                    } else {
                        1
                    } {
                        let mut r = input_row(i);
                        r.insert("segment".into(), json!(s));
                        r.insert("result".into(), json!(format!("rank {rank} row {i}")));
                        r.insert("status".into(), json!(status));
                        rows.push(r);
                    }
                }
                if rng.u8(..) < 30 {
                    rng.shuffle(&mut rows);
                }
                files.push((rank, rows));
                rank += rng.u64(1..3);
            }
            // Places follow the input as the job sees it: its distinct rows.
            let mut index = Index::new(columns(), inputs.len());
            let mut distinct = vec![];
            for (i, r) in inputs.iter().enumerate() {
                if index.insert(key_of(&columns(), r), distinct.len() as u64) {
                    distinct.push(i);
                }
            }
            let mut sources = vec![];
            for (rank, rows) in &files {
                let path = d.path().join(format!("f{rank}"));
                let rows = table::normalize(&schema, rows).unwrap();
                std::fs::write(&path, table::encode(format, &schema, &rows).unwrap()).unwrap();
                sources.push(Source {
                    rank: *rank,
                    path,
                    what: format!("file {rank}"),
                });
            }
            rng.shuffle(&mut sources);
            let expect: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
            let (placed, outside) =
                scan(sources, format, &expect, &Recipe::default(), &mut index).unwrap();
            let input_keys: HashSet<Key> = inputs.iter().map(|r| key_of(&columns(), r)).collect();
            let file_keys: HashSet<Key> = files
                .iter()
                .flat_map(|(_, rows)| rows.iter().map(|r| key_of(&columns(), r)))
                .collect();
            assert_eq!(
                outside,
                file_keys.difference(&input_keys).count(),
                "case {case}"
            );
            let (want_todo, want) = reference(&inputs, &files);
            let todo: Vec<usize> = distinct
                .iter()
                .copied()
                .filter(|&i| index.to_run(key_of(&columns(), &inputs[i])))
                .collect();
            assert_eq!(todo, want_todo, "case {case}");
            let dest = d.path().join("out");
            let counts = merge(placed, format, &dest, &schema, &index).unwrap();
            let got: Vec<Row> = open(&dest, format, "out", &expect, &Recipe::default(), None)
                .unwrap()
                .flat_map(|b| b.unwrap())
                .collect();
            let want = table::normalize(&schema, &want).unwrap();
            assert_eq!(got, want, "case {case}");
            let failed = want.iter().filter(|r| !status(r).is_empty()).count();
            assert_eq!(
                (counts.ok, counts.failed),
                (want.len() - failed, failed),
                "case {case}"
            );
        }
    }

    #[test]
    fn files_of_another_job_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let schema = schema();
        let expect: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let mut row = input_row(1);
        row.insert("status".into(), json!(""));
        let rows = table::normalize(&schema, &[row]).unwrap();
        // Another prompt recorded in a Parquet part.
        let prompt = |p: &str| Recipe::default().with("prompt", p);
        let recorded = Arc::new(prompt("Capital of {id}?").attach(&schema));
        let part = d.path().join("part-000001.parquet");
        std::fs::write(
            &part,
            table::encode(Format::Parquet, &recorded, &rows).unwrap(),
        )
        .unwrap();
        let err = open(
            &part,
            Format::Parquet,
            "the part",
            &expect,
            &prompt("Price of {id}?"),
            None,
        )
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("the part"), "{err:#}");
        assert!(
            open(
                &part,
                Format::Parquet,
                "p",
                &expect,
                &prompt("Capital of {id}?"),
                None
            )
            .is_ok()
        );
        // Other columns, in either format.
        let mut fewer = expect.clone();
        fewer.pop();
        for format in [Format::Parquet, Format::Jsonl] {
            let f = d.path().join(format!("out.{}", format.ext()));
            std::fs::write(&f, table::encode(format, &schema, &rows).unwrap()).unwrap();
            let err = open(&f, format, "the output", &fewer, &Recipe::default(), None)
                .and_then(|b| b.collect::<anyhow::Result<Vec<_>>>())
                .err()
                .unwrap();
            let msg = format!("{err:#}");
            assert!(
                msg.contains("the output was written with other columns"),
                "{msg}"
            );
        }
    }
}
