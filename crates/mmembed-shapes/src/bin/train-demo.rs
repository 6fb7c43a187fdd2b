//! Retrains the bundled demo model: `cargo run --release -p mmembed-shapes
//! --bin train-demo -- --out models/demo`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mmembed_shapes::{TrainOptions, train};

/// Train mmembed's demo CLIP model on procedural shapes and write a Hugging
/// Face-format checkpoint directory.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Output directory (created; existing model files are replaced).
    #[arg(long, env = "MMEMBED_TRAIN_OUT", default_value = "models/demo")]
    out: PathBuf,
    /// Optimiser steps.
    #[arg(long, env = "MMEMBED_TRAIN_STEPS", default_value_t = TrainOptions::default().steps)]
    steps: usize,
    /// Scenes per step.
    #[arg(long, env = "MMEMBED_TRAIN_BATCH", default_value_t = TrainOptions::default().batch)]
    batch: usize,
    /// Peak learning rate.
    #[arg(long, env = "MMEMBED_TRAIN_LR", default_value_t = TrainOptions::default().learning_rate)]
    lr: f64,
    /// Seed of the scene stream and the initial weights.
    #[arg(long, env = "MMEMBED_TRAIN_SEED", default_value_t = TrainOptions::default().seed)]
    seed: u64,
    /// Every this many groups of six scenes in a batch is a position group
    /// (one shape and colour in every position) instead of a shape group
    /// (one colour, every shape); 0 = shape groups only.
    #[arg(long, env = "MMEMBED_TRAIN_POSITION_GROUP_EVERY",
          default_value_t = TrainOptions::default().position_group_every)]
    position_group_every: usize,
    /// Start the vision position embeddings from 2-D sines and cosines
    /// (`true`) or from CLIP's small random values (`false`).
    #[arg(long, env = "MMEMBED_TRAIN_SINCOS_POSITIONS", action = clap::ArgAction::Set,
          default_value_t = TrainOptions::default().sincos_positions)]
    sincos_positions: bool,
    /// Threads that compute each step, every one the forward and backward
    /// pass of its share of the batch with single-threaded candle kernels
    /// (for a model this small, candle's own threads mostly wait at
    /// barriers). The gradients are the whole batch's either way.
    #[arg(long, env = "MMEMBED_TRAIN_THREADS", default_value_t = TrainOptions::default().threads)]
    threads: usize,
}

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // SAFETY: no other thread exists yet (the tracing subscriber starts
    // none), and candle reads these once, when its first op builds its pool.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let opts = TrainOptions {
        steps: args.steps,
        batch: args.batch,
        learning_rate: args.lr,
        seed: args.seed,
        position_group_every: args.position_group_every,
        sincos_positions: args.sincos_positions,
        threads: args.threads.max(1),
        ..TrainOptions::default()
    };
    let report = train(&args.out, &opts, |step, loss, t| {
        tracing::info!(
            step,
            loss = format!("{loss:.4}"),
            temperature = format!("{t:.1}"),
            "training"
        );
    })
    .with_context(|| format!("training into {}", args.out.display()))?;
    tracing::info!(
        steps = report.steps,
        final_loss = report.final_loss,
        seconds = format!("{:.0}", report.seconds),
        "wrote {}",
        args.out.display()
    );
    Ok(())
}
