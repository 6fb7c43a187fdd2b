//! `mmembed serve`: the Vertex-compatible embedding server
//! (`mmembed-server`) over the backend the flags describe.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use mmembed::core::batching::BatchOptions;
use mmembed_search::Table;
use mmembed_search_page::SearchPage;
use mmembed_server::{ApiKey, Server, ServerConfig};

use crate::backend::{BackendArgs, BackendKind, Secret};

/// Flags of `mmembed serve`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed serve --model demo                                  # 127.0.0.1:8080, REST and gRPC
  mmembed serve --backend 'local:/models/clip?device=cuda' --port 9000
  mmembed serve --backend 'fallback(local:demo, vertex:my-proj)' --api-key \"$KEY\"
  mmembed serve --search-in media.parquet                     # + a search page at http://127.0.0.1:8080/
  curl -s localhost:8080/v1/projects/p/locations/l/publishers/google/models/multimodalembedding@001:predict \\
       -d '{\"instances\": [{\"text\": \"a red star\"}]}'

On Vertex AI (custom container) AIP_HTTP_PORT, AIP_PREDICT_ROUTE, AIP_HEALTH_ROUTE,
AIP_DEPLOYED_MODEL_ID and AIP_STORAGE_URI are read; with AIP_HTTP_PORT set the
server listens on 0.0.0.0 unless --host says otherwise.")]
pub struct Args {
    /// Address to listen on (default 127.0.0.1; 0.0.0.0 when AIP_HTTP_PORT
    /// is set, as Vertex's custom-container contract requires).
    #[arg(long, env = "MMEMBED_SERVE_HOST")]
    pub host: Option<IpAddr>,

    /// Port for REST and gRPC (default AIP_HTTP_PORT, else 8080; 0 picks a
    /// free one, printed on stdout).
    #[arg(long, env = "MMEMBED_SERVE_PORT")]
    pub port: Option<u16>,

