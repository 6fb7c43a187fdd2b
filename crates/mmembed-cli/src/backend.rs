//! Backend selection: the flags (and environment variables) shared by every
//! subcommand that embeds, and building the embedder they describe.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use mmembed::Embedder;
use mmembed::local::{DeviceSpec, LocalEmbedder, LocalOptions, Manifest, Precision};
use mmembed::spec::BackendSpec;
use mmembed::vertex::{CredentialsSource, VertexConfig, VertexEmbedder};

use crate::recipe::Recipe;

/// A credential from a flag or the environment: `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// Which backend embeds: `local` or `vertex` (configured by the flags
/// below), or a spec string or TOML file for anything else.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendKind {
    /// The candle CLIP backend on this machine.
    Local,
    /// Google Vertex AI `multimodalembedding@001`.
    Vertex,
    /// A spec: `fallback(local:demo, vertex:PROJECT)`, `hedged(…)`, …
    Spec(BackendSpec),
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "local" => Ok(Self::Local),
            "vertex" => Ok(Self::Vertex),
            spec if spec.ends_with(".toml") => {
                let text = std::fs::read_to_string(spec)
                    .map_err(|e| format!("cannot read backend config {spec}: {e}"))?;
                BackendSpec::from_toml(&text)
                    .map(Self::Spec)
                    .map_err(|e| e.to_string())
            }
            spec => spec
                .parse()
                .map(Self::Spec)
                .map_err(|e: mmembed::EmbedError| e.to_string()),
        }
    }
}

/// Backend flags.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Backend")]
pub struct BackendArgs {
    /// Backend: `local` or `vertex` (set up by the flags below), a spec
    /// such as `fallback(local:demo?device=cpu, vertex:PROJECT/us-central1)`
    /// or `hedged(A, B)?delay_ms=200`, or a `.toml` file with the same
    /// (see the README's "Hybrid use").
    #[arg(long, short = 'b', env = "MMEMBED_BACKEND", default_value = "local")]
    pub backend: BackendKind,

    /// Model. Local: `demo` (the bundled demo model), a built-in id (see
    /// `mmembed models`), a hub repository `owner/name[@revision]` or a
    /// checkpoint directory; default the built-in default. Vertex: the
    /// publisher model name, default `multimodalembedding@001`.
    #[arg(long, short = 'm', env = "MMEMBED_MODEL")]
    pub model: Option<String>,

    /// Local device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, env = "MMEMBED_DEVICE", default_value = "auto")]
    pub device: DeviceSpec,

    /// Local precision: f32, f16, bf16 (GPUs), int8 (CPU: int8 weights; on
    /// ViT-B/32 1.4-1.5x f32 with AVX2, 2.3-3x with AVX-512 VNNI; mean
    /// cosine to f32 >= 0.999; MobileCLIP's FastViT image tower stays f32;
    /// see BENCHMARKS.md).
    #[arg(long, env = "MMEMBED_PRECISION", default_value = "f32")]
    pub precision: Precision,

    /// Inputs per backend call: a batch job's part size, the server's
    /// batching budget, and the local model's batch unless --max-batch is
    /// given. Default 32; 1024 with --device cuda or metal, so that a call
    /// spans several model batches and decoding overlaps the GPU's work.
    #[arg(long, env = "MMEMBED_BATCH_SIZE", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: Option<u32>,

    /// Local model: most inputs per forward pass. Default: --batch-size
    /// when given, else the device's (32 on the CPU, 256 on GPUs).
    #[arg(long, env = "MMEMBED_MAX_BATCH", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_batch: Option<u32>,

    /// Local video sampling rate, frames per second of each segment (above
    /// 0, at most 1000).
    #[arg(long, env = "MMEMBED_VIDEO_FPS", default_value_t = 1.0)]
    pub fps: f64,

    /// Local video: decode only keyframes (much faster, frames up to half a
    /// keyframe interval from their time).
    #[arg(long, env = "MMEMBED_VIDEO_KEYFRAMES_ONLY")]
    pub keyframes_only: bool,

    /// Local images: decode JPEGs at 1/2, 1/4 or 1/8 size when that still
    /// covers the model's resize, as Pillow's `Image.draft` does: decoding
    /// and preprocessing 1.6x as fast on 640x480 photos, 2.4x on 12
    /// megapixels; inputs about a level off the exact decode's on average.
    #[arg(long, env = "MMEMBED_JPEG_DRAFT")]
    pub jpeg_draft: bool,

