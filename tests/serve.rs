//! End to end: `mmembed-server` over the local backend (the bundled demo
//! model), driven by real HTTP (reqwest) and gRPC (tonic) clients. The
//! expected vectors are the library's own answers for the same inputs,
//! computed directly on another instance of the backend, not through the
//! server.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use mmembed::core::batching::BatchOptions;
use mmembed::local::{LocalEmbedder, LocalOptions};
use mmembed::{EmbedRequest, Embedder, VideoSegmentConfig, cosine};
use mmembed_server::pb::model_garden_service_client::ModelGardenServiceClient;
use mmembed_server::pb::prediction_service_client::PredictionServiceClient;
use mmembed_server::pb::{GetPublisherModelRequest, PredictRequest};
use mmembed_server::{ApiKey, Server, ServerConfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const PREDICT: &str = "/v1/projects/p/locations/us-central1/publishers/google/models/multimodalembedding%40001:predict?%24alt=json%3Benum-encoding%3Dint";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn cat_png() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/fixtures/images/cat_451x300.png"
    ))
    .unwrap()
}

async fn demo() -> Arc<dyn Embedder> {
    Arc::new(
        LocalEmbedder::load(LocalOptions::new("demo").with_max_batch(8))
            .await
            .unwrap(),
    )
}

/// A 12-second slideshow of three fixture images, 4 s each.
fn slideshow(dir: &std::path::Path) -> Vec<u8> {
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for (i, name) in [
        "cat_451x300.png",
        "rocket_640x427.jpg",
        "astronaut_small_120x90.png",
    ]
    .iter()
    .enumerate()
    {
        let src = format!(
            "{}/models/fixtures/images/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let img =
            image::open(src)
                .unwrap()
                .resize_exact(160, 120, image::imageops::FilterType::Triangle);
        img.to_rgb8()
            .save(imgs.join(format!("f{i:02}.png")))
            .unwrap();
    }
    let out = dir.join("slideshow.mp4");
    mmembed::core::testkit::ffmpeg([
        "-framerate".as_ref(),
        "1/4".as_ref(),
        "-i".as_ref(),
        imgs.join("f%02d.png").as_os_str(),
        "-vf".as_ref(),
        "fps=10,format=yuv420p".as_ref(),
        "-c:v".as_ref(),
        "libx264".as_ref(),
        out.as_os_str(),
    ]);
    std::fs::read(out).unwrap()
}

/// A backend that holds every call until the test opens it, so a test can
/// act while a request is in the backend without racing how long the
/// demo model takes (a few milliseconds on a fast machine).
struct Gated {
    inner: Arc<dyn Embedder>,
    open: tokio::sync::watch::Receiver<bool>,
}

impl Gated {
    /// The gated backend and the switch that opens it.
    fn closed(inner: Arc<dyn Embedder>) -> (Arc<dyn Embedder>, tokio::sync::watch::Sender<bool>) {
        let (tx, open) = tokio::sync::watch::channel(false);
        (Arc::new(Self { inner, open }), tx)
    }
}

#[async_trait::async_trait]
impl Embedder for Gated {
    fn info(&self) -> &mmembed::EmbedderInfo {
        self.inner.info()
    }

    async fn embed_batch(
        &self,
        reqs: Vec<EmbedRequest>,
    ) -> Vec<Result<mmembed::Embeddings, mmembed::EmbedError>> {
        let _ = self.open.clone().wait_for(|open| *open).await;
        self.inner.embed_batch(reqs).await
    }
}

/// Waits for `cond`, checking every few milliseconds; a test that would
/// otherwise hang fails after a minute instead.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "waited a minute for {what}");
}

async fn metrics(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

struct Running {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), mmembed_server::ServerError>>,
}

