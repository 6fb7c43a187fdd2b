//! The Vertex backend against a fake `:predict` server on loopback that
//! follows the documented contract (shared/VERTEX.md) and injects faults.
//! Retries and pacing run in virtual time (a recording `Clock`), so their
//! spacing is asserted exactly without waiting for it.

use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use mmembed_core::{EmbedError, EmbedRequest, Embedder, MediaSource, VideoSegmentConfig, testkit};
use mmembed_vertex::fake::{Behaviour, FakeVertex};
use mmembed_vertex::{Clock, RetryPolicy, VertexConfig, VertexEmbedder, VirtualClock};
use serde_json::json;

const TOKEN: &str = "ya29.test-token-that-must-never-leak";
const PROJECT: &str = "test-proj";

/// Every log line of the test binary, to check that no token leaks.
fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || LogWriter(b.clone()))
            .finish();
        tracing::subscriber::set_global_default(sub).unwrap();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);
impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn client(
    fake: &FakeVertex,
    tweak: impl FnOnce(VertexConfig) -> VertexConfig,
) -> (VertexEmbedder, Arc<VirtualClock>) {
    log_buffer();
    let clock = Arc::new(VirtualClock::default());
    let cfg = tweak(
        VertexConfig::new(PROJECT)
            .with_base_url(&fake.url)
            .with_access_token(TOKEN)
            .with_quota_project("quota-proj")
            .with_timeout(Duration::from_secs(5)),
    );
    (
        VertexEmbedder::with_clock(cfg, clock.clone()).unwrap(),
        clock,
    )
}

fn no_leak(e: &EmbedError) {
    assert!(!e.to_string().contains(TOKEN), "token in error: {e}");
    assert!(
        !format!("{e:?}").contains(TOKEN),
        "token in error debug: {e:?}"
    );
}

