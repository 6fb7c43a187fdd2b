//! Where a job's output, its parts and its lock live: a local path or a
//! bucket object, written whole (atomic rename locally; one put or one
//! completed multipart upload in a bucket). Shared by `batch` and
//! `generate`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use mmembed_store::{PutMode, Stores};

use crate::inputs;
use crate::rows::{self, Format};

/// Where the output, its parts and its lock live: a local path or a bucket.
pub(crate) enum Location {
    Local(PathBuf),
    Remote(String),
}

impl Location {
    pub(crate) fn parse(s: &str) -> Self {
        if mmembed_store::is_remote(s) {
            Self::Remote(s.to_string())
        } else {
            Self::Local(inputs::absolute(Path::new(
                s.strip_prefix("file://").unwrap_or(s),
            )))
        }
    }

    pub(crate) fn display(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::Remote(u) => u.clone(),
        }
    }

    /// The same location with `suffix` appended to its name.
    pub(crate) fn suffixed(&self, suffix: &str) -> Self {
        match self {
            Self::Local(p) => {
                let mut s = p.clone().into_os_string();
                s.push(suffix);
                Self::Local(PathBuf::from(s))
            }
            Self::Remote(u) => Self::Remote(format!("{u}{suffix}")),
        }
    }

    pub(crate) async fn exists(&self) -> anyhow::Result<bool> {
        match self {
            Self::Local(p) => Ok(p.exists()),
            Self::Remote(u) => Ok(Stores::shared().exists(u).await?),
        }
    }

    pub(crate) async fn read(&self) -> anyhow::Result<Bytes> {
        match self {
            Self::Local(p) => Ok(Bytes::from(
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )),
            Self::Remote(u) => Ok(Stores::shared().read(u, u64::MAX).await?.0),
        }
    }

    /// Writes the whole object at once (atomic rename locally; one put or
    /// one completed multipart upload in a bucket).
    pub(crate) async fn write(&self, bytes: Vec<u8>, content_type: &str) -> anyhow::Result<()> {
        match self {
            Self::Local(p) => rows::write_file_atomic(p, &bytes),
            Self::Remote(u) => Ok(Stores::shared()
                .put(u, Bytes::from(bytes), content_type, PutMode::Overwrite)
                .await?),
        }
    }

    /// Writes the local file `from` here whole (renamed over a local path;
    /// one upload, visible when complete, to a bucket), streamed.
    pub(crate) async fn upload(&self, from: &Path, content_type: &str) -> anyhow::Result<()> {
        match self {
            Self::Local(p) => std::fs::rename(from, p)
                .with_context(|| format!("renaming {} to {}", from.display(), p.display())),
            Self::Remote(u) => Ok(Stores::shared().upload(u, from, content_type).await?),
        }
    }

    pub(crate) async fn remove(&self) -> anyhow::Result<()> {
        match self {
            Self::Local(p) => match std::fs::remove_file(p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
            },
            Self::Remote(u) => Ok(Stores::shared().delete(u).await?),
        }
    }
}

pub(crate) struct Output {
    pub(crate) path: Location,
    pub(crate) parts: Location,
    pub(crate) format: Format,
}

/// An output and its parts (see the `batch` module docs for the layout).
impl Output {
    pub(crate) fn new(path: &str, format: Option<Format>) -> anyhow::Result<Self> {
        let format = format
            .or_else(|| Format::from_path(Path::new(path)))
            .with_context(|| {
                format!(
                    "cannot tell the format of {path}: name it .parquet or .jsonl, or pass --format"
                )
            })?;
        let name = path.rsplit('/').next().unwrap_or_default();
        if name.is_empty() || name == "." || name == ".." {
            bail!("the output `{path}` has no file name");
        }
        let path = Location::parse(path);
        let parts = path.suffixed(".parts");
        Ok(Self {
            path,
            parts,
            format,
        })
    }

    pub(crate) fn part_name(&self, n: u64) -> String {
        format!("part-{n:06}.{}", self.format.ext())
    }

    /// Finished parts in order, removing temporary files a crash left.
    pub(crate) async fn part_files(&self) -> anyhow::Result<Vec<(u64, Location)>> {
        let mut parts = vec![];
        let parse = |name: &str| -> Option<u64> {
            name.strip_prefix("part-")
                .and_then(|r| r.strip_suffix(&format!(".{}", self.format.ext())))
                .and_then(|n| n.parse().ok())
        };
        match &self.parts {
            Location::Local(dir) => {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    return Ok(parts);
                };
                for e in entries {
                    let p = e?.path();
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    if name.ends_with(".tmp") {
                        std::fs::remove_file(&p).ok();
                        continue;
                    }
                    match parse(&name) {
                        Some(n) => parts.push((n, Location::Local(p))),
                        None => {
                            tracing::warn!(file = %p.display(), "ignoring a file that is not a part")
                        }
                    }
                }
            }
            Location::Remote(prefix) => {
                for o in Stores::shared().list(&format!("{prefix}/")).await? {
                    let name = o.uri.rsplit('/').next().unwrap_or_default().to_string();
                    match parse(&name) {
                        Some(n) => parts.push((n, Location::Remote(o.uri))),
                        None => {
                            tracing::warn!(object = %o.uri, "ignoring an object that is not a part")
                        }
                    }
                }
            }
        }
        parts.sort_by_key(|(n, _)| *n);
        Ok(parts)
    }

    pub(crate) fn part(&self, n: u64) -> Location {
        match &self.parts {
            Location::Local(d) => Location::Local(d.join(self.part_name(n))),
            Location::Remote(p) => Location::Remote(format!("{p}/{}", self.part_name(n))),
        }
    }

    pub(crate) async fn prepare_parts(&self) -> anyhow::Result<()> {
        if let Location::Local(d) = &self.parts {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    pub(crate) async fn remove_parts(&self) -> anyhow::Result<()> {
        match &self.parts {
            Location::Local(d) => {
                if d.exists() {
                    std::fs::remove_dir_all(d)
                        .with_context(|| format!("removing {}", d.display()))?;
                }
            }
            Location::Remote(_) => {
                for (_, p) in self.part_files().await? {
                    p.remove().await?;
                }
            }
        }
        Ok(())
    }

    /// Whether an input object is this job's own output, one of its parts
    /// or its lock: never an input.
    pub(crate) fn owns(&self, uri: &str) -> bool {
        let out = self.path.display();
        let parts = format!("{}/", self.parts.display());
        uri == out || uri == format!("{out}.lock") || uri.starts_with(&parts)
    }
}
