//! Gemini `generateContent` against the fake Vertex AI on loopback: request
//! shape (parts, fileData, videoMetadata, responseSchema, merged params),
//! answer parsing by BigQuery's rules, faults and retries in virtual time.

use std::sync::Arc;
use std::time::Duration;

use mmembed_core::generate::{GenerateRequest, Generator, RETRYABLE_PREFIX, status_of};
use mmembed_core::hybrid::{Fallback, FallbackOptions};
use mmembed_core::schema::{FieldType, OutputSchema};
use mmembed_core::{Media, MediaSource};
use mmembed_vertex::fake::{Behaviour, FakeVertex};
use mmembed_vertex::{GeminiGenerator, RetryPolicy, VertexConfig, VirtualClock};
use serde_json::json;

const TOKEN: &str = "ya29.gemini-token-that-must-never-leak";

fn gemini(
    fake: &FakeVertex,
    tweak: impl FnOnce(VertexConfig) -> VertexConfig,
) -> (GeminiGenerator, Arc<VirtualClock>) {
    let clock = Arc::new(VirtualClock::default());
    let cfg = tweak(
        VertexConfig::new("test-proj")
            .with_location("europe-west4")
            .with_base_url(&fake.url)
            .with_access_token(TOKEN)
            .with_timeout(Duration::from_secs(5))
            .with_requests_per_minute(60_000),
    );
    (
        GeminiGenerator::with_clock(cfg, clock.clone()).unwrap(),
        clock,
    )
}

fn png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    mmembed_media::image_crate::RgbImage::from_pixel(
        8,
        8,
        mmembed_media::image_crate::Rgb([200, 10, 10]),
    )
    .write_to(&mut out, mmembed_media::image_crate::ImageFormat::Png)
    .unwrap();
    out.into_inner()
}

fn reply(answer: &str, finish: &str) -> Behaviour {
    Behaviour::Reply(
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": answer}]}, "finishReason": finish}]})
            .to_string(),
    )
}

