//! Hub loading against a fake Hugging Face hub on loopback, serving the
//! fixture checkpoint the way the hub does (`/{repo}/resolve/{rev}/{file}`,
//! range requests, `etag` / `x-repo-commit` / `content-range` headers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use mmembed_candle::{DeviceSpec, HubOptions, LocalEmbedder, LocalOptions};
use mmembed_core::{EmbedError, EmbedRequest, Embedder};
use sha2::{Digest, Sha256};

const REPO: &str = "acme/tiny-clip";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct FakeHub {
    url: String,
    requests: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the hub answers for one request: the file's bytes (or the range
/// asked for), as the hub sends them, else its 404.
fn respond(
    files: &HashMap<String, Vec<u8>>,
    (repo, commit): (&str, &str),
    path: &str,
    range: Option<&str>,
) -> Response {
    let prefix = format!("/{repo}/resolve/");
    let file = path
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split_once('/'))
        .map(|(_rev, f)| f);
    let Some(body) = file.and_then(|f| files.get(f)) else {
        return Response::builder()
            .status(404)
            .header("x-error-code", "EntryNotFound")
            .body(Body::from("Entry not found"))
            .unwrap();
    };
    let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b = if b.is_empty() {
                body.len() - 1
            } else {
                b.parse().unwrap()
            };
            (a, b.min(body.len() - 1))
        }
        None => (0, body.len() - 1),
    };
    Response::builder()
        .status(206)
        .header("etag", format!("\"{:x}\"", Sha256::digest(body)))
        .header("x-repo-commit", commit)
        .header(
            "content-range",
            format!("bytes {start}-{end}/{}", body.len()),
        )
        .body(Body::from(body[start..=end].to_vec()))
        .unwrap()
}

/// Serves the checkpoint in `dir` as [`REPO`] at [`COMMIT`].
fn serve(dir: &Path) -> FakeHub {
    serve_as(dir, REPO, COMMIT)
}

/// Serves the checkpoint in `dir` as `repo` at `commit` on a free loopback
/// port, on a thread of its own (the tests that load from it block, some
/// outside any runtime).
fn serve_as(dir: &Path, repo: &'static str, commit: &'static str) -> FakeHub {
    let mut files = HashMap::new();
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ] {
        if let Ok(bytes) = std::fs::read(dir.join(name)) {
            files.insert(name.to_string(), bytes);
        }
    }
    let files = Arc::new(files);
    let requests = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (n, l) = (requests.clone(), log.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let app = axum::Router::new().fallback(move |req: Request| {
                let (files, n, l) = (files.clone(), n.clone(), l.clone());
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    let path = req.uri().path().to_string();
                    l.lock().unwrap().push(path.clone());
                    let range = req.headers().get("range").and_then(|v| v.to_str().ok());
                    respond(&files, (repo, commit), &path, range)
                }
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    FakeHub {
        url: format!("http://{addr}"),
        requests,
        log,
        stop: Some(stop),
        thread: Some(thread),
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/tiny-clip")
}

fn load(cache: &Path, endpoint: Option<&str>, offline: bool) -> Result<LocalEmbedder, EmbedError> {
    let hub = HubOptions {
        offline,
        cache_dir: Some(cache.to_path_buf()),
        endpoint: endpoint.map(str::to_string),
        token: Some("hf_test_secret_token".into()),
    };
    LocalEmbedder::load_blocking(
        LocalOptions::new(format!("{REPO}@{COMMIT}"))
            .with_device(DeviceSpec::Cpu)
            .with_hub(hub),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_then_warm_cache_offline_then_cold_cache_offline() {
    let hub = serve(&fixture_dir());
    let cache = tempfile::tempdir().unwrap();

    // 1. First use downloads into the cache.
    let e = load(cache.path(), Some(&hub.url), false).unwrap();
    let first = hub.requests.load(Ordering::SeqCst);
    assert!(first >= 8, "metadata + download per file, got {first}");
    let log = hub.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|p| p == &format!("/{REPO}/resolve/{COMMIT}/model.safetensors"))
    );
    let online = e
        .embed(EmbedRequest::text("a photo of a cat"))
        .await
        .unwrap();
    // The space follows the weights: the same as loading the directory.
    let direct = LocalEmbedder::load_blocking(
        LocalOptions::new(fixture_dir().to_str().unwrap()).with_device(DeviceSpec::Cpu),
    )
    .unwrap();
    assert_eq!(e.info().space, direct.info().space);
    let snapshot = cache
        .path()
        .join("models--acme--tiny-clip/snapshots")
        .join(COMMIT);
    assert!(snapshot.join("model.safetensors").exists());

    // 2. Warm cache, offline: no request reaches the hub.
    let before = hub.requests.load(Ordering::SeqCst);
    let e2 = load(cache.path(), Some(&hub.url), true).unwrap();
    assert_eq!(hub.requests.load(Ordering::SeqCst), before);
    let offline = e2
        .embed(EmbedRequest::text("a photo of a cat"))
        .await
        .unwrap();
    assert_eq!(online.text, offline.text);

    // Warm cache, online: served from the cache too.
    let _ = load(cache.path(), Some(&hub.url), false).unwrap();
    assert_eq!(hub.requests.load(Ordering::SeqCst), before);

    // 3. Cold cache, offline: a clear error that says how to get the weights.
    let cold = tempfile::tempdir().unwrap();
    let err = load(cold.path(), Some(&hub.url), true).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EmbedError::ModelLoad { .. }), "{err:?}");
    for needle in [
        "HF_HUB_OFFLINE",
        "not in the Hugging Face cache",
        "local directory",
        REPO,
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in: {msg}");
    }
    assert!(!msg.contains("hf_test_secret_token"));
    assert_eq!(hub.requests.load(Ordering::SeqCst), before);
}

