//! A Vertex AI-compatible `multimodalembedding@001` server over any
//! [`Embedder`]: programs that call Vertex (the official SDK over REST or
//! gRPC, curl, LiteLLM) switch to a local model by changing the endpoint,
//! and the same binary runs *on* Vertex as a custom container.
//!
//! - REST: `POST /v1/projects/{p}/locations/{l}/publishers/google/models/{model}:predict`,
//!   `POST /v1/projects/{p}/locations/{l}/endpoints/{e}:predict`,
//!   `GET /v1/publishers/google/models/{model}` (what the SDK's
//!   `from_pretrained` asks first), and the custom-container routes
//!   (`AIP_PREDICT_ROUTE`, `AIP_HEALTH_ROUTE`).
//! - gRPC on the same port (HTTP/2): `google.cloud.aiplatform.v1.PredictionService/Predict`
//!   and `ModelGardenService/GetPublisherModel`.
//! - Dynamic batching through [`mmembed_core::batching::Batcher`]: concurrent
//!   callers' instances share model batches; a full queue answers 429
//!   `RESOURCE_EXHAUSTED` with `Retry-After`; deadlines (`grpc-timeout`,
//!   `X-Server-Timeout`, `--request-timeout-secs`) are honoured.
//! - `GET /livez` (the process answers), `GET /health` (the model is
//!   loaded: 503 until then), `GET /metrics` (Prometheus).
//!
//! The layer is thin: request parsing and error mapping here, batching in
//! the core crate, models in the backends (the split of TEI's router).
//!
//! ```no_run
//! # async fn demo(embedder: std::sync::Arc<dyn mmembed_core::Embedder>) -> Result<(), mmembed_server::ServerError> {
//! use mmembed_server::{Server, ServerConfig};
//! let server = Server::bind(ServerConfig::default()).await?; // 127.0.0.1:8080
//! println!("listening on {}", server.local_addr());
//! server
//!     .run(async move { Ok(embedder) }, mmembed_server::shutdown_signal())
//!     .await
//! # }
//! ```

pub mod error;
pub mod metrics;
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use mmembed_core::batching::{BatchOptions, Batcher};
use mmembed_core::{EmbedRequest, Embedder, VideoSegmentConfig};
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

pub use error::{ApiError, Code};
use metrics::Metrics;

/// The instance schema the Vertex SDK insists on for this model
/// (`_model_garden_models.py` raises on anything else).
pub const INSTANCE_SCHEMA_URI: &str =
    "gs://google-cloud-aiplatform/schema/predict/instance/vision_embedding_model_1.0.0.yaml";

