//! A fake Vertex AI on loopback — `:predict` (multimodal embeddings) and
//! `:generateContent` (Gemini) — for tests and benches (feature `fake`).
//! Not for production use.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// Length of every video the fake "analyses", in seconds.
pub const VIDEO_SECONDS: f64 = 300.0;

/// What the fake does with the next request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Answer per the contract.
    Ok,
    /// Answer with an error status and a `google.rpc.Status` body.
    Status {
        /// HTTP status code.
        code: u16,
        /// `google.rpc.Status` name.
        status: &'static str,
        /// `Retry-After` header value, if any.
        retry_after: Option<&'static str>,
    },
    /// Answer per the contract after this long.
    Slow(Duration),
    /// Answer 200 with truncated JSON.
    Malformed,
    /// Close the connection without answering.
    Drop,
    /// Answer 403 with the request's `Authorization` header in the message.
    EchoAuth,
    /// Answer 200 with this body (a scripted `generateContent` response:
    /// blocked, cut off, odd answers).
    Reply(String),
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Request path.
    pub path: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// JSON body (`Null` if it was not JSON).
    pub body: Value,
}

impl Recorded {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A fake `:predict` endpoint on loopback.
///
/// Follows the documented contract: vectors of the requested dimension
/// (deterministic per input), video segments from `videoSegmentConfig`
/// clipped to 120 s per request and to a video length of
/// [`VIDEO_SECONDS`]. Faults are scripted with [`FakeVertex::push`]; every
/// request is recorded. Each connection is served on its own thread.
pub struct FakeVertex {
    /// Base URL to give [`crate::VertexConfig::with_base_url`].
    pub url: String,
    log: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<VecDeque<Behaviour>>>,
    latency: Arc<Mutex<Duration>>,
}

impl FakeVertex {
    /// Starts a server on 127.0.0.1 (an ephemeral port).
    pub fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let latency = Arc::new(Mutex::new(Duration::ZERO));
        let (l, s, lat) = (log.clone(), script.clone(), latency.clone());
        // The listener thread ends with the test process; each connection
        // gets its own thread and serves requests until the client closes.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (l, s, lat) = (l.clone(), s.clone(), lat.clone());
                std::thread::spawn(move || serve(stream, &l, &s, &lat));
            }
        });
        Ok(Self {
            url,
            log,
            script,
            latency,
        })
    }

    /// Adds this much latency to every answer (benches of remote backends).
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.latency) = d;
    }

    /// Queues a behaviour for the next request (default: [`Behaviour::Ok`]).
    pub fn push(&self, b: Behaviour) {
        lock(&self.script).push_back(b);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.log).clone()
    }

    /// How many requests were received.
    pub fn request_count(&self) -> usize {
        lock(&self.log).len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(
    stream: TcpStream,
    log: &Mutex<Vec<Recorded>>,
    script: &Mutex<VecDeque<Behaviour>>,
    latency: &Mutex<Duration>,
) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((k, v)) = h.split_once(':') else {
                return;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        lock(log).push(Recorded {
            path: path.clone(),
            headers: headers.clone(),
            body: body.clone(),
        });
        let behaviour = lock(script).pop_front().unwrap_or(Behaviour::Ok);
        let extra_latency = *lock(latency);
        if !extra_latency.is_zero() {
            std::thread::sleep(extra_latency);
        }
        let (code, extra, payload) = match behaviour {
            Behaviour::Ok => (200, String::new(), answer(&path, &body)),
            Behaviour::Slow(d) => {
                std::thread::sleep(d);
                (200, String::new(), answer(&path, &body))
            }
            Behaviour::Reply(b) => (200, String::new(), b),
            Behaviour::Status {
                code,
                status,
                retry_after,
            } => (
                code,
                retry_after
                    .map(|r| format!("Retry-After: {r}\r\n"))
                    .unwrap_or_default(),
                json!({"error": {"code": code, "message": format!("fake {status}"), "status": status}})
                    .to_string(),
            ),
            Behaviour::Malformed => (200, String::new(), "{\"predictions\": [".into()),
            Behaviour::Drop => return,
            Behaviour::EchoAuth => {
                let auth = headers
                    .iter()
                    .find(|(k, _)| k == "authorization")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                (
                    403,
                    String::new(),
                    json!({"error": {"code": 403, "message": format!("denied for {auth}"), "status": "PERMISSION_DENIED"}})
                        .to_string(),
                )
            }
        };
        let resp = format!(
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{payload}",
            payload.len()
        );
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// The contract's answer for the method the path names.
fn answer(path: &str, body: &Value) -> String {
    if path.ends_with(":generateContent") {
        generate(body)
    } else {
        predict(body)
    }
}

/// A value of a `responseSchema` (the OpenAPI subset): strings are `fake`
/// (or the first enum value), integers and numbers `2` (written as a JSON
/// integer, which a FLOAT64 must accept), booleans `true`, arrays one item.
pub fn value_for_schema(s: &Value) -> Value {
    let ty = s["type"].as_str().unwrap_or("STRING").to_ascii_uppercase();
    match ty.as_str() {
        "OBJECT" => {
            let mut o = serde_json::Map::new();
            if let Some(p) = s["properties"].as_object() {
                for (k, v) in p {
                    o.insert(k.clone(), value_for_schema(v));
                }
            }
            Value::Object(o)
        }
        "ARRAY" => json!([value_for_schema(&s["items"])]),
        "INTEGER" | "NUMBER" => json!(2),
        "BOOLEAN" => json!(true),
        _ => match s["enum"].as_array().and_then(|e| e.first()) {
            Some(v) => v.clone(),
            None => json!("fake"),
        },
    }
}

/// A `generateContent` answer: a thought part (which clients must skip),
/// then JSON fitting `responseSchema` when one is given, else `You asked:`
/// and the prompt's text parts with the number of media parts.
fn generate(body: &Value) -> String {
    let parts = body["contents"][0]["parts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let text: String = parts.iter().filter_map(|p| p["text"].as_str()).collect();
    let media = parts
        .iter()
        .filter(|p| p.get("inlineData").is_some() || p.get("fileData").is_some())
        .count();
    let schema = &body["generationConfig"]["responseSchema"];
    let answer = if schema.is_null() {
        format!("You asked: {text} ({media} media)")
    } else {
        value_for_schema(schema).to_string()
    };
    json!({
        "candidates": [{
            "content": {"role": "model", "parts": [
                {"text": "Let me think about this.", "thought": true},
                {"text": answer}
            ]},
            "finishReason": "STOP",
            "safetyRatings": []
        }],
        "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 5, "totalTokenCount": 17},
        "modelVersion": "gemini-fake-001",
        "responseId": "fake"
    })
    .to_string()
}

/// The documented response for a request body: vectors of the requested
/// dimension, video segments from the config, clipped to 120 s per request
/// and to the video's length (as the service does).
fn predict(body: &Value) -> String {
    let inst = &body["instances"][0];
    let dim = body["parameters"]["dimension"].as_u64().unwrap_or(1408) as usize;
    let vector = |seed: &str, n: usize| -> Vec<f32> {
        // xorshift seeded by an FNV-1a hash of the seed text.
        let mut x = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |a, b| {
            (a ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    };
    let mut p = serde_json::Map::new();
    if let Some(t) = inst["text"].as_str() {
        p.insert("textEmbedding".into(), json!(vector(t, dim)));
    }
    if inst.get("image").is_some() {
        p.insert("imageEmbedding".into(), json!(vector("image", dim)));
    }
    if let Some(v) = inst.get("video") {
        let c = &v["videoSegmentConfig"];
        let interval = c["intervalSec"].as_f64().unwrap_or(16.0);
        let start = c["startOffsetSec"].as_f64().unwrap_or(0.0);
        let end = c["endOffsetSec"]
            .as_f64()
            .unwrap_or(start + 120.0)
            .min(start + 120.0)
            .min(VIDEO_SECONDS);
        let mut segs = Vec::new();
        let mut s = start;
        while s < end {
            let e = (s + interval).min(end);
            // Offsets as doubles, the way protobuf Value sends them.
            segs.push(json!({"startOffsetSec": s, "endOffsetSec": e, "embedding": vector(&format!("{s}"), 1408)}));
            s += interval;
        }
        p.insert("videoEmbeddings".into(), Value::Array(segs));
    }
    json!({"predictions": [p], "deployedModelId": "1"}).to_string()
}
