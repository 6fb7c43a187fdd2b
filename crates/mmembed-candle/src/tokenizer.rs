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
    /// MobileCLIP (S0–S2, MobileCLIP 2): bidirectional attention without
    /// a mask over a sequence padded to the full context with `pad` (0),
    /// as open_clip's tokenizer pads it, pooled at the first end-of-text
    /// token (open_clip's `argmax`: end-of-text is the largest id).
    FirstEosOfContext { pad: u32 },
    /// SigLIP: bidirectional attention without a mask over a sequence
    /// padded to the full context with `pad`, pooled at the last position.
    /// Padding is part of the input the model was trained on, so every
    /// sequence is padded the same way whatever the batch.
    LastOfContext { pad: u32 },
    /// Chinese-CLIP (BERT): bidirectional attention pooled at the first
    /// (`[CLS]`) token; a batch is padded with `pad` to its longest
    /// sequence and the padding masked (see [`TextBatch::lens`]).
    FirstMasked { pad: u32 },
}

/// Token id sequences laid out as one padded batch for the text tower
/// ([`ClipTokenizer::batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextBatch {
    /// `[rows, len]` ids, row-major.
    pub ids: Vec<u32>,
    /// Tokens per row, padding included.
    pub len: usize,
    /// Where the tower pools each row.
    pub pool: Vec<usize>,
    /// Each row's own tokens before its padding, for towers that mask
    /// padding ([`crate::TextTower::forward_padded`]).
    pub lens: Vec<usize>,
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

/// BERT's special tokens, which a `vocab.txt` lists among its words.
const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

impl ClipTokenizer {
    /// Loads `tokenizer.json` (or a SigLIP `spiece.model` or a BERT
    /// `vocab.txt`, converted: see [`ClipTokenizer::for_config`]). `context` is the text tower's
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
        // or a WordPiece vocabulary (Chinese-CLIP's) is converted; anything
        // else is read as tokenizer.json.
        let ext = path.extension().and_then(|e| e.to_str());
        let mut inner = if ext == Some("model") {
            let bytes = std::fs::read(path)
                .map_err(|e| load_err(format!("cannot read {}: {e}", path.display())))?;
            crate::spm::siglip_tokenizer(&bytes).map_err(load_err)?
        } else if ext == Some("txt") {
            let vocab = std::fs::read_to_string(path)
                .map_err(|e| load_err(format!("cannot read {}: {e}", path.display())))?;
            let config = path.with_file_name("tokenizer_config.json");
            let config = match std::fs::read_to_string(&config) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(load_err(format!("cannot read {}: {e}", config.display()))),
            };
            bert_tokenizer(&vocab, config.as_deref()).map_err(load_err)?
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
    /// Google's SigLIP v1 repositories ship only `spiece.model`. A path
    /// ending in `.txt` is a BERT WordPiece `vocab.txt` (Chinese-CLIP
    /// repositories ship that), tokenized as transformers' `BertTokenizer`
    /// with the options of a `tokenizer_config.json` beside it.
    pub fn for_config(path: &Path, config: &ClipConfig) -> Result<Self, EmbedError> {
        let text = &config.text;
        let mut tok = Self::from_file(path, text.max_position_embeddings, text.eos_token_id)?;
        if text.lowercase {
            tok.lowercase_first().map_err(|e| EmbedError::ModelLoad {
                model: path.display().to_string(),
                reason: format!("cannot add lower-casing to the tokenizer: {e}"),
                source: None,
            })?;
        }
        match config.family {
            Family::Clip => {}
            Family::Siglip => {
                let pad = text
                    .pad_token_id
                    .or_else(|| tok.inner.token_to_id("</s>"))
                    .unwrap_or(tok.eos_id);
                tok.pooling = Pooling::LastOfContext { pad };
            }
            Family::ChineseClip => {
                let pad = text
                    .pad_token_id
                    .or_else(|| tok.inner.token_to_id("[PAD]"))
                    .unwrap_or(0);
                tok.pooling = Pooling::FirstMasked { pad };
            }
            Family::MobileClip if !text.causal => {
                tok.pooling = Pooling::FirstEosOfContext {
                    pad: text.pad_token_id.unwrap_or(0),
                };
            }
            Family::MobileClip => {}
        }
        Ok(tok)
    }

