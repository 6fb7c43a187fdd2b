//! Finding a model's files: a local directory, or a Hugging Face hub
//! repository through `hf-hub` and its cache.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use mmembed_core::EmbedError;

/// Files a CLIP checkpoint needs.
///
/// An open_clip checkpoint (MobileCLIP) has `open_clip_config.json` as both
/// its `config` and its `preprocessor` (open_clip keeps the preprocessing
/// in `preprocess_cfg` there), `open_clip_model.safetensors` as its weights
/// and the `tokenizer.json` its repository ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// `config.json`, or `open_clip_config.json`.
    pub config: PathBuf,
    /// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`; where a checkpoint has none, `spiece.model`
    /// (SigLIP) or `vocab.txt` (Chinese-CLIP's BERT, with the
    /// `tokenizer_config.json` beside it when there is one).
    pub tokenizer: PathBuf,
    /// `preprocessor_config.json`.
    pub preprocessor: PathBuf,
}

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
const OTHERS: [&str; 3] = ["config.json", "tokenizer.json", "preprocessor_config.json"];
/// An open_clip repository's config (model and preprocessing) and weights.
pub(crate) const OPEN_CLIP_CONFIG: &str = "open_clip_config.json";
const OPEN_CLIP_WEIGHTS: &str = "open_clip_model.safetensors";
/// What a SigLIP v1 repository has instead of `tokenizer.json`.
const SPIECE: &str = "spiece.model";
/// What a Chinese-CLIP repository has instead of `tokenizer.json`, and the
/// file with its tokenizer's options.
const VOCAB: &str = "vocab.txt";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// How to reach the hub. [`HubOptions::from_env`] reads the variables
/// `huggingface_hub` users already set.
#[derive(Clone, Default)]
pub struct HubOptions {
    /// Never touch the network; use only the cache (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Cache directory (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Hub URL (`HF_ENDPOINT`), e.g. a mirror.
    pub endpoint: Option<String>,
    /// Access token for gated or private repositories (`HF_TOKEN`).
    pub token: Option<String>,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("offline", &self.offline)
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubOptions {
    /// Reads `HF_HUB_OFFLINE`, `HF_HOME` / `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            cache_dir: var("HF_HUB_CACHE")
                .map(PathBuf::from)
                .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub"))),
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
        }
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(d) => Cache::new(d.clone()),
            None => Cache::from_env(),
        }
    }
}

fn load_err(model: &str, reason: String, source: Option<crate::Source>) -> EmbedError {
    EmbedError::ModelLoad {
        model: model.to_string(),
        reason,
        source,
    }
}

/// The files of a checkpoint directory.
pub fn local_files(dir: &Path) -> Result<ModelFiles, EmbedError> {
    let model = dir.display().to_string();
    // What the directory is missing, against the layout it must have.
    let need_in = |name: &str, layout: &str| -> Result<PathBuf, EmbedError> {
        let p = dir.join(name);
        p.is_file()
            .then_some(p)
            .ok_or_else(|| load_err(&model, format!("{name} is missing; {layout}"), None))
    };
    if !dir.join(OTHERS[0]).is_file() && dir.join(OPEN_CLIP_CONFIG).is_file() {
        let need = |name: &str| {
            need_in(
                name,
                &format!(
                    "an open_clip checkpoint directory needs {OPEN_CLIP_CONFIG}, \
                     {OPEN_CLIP_WEIGHTS} and tokenizer.json (the MobileCLIP repositories ship \
                     all three; open_clip_pytorch_model.bin alone is not read)"
                ),
            )
        };
        let config = need(OPEN_CLIP_CONFIG)?;
        return Ok(ModelFiles {
            weights: vec![need(OPEN_CLIP_WEIGHTS)?],
            tokenizer: need(OTHERS[1])?,
            preprocessor: config.clone(),
            config,
        });
    }
    let need = |name: &str| {
        need_in(
            name,
            "a checkpoint directory needs config.json, model.safetensors (or \
             model.safetensors.index.json), tokenizer.json and preprocessor_config.json",
        )
    };
    let weights = if dir.join(SINGLE).is_file() {
        vec![dir.join(SINGLE)]
    } else {
        let index = need(INDEX)?;
        shard_names(&index, &model)?
            .into_iter()
            .map(|s| need(&s))
            .collect::<Result<_, _>>()?
    };
    Ok(ModelFiles {
        config: need(OTHERS[0])?,
        weights,
        tokenizer: match [SPIECE, VOCAB].map(|n| dir.join(n)) {
            _ if dir.join(OTHERS[1]).is_file() => need(OTHERS[1])?,
            [spiece, _] if spiece.is_file() => spiece,
            [_, vocab] if vocab.is_file() => vocab,
            _ => need(OTHERS[1])?,
        },
        preprocessor: need(OTHERS[2])?,
    })
}

fn shard_names(index: &Path, model: &str) -> Result<Vec<String>, EmbedError> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| load_err(model, format!("cannot read {INDEX}"), Some(Arc::new(e))))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| load_err(model, format!("{INDEX} is not JSON"), Some(Arc::new(e))))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| load_err(model, format!("{INDEX} has no weight_map"), None))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    if names.iter().any(|n| n.contains('/') || n.contains("..")) {
        return Err(load_err(
            model,
            format!("{INDEX} names a shard outside the repository"),
            None,
        ));
    }
    Ok(names)
}

