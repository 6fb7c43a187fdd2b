//! The input of a batch job, an object table: a folder (recursive), a glob,
//! a bucket prefix or glob (`gs://b/photos/`, `s3://b/**/*.jpg`), or a
//! manifest (CSV, JSONL or Parquet with a `uri`, `path` or `url` column, such as a
//! BigQuery object table exported; its version columns are the objects'
//! identity, other columns are carried through to the output rows). Every
//! object comes with its identity (size, modification time,
//! ETag/generation) so a rerun can tell which objects changed; a manifest
//! without version columns gives its remote objects none until they are
//! read.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use mmembed_store::ObjectInfo;
use serde_json::{Map, Value};

use mmembed_rows::to_micros;
pub use mmembed_rows::{Kind, STANDARD_COLUMNS, content_type, supported_extensions};

/// What identifies one version of an object: BigQuery object tables'
/// `generation`, `etag`, `updated` and `size` columns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Size in bytes.
    pub size: Option<i64>,
    /// Last modification.
    pub updated: Option<DateTime<Utc>>,
    /// The store's entity tag.
    pub etag: Option<String>,
    /// GCS generation / S3 version id.
    pub generation: Option<String>,
}

impl Identity {
    /// A remote object's identity from its listing.
    pub fn of(o: &ObjectInfo) -> Self {
        Self {
            size: Some(o.size as i64),
            updated: o.updated,
            etag: o.etag.clone(),
            generation: o.generation.clone(),
        }
    }

    /// A local file's identity from its metadata.
    pub fn of_file(m: &std::fs::Metadata) -> Self {
        Self {
            size: Some(m.len() as i64),
            updated: mmembed_rows::modified(m),
            etag: None,
            generation: None,
        }
    }

    /// Whether `self` and `other` name the same version (see [`Version`]).
    #[cfg(test)]
    pub fn same_version(&self, other: &Identity) -> bool {
        Version::of(self).same(&Version::of(other))
    }
}

/// What `--resume` compares of an [`Identity`], in 64 bytes and no heap
/// (ETag and generation as 64-bit hashes, the time in microseconds): the
/// resume map holds one per URI of the earlier output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Version {
    size: Option<i64>,
    updated_us: Option<i64>,
    etag: Option<u64>,
    generation: Option<u64>,
}

impl Version {
    /// The version `id` names.
    pub fn of(id: &Identity) -> Self {
        let hash = |s: &str| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&blake3::hash(s.as_bytes()).as_bytes()[..8]);
            u64::from_le_bytes(b)
        };
        Self {
            size: id.size,
            // Outputs of earlier versions in JSON Lines kept nanoseconds.
            updated_us: id.updated.map(|t| to_micros(t).timestamp_micros()),
            // `"0x8D…"` and `0x8D…` are one ETag: Azure's listings leave
            // out the quotes its HEAD answers have (outputs of earlier
            // versions kept either).
            etag: id
                .etag
                .as_deref()
                .map(|e| {
                    e.strip_prefix('"')
                        .and_then(|e| e.strip_suffix('"'))
                        .unwrap_or(e)
                })
                .map(hash),
            generation: id.generation.as_deref().map(hash),
        }
    }

    /// Whether `self` and `other` are the same version: the generation
    /// when both have one, else the ETag, else size and modification time;
    /// with nothing to compare, the same.
    pub fn same(&self, other: &Version) -> bool {
        if let (Some(a), Some(b)) = (self.generation, other.generation) {
            return a == b;
        }
        if let (Some(a), Some(b)) = (self.etag, other.etag) {
            return a == b;
        }
        let size = match (self.size, other.size) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        let updated = match (self.updated_us, other.updated_us) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        size && updated
    }
}

/// One object of the input table.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// The object's name in the output (`uri` column): an absolute path for
    /// local files, the URI for remote objects.
    pub uri: String,
    /// Where to read it on this machine; `None` for remote URIs (`gs://`).
    pub path: Option<PathBuf>,
    /// Its identity when listed (remote objects named by a manifest get
    /// theirs when they are read).
    pub identity: Identity,
    /// Whether a bucket listing gave it ([`listing`](Self::listing) puts
    /// the entry together again).
    pub listed: bool,
    /// The MIME type declared for it: by the bucket (a listing's
    /// `Content-Type`) or by a manifest's `content_type` column (an object
    /// table's). Shared by the objects of one type.
    pub content_type: Option<Arc<str>>,
    /// Manifest columns carried to the output.
    pub carried: Carried,
}

/// A manifest row's columns carried to its output rows, kept compact:
/// the names are shared by every row of the manifest, and there is no map
/// per row (a `serde_json::Map`, a B-tree, allocates a 632-byte node for
/// each row however few its columns: 6 GB for ten million rows).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Carried(Vec<(Arc<str>, Value)>);

impl Carried {
    /// `fields` with names shared through `names` (one manifest's names).
    fn new(fields: Map<String, Value>, names: &mut HashSet<Arc<str>>) -> Self {
        let mut v: Vec<(Arc<str>, Value)> = fields
            .into_iter()
            .map(|(k, value)| (shared(names, &k), value))
            .collect();
        v.shrink_to_fit();
        Self(v)
    }

    /// Whether it carries nothing.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of the column `name`.
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| &**k == name).map(|(_, v)| v)
    }

    /// As the map an output row holds.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

/// `s`, shared with the other strings of `names` equal to it: a listing's
/// column names and content types repeat for every object. (The entries
/// are not kept whole: their URIs and versions would be held twice, about
/// 200 bytes an object, 2 GB for ten million.)
fn shared(names: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    match names.get(s) {
        Some(n) => n.clone(),
        None => {
            let n: Arc<str> = s.into();
            names.insert(n.clone());
            n
        }
    }
}