impl Running {
    async fn start_with(
        cfg: ServerConfig,
        load: impl std::future::Future<Output = Result<Arc<dyn Embedder>, String>> + Send + 'static,
    ) -> Self {
        let server = Server::bind(ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..cfg
        })
        .await
        .unwrap();
        let url = format!("http://{}", server.local_addr());
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(server.run(load, async move {
            let _ = rx.await;
        }));
        Self {
            url,
            stop: Some(tx),
            done,
        }
    }

    async fn start(cfg: ServerConfig, e: Arc<dyn Embedder>) -> Self {
        let r = Self::start_with(cfg, async move { Ok(e) }).await;
        r.wait_ready().await;
        r
    }

    async fn wait_ready(&self) {
        let c = reqwest::Client::new();
        for _ in 0..500 {
            if let Ok(r) = c.get(format!("{}/health", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server never became healthy");
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
    }
}

async fn post(url: &str, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = reqwest::Client::new()
        .post(format!("{url}{PREDICT}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap(), headers)
}

fn vector(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a vector: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let c = cosine(got, want);
    assert!(c > 0.99999, "cosine {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_answers_like_the_library_for_every_modality() {
    let reference = demo().await;
    let server = Running::start(ServerConfig::default(), demo().await).await;
    let png = cat_png();
    let dir = tempfile::tempdir().unwrap();
    let video = slideshow(dir.path());

    // What the SDK asks before anything else.
    let r = reqwest::get(format!(
        "{}/v1/publishers/google/models/multimodalembedding%40001?%24alt=json%3Benum-encoding%3Dint",
        server.url
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let model: Value = r.json().await.unwrap();
    assert_eq!(
        model["name"],
        "publishers/google/models/multimodalembedding"
    );
    assert_eq!(model["versionId"], "001");
    assert_eq!(
        model["predictSchemata"]["instanceSchemaUri"],
        mmembed_server::INSTANCE_SCHEMA_URI
    );

    // Text + image in one instance, the dimension as a float (as the SDK sends it).
    let (status, body, _) = post(
        &server.url,
        &json!({"instances": [{"text": "a photo of a cat", "image": {"bytesBase64Encoded": b64(&png)}}],
                "parameters": {"dimension": 64.0}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deployedModelId"], "mmembed");
    let want = reference
        .embed(EmbedRequest::text("a photo of a cat").with_image(png.clone()))
        .await
        .unwrap();
    let p = &body["predictions"][0];
    assert_close(&vector(&p["textEmbedding"]), want.text.as_ref().unwrap());
    assert_close(&vector(&p["imageEmbedding"]), want.image.as_ref().unwrap());

    // Video with a segment config: [0,4) [4,8) [8,12).
    let (status, body, _) = post(
        &server.url,
        &json!({"instances": [{"video": {"bytesBase64Encoded": b64(&video),
            "videoSegmentConfig": {"startOffsetSec": 0.0, "endOffsetSec": 12.0, "intervalSec": 4.0}}}],
            "parameters": {}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let want = reference
        .embed(EmbedRequest::video(
            video.clone(),
            Some(VideoSegmentConfig::new(0, 12, 4).unwrap()),
        ))
        .await
        .unwrap();
    let segs = body["predictions"][0]["videoEmbeddings"]
        .as_array()
        .unwrap();
    assert_eq!(segs.len(), 3);
    for (s, w) in segs.iter().zip(&want.video) {
        assert_eq!(s["startOffsetSec"].as_f64().unwrap(), w.start_sec);
        assert_eq!(s["endOffsetSec"].as_f64().unwrap(), w.end_sec);
        assert_close(&vector(&s["embedding"]), &w.embedding);
    }

    // Several instances: as many predictions, in order.
    let texts = ["a red star", "a blue square", "a green cross"];
    let (status, body, _) = post(
        &server.url,
        &json!({"instances": texts.iter().map(|t| json!({"text": t})).collect::<Vec<_>>()}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for (i, t) in texts.iter().enumerate() {
        let want = reference.embed(EmbedRequest::text(*t)).await.unwrap();
        assert_close(
            &vector(&body["predictions"][i]["textEmbedding"]),
            want.text.as_ref().unwrap(),
        );
    }

    // Errors: Google's shape, the message naming what is wrong.
    let (status, body, _) = post(
        &server.url,
        &json!({"instances": [{"text": "a cat"}], "parameters": {"dimension": 1408.0}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(body["error"]["code"], 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unsupported dimension 1408: this model produces [64]"),
        "{body}"
    );
    let (status, body, _) = post(
        &server.url,
        &json!({"instances": [{"image": {"bytesBase64Encoded": b64(b"not an image")}}]}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["status"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1/projects/p/locations/l/publishers/google/models/textembedding-gecko:predict",
            server.url
        ))
        .body(r#"{"instances": [{"text": "a"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::get(format!("{}{}", server.url, PREDICT))
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    // Metrics saw it all.
    let m = metrics(&server.url).await;
    for needle in [
        r#"mmembed_requests_total{route="predict",code="200"} 3"#,
        r#"mmembed_requests_total{route="predict",code="400"} 2"#,
        r#"mmembed_instances_total{modality="video"} 1"#,
        "mmembed_batch_requests_bucket",
        "mmembed_request_duration_seconds_bucket",
        "mmembed_queue_depth 0",
        "mmembed_model_loaded 1",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    server.stop().await;
}

/// The other model families behind the server: the same answers as the
/// library, texts of different lengths in one request included (SigLIP
/// pads to its context, Chinese-CLIP masks a batch's padding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_families_answer_like_the_library() {
    let png = cat_png();
    for fixture in [
        "tiny-siglip",
        "tiny-siglip2-naflex",
        "tiny-chinese-clip",
        "tiny-mobileclip",
    ] {
        let dir = format!("{}/models/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
        let load = || LocalEmbedder::load_blocking(LocalOptions::new(&dir).with_max_batch(8));
        let reference = load().unwrap();
        let server = Running::start(ServerConfig::default(), Arc::new(load().unwrap())).await;
        let texts = [
            "一只猫的照片",
            "a photo of a cat",
            "a much longer caption about a cup of coffee on a saucer, seen from above",
        ];
        let mut instances: Vec<Value> = texts.iter().map(|t| json!({"text": t})).collect();
        instances.push(json!({"image": {"bytesBase64Encoded": b64(&png)}}));
        let (status, body, _) = post(&server.url, &json!({"instances": instances})).await;
        assert_eq!(status, 200, "{fixture}: {body}");
        for (i, t) in texts.iter().enumerate() {
            let want = reference.embed(EmbedRequest::text(*t)).await.unwrap();
            let got = vector(&body["predictions"][i]["textEmbedding"]);
            assert_close(&got, want.text.as_ref().unwrap());
        }
        let want = reference
            .embed(EmbedRequest::image(png.clone()))
            .await
            .unwrap();
        assert_close(
            &vector(&body["predictions"][3]["imageEmbedding"]),
            want.image.as_ref().unwrap(),
        );
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_are_batched_and_a_full_queue_answers_429() {
    let e = demo().await;
    let reference = demo().await;
    let server = Running::start(ServerConfig::default(), e.clone()).await;
    let texts: Vec<String> = (0..48).map(|i| format!("shape number {i}")).collect();
    let mut tasks = Vec::new();
    for t in &texts {
        let (url, t) = (server.url.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            post(&url, &json!({"instances": [{"text": t}]})).await
        }));
    }
    let want = reference
        .embed_batch(texts.iter().map(EmbedRequest::text).collect())
        .await;
    for (t, w) in tasks.into_iter().zip(want) {
        let (status, body, _) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_close(
            &vector(&body["predictions"][0]["textEmbedding"]),
            w.unwrap().text.as_ref().unwrap(),
        );
    }
    let m = metrics(&server.url).await;
    let batches: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("mmembed_batch_requests_count "))
        .unwrap()
        .parse()
        .unwrap();
    let requests: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("mmembed_batch_requests_sum "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(requests, 48.0);
    assert!(
        batches < 48.0,
        "48 concurrent requests in {batches} backend calls"
    );
    server.stop().await;

    // A queue of one: concurrent callers beyond it are told to come back.
    let cfg = ServerConfig {
        batch: BatchOptions {
            max_batch: 1,
            max_queued: 1,
            ..BatchOptions::default()
        },
        ..ServerConfig::default()
    };
    // The backend holds the first call, so the queue stays full and the
    // others must be refused, however fast the model is.
    let (gated, open) = Gated::closed(e);
    let server = Running::start(cfg, gated).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let url = server.url.clone();
        tasks.push(tokio::spawn(async move {
            post(
                &url,
                &json!({"instances": [{"text": format!("a star {i}")}]}),
            )
            .await
        }));
    }
    // While the backend is held, a task can only finish by being refused.
    eventually("a refused request", || {
        let any = tasks.iter().any(|t| t.is_finished());
        async move { any }
    })
    .await;
    open.send(true).unwrap();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (status, body, headers) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                refused += 1;
                assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
                assert_eq!(headers["retry-after"], "1");
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_answers_like_rest() {
    let reference = demo().await;
    let server = Running::start(ServerConfig::default(), demo().await).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let model = ModelGardenServiceClient::new(channel.clone())
        .get_publisher_model(GetPublisherModelRequest {
            name: "publishers/google/models/multimodalembedding@001".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(model.version_id, "001");
    assert_eq!(
        model.predict_schemata.unwrap().instance_schema_uri,
        mmembed_server::INSTANCE_SCHEMA_URI
    );

    let value = |v: Value| -> prost_types::Value {
        // The same JSON-to-Value mapping the Python SDK's json_format does.
        fn conv(v: Value) -> prost_types::Value {
            use prost_types::value::Kind;
            let kind = match v {
                Value::Null => Kind::NullValue(0),
                Value::Bool(b) => Kind::BoolValue(b),
                Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
                Value::String(s) => Kind::StringValue(s),
                Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                    values: a.into_iter().map(conv).collect(),
                }),
                Value::Object(o) => Kind::StructValue(prost_types::Struct {
                    fields: o.into_iter().map(|(k, v)| (k, conv(v))).collect(),
                }),
            };
            prost_types::Value { kind: Some(kind) }
        }
        conv(v)
    };
    let mut client = PredictionServiceClient::new(channel);
    let png = cat_png();
    let resp = client
        .predict(PredictRequest {
            endpoint:
                "projects/p/locations/us-central1/publishers/google/models/multimodalembedding@001"
                    .into(),
            instances: vec![value(
                json!({"text": "a photo of a cat", "image": {"bytesBase64Encoded": b64(&png)}}),
            )],
            parameters: Some(value(json!({"dimension": 64.0}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = reference
        .embed(EmbedRequest::text("a photo of a cat").with_image(png))
        .await
        .unwrap();
    let p = mmembed_json(&resp.predictions[0]);
    assert_close(&vector(&p["textEmbedding"]), want.text.as_ref().unwrap());
    assert_close(&vector(&p["imageEmbedding"]), want.image.as_ref().unwrap());

    let err = client
        .predict(PredictRequest {
            endpoint: "projects/p/locations/l/publishers/google/models/multimodalembedding@001"
                .into(),
            instances: vec![value(json!({"text": "a"}))],
            parameters: Some(value(json!({"dimension": 128.0}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("unsupported dimension 128"),
        "{}",
        err.message()
    );
    server.stop().await;
}

/// A prediction `Value` as JSON, through the protobuf JSON mapping.
fn mmembed_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(mmembed_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), mmembed_json(v)))
                .collect(),
        ),
        _ => Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_waits_for_the_model_keys_and_limits_are_enforced() {
    let (release, loaded) = oneshot::channel::<()>();
    let cfg = ServerConfig {
        api_key: Some(ApiKey::new("s3cret")),
        max_body_bytes: 4096,
        ..ServerConfig::default()
    };
    let server = Running::start_with(cfg, async move {
        let _ = loaded.await;
        Ok(demo().await)
    })
    .await;
    let c = reqwest::Client::new();
    let get = |path: &str| c.get(format!("{}{path}", server.url)).send();
    assert_eq!(get("/livez").await.unwrap().status(), 200);
    assert_eq!(get("/health").await.unwrap().status(), 503);
    let predict = |key: Option<&str>, body: String| {
        let mut r = c.post(format!("{}{PREDICT}", server.url)).body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let text = r#"{"instances": [{"text": "a red star"}]}"#.to_string();
    let r = predict(Some("s3cret"), text.clone()).await.unwrap();
    assert_eq!(r.status(), 503, "not loaded yet");
    release.send(()).unwrap();
    server.wait_ready().await;
    let r = predict(None, text.clone()).await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED");
    assert!(!body.to_string().contains("s3cret"));
    assert_eq!(
        predict(Some("wrong"), text.clone()).await.unwrap().status(),
        401
    );
    assert_eq!(
        predict(Some("s3cret"), text.clone())
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c
        .post(format!("{}{PREDICT}", server.url))
        .header("x-goog-api-key", "s3cret")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let big = format!(r#"{{"instances": [{{"text": "{}"}}]}}"#, "a".repeat(5000));
    let r = predict(Some("s3cret"), big).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("4096 bytes"),
        "{body}"
    );
    // More than 120 s of video in one instance (Vertex's limit, the
    // default), refused before the backend sees it; 120 s is fine to ask.
    let video = |end: u32| {
        json!({"video": {"gcsUri": "gs://b/v.mp4",
            "videoSegmentConfig": {"startOffsetSec": 10.0, "endOffsetSec": end}}})
    };
    let body = json!({"instances": [{"text": "a red star"}, video(131)]}).to_string();
    let r = predict(Some("s3cret"), body).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("instances[1]: videoSegmentConfig asks for 121 s of video")
            && message.contains("--max-video-seconds"),
        "{body}"
    );
    let body = json!({"instances": [video(130)]}).to_string();
    let r = predict(Some("s3cret"), body).await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert!(
        !body.to_string().contains("max-video-seconds"),
        "120 s refused: {body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_accepted_requests_and_a_failed_load_stops_the_server() {
    let (gated, open) = Gated::closed(demo().await);
    let server = Running::start(ServerConfig::default(), gated).await;
    let dir = tempfile::tempdir().unwrap();
    let video = slideshow(dir.path());
    let url = server.url.clone();
    // The backend holds the video until shutdown has been asked.
    let slow = tokio::spawn(async move {
        post(
            &url,
            &json!({"instances": [{"video": {"bytesBase64Encoded": b64(&video),
                "videoSegmentConfig": {"endOffsetSec": 12.0, "intervalSec": 4.0}}}]}),
        )
        .await
    });
    let url = server.url.clone();
    eventually("the video request in the backend", || {
        let url = url.clone();
        async move { metrics(&url).await.contains("mmembed_in_flight_requests 1") }
    })
    .await;
    let stopping = tokio::spawn(server.stop());
    // Shutdown waits for the accepted request: still running a moment
    // later (a server that dropped it would have finished by then).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopping.is_finished(), "stopped with a request in hand");
    assert!(!slow.is_finished());
    open.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), stopping)
        .await
        .expect("shutdown finished within a minute of the request")
        .unwrap();
    let (status, body, _) = slow.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["predictions"][0]["videoEmbeddings"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let server = Server::bind(ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    })
    .await
    .unwrap();
    let r = server
        .run(
            async { Err("no such model".to_string()) },
            std::future::pending(),
        )
        .await;
    match r {
        Err(mmembed_server::ServerError::Load(m)) => assert_eq!(m, "no such model"),
        other => panic!("{other:?}"),
    }
}
