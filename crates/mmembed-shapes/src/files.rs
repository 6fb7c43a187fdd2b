//! The demo model's non-weight files: architecture, preprocessing and a
//! word-level tokenizer, all in Hugging Face's formats so the checkpoint loads
//! like any CLIP export.

use serde_json::{Value, json};

use crate::scene::vocabulary;

/// Start-of-text token (same spelling as CLIP's, so tooling recognises it).
pub const BOS: &str = "<|startoftext|>";
/// End-of-text token; the text tower pools here.
pub const EOS: &str = "<|endoftext|>";
/// Unknown-word token.
pub const UNK: &str = "<unk>";

/// Longest caption in tokens, start and end included, with headroom.
pub const CONTEXT: usize = 16;

/// `config.json` of the demo architecture: a 64×64, patch-8 ViT with 4
/// layers of width 64, and a 2-layer width-64 text transformer, joined in a
/// 64-dimensional space.
pub fn config_json() -> Value {
    let vocab = vocabulary().len() + 3;
    json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 64,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": CONTEXT,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5
        }
    })
}

/// `preprocessor_config.json`: CLIP's bicubic resize, centre crop and
/// normalisation, at 64 pixels.
pub fn preprocessor_json() -> Value {
    json!({
        "crop_size": {"height": 64, "width": 64},
        "do_center_crop": true,
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_resize": true,
        "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": {"shortest_edge": 64}
    })
}

/// `tokenizer.json`: lower-cased, split on whitespace and punctuation, one id
/// per caption word, unknown words to `<unk>`, wrapped in start/end tokens.
pub fn tokenizer_json() -> Value {
    let special = [BOS, EOS, UNK];
    let mut vocab = serde_json::Map::new();
    for (i, w) in special
        .iter()
        .map(|s| s.to_string())
        .chain(vocabulary())
        .enumerate()
    {
        vocab.insert(w, json!(i));
    }
    let added: Vec<Value> = special
        .iter()
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = |t: &str, id: usize| json!({"id": t, "ids": [id], "tokens": [t]});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": EOS, "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": EOS, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": EOS, "type_id": 1}}
            ],
            "special_tokens": {BOS: tok(BOS, 0), EOS: tok(EOS, 1)}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_maps_each_caption_word_to_its_own_id() {
        use std::str::FromStr;
        let tok = tokenizers::Tokenizer::from_str(&tokenizer_json().to_string()).expect("load");
        let enc = tok
            .encode("A photo of a small RED circle, on the left!", true)
            .expect("encode");
        let tokens = enc.get_tokens();
        assert_eq!(
            tokens,
            [
                BOS, "a", "photo", "of", "a", "small", "red", "circle", UNK, "on", "the", "left",
                UNK, EOS
            ]
        );
        let ids = enc.get_ids();
        assert_eq!(ids[0], 0);
        assert_eq!(*ids.last().expect("ids"), 1);
        assert!(ids.len() <= CONTEXT);
        let vocab = config_json()["text_config"]["vocab_size"]
            .as_u64()
            .expect("n");
        assert_eq!(tok.get_vocab_size(true) as u64, vocab);
    }
}