impl Input {
    /// The listing entry of an object a bucket listing gave, to read it
    /// without asking for its metadata again.
    pub fn listing(&self) -> Option<ObjectInfo> {
        if !self.listed {
            return None;
        }
        Some(ObjectInfo {
            uri: self.uri.clone(),
            size: u64::try_from(self.identity.size?).ok()?,
            updated: self.identity.updated,
            etag: self.identity.etag.clone(),
            generation: self.identity.generation.clone(),
            content_type: self.content_type.as_deref().map(String::from),
        })
    }
}

/// The input table and the names of its carried columns, in order.
#[derive(Debug, Default)]
pub struct InputTable {
    /// Objects, sorted by URI, without duplicates.
    pub inputs: Vec<Input>,
    /// Carried column names.
    pub carried_columns: Vec<String>,
}

fn is_remote(uri: &str) -> bool {
    uri.contains("://") && !uri.starts_with("file://")
}

/// An absolute form of a local path (not resolving links: the name the
/// user gave stays recognisable).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Lists `spec`: a directory (walked recursively, hidden entries skipped), a
/// `.csv`/`.jsonl`/`.ndjson`/`.parquet` manifest (here or in a bucket), a
/// glob pattern, one media file, or a bucket prefix, glob or object
/// (`gs://`, `s3://`, `az://`).
pub async fn list(spec: &str) -> anyhow::Result<InputTable> {
    let mut table = if mmembed_store::is_remote(spec) {
        // One object named like a manifest is one (a glob lists objects).
        match ManifestKind::of(spec).filter(|_| !has_glob_chars(spec)) {
            Some(kind) => from_remote_manifest(spec, kind).await?,
            None => from_bucket(spec).await?,
        }
    } else {
        list_local(spec)?
    };
    table.inputs.sort_by(|a, b| a.uri.cmp(&b.uri));
    let before = table.inputs.len();
    table.inputs.dedup_by(|a, b| a.uri == b.uri);
    if table.inputs.len() != before {
        tracing::warn!(
            duplicates = before - table.inputs.len(),
            "the input lists some URIs more than once; each is embedded once"
        );
    }
    Ok(table)
}

async fn from_bucket(spec: &str) -> anyhow::Result<InputTable> {
    let objects = mmembed_store::Stores::shared()
        .list(spec)
        .await
        .with_context(|| format!("listing {spec}"))?;
    let mut types = HashSet::new();
    let inputs = objects
        .into_iter()
        .map(|o| Input {
            path: None,
            identity: Identity::of(&o),
            listed: true,
            content_type: o.content_type.as_deref().map(|t| shared(&mut types, t)),
            uri: o.uri,
            carried: Carried::default(),
        })
        .collect();
    Ok(InputTable {
        inputs,
        carried_columns: vec![],
    })
}

fn list_local(spec: &str) -> anyhow::Result<InputTable> {
    let path = Path::new(spec);
    let table = if path.is_dir() {
        from_dir(path)?
    } else if path.is_file() {
        match ManifestKind::of(spec) {
            Some(kind) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                from_manifest(&bytes, kind, &Base::of(spec), &path.display().to_string())?
            }
            None => InputTable {
                inputs: vec![local(path)],
                carried_columns: vec![],
            },
        }
    } else if has_glob_chars(spec) {
        from_glob(spec)?
    } else {
        bail!(
            "input `{spec}` is not a directory, a manifest (.csv, .jsonl, .parquet), a file, a glob \
             or a gs://, s3://, az:// prefix"
        );
    };
    Ok(table)
}

/// A local file, named by its absolute path; its identity from a `stat`
/// (a file that cannot be read keeps an empty one and fails its row later).
fn local(p: &Path) -> Input {
    let p = absolute(p);
    Input {
        uri: p.to_string_lossy().into_owned(),
        identity: std::fs::metadata(&p)
            .map(|m| Identity::of_file(&m))
            .unwrap_or_default(),
        path: Some(p),
        listed: false,
        content_type: None,
        carried: Carried::default(),
    }
}

fn from_dir(dir: &Path) -> anyhow::Result<InputTable> {
    let mut inputs = vec![];
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !is_hidden(e.path()));
    for entry in walk {
        let entry = match entry {
            Ok(e) => e,
            // A link to a folder above it: that folder's files are listed
            // already, by their own paths.
            Err(e) if e.loop_ancestor().is_some() => {
                tracing::warn!("skipping a symbolic link loop: {e}");
                continue;
            }
            // A link to nothing is an input that fails with its reason,
            // as an unreadable file does; the job goes on.
            Err(e) if e.path().is_some_and(is_dangling) => {
                inputs.push(local(e.path().expect("checked")));
                continue;
            }
            // A folder that cannot be read: its files would be missing
            // from the output unseen, so the job stops and says which.
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        if entry.file_type().is_file() {
            inputs.push(local(entry.path()));
        }
    }
    Ok(InputTable {
        inputs,
        carried_columns: vec![],
    })
}

/// A symbolic link to nothing (or to something that cannot be looked at).
fn is_dangling(p: &Path) -> bool {
    p.is_symlink() && std::fs::metadata(p).is_err()
}

fn from_glob(pattern: &str) -> anyhow::Result<InputTable> {
    let mut inputs = vec![];
    for entry in glob::glob(pattern).with_context(|| format!("bad glob `{pattern}`"))? {
        let p = entry.with_context(|| format!("listing `{pattern}`"))?;
        if p.is_file() || is_dangling(&p) {
            inputs.push(local(&p));
        }
    }
    Ok(InputTable {
        inputs,
        carried_columns: vec![],
    })
}

/// A manifest row's object: `uri` or `path`, relative paths taken from the
/// manifest's location.
/// Columns of a manifest that say which version of an object it names
/// rather than travel with it: a BigQuery object table's (`generation`,
/// `updated`, `content_type`, and `size` beside `generation`) and a batch
/// output's (`size_bytes`, `etag`). An object table exported from BigQuery
/// (or an earlier output's identity columns) is a manifest as it is, and
/// `--resume` re-embeds the objects whose version it says changed.
const IDENTITY_COLUMNS: [&str; 5] = [
    "generation",
    "etag",
    "updated",
    "size_bytes",
    "content_type",
];

