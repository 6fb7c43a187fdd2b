//! One writer per output: `out.parquet.lock` next to the output.
//!
//! - **Local**: an advisory `flock` on the lock file (the kernel drops it
//!   when the process dies, `kill -9` included), with the holder written in
//!   the file for the refusal message.
//! - **Bucket**: a lock object created only if absent (GCS
//!   `ifGenerationMatch=0`, S3 `If-None-Match: *`) holding the holder and
//!   an expiry the job renews; an expired lock, or one whose process is
//!   gone from this machine, is taken over.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use mmembed_store::{PutMode, StoreError, Stores};
use serde::{Deserialize, Serialize};

use crate::output::Location;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    started: DateTime<Utc>,
    expires: DateTime<Utc>,
    /// Tells this job's lock from another's with the same host and pid.
    token: String,
}

impl Holder {
    fn new(ttl: Duration) -> Self {
        let now = Utc::now();
        Self {
            host: hostname(),
            pid: std::process::id(),
            started: now,
            expires: now + ttl,
            token: format!("{:016x}", fastrand::u64(..)),
        }
    }

    fn describe(&self) -> String {
        format!(
            "pid {} on {}, started {}",
            self.pid,
            self.host,
            self.started.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }

    /// Whether the holder is certainly gone: its lease ran out, or it ran
    /// on this machine and its process no longer exists.
    fn stale(&self) -> bool {
        if self.expires < Utc::now() {
            return true;
        }
        self.host == hostname()
            && Path::new("/proc/self").exists()
            && !Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// The lock's MIME type. JSON inside, but not `application/json`: the GCS
/// emulator on PyPI parses such upload bodies as JSON and fails.
const LOCK_TYPE: &str = "text/plain; charset=utf-8";

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Held while the job writes its output.
pub enum OutputLock {
    Local {
        path: PathBuf,
        // Holds the flock; closed (unlocked) after the file is removed.
        file: File,
    },
    Remote {
        uri: String,
        token: String,
        renew: tokio::task::JoinHandle<()>,
    },
}

fn refuse(output: &str, holder: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{output} is being written by another job ({holder}); wait for it to finish or stop it \
         (its lock: {output}.lock)"
    )
}

impl OutputLock {
    /// Takes the lock of `output` or says who holds it.
    pub async fn acquire(output: &Location, ttl: Duration) -> anyhow::Result<Self> {
        match output {
            Location::Local(p) => Self::local(p),
            Location::Remote(u) => Self::remote(u, ttl).await,
        }
    }

    fn local(output: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = output.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut name = output.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        // A lock file removed by its finishing holder between our open and
        // our flock would lock a deleted file: check we locked the file that
        // is at the path, else start over.
        for _ in 0..10 {
            let mut file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    file.read_to_string(&mut text).ok();
                    let holder = serde_json::from_str::<Holder>(&text)
                        .map(|h| h.describe())
                        .unwrap_or_else(|_| "holder unknown".into());
                    bail!(refuse(&output.display().to_string(), &holder));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            }
            if !same_file(&file, &path) {
                continue;
            }
            let holder = Holder::new(Duration::from_secs(365 * 24 * 3600));
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(serde_json::to_string(&holder)?.as_bytes())?;
            return Ok(Self::Local { path, file });
        }
        bail!("cannot lock {}: it keeps being replaced", path.display())
    }

    async fn remote(output: &str, ttl: Duration) -> anyhow::Result<Self> {
        let uri = format!("{output}.lock");
        let stores = Stores::shared();
        let me = Holder::new(ttl);
        let body = Bytes::from(serde_json::to_vec(&me)?);
        let mut last_error = None;
        for attempt in 0..8 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(5))).await;
            }
            let mode = match stores.read(&uri, 1 << 20).await {
                Ok((bytes, _)) => match serde_json::from_slice::<Holder>(&bytes) {
                    // An earlier attempt's write landed although its answer
                    // was lost (a create is not retried by the store layer).
                    Ok(h) if h.token == me.token => {
                        return Ok(Self::held(uri, &me, ttl));
                    }
                    Ok(h) if !h.stale() => bail!(refuse(output, &h.describe())),
                    Ok(h) => {
                        tracing::warn!(lock = %uri, holder = %h.describe(), "taking over a stale lock");
                        PutMode::Overwrite
                    }
                    Err(_) => bail!(
                        "{uri} exists but is not an mmembed lock; remove it if no job writes {output}"
                    ),
                },
                Err(StoreError::NotFound { .. }) => PutMode::Create,
                Err(e @ StoreError::Transport { .. }) => {
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("reading the lock {uri}")),
            };
            match stores.put(&uri, body.clone(), LOCK_TYPE, mode).await {
                // Read back on the next turn: a racing job that overwrote a
                // stale lock at the same moment shows there.
                Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(e @ StoreError::Transport { .. }) => last_error = Some(e),
                Err(e) => return Err(e).with_context(|| format!("writing the lock {uri}")),
            }
        }
        match last_error {
            Some(e) => Err(e).with_context(|| format!("taking the lock {uri}")),
            None => bail!("cannot take the lock {uri}: other jobs keep taking it"),
        }
    }

    fn held(uri: String, me: &Holder, ttl: Duration) -> Self {
        let renew = tokio::spawn(renew(uri.clone(), me.clone(), ttl));
        Self::Remote {
            uri,
            token: me.token.clone(),
            renew,
        }
    }

    /// Gives the lock up.
    pub async fn release(self) {
        match self {
            Self::Local { path, file } => {
                std::fs::remove_file(&path).ok();
                drop(file);
            }
            Self::Remote { uri, token, renew } => {
                renew.abort();
                let stores = Stores::shared();
                // Only our own lock: after a long stall another job may hold it.
                if let Ok((bytes, _)) = stores.read(&uri, 1 << 20).await
                    && serde_json::from_slice::<Holder>(&bytes).is_ok_and(|h| h.token == token)
                    && let Err(e) = stores.delete(&uri).await
                {
                    tracing::warn!(lock = %uri, error = %e, "could not remove the lock; it expires by itself");
                }
            }
        }
    }
}

async fn renew(uri: String, mut me: Holder, ttl: Duration) {
    let every = (ttl / 3).max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        me.expires = Utc::now() + ttl;
        let Ok(body) = serde_json::to_vec(&me) else {
            return;
        };
        if let Err(e) = Stores::shared()
            .put(&uri, Bytes::from(body), LOCK_TYPE, PutMode::Overwrite)
            .await
        {
            tracing::warn!(lock = %uri, error = %e, "could not renew the output lock");
        }
    }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}
