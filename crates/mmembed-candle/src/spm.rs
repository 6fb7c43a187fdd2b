//! SigLIP's `spiece.model` (a SentencePiece unigram model) as a `tokenizers`
//! tokenizer, for checkpoints that ship no `tokenizer.json` (Google's SigLIP
//! v1 repositories ship only `spiece.model`).
//!
//! The conversion is transformers' `T5Converter` (its SentencePiece
//! normaliser as `Precompiled`, `Metaspace`, end-of-text appended) plus what
//! `SiglipTokenizer` does in Python before SentencePiece sees the text: `▁`
//! read as a space, lower case, ASCII punctuation removed, whitespace runs
//! collapsed and stripped. `models/fixtures/make_fixtures.py` builds the
//! same tokenizer in Python, and the parity tests hold both to the
//! sentencepiece library's ids.
//!
//! Only the few fields needed are decoded (`prost` with hand-written message
//! structs: sentencepiece's `.proto` is not worth a build step for them).

use base64::Engine as _;
use prost::Message;
use serde_json::{Value, json};
use tokenizers::Tokenizer;

/// `sentencepiece_model.proto`'s `ModelProto`, the fields we read.
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<Piece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct Piece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
    #[prost(int32, optional, tag = "3")]
    r#type: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
    #[prost(int32, optional, tag = "42")]
    eos_id: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    add_dummy_prefix: Option<bool>,
}

const CONTROL: i32 = 3;

/// A SigLIP tokenizer from the bytes of its `spiece.model`.
pub(crate) fn siglip_tokenizer(spiece: &[u8]) -> Result<Tokenizer, String> {
    let proto = ModelProto::decode(spiece)
        .map_err(|e| format!("spiece.model is not a SentencePiece model: {e}"))?;
    let trainer = proto.trainer_spec.unwrap_or_default();
    // Defaults as sentencepiece_model.proto declares them.
    match trainer.model_type.unwrap_or(1) {
        1 => {}
        other => {
            return Err(format!(
                "spiece.model is not a unigram model (model_type {other}); only unigram \
                 SentencePiece models convert"
            ));
        }
    }
    if proto.pieces.is_empty() {
        return Err("spiece.model has no pieces".into());
    }
    let index = |id: Option<i32>, default: i32, what: &str| -> Result<usize, String> {
        usize::try_from(id.unwrap_or(default))
            .ok()
            .filter(|&i| i < proto.pieces.len())
            .ok_or_else(|| format!("spiece.model has no {what} piece"))
    };
    let unk = index(trainer.unk_id, 0, "unknown")?;
    let eos = index(trainer.eos_id, 2, "end-of-text")?;
    let name = |i: usize| proto.pieces[i].piece.clone().unwrap_or_default();
    let vocab: Vec<Value> = proto
        .pieces
        .iter()
        .map(|p| json!([p.piece.clone().unwrap_or_default(), p.score.unwrap_or(0.0)]))
        .collect();
    let added: Vec<Value> = proto
        .pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| p.r#type == Some(CONTROL))
        .map(|(id, p)| {
            json!({"id": id, "content": p.piece.clone().unwrap_or_default(), "single_word": false,
                   "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let norm = proto.normalizer_spec.unwrap_or_default();
    let punctuation: String = (b'!'..=b'~')
        .filter(u8::is_ascii_punctuation)
        .map(|c| format!("\\{}", c as char))
        .collect();
    let mut normalizers = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "Lowercase"}),
        json!({"type": "Replace", "pattern": {"Regex": format!("[{punctuation}]")}, "content": ""}),
        json!({"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}),
        json!({"type": "Strip", "strip_left": true, "strip_right": true}),
    ];
    if let Some(map) = norm.precompiled_charsmap.filter(|m| !m.is_empty()) {
        let map = base64::engine::general_purpose::STANDARD.encode(map);
        normalizers.push(json!({"type": "Precompiled", "precompiled_charsmap": map}));
    }
    normalizers.push(json!({"type": "Strip", "strip_left": false, "strip_right": true}));
    normalizers
        .push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u{2581}"}));
    let prepend = if norm.add_dummy_prefix.unwrap_or(true) {
        "always"
    } else {
        "never"
    };
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}",
                           "prepend_scheme": prepend, "split": true});
    let eos_name = name(eos);
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": eos_name, "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": eos_name, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": eos_name, "type_id": 0}}],
            "special_tokens": {eos_name.clone(): {"id": eos_name, "ids": [eos], "tokens": [eos_name]}},
        },
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": unk, "vocab": vocab,
                  "byte_fallback": trainer.byte_fallback.unwrap_or(false)},
    });
    Tokenizer::from_bytes(doc.to_string().as_bytes())
        .map_err(|e| format!("cannot build a tokenizer from spiece.model: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_non_unigram_models_are_refused() {
        assert!(siglip_tokenizer(b"\xff\xff\xff").is_err());
        assert!(siglip_tokenizer(&[]).unwrap_err().contains("has no pieces"));
        let bpe = ModelProto {
            pieces: vec![Piece {
                piece: Some("a".into()),
                score: Some(0.0),
                r#type: Some(1),
            }],
            trainer_spec: Some(TrainerSpec {
                model_type: Some(2),
                ..Default::default()
            }),
            normalizer_spec: None,
        };
        let e = siglip_tokenizer(&bpe.encode_to_vec()).unwrap_err();
        assert!(e.contains("not a unigram model"), "{e}");
    }
}