fn png_bytes() -> Vec<u8> {
    let img = mmembed_media::image_crate::RgbImage::from_pixel(
        4,
        3,
        mmembed_media::image_crate::Rgb([9, 8, 7]),
    );
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, mmembed_media::image_crate::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_exact_body_and_headers() {
    let fake = FakeVertex::start().unwrap();
    let (v, _) = client(&fake, |c| c);
    let png = png_bytes();
    let out = v
        .embed(
            EmbedRequest::text("a cat")
                .with_image(png.clone())
                .with_dimension(512),
        )
        .await
        .unwrap();
    assert_eq!(out.text.unwrap().len(), 512);
    assert_eq!(out.image.unwrap().len(), 512);
    assert_eq!((out.dimension, out.backend.as_str()), (512, "vertex"));
    assert_eq!(out.space.as_str(), "vertex:multimodalembedding@001");
    let r = &fake.requests()[0];
    assert_eq!(
        r.path,
        "/v1/projects/test-proj/locations/us-central1/publishers/google/models/multimodalembedding@001:predict"
    );
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(r.header("x-goog-user-project"), Some("quota-proj"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    assert_eq!(
        r.body,
        json!({"instances": [{"text": "a cat", "image": {"bytesBase64Encoded": b64, "mimeType": "image/png"}}],
               "parameters": {"dimension": 512}})
    );

    // gs:// passes through; no dimension means no `parameters`.
    v.embed(EmbedRequest::image(MediaSource::Uri(
        "gs://bkt/cat.jpg".into(),
    )))
    .await
    .unwrap();
    assert_eq!(
        fake.requests()[1].body,
        json!({"instances": [{"image": {"gcsUri": "gs://bkt/cat.jpg", "mimeType": "image/jpeg"}}]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_video_is_windowed_and_merged() {
    let fake = FakeVertex::start().unwrap();
    let (v, _) = client(&fake, |c| c);
    let cfg = VideoSegmentConfig::new(0, 300, 16).unwrap();
    let out = v
        .embed(EmbedRequest::video(b"fake-mp4-bytes".to_vec(), Some(cfg)))
        .await
        .unwrap();
    let reqs = fake.requests();
    let sent: Vec<_> = reqs
        .iter()
        .map(|r| r.body["instances"][0]["video"]["videoSegmentConfig"].clone())
        .collect();
    assert_eq!(
        sent,
        vec![
            json!({"startOffsetSec": 0, "endOffsetSec": 112, "intervalSec": 16}),
            json!({"startOffsetSec": 112, "endOffsetSec": 224, "intervalSec": 16}),
            json!({"startOffsetSec": 224, "endOffsetSec": 300, "intervalSec": 16}),
        ]
    );
    assert_eq!(
        reqs[0].body["instances"][0]["video"]["bytesBase64Encoded"],
        json!(base64::engine::general_purpose::STANDARD.encode(b"fake-mp4-bytes"))
    );
    assert!(
        reqs[0].body.get("parameters").is_none(),
        "no dimension with video"
    );
    // One ordered answer, segments back to back, the last clipped at 300.
    assert_eq!(out.video.len(), 19);
    for w in out.video.windows(2) {
        assert_eq!(w[0].end_sec, w[1].start_sec);
    }
    assert_eq!(out.video[0].start_sec, 0.0);
    assert_eq!(out.video.last().unwrap().end_sec, 300.0);
    assert!(out.video.iter().all(|s| s.embedding.len() == 1408));
    assert_eq!(out.dimension, 1408);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_honouring_retry_after_and_backing_off_without_it() {
    let fake = FakeVertex::start().unwrap();
    let (v, clock) = client(&fake, |c| c);
    fake.push(Behaviour::Status {
        code: 429,
        status: "RESOURCE_EXHAUSTED",
        retry_after: Some("7"),
    });
    fake.push(Behaviour::Status {
        code: 429,
        status: "RESOURCE_EXHAUSTED",
        retry_after: None,
    });
    fake.push(Behaviour::Status {
        code: 429,
        status: "RESOURCE_EXHAUSTED",
        retry_after: None,
    });
    v.embed(EmbedRequest::text("x")).await.unwrap();
    assert_eq!(fake.requests().len(), 4);
    // Pacing sleeps (0.5 s slots at 120/min) are mixed in; pick the backoffs.
    let sleeps: Vec<_> = clock.sleeps();
    let backoffs: Vec<_> = sleeps
        .iter()
        .filter(|d| **d != Duration::from_millis(500))
        .copied()
        .collect();
    assert!(
        backoffs[0] >= Duration::from_secs(7),
        "Retry-After honoured: {sleeps:?}"
    );
    assert!(
        backoffs
            .iter()
            .skip(1)
            .all(|d| *d <= Duration::from_secs(4)),
        "{sleeps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_503_exhausts_attempts_with_capped_backoff() {
    let fake = FakeVertex::start().unwrap();
    let policy = RetryPolicy {
        max_attempts: 4,
        ..RetryPolicy::default()
    };
    let (v, clock) = client(&fake, |c| {
        c.with_retry(policy).with_requests_per_minute(60_000)
    });
    for _ in 0..10 {
        fake.push(Behaviour::Status {
            code: 503,
            status: "UNAVAILABLE",
            retry_after: None,
        });
    }
    let e = v.embed(EmbedRequest::text("x")).await.unwrap_err();
    assert_eq!(fake.requests().len(), 4, "exactly max_attempts requests");
    match &e {
        EmbedError::Remote {
            http_status,
            status,
            message,
            retryable,
        } => {
            assert_eq!(
                (*http_status, status.as_deref()),
                (Some(503), Some("UNAVAILABLE"))
            );
            assert_eq!(message, "fake UNAVAILABLE");
            assert!(*retryable);
        }
        other => panic!("{other:?}"),
    }
    let sleeps = clock.sleeps();
    let backoffs: Vec<_> = sleeps
        .iter()
        .filter(|d| **d > Duration::from_millis(1))
        .collect();
    assert!(backoffs.len() <= 3);
    // A wait jittered to 1 ms or less (about one run in a thousand for
    // retry 0) is filtered out with the pacer's, so the k-th wait left may
    // be retry k or a later one: held to the latest one's ceiling (the
    // ceilings grow), which is retry k's own when none was dropped.
    let dropped = 3 - backoffs.len();
    for (k, d) in backoffs.iter().enumerate() {
        let n = (k + dropped) as u32;
        assert!(
            **d <= policy.ceiling(n),
            "wait {k} (retry {k}..={n}): {d:?}"
        );
    }
    no_leak(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_responses_time_out_and_are_retried() {
    let fake = FakeVertex::start().unwrap();
    let policy = RetryPolicy {
        max_attempts: 2,
        ..RetryPolicy::default()
    };
    let (v, _) = client(&fake, |c| {
        c.with_timeout(Duration::from_millis(300))
            .with_retry(policy)
    });
    fake.push(Behaviour::Slow(Duration::from_secs(2)));
    fake.push(Behaviour::Slow(Duration::from_secs(2)));
    let e = v.embed(EmbedRequest::text("x")).await.unwrap_err();
    assert!(matches!(e, EmbedError::Timeout { .. }), "{e:?}");
    assert_eq!(fake.requests().len(), 2);

    fake.push(Behaviour::Slow(Duration::from_secs(2)));
    v.embed(EmbedRequest::text("second try succeeds"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_retried_client_errors_are_not() {
    let fake = FakeVertex::start().unwrap();
    let (v, _) = client(&fake, |c| c);
    // A 200 with a cut-off body is a transport fault: retried, and the
    // second (good) answer is used.
    fake.push(Behaviour::Malformed);
    v.embed(EmbedRequest::text("x")).await.unwrap();
    assert_eq!(fake.requests().len(), 2);
    // Every attempt malformed: the last error says so, and is retryable.
    for _ in 0..5 {
        fake.push(Behaviour::Malformed);
    }
    let e = v.embed(EmbedRequest::text("x")).await.unwrap_err();
    assert!(e.to_string().contains("malformed response"), "{e}");
    assert!(e.is_retryable());
    assert_eq!(fake.requests().len(), 7);

    for (code, status) in [
        (400, "INVALID_ARGUMENT"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
    ] {
        let before = fake.requests().len();
        fake.push(Behaviour::Status {
            code,
            status,
            retry_after: None,
        });
        let e = v.embed(EmbedRequest::text("x")).await.unwrap_err();
        assert_eq!(fake.requests().len(), before + 1, "{status} is not retried");
        assert!(
            matches!(&e, EmbedError::Remote { http_status: Some(c), status: Some(s), .. } if *c == code && s == status),
            "{e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_refreshes_once() {
    let fake = FakeVertex::start().unwrap();
    let (v, clock) = client(&fake, |c| c);
    fake.push(Behaviour::Status {
        code: 401,
        status: "UNAUTHENTICATED",
        retry_after: None,
    });
    v.embed(EmbedRequest::text("x")).await.unwrap();
    assert_eq!(fake.requests().len(), 2);
    assert!(
        clock
            .sleeps()
            .iter()
            .all(|d| *d <= Duration::from_millis(500)),
        "a refresh is not a backoff"
    );

    fake.push(Behaviour::Status {
        code: 401,
        status: "UNAUTHENTICATED",
        retry_after: None,
    });
    fake.push(Behaviour::Status {
        code: 401,
        status: "UNAUTHENTICATED",
        retry_after: None,
    });
    let e = v.embed(EmbedRequest::text("x")).await.unwrap_err();
    assert_eq!(fake.requests().len(), 4, "one refresh only");
    assert!(
        matches!(
            &e,
            EmbedError::Remote {
                http_status: Some(401),
                ..
            }
        ),
        "{e:?}"
    );
    no_leak(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried() {
    let fake = FakeVertex::start().unwrap();
    let (v, _) = client(&fake, |c| c);
    fake.push(Behaviour::Drop);
    fake.push(Behaviour::Drop);
    v.embed(EmbedRequest::text("x")).await.unwrap();
    assert_eq!(fake.requests().len(), 3);

    // Nothing listening at all: retried, then a clear retryable error.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let clock = Arc::new(VirtualClock::default());
    let v = VertexEmbedder::with_clock(
        VertexConfig::new(PROJECT)
            .with_base_url(format!("http://127.0.0.1:{port}"))
            .with_access_token(TOKEN),
        clock,
    )
    .unwrap();
    let e = v.embed(EmbedRequest::text("x")).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    no_leak(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_token_is_scrubbed_and_logs_never_hold_it() {
    let fake = FakeVertex::start().unwrap();
    let (v, _) = client(&fake, |c| c);
    fake.push(Behaviour::EchoAuth);
    let e = v.embed(EmbedRequest::text("x")).await.unwrap_err();
    assert!(e.to_string().contains("<redacted>"), "{e}");
    no_leak(&e);
    assert!(!format!("{v:?}").contains(TOKEN));
    let logs = String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned();
    assert!(!logs.contains(TOKEN), "token in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_fail_before_any_network_call() {
    let fake = FakeVertex::start().unwrap();
    let (v, _) = client(&fake, |c| c);
    let bad = vec![
        EmbedRequest::default(),
        EmbedRequest::text("x").with_dimension(300),
        EmbedRequest::video(b"v".to_vec(), None).with_dimension(512),
        EmbedRequest::video(
            b"v".to_vec(),
            Some(VideoSegmentConfig {
                interval_sec: Some(3),
                ..Default::default()
            }),
        ),
        EmbedRequest::video(
            b"v".to_vec(),
            Some(VideoSegmentConfig {
                start_offset_sec: Some(50),
                end_offset_sec: Some(20),
                ..Default::default()
            }),
        ),
        EmbedRequest::image(MediaSource::Uri("https://example.com/cat.png".into())),
        EmbedRequest::image(b"not an image".to_vec()),
        EmbedRequest::text(" "),
    ];
    let n = bad.len();
    let out = v.embed_batch(bad).await;
    assert_eq!(out.len(), n);
    for (i, r) in out.iter().enumerate() {
        let e = r.as_ref().expect_err("must be refused");
        assert!(!e.is_retryable(), "{i}: {e}");
    }
    assert!(
        matches!(&out[1], Err(EmbedError::UnsupportedDimension { supported, .. }) if supported == &vec![128, 256, 512, 1408])
    );
    assert_eq!(fake.requests().len(), 0, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_request_batch_is_paced_at_the_quota() {
    for rpm in [120u32, 600] {
        let fake = FakeVertex::start().unwrap();
        let (v, clock) = client(&fake, |c| {
            c.with_requests_per_minute(rpm).with_max_concurrency(16)
        });
        let reqs = (0..300)
            .map(|i| EmbedRequest::text(format!("caption {i}")))
            .collect();
        let out = v.embed_batch(reqs).await;
        assert!(out.iter().all(Result::is_ok));
        // Results in input order: each text got its own vector back.
        let first = out[0].as_ref().unwrap().text.clone().unwrap();
        assert_ne!(first, out[1].as_ref().unwrap().text.clone().unwrap());
        assert_eq!(fake.requests().len(), 300);
        let interval = 60.0 / f64::from(rpm);
        let elapsed = clock.now().as_secs_f64();
        // 300 evenly spaced slots: the last one starts 299 intervals in.
        assert!(
            (elapsed - 299.0 * interval).abs() < interval,
            "rpm {rpm}: {elapsed} s of virtual time"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let fake = FakeVertex::start().unwrap();
    let (v, _) = client(&fake, |c| c.with_requests_per_minute(60_000));
    testkit::batch_contract(&v, ["a photo of a cat", "a red square"]).await;
    testkit::refuses_unlisted_modalities(&v).await;
    for cfg in [(0, 60, 8), (30, 290, 16), (0, 120, 4)] {
        let cfg = VideoSegmentConfig::new(cfg.0, cfg.1, cfg.2).unwrap();
        testkit::video_segments_contract(&v, EmbedRequest::video(b"mp4".to_vec(), Some(cfg))).await;
    }
}

/// Against the real service: needs GOOGLE_CLOUD_PROJECT and credentials
/// (ADC or MMEMBED_VERTEX_ACCESS_TOKEN); costs a few requests.
#[tokio::test]
#[ignore = "calls the real Vertex AI service"]
async fn live_service() {
    let v = VertexEmbedder::new(VertexConfig::from_env().unwrap()).unwrap();
    let out = v
        .embed(EmbedRequest::text("a photo of a cat").with_dimension(128))
        .await
        .unwrap();
    assert_eq!(out.text.unwrap().len(), 128);
}

/// With the `video` feature, a local video's range ends at its real length.
#[cfg(feature = "video")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_video_without_end_is_covered_to_its_real_length() {
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("long.mp4");
    mmembed_core::testkit::ffmpeg([
        "-f".as_ref(),
        "lavfi".as_ref(),
        "-i".as_ref(),
        "color=c=red:s=64x48:r=2:d=150".as_ref(),
        "-c:v".as_ref(),
        "libx264".as_ref(),
        video.as_os_str(),
    ]);
    let fake = FakeVertex::start().unwrap();
    let (v, _) = client(&fake, |c| c);
    let out = v.embed(EmbedRequest::video(video, None)).await.unwrap();
    let sent: Vec<_> = fake
        .requests()
        .iter()
        .map(|r| r.body["instances"][0]["video"]["videoSegmentConfig"].clone())
        .collect();
    assert_eq!(
        sent,
        vec![
            json!({"startOffsetSec": 0, "endOffsetSec": 112, "intervalSec": 16}),
            json!({"startOffsetSec": 112, "endOffsetSec": 150}),
        ]
        .into_iter()
        .map(|mut j| {
            j["intervalSec"] = json!(16);
            j
        })
        .collect::<Vec<_>>()
    );
    assert_eq!(out.video.last().unwrap().end_sec, 150.0);
}
