//! An approximate nearest-neighbour index over batch outputs, for
//! collections too large to scan per query: an HNSW graph in a folder
//! beside the tables (`vectors.usearch` and `manifest.json`).
//!
//! The graph is USearch's (through its Rust crate): a maintained, widely
//! deployed engine (ClickHouse, DuckDB and ScyllaDB build on it) that adds
//! vectors to a saved index without rebuilding it (so an index grows with
//! its tables), opens a saved index by memory-mapping it (a 1M-vector index
//! opens at once and pages in what searches touch), stores vectors as
//! f16/bf16/i8 to save memory, and takes a key filter during the search.
//! Pure-Rust alternatives fell short: `instant-distance` cannot add to a
//! built index, `hnsw_rs` cannot open one without loading it whole; an IVF
//! of our own would be hand-rolled. The cost is a C++ compile (about three
//! minutes on 2 cores) in a cold build.
//!
//! Keys are row numbers: table `t`'s row `i` is key `first_key(t) + i`, so
//! a hit is read back from its table ([`crate::rows`]) and rescored there
//! with the exact f32 vector: scores are exact cosines whatever the index's
//! storage, only the candidate set is approximate.
//!
//! ```
//! use mmembed_search::index::{BuildOptions, Index, IndexSearch, build};
//! use mmembed_search::Table;
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("out.jsonl");
//! # let row = |uri: &str, v: [f32; 2]| serde_json::json!({
//! #     "uri": uri, "content_type": "image/png", "size_bytes": 3, "embedding": v,
//! #     "status": "", "video_start_sec": null, "video_end_sec": null,
//! #     "model": "demo", "space": "s1", "dimension": 2}).to_string();
//! # std::fs::write(&path, [row("a.png", [1.0, 0.0]), row("b.png", [0.0, 1.0])].join("\n")).unwrap();
//! let index_dir = dir.path().join("media.index");
//! build(&[Table::new(&path)?], &index_dir, &BuildOptions::default())?;
//! let index = Index::open(&index_dir)?;
//! index.check_fresh()?; // the tables have not changed since
//! let found = index.search(&[0.1, 0.9], &IndexSearch { k: 1, ..IndexSearch::default() })?;
//! assert_eq!(found.hits[0].row.uri, "b.png");
//! # Ok::<(), mmembed_search::SearchError>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::time::{Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use usearch::{IndexOptions, MetricKind, ScalarKind};

use crate::{Filter, Found, Hit, SearchError, Table, cosine_to_unit, each_vector, row_count, rows};

/// The graph's file in an index folder.
pub const VECTORS_FILE: &str = "vectors.usearch";
/// The description of an index: its space, options and tables.
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: u32 = 1;
/// Vectors handed to an inserting thread at a time.
const CHUNK: usize = 1024;

/// How the index stores vectors (scores are exact either way: hits are
/// rescored from their tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// 4 bytes a value.
    F32,
    /// 2 bytes a value, 11 significant bits: enough for unit vectors.
    #[default]
    F16,
    /// 2 bytes a value, 8 significant bits.
    Bf16,
    /// 1 byte a value.
    I8,
}

impl Quantization {
    fn scalar(self) -> ScalarKind {
        match self {
            Self::F32 => ScalarKind::F32,
            Self::F16 => ScalarKind::F16,
            Self::Bf16 => ScalarKind::BF16,
            Self::I8 => ScalarKind::I8,
        }
    }
}

/// How to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Vector storage.
    pub quantization: Quantization,
    /// Graph edges per node (HNSW's M).
    pub connectivity: usize,
    /// Candidates kept while inserting (HNSW's efConstruction).
    pub expansion_add: usize,
    /// Inserting threads (default: the machine's cores; at most
    /// [`crate::MAX_THREADS`]).
    pub threads: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            quantization: Quantization::default(),
            connectivity: 16,
            expansion_add: 128,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A table as the index saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedTable {
    /// Absolute path.
    pub path: PathBuf,
    /// Size when indexed.
    pub bytes: u64,
    /// Modification time when indexed (ns since 1970).
    pub modified_ns: u64,
    /// Its rows (failed ones included: keys are row numbers).
    pub rows: u64,
    /// Its first row's key.
    pub first_key: u64,
    /// Its vectors in the index.
    pub vectors: u64,
}