/// Whether `column` is one of the manifest's identity columns, given all
/// its columns (`size` counts only in an object table, beside
/// `generation`; elsewhere it is any other column, carried).
fn is_identity_column(column: &str, has_generation: bool) -> bool {
    IDENTITY_COLUMNS.contains(&column) || (column == "size" && has_generation)
}

/// The object's identity from a manifest row's identity columns (taken out
/// of `fields`).
fn manifest_identity(
    fields: &mut Map<String, Value>,
    has_generation: bool,
    at: &dyn Fn() -> String,
) -> anyhow::Result<Identity> {
    let mut id = Identity::default();
    let names: Vec<String> = fields
        .keys()
        .filter(|k| is_identity_column(k, has_generation))
        .cloned()
        .collect();
    for k in names {
        let v = fields.remove(&k).unwrap_or(Value::Null);
        let text = match &v {
            Value::Null => continue,
            Value::String(s) if s.trim().is_empty() => continue,
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) => n.to_string(),
            other => bail!("{}: `{k}` is {other}, not a string or number", at()),
        };
        match k.as_str() {
            "generation" => id.generation = Some(text),
            "etag" => id.etag = Some(text),
            "size" | "size_bytes" => {
                let n = text.parse::<i64>().ok().filter(|n| *n >= 0);
                id.size = Some(n.with_context(|| {
                    format!("{}: `{k}` is {text:?}, not a size in bytes", at())
                })?);
            }
            "updated" => {
                id.updated = Some(parse_timestamp(&text).with_context(|| {
                    format!("{}: `updated` is {text:?}, not a timestamp", at())
                })?);
            }
            // `content_type` is the declared type, taken by the caller.
            _ => {}
        }
    }
    Ok(id)
}

/// A timestamp as BigQuery exports write it (`2024-05-01 12:34:56.5 UTC`),
/// as RFC 3339, or as Arrow writes a Parquet timestamp (with or without a
/// zone; none is UTC).
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.to_utc());
    }
    let t = text.replacen(' ', "T", 1);
    let t = t.trim_end_matches(" UTC").trim_end_matches('Z');
    if let Ok(t) = DateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f%#z") {
        return Some(t.to_utc());
    }
    chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

/// A manifest row as an input; `has_generation`: whether the manifest has
/// a `generation` column (an object table's `size` is then the identity's).
fn manifest_input(
    manifest: &str,
    base: &Base,
    line: usize,
    mut fields: Map<String, Value>,
    has_generation: bool,
    names: &mut HashSet<Arc<str>>,
) -> anyhow::Result<Input> {
    let key = NAME_COLUMNS
        .into_iter()
        .find(|k| fields.contains_key(*k))
        .with_context(|| {
            format!("{manifest}:{line}: no `uri`, `path` or `url` column naming the objects")
        })?;
    let uri = match fields.remove(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => bail!("{manifest}:{line}: `{key}` is empty or not a string"),
    };
    // An object table's `content_type` types the objects (it is taken out
    // with the identity columns below).
    let declared = match fields.get("content_type") {
        Some(Value::String(t)) if !t.trim().is_empty() => Some(shared(names, t.trim())),
        _ => None,
    };
    let identity = manifest_identity(&mut fields, has_generation, &|| {
        format!("{manifest}:{line}")
    })?;
    for k in fields.keys() {
        if STANDARD_COLUMNS.contains(&k.as_str()) {
            bail!(
                "{manifest}: column `{k}` would collide with an output column of the same name; rename it"
            );
        }
    }
    let remote = |uri: String| Input {
        uri,
        path: None,
        identity: Identity::default(),
        listed: false,
        content_type: None,
        carried: Carried::default(),
    };
    let mut input = match base.locate(&uri) {
        // A file's identity is read from it (cheap, and the truth).
        Located::File(p) => local(&p),
        Located::Object(uri) => Input {
            identity,
            ..remote(uri)
        },
    };
    input.carried = Carried::new(fields, names);
    input.content_type = declared;
    Ok(input)
}

/// The columns that may name a manifest's objects, in the order they are
/// looked for: an object table's `uri`, a file list's `path` (as Ray's
/// `read_binary_files` names it), a web dataset's `url` (`URL` in LAION's
/// Parquet files). It is taken out; the rows' `uri` holds its value.
pub const NAME_COLUMNS: [&str; 4] = ["uri", "path", "url", "URL"];

/// Which of [`NAME_COLUMNS`] names the objects of a manifest with these
/// columns.
fn name_column<'a>(columns: impl Iterator<Item = &'a str> + Clone) -> Option<&'static str> {
    NAME_COLUMNS
        .into_iter()
        .find(|n| columns.clone().any(|c| c == *n))
}

/// Whether `uri` names a video by its extension.
pub(crate) fn is_video(uri: &str) -> bool {
    matches!(content_type(uri), Some((_, Kind::Video)))
}

impl Input {
    /// Its type by its declared type or name ([`mmembed_rows::media_type`]).
    pub fn media_type(&self) -> Option<(&'static str, Kind)> {
        mmembed_rows::media_type(&self.uri, self.content_type.as_deref())
    }

    /// Whether it may be a video: typed as one, or of a type only its bytes
    /// can tell.
    pub fn may_be_video(&self) -> bool {
        match self.media_type() {
            Some((_, kind)) => kind == Kind::Video,
            None => mmembed_rows::worth_sniffing(&self.uri, self.content_type.as_deref()),
        }
    }

