//! Request headers that authenticate us: Application Default Credentials
//! through `google-cloud-auth`, a plain bearer token (a Google access token,
//! a self-hosted server's API key), or nothing (emulators, local servers).
//!
//! One place for every Google API we call (Vertex embeddings, Gemini, Cloud
//! Storage): each builds an [`Auth`] with its own scope.

use std::fmt;

use google_cloud_auth::credentials::{Builder, CacheableResource, Credentials};
use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use mmembed_core::EmbedError;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

/// The scope of Vertex AI (embeddings, Gemini).
pub const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The scope of Cloud Storage reads and writes.
pub const STORAGE_READ_WRITE: &str = "https://www.googleapis.com/auth/devstorage.read_write";
const QUOTA_HEADER: &str = "x-goog-user-project";

/// Where the credentials come from.
#[derive(Clone, Default)]
pub enum CredentialsSource {
    /// Application Default Credentials through `google-cloud-auth`:
    /// `GOOGLE_APPLICATION_CREDENTIALS`, then gcloud's ADC file, then the
    /// metadata server.
    #[default]
    ApplicationDefault,
    /// A ready bearer token: a Google access token (`gcloud auth
    /// print-access-token`; it expires, ADC refreshes itself) or a
    /// self-hosted server's API key.
    AccessToken(SecretString),
    /// No `Authorization` header (emulators, local servers without a key).
    Anonymous,
}

impl fmt::Debug for CredentialsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ApplicationDefault => f.write_str("ApplicationDefault"),
            Self::AccessToken(_) => f.write_str("AccessToken(<redacted>)"),
            Self::Anonymous => f.write_str("Anonymous"),
        }
    }
}

/// Produces auth headers; share one per client (clones of a client share
/// its token cache).
pub struct Auth {
    source: CredentialsSource,
    scope: &'static str,
    quota_project: Option<String>,
    adc: Mutex<Option<Credentials>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("source", &self.source)
            .field("scope", &self.scope)
            .field("quota_project", &self.quota_project)
            .finish_non_exhaustive()
    }
}

fn auth_error(message: String) -> EmbedError {
    // Messages here come from our own text or google-cloud-auth's errors,
    // which describe the failing step, never the token.
    EmbedError::Remote {
        http_status: None,
        status: Some("UNAUTHENTICATED".into()),
        message,
        retryable: false,
    }
}

impl Auth {
    /// Credentials from `source` for `scope` (see [`CLOUD_PLATFORM`],
    /// [`STORAGE_READ_WRITE`]), billing `quota_project` when given.
    pub fn new(
        source: CredentialsSource,
        scope: &'static str,
        quota_project: Option<String>,
    ) -> Self {
        Self {
            source,
            scope,
            quota_project,
            adc: Mutex::new(None),
        }
    }

    fn build_adc(&self) -> Result<Credentials, EmbedError> {
        let mut b = Builder::default().with_scopes([self.scope]);
        if let Some(q) = &self.quota_project {
            b = b.with_quota_project_id(q.clone());
        }
        b.build().map_err(|e| {
            auth_error(format!(
                "no usable Application Default Credentials ({e}); run `gcloud auth \
                 application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or give an \
                 access token (e.g. MMEMBED_VERTEX_ACCESS_TOKEN)"
            ))
        })
    }

    /// Headers for the next request. `refresh` drops cached credentials so a
    /// new token is fetched (after a 401).
    pub async fn headers(&self, refresh: bool) -> Result<HeaderMap, EmbedError> {
        let mut headers = match &self.source {
            CredentialsSource::Anonymous => HeaderMap::new(),
            CredentialsSource::AccessToken(t) => {
                let mut h = HeaderMap::new();
                let mut v = HeaderValue::from_str(&format!("Bearer {}", t.expose_secret()))
                    .map_err(|_| auth_error("the access token has invalid characters".into()))?;
                v.set_sensitive(true);
                h.insert(AUTHORIZATION, v);
                h
            }
            CredentialsSource::ApplicationDefault => {
                let creds = {
                    let mut guard = self.adc.lock().await;
                    if refresh || guard.is_none() {
                        *guard = Some(self.build_adc()?);
                    }
                    guard
                        .clone()
                        .ok_or_else(|| auth_error("credentials missing".into()))?
                };
                match creds.headers(http::Extensions::new()).await {
                    Ok(CacheableResource::New { data, .. }) => data,
                    Ok(CacheableResource::NotModified) => {
                        return Err(auth_error("credentials returned no headers".into()));
                    }
                    Err(e) => {
                        return Err(EmbedError::Remote {
                            http_status: None,
                            status: Some("UNAUTHENTICATED".into()),
                            message: format!("cannot get an access token: {e}"),
                            retryable: e.is_transient(),
                        });
                    }
                }
            }
        };
        if let Some(q) = &self.quota_project
            && !headers.contains_key(QUOTA_HEADER)
        {
            let v = HeaderValue::from_str(q)
                .map_err(|_| auth_error("the quota project has invalid characters".into()))?;
            headers.insert(QUOTA_HEADER, v);
        }
        Ok(headers)
    }

    /// The static token, to scrub it from anything we might print.
    pub fn static_token(&self) -> Option<&SecretString> {
        match &self.source {
            CredentialsSource::AccessToken(t) => Some(t),
            CredentialsSource::ApplicationDefault | CredentialsSource::Anonymous => None,
        }
    }

    /// The project billed for quota, if one was given.
    pub fn quota_project(&self) -> Option<&str> {
        self.quota_project.as_deref()
    }
}

/// Replaces any occurrence of `secret` in `text` (defence in depth for
/// messages that echo request data).
pub fn scrub(text: String, secret: Option<&SecretString>) -> String {
    match secret {
        Some(s) if !s.expose_secret().is_empty() && text.contains(s.expose_secret()) => {
            text.replace(s.expose_secret(), "<redacted>")
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_token_and_quota_project_headers() {
        let a = Auth::new(
            CredentialsSource::AccessToken("ya29.tok".to_string().into()),
            CLOUD_PLATFORM,
            Some("billing-proj".into()),
        );
        let h = a.headers(false).await.unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer ya29.tok");
        assert!(h[AUTHORIZATION].is_sensitive());
        assert_eq!(h[QUOTA_HEADER], "billing-proj");
        assert!(!format!("{a:?}").contains("ya29"));
        assert_eq!(a.quota_project(), Some("billing-proj"));
        assert_eq!(
            scrub("echo ya29.tok back".into(), a.static_token()),
            "echo <redacted> back"
        );
    }

    #[tokio::test]
    async fn anonymous_sends_no_authorization() {
        let a = Auth::new(CredentialsSource::Anonymous, CLOUD_PLATFORM, None);
        assert!(a.headers(false).await.unwrap().is_empty());
        assert!(a.static_token().is_none());
    }
}