/// What an index holds (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The manifest's format version.
    pub format: u32,
    /// The embedding space of every vector.
    pub space: String,
    /// The model of the first table's rows.
    pub model: String,
    /// Vector length.
    pub dimension: usize,
    /// Vector storage.
    pub quantization: Quantization,
    /// Graph edges per node.
    pub connectivity: usize,
    /// Candidates kept while inserting.
    pub expansion_add: usize,
    /// Vectors in the index.
    pub vectors: u64,
    /// Its tables, in key order.
    pub tables: Vec<IndexedTable>,
}

impl Manifest {
    fn read(dir: &Path) -> Result<Self, SearchError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| SearchError::Io {
            path: path.clone(),
            source,
        })?;
        let m: Self = serde_json::from_str(&text)
            .map_err(|e| index_err(dir, format!("{MANIFEST_FILE}: {e}")))?;
        if m.format != FORMAT {
            return Err(index_err(
                dir,
                format!(
                    "format {} (this version reads {FORMAT}); build it again",
                    m.format
                ),
            ));
        }
        Ok(m)
    }

    fn next_key(&self) -> u64 {
        self.tables.last().map_or(0, |t| t.first_key + t.rows)
    }

    /// The table and row of a key.
    fn locate(&self, key: u64) -> Option<(usize, u64)> {
        let i = self
            .tables
            .partition_point(|t| t.first_key <= key)
            .checked_sub(1)?;
        let t = &self.tables[i];
        (key < t.first_key + t.rows).then_some((i, key - t.first_key))
    }

    fn options(&self) -> IndexOptions {
        IndexOptions {
            dimensions: self.dimension,
            metric: MetricKind::Cos,
            quantization: self.quantization.scalar(),
            connectivity: self.connectivity,
            expansion_add: self.expansion_add,
            expansion_search: 0,
            multi: false,
        }
    }
}

fn index_err(dir: &Path, message: impl Into<String>) -> SearchError {
    SearchError::Index {
        path: dir.to_path_buf(),
        message: message.into(),
    }
}

/// Size and modification time: what tells that a table changed.
fn fingerprint(t: &Table) -> Result<(u64, u64), SearchError> {
    let m = std::fs::metadata(t.path()).map_err(|e| t.io(e))?;
    let ns = m
        .modified()
        .ok()
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Ok((m.len(), ns))
}

fn absolute(t: &Table) -> Result<Table, SearchError> {
    let p = std::path::absolute(t.path()).map_err(|e| t.io(e))?;
    Table::new(p)
}

/// What [`build`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new index (none was there, or the old one could not be extended:
    /// `reason` says why).
    Built {
        /// Why the old index was replaced, if there was one.
        reason: Option<String>,
    },
    /// New tables' vectors were added to the index.
    Extended {
        /// The tables added.
        tables: usize,
    },
    /// Every table was already indexed and unchanged.
    Unchanged,
}

/// What [`build`] did, with figures.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildReport {
    /// Built, extended or left alone.
    pub outcome: Outcome,
    /// Vectors added by this call.
    pub added: u64,
    /// Vectors in the index now.
    pub vectors: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// Builds the index of `tables` in the folder `dir`, or brings an index