/// `e` (a repository's missing weights) saying that open_clip's layout was
/// looked for too.
fn also_no_open_clip(e: EmbedError) -> EmbedError {
    match e {
        EmbedError::ModelLoad {
            model,
            reason,
            source,
        } => EmbedError::ModelLoad {
            model,
            reason: format!(
                "{reason} (nor is {OPEN_CLIP_CONFIG}, which an open_clip checkpoint such as \
                 MobileCLIP has instead)"
            ),
            source,
        },
        other => other,
    }
}

/// Gets one file of the repository, from the cache or the network.
type FetchFn = dyn Fn(&str) -> Result<PathBuf, EmbedError>;

/// Fetches (or finds in the cache) a hub repository's checkpoint files at
/// `revision`. Offline, only the cache is used, and a miss says how to get
/// the weights.
pub fn hub_files(repo: &str, revision: &str, opts: &HubOptions) -> Result<ModelFiles, EmbedError> {
    let model = format!("{repo}@{revision}");
    let hub_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    let cache = opts.cache();
    let get: Box<FetchFn> = if opts.offline {
        let cached = cache.repo(hub_repo.clone());
        let cache_path = cache.path().display().to_string();
        let model = model.clone();
        Box::new(move |name: &str| {
            cached.get(name).ok_or_else(|| {
                load_err(
                    &model,
                    format!(
                        "{name} is not in the Hugging Face cache ({cache_path}) and HF_HUB_OFFLINE \
                         is set. Fetch the model once with network access (unset HF_HUB_OFFLINE), \
                         copy a cache that has it into HF_HOME, or pass a local directory holding \
                         config.json, model.safetensors, tokenizer.json and preprocessor_config.json \
                         (an open_clip checkpoint: {OPEN_CLIP_CONFIG}, {OPEN_CLIP_WEIGHTS} and \
                         tokenizer.json)"
                    ),
                    None,
                )
            })
        })
    } else {
        let mut builder = ApiBuilder::from_cache(cache).with_progress(false);
        if let Some(e) = &opts.endpoint {
            builder = builder.with_endpoint(e.trim_end_matches('/').to_string());
        }
        if let Some(t) = &opts.token {
            builder = builder.with_token(Some(t.clone()));
        }
        let api = builder
            .build()
            .map_err(|e| load_err(&model, format!("cannot set up the hub client: {e}"), None))?;
        let api_repo = api.repo(hub_repo);
        let model = model.clone();
        Box::new(move |name: &str| {
            tracing::info!(model = %model, file = name, "fetching from the hub (or its cache)");
            api_repo.get(name).map_err(|e| {
                // hf-hub's errors carry URLs, never the token.
                load_err(&model, format!("cannot fetch {name}: {e}"), None)
            })
        })
    };
    let weights = match get(SINGLE) {
        Ok(p) => vec![p],
        Err(single_err) => match get(INDEX) {
            Ok(index) => shard_names(&index, &model)?
                .iter()
                .map(|s| get(s))
                .collect::<Result<_, _>>()?,
            Err(_) => match get(OPEN_CLIP_CONFIG) {
                // An open_clip repository (MobileCLIP): its config holds
                // the preprocessing too.
                Ok(config) => {
                    return Ok(ModelFiles {
                        weights: vec![get(OPEN_CLIP_WEIGHTS)?],
                        tokenizer: get(OTHERS[1])?,
                        preprocessor: config.clone(),
                        config,
                    });
                }
                // Neither layout: the first error, saying the other was
                // looked for too.
                Err(_) => return Err(also_no_open_clip(single_err)),
            },
        },
    };
    Ok(ModelFiles {
        config: get(OTHERS[0])?,
        weights,
        tokenizer: match get(OTHERS[1]) {
            Ok(p) => p,
            Err(json_err) => match get(SPIECE) {
                Ok(p) => p,
                Err(_) => {
                    let vocab = get(VOCAB).map_err(|_| json_err)?;
                    // Into the same snapshot directory, where the loader
                    // looks for it; BERT's defaults when there is none.
                    let _ = get(TOKENIZER_CONFIG);
                    vocab
                }
            },
        },
        preprocessor: get(OTHERS[2])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_token() {
        let o = HubOptions {
            token: Some("hf_secret123".into()),
            ..Default::default()
        };
        let s = format!("{o:?}");
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("<redacted>"));
    }

    #[test]
    fn missing_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        let e = local_files(d.path()).unwrap_err().to_string();
        assert!(e.contains("model.safetensors.index.json is missing"), "{e}");
        std::fs::write(d.path().join("model.safetensors"), "").unwrap();
        let e = local_files(d.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json is missing"), "{e}");
    }

    #[test]
    fn sharded_index_is_followed_and_confined() {
        let d = tempfile::tempdir().unwrap();
        for f in OTHERS {
            std::fs::write(d.path().join(f), "{}").unwrap();
        }
        std::fs::write(
            d.path().join(INDEX),
            r#"{"weight_map": {"a": "model-00002.safetensors", "b": "model-00001.safetensors", "c": "model-00001.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("model-00001.safetensors"), "").unwrap();
        std::fs::write(d.path().join("model-00002.safetensors"), "").unwrap();
        let f = local_files(d.path()).unwrap();
        assert_eq!(f.weights.len(), 2);
        assert!(f.weights[0].ends_with("model-00001.safetensors"));
        std::fs::write(
            d.path().join(INDEX),
            r#"{"weight_map": {"a": "../evil.safetensors"}}"#,
        )
        .unwrap();
        assert!(local_files(d.path()).is_err());
    }
}
