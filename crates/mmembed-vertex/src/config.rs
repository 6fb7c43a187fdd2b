//! Client settings: builder methods and environment variables.

use std::time::Duration;

use mmembed_core::EmbedError;
pub use mmembed_transport::{CredentialsSource, RetryPolicy};
use secrecy::SecretString;

/// Vertex's model name for multimodal embeddings.
pub const DEFAULT_MODEL: &str = "multimodalembedding@001";

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
        self.model_url("predict")
    }

    /// The URL of `verb` (`predict`, `generateContent`, `countTokens`) on
    /// the configured model. Location `global` uses the global host,
    /// `us`/`eu` the multi-region ones, anything else the regional one.
    pub fn model_url(&self, verb: &str) -> String {
        let base = self
            .base_url
            .clone()
            .unwrap_or_else(|| match self.location.as_str() {
                "global" => "https://aiplatform.googleapis.com".to_string(),
                "us" | "eu" => format!("https://aiplatform.{}.rep.googleapis.com", self.location),
                l => format!("https://{l}-aiplatform.googleapis.com"),
            });
        format!(
            "{}/v1/projects/{}/locations/{}/publishers/google/models/{}:{verb}",
            base.trim_end_matches('/'),
            self.project,
            self.location,
            self.model
        )
    }

    /// The transport these settings describe: credentials, pacing, retries
    /// and timeout shared by every request of one client.
    pub fn transport(
        &self,
        service: &str,
        clock: std::sync::Arc<dyn mmembed_transport::Clock>,
    ) -> Result<mmembed_transport::JsonClient, EmbedError> {
        mmembed_transport::JsonClient::with_clock(
            mmembed_transport::Auth::new(
                self.credentials.clone(),
                mmembed_transport::CLOUD_PLATFORM,
                self.quota_project.clone(),
            ),
            mmembed_transport::ClientOptions {
                timeout: self.timeout,
                retry: self.retry,
                requests_per_minute: self.requests_per_minute,
                max_in_flight: self.max_concurrency,
                service: service.to_string(),
            },
            clock,
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