/// already there up to date: when it holds some of `tables`, unchanged, and
/// others are new, only the new ones are added; when one of its tables
/// changed or is no longer listed, or other options are asked for, it is
/// rebuilt. Tables of another space than the index's are refused. The
/// files are replaced atomically: a search running on the old index keeps
/// it until it reopens.
pub fn build(
    tables: &[Table],
    dir: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport, SearchError> {
    let started = Instant::now();
    let tables = tables.iter().map(absolute).collect::<Result<Vec<_>, _>>()?;
    let old = if dir.join(MANIFEST_FILE).exists() {
        Some(Manifest::read(dir)?)
    } else {
        if dir.exists()
            && std::fs::read_dir(dir)
                .map_err(|source| SearchError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .next()
                .is_some()
        {
            return Err(index_err(
                dir,
                "the folder is not empty and holds no index: not overwriting it",
            ));
        }
        None
    };
    let mut reason = None;
    if let Some(m) = &old {
        reason = stale_reason(m, &tables, opts)?;
        if reason.is_none() {
            let new: Vec<Table> = tables
                .iter()
                .filter(|t| !m.tables.iter().any(|o| o.path == t.path()))
                .cloned()
                .collect();
            if new.is_empty() {
                return Ok(BuildReport {
                    outcome: Outcome::Unchanged,
                    added: 0,
                    vectors: m.vectors,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            if let Some(s) = crate::summarize(&new)?
                && s.space != m.space
            {
                return Err(index_err(
                    dir,
                    format!(
                        "holds vectors of space {}; the new tables are in {}: refused (build a separate index)",
                        m.space, s.space
                    ),
                ));
            }
            let mut m = m.clone();
            let index =
                usearch::Index::new(&m.options()).map_err(|e| index_err(dir, e.to_string()))?;
            let file = dir.join(VECTORS_FILE);
            index
                .load(&file.to_string_lossy())
                .map_err(|e| index_err(dir, format!("loading {VECTORS_FILE}: {e}")))?;
            let added = insert(&index, &mut m, &new, dir, opts.threads)?;
            save(&index, &m, dir)?;
            return Ok(BuildReport {
                outcome: Outcome::Extended { tables: new.len() },
                added,
                vectors: m.vectors,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    }
    let Some(s) = crate::summarize(&tables)? else {
        return Err(index_err(dir, "the tables hold no embedded rows"));
    };
    let mut m = Manifest {
        format: FORMAT,
        space: s.space,
        model: s.model,
        dimension: s.dimension,
        quantization: opts.quantization,
        connectivity: opts.connectivity,
        expansion_add: opts.expansion_add,
        vectors: 0,
        tables: vec![],
    };
    let index = usearch::Index::new(&m.options()).map_err(|e| index_err(dir, e.to_string()))?;
    let added = insert(&index, &mut m, &tables, dir, opts.threads)?;
    save(&index, &m, dir)?;
    Ok(BuildReport {
        outcome: Outcome::Built { reason },
        added,
        vectors: m.vectors,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Why an existing index cannot be extended with `tables`, if it cannot.
fn stale_reason(
    m: &Manifest,
    tables: &[Table],
    opts: &BuildOptions,
) -> Result<Option<String>, SearchError> {
    if (m.quantization, m.connectivity, m.expansion_add)
        != (opts.quantization, opts.connectivity, opts.expansion_add)
    {
        return Ok(Some("other index options were asked for".into()));
    }
    for o in &m.tables {
        let Some(t) = tables.iter().find(|t| t.path() == o.path) else {
            return Ok(Some(format!("{} is no longer listed", o.path.display())));
        };
        if fingerprint(t)? != (o.bytes, o.modified_ns) {
            return Ok(Some(format!("{} changed", o.path.display())));
        }
    }
    Ok(None)
}

/// Adds the vectors of `tables` to `index` (and the tables to `m`): this
/// thread reads, `threads` threads insert.
fn insert(
    index: &usearch::Index,
    m: &mut Manifest,
    tables: &[Table],
    dir: &Path,
    threads: usize,
) -> Result<u64, SearchError> {
    let threads = threads.clamp(1, crate::MAX_THREADS);
    let mut planned = vec![];
    let mut next = m.next_key();
    let mut capacity = index.size();
    for t in tables {
        let (bytes, modified_ns) = fingerprint(t)?;
        let rows = row_count(t)?;
        capacity += usize::try_from(rows).unwrap_or(usize::MAX);
        planned.push(IndexedTable {
            path: t.path().to_path_buf(),
            bytes,
            modified_ns,
            rows,
            first_key: next,
            vectors: 0,
        });
        next += rows;
    }
    index
        .reserve_capacity_and_threads(capacity, threads)
        .map_err(|e| index_err(dir, format!("reserving {capacity} vectors: {e}")))?;
    let dim = m.dimension;
    let (tx, rx) = mpsc::sync_channel::<(Vec<u64>, Vec<f32>)>(threads * 2);
    let rx = Mutex::new(rx);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let read = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((keys, flat)) = next else { break };
                    for (k, v) in keys.iter().zip(flat.chunks_exact(dim)) {
                        if let Err(e) = index.add(*k, v) {
                            failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert_with(|| e.to_string());
                        }
                    }
                }
            });
        }
        let mut chunk = (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK * dim));
        let read = (|| {
            for (t, p) in tables.iter().zip(planned.iter_mut()) {
                each_vector(t, |i, uri, space, v| {
                    if space != m.space {
                        return Err(SearchError::MixedSpaces {
                            first: m.space.clone(),
                            other: space.to_string(),
                            path: t.path().to_path_buf(),
                        });
                    }
                    if v.len() != dim {
                        return Err(SearchError::Dimension {
                            path: t.path().to_path_buf(),
                            uri: uri.to_string(),
                            found: v.len(),
                            expected: dim,
                        });
                    }
                    chunk.0.push(p.first_key + i);
                    chunk.1.extend_from_slice(v);
                    p.vectors += 1;
                    if chunk.0.len() == CHUNK {
                        let full = std::mem::replace(
                            &mut chunk,
                            (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK * dim)),
                        );
                        if tx.send(full).is_err() {
                            return Err(index_err(dir, "the inserting threads stopped"));
                        }
                    }
                    Ok(())
                })?;
            }
            if !chunk.0.is_empty() && tx.send(chunk).is_err() {
                return Err(index_err(dir, "the inserting threads stopped"));
            }
            Ok(())
        })();
        drop(tx);
        read
    });
    read?;
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(index_err(dir, format!("adding vectors: {e}")));
    }
    let added: u64 = planned.iter().map(|p| p.vectors).sum();
    m.vectors += added;
    m.tables.extend(planned);
    tracing::info!(added, vectors = m.vectors, "indexed");
    Ok(added)
}

/// Writes the graph, then the manifest, each through a temporary file and
/// a rename (a crash between leaves a manifest that does not match the
/// graph's size: [`Index::open`] says so).
fn save(index: &usearch::Index, m: &Manifest, dir: &Path) -> Result<(), SearchError> {
    let io = |path: &Path, source| SearchError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = dir.join(format!("{VECTORS_FILE}.tmp"));
    index
        .save(&tmp.to_string_lossy())
        .map_err(|e| index_err(dir, format!("saving: {e}")))?;
    let file = dir.join(VECTORS_FILE);
    std::fs::rename(&tmp, &file).map_err(|e| io(&file, e))?;
    let text = serde_json::to_string_pretty(m).map_err(|e| index_err(dir, e.to_string()))?;
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    let file = dir.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &file).map_err(|e| io(&file, e))
}

/// How to search an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSearch {
    /// How many hits.
    pub k: usize,
    /// Which rows may be hits: candidates are fetched in growing numbers
    /// until `k` pass (or the whole index was looked at).
    pub filter: Filter,
    /// Candidates kept while searching (HNSW's ef): more is slower and
    /// closer to exact. 512 by default: recall@10 0.988 on a clustered
    /// 1M × 512 table, where 128 gave 0.80; reading the hits' rows back
    /// costs more than the graph search either way (BENCHMARKS.md).
    pub expansion: usize,
}

