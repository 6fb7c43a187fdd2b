//! A GCS resumable upload against a session that misbehaves (a stand-in
//! server on loopback; the emulator behaves): the upload ends with an error
//! naming the object, it does not loop or send a bad range.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use mmembed_store::{StoreOptions, Stores};

/// Starts a GCS stand-in whose session answers every piece 308 with a
/// `Range` of `claims` bytes; returns its URL.
async fn session_claiming(claims: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let session = format!("{url}/session");
    let app = axum::Router::new().fallback(move |req: Request| {
        let session = session.clone();
        async move {
            if req.method() == axum::http::Method::POST {
                return Response::builder()
                    .header("location", session)
                    .body(axum::body::Body::empty())
                    .unwrap();
            }
            Response::builder()
                .status(StatusCode::PERMANENT_REDIRECT)
                .header("range", format!("bytes=0-{}", claims - 1))
                .body(axum::body::Body::empty())
                .unwrap()
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn a_session_that_claims_more_than_was_sent_ends_with_an_error() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("f.bin");
    std::fs::write(&path, vec![7u8; 600 << 10]).unwrap();
    for claims in [600 << 10, 10 << 20] {
        let s = Stores::new(StoreOptions {
            gcs_endpoint: Some(session_claiming(claims).await),
            upload_chunk: 256 << 10,
            max_retries: 3,
            initial_backoff: std::time::Duration::from_millis(1),
            ..StoreOptions::default()
        });
        let e = s
            .upload("gs://b/out.parquet", &path, "application/octet-stream")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gs://b/out.parquet") && e.contains("did not complete"),
            "{e}"
        );
    }
}
