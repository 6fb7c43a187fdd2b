//! `http(s)://` URLs with a query string, against a stand-in that behaves
//! as S3 does for a presigned URL: the query is checked (403 without the
//! right signature), HEAD is refused (the URL is signed for GET), ranges
//! are served with `Content-Range`, `If-Range` with a stale ETag gets the
//! whole object. The first GET of each object breaks off half-way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use mmembed_store::{StoreError, StoreOptions, Stores};

#[derive(Default)]
struct Site {
    /// Raw path (as sent, percent-encoded) → (ETag, body).
    objects: Mutex<HashMap<String, (String, Bytes)>>,
    /// Whole (not ranged) GETs so far: the first breaks off.
    whole_gets: AtomicUsize,
    heads: AtomicUsize,
    /// The `Range` headers received.
    ranges: Mutex<Vec<String>>,
    /// What the broken-off object is rewritten to, the moment it breaks.
    rewrite: Mutex<Option<(String, Bytes)>>,
    /// Requests whose URL (query included) reached the server, for the
    /// check that the query is sent.
    log: Mutex<Vec<String>>,
}

async fn serve(State(site): State<Arc<Site>>, req: Request) -> Response {
    let reply = |code: StatusCode, body: &'static str| {
        Response::builder()
            .status(code)
            .body(Body::from(body))
            .unwrap()
    };
    let uri = req.uri().clone();
    site.log.lock().unwrap().push(uri.to_string());
    // The signature is checked as S3 does: the error page names it.
    if uri.query() != Some("X-Amz-Signature=good&X-Amz-Expires=60") {
        return reply(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch: X-Amz-Signature=",
        );
    }
    if req.method() == Method::HEAD {
        site.heads.fetch_add(1, Ordering::SeqCst);
        return reply(StatusCode::FORBIDDEN, "");
    }
    let Some((etag, body)) = site.objects.lock().unwrap().get(uri.path()).cloned() else {
        return reply(StatusCode::NOT_FOUND, "NoSuchKey");
    };
    let h = req.headers();
    if let Some(r) = h.get("range").and_then(|r| r.to_str().ok()) {
        site.ranges.lock().unwrap().push(r.to_string());
    }
    let range = h
        .get("range")
        .and_then(|r| r.to_str().ok()?.strip_prefix("bytes="))
        .and_then(|r| {
            let (a, b) = r.split_once('-')?;
            let a: usize = a.parse().ok()?;
            let b = if b.is_empty() {
                body.len() - 1
            } else {
                b.parse().ok()?
            };
            Some((a, b.min(body.len() - 1)))
        });
    let fresh = h
        .get("if-range")
        .is_none_or(|v| v.to_str().ok() == Some(etag.as_str()));
    let b = Response::builder()
        .header("etag", &etag)
        .header("last-modified", "Sun, 06 Dec 2026 10:00:00 GMT")
        .header("content-type", "image/png");
    match range {
        Some((a, z)) if fresh => b
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-range", format!("bytes {a}-{z}/{}", body.len()))
            .header("content-length", z + 1 - a)
            .body(Body::from(body.slice(a..=z)))
            .unwrap(),
        _ if site.whole_gets.fetch_add(1, Ordering::SeqCst) == 0 => {
            // The first whole GET breaks off half-way.
            if let Some(new) = site.rewrite.lock().unwrap().take() {
                site.objects
                    .lock()
                    .unwrap()
                    .insert(uri.path().to_string(), new);
            }
            // The half reaches the client before the connection drops.
            let half = body.slice(..body.len() / 2);
            let chunks = futures::stream::iter([Ok::<Bytes, std::io::Error>(half)]).chain(
                futures::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    Err(std::io::Error::other("cut"))
                }),
            );
            b.header("content-length", body.len())
                .body(Body::from_stream(chunks))
                .unwrap()
        }
        _ => b
            .header("content-length", body.len())
            .body(Body::from(body))
            .unwrap(),
    }
}

