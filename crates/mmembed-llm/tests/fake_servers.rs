//! The OpenAI-compatible and Ollama backends against fake servers on
//! loopback: request shapes, schema-constrained answers, faults.

use std::time::Duration;

use mmembed_core::EmbedError;
use mmembed_core::generate::{GenerateRequest, Generator, RETRYABLE_PREFIX, status_of};
use mmembed_core::schema::{FieldType, OutputSchema};
use mmembed_llm::fake::{Behaviour, FakeLlm};
use mmembed_llm::{LlmConfig, OllamaGenerator, OpenAiGenerator};
use mmembed_transport::RetryPolicy;
use serde_json::json;

const KEY: &str = "sk-local-key-that-must-never-leak";

fn cfg(fake: &FakeLlm) -> LlmConfig {
    let mut c = LlmConfig::new(&fake.url, "qwen2.5-vl");
    c.api_key = Some(KEY.to_string().into());
    c.retry = RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(5),
        ..RetryPolicy::default()
    };
    c
}

fn png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    mmembed_media::image_crate::RgbImage::from_pixel(
        8,
        8,
        mmembed_media::image_crate::Rgb([10, 200, 10]),
    )
    .write_to(&mut out, mmembed_media::image_crate::ImageFormat::Png)
    .unwrap();
    out.into_inner()
}

fn bmp() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    mmembed_media::image_crate::RgbImage::new(4, 4)
        .write_to(&mut out, mmembed_media::image_crate::ImageFormat::Bmp)
        .unwrap();
    out.into_inner()
}

