//! Writes a ViT-B/32 CLIP checkpoint with seeded random weights (605 MB) to
//! a directory: the real architecture's cost without pretrained weights,
//! for benchmarks (`mmembed bench local:DIR`).
//!
//! `cargo run --release --example random_vit_b32 -- /tmp/vit-b-32`

use std::path::Path;

const VIT_B_32: &str = r#"{"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
 "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                 "num_hidden_layers": 12, "hidden_act": "quick_gelu", "eos_token_id": 49407},
 "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                   "num_hidden_layers": 12, "patch_size": 32, "image_size": 224, "hidden_act": "quick_gelu"}}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .ok_or("usage: random_vit_b32 OUT_DIR")?;
    // The tiny fixture carries the real CLIP tokenizer and preprocessing.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/tiny-clip");
    let preprocessor = std::fs::read_to_string(fixtures.join("preprocessor_config.json"))?;
    std::fs::create_dir_all(&out)?;
    mmembed::local::write_random_checkpoint(
        Path::new(&out),
        VIT_B_32,
        &fixtures.join("tokenizer.json"),
        &preprocessor,
    )?;
    println!("{out}");
    Ok(())
}
