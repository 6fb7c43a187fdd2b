//! Fake OpenAI-compatible (`/v1/chat/completions`) and Ollama
//! (`/api/chat`) servers on loopback, for tests (feature `fake`). Not for
//! production use.
//!
//! By default they answer per their contracts: JSON that fits the schema
//! sent (`response_format.json_schema.schema`, `format`) — strings `fake`
//! or the first enum value, numbers `2`, booleans `true`, arrays of one —
//! or, without a schema, `You asked: <the prompt's text> (<n> images)`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// What the fake does with the next request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Answer per the contract.
    Ok,
    /// Answer with this status and body (and `Retry-After` if given).
    Status {
        /// HTTP status.
        code: u16,
        /// Body.
        body: String,
        /// `Retry-After` seconds.
        retry_after: Option<&'static str>,
    },
    /// Answer 200 with this body.
    Reply(String),
}

/// One request received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Path.
    pub path: String,
    /// `Authorization` header, if any.
    pub authorization: Option<String>,
    /// Body (`Null` if not JSON).
    pub body: Value,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Behaviour>>,
}

/// A fake LLM server with both APIs on one port.
pub struct FakeLlm {
    /// Base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeLlm {
    /// Starts on 127.0.0.1 (an ephemeral port), on its own thread and
    /// runtime, so sync and async tests can use it alike.
    pub fn start() -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = Router::new().fallback(handle).with_state(state);
                let _ = axum::serve(l, app).await;
            });
        });
        Ok(Self { url, shared })
    }

    /// Queues a behaviour for the next request.
    pub fn push(&self, b: Behaviour) {
        lock(&self.shared.script).push_back(b);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.log).clone()
    }

    /// How many requests so far.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.log).len()
    }
}

/// A value of a JSON Schema: see the module docs.
pub fn value_for_schema(s: &Value) -> Value {
    match s["type"].as_str().unwrap_or("string") {
        "object" => {
            let mut o = serde_json::Map::new();
            if let Some(p) = s["properties"].as_object() {
                for (k, v) in p {
                    o.insert(k.clone(), value_for_schema(v));
                }
            }
            Value::Object(o)
        }
        "array" => json!([value_for_schema(&s["items"])]),
        "integer" | "number" => json!(2),
        "boolean" => json!(true),
        _ => match s["enum"].as_array().and_then(|e| e.first()) {
            Some(v) => v.clone(),
            None => json!("fake"),
        },
    }
}

async fn handle(
    State(s): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_string();
    lock(&s.log).push(Recorded {
        path: path.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        body: body.clone(),
    });
    let behaviour = lock(&s.script).pop_front().unwrap_or(Behaviour::Ok);
    let json_response = |code: StatusCode, text: String| {
        (code, [("content-type", "application/json")], text).into_response()
    };
    match behaviour {
        Behaviour::Status {
            code,
            body,
            retry_after,
        } => {
            let mut r = json_response(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            );
            if let Some(ra) = retry_after
                && let Ok(v) = ra.parse()
            {
                r.headers_mut().insert("retry-after", v);
            }
            r
        }
        Behaviour::Reply(b) => json_response(StatusCode::OK, b),
        Behaviour::Ok => match path.as_str() {
            "/v1/chat/completions" => json_response(StatusCode::OK, openai(&body)),
            "/api/chat" => json_response(StatusCode::OK, ollama(&body)),
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": {"message": format!("no route {path}"), "type": "not_found"}})
                    .to_string(),
            ),
        },
    }
}

fn openai(body: &Value) -> String {
    let content = body["messages"][0]["content"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let text: String = content.iter().filter_map(|p| p["text"].as_str()).collect();
    let images = content.iter().filter(|p| p["type"] == "image_url").count();
    let schema = &body["response_format"]["json_schema"]["schema"];
    let answer = if schema.is_null() {
        format!("You asked: {text} ({images} images)")
    } else {
        value_for_schema(schema).to_string()
    };
    json!({"id": "fake", "object": "chat.completion", "model": body["model"],
           "choices": [{"index": 0, "message": {"role": "assistant", "content": answer,
                        "reasoning_content": "thinking that must not be read"},
                        "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
    .to_string()
}

fn ollama(body: &Value) -> String {
    let m = &body["messages"][0];
    let text = m["content"].as_str().unwrap_or_default();
    let images = m["images"].as_array().map_or(0, Vec::len);
    let answer = if body["format"].is_object() {
        value_for_schema(&body["format"]).to_string()
    } else {
        format!("You asked: {text} ({images} images)")
    };
    json!({"model": body["model"], "created_at": "2026-01-01T00:00:00Z",
           "message": {"role": "assistant", "content": answer, "thinking": "not read"},
           "done": true, "done_reason": "stop"})
    .to_string()
}