    /// Require this key on predict and model calls (`Authorization: Bearer
    /// KEY`, `x-goog-api-key: KEY` or `?key=KEY`). Never logged.
    #[arg(long, env = "MMEMBED_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// Publisher model names answered; others get 404 NOT_FOUND.
    #[arg(
        long = "model-name",
        env = "MMEMBED_SERVE_MODEL_NAMES",
        value_delimiter = ',',
        default_value = "multimodalembedding@001,multimodalembedding"
    )]
    pub model_names: Vec<String>,

    /// Largest request body (REST) or message (gRPC), in bytes.
    #[arg(long, env = "MMEMBED_SERVE_MAX_BODY_BYTES", default_value_t = 10 << 20)]
    pub max_body_bytes: usize,

    /// Most instances in one predict call.
    #[arg(long, env = "MMEMBED_SERVE_MAX_INSTANCES", default_value_t = 64)]
    pub max_instances: usize,

    /// Most seconds of video one instance may ask for (endOffsetSec -
    /// startOffsetSec). Vertex analyses at most 120 s per request; a longer
    /// span is refused with INVALID_ARGUMENT before anything is decoded.
    #[arg(
        long,
        env = "MMEMBED_SERVE_MAX_VIDEO_SECONDS",
        default_value_t = 120,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_video_seconds: u32,

    /// Longest a predict call may take, queueing included; shorter client
    /// deadlines (grpc-timeout, X-Server-Timeout) win.
    #[arg(
        long,
        env = "MMEMBED_SERVE_REQUEST_TIMEOUT_SECS",
        default_value_t = 60.0
    )]
    pub request_timeout_secs: f64,

    /// Cost units per backend call, merged from concurrent requests (a text
    /// or image is 1, a video a whole batch); default: --batch-size.
    #[arg(long, env = "MMEMBED_SERVE_BATCH_BUDGET")]
    pub batch_budget: Option<usize>,

    /// How long a request arriving at an idle backend waits for others to
    /// share its batch, in milliseconds.
    #[arg(long, env = "MMEMBED_SERVE_BATCH_WAIT_MS", default_value_t = 0.0)]
    pub batch_wait_ms: f64,

    /// Cost units allowed to wait; beyond, requests get 429 RESOURCE_EXHAUSTED
    /// with Retry-After.
    #[arg(long, env = "MMEMBED_SERVE_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,

    /// Backend calls in flight at once. Default 2 with `--backend local`
    /// (its model runs one batch while the next is decoded), 1 for the
    /// others; raise it for remote backends.
    #[arg(long, env = "MMEMBED_SERVE_CONCURRENT_BATCHES", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrent_batches: Option<u32>,

    /// Custom-container predict route.
    #[arg(long, env = "AIP_PREDICT_ROUTE", default_value = "/predict")]
    pub predict_route: String,

    /// Health route: 200 once the model is loaded, 503 before (liveness is /livez).
    #[arg(long, env = "AIP_HEALTH_ROUTE", default_value = "/health")]
    pub health_route: String,

    /// `deployedModelId` in answers.
    #[arg(long, env = "AIP_DEPLOYED_MODEL_ID", default_value = "mmembed")]
    pub deployed_model_id: String,

    /// Seconds accepted requests get to finish after SIGTERM or Ctrl-C.
    #[arg(
        long,
        env = "MMEMBED_SERVE_SHUTDOWN_GRACE_SECS",
        default_value_t = 30.0
    )]
    pub shutdown_grace_secs: f64,

    /// Also serve a search page at `/` over these batch outputs
    /// (`.parquet`/`.jsonl`; repeatable): a text box, an image upload, a grid
    /// of thumbnails. The backend defaults to the tables' model.
    #[arg(
        long = "search-in",
        env = "MMEMBED_SERVE_SEARCH_IN",
        value_delimiter = ',',
        conflicts_with = "search_index"
    )]
    pub search_in: Vec<PathBuf>,

    /// Also serve a search page at `/` over an index built by `mmembed index
    /// build` (and its tables).
    #[arg(long = "search-index", env = "MMEMBED_SERVE_SEARCH_INDEX")]
    pub search_index: Option<PathBuf>,

    #[command(flatten)]
    pub backend: BackendArgs,
}

fn secs(flag: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .with_context(|| format!("{flag} must be a non-negative number of seconds, got {v}"))
}

fn route(flag: &str, r: &str) -> anyhow::Result<String> {
    if !r.starts_with('/') {
        bail!("{flag} must start with '/', got `{r}`");
    }
    Ok(r.to_string())
}

