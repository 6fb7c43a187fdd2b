//! OpenAI-compatible `/v1/chat/completions`.

use std::sync::Arc;

use mmembed_core::generate::{GenerateRequest, Generation, Generator, GeneratorInfo};
use mmembed_core::{EmbedError, Modality, async_trait};
use mmembed_transport::JsonClient;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use mmembed_transport::in_order;

use crate::{LlmConfig, Piece, check_params, complete, merge, pieces};

const BACKEND: &str = "openai";

/// A generator on an OpenAI-compatible chat-completions server.
#[derive(Clone, Debug)]
pub struct OpenAiGenerator {
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
    choices: Vec<Choice>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

fn answer(r: &Response) -> (Result<String, String>, Option<String>) {
    (text(r), r.model.clone())
}

fn text(r: &Response) -> Result<String, String> {
    let c = r
        .choices
        .first()
        .ok_or_else(|| "the response has no choices".to_string())?;
    match c.finish_reason.as_deref() {
        None | Some("stop") | Some("eos") => {}
        Some("content_filter") => return Err("blocked: content_filter".into()),
        Some(other) => return Err(format!("finish reason {other}")),
    }
    let m = c.message.as_ref();
    if let Some(refusal) = m.and_then(|m| m.refusal.as_deref()) {
        return Err(format!("refused: {refusal}"));
    }
    // Reasoning models put their thoughts in `reasoning_content`, which is
    // not read: the answer is `content`.
    match m.and_then(|m| m.content.clone()) {
        Some(t) if !t.is_empty() => Ok(t),
        _ => Err("the answer has no text".into()),
    }
}

impl OpenAiGenerator {
    /// A client for `cfg.url`'s `/v1/chat/completions`.
    pub fn new(cfg: LlmConfig) -> Result<Self, EmbedError> {
        let transport = cfg.transport("the OpenAI-compatible server")?;
        Ok(Self {
            inner: Arc::new(Inner {
                url: cfg.endpoint("/v1/chat/completions"),
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
        check_params(&req.model_params, &["messages", "model"])?;
        if req.output_schema.is_some() {
            check_params(&req.model_params, &["response_format"])?;
        }
        let content: Vec<Value> = pieces(req, self.inner.cfg.max_image_bytes)
            .await?
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => json!({"type": "text", "text": t}),
                Piece::Image(mime, b64) => {
                    json!({"type": "image_url", "image_url": {"url": format!("data:{mime};base64,{b64}")}})
                }
            })
            .collect();
        let mut body = Map::new();
        body.insert("model".into(), self.inner.cfg.model.clone().into());
        body.insert(
            "messages".into(),
            json!([{"role": "user", "content": content}]),
        );
        if let Some(s) = &req.output_schema {
            body.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "row", "strict": true, "schema": s.to_json_schema()}}),
            );
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
impl Generator for OpenAiGenerator {
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