async fn start(site: Arc<Site>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(serve).with_state(site);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn stores() -> Stores {
    Stores::new(StoreOptions {
        initial_backoff: std::time::Duration::from_millis(5),
        ..StoreOptions::default()
    })
}

const QUERY: &str = "?X-Amz-Signature=good&X-Amz-Expires=60";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presigned_url_is_read_whole_through_a_refused_head_and_a_broken_body() {
    let site = Arc::new(Site::default());
    let body: Bytes = (0..200_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    site.objects.lock().unwrap().insert(
        "/photos/a%20cat.png".into(),
        ("\"v1\"".into(), body.clone()),
    );
    let url = start(site.clone()).await;
    let s = stores();
    let uri = format!("{url}/photos/a%20cat.png{QUERY}");

    let info = s.head(&uri).await.unwrap();
    assert_eq!(info.size, body.len() as u64, "from Content-Range's total");
    assert_eq!(info.etag.as_deref(), Some("\"v1\""));
    assert_eq!(info.content_type.as_deref(), Some("image/png"));
    assert!(info.updated.is_some());
    assert_eq!(
        site.heads.load(Ordering::SeqCst),
        1,
        "HEAD tried once, then a ranged GET"
    );

    let (got, _) = s.read(&uri, 1 << 20).await.unwrap();
    assert_eq!(got, body, "resumed after the break, the same bytes");
    let ranges = site.ranges.lock().unwrap().clone();
    assert_eq!(
        ranges,
        ["bytes=0-0", "bytes=100000-"],
        "head()'s probe; then read(): one GET (no HEAD), the rest after the break"
    );
    assert_eq!(site.heads.load(Ordering::SeqCst), 1);
    let log = site.log.lock().unwrap().clone();
    assert!(log.iter().all(|u| u.ends_with(QUERY)), "{log:?}");
    assert!(
        log.iter().all(|u| u.starts_with("/photos/a%20cat.png")),
        "the path as given, not encoded again: {log:?}"
    );

    // Too large: refused before the body, the signature not in the message.
    let e = s.read(&uri, 1000).await.unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
    assert!(!e.to_string().contains("Signature"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_object_starts_over_and_bad_signatures_are_denied_without_the_query() {
    let site = Arc::new(Site::default());
    let v1: Bytes = vec![1u8; 100_000].into();
    let v2: Bytes = vec![2u8; 120_000].into();
    site.objects
        .lock()
        .unwrap()
        .insert("/k.png".into(), ("\"v1\"".into(), v1));
    let url = start(site.clone()).await;
    let s = stores();
    let uri = format!("{url}/k.png{QUERY}");
    let info = s.head(&uri).await.unwrap();
    // Rewritten while its body breaks off: the resume names the old ETag
    // (If-Range), so the server sends the new object whole, and the half
    // of the old one already read is dropped.
    *site.rewrite.lock().unwrap() = Some(("\"v2\"".into(), v2.clone()));
    let got = s.read_listed(&info, 1 << 20).await.unwrap();
    assert!(got == v2, "the new object whole, not half of each");
    assert_eq!(
        site.ranges.lock().unwrap().last().map(String::as_str),
        Some("bytes=50000-")
    );

    let forged = format!("{url}/k.png?X-Amz-Signature=forged&X-Amz-Expires=60");
    let e = s.read(&forged, 1 << 20).await.unwrap_err();
    assert!(matches!(e, StoreError::Denied { .. }), "{e}");
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains("forged"), "{shown}");
    assert!(shown.contains("k.png?…"), "{shown}");

    let e = s
        .read(&format!("{url}/missing.png{QUERY}"), 10)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    let e = s.list(&format!("{url}/k.png{QUERY}")).await.unwrap_err();
    assert!(matches!(e, StoreError::Unsupported { .. }), "{e}");
    let e = s
        .put(
            &uri,
            Bytes::from("x"),
            "text/plain",
            mmembed_store::PutMode::Overwrite,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
}