#[tokio::test]
async fn openai_request_shape_and_typed_answers() {
    let fake = FakeLlm::start().unwrap();
    let g = OpenAiGenerator::new(cfg(&fake)).unwrap();
    let out = g
        .generate(
            GenerateRequest::text("What is ")
                .with_media(png())
                .with_text(" this?"),
        )
        .await
        .unwrap();
    assert_eq!(out.status, "");
    assert_eq!(
        out.text.as_deref(),
        Some("You asked: What is  this? (1 images)")
    );
    assert_eq!(
        (out.backend.as_str(), out.model.as_str()),
        ("openai", "qwen2.5-vl")
    );
    let r = &fake.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    let content = &r.body["messages"][0]["content"];
    assert_eq!(content[0], json!({"type": "text", "text": "What is "}));
    assert!(
        content[1]["image_url"]["url"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,")
    );
    assert_eq!(content[2], json!({"type": "text", "text": " this?"}));
    assert!(r.body.get("response_format").is_none());

    // A schema goes as response_format json_schema; the answer is typed.
    let schema: OutputSchema = "label STRING, legs INT64, score FLOAT64, ok BOOL"
        .parse()
        .unwrap();
    let req = GenerateRequest::text("x")
        .with_media(bmp())
        .with_schema(schema.clone())
        .with_params(
            json!({"temperature": 0, "max_tokens": 64})
                .as_object()
                .cloned()
                .unwrap(),
        );
    let out = g.generate(req).await.unwrap();
    let f = out.fields.unwrap();
    assert_eq!(
        (
            f["label"].clone(),
            f["legs"].clone(),
            f["score"].clone(),
            f["ok"].clone()
        ),
        (json!("fake"), json!(2), json!(2.0), json!(true))
    );
    let b = &fake.requests()[1].body;
    assert_eq!(b["response_format"]["type"], "json_schema");
    assert_eq!(
        b["response_format"]["json_schema"]["schema"],
        schema.to_json_schema()
    );
    assert_eq!(
        (b["temperature"].clone(), b["max_tokens"].clone()),
        (json!(0), json!(64))
    );
    // BMP is transcoded to PNG for the server.
    let url = b["messages"][0]["content"][1]["image_url"]["url"]
        .as_str()
        .unwrap();
    assert!(url.starts_with("data:image/png;base64,"), "{url:.40}");

    // Cut off, filtered, unparsable.
    fake.push(Behaviour::Reply(
        json!({"choices": [{"message": {"content": "{\"result\": 1"}, "finish_reason": "length"}]})
            .to_string(),
    ));
    let out = g
        .generate(GenerateRequest::text("x").with_schema(OutputSchema::result(FieldType::Int64)))
        .await
        .unwrap();
    assert_eq!(out.status, "finish reason length");
    fake.push(Behaviour::Reply(
        json!({"choices": [{"message": {"content": ""}, "finish_reason": "content_filter"}]})
            .to_string(),
    ));
    let out = g.generate(GenerateRequest::text("x")).await.unwrap();
    assert_eq!(out.status, "blocked: content_filter");
    fake.push(Behaviour::Reply(
        json!({"choices": [{"message": {"content": "four"}, "finish_reason": "stop"}]}).to_string(),
    ));
    let out = g
        .generate(GenerateRequest::text("x").with_schema(OutputSchema::result(FieldType::Float64)))
        .await
        .unwrap();
    assert!(
        out.status.contains("not JSON") && out.status.contains("\"four\""),
        "{}",
        out.status
    );
}

#[tokio::test]
async fn ollama_request_shape_and_answers() {
    let fake = FakeLlm::start().unwrap();
    let g = OllamaGenerator::new(cfg(&fake)).unwrap();
    let schema: OutputSchema = "tags ARRAY<STRING>".parse().unwrap();
    let req = GenerateRequest::text("Tag ")
        .with_media(png())
        .with_text("please")
        .with_schema(schema.clone())
        .with_params(
            json!({"options": {"temperature": 0}, "keep_alive": "5m"})
                .as_object()
                .cloned()
                .unwrap(),
        );
    let out = g.generate(req).await.unwrap();
    assert_eq!(out.status, "");
    assert_eq!(out.fields.unwrap()["tags"], json!(["fake"]));
    let b = &fake.requests()[0].body;
    assert_eq!(fake.requests()[0].path, "/api/chat");
    assert_eq!(b["stream"], false);
    assert_eq!(b["format"], schema.to_json_schema());
    assert_eq!(b["options"], json!({"temperature": 0}));
    assert_eq!(b["keep_alive"], "5m");
    assert_eq!(b["messages"][0]["content"], "Tag please");
    assert_eq!(b["messages"][0]["images"].as_array().unwrap().len(), 1);

    let out = g.generate(GenerateRequest::text("hi")).await.unwrap();
    assert_eq!(out.text.as_deref(), Some("You asked: hi (0 images)"));

    fake.push(Behaviour::Reply(
        json!({"message": {"content": "{\"tags\": [\"a\""}, "done": true, "done_reason": "length"})
            .to_string(),
    ));
    let out = g
        .generate(GenerateRequest::text("x").with_schema(schema))
        .await
        .unwrap();
    assert_eq!(out.status, "finish reason length");
}

#[tokio::test]
async fn faults_retries_and_refusals() {
    let fake = FakeLlm::start().unwrap();
    let g = OllamaGenerator::new(cfg(&fake)).unwrap();
    // 503 then a garbled 200: both retried.
    fake.push(Behaviour::Status {
        code: 503,
        body: json!({"error": "server busy"}).to_string(),
        retry_after: Some("0"),
    });
    fake.push(Behaviour::Reply("{\"message\": {\"cont".into()));
    assert!(
        g.generate(GenerateRequest::text("x"))
            .await
            .unwrap()
            .is_ok()
    );
    assert_eq!(fake.request_count(), 3);

    // Out of attempts: BigQuery's retryable prefix, the server's message.
    for _ in 0..3 {
        fake.push(Behaviour::Status {
            code: 429,
            body: json!({"error": {"message": "too many requests", "type": "rate_limit"}})
                .to_string(),
            retry_after: None,
        });
    }
    let e = g.generate(GenerateRequest::text("x")).await.unwrap_err();
    let s = status_of(&e);
    assert!(
        s.starts_with(RETRYABLE_PREFIX) && s.contains("too many requests"),
        "{s}"
    );

    // 404 (no such model) is final, and the key never shows.
    fake.push(Behaviour::Status {
        code: 404,
        body: json!({"error": format!("model not found; you sent Bearer {KEY}")}).to_string(),
        retry_after: None,
    });
    let before = fake.request_count();
    let e = g.generate(GenerateRequest::text("x")).await.unwrap_err();
    assert_eq!(fake.request_count() - before, 1);
    for s in [
        e.to_string(),
        format!("{e:?}"),
        format!("{g:?}"),
        format!("{:?}", cfg(&fake)),
    ] {
        assert!(!s.contains(KEY), "{s}");
    }

    // Per-row refusals before any request: video, bad image, reserved params.
    let rows = vec![
        GenerateRequest::text("x").with_media(std::path::PathBuf::from("clip.mp4")),
        GenerateRequest::text("x").with_media(b"garbage".to_vec()),
        GenerateRequest::text("x")
            .with_params(json!({"messages": []}).as_object().cloned().unwrap()),
        GenerateRequest::text("ok"),
    ];
    let before = fake.request_count();
    let out = g.generate_batch(rows).await;
    assert!(
        matches!(out[0], Err(EmbedError::UnsupportedModality { .. })),
        "{:?}",
        out[0]
    );
    assert!(
        out[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("not a recognised image")
    );
    assert!(
        out[2]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("messages")
    );
    assert!(out[3].as_ref().unwrap().is_ok());
    assert_eq!(fake.request_count() - before, 1);

    // Settings are checked.
    let e = OpenAiGenerator::new(LlmConfig::new("127.0.0.1:8000", "m")).unwrap_err();
    assert!(e.to_string().contains("http://"), "{e}");
    let e = OpenAiGenerator::new(LlmConfig::new("http://127.0.0.1:8000", " ")).unwrap_err();
    assert!(e.to_string().contains("model"), "{e}");
}