    /// Its MIME type as an object table gives it: its image or video type
    /// by [`media_type`](Self::media_type), else the declared one (a PDF's,
    /// for `mmembed generate`), else (a local file named without an
    /// extension) its first bytes'; `application/octet-stream` when none
    /// tells.
    pub fn table_content_type(&self) -> String {
        let declared = self.content_type.as_deref();
        if let Some((t, _)) = self.media_type() {
            return t.to_string();
        }
        let sniffed = || {
            let path = self.path.as_deref()?;
            if !mmembed_rows::worth_sniffing(&self.uri, declared) {
                return None;
            }
            mmembed_rows::sniff_file(path).ok().flatten().map(|t| t.0)
        };
        declared
            .or_else(sniffed)
            .unwrap_or("application/octet-stream")
            .to_string()
    }
}

/// Where a manifest's relative names are taken from: its folder, or the
/// bucket prefix it sits under (`gs://b/jobs/` for `gs://b/jobs/list.csv`).
#[derive(Debug, Clone)]
pub(crate) enum Base {
    Dir(PathBuf),
    Prefix(String),
}

/// A name from a manifest or table, resolved.
pub(crate) enum Located {
    /// A file on this machine.
    File(PathBuf),
    /// A bucket or HTTP object.
    Object(String),
}

impl Base {
    /// Where `name` (a URI, an absolute path, or a name relative to the
    /// manifest) points.
    pub(crate) fn locate(&self, name: &str) -> Located {
        if is_remote(name) {
            return Located::Object(name.to_string());
        }
        let p = PathBuf::from(name.strip_prefix("file://").unwrap_or(name));
        if p.is_absolute() {
            return Located::File(p);
        }
        match self {
            Self::Dir(dir) => Located::File(dir.join(p)),
            // A relative name in a manifest in a bucket: an object beside it.
            Self::Prefix(prefix) => {
                Located::Object(format!("{prefix}{}", name.trim_start_matches("./")))
            }
        }
    }

    /// The base of a manifest or table at `spec` (a local file or a bucket
    /// object).
    pub(crate) fn of(spec: &str) -> Self {
        if mmembed_store::is_remote(spec) {
            Self::Prefix(spec[..spec.rfind('/').map_or(spec.len(), |i| i + 1)].to_string())
        } else {
            let dir = absolute(Path::new(spec)).parent().map(Path::to_path_buf);
            Self::Dir(dir.unwrap_or_default())
        }
    }
}

/// The formats of a manifest, by its name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ManifestKind {
    Csv,
    Jsonl,
    Parquet,
}

impl ManifestKind {
    /// The kind a file's name says, if it names a table.
    pub(crate) fn of(name: &str) -> Option<Self> {
        let file = name.rsplit('/').next().unwrap_or(name);
        let ext = file.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Self::Csv),
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            "parquet" | "pq" => Some(Self::Parquet),
            _ => None,
        }
    }
}

/// A manifest in a bucket (`gs://b/jobs/list.csv`): read whole, relative
/// names taken as objects beside it.
async fn from_remote_manifest(spec: &str, kind: ManifestKind) -> anyhow::Result<InputTable> {
    let (bytes, _) = mmembed_store::Stores::shared()
        .read(spec, u64::MAX)
        .await
        .with_context(|| format!("reading the manifest {spec}"))?;
    from_manifest(&bytes, kind, &Base::of(spec), spec)
}

fn from_manifest(
    bytes: &[u8],
    kind: ManifestKind,
    base: &Base,
    what: &str,
) -> anyhow::Result<InputTable> {
    match kind {
        ManifestKind::Csv => from_csv(bytes, base, what),
        ManifestKind::Jsonl => from_jsonl(bytes, base, what),
        ManifestKind::Parquet => from_parquet(bytes, base, what),
    }
}

fn from_csv(bytes: &[u8], base: &Base, what: &str) -> anyhow::Result<InputTable> {
    let mut rd = csv::Reader::from_reader(bytes);
    let headers = rd
        .headers()
        .with_context(|| format!("reading the header of {what}"))?
        .clone();
    let has_generation = headers.iter().any(|h| h == "generation");
    let mut inputs = vec![];
    let mut names = HashSet::new();
    for (i, rec) in rd.records().enumerate() {
        let rec = rec.with_context(|| format!("reading {what}"))?;
        let fields: Map<String, Value> = headers
            .iter()
            .zip(rec.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        inputs.push(manifest_input(
            what,
            base,
            i + 2,
            fields,
            has_generation,
            &mut names,
        )?);
    }
    let key = name_column(headers.iter());
    let carried_columns = headers
        .iter()
        .filter(|h| Some(*h) != key && !is_identity_column(h, has_generation))
        .map(String::from)
        .collect();
    Ok(InputTable {
        inputs,
        carried_columns,
    })
}

/// `text` without a leading byte order mark, which Windows tools (Excel,
/// PowerShell) write at the start of UTF-8 files and JSON parsers refuse.
/// (The `csv` crate skips it itself.)
pub(crate) fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

fn from_jsonl(bytes: &[u8], base: &Base, what: &str) -> anyhow::Result<InputTable> {
    let text = std::str::from_utf8(bytes).with_context(|| format!("{what} is not UTF-8 text"))?;
    let text = without_bom(text);
    // The columns first (names only: the rows are parsed one at a time
    // below, not held), for the order carried columns take and whether
    // this is an object table.
    let columns = crate::table::jsonl_columns(text);
    let has_generation = columns.iter().any(|c| c == "generation");
    let mut inputs = vec![];
    let mut names = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let Some(fields) = crate::table::jsonl_row(line, what, i + 1) else {
            continue;
        };
        inputs.push(manifest_input(
            what,
            base,
            i + 1,
            fields?,
            has_generation,
            &mut names,
        )?);
    }
    let carried_columns = columns
        .into_iter()
        .filter(|c| names.contains(c.as_str()))
        .collect();
    Ok(InputTable {
        inputs,
        carried_columns,
    })
}