/// An open_clip repository (MobileCLIP's layout: no config.json or
/// model.safetensors) is fetched as its files and loads as the directory
/// does; offline with a cold cache, the error names both layouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_clip_repositories_are_fetched_by_their_own_names() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/tiny-mobileclip");
    let hub = serve(&dir);
    let cache = tempfile::tempdir().unwrap();
    let opts = |offline: bool, cache: &Path| {
        // The fake hub serves this fixture under its one repository name.
        LocalOptions::new(format!("{REPO}@{COMMIT}"))
            .with_device(DeviceSpec::Cpu)
            .with_hub(HubOptions {
                offline,
                cache_dir: Some(cache.to_path_buf()),
                endpoint: Some(hub.url.clone()),
                token: None,
            })
    };
    let e = LocalEmbedder::load_blocking(opts(false, cache.path())).unwrap();
    let log = hub.log.lock().unwrap().clone();
    for f in [
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "tokenizer.json",
    ] {
        assert!(
            log.iter().any(|p| p.ends_with(f)),
            "{f} not fetched: {log:?}"
        );
    }
    let direct = LocalEmbedder::load_blocking(
        LocalOptions::new(dir.to_str().unwrap()).with_device(DeviceSpec::Cpu),
    )
    .unwrap();
    assert_eq!(e.info().space, direct.info().space);
    let a = e
        .embed(EmbedRequest::text("a photo of a cat"))
        .await
        .unwrap();
    let b = direct
        .embed(EmbedRequest::text("a photo of a cat"))
        .await
        .unwrap();
    assert_eq!(a.text, b.text);
    let cold = tempfile::tempdir().unwrap();
    let msg = LocalEmbedder::load_blocking(opts(true, cold.path()))
        .unwrap_err()
        .to_string();
    for needle in [
        "model.safetensors",
        "open_clip_config.json",
        "HF_HUB_OFFLINE",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in: {msg}");
    }
}

/// A built-in id (here SigLIP 2 NaFlex's) is fetched at its manifest's
/// pinned revision, not `main`, and its vectors live in the manifest's
/// space; the fake hub serves the tiny NaFlex fixture under that name, and
/// it embeds as the directory does (aspect-kept grids, lower-cased texts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_ids_are_fetched_at_their_pinned_revision() {
    let id = "google/siglip2-base-patch16-naflex";
    let m = mmembed_candle::Manifest::find(id).unwrap();
    assert_eq!((m.repo.as_str(), m.family.as_str()), (id, "siglip2"));
    let revision: &'static str = m.revision.clone().leak();
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/tiny-siglip2-naflex");
    let hub = serve_as(&dir, id, revision);
    let cache = tempfile::tempdir().unwrap();
    let e =
        LocalEmbedder::load_blocking(LocalOptions::new(id).with_device(DeviceSpec::Cpu).with_hub(
            HubOptions {
                offline: false,
                cache_dir: Some(cache.path().to_path_buf()),
                endpoint: Some(hub.url.clone()),
                token: None,
            },
        ))
        .unwrap();
    let log = hub.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|p| p == &format!("/{id}/resolve/{revision}/model.safetensors")),
        "{log:?}"
    );
    assert!(!log.iter().any(|p| p.contains("/main/")), "{log:?}");
    assert_eq!(e.info().space.as_str(), m.space);
    let direct = LocalEmbedder::load_blocking(
        LocalOptions::new(dir.to_str().unwrap()).with_device(DeviceSpec::Cpu),
    )
    .unwrap();
    let panorama = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/fixtures/images/coffee_panorama_600x120.png");
    for req in [
        EmbedRequest::text("A Photo of a CAT"),
        EmbedRequest::image(panorama.as_path()),
    ] {
        let (a, b) = (
            e.embed(req.clone()).await.unwrap(),
            direct.embed(req).await.unwrap(),
        );
        assert_eq!((a.text, a.image), (b.text, b.image));
    }
}

#[test]
fn missing_repository_and_unreachable_hub_are_clear_errors() {
    let hub = serve(&fixture_dir());
    let cache = tempfile::tempdir().unwrap();
    let hub_opts = HubOptions {
        offline: false,
        cache_dir: Some(cache.path().to_path_buf()),
        endpoint: Some(hub.url.clone()),
        token: Some("hf_test_secret_token".into()),
    };
    let err = LocalEmbedder::load_blocking(
        LocalOptions::new("acme/does-not-exist")
            .with_device(DeviceSpec::Cpu)
            .with_hub(hub_opts.clone()),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("acme/does-not-exist@main"), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(!msg.contains("hf_test_secret_token"), "{msg}");

    // Nothing listens on this port once the listener is dropped.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = LocalEmbedder::load_blocking(
        LocalOptions::new(format!("{REPO}@{COMMIT}"))
            .with_device(DeviceSpec::Cpu)
            .with_hub(HubOptions {
                endpoint: Some(format!("http://127.0.0.1:{port}")),
                ..hub_opts
            }),
    )
    .unwrap_err();
    assert!(matches!(err, EmbedError::ModelLoad { .. }), "{err:?}");

    let err = LocalEmbedder::load_blocking(LocalOptions::new("./no/such/dir")).unwrap_err();
    assert!(
        err.to_string().contains("not a checkpoint directory"),
        "{err}"
    );
}
