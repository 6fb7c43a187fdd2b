//! The demo model, shipped inside the library so that `mmembed/demo` works
//! offline from any directory, without the repository checkout.
//!
//! It is the tiny shapes-and-colours CLIP trained by `mmembed-shapes` (see
//! `models/demo/README.md`): it knows 6 shapes and 8 colours, nothing else.
//! The files are compiled in (1.4 MB) and written once to a cache directory,
//! because the loader, like every checkpoint's, reads files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mmembed_core::EmbedError;

/// The id that selects the demo model (`"demo"` is accepted too).
pub const DEMO_MODEL_ID: &str = "mmembed/demo";

const FILES: [(&str, &[u8]); 4] = [
    (
        "config.json",
        include_bytes!("../../../models/demo/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../models/demo/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../models/demo/tokenizer.json"),
    ),
    (
        "preprocessor_config.json",
        include_bytes!("../../../models/demo/preprocessor_config.json"),
    ),
];

/// Whether `id` names the demo model.
pub fn is_demo(id: &str) -> bool {
    id == DEMO_MODEL_ID || id == "demo"
}

/// The cache root: `$MMEMBED_CACHE_DIR`, else `$XDG_CACHE_HOME/mmembed`, else
/// `~/.cache/mmembed`, else the temporary directory.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("MMEMBED_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("mmembed");
    }
    if let Some(h) = var("HOME") {
        return PathBuf::from(h).join(".cache").join("mmembed");
    }
    std::env::temp_dir().join("mmembed")
}

/// The demo model's directory under `root`, written there on first use.
///
/// The directory name carries a hash of the files, so a rebuilt library with
/// a retrained model never reads stale files, and it appears by one atomic
/// rename, so concurrent processes and crashes never leave a half-written
/// model behind.
///
/// ```
/// let root = tempfile::tempdir().unwrap();
/// let dir = mmembed_candle::demo_model_dir(root.path()).unwrap();
/// assert!(dir.join("model.safetensors").is_file());
/// mmembed_candle::local_files(&dir).unwrap();
/// ```
pub fn demo_model_dir(root: &Path) -> Result<PathBuf, EmbedError> {
    let mut h = blake3::Hasher::new();
    for (name, bytes) in FILES {
        h.update(name.as_bytes());
        h.update(bytes);
    }
    let hex = h.finalize().to_hex();
    let dir = root.join(format!("demo-{}", &hex[..16]));
    if dir.is_dir() {
        return Ok(dir);
    }
    let io = |what: &str, e: std::io::Error| EmbedError::ModelLoad {
        model: DEMO_MODEL_ID.into(),
        reason: format!("cannot {what} under {}", root.display()),
        source: Some(Arc::new(e)),
    };
    std::fs::create_dir_all(root).map_err(|e| io("create the cache directory", e))?;
    let tmp = tempfile_dir(root).map_err(|e| io("create a temporary directory", e))?;
    for (name, bytes) in FILES {
        std::fs::write(tmp.join(name), bytes).map_err(|e| io("write the demo model", e))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process got there first; its copy is identical.
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(io("move the demo model into place", e))
        }
    }
}

fn tempfile_dir(root: &Path) -> std::io::Result<PathBuf> {
    for n in 0..1000u32 {
        let p = root.join(format!(".demo-tmp-{}-{n}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary directory name"))
}