/// An API key. `Debug` never shows it; compared in constant time.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    fn matches(&self, given: &str) -> bool {
        // Constant time in the key's content (the length may show; keys are
        // random strings of a fixed length in practice).
        bool::from(self.0.as_bytes().ct_eq(given.as_bytes()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Server settings. The CLI (`mmembed serve`) sets each from a flag or an
/// environment variable.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen (default 127.0.0.1:8080; loopback unless told otherwise).
    pub addr: SocketAddr,
    /// Publisher model names answered (default `multimodalembedding@001`
    /// and `multimodalembedding`); others get 404.
    pub model_names: Vec<String>,
    /// Required key (`Authorization: Bearer KEY`, `x-goog-api-key: KEY` or
    /// `?key=KEY`) on predict and model routes; `None`: open.
    pub api_key: Option<ApiKey>,
    /// Largest request body or gRPC message (default 10 MiB, Vertex's
    /// dedicated-endpoint limit).
    pub max_body_bytes: usize,
    /// Most instances per predict call (default 64).
    pub max_instances: usize,
    /// Most seconds of video one instance may ask for, `endOffsetSec -
    /// startOffsetSec` (default 120: Vertex analyses at most 120 s of video
    /// per request, so its clients already ask for no more). A span's cost
    /// is a decode per sample time whatever the video's real length, so an
    /// open server bounds it.
    pub max_video_seconds: u32,
    /// Longest a predict call may take, queue included (default 60 s);
    /// a shorter client deadline wins.
    pub request_timeout: Duration,
    /// How requests are merged into backend batches.
    pub batch: BatchOptions,
    /// Custom-container predict route (`AIP_PREDICT_ROUTE`, default `/predict`).
    pub predict_route: String,
    /// Custom-container health route (`AIP_HEALTH_ROUTE`, default `/health`).
    pub health_route: String,
    /// `deployedModelId` in answers (`AIP_DEPLOYED_MODEL_ID`, default `mmembed`).
    pub deployed_model_id: String,
    /// How long accepted requests may take to finish after SIGTERM (default 30 s).
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model_names: vec![
                "multimodalembedding@001".into(),
                "multimodalembedding".into(),
            ],
            api_key: None,
            max_body_bytes: 10 << 20,
            max_instances: 64,
            max_video_seconds: VideoSegmentConfig::MAX_SPAN_SEC,
            request_timeout: Duration::from_secs(60),
            batch: BatchOptions::default(),
            predict_route: "/predict".into(),
            health_route: "/health".into(),
            deployed_model_id: "mmembed".into(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backend could not be built; the server stops instead of
    /// answering 503 for ever.
    #[error("the backend failed to load: {0}")]
    Load(String),
    /// Serving failed.
    #[error("serving failed: {0}")]
    Serve(#[source] std::io::Error),
}

struct App {
    cfg: ServerConfig,
    embedder: OnceLock<Arc<Batcher>>,
    metrics: Arc<Metrics>,
}

impl App {
    fn batcher(&self) -> Result<&Arc<Batcher>, ApiError> {
        self.embedder.get().ok_or_else(|| {
            ApiError::new(
                Code::Unavailable,
                "the model is still loading; retry shortly (GET /health answers 200 once it is ready)",
            )
        })
    }

    fn check_key(&self, given: Option<&str>) -> Result<(), ApiError> {
        match (&self.cfg.api_key, given) {
            (None, _) => Ok(()),
            (Some(k), Some(g)) if k.matches(g) => Ok(()),
            (Some(_), Some(_)) => Err(ApiError::new(
                Code::Unauthenticated,
                "the API key is not valid",
            )),
            (Some(_), None) => Err(ApiError::new(
                Code::Unauthenticated,
                "this server needs an API key: `Authorization: Bearer KEY` or `x-goog-api-key: KEY`",
            )),
        }
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.cfg.model_names.iter().any(|m| m == model) {
            return Ok(());
        }
        let info = self.embedder.get().map(|b| b.info().clone());
        Err(ApiError::new(
            Code::NotFound,
            format!(
                "Publisher model `{model}` is not served here; this server answers {}{}",
                self.cfg.model_names.join(", "),
                info.map(|i| format!(" (backend {}, model {})", i.backend, i.model_id))
                    .unwrap_or_default()
            ),
        ))
    }

    /// The publisher-model resource the SDK's `from_pretrained` needs.
    fn publisher_model(&self, model: &str) -> Result<(String, String, String), ApiError> {
        self.check_model(model)?;
        let (base, version) = model.split_once('@').unwrap_or((model, "001"));
        Ok((
            format!("publishers/google/models/{base}"),
            version.to_string(),
            format!(
                "projects/{{user-project}}/locations/{{location}}/publishers/google/models/{model}"
            ),
        ))
    }

    async fn predict(
        &self,
        reqs: Vec<EmbedRequest>,
        deadline: Duration,
    ) -> Result<Vec<Value>, ApiError> {
        let batcher = self.batcher()?.clone();
        wire::check_video_spans(&reqs, self.cfg.max_video_seconds)?;
        self.metrics.count_instances(&reqs);
        let _in_flight = self.metrics.in_flight();
        let n = reqs.len();
        let results = tokio::time::timeout(deadline, batcher.embed_batch(reqs))
            .await
            .map_err(|_| {
                ApiError::new(
                    Code::DeadlineExceeded,
                    format!("the request did not finish within its deadline of {deadline:?}"),
                )
            })?;
        let mut out = Vec::with_capacity(n);
        for (i, r) in results.into_iter().enumerate() {
            let e = r.map_err(|e| ApiError::for_instance(&e, i, n))?;
            out.push(wire::prediction(&e).map_err(|m| ApiError::invalid(m).at_instance(i, n))?);
        }
        Ok(out)
    }

    fn deadline(&self, client: Option<Duration>) -> Duration {
        client.map_or(self.cfg.request_timeout, |c| {
            c.min(self.cfg.request_timeout)
        })
    }
}

// ---------------------------------------------------------------- REST

fn json_response(status: u16, body: &Value) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_string(),
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    r
}

fn error_response(e: &ApiError) -> Response {
    let mut r = json_response(e.code.http(), &e.body());
    if let Some(after) = e.retry_after {
        let secs = after.as_secs().max(1).to_string();
        if let Ok(v) = HeaderValue::from_str(&secs) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    if e.code == Code::MethodNotAllowed {
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
    }
    r
}

/// The key a REST caller gave: bearer token, `x-goog-api-key`, or `?key=`.
fn rest_key<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Option<std::borrow::Cow<'a, str>> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(k) = header_key(header("authorization"), header("x-goog-api-key")) {
        return Some(k.into());
    }
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("key="))
        .map(|k| percent_decode_str(k).decode_utf8_lossy())
}