#[tokio::test]
async fn free_text_request_shape_and_answer() {
    let fake = FakeVertex::start().unwrap();
    let (g, _) = gemini(&fake, |c| c);
    assert_eq!(g.info().model_id, "gemini-2.5-flash");
    let req = GenerateRequest::text("Describe ")
        .with_media(Media {
            source: MediaSource::Uri("gs://bucket/clip.mp4".into()),
            mime_type: None,
        })
        .with_media(png())
        .with_text(" in ten words");
    let out = g.generate(req).await.unwrap();
    assert_eq!(out.status, "");
    // The thought part the fake sends first is skipped.
    assert_eq!(
        out.text.as_deref(),
        Some("You asked: Describe  in ten words (2 media)")
    );
    assert_eq!(
        out.result(),
        Some(json!("You asked: Describe  in ten words (2 media)"))
    );
    assert_eq!(out.model, "gemini-fake-001");
    assert!(
        out.full_response.contains("\"thought\":true"),
        "full_response is the server's body"
    );

    let r = &fake.requests()[0];
    assert_eq!(
        r.path,
        "/v1/projects/test-proj/locations/europe-west4/publishers/google/models/gemini-2.5-flash:generateContent"
    );
    let parts = &r.body["contents"][0]["parts"];
    assert_eq!(r.body["contents"][0]["role"], "user");
    assert_eq!(parts[0], json!({"text": "Describe "}));
    assert_eq!(
        parts[1],
        json!({"fileData": {"mimeType": "video/mp4", "fileUri": "gs://bucket/clip.mp4"}, "videoMetadata": {"endOffset": "120s"}})
    );
    assert_eq!(parts[2]["inlineData"]["mimeType"], "image/png");
    assert!(parts[2]["inlineData"]["data"].as_str().unwrap().len() > 20);
    assert_eq!(parts[3], json!({"text": " in ten words"}));
    assert!(r.body.get("generationConfig").is_none());
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test]
async fn structured_output_and_typed_returns() {
    let fake = FakeVertex::start().unwrap();
    let (g, _) = gemini(&fake, |c| c);
    let schema: OutputSchema = "capital STRING, population INT64, share FLOAT64, coastal BOOL, \
                                cities ARRAY<STRING>, loc STRUCT<lat FLOAT64>"
        .parse()
        .unwrap();
    let out = g
        .generate(GenerateRequest::text("Washington state").with_schema(schema.clone()))
        .await
        .unwrap();
    assert_eq!(out.status, "");
    let f = out.fields.unwrap();
    assert_eq!(f["capital"], "fake");
    assert_eq!(f["population"], json!(2));
    // The fake writes `2`; a FLOAT64 takes it as 2.0.
    assert!(f["share"].is_f64() && f["share"] == json!(2.0));
    assert_eq!(f["coastal"], true);
    assert_eq!(f["cities"], json!(["fake"]));
    assert_eq!(f["loc"]["lat"], json!(2.0));
    let sent = &fake.requests()[0].body["generationConfig"];
    assert_eq!(sent["responseMimeType"], "application/json");
    assert_eq!(sent["responseSchema"], schema.to_vertex());

    // AI.GENERATE_DOUBLE / _INT / _BOOL: one `result` field.
    let d = g
        .generate(GenerateRequest::text("pi").with_schema(OutputSchema::result(FieldType::Float64)))
        .await
        .unwrap();
    assert_eq!(d.result(), Some(json!(2.0)));

    fake.push(reply(r#"{"result": 9223372036854775808}"#, "STOP"));
    let i = g
        .generate(GenerateRequest::text("big").with_schema(OutputSchema::result(FieldType::Int64)))
        .await
        .unwrap();
    assert!(i.result().is_none());
    assert!(i.status.contains("out of the INT64 range"), "{}", i.status);

    fake.push(reply(r#"{"result": "true"}"#, "STOP"));
    let b = g
        .generate(GenerateRequest::text("yes?").with_schema(OutputSchema::result(FieldType::Bool)))
        .await
        .unwrap();
    assert!(b.result().is_none());
    assert!(
        b.status.contains("not a boolean") && b.status.contains("true"),
        "{}",
        b.status
    );

    fake.push(reply("about 4", "STOP"));
    let n = g
        .generate(
            GenerateRequest::text("how many").with_schema(OutputSchema::result(FieldType::Float64)),
        )
        .await
        .unwrap();
    assert!(n.status.contains("\"about 4\""), "{}", n.status);
    assert_eq!(n.text.as_deref(), Some("about 4"));
}

#[tokio::test]
async fn blocked_and_cut_off_answers_have_no_result() {
    let fake = FakeVertex::start().unwrap();
    let (g, _) = gemini(&fake, |c| c);
    fake.push(Behaviour::Reply(
        json!({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []}}).to_string(),
    ));
    let out = g.generate(GenerateRequest::text("bad")).await.unwrap();
    assert_eq!(out.status, "blocked: SAFETY");
    assert!(out.result().is_none() && out.text.is_none());
    assert!(out.full_response.contains("SAFETY"));

    fake.push(reply("{\"capital\": \"Oly", "MAX_TOKENS"));
    let out = g
        .generate(GenerateRequest::text("x").with_schema("capital STRING".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(out.status, "finish reason MAX_TOKENS");
    assert!(out.fields.is_none());

    // Only thoughts: no answer.
    fake.push(Behaviour::Reply(
        json!({"candidates": [{"content": {"parts": [{"text": "hmm", "thought": true}]}, "finishReason": "STOP"}]})
            .to_string(),
    ));
    let out = g.generate(GenerateRequest::text("x")).await.unwrap();
    assert_eq!(out.status, "the answer has no text");
}

#[tokio::test]
async fn model_params_snake_or_camel_merge_into_the_body() {
    let fake = FakeVertex::start().unwrap();
    let (g, _) = gemini(&fake, |c| c);
    let params = json!({"generation_config": {"thinking_config": {"thinking_budget": 0}, "temperature": 0},
                        "labels": {"job_name": "nightly"}, "safetySettings": []});
    let req = GenerateRequest::text("x")
        .with_schema("n INT64".parse().unwrap())
        .with_params(params.as_object().cloned().unwrap());
    g.generate(req).await.unwrap();
    let b = &fake.requests()[0].body;
    assert_eq!(
        b["generationConfig"]["thinkingConfig"],
        json!({"thinkingBudget": 0})
    );
    assert_eq!(b["generationConfig"]["temperature"], 0);
    assert_eq!(
        b["generationConfig"]["responseMimeType"],
        "application/json"
    );
    assert_eq!(b["labels"], json!({"job_name": "nightly"}));
    assert_eq!(b["safetySettings"], json!([]));

    let bad = GenerateRequest::text("x")
        .with_params(json!({"contents": []}).as_object().cloned().unwrap());
    let e = g.generate(bad).await.unwrap_err();
    assert!(e.to_string().contains("contents"), "{e}");
    assert_eq!(fake.requests().len(), 1, "refused before sending");
}

#[tokio::test]
async fn quota_overload_and_garbage_are_retried() {
    let fake = FakeVertex::start().unwrap();
    let (g, clock) = gemini(&fake, |c| c);
    fake.push(Behaviour::Status {
        code: 429,
        status: "RESOURCE_EXHAUSTED",
        retry_after: Some("7"),
    });
    fake.push(Behaviour::Malformed);
    let out = g.generate(GenerateRequest::text("x")).await.unwrap();
    assert_eq!(out.status, "");
    assert_eq!(fake.requests().len(), 3);
    assert!(
        clock.sleeps().iter().any(|d| *d >= Duration::from_secs(7)),
        "Retry-After honoured"
    );

    // A burst longer than the attempts: a retryable error, BigQuery's prefix.
    let (g, _) = gemini(&fake, |c| {
        c.with_retry(RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        })
    });
    for _ in 0..3 {
        fake.push(Behaviour::Status {
            code: 503,
            status: "UNAVAILABLE",
            retry_after: None,
        });
    }
    let before = fake.request_count();
    let e = g.generate(GenerateRequest::text("x")).await.unwrap_err();
    assert_eq!(fake.request_count() - before, 3);
    assert!(
        status_of(&e).starts_with(RETRYABLE_PREFIX),
        "{}",
        status_of(&e)
    );

    // 400 is final at once, and not retryable.
    fake.push(Behaviour::Status {
        code: 400,
        status: "INVALID_ARGUMENT",
        retry_after: None,
    });
    let before = fake.request_count();
    let e = g.generate(GenerateRequest::text("x")).await.unwrap_err();
    assert_eq!(fake.request_count() - before, 1);
    assert!(!status_of(&e).starts_with(RETRYABLE_PREFIX));
}

#[tokio::test]
async fn the_token_is_never_printed() {
    let fake = FakeVertex::start().unwrap();
    let (g, _) = gemini(&fake, |c| c);
    fake.push(Behaviour::EchoAuth);
    let e = g.generate(GenerateRequest::text("x")).await.unwrap_err();
    for s in [
        e.to_string(),
        format!("{e:?}"),
        status_of(&e),
        format!("{g:?}"),
    ] {
        assert!(!s.contains(TOKEN), "{s}");
    }
    assert!(e.to_string().contains("<redacted>"), "{e}");
}

#[tokio::test]
async fn bad_media_fail_the_row_before_any_request() {
    let fake = FakeVertex::start().unwrap();
    let (g, _) = gemini(&fake, |c| c);
    let rows = vec![
        GenerateRequest::text("a").with_media(b"not an image".to_vec()),
        GenerateRequest::text("c")
            .with_media(Media {
                source: MediaSource::Uri("gs://b/a.mp4".into()),
                mime_type: None,
            })
            .with_media(Media {
                source: MediaSource::Uri("gs://b/b.mp4".into()),
                mime_type: None,
            }),
        GenerateRequest::text("   "),
        GenerateRequest::text("fine"),
    ];
    let out = g.generate_batch(rows).await;
    assert_eq!(out.len(), 4);
    let msg = |i: usize| out[i].as_ref().unwrap_err().to_string();
    assert!(
        msg(0).contains("not a recognised image format"),
        "{}",
        msg(0)
    );
    assert!(msg(1).contains("more than one video"), "{}", msg(1));
    assert!(msg(2).contains("empty"), "{}", msg(2));
    assert!(out[3].as_ref().unwrap().is_ok());
    assert_eq!(fake.request_count(), 1, "only the good row was sent");
}

#[tokio::test]
async fn fallback_between_two_gemini_endpoints() {
    let down = FakeVertex::start().unwrap();
    let up = FakeVertex::start().unwrap();
    let one_try = |c: VertexConfig| {
        c.with_retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
    };
    let (a, _) = gemini(&down, one_try);
    let (b, _) = gemini(&up, one_try);
    let both =
        Fallback::for_generators(Arc::new(a), Arc::new(b), FallbackOptions::default()).unwrap();
    down.push(Behaviour::Status {
        code: 503,
        status: "UNAVAILABLE",
        retry_after: None,
    });
    let out = both.generate(GenerateRequest::text("x")).await.unwrap();
    assert!(out.is_ok());
    assert_eq!((down.request_count(), up.request_count()), (1, 1));
    assert_eq!(both.info().backend, "fallback(gemini,gemini)");
    // An answer that is "wrong" (blocked) is not a reason to fall back.
    down.push(Behaviour::Reply(
        json!({"promptFeedback": {"blockReason": "OTHER"}}).to_string(),
    ));
    let out = both.generate(GenerateRequest::text("x")).await.unwrap();
    assert_eq!(out.status, "blocked: OTHER");
    assert_eq!(up.request_count(), 1);
}

/// Calls the real service: needs `GOOGLE_CLOUD_PROJECT` and credentials.
#[tokio::test]
#[ignore = "calls Vertex AI Gemini; needs GOOGLE_CLOUD_PROJECT and credentials"]
async fn live_gemini() {
    let g = GeminiGenerator::new(VertexConfig::from_env().unwrap()).unwrap();
    let out = g
        .generate(
            GenerateRequest::text("What is the capital of Washington state? One word.")
                .with_schema("capital STRING".parse().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(out.status, "", "{}", out.full_response);
    assert_eq!(out.fields.unwrap()["capital"], "Olympia");
}

#[tokio::test]
async fn heic_goes_as_it_is_and_oversized_inline_media_are_refused() {
    let fake = FakeVertex::start().unwrap();
    let (g, _) = gemini(&fake, |c| c);
    let d = tempfile::tempdir().unwrap();
    let heic = d.path().join("photo.heic");
    std::fs::write(&heic, b"\0\0\0\x18ftypheic-not-decoded-by-us").unwrap();
    let big = d.path().join("big.mp4");
    std::fs::write(&big, vec![0u8; mmembed_vertex::MAX_INLINE_FILE_BYTES + 1]).unwrap();
    let out = g
        .generate_batch(vec![
            GenerateRequest::text("what is it").with_media(heic),
            GenerateRequest::text("what is it").with_media(big),
        ])
        .await;
    assert!(out[0].as_ref().unwrap().is_ok());
    assert_eq!(
        fake.requests()[0].body["contents"][0]["parts"][1]["inlineData"]["mimeType"],
        "image/heic"
    );
    let e = out[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("inline files") && e.contains("gs://"), "{e}");
    assert_eq!(fake.request_count(), 1);
}
