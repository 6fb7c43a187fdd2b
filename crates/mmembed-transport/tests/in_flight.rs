//! The bound on requests in flight holds across concurrent batches, and
//! batches answer in order: against a loopback HTTP server that counts the
//! requests it holds at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mmembed_transport::{
    Auth, ClientOptions, CredentialsSource, JsonClient, RetryPolicy, in_order,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers every POST with `{"n": <its body's n>}` after a delay that
/// makes later requests finish first, counting the requests held at once.
async fn server(now: Arc<AtomicUsize>, most: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (now, most) = (now.clone(), most.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request per read loop: headers, then the body.
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: serde_json::Value =
                        serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap();
                    buf.drain(..end + 4 + len);
                    let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(held, Ordering::SeqCst);
                    let n = body["n"].as_u64().unwrap();
                    tokio::time::sleep(Duration::from_millis(60 - (n % 4) * 15)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    let out = serde_json::json!({ "n": n }).to_string();
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{out}",
                        out.len()
                    );
                    if sock.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_share_the_bound_and_answer_in_order() {
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let url = server(now, most.clone()).await;
    let client = JsonClient::new(
        Auth::new(CredentialsSource::Anonymous, "", None),
        ClientOptions {
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            requests_per_minute: 1_000_000,
            max_in_flight: 3,
            service: "test".into(),
        },
    )
    .unwrap();
    // Three batches of eight at once, each allowed three at a time: nine
    // in flight if the bound were per batch.
    let batch = |start: u64| {
        let client = client.clone();
        let url = url.clone();
        async move {
            in_order((start..start + 8).collect(), 3, |n| {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    client
                        .post::<serde_json::Value>(&url, &serde_json::json!({ "n": n }))
                        .await
                        .unwrap()
                        .value["n"]
                        .as_u64()
                        .unwrap()
                }
            })
            .await
        }
    };
    let (a, b, c) = tokio::join!(batch(0), batch(100), batch(200));
    assert_eq!(a, (0..8).collect::<Vec<_>>());
    assert_eq!(b, (100..108).collect::<Vec<_>>());
    assert_eq!(c, (200..208).collect::<Vec<_>>());
    assert_eq!(most.load(Ordering::SeqCst), 3, "requests held at once");
}

#[test]
fn no_slots_is_refused() {
    let err = JsonClient::new(
        Auth::new(CredentialsSource::Anonymous, "", None),
        ClientOptions {
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            requests_per_minute: 60,
            max_in_flight: 0,
            service: "test".into(),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("max_concurrency"), "{err}");
}