    /// Puts lower-casing in front of the tokenizer's own normaliser, as
    /// transformers' `Siglip2Tokenizer` does to the `tokenizer.json` it
    /// loads.
    fn lowercase_first(&mut self) -> tokenizers::Result<()> {
        use tokenizers::NormalizerWrapper;
        use tokenizers::normalizers::{Lowercase, Sequence};
        let mut steps = vec![NormalizerWrapper::Lowercase(Lowercase)];
        steps.extend(self.inner.get_normalizer().cloned());
        self.inner
            .with_normalizer(Some(NormalizerWrapper::Sequence(Sequence::new(steps))))?;
        Ok(())
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
        let at_eos = matches!(
            self.pooling,
            Pooling::FirstEos | Pooling::FirstEosOfContext { .. }
        );
        if at_eos && !ids.contains(&self.eos_id) {
            ids.truncate(self.context - 1);
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    /// Where the text tower pools in `ids` as [`ClipTokenizer::batch`] lays
    /// them out: the first end-of-text token (CLIP), the last position of
    /// the context (SigLIP), the first token (Chinese-CLIP).
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        match self.pooling {
            Pooling::FirstEos | Pooling::FirstEosOfContext { .. } => ids
                .iter()
                .position(|&t| t == self.eos_id)
                .unwrap_or(ids.len().saturating_sub(1)),
            Pooling::LastOfContext { .. } => self.context - 1,
            Pooling::FirstMasked { .. } => 0,
        }
    }

    /// Sequences as one padded batch for the text tower. CLIP pads to the
    /// longest sequence with end-of-text; SigLIP pads every sequence to the
    /// context with its pad id, as it was trained; Chinese-CLIP pads to the
    /// longest with its pad id, which the tower then masks. Sequences
    /// longer than the context are the caller's error, reported by the
    /// tower.
    pub fn batch(&self, seqs: &[Vec<u32>]) -> TextBatch {
        let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let (len, pad) = match self.pooling {
            Pooling::FirstEos => (longest, self.eos_id),
            Pooling::LastOfContext { pad } | Pooling::FirstEosOfContext { pad } => {
                (longest.max(self.context), pad)
            }
            Pooling::FirstMasked { pad } => (longest, pad),
        };
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut pool = Vec::with_capacity(seqs.len());
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad, len - s.len()));
            pool.push(self.pool_position(&ids[ids.len() - len..]));
        }
        TextBatch {
            ids,
            len,
            pool,
            lens: seqs.iter().map(Vec::len).collect(),
        }
    }
}

/// The `BertTokenizer` options a `tokenizer_config.json` may set; missing
/// or null, transformers' defaults (lower case, CJK characters split,
/// accents stripped when lower-casing).
#[derive(serde::Deserialize)]
struct BertOptions {
    #[serde(default)]
    do_lower_case: Option<bool>,
    #[serde(default)]
    tokenize_chinese_chars: Option<bool>,
    #[serde(default)]
    strip_accents: Option<bool>,
}

/// A BERT WordPiece `vocab.txt` (one token per line, its id the line
/// number) as the `tokenizer.json` transformers' `BertTokenizer` saves:
/// BERT's normaliser (control characters dropped, CJK characters split,
/// lower case and accents stripped unless `tokenizer_config.json` says
/// otherwise), whitespace-and-punctuation pre-tokenizer, greedy
/// longest-match WordPiece with `##` continuations (`[UNK]` for a word
/// over 100 characters or with no match), then `[CLS] … [SEP]`. Written as
/// that document and read by `tokenizers` (as `spm.rs` does), so the
/// `tokenizers` crate does all the tokenizing.
fn bert_tokenizer(vocab: &str, config: Option<&str>) -> Result<Tokenizer, String> {
    let opts: BertOptions = serde_json::from_str(config.unwrap_or("{}"))
        .map_err(|e| format!("tokenizer_config.json: {e}"))?;
    // As transformers' `load_vocab`: a repeated line takes the later id.
    let mut ids = serde_json::Map::new();
    for (i, line) in vocab.lines().enumerate() {
        ids.insert(line.to_string(), serde_json::Value::from(i));
    }
    let id = |t: &str| -> Result<u64, String> {
        ids.get(t)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| format!("vocab.txt has no {t} token"))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    id("[UNK]")?;
    let added: Vec<serde_json::Value> = BERT_SPECIALS
        .iter()
        .filter_map(|t| Some((t, id(t).ok()?)))
        .map(|(t, i)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let doc = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
                       "handle_chinese_chars": opts.tokenize_chinese_chars.unwrap_or(true),
                       "strip_accents": opts.strip_accents,
                       "lowercase": opts.do_lower_case.unwrap_or(true)},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", sep], "cls": ["[CLS]", cls]},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": ids},
    });
    Tokenizer::from_bytes(doc.to_string().as_bytes())
        .map_err(|e| format!("cannot build a WordPiece tokenizer from vocab.txt: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nphoto\n##s\n猫\n";

    #[test]
    fn vocab_txt_tokenizes_as_bert() {
        let t = bert_tokenizer(VOCAB, None).unwrap();
        let ids = t.encode("Photos 猫 dog [SEP]", true).unwrap();
        // [CLS] photo ##s 猫 [UNK] [SEP] [SEP]: lower-cased, CJK split, the
        // special token in the text kept whole.
        assert_eq!(ids.get_ids(), [2, 5, 6, 7, 1, 3, 3]);
        let cased = bert_tokenizer(VOCAB, Some(r#"{"do_lower_case": false}"#)).unwrap();
        assert_eq!(cased.encode("Photo", true).unwrap().get_ids(), [2, 1, 3]);
        // Nulls are transformers' defaults.
        let nulls = r#"{"do_lower_case": null, "strip_accents": null}"#;
        assert!(bert_tokenizer(VOCAB, Some(nulls)).is_ok());
    }

    #[test]
    fn broken_vocab_or_options_are_clear_errors() {
        let e = bert_tokenizer("[PAD]\n[UNK]\nphoto\n", None).unwrap_err();
        assert!(e.contains("no [CLS] token"), "{e}");
        let e = bert_tokenizer(VOCAB, Some("{")).unwrap_err();
        assert!(e.contains("tokenizer_config.json"), "{e}");
        let e = bert_tokenizer(VOCAB, Some(r#"{"do_lower_case": "yes"}"#)).unwrap_err();
        assert!(e.contains("tokenizer_config.json"), "{e}");
    }
}