/// A Parquet manifest (a table exported from BigQuery or pandas): the
/// same columns as a CSV or JSON Lines one, the others carried with their
/// types.
fn from_parquet(bytes: &[u8], base: &Base, what: &str) -> anyhow::Result<InputTable> {
    let (schema, batches) = crate::table::read_parquet(bytes::Bytes::copy_from_slice(bytes), what)?;
    let has_generation = schema.fields().iter().any(|f| f.name() == "generation");
    let mut inputs = vec![];
    let mut names = HashSet::new();
    // A record batch's rows as JSON at a time, not the whole table's.
    for b in &batches {
        let rows = crate::table::from_batch(b).with_context(|| format!("reading {what}"))?;
        for mut fields in rows {
            // NULLs are absent, as in a JSON Lines manifest that leaves
            // them out (but a NULL `uri` is reported as such).
            fields.retain(|k, v| !v.is_null() || k == "uri" || k == "path");
            let row = inputs.len() + 1;
            inputs.push(manifest_input(
                what,
                base,
                row,
                fields,
                has_generation,
                &mut names,
            )?);
        }
    }
    let key = name_column(schema.fields().iter().map(|f| f.name().as_str()));
    let carried_columns = schema
        .fields()
        .iter()
        .map(|f| f.name())
        .filter(|n| Some(n.as_str()) != key && !is_identity_column(n, has_generation))
        .cloned()
        .collect();
    Ok(InputTable {
        inputs,
        carried_columns,
    })
}

/// `--shard i/n`: this machine's slice of the input; `--shard auto` (or
/// `auto/n`) reads it from an array job's environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This slice, `0..count`.
    pub index: u32,
    /// Number of slices.
    pub count: u32,
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("auto") {
            let count = match rest.strip_prefix('/') {
                Some(n) => Some(
                    n.trim()
                        .parse()
                        .map_err(|_| format!("bad shard count `{n}`"))?,
                ),
                None if rest.is_empty() => None,
                None => return Err(format!("`{s}` is not auto or auto/n")),
            };
            return Self::from_env(count, |k| std::env::var(k).ok());
        }
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not i/n (e.g. 0/4) or auto"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("bad shard index `{i}`"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("bad shard count `{n}`"))?;
        Self::new(index, count)
    }
}

