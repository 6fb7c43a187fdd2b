//! Text to token ids, truncated to the model's context.

use std::path::Path;

use mmembed_core::EmbedError;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// A `tokenizer.json` set up for CLIP: truncation at the context length that
/// keeps the end-of-text token, and the id the text tower pools at.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    eos_id: u32,
    context: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("eos_id", &self.eos_id)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

/// End-of-text spellings, in the order we look for them.
const EOS_TOKENS: &[&str] = &["<|endoftext|>", "</s>", "[SEP]", "<eos>"];

impl ClipTokenizer {
    /// Loads `tokenizer.json`. `context` is the text tower's
    /// `max_position_embeddings`; `config_eos` the config's `eos_token_id`,
    /// used only when the vocabulary has no end-of-text token (old OpenAI
    /// configs say 2, which is not end-of-text in their own vocabulary).
    pub fn from_file(
        path: &Path,
        context: usize,
        config_eos: Option<u32>,
    ) -> Result<Self, EmbedError> {
        let load_err = |reason: String| EmbedError::ModelLoad {
            model: path.display().to_string(),
            reason,
            source: None,
        };
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| load_err(format!("cannot load tokenizer.json: {e}")))?;
        let eos_id = EOS_TOKENS
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .or(config_eos)
            .ok_or_else(|| load_err("the tokenizer has no end-of-text token".into()))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: context,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| load_err(format!("cannot set truncation: {e}")))?;
        inner.with_padding(None);
        Ok(Self {
            inner,
            eos_id,
            context,
        })
    }

    /// The end-of-text id the text tower pools at.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The context length.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Token ids for `text`, with start/end tokens, truncated to the context
    /// (the end-of-text token is kept: the tokenizer reserves room for the
    /// special tokens its post-processor adds).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| EmbedError::Backend {
                backend: "local".into(),
                message: format!("tokenizer failed: {e}"),
                retryable: false,
            })?;
        let mut ids = enc.get_ids().to_vec();
        // A tokenizer.json without a post-processor adds no end-of-text; the
        // tower needs one to pool at.
        if !ids.contains(&self.eos_id) {
            ids.truncate(self.context - 1);
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    /// Where the text tower pools: the first end-of-text token.
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        ids.iter()
            .position(|&t| t == self.eos_id)
            .unwrap_or(ids.len().saturating_sub(1))
    }
}