    /// Local images: decode HEIC photos as their embedded thumbnail when
    /// one covers the model's resize, as pillow-heif's `Image.draft` does:
    /// milliseconds instead of a second of HEVC decoding per phone photo;
    /// inputs are the thumbnail's, several levels off the photo's.
    #[arg(long, env = "MMEMBED_HEIC_THUMBNAIL")]
    pub heic_thumbnail: bool,

    /// Local SigLIP 2 NaFlex models: the most patches an image is resized
    /// into (default: the checkpoint's, 256 on the hub's); more see finer
    /// detail and cost more. An error for models of one image size.
    #[arg(long, env = "MMEMBED_MAX_PATCHES", value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub max_patches: Option<u32>,

    /// Vertex: Google Cloud project.
    #[arg(long, env = "GOOGLE_CLOUD_PROJECT")]
    pub project: Option<String>,

    /// Vertex: region.
    #[arg(long, env = "GOOGLE_CLOUD_LOCATION", default_value = "us-central1")]
    pub location: String,

    /// Vertex: base URL instead of the regional endpoint (a proxy, a fake).
    #[arg(long, env = "MMEMBED_VERTEX_BASE_URL")]
    pub vertex_url: Option<String>,

    /// Vertex: requests in flight at once.
    #[arg(long, env = "MMEMBED_VERTEX_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,

    /// Vertex: client-side pacing, requests per minute.
    #[arg(long, env = "MMEMBED_VERTEX_RPM", default_value_t = 120)]
    pub rpm: u32,

    /// Vertex: attempts per request (retries on 429/5xx/network errors).
    #[arg(long, env = "MMEMBED_VERTEX_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,

    /// Vertex: per-request timeout in seconds.
    #[arg(long, env = "MMEMBED_VERTEX_TIMEOUT_SECS", default_value_t = 60.0)]
    pub timeout_secs: f64,

    /// Vertex: a plain OAuth access token instead of Application Default
    /// Credentials. Never printed.
    #[arg(long, env = "MMEMBED_VERTEX_ACCESS_TOKEN", hide_env_values = true)]
    pub access_token: Option<Secret>,

    /// Vertex: project billed for quota (`x-goog-user-project`).
    #[arg(long, env = "GOOGLE_CLOUD_QUOTA_PROJECT")]
    pub quota_project: Option<String>,
}

impl BackendArgs {
    /// Inputs per backend call (see `--batch-size`).
    pub fn batch_size(&self) -> usize {
        match (self.batch_size, self.device) {
            (Some(b), _) => b as usize,
            (None, DeviceSpec::Cuda(_) | DeviceSpec::Metal(_)) => 1024,
            (None, _) => 32,
        }
    }

    /// Backend calls to keep in flight when no flag says: 2 for the local
    /// model, whose preparing thread decodes a queued call's first batch
    /// while the model finishes the call before (so neither waits at the
    /// seam); 1 for the others, whose concurrency settings are per call.
    pub fn default_calls_in_flight(&self) -> usize {
        match self.backend {
            BackendKind::Local => 2,
            _ => 1,
        }
    }

    /// The local options these flags describe.
    pub fn local_options(&self) -> anyhow::Result<LocalOptions> {
        if !(self.fps.is_finite() && self.fps > 0.0) {
            bail!("--fps must be a positive number, got {}", self.fps);
        }
        let model = self
            .model
            .clone()
            .unwrap_or_else(|| Manifest::default_model().id);
        let mut opts = LocalOptions::new(model);
        if let Some(b) = self.max_batch.or(self.batch_size) {
            opts = opts.with_max_batch(b as usize);
        }
        if let Some(n) = self.max_patches {
            opts = opts.with_max_patches(n);
        }
        Ok(opts
            .with_device(self.device)
            .with_precision(self.precision)
            .with_video_fps(self.fps)
            .with_video_keyframes_only(self.keyframes_only)
            .with_jpeg_draft(self.jpeg_draft)
            .with_heic_thumbnail(self.heic_thumbnail))
    }

    /// The Vertex settings these flags describe.
    pub fn vertex_config(&self) -> anyhow::Result<VertexConfig> {
        let project = self.project.clone().context(
            "the vertex backend needs a project: pass --project or set GOOGLE_CLOUD_PROJECT",
        )?;
        let timeout = Duration::try_from_secs_f64(self.timeout_secs)
            .ok()
            .filter(|t| !t.is_zero())
            .context("--timeout-secs must be a positive number")?;
        let mut c = VertexConfig::new(project)
            .with_location(self.location.clone())
            .with_timeout(timeout)
            .with_requests_per_minute(self.rpm)
            .with_max_concurrency(self.concurrency as usize);
        if let Some(m) = &self.model {
            c = c.with_model(m.clone());
        }
        if let Some(u) = &self.vertex_url {
            c = c.with_base_url(u.clone());
        }
        if let Some(t) = &self.access_token {
            c.credentials = CredentialsSource::AccessToken(t.0.clone().into());
        }
        if let Some(q) = &self.quota_project {
            c = c.with_quota_project(q.clone());
        }
        c.retry.max_attempts = self.max_attempts.max(1);
        Ok(c)
    }