impl Shard {
    fn new(index: u32, count: u32) -> Result<Self, String> {
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= i < n"));
        }
        Ok(Self { index, count })
    }

    /// The slice of an array job, from its environment (`var` looks a
    /// variable up):
    ///
    /// - Kubernetes Indexed Job: `JOB_COMPLETION_INDEX`; the count is not in
    ///   the pod's environment, so it comes from `count` (`auto/n`) or
    ///   `MMEMBED_SHARD_COUNT` (the manifest sets it to `completions`);
    /// - Slurm job array: `SLURM_ARRAY_TASK_ID` counted from
    ///   `SLURM_ARRAY_TASK_MIN` (so `--array=1-8` works), with
    ///   `SLURM_ARRAY_TASK_COUNT` slices unless `count` says otherwise.
    pub fn from_env(
        count: Option<u32>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let num = |k: &str| -> Result<Option<u32>, String> {
            var(k)
                .filter(|v| !v.trim().is_empty())
                .map(|v| {
                    v.trim()
                        .parse::<u32>()
                        .map_err(|_| format!("{k}={v} is not a non-negative integer"))
                })
                .transpose()
        };
        let (index, count) = if let Some(i) = num("JOB_COMPLETION_INDEX")? {
            let n = match count {
                Some(n) => n,
                None => num("MMEMBED_SHARD_COUNT")?.ok_or(
                    "--shard auto in a Kubernetes Indexed Job needs the number of shards: \
                     pass --shard auto/N or set MMEMBED_SHARD_COUNT to the job's completions",
                )?,
            };
            (i, n)
        } else if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let i = id.checked_sub(min).ok_or_else(|| {
                format!("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}")
            })?;
            let n = match count {
                Some(n) => n,
                None => num("SLURM_ARRAY_TASK_COUNT")?.ok_or(
                    "--shard auto: SLURM_ARRAY_TASK_COUNT is not set; pass --shard auto/N",
                )?,
            };
            (i, n)
        } else {
            return Err(
                "--shard auto: neither JOB_COMPLETION_INDEX (Kubernetes Indexed Job) \
                        nor SLURM_ARRAY_TASK_ID (Slurm job array) is set; pass --shard i/n"
                    .into(),
            );
        };
        Self::new(index, count)
    }

    /// `output` with `{shard}` replaced by this slice's index and
    /// `{shards}` by the count, so every task of an array job can share one
    /// command line (`-o gs://b/emb/part-{shard}-of-{shards}.parquet`).
    pub fn name_output(output: &str, shard: Option<Shard>) -> anyhow::Result<String> {
        if !output.contains("{shard") {
            return Ok(output.to_string());
        }
        let s = shard.with_context(|| {
            format!("the output `{output}` names {{shard}}/{{shards}} but no --shard is given")
        })?;
        Ok(output
            .replace("{shards}", &s.count.to_string())
            .replace("{shard}", &s.index.to_string()))
    }

    /// Whether `uri` belongs to this slice. By a hash of the URI rather than
    /// by position, so slices stay the same when machines list files in a
    /// different order or the input grows.
    pub fn contains(&self, uri: &str) -> bool {
        let h = blake3::hash(uri.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        u64::from_le_bytes(b) % u64::from(self.count) == u64::from(self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_shards_from_array_job_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3"), ("MMEMBED_SHARD_COUNT", "8")]);
        assert_eq!(Shard::from_env(None, k8s), Ok(Shard { index: 3, count: 8 }));
        assert_eq!(
            Shard::from_env(Some(4), k8s),
            Ok(Shard { index: 3, count: 4 })
        );
        let no_count = Shard::from_env(None, env(&[("JOB_COMPLETION_INDEX", "1")])).unwrap_err();
        assert!(no_count.contains("MMEMBED_SHARD_COUNT"), "{no_count}");
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ]);
        assert_eq!(
            Shard::from_env(None, slurm),
            Ok(Shard { index: 4, count: 8 })
        );
        let none = Shard::from_env(None, env(&[])).unwrap_err();
        assert!(none.contains("JOB_COMPLETION_INDEX") && none.contains("SLURM_ARRAY_TASK_ID"));
        let out_of_range = env(&[("JOB_COMPLETION_INDEX", "8"), ("MMEMBED_SHARD_COUNT", "8")]);
        assert!(Shard::from_env(None, out_of_range).is_err());
        let bad = env(&[
            ("SLURM_ARRAY_TASK_ID", "x"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ]);
        assert!(
            Shard::from_env(None, bad)
                .unwrap_err()
                .contains("SLURM_ARRAY_TASK_ID=x")
        );
        let s = Some(Shard { index: 2, count: 5 });
        assert_eq!(
            Shard::name_output("gs://b/part-{shard}-of-{shards}.parquet", s).unwrap(),
            "gs://b/part-2-of-5.parquet"
        );
        assert!(Shard::name_output("part-{shard}.parquet", None).is_err());
    }

    #[test]
    fn shards_partition_the_input() {
        let uris: Vec<String> = (0..500).map(|i| format!("media/{i}.png")).collect();
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        for u in &uris {
            assert_eq!(shards.iter().filter(|s| s.contains(u)).count(), 1, "{u}");
        }
        let sizes: Vec<usize> = shards
            .iter()
            .map(|s| uris.iter().filter(|u| s.contains(u)).count())
            .collect();
        assert!(sizes.iter().all(|&n| n > 120), "{sizes:?}");
        assert!("3/3".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }

    #[test]
    fn identities_compare_the_strongest_field_both_have() {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(s, 0);
        let a = Identity {
            size: Some(3),
            updated: t(10),
            etag: Some("e1".into()),
            generation: Some("1".into()),
        };
        let mut b = a.clone();
        b.updated = t(11);
        assert!(a.same_version(&b), "same generation");
        b.generation = Some("2".into());
        assert!(!a.same_version(&b));
        let local = Identity {
            size: Some(3),
            updated: t(10),
            ..Default::default()
        };
        assert!(local.same_version(&local.clone()));
        assert!(!local.same_version(&Identity {
            updated: t(12),
            ..local.clone()
        }));
        assert!(Identity::default().same_version(&a));
        let quoted = Identity {
            etag: Some("\"e1\"".into()),
            generation: None,
            ..a.clone()
        };
        let bare = Identity {
            generation: None,
            ..a.clone()
        };
        assert!(
            quoted.same_version(&bare),
            "an ETag with or without its quotes"
        );
        assert!(!quoted.same_version(&Identity {
            etag: Some("e2".into()),
            ..bare.clone()
        }));

        // A file's nanoseconds against the microseconds an output keeps.
        let ns = DateTime::<Utc>::from_timestamp(10, 880_840_046);
        let us = DateTime::<Utc>::from_timestamp(10, 880_840_000);
        let file = |updated| Identity {
            size: Some(3),
            updated,
            ..Default::default()
        };
        assert!(file(ns).same_version(&file(us)));
        assert!(!file(ns).same_version(&file(DateTime::<Utc>::from_timestamp(10, 880_841_000))));
    }

    #[test]
    fn a_manifest_in_a_bucket_names_objects_beside_it() {
        assert_eq!(
            ManifestKind::of("gs://b/jobs/list.CSV"),
            Some(ManifestKind::Csv)
        );
        assert_eq!(
            ManifestKind::of("s3://b/x.ndjson"),
            Some(ManifestKind::Jsonl)
        );
        assert_eq!(ManifestKind::of("s3://b/x.pq"), Some(ManifestKind::Parquet));
        assert_eq!(ManifestKind::of("gs://b/list.csv/"), None);
        assert_eq!(ManifestKind::of("gs://b/photos/"), None);
        assert_eq!(ManifestKind::of("gs://b.csv/photo.jpg"), None);
        let csv = b"uri,label\nphotos/a.jpg,x\n./b.jpg,y\ngs://other/c.jpg,z\n/data/d.jpg,w\n";
        let base = Base::of("gs://b/jobs/list.csv");
        let t = from_manifest(csv, ManifestKind::Csv, &base, "gs://b/jobs/list.csv").unwrap();
        let uris: Vec<&str> = t.inputs.iter().map(|i| i.uri.as_str()).collect();
        assert_eq!(
            uris,
            [
                "gs://b/jobs/photos/a.jpg",
                "gs://b/jobs/b.jpg",
                "gs://other/c.jpg",
                "/data/d.jpg"
            ]
        );
        assert!(t.inputs[..3].iter().all(|i| i.path.is_none()));
        assert_eq!(t.inputs[3].path.as_deref(), Some(Path::new("/data/d.jpg")));
        assert_eq!(t.inputs[0].carried.get("label").unwrap(), "x");
        let e = from_manifest(
            b"{\"uri\": 3}",
            ManifestKind::Jsonl,
            &base,
            "gs://b/jobs/l.jsonl",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "gs://b/jobs/l.jsonl:1: `uri` is empty or not a string");
    }

    #[test]
    fn a_dangling_link_is_an_input_and_a_link_loop_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("a.png"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("gone.png"), d.path().join("b.png")).unwrap();
        std::os::unix::fs::symlink("..", d.path().join("sub/loop")).unwrap();
        let names = |t: InputTable| {
            let mut v: Vec<String> = t
                .inputs
                .iter()
                .map(|i| i.uri.rsplit('/').next().unwrap().to_string())
                .collect();
            v.sort();
            v
        };
        // The dangling link fails its own row later (it cannot be read).
        assert_eq!(names(from_dir(d.path()).unwrap()), ["a.png", "b.png"]);
        let glob = format!("{}/*.png", d.path().display());
        assert_eq!(names(from_glob(&glob).unwrap()), ["a.png", "b.png"]);
    }

    #[test]
    fn an_object_tables_content_type_is_what_the_object_is_taken_for() {
        let d = tempfile::tempdir().unwrap();
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01".to_vec();
        std::fs::write(d.path().join("3f2a9c"), &png).unwrap();
        std::fs::write(d.path().join("a.JPG"), b"x").unwrap();
        std::fs::write(d.path().join("notes"), b"hello").unwrap();
        let mut t = list_local(d.path().to_str().unwrap()).unwrap();
        t.inputs.sort_by(|a, b| a.uri.cmp(&b.uri));
        let types: Vec<String> = t.inputs.iter().map(Input::table_content_type).collect();
        assert_eq!(
            types,
            ["image/png", "image/jpeg", "application/octet-stream"]
        );
        let videos: Vec<bool> = t.inputs.iter().map(Input::may_be_video).collect();
        assert_eq!(videos, [true, false, true], "unknown until read: may be");
        let mut remote = t.inputs[0].clone();
        remote.path = None;
        remote.uri = "gs://b/doc".into();
        remote.content_type = Some("application/pdf".into());
        assert_eq!(remote.table_content_type(), "application/pdf");
        assert!(!remote.may_be_video());
        remote.content_type = Some("image/jpg".into());
        assert_eq!(remote.table_content_type(), "image/jpeg");
    }

    #[test]
    fn a_web_datasets_url_column_names_its_objects() {
        let d = tempfile::tempdir().unwrap();
        let csv = d.path().join("laion.csv");
        std::fs::write(
            &csv,
            "URL,TEXT\nhttps://cdn.example/a.jpg?w=800,a cat\nhttps://cdn.example/b,a dog\n",
        )
        .unwrap();
        let t = list_local(csv.to_str().unwrap()).unwrap();
        let uris: Vec<&str> = t.inputs.iter().map(|i| i.uri.as_str()).collect();
        assert_eq!(
            uris,
            ["https://cdn.example/a.jpg?w=800", "https://cdn.example/b"]
        );
        assert_eq!(t.carried_columns, ["TEXT"]);
        assert_eq!(t.inputs[1].carried.get("TEXT").unwrap(), "a dog");
        std::fs::write(&csv, "link,TEXT\nhttps://cdn.example/a.jpg,a cat\n").unwrap();
        let e = list_local(csv.to_str().unwrap()).unwrap_err();
        assert!(
            format!("{e:#}").contains("no `uri`, `path` or `url` column"),
            "{e:#}"
        );
    }

    #[test]
    fn a_file_identity_is_kept_to_the_microsecond() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.png");
        std::fs::write(&p, b"x").unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_733_000_000, 123_456_789);
        f.set_modified(t).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        let updated = Identity::of_file(&meta).updated.unwrap();
        assert_eq!(updated.timestamp(), 1_733_000_000);
        assert_eq!(updated.timestamp_subsec_nanos() % 1000, 0);
        if meta.modified().unwrap() == t {
            // This file system keeps nanoseconds (most do).
            assert_eq!(updated.timestamp_subsec_nanos(), 123_456_000);
        }
    }

    #[test]
    fn manifests_carry_columns_and_refuse_collisions() {
        let d = tempfile::tempdir().unwrap();
        let csv = d.path().join("m.csv");
        std::fs::write(&csv, "path,label\nb.png,cat\na.png,dog\n").unwrap();
        let t = list_local(csv.to_str().unwrap()).unwrap();
        assert_eq!(t.carried_columns, ["label"]);
        let a = absolute(&d.path().join("a.png"));
        let a_row = t
            .inputs
            .iter()
            .find(|i| i.path.as_deref() == Some(&a))
            .unwrap();
        assert_eq!(a_row.uri, a.to_string_lossy());
        let t = InputTable {
            inputs: {
                let mut v = t.inputs;
                v.sort_by(|a, b| a.uri.cmp(&b.uri));
                v
            },
            ..t
        };
        assert_eq!(t.inputs[0].carried.get("label").unwrap(), "dog");

        let jl = d.path().join("m.jsonl");
        // With the byte order mark and line ends of a Windows tool.
        std::fs::write(
            &jl,
            "\u{feff}{\"uri\":\"gs://b/x.mp4\",\"n\":3}\r\n\r\n{\"uri\":\"y.png\"}\r\n",
        )
        .unwrap();
        let t = list_local(jl.to_str().unwrap()).unwrap();
        assert_eq!(t.inputs.len(), 2);
        assert_eq!(t.inputs[0].uri, "gs://b/x.mp4");
        assert_eq!(t.inputs[0].path, None);
        assert_eq!(t.carried_columns, ["n"]);

        // Parquet: the same columns, the others carried with their types;
        // NULLs left out.
        let pq = d.path().join("m.parquet");
        let batch = arrow_array::RecordBatch::try_from_iter([
            (
                "path",
                std::sync::Arc::new(arrow_array::StringArray::from(vec!["b.png", "a.png"]))
                    as arrow_array::ArrayRef,
            ),
            (
                "n",
                std::sync::Arc::new(arrow_array::Int64Array::from(vec![Some(3), None])),
            ),
        ])
        .unwrap();
        std::fs::write(&pq, crate::rows::parquet_bytes(&batch).unwrap()).unwrap();
        let t = list_local(pq.to_str().unwrap()).unwrap();
        assert_eq!(t.carried_columns, ["n"]);
        assert_eq!(
            t.inputs[0].uri,
            absolute(&d.path().join("b.png")).to_string_lossy()
        );
        assert_eq!(t.inputs[0].carried.get("n").unwrap(), 3);
        assert!(t.inputs[1].carried.is_empty());

        std::fs::write(&csv, "uri,status\na.png,x\n").unwrap();
        let e = list_local(csv.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("collide"), "{e}");
        std::fs::write(&csv, "file\na.png\n").unwrap();
        let e = list_local(csv.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("no `uri`, `path` or `url`"), "{e}");
    }

    /// A BigQuery object table exported as CSV, JSON Lines (INT64 as
    /// strings) or Parquet is a manifest: its version columns are the
    /// objects' identity, `md5_hash` and `metadata` are carried.
    #[test]
    fn an_object_table_export_is_a_manifest() {
        let d = tempfile::tempdir().unwrap();
        let when = DateTime::parse_from_rfc3339("2024-05-01T12:34:56.123456Z")
            .unwrap()
            .to_utc();
        let want = Identity {
            size: Some(1234),
            updated: Some(when),
            etag: None,
            generation: Some("1714566896123456".into()),
        };
        let csv = d.path().join("t.csv");
        std::fs::write(
            &csv,
            "uri,generation,content_type,size,md5_hash,updated,metadata\n\
             gs://b/a.jpg,1714566896123456,image/jpeg,1234,qL8Q==,2024-05-01 12:34:56.123456 UTC,[]\n\
             gs://b/b,1714566896123457,image/jpeg,99,qL8Q==,2024-05-01 12:34:56.123456 UTC,[]\n",
        )
        .unwrap();
        let t = list_local(csv.to_str().unwrap()).unwrap();
        let types: Vec<_> = t
            .inputs
            .iter()
            .map(|i| i.content_type.clone().unwrap())
            .collect();
        assert!(Arc::ptr_eq(&types[0], &types[1]), "one string for a type");
        assert_eq!(t.inputs[1].media_type(), Some(("image/jpeg", Kind::Image)));
        assert_eq!(t.carried_columns, ["md5_hash", "metadata"]);
        assert_eq!(t.inputs[0].identity, want);
        assert_eq!(t.inputs[0].carried.get("md5_hash").unwrap(), "qL8Q==");
        assert_eq!(t.inputs[0].content_type.as_deref(), Some("image/jpeg"));
        assert!(
            !t.inputs[0].listed,
            "a manifest's objects are read after a HEAD"
        );

        let jl = d.path().join("t.jsonl");
        std::fs::write(
            &jl,
            "{\"uri\":\"gs://b/a.jpg\",\"generation\":\"1714566896123456\",\
             \"content_type\":\"image/jpeg\",\"size\":\"1234\",\"md5_hash\":\"qL8Q==\",\
             \"updated\":\"2024-05-01 12:34:56.123456 UTC\",\"metadata\":[]}\n",
        )
        .unwrap();
        let t = list_local(jl.to_str().unwrap()).unwrap();
        assert_eq!(t.inputs[0].identity, want);
        assert_eq!(t.carried_columns, ["md5_hash", "metadata"]);
        assert_eq!(t.inputs[0].content_type.as_deref(), Some("image/jpeg"));

        // Parquet as BigQuery exports it: INT64 and a UTC TIMESTAMP.
        use arrow_array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
        use std::sync::Arc;
        let pq = d.path().join("t.parquet");
        let batch = arrow_array::RecordBatch::try_from_iter([
            (
                "uri",
                Arc::new(StringArray::from(vec!["gs://b/a.jpg"])) as ArrayRef,
            ),
            (
                "generation",
                Arc::new(Int64Array::from(vec![1_714_566_896_123_456])),
            ),
            (
                "content_type",
                Arc::new(StringArray::from(vec!["image/jpeg"])),
            ),
            ("size", Arc::new(Int64Array::from(vec![1234]))),
            (
                "updated",
                Arc::new(
                    TimestampMicrosecondArray::from(vec![when.timestamp_micros()])
                        .with_timezone("UTC"),
                ),
            ),
        ])
        .unwrap();
        std::fs::write(&pq, crate::rows::parquet_bytes(&batch).unwrap()).unwrap();
        let t = list_local(pq.to_str().unwrap()).unwrap();
        assert_eq!(t.inputs[0].identity, want);
        assert!(t.carried_columns.is_empty(), "{:?}", t.carried_columns);
        assert_eq!(t.inputs[0].content_type.as_deref(), Some("image/jpeg"));

        // A batch output's names; a timestamp without a zone is UTC.
        std::fs::write(
            &csv,
            "uri,size_bytes,etag,updated\ngs://b/a.jpg,7,\"e1\",2024-05-01T12:34:56.123456\n",
        )
        .unwrap();
        let t = list_local(csv.to_str().unwrap()).unwrap();
        let id = &t.inputs[0].identity;
        assert_eq!(
            (id.size, id.etag.as_deref(), id.updated),
            (Some(7), Some("e1"), Some(when))
        );

        // `size` elsewhere is any column; a local file's identity is its own.
        std::fs::write(d.path().join("a.png"), b"xyz").unwrap();
        std::fs::write(&csv, "path,size\na.png,large\n").unwrap();
        let t = list_local(csv.to_str().unwrap()).unwrap();
        assert_eq!(t.carried_columns, ["size"]);
        assert_eq!(t.inputs[0].identity.size, Some(3));

        // Values that are not what the column says are refused, naming the line.
        for (row, bad) in [
            (
                "gs://b/a.jpg,1,big,",
                "`size` is \"big\", not a size in bytes",
            ),
            ("gs://b/a.jpg,1,-4,", "not a size in bytes"),
            (
                "gs://b/a.jpg,1,4,yesterday",
                "`updated` is \"yesterday\", not a timestamp",
            ),
        ] {
            std::fs::write(&csv, format!("uri,generation,size,updated\n{row}\n")).unwrap();
            let e = format!("{:#}", list_local(csv.to_str().unwrap()).unwrap_err());
            assert!(e.contains(bad) && e.contains("t.csv:2"), "{e}");
        }
    }
}