impl Args {
    /// The server settings these flags describe.
    fn config(&self) -> anyhow::Result<ServerConfig> {
        let aip_port = match std::env::var("AIP_HTTP_PORT") {
            Ok(p) => Some(
                p.trim()
                    .parse::<u16>()
                    .with_context(|| format!("AIP_HTTP_PORT `{p}` is not a port number"))?,
            ),
            Err(_) => None,
        };
        let port = self.port.or(aip_port).unwrap_or(8080);
        let host = self.host.unwrap_or(if aip_port.is_some() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([127, 0, 0, 1])
        });
        if self.max_instances == 0 || self.max_body_bytes == 0 || self.max_queue == 0 {
            bail!("--max-instances, --max-body-bytes and --max-queue must be at least 1");
        }
        if self.model_names.iter().any(|m| m.trim().is_empty()) {
            bail!("--model-name must not be empty");
        }
        let request_timeout = secs("--request-timeout-secs", self.request_timeout_secs)?;
        if request_timeout.is_zero() {
            bail!("--request-timeout-secs must be positive");
        }
        Ok(ServerConfig {
            addr: SocketAddr::new(host, port),
            model_names: self
                .model_names
                .iter()
                .map(|m| m.trim().to_string())
                .collect(),
            api_key: self.api_key.as_ref().map(|k| ApiKey::new(k.expose())),
            max_body_bytes: self.max_body_bytes,
            max_instances: self.max_instances,
            max_video_seconds: self.max_video_seconds,
            request_timeout,
            batch: BatchOptions {
                max_batch: self
                    .batch_budget
                    .unwrap_or(self.backend.batch_size())
                    .max(1),
                max_wait: secs("--batch-wait-ms", self.batch_wait_ms / 1e3)?,
                max_queued: self.max_queue,
                max_concurrent_batches: self
                    .concurrent_batches
                    .map_or_else(|| self.backend.default_calls_in_flight(), |n| n as usize),
            },
            predict_route: route("--predict-route", &self.predict_route)?,
            health_route: route("--health-route", &self.health_route)?,
            deployed_model_id: self.deployed_model_id.clone(),
            shutdown_grace: secs("--shutdown-grace-secs", self.shutdown_grace_secs)?,
        })
    }

    /// `AIP_STORAGE_URI` names the model artifacts on Vertex: a directory
    /// (or file:// URI) is the local model when no --model is given.
    fn backend_args(&self) -> anyhow::Result<BackendArgs> {
        let mut b = self.backend.clone();
        if let Ok(uri) = std::env::var("AIP_STORAGE_URI")
            && !uri.trim().is_empty()
            && b.model.is_none()
            && b.backend == BackendKind::Local
        {
            let path = uri.strip_prefix("file://").unwrap_or(&uri);
            if uri.contains("://") && !uri.starts_with("file://") {
                bail!(
                    "AIP_STORAGE_URI is `{uri}`: reading a model from an object store is not \
                     supported yet; copy the checkpoint into the image (or a mounted volume) \
                     and pass --model DIR"
                );
            }
            tracing::info!(model = path, "model from AIP_STORAGE_URI");
            b.model = Some(path.to_string());
        }
        Ok(b)
    }
}

/// The search page the flags ask for, if any.
fn search_page(args: &Args, cfg: &ServerConfig) -> anyhow::Result<Option<Arc<SearchPage>>> {
    let page = match (&args.search_index, args.search_in.is_empty()) {
        (Some(dir), _) => SearchPage::over_index(dir)?,
        (None, false) => {
            let tables = args
                .search_in
                .iter()
                .map(Table::new)
                .collect::<Result<Vec<_>, _>>()?;
            SearchPage::over_tables(tables)?
        }
        (None, true) => return Ok(None),
    };
    if cfg.api_key.is_some() {
        // The page and its media would be reachable without the key.
        bail!(
            "the search page has no access control: serve it without --api-key (on loopback, \
             the default), or put it behind a proxy that authenticates"
        );
    }
    // The page's routes are matched before the Vertex API's.
    for (flag, r) in [
        ("--predict-route", &cfg.predict_route),
        ("--health-route", &cfg.health_route),
    ] {
        if r == "/"
            || ["/api/", "/thumb/", "/media/"]
                .iter()
                .any(|p| r.starts_with(p))
        {
            bail!(
                "{flag} `{r}` collides with the search page's routes (/, /api/, /thumb/, /media/)"
            );
        }
    }
    Ok(Some(Arc::new(page)))
}

/// Runs the server until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = args.config()?;
    let mut backend = args.backend_args()?;
    let page = search_page(&args, &cfg)?;
    if let Some(p) = &page
        && backend.model.is_none()
        && backend.backend == BackendKind::Local
    {
        // Queries must land in the tables' space: their model by default.
        backend.model = Some(p.model().to_string());
    }
    let mut server = Server::bind(cfg).await?;
    let addr = server.local_addr();
    if let Some(p) = &page {
        server = server.with_routes(p.clone().router());
    }
    // One line on stdout, for scripts that start the server on port 0.
    println!("listening on http://{addr}");
    if page.is_some() {
        println!("search page on http://{addr}/");
    }
    tracing::info!(%addr, "serving REST and gRPC; loading the backend");
    let load = async move {
        let e = backend.build().await.map_err(|e| format!("{e:#}"))?;
        if let Some(p) = page {
            p.set_embedder(e.clone()).map_err(|e| e.to_string())?;
        }
        Ok(e)
    };
    server.run(load, mmembed_server::shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}
