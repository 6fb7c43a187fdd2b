//! Text to token ids, truncated to the model's context.

use std::path::Path;

use mmembed_core::EmbedError;

use crate::config::{ClipConfig, Family};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// A `tokenizer.json` set up for a text tower: truncation at the context
/// length that keeps the end-of-text token, and where the tower pools.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    eos_id: u32,
    context: usize,
    pooling: Pooling,
}

/// How a text tower reads its sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    /// CLIP: causal attention pooled at the first end-of-text token; a
    /// batch is padded (with end-of-text) after it, where padding cannot
    /// reach the pooled position.
    FirstEos,
    /// SigLIP: bidirectional attention without a mask over a sequence
    /// padded to the full context with `pad`, pooled at the last position.
    /// Padding is part of the input the model was trained on, so every
    /// sequence is padded the same way whatever the batch.
    LastOfContext { pad: u32 },
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("eos_id", &self.eos_id)
            .field("context", &self.context)
            .field("pooling", &self.pooling)
            .finish_non_exhaustive()
    }
}

/// End-of-text spellings, in the order we look for them.
const EOS_TOKENS: &[&str] = &["<|endoftext|>", "</s>", "[SEP]", "<eos>"];

impl ClipTokenizer {
    /// Loads `tokenizer.json` (or a SigLIP `spiece.model`, converted: see
    /// [`ClipTokenizer::for_config`]). `context` is the text tower's
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
        // A SentencePiece model (SigLIP repositories without tokenizer.json)
        // is converted; anything else is read as tokenizer.json.
        let mut inner = if path.extension().is_some_and(|e| e == "model") {
            let bytes = std::fs::read(path)
                .map_err(|e| load_err(format!("cannot read {}: {e}", path.display())))?;
            crate::spm::siglip_tokenizer(&bytes).map_err(load_err)?
        } else {
            Tokenizer::from_file(path)
                .map_err(|e| load_err(format!("cannot load tokenizer.json: {e}")))?
        };
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
            pooling: Pooling::FirstEos,
        })
    }

    /// Loads `tokenizer.json` for a model: context and ids from its config,
    /// padding and pooling as its [`Family`] reads text. A path ending in
    /// `.model` is a SentencePiece model, converted as transformers'
    /// `SiglipTokenizer` tokenizes (lower case, ASCII punctuation removed):
    /// Google's SigLIP v1 repositories ship only `spiece.model`.
    pub fn for_config(path: &Path, config: &ClipConfig) -> Result<Self, EmbedError> {
        let text = &config.text;
        let mut tok = Self::from_file(path, text.max_position_embeddings, text.eos_token_id)?;
        if config.family == Family::Siglip {
            let pad = text
                .pad_token_id
                .or_else(|| tok.inner.token_to_id("</s>"))
                .unwrap_or(tok.eos_id);
            tok.pooling = Pooling::LastOfContext { pad };
        }
        Ok(tok)
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
        // A tokenizer.json without a post-processor adds no end-of-text; a
        // CLIP tower needs one to pool at. (SigLIP pools at the last
        // position: its tokenizer's own rule stands.)
        if self.pooling == Pooling::FirstEos && !ids.contains(&self.eos_id) {
            ids.truncate(self.context - 1);
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    /// Where the text tower pools in `ids` as [`ClipTokenizer::batch`] lays
    /// them out: the first end-of-text token (CLIP), the last position of
    /// the context (SigLIP).
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        match self.pooling {
            Pooling::FirstEos => ids
                .iter()
                .position(|&t| t == self.eos_id)
                .unwrap_or(ids.len().saturating_sub(1)),
            Pooling::LastOfContext { .. } => self.context - 1,
        }
    }

    /// Sequences as one padded batch for the text tower:
    /// `(ids row-major, sequence length, pool position per row)`. CLIP pads
    /// to the longest sequence with end-of-text; SigLIP pads every sequence
    /// to the context with its pad id, as it was trained. Sequences longer
    /// than the context are the caller's error, reported by the tower.
    pub fn batch(&self, seqs: &[Vec<u32>]) -> (Vec<u32>, usize, Vec<usize>) {
        let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let (len, pad) = match self.pooling {
            Pooling::FirstEos => (longest, self.eos_id),
            Pooling::LastOfContext { pad } => (longest.max(self.context), pad),
        };
        let mut flat = Vec::with_capacity(seqs.len() * len);
        let mut pool = Vec::with_capacity(seqs.len());
        for s in seqs {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(pad, len - s.len()));
            pool.push(self.pool_position(&flat[flat.len() - len..]));
        }
        (flat, len, pool)
    }
}