/// The key in an `Authorization: Bearer KEY` or `x-goog-api-key: KEY`
/// header (HTTP headers or gRPC metadata), the first one wins.
fn header_key<'a>(authorization: Option<&'a str>, api_key: Option<&'a str>) -> Option<&'a str> {
    authorization
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v))
        .or(api_key)
        .map(str::trim)
}

/// `X-Server-Timeout: SECONDS` (Google's REST deadline header).
fn rest_deadline(headers: &HeaderMap) -> Option<Duration> {
    let s = headers.get("x-server-timeout")?.to_str().ok()?;
    Duration::try_from_secs_f64(s.trim().parse().ok()?).ok()
}

enum Route {
    Live,
    Health,
    Metrics,
    PublisherModel(String),
    Predict(Option<String>),
}

impl Route {
    fn label(&self) -> &'static str {
        match self {
            Self::Live => "livez",
            Self::Health => "health",
            Self::Metrics => "metrics",
            Self::PublisherModel(_) => "publisher_model",
            Self::Predict(Some(_)) => "predict",
            Self::Predict(None) => "container_predict",
        }
    }

    fn method(&self) -> Method {
        match self {
            Self::Predict(_) => Method::POST,
            _ => Method::GET,
        }
    }
}

fn route(app: &App, path: &str) -> Option<Route> {
    match path {
        "/livez" => return Some(Route::Live),
        "/metrics" => return Some(Route::Metrics),
        p if p == app.cfg.health_route => return Some(Route::Health),
        p if p == app.cfg.predict_route => return Some(Route::Predict(None)),
        _ => {}
    }
    let rest = path.strip_prefix("/v1/")?;
    if let Some(model) = rest.strip_prefix("publishers/google/models/") {
        return (!model.is_empty() && !model.contains(['/', ':']))
            .then(|| Route::PublisherModel(model.to_string()));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [
            "projects",
            p,
            "locations",
            l,
            "publishers",
            "google",
            "models",
            m,
        ] if !p.is_empty() && !l.is_empty() => {
            let model = m.strip_suffix(":predict")?;
            (!model.is_empty()).then(|| Route::Predict(Some(model.to_string())))
        }
        ["projects", p, "locations", l, "endpoints", e] if !p.is_empty() && !l.is_empty() => {
            // A deployed endpoint: whatever its id, it is the served model.
            let id = e.strip_suffix(":predict")?;
            (!id.is_empty()).then_some(Route::Predict(None))
        }
        _ => None,
    }
}

async fn rest(app: Arc<App>, req: Request) -> Response {
    let t0 = Instant::now();
    let (label, resp) = rest_inner(&app, req).await;
    let status = resp.status().as_u16();
    app.metrics.observe(label, status, t0.elapsed());
    tracing::info!(
        route = label,
        status,
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "rest"
    );
    resp
}