    /// Builds the embedder (loading a local model may take a while).
    pub async fn build(&self) -> anyhow::Result<Arc<dyn Embedder>> {
        Ok(match &self.backend {
            BackendKind::Local => {
                let opts = self.local_options()?;
                let model = opts.model.clone();
                Arc::new(
                    LocalEmbedder::load(opts)
                        .await
                        .with_context(|| format!("loading local model `{model}`"))?,
                )
            }
            BackendKind::Vertex => Arc::new(
                VertexEmbedder::new(self.vertex_config()?)
                    .context("setting up the Vertex client")?,
            ),
            BackendKind::Spec(spec) => spec
                .build()
                .await
                .context("building the backend from its spec")?,
        })
    }

    /// What this backend's vectors depend on beyond the model and size
    /// each row records (see `recipe`): the local model's precision and
    /// JPEG and HEIC decoding, and for an input with videos (`video`: its segment
    /// flags) the segments and the local model's frame sampling. A spec
    /// string's settings are not picked apart (its space and size still
    /// are).
    pub(crate) fn recipe(&self, video: Option<&SegmentArgs>) -> Recipe {
        let mut r = Recipe::default();
        if let Some(segments) = video {
            r = r.with("video_segments", segments.describe());
        }
        match self.backend {
            BackendKind::Local => {
                r = r
                    .with("precision", format!("{:?}", self.precision).to_lowercase())
                    .with("jpeg_draft", self.jpeg_draft)
                    // Jobs written before it recorded none (not compared).
                    .with("heic_thumbnail", self.heic_thumbnail)
                    // A NaFlex model's patch budget ("default": the
                    // checkpoint's); jobs written before it recorded none,
                    // and a setting one side lacks is not compared.
                    .with(
                        "max_patches",
                        self.max_patches
                            .map_or_else(|| "default".into(), |n| n.to_string()),
                    );
                if video.is_some() {
                    r = r
                        .with("fps", self.fps)
                        .with("keyframes_only", self.keyframes_only);
                }
                r
            }
            BackendKind::Vertex | BackendKind::Spec(_) => r,
        }
    }

    /// [`Self::build`] for a job of vectors of size `dimension`: a size the
    /// backend cannot make is refused here, once, rather than failing every
    /// row of the job with it.
    pub async fn build_for(&self, dimension: Option<u32>) -> anyhow::Result<Arc<dyn Embedder>> {
        let embedder = self.build().await?;
        if let Some(d) = dimension {
            embedder
                .info()
                .check_dimension(d)
                .map_err(|e| anyhow::anyhow!("--dimension: {e}"))?;
        }
        Ok(embedder)
    }
}

/// Video segment flags; unset ones take Vertex's defaults (0, 120, 16).
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Video segments")]
pub struct SegmentArgs {
    /// First second analysed.
    #[arg(long, env = "MMEMBED_VIDEO_START")]
    pub start: Option<u32>,
    /// Second after which analysis stops (Vertex: at most start + 120).
    #[arg(long, env = "MMEMBED_VIDEO_END")]
    pub end: Option<u32>,
    /// Segment length in seconds (at least 4).
    #[arg(long, env = "MMEMBED_VIDEO_INTERVAL")]
    pub interval: Option<u32>,
}

impl SegmentArgs {
    /// The segments as a job's recipe records them.
    pub(crate) fn describe(&self) -> String {
        let n = |v: Option<u32>| v.map_or("default".to_string(), |v| v.to_string());
        format!(
            "start {} end {} interval {}",
            n(self.start),
            n(self.end),
            n(self.interval)
        )
    }

    /// The segment config, checked, or `None` for the backend's defaults.
    pub fn config(&self) -> anyhow::Result<Option<mmembed::VideoSegmentConfig>> {
        if self.start.is_none() && self.end.is_none() && self.interval.is_none() {
            return Ok(None);
        }
        let c = mmembed::VideoSegmentConfig {
            start_offset_sec: self.start,
            end_offset_sec: self.end,
            interval_sec: self.interval,
        };
        c.range().context("invalid --start/--end/--interval")?;
        Ok(Some(c))
    }
}
