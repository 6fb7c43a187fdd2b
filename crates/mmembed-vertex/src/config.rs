//! Client settings: builder methods and environment variables.

use std::fmt;
use std::time::Duration;

use mmembed_core::EmbedError;
use secrecy::SecretString;

/// Vertex's model name for multimodal embeddings.
pub const DEFAULT_MODEL: &str = "multimodalembedding@001";

/// Where the access token comes from.
#[derive(Clone, Default)]
pub enum CredentialsSource {
    /// Application Default Credentials through `google-cloud-auth`:
    /// `GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's ADC file, then the
    /// metadata server.
    #[default]
    ApplicationDefault,
    /// A ready access token (e.g. `gcloud auth print-access-token`), for CI
    /// and quick use. It expires; ADC refreshes itself.
    AccessToken(SecretString),
}

impl fmt::Debug for CredentialsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ApplicationDefault => f.write_str("ApplicationDefault"),
            Self::AccessToken(_) => f.write_str("AccessToken(<redacted>)"),
        }
    }
}

/// Truncated exponential backoff with full jitter.
///
/// Attempt `n` (0-based) waits a random time in `[0, min(max_delay,
/// initial_delay · multiplierⁿ)]`, or `Retry-After` when the server sends a
/// longer one (Google's guidance for its APIs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first one included (default 5).
    pub max_attempts: u32,
    /// First backoff ceiling (default 1 s).
    pub initial_delay: Duration,
    /// Largest backoff (default 60 s).
    pub max_delay: Duration,
    /// Growth per attempt (default 2).
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The backoff ceiling before retry number `n` (0 = the first retry).
    pub fn ceiling(&self, n: u32) -> Duration {
        let grow = self.multiplier.max(1.0).powi(n.min(64) as i32);
        let secs = (self.initial_delay.as_secs_f64() * grow).min(self.max_delay.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The wait before retry `n`: full jitter under the ceiling, but never
    /// less than the server's `Retry-After`.
    pub fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let jittered = self.ceiling(n).mul_f64(fastrand::f64());
        match retry_after {
            Some(ra) => ra.max(jittered),
            None => jittered,
        }
    }
}

/// Settings of a [`crate::VertexEmbedder`].
///
/// ```
/// use std::time::Duration;
/// use mmembed_vertex::VertexConfig;
/// let cfg = VertexConfig::new("my-project")
///     .with_location("europe-west4")
///     .with_timeout(Duration::from_secs(30))
///     .with_requests_per_minute(300);
/// assert_eq!(cfg.endpoint(), "https://europe-west4-aiplatform.googleapis.com/v1/projects/my-project/locations/europe-west4/publishers/google/models/multimodalembedding@001:predict");
/// ```
#[derive(Debug, Clone)]
pub struct VertexConfig {
    /// Google Cloud project id (`GOOGLE_CLOUD_PROJECT`).
    pub project: String,
    /// Region (`GOOGLE_CLOUD_LOCATION`, default `us-central1`).
    pub location: String,
    /// Model (`MMEMBED_VERTEX_MODEL`, default `multimodalembedding@001`).
    pub model: String,
    /// Base URL instead of `https://{location}-aiplatform.googleapis.com`
    /// (`MMEMBED_VERTEX_BASE_URL`); tests point it at loopback.
    pub base_url: Option<String>,
    /// Per-request timeout (`MMEMBED_VERTEX_TIMEOUT_SECS`, default 60 s).
    pub timeout: Duration,
    /// Retry policy (`MMEMBED_VERTEX_MAX_ATTEMPTS` sets its attempts).
    pub retry: RetryPolicy,
    /// Client-side pacing, requests per minute (`MMEMBED_VERTEX_RPM`,
    /// default 120: the documented base quota; newer docs say 120-600 by region).
    pub requests_per_minute: u32,
    /// Requests in flight at once in a batch (`MMEMBED_VERTEX_CONCURRENCY`, default 8).
    pub max_concurrency: usize,
    /// Where the token comes from (`MMEMBED_VERTEX_ACCESS_TOKEN` selects a
    /// plain token; otherwise ADC).
    pub credentials: CredentialsSource,
    /// Project billed for quota (`GOOGLE_CLOUD_QUOTA_PROJECT`), sent as
    /// `x-goog-user-project`; ADC credentials may carry their own.
    pub quota_project: Option<String>,
    /// Largest image sent as is, in bytes (default 15,000,000: base64 makes
    /// it 20 MB, the service's limit). Larger images are downscaled.
    pub max_image_bytes: usize,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

fn env_num<T: std::str::FromStr>(k: &str) -> Result<Option<T>, EmbedError> {
    env(k)
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| EmbedError::invalid(k, format!("`{v}` is not a valid number")))
        })
        .transpose()
}

impl VertexConfig {
    /// Defaults for `project`.
    pub fn new(project: impl Into<String>) -> Self {
        Self {
            project: project.into(),
            location: "us-central1".into(),
            model: DEFAULT_MODEL.into(),
            base_url: None,
            timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            requests_per_minute: 120,
            max_concurrency: 8,
            credentials: CredentialsSource::ApplicationDefault,
            quota_project: None,
            max_image_bytes: 15_000_000,
        }
    }