async fn rest_inner(app: &App, req: Request) -> (&'static str, Response) {
    // `@` arrives as %40: decode before routing. The query is ignored
    // (the SDK always sends `$alt=json;enum-encoding=int`), but for `key`.
    let Ok(path) = percent_decode_str(req.uri().path()).decode_utf8() else {
        return (
            "unknown",
            error_response(&ApiError::invalid("the path is not UTF-8")),
        );
    };
    let Some(route) = route(app, &path) else {
        let e = ApiError::new(
            Code::NotFound,
            format!(
                "no route {} {path}; this server answers POST /v1/projects/P/locations/L/publishers/google/models/MODEL:predict, GET /v1/publishers/google/models/MODEL, POST {}, GET {}, /livez and /metrics",
                req.method(),
                app.cfg.predict_route,
                app.cfg.health_route
            ),
        );
        return ("unknown", error_response(&e));
    };
    let label = route.label();
    if req.method() != route.method() {
        let e = ApiError::new(
            Code::MethodNotAllowed,
            format!("{path} answers {} only", route.method()),
        );
        return (label, error_response(&e));
    }
    let resp = match route {
        Route::Live => json_response(200, &json!({"status": "alive"})),
        Route::Health => match app.embedder.get() {
            Some(b) => json_response(200, &json!({"status": "ready", "model": b.info().model_id})),
            None => error_response(&ApiError::new(
                Code::Unavailable,
                "the model is still loading",
            )),
        },
        Route::Metrics => {
            let depth = app.embedder.get().map_or(0, |b| b.queued());
            let mut r = app.metrics.encode(depth).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Route::PublisherModel(model) => {
            let key = rest_key(req.headers(), req.uri().query());
            match app
                .check_key(key.as_deref())
                .and_then(|()| app.publisher_model(&model))
            {
                Ok((name, version, template)) => json_response(
                    200,
                    &json!({
                        "name": name,
                        "versionId": version,
                        "openSourceCategory": "PROPRIETARY",
                        "launchStage": "GA",
                        "publisherModelTemplate": template,
                        "predictSchemata": {"instanceSchemaUri": INSTANCE_SCHEMA_URI},
                    }),
                ),
                Err(e) => error_response(&e),
            }
        }
        Route::Predict(model) => match rest_predict(app, model, req).await {
            Ok(v) => json_response(200, &v),
            Err(e) => error_response(&e),
        },
    };
    (label, resp)
}

async fn rest_predict(app: &App, model: Option<String>, req: Request) -> Result<Value, ApiError> {
    let key = rest_key(req.headers(), req.uri().query()).map(|k| k.into_owned());
    app.check_key(key.as_deref())?;
    if let Some(m) = &model {
        app.check_model(m)?;
    }
    let deadline = app.deadline(rest_deadline(req.headers()));
    let limit = app.cfg.max_body_bytes;
    let too_big = || {
        ApiError::invalid(format!(
            "Request payload size exceeds the limit: {limit} bytes (--max-body-bytes)"
        ))
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| too_big())?;
    let reqs = wire::parse_predict_body(&body, app.cfg.max_instances)?;
    let predictions = app.predict(reqs, deadline).await?;
    Ok(json!({
        "predictions": predictions,
        "deployedModelId": app.cfg.deployed_model_id,
    }))
}

// ---------------------------------------------------------------- gRPC

mod grpc;

// ---------------------------------------------------------------- serving

/// A bound server, not yet serving.
pub struct Server {
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    extra: axum::Router,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.local_addr())
            .field("cfg", &self.app.cfg)
            .finish()
    }
}

