//! `Stores::read_listed_if`: an object whose first bytes are not wanted is
//! abandoned after them (its body not downloaded), a wanted one is read
//! whole, one shorter than the head is judged whole; `Stores::read_head`
//! takes the first bytes alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use mmembed_store::{ObjectInfo, StoreOptions, Stores};

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 1024; // 64 MiB

/// Serves `/wanted` and `/unwanted` (64 MiB each, in 64 KiB chunks made as
/// the client takes them; `sent` counts them) and `/short` (3 bytes).
async fn server(sent: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(axum::routing::get(
            |State(sent): State<Arc<AtomicUsize>>, req: Request| async move {
                let first: &'static [u8] = match req.uri().path() {
                    "/short" => return Response::new(Body::from("yes")),
                    "/wanted" => b"yes",
                    _ => b"no!",
                };
                let chunks = futures::stream::iter(0..CHUNKS).map(move |i| {
                    sent.fetch_add(1, Ordering::SeqCst);
                    let mut c = vec![b'.'; CHUNK];
                    if i == 0 {
                        c[..3].copy_from_slice(first);
                    }
                    Ok::<_, std::io::Error>(Bytes::from(c))
                });
                Response::builder()
                    .header("content-length", CHUNK * CHUNKS)
                    .body(Body::from_stream(chunks))
                    .unwrap()
            },
        ))
        .with_state(sent);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn info(url: &str, name: &str, size: usize) -> ObjectInfo {
    ObjectInfo {
        uri: format!("{url}/{name}"),
        size: size as u64,
        updated: None,
        etag: None,
        generation: None,
        content_type: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwanted_bodies_are_abandoned_after_their_head() {
    let sent = Arc::new(AtomicUsize::new(0));
    let url = server(sent.clone()).await;
    let stores = Stores::new(StoreOptions::from_env());
    let yes = |head: &[u8]| head.starts_with(b"yes");
    let total = CHUNK * CHUNKS;

    let got = stores
        .read_listed_if(&info(&url, "unwanted", total), 1 << 30, 512, &yes)
        .await
        .unwrap();
    assert!(got.is_none());
    // Give the server the time to notice the closed connection.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let chunks = sent.swap(0, Ordering::SeqCst);
    assert!(
        chunks < CHUNKS / 4,
        "{chunks} of {CHUNKS} chunks were made for a body refused after its first 512 bytes"
    );

    let got = stores
        .read_listed_if(&info(&url, "wanted", total), 1 << 30, 512, &yes)
        .await
        .unwrap()
        .expect("wanted");
    assert_eq!(got.len(), total);
    assert!(got.starts_with(b"yes..."));

    // Shorter than the head: judged once it has all come.
    let got = stores
        .read_listed_if(&info(&url, "short", 3), 1 << 30, 512, &yes)
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"yes"[..]));
    let no = |_: &[u8]| false;
    let got = stores
        .read_listed_if(&info(&url, "short", 3), 1 << 30, 512, &no)
        .await
        .unwrap();
    assert!(got.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_head_takes_the_first_bytes_alone() {
    let sent = Arc::new(AtomicUsize::new(0));
    let url = server(sent.clone()).await;
    let stores = Stores::new(StoreOptions::from_env());
    let total = CHUNK * CHUNKS;
    let head = stores
        .read_head(&info(&url, "wanted", total), 512)
        .await
        .unwrap();
    assert_eq!(head.len(), 512);
    assert!(head.starts_with(b"yes..."));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let chunks = sent.load(Ordering::SeqCst);
    assert!(chunks < CHUNKS / 4, "{chunks} of {CHUNKS} chunks were made");
    // Shorter than asked: all of it.
    let head = stores
        .read_head(&info(&url, "short", 3), 512)
        .await
        .unwrap();
    assert_eq!(&head[..], b"yes");
}
