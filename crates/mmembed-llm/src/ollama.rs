//! Ollama's `/api/chat`.

use std::sync::Arc;

use mmembed_core::generate::{GenerateRequest, Generation, Generator, GeneratorInfo};
use mmembed_core::{EmbedError, Modality, async_trait};
use mmembed_transport::JsonClient;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use mmembed_transport::in_order;

use crate::{LlmConfig, Piece, check_params, complete, merge, pieces};

const BACKEND: &str = "ollama";

/// A generator on an Ollama server.
#[derive(Clone, Debug)]
pub struct OllamaGenerator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: LlmConfig,
    url: String,
    transport: JsonClient,
    info: GeneratorInfo,
}

#[derive(Debug, Default, Deserialize)]
struct Response {
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

fn answer(r: &Response) -> (Result<String, String>, Option<String>) {
    (text(r), r.model.clone())
}

fn text(r: &Response) -> Result<String, String> {
    match r.done_reason.as_deref() {
        None | Some("stop") => {}
        Some(other) => return Err(format!("finish reason {other}")),
    }
    // Thinking models put their thoughts in `message.thinking`, not read.
    match r.message.as_ref().and_then(|m| m.content.clone()) {
        Some(t) if !t.is_empty() => Ok(t),
        _ => Err("the answer has no text".into()),
    }
}

impl OllamaGenerator {
    /// A client for `cfg.url`'s `/api/chat`.
    pub fn new(cfg: LlmConfig) -> Result<Self, EmbedError> {
        let transport = cfg.transport("Ollama")?;
        Ok(Self {
            inner: Arc::new(Inner {
                url: cfg.endpoint("/api/chat"),
                info: GeneratorInfo {
                    backend: BACKEND.into(),
                    model_id: cfg.model.clone(),
                    modalities: vec![Modality::Text, Modality::Image],
                },
                transport,
                cfg,
            }),
        })
    }

    /// The request body for `req` (media read and encoded).
    pub async fn body(&self, req: &GenerateRequest) -> Result<Value, EmbedError> {
        check_params(&req.model_params, &["messages", "model", "stream"])?;
        if req.output_schema.is_some() {
            check_params(&req.model_params, &["format"])?;
        }
        let mut text = String::new();
        let mut images = Vec::new();
        for p in pieces(req, self.inner.cfg.max_image_bytes).await? {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Image(_, b64) => images.push(b64),
            }
        }
        let mut message = json!({"role": "user", "content": text});
        if !images.is_empty() {
            message["images"] = json!(images);
        }
        let mut body = Map::new();
        body.insert("model".into(), self.inner.cfg.model.clone().into());
        body.insert("messages".into(), json!([message]));
        body.insert("stream".into(), false.into());
        if let Some(s) = &req.output_schema {
            body.insert("format".into(), s.to_json_schema());
        }
        merge(&mut body, &req.model_params);
        Ok(Value::Object(body))
    }

    async fn generate_one(&self, req: GenerateRequest) -> Result<Generation, EmbedError> {
        self.inner.info.check(&req)?;
        let body = self.body(&req).await?;
        let i = &self.inner;
        complete(&i.transport, &i.url, &body, &req, &i.info, answer).await
    }
}

#[async_trait]
impl Generator for OllamaGenerator {
    fn info(&self) -> &GeneratorInfo {
        &self.inner.info
    }

    async fn generate_batch(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> Vec<Result<Generation, EmbedError>> {
        in_order(reqs, self.inner.cfg.max_concurrency, |r| {
            self.generate_one(r)
        })
        .await
    }
}