impl Server {
    /// Binds the address (port 0 picks a free one; see [`Server::local_addr`]).
    pub async fn bind(cfg: ServerConfig) -> Result<Self, ServerError> {
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.addr,
                source,
            })?;
        Ok(Self {
            listener,
            app: Arc::new(App {
                cfg,
                embedder: OnceLock::new(),
                metrics: Metrics::new(),
            }),
            extra: axum::Router::new(),
        })
    }

    /// Serves `routes` on the same port, beside the Vertex API; they are
    /// matched first, so they must not reuse its paths (`/v1/…`, the
    /// predict and health routes, `/livez`, `/metrics`). What `mmembed
    /// serve --search-in` mounts its search page with.
    pub fn with_routes(mut self, routes: axum::Router) -> Self {
        self.extra = self.extra.merge(routes);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.app.cfg.addr)
    }

    /// Serves until `shutdown` resolves, then finishes the requests already
    /// accepted (up to [`ServerConfig::shutdown_grace`]). The backend comes
    /// from `load`, run while the server already answers: `/livez` at once,
    /// `/health` and predict calls once it is ready. A failed load stops
    /// the server with [`ServerError::Load`].
    pub async fn run<L, S>(self, load: L, shutdown: S) -> Result<(), ServerError>
    where
        L: Future<Output = Result<Arc<dyn Embedder>, String>> + Send + 'static,
        S: Future<Output = ()> + Send + 'static,
    {
        let app = self.app.clone();
        let router =
            grpc::routes(app.clone())
                .merge(self.extra)
                .fallback(move |req: Request<Body>| {
                    let app = app.clone();
                    async move { rest(app, req).await }
                });
        let stop = Arc::new(tokio::sync::Notify::new());
        let graceful = {
            let stop = stop.clone();
            async move { stop.notified().await }
        };
        use axum::serve::ListenerExt as _;
        // Small answers must not wait for Nagle's algorithm.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let mut serving = tokio::spawn(async move {
            axum::serve(listener, router.into_make_service())
                .with_graceful_shutdown(graceful)
                .await
        });
        let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        {
            let app = self.app.clone();
            tokio::spawn(async move {
                let r = match load.await {
                    Ok(inner) => {
                        let metrics = app.metrics.clone();
                        let hook: mmembed_core::batching::BatchHook =
                            Arc::new(move |e| metrics.batch(e));
                        let info = inner.info().clone();
                        let b = Batcher::with_hook(inner, app.cfg.batch.clone(), Some(hook));
                        let _ = app.embedder.set(Arc::new(b));
                        app.metrics.set_loaded();
                        tracing::info!(backend = %info.backend, model = %info.model_id, space = %info.space, "backend ready");
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                let _ = loaded_tx.send(r);
            });
        }
        let load_failed = async move {
            match loaded_rx.await {
                Ok(Err(e)) => e,
                // Loaded (or the loader vanished): never fires.
                _ => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            r = &mut serving => return r.map_err(|e| ServerError::Serve(std::io::Error::other(e)))?.map_err(ServerError::Serve),
            () = shutdown => None,
            e = load_failed => Some(e),
        };
        tracing::info!("shutting down: finishing accepted requests");
        stop.notify_waiters();
        stop.notify_one();
        match tokio::time::timeout(self.app.cfg.shutdown_grace, &mut serving).await {
            Ok(r) => r
                .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?
                .map_err(ServerError::Serve)?,
            Err(_) => {
                tracing::warn!(grace = ?self.app.cfg.shutdown_grace, "requests still running after the grace period; stopping anyway");
                serving.abort();
            }
        }
        match outcome {
            Some(e) => Err(ServerError::Load(e)),
            None => Ok(()),
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes and Vertex send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App {
            cfg: ServerConfig::default(),
            embedder: OnceLock::new(),
            metrics: Metrics::new(),
        }
    }

    #[test]
    fn routes_decode_the_path_shapes_clients_send() {
        let a = app();
        let model = |p: &str| match route(&a, p) {
            Some(Route::Predict(m)) => m,
            _ => panic!("{p} is not a predict route"),
        };
        assert_eq!(
            model("/v1/projects/p/locations/us-central1/publishers/google/models/multimodalembedding@001:predict")
                .as_deref(),
            Some("multimodalembedding@001")
        );
        assert_eq!(
            model("/v1/projects/p/locations/l/endpoints/123:predict"),
            None
        );
        assert_eq!(model("/predict"), None);
        assert!(matches!(
            route(&a, "/v1/publishers/google/models/multimodalembedding@001"),
            Some(Route::PublisherModel(m)) if m == "multimodalembedding@001"
        ));
        for bad in [
            "/v1/projects//locations/l/publishers/google/models/m:predict",
            "/v1/projects/p/locations/l/publishers/google/models/m",
            "/v1/projects/p/locations/l/publishers/google/models/:predict",
            "/v1/publishers/google/models/",
            "/v1/publishers/google/models/a/b",
            "/v2/predict",
        ] {
            assert!(route(&a, bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn keys_come_from_any_of_the_three_places() {
        let mut h = HeaderMap::new();
        assert_eq!(rest_key(&h, Some("a=1&key=s%3Dx")).as_deref(), Some("s=x"));
        h.insert("x-goog-api-key", HeaderValue::from_static("k2"));
        assert_eq!(rest_key(&h, None).as_deref(), Some("k2"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k1"));
        assert_eq!(rest_key(&h, None).as_deref(), Some("k1"));
        let mut a = app();
        a.cfg.api_key = Some(ApiKey::new("k1"));
        assert!(a.check_key(Some("k1")).is_ok());
        assert_eq!(
            a.check_key(Some("k")).unwrap_err().code,
            Code::Unauthenticated
        );
        assert_eq!(a.check_key(None).unwrap_err().code, Code::Unauthenticated);
        assert_eq!(format!("{:?}", a.cfg.api_key), "Some(ApiKey(<redacted>))");
    }
}
