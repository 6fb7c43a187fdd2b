//! Writes a ViT-B/32 CLIP checkpoint with seeded random weights (605 MB) to
//! a directory: the real architecture's cost without pretrained weights,
//! for benchmarks (`mmembed bench local:DIR`).
//!
//! `cargo run --release --example random_vit_b32 -- /tmp/vit-b-32`

use std::path::Path;

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
        mmembed::local::VIT_B_32_CONFIG_JSON,
        &fixtures.join("tokenizer.json"),
        &preprocessor,
    )?;
    println!("{out}");
    Ok(())
}
