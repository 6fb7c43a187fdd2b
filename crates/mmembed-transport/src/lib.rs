//! mmembed's one transport for remote APIs: Google's (Vertex AI embeddings,
//! Gemini `generateContent`, Cloud Storage credentials) and self-hosted
//! model servers (OpenAI-compatible, Ollama).
//!
//! Everything a remote call needs lives here once: credentials
//! ([`Auth`]: ADC through `google-cloud-auth`, a bearer token, or none; the
//! quota project), client-side pacing ([`pacing`]) and a bound on the
//! requests in flight, retries with backoff and
//! `Retry-After` ([`RetryPolicy`]), error mapping and token redaction
//! ([`JsonClient`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), mmembed_core::EmbedError> {
//! use std::time::Duration;
//! use mmembed_transport::{Auth, ClientOptions, CredentialsSource, JsonClient, RetryPolicy, CLOUD_PLATFORM};
//! let client = JsonClient::new(
//!     Auth::new(CredentialsSource::ApplicationDefault, CLOUD_PLATFORM, None),
//!     ClientOptions {
//!         timeout: Duration::from_secs(60),
//!         retry: RetryPolicy::default(),
//!         requests_per_minute: 60,
//!         max_in_flight: 8,
//!         service: "Vertex AI".into(),
//!     },
//! )?;
//! let url = "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:countTokens";
//! let body = serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
//! let reply = client.post::<serde_json::Value>(url, &body).await?;
//! println!("{}", reply.value["totalTokens"]);
//! # Ok(()) }
//! ```

mod auth;
mod client;
pub mod pacing;
mod retry;

pub use auth::{Auth, CLOUD_PLATFORM, CredentialsSource, STORAGE_READ_WRITE, scrub};
pub use client::{ClientOptions, JsonClient, Reply, error_message, in_order, without_url};
pub use pacing::{Clock, Pacer, TokioClock, VirtualClock};
pub use retry::RetryPolicy;
