//! A fault-injecting HTTP proxy on loopback, in front of a real store or
//! emulator: per-request delays, bursts of 503s, and response bodies cut
//! off half-way (the connection dropped after the headers promised more).
//! Used by the bucket tests and the remote-throughput benchmark. And
//! [`FileServer`], a folder served over plain HTTP, for `http://` inputs.
//!
//! ```no_run
//! # async fn demo() {
//! use mmembed_store::testkit::{FaultProxy, Faults};
//! let p = FaultProxy::start("http://127.0.0.1:5000", Faults {
//!     delay: std::time::Duration::from_millis(50),
//!     ..Faults::default()
//! }).await.unwrap();
//! println!("point the client at {}", p.url);
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::Response;
use bytes::Bytes;

/// What the proxy does to requests.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added before every request is forwarded.
    pub delay: Duration,
    /// `(every, burst)`: of each `every` requests, the first `burst` are
    /// answered 503 without reaching the store.
    pub unavailable: Option<(u64, u64)>,
    /// `(every, how_long)`: every n-th request is held this long first
    /// (longer than the client's timeout makes it give up and retry).
    pub slow: Option<(u64, Duration)>,
    /// Every n-th successful GET with a body of 2+ bytes has its body cut
    /// off after half.
    pub cut_body_every: Option<u64>,
}

/// Counts of what happened, to check the faults were really injected.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests received.
    pub requests: AtomicU64,
    /// Answered 503 by the proxy.
    pub unavailable: AtomicU64,
    /// Bodies cut off.
    pub cut: AtomicU64,
    /// Requests held back.
    pub slowed: AtomicU64,
}

struct Shared {
    upstream: String,
    /// The proxy's own `http://127.0.0.1:PORT`.
    url: String,
    faults: Faults,
    stats: Arc<Stats>,
    http: reqwest::Client,
    gets: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// What it did so far.
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://host:port`) on a free
    /// loopback port.
    pub async fn start(upstream: &str, faults: Faults) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            url: url.clone(),
            faults,
            stats: stats.clone(),
            http: reqwest::Client::builder()
                .build()
                .map_err(std::io::Error::other)?,
            gets: AtomicU64::new(0),
        });
        let app = axum::Router::new().fallback(forward).with_state(shared);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, stats, task })
    }
}

const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "transfer-encoding",
    "keep-alive",
    "host",
    "content-length",
];

async fn forward(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let n = s.stats.requests.fetch_add(1, Ordering::Relaxed);
    if !s.faults.delay.is_zero() {
        tokio::time::sleep(s.faults.delay).await;
    }
    if let Some((every, d)) = s.faults.slow
        && every > 0
        && n % every == every - 1
    {
        s.stats.slowed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(d).await;
    }
    if let Some((every, burst)) = s.faults.unavailable
        && every > 0
        && n % every < burst
    {
        s.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        return Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("content-type", "application/json")
            .body(Body::from(
                r#"{"error":{"code":503,"message":"injected by the fault proxy"}}"#,
            ))
            .expect("a valid response");
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return status(StatusCode::BAD_REQUEST);
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = s
        .http
        .request(parts.method.clone(), format!("{}{path}", s.upstream))
        .body(body);
    for (k, v) in &parts.headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            out = out.header(k, v);
        }
    }
    let Ok(resp) = out.send().await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let code = resp.status();
    let headers = resp.headers().clone();
    let Ok(bytes) = resp.bytes().await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let mut b = Response::builder().status(code);
    let head = parts.method == axum::http::Method::HEAD;
    for (k, v) in &headers {
        // A HEAD answer's length is the object's, not its (empty) body's:
        // S3 and Azure clients read the object's size from it.
        if head && k == "content-length" {
            b = b.header(k, v);
            continue;
        }
        if HOP_BY_HOP.contains(&k.as_str()) {
            continue;
        }
        // A URL the store hands out for later requests (a resumable
        // upload's session) leads back through the proxy, faults included.
        if k == "location"
            && let Some(rest) = v.to_str().ok().and_then(|v| v.strip_prefix(&s.upstream))
        {
            b = b.header(k, format!("{}{rest}", s.url));
            continue;
        }
        b = b.header(k, v);
    }
    if !head {
        b = b.header(HeaderName::from_static("content-length"), bytes.len());
    }
    let cut = parts.method == axum::http::Method::GET
        && code.is_success()
        && bytes.len() >= 2
        && s.faults.cut_body_every.is_some_and(|every| {
            every > 0 && s.gets.fetch_add(1, Ordering::Relaxed) % every == every - 1
        });
    if cut {
        s.stats.cut.fetch_add(1, Ordering::Relaxed);
        let half = bytes.slice(..bytes.len() / 2);
        // Half the promised body, then an error: hyper drops the
        // connection, the client sees it end early.
        let stream = futures::stream::iter([
            Ok::<Bytes, std::io::Error>(half),
            Err(std::io::Error::other("cut by the fault proxy")),
        ]);
        return b.body(Body::from_stream(stream)).expect("a valid response");
    }
    b.body(Body::from(bytes)).expect("a valid response")
}

fn status(code: StatusCode) -> Response {
    Response::builder()
        .status(code)
        .body(Body::empty())
        .expect("a valid response")
}

/// A folder served over plain HTTP on loopback (GET and HEAD; 404 for a
/// missing file); stops when dropped.
///
/// On tokio, each connection its own task: `tiny_http`'s thread pool can
/// leave a new connection unserved while its threads wait on idle
/// keep-alive ones, until the client drops one (reqwest after 90 s), which
/// made a test take 90–120 s one run in three.
pub struct FileServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileServer {
    /// Serves `dir` on a free loopback port (on the caller's runtime).
    pub async fn start(dir: std::path::PathBuf) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let dir = Arc::new(dir);
        // A GET route answers HEAD too, without the body.
        let app = axum::Router::new().fallback(axum::routing::get(
            |State(dir): State<Arc<std::path::PathBuf>>, req: Request| async move {
                let name = req.uri().path().trim_start_matches('/').to_string();
                let inside = !name.split('/').any(|c| c == "..");
                match tokio::fs::read(dir.join(&name)).await {
                    Ok(bytes) if inside => Response::new(Body::from(bytes)),
                    _ => Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Body::empty())
                        .expect("a valid response"),
                }
            },
        ));
        let app = app.with_state(dir);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, task })
    }
}