impl Default for IndexSearch {
    fn default() -> Self {
        Self {
            k: 10,
            filter: Filter::default(),
            expansion: 512,
        }
    }
}

/// An index opened for searching (memory-mapped, read-only).
pub struct Index {
    dir: PathBuf,
    manifest: Manifest,
    inner: usearch::Index,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("dir", &self.dir)
            .field("vectors", &self.manifest.vectors)
            .field("space", &self.manifest.space)
            .finish()
    }
}

impl Index {
    /// Opens the index in `dir` (maps the graph, reads nothing else).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, SearchError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join(MANIFEST_FILE).exists() {
            let what = if dir.is_dir() {
                format!("no index here (no {MANIFEST_FILE})")
            } else {
                "no such folder".to_string()
            };
            return Err(index_err(
                &dir,
                format!("{what}; build one with `mmembed index build TABLES -o DIR`"),
            ));
        }
        let manifest = Manifest::read(&dir)?;
        let inner =
            usearch::Index::new(&manifest.options()).map_err(|e| index_err(&dir, e.to_string()))?;
        let file = dir.join(VECTORS_FILE);
        inner
            .view(&file.to_string_lossy())
            .map_err(|e| index_err(&dir, format!("opening {VECTORS_FILE}: {e}")))?;
        if inner.size() as u64 != manifest.vectors {
            return Err(index_err(
                &dir,
                format!(
                    "{VECTORS_FILE} holds {} vectors, {MANIFEST_FILE} says {}: damaged, build it again",
                    inner.size(),
                    manifest.vectors
                ),
            ));
        }
        Ok(Self {
            dir,
            manifest,
            inner,
        })
    }

    /// What it holds.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Its tables, in key order.
    pub fn tables(&self) -> Vec<Table> {
        self.manifest
            .tables
            .iter()
            .filter_map(|t| Table::new(&t.path).ok())
            .collect()
    }

    /// An error if a table changed (or vanished) since the index was built:
    /// its keys would point at other rows.
    pub fn check_fresh(&self) -> Result<(), SearchError> {
        for (t, o) in self.tables().iter().zip(&self.manifest.tables) {
            let why = match fingerprint(t) {
                Err(_) => "is gone",
                Ok(f) if f != (o.bytes, o.modified_ns) => "changed",
                Ok(_) => continue,
            };
            return Err(SearchError::Stale {
                index: self.dir.clone(),
                table: o.path.clone(),
                why: why.into(),
            });
        }
        Ok(())
    }

    /// The `opts.k` rows nearest to `query`, as [`crate::search`] returns
    /// them (`scanned`: candidates the index returned; scores exact).
    pub fn search(&self, query: &[f32], opts: &IndexSearch) -> Result<Found, SearchError> {
        let q = crate::unit(query)?;
        if query.len() != self.manifest.dimension {
            return Err(SearchError::Dimension {
                path: self.dir.clone(),
                uri: "its vectors".into(),
                found: self.manifest.dimension,
                expected: query.len(),
            });
        }
        let size = self.inner.size();
        let tables = self.tables();
        // Over-fetch under a filter: 8× first, then 4× more per round.
        let mut count = if opts.filter.is_empty() {
            opts.k
        } else {
            opts.k.saturating_mul(8)
        };
        loop {
            count = count.clamp(1, size.max(1));
            self.inner
                .change_expansion_search(opts.expansion.max(count));
            let m = self
                .inner
                .search(&q, count)
                .map_err(|e| index_err(&self.dir, format!("searching: {e}")))?;
            let mut by_table: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
            for key in &m.keys {
                let (t, i) = self.manifest.locate(*key).ok_or_else(|| {
                    index_err(
                        &self.dir,
                        format!("key {key} belongs to no table: damaged, build it again"),
                    )
                })?;
                by_table.entry(t).or_default().push(i);
            }
            let mut hits = vec![];
            for (t, indices) in by_table {
                for (i, row) in indices.iter().zip(rows(&tables[t], &indices)?) {
                    if !opts.filter.matches(&row) {
                        continue;
                    }
                    let Some(v) = row.embedding.as_deref() else {
                        continue;
                    };
                    hits.push(Hit {
                        score: cosine_to_unit(&q, v),
                        table: t,
                        index: *i,
                        row,
                    });
                }
            }
            let matched = hits.len() as u64;
            if hits.len() >= opts.k || count >= size {
                crate::rank(&mut hits);
                hits.truncate(opts.k);
                return Ok(Found {
                    hits,
                    scanned: m.keys.len() as u64,
                    matched,
                });
            }
            count = count.saturating_mul(4);
        }
    }
}
