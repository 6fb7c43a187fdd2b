//! Hub loading against a fake Hugging Face hub on loopback, serving the
//! fixture checkpoint the way the hub does (`/{repo}/resolve/{rev}/{file}`,
//! range requests, `etag` / `x-repo-commit` / `content-range` headers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use mmembed_candle::{DeviceSpec, HubOptions, LocalEmbedder, LocalOptions};
use mmembed_core::{EmbedError, EmbedRequest, Embedder};
use sha2::{Digest, Sha256};

const REPO: &str = "acme/tiny-clip";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct FakeHub {
    url: String,
    requests: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<String>>>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(dir: &Path) -> FakeHub {
    let mut files = HashMap::new();
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ] {
        files.insert(name.to_string(), std::fs::read(dir.join(name)).unwrap());
    }
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!("http://{}", server.server_addr().to_ip().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (s, n, l) = (server.clone(), requests.clone(), log.clone());
    let thread = std::thread::spawn(move || {
        for req in s.incoming_requests() {
            n.fetch_add(1, Ordering::SeqCst);
            let path = req.url().to_string();
            l.lock().unwrap().push(path.clone());
            let prefix = format!("/{REPO}/resolve/");
            let file = path
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('/'))
                .map(|(_rev, f)| f.to_string());
            let Some(body) = file.as_ref().and_then(|f| files.get(f)) else {
                let _ = req.respond(
                    tiny_http::Response::from_string("Entry not found")
                        .with_status_code(404)
                        .with_header(
                            tiny_http::Header::from_bytes("x-error-code", "EntryNotFound").unwrap(),
                        ),
                );
                continue;
            };
            let range = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Range"))
                .map(|h| h.value.as_str().to_string());
            let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
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
            let etag = format!("\"{:x}\"", Sha256::digest(body));
            let header = |k: &str, v: &str| tiny_http::Header::from_bytes(k, v).unwrap();
            let resp = tiny_http::Response::from_data(body[start..=end].to_vec())
                .with_status_code(206)
                .with_header(header("etag", &etag))
                .with_header(header("x-repo-commit", COMMIT))
                .with_header(header(
                    "content-range",
                    &format!("bytes {start}-{end}/{}", body.len()),
                ));
            let _ = req.respond(resp);
        }
    });
    FakeHub {
        url,
        requests,
        log,
        server,
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
