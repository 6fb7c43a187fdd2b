//! Every setting has an environment variable. Alone in its own test binary
//! because it changes the process environment.

use std::time::Duration;

use mmembed_vertex::{CredentialsSource, VertexConfig};

#[test]
fn settings_come_from_the_environment() {
    let vars = [
        ("GOOGLE_CLOUD_PROJECT", "env-proj"),
        ("GOOGLE_CLOUD_LOCATION", "europe-west4"),
        ("MMEMBED_VERTEX_MODEL", "multimodalembedding@001"),
        ("MMEMBED_VERTEX_BASE_URL", "http://127.0.0.1:9"),
        ("MMEMBED_VERTEX_TIMEOUT_SECS", "2.5"),
        ("MMEMBED_VERTEX_MAX_ATTEMPTS", "3"),
        ("MMEMBED_VERTEX_RPM", "600"),
        ("MMEMBED_VERTEX_CONCURRENCY", "4"),
        ("MMEMBED_VERTEX_ACCESS_TOKEN", "ya29.env-token"),
        ("GOOGLE_CLOUD_QUOTA_PROJECT", "billing"),
    ];
    for (k, v) in vars {
        // SAFETY: this binary has one test and sets variables before any
        // other thread exists.
        unsafe { std::env::set_var(k, v) };
    }
    let c = VertexConfig::from_env().unwrap();
    assert_eq!(c.project, "env-proj");
    assert_eq!(c.location, "europe-west4");
    assert_eq!(c.base_url.as_deref(), Some("http://127.0.0.1:9"));
    assert_eq!(c.timeout, Duration::from_millis(2500));
    assert_eq!(c.retry.max_attempts, 3);
    assert_eq!((c.requests_per_minute, c.max_concurrency), (600, 4));
    assert!(matches!(c.credentials, CredentialsSource::AccessToken(_)));
    assert_eq!(c.quota_project.as_deref(), Some("billing"));
    assert!(
        c.endpoint()
            .starts_with("http://127.0.0.1:9/v1/projects/env-proj/locations/europe-west4/")
    );
    assert!(!format!("{c:?}").contains("env-token"));

    // SAFETY: as above.
    unsafe { std::env::set_var("MMEMBED_VERTEX_RPM", "lots") };
    let e = VertexConfig::from_env().unwrap_err();
    assert!(e.to_string().contains("MMEMBED_VERTEX_RPM"), "{e}");
    // SAFETY: as above.
    unsafe { std::env::remove_var("GOOGLE_CLOUD_PROJECT") };
    let e = VertexConfig::from_env().unwrap_err();
    assert!(e.to_string().contains("GOOGLE_CLOUD_PROJECT"), "{e}");
}
