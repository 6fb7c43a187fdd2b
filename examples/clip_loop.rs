//! Runs one local-model workload in a loop, for profilers (`perf record`,
//! `valgrind --tool=callgrind`) and quick throughput checks: the model is
//! loaded first, then the forward pass repeats for the given seconds.
//!
//! ```sh
//! cargo run --release --example random_vit_b32 -- /tmp/vit-b-32
//! cargo build --release --example clip_loop --features local
//! target/release/examples/clip_loop /tmp/vit-b-32 images 32 20
//! /usr/bin/time -v target/release/examples/clip_loop /tmp/vit-b-32 images 1 5 int8
//! ```
//!
//! Workloads: `images`, `texts77` (77-token texts), `texts16` (16 tokens).
//! An optional last argument is the precision (`f32`, the default, or
//! `int8`). A SigLIP 2 NaFlex model's images are squares of its whole
//! patch budget (16 × 16 patches for 256), through
//! [`LoadedClip::embed_u8_images`].

use std::path::Path;
use std::time::{Duration, Instant};

use mmembed::local::candle_core::Device;
use mmembed::local::{LoadedClip, Precision};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (model, workload, batch, seconds, precision) = match args.as_slice() {
        [_, m, w, b, s] => (m, w, b, s, Precision::F32),
        [_, m, w, b, s, p] => (m, w, b, s, p.parse::<Precision>()?),
        _ => {
            return Err(
                "usage: clip_loop MODEL_DIR images|texts77|texts16 BATCH SECONDS [PRECISION]"
                    .into(),
            );
        }
    };
    // As the `mmembed` CLI does, so profiles show what it runs.
    mmembed::local::tune_malloc_for_inference();
    let batch: usize = batch.parse()?;
    let seconds: f64 = seconds.parse()?;
    let files = mmembed::local::local_files(Path::new(model))?;
    let clip = LoadedClip::load(&files, &Device::Cpu, precision)?;
    let side = clip.config.vision.image_size;
    let mut run: Box<dyn FnMut() -> Result<(), Box<dyn std::error::Error>>> =
        match workload.as_str() {
            "images" if clip.config.vision.naflex_grid.is_some() => {
                let row = clip.pixels_per_image();
                let p = clip.config.vision.patch_size;
                let grid = (row / (3 * p * p)).isqrt();
                let px: Vec<u8> = (0..row * batch).map(|i| (i % 251) as u8).collect();
                let side = (grid * p) as u32;
                let sizes = vec![(side, side); batch];
                Box::new(move || {
                    clip.embed_u8_images(&px, &sizes)
                        .map(drop)
                        .map_err(Into::into)
                })
            }
            "images" => {
                // Values do not change the cost; a fixed pattern keeps runs equal.
                let px: Vec<f32> = (0..3 * side * side)
                    .map(|i| (i % 17) as f32 / 17.0)
                    .collect();
                let input = vec![px; batch];
                Box::new(move || clip.embed_pixels(&input).map(drop).map_err(Into::into))
            }
            "texts77" | "texts16" => {
                let tokens = if workload == "texts77" { 77 } else { 16 };
                let words = ["a photo of a cat sitting on a red sofa"; 12].join(" ");
                let mut ids = clip.tokenizer.encode(&words)?;
                ids.truncate(tokens - 1);
                ids.push(clip.tokenizer.eos_id());
                let input = vec![ids; batch];
                Box::new(move || clip.embed_token_ids(&input).map(drop).map_err(Into::into))
            }
            other => return Err(format!("unknown workload {other:?}").into()),
        };
    run()?;
    eprintln!("loaded and warmed up; running");
    let start = Instant::now();
    let mut calls = 0u32;
    // The fastest call too: on a shared host it is what the code can do,
    // while the mean also carries whatever else ran on the machine.
    let mut best = f64::INFINITY;
    while start.elapsed() < Duration::from_secs_f64(seconds) || calls < 3 {
        let call = Instant::now();
        run()?;
        best = best.min(call.elapsed().as_secs_f64());
        calls += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{workload} batch {batch}: {calls} calls, {:.1} ms/call, {:.2} items/s; \
         best call {:.1} ms, {:.2} items/s",
        secs * 1e3 / f64::from(calls),
        f64::from(calls) * batch as f64 / secs,
        best * 1e3,
        batch as f64 / best
    );
    Ok(())
}