    /// Settings from the environment (see each field for its variable).
    pub fn from_env() -> Result<Self, EmbedError> {
        Self::from_env_with_project(None)
    }

    /// [`VertexConfig::from_env`], with the project given here when it is
    /// `Some` (then `GOOGLE_CLOUD_PROJECT` need not be set).
    pub fn from_env_with_project(project: Option<String>) -> Result<Self, EmbedError> {
        let project = project
            .or_else(|| env("GOOGLE_CLOUD_PROJECT"))
            .ok_or_else(|| {
                EmbedError::invalid(
                    "GOOGLE_CLOUD_PROJECT",
                    "is not set; it names the Google Cloud project to bill",
                )
            })?;
        let mut c = Self::new(project);
        if let Some(l) = env("GOOGLE_CLOUD_LOCATION") {
            c.location = l;
        }
        if let Some(m) = env("MMEMBED_VERTEX_MODEL") {
            c.model = m;
        }
        c.base_url = env("MMEMBED_VERTEX_BASE_URL");
        if let Some(t) = env_num::<f64>("MMEMBED_VERTEX_TIMEOUT_SECS")? {
            c.timeout = Duration::try_from_secs_f64(t).map_err(|_| {
                EmbedError::invalid("MMEMBED_VERTEX_TIMEOUT_SECS", "must be a positive number")
            })?;
        }
        if let Some(n) = env_num("MMEMBED_VERTEX_MAX_ATTEMPTS")? {
            c.retry.max_attempts = n;
        }
        if let Some(n) = env_num("MMEMBED_VERTEX_RPM")? {
            c.requests_per_minute = n;
        }
        if let Some(n) = env_num("MMEMBED_VERTEX_CONCURRENCY")? {
            c.max_concurrency = n;
        }
        if let Some(t) = env("MMEMBED_VERTEX_ACCESS_TOKEN") {
            c.credentials = CredentialsSource::AccessToken(t.into());
        }
        c.quota_project = env("GOOGLE_CLOUD_QUOTA_PROJECT");
        Ok(c)
    }

    /// Sets the region.
    pub fn with_location(mut self, location: impl Into<String>) -> Self {
        self.location = location.into();
        self
    }

    /// Sets the model name.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    /// Overrides the base URL.
    pub fn with_base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// Sets the per-request timeout.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, r: RetryPolicy) -> Self {
        self.retry = r;
        self
    }

    /// Sets the pacing.
    pub fn with_requests_per_minute(mut self, rpm: u32) -> Self {
        self.requests_per_minute = rpm;
        self
    }

    /// Sets the concurrency of a batch.
    pub fn with_max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n;
        self
    }

    /// Uses a plain access token instead of ADC.
    pub fn with_access_token(mut self, token: impl Into<String>) -> Self {
        self.credentials = CredentialsSource::AccessToken(SecretString::from(token.into()));
        self
    }

    /// Sets the quota project.
    pub fn with_quota_project(mut self, p: impl Into<String>) -> Self {
        self.quota_project = Some(p.into());
        self
    }

    /// The `:predict` URL.
    pub fn endpoint(&self) -> String {
        let base = self
            .base_url
            .clone()
            .unwrap_or_else(|| format!("https://{}-aiplatform.googleapis.com", self.location));
        format!(
            "{}/v1/projects/{}/locations/{}/publishers/google/models/{}:predict",
            base.trim_end_matches('/'),
            self.project,
            self.location,
            self.model
        )
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), EmbedError> {
        let bad = |f: &str, r: &str| Err(EmbedError::invalid(f, r));
        let id_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'))
        };
        if !id_ok(&self.project) {
            return bad("project", "must be a Google Cloud project id");
        }
        if !id_ok(&self.location) {
            return bad("location", "must be a region such as us-central1");
        }
        if !id_ok(&self.model) {
            return bad(
                "model",
                "must be a model name such as multimodalembedding@001",
            );
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts", "must be at least 1");
        }
        if self.requests_per_minute == 0 {
            return bad("requests_per_minute", "must be at least 1");
        }
        if self.max_concurrency == 0 {
            return bad("max_concurrency", "must be at least 1");
        }
        if self.timeout.is_zero() {
            return bad("timeout", "must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(0), Duration::from_secs(1));
        assert_eq!(p.ceiling(3), Duration::from_secs(8));
        assert_eq!(p.ceiling(10), Duration::from_secs(60));
        for n in 0..8 {
            let d = p.delay(n, None);
            assert!(d <= p.ceiling(n));
        }
        assert!(p.delay(0, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }

    #[test]
    fn token_is_redacted_in_debug() {
        let c = VertexConfig::new("p").with_access_token("ya29.secret-token");
        let s = format!("{c:?}");
        assert!(!s.contains("ya29"), "{s}");
        assert!(s.contains("<redacted>"));
    }

    #[test]
    fn validation_names_the_setting() {
        let e = VertexConfig::new("p/../x").validate().unwrap_err();
        assert!(e.to_string().contains("project"), "{e}");
        let e = VertexConfig::new("p")
            .with_requests_per_minute(0)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("requests_per_minute"), "{e}");
        assert!(VertexConfig::new("my-proj").validate().is_ok());
    }
}
