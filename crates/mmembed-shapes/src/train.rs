//! Contrastive training of the demo CLIP model on procedural scenes.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use mmembed_candle::{ClipConfig, ClipModel, ClipTokenizer};
use mmembed_media::ClipPreprocessor;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::files;
use crate::scene::{
    Attributes, Caption, Colour, Position, Scene, Shape, random_caption,
    random_caption_with_position,
};

/// Training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// candle failed (shapes, devices, saving).
    #[error("training failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Writing the checkpoint failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The generated files did not load back.
    #[error("the generated model files do not load: {0}")]
    Files(#[from] mmembed_core::EmbedError),
}

/// Training settings. [`TrainOptions::default`] is what produced
/// `models/demo`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Optimiser steps.
    pub steps: usize,
    /// Scenes per step.
    pub batch: usize,
    /// Peak learning rate (linear warm-up, then cosine decay to 5 %).
    pub learning_rate: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of the scene stream and of nothing else (weights start from
    /// candle-nn's initialisers, seeded by this too).
    pub seed: u64,
    /// Log the loss every this many steps.
    pub log_every: usize,
    /// Every this many groups of scenes in a batch is a position group
    /// (one colour and shape in every position; 0 = none), the others are
    /// shape groups (one colour, every shape). See `SceneStream`.
    pub position_group_every: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 6400,
            batch: 48,
            learning_rate: 3e-3,
            warmup: 150,
            weight_decay: 0.05,
            seed: 20261122,
            log_every: 50,
            position_group_every: 0,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Steps run.
    pub steps: usize,
    /// Mean loss over the last `log_every` steps.
    pub final_loss: f32,
    /// Learned temperature (`exp(logit_scale)`).
    pub logit_scale: f32,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Sides scenes are rendered at before preprocessing, so the model sees the
/// resampling a real image goes through.
const RENDER_SIDES: [u32; 5] = [64, 80, 96, 128, 160];

/// One training batch, ready for the model.
struct Batch {
    pixels: Vec<f32>,
    ids: Vec<u32>,
    pool: Vec<usize>,
    targets: Vec<f32>,
    /// What was drawn; the tests check the batch composition with it.
    #[cfg_attr(not(test), allow(dead_code))]
    captions: Vec<Caption>,
}

/// Draws batches of random scenes and captions from a seeded stream.
pub struct SceneStream {
    position_group_every: usize,
    rng: ChaCha8Rng,
    pre: ClipPreprocessor,
    tok: ClipTokenizer,
}

impl SceneStream {
    fn next_batch(&mut self, n: usize) -> Result<Batch, TrainError> {
        let mut pixels = Vec::new();
        let mut captions: Vec<Caption> = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(n);
        // Scenes come in groups of six that share a colour, so that each
        // scene has hard negatives differing in one attribute. Shape groups
        // hold every shape (random sizes and positions): with plain random
        // batches colour alone explained most of the loss and shape was
        // learnt too slowly (79 % zero-shot after 1,800 steps). Position
        // groups hold one shape in every position (and one more at random),
        // captioned with the position: in shape groups a position word
        // rarely separates two scenes, and every recall@1 error of a model
        // trained on shape groups alone was a position.
        const GROUP: usize = Shape::ALL.len();
        let mut order = Shape::ALL;
        let mut positions = [Position::Center; GROUP];
        let mut colour = Colour::Red;
        let mut by_position = false;
        for i in 0..n {
            let (g, k) = (i / GROUP, i % GROUP);
            if k == 0 {
                // The order of these draws is what made models/demo: keep it.
                order.shuffle(&mut self.rng);
                colour = Colour::ALL[self.rng.random_range(0..Colour::ALL.len())];
                by_position = self.position_group_every > 0 && g % self.position_group_every == 1;
                if by_position {
                    positions[..Position::ALL.len()].copy_from_slice(&Position::ALL);
                    positions[GROUP - 1] =
                        Position::ALL[self.rng.random_range(0..Position::ALL.len())];
                    positions.shuffle(&mut self.rng);
                }
            }
            let mut a = Attributes {
                shape: if by_position { order[0] } else { order[k] },
                colour,
                ..Attributes::random(&mut self.rng)
            };
            if by_position {
                a.position = positions[k];
            }
            let scene = Scene::random(a, &mut self.rng);
            let side = RENDER_SIDES[self.rng.random_range(0..RENDER_SIDES.len())];
            let img = scene.render(side, side, self.rng.random());
            pixels.extend(self.pre.preprocess(&img));
            let c = if by_position {
                random_caption_with_position(a, &mut self.rng)
            } else {
                random_caption(a, &mut self.rng)
            };
            seqs.push(self.tok.encode(&c.text)?);
            captions.push(c);
        }
        let len = seqs.iter().map(Vec::len).max().unwrap_or(1);
        let eos = self.tok.eos_id();
        let pool = seqs.iter().map(|s| self.tok.pool_position(s)).collect();
        let ids = seqs
            .into_iter()
            .flat_map(|mut s| {
                s.resize(len, eos);
                s
            })
            .collect();
        // targets[i][j]: caption i fits scene j. Rows are normalised in the
        // loss, so identical captions in a batch are not pushed apart.
        let targets = captions
            .iter()
            .flat_map(|c| captions.iter().map(|d| c.fits(&d.attributes) as u8 as f32))
            .collect();
        Ok(Batch {
            pixels,
            ids,
            pool,
            targets,
            captions,
        })
    }
}

/// Cross-entropy against soft targets whose rows sum to one.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let t = targets.broadcast_div(&targets.sum_keepdim(D::Minus1)?)?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (t * logp)?.sum_all()?.neg()? / logits.dim(0)? as f64
}

fn l2n(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// Trains the demo model and writes a Hugging Face-format checkpoint
/// directory to `out` (`config.json`, `model.safetensors`, `tokenizer.json`,
/// `preprocessor_config.json`). `progress` is called every
/// `opts.log_every` steps with `(step, mean loss, temperature)`.
pub fn train(
    out: &Path,
    opts: &TrainOptions,
    mut progress: impl FnMut(usize, f32, f32),
) -> Result<TrainReport, TrainError> {
    let start = Instant::now();
    let io = |path: PathBuf| move |source| TrainError::Io { path, source };
    std::fs::create_dir_all(out).map_err(io(out.to_owned()))?;
    let write = |name: &str, v: serde_json::Value| {
        let p = out.join(name);
        let text = serde_json::to_string_pretty(&v).expect("JSON values serialise");
        std::fs::write(&p, text + "\n").map_err(io(p))
    };
    write("config.json", files::config_json())?;
    write("preprocessor_config.json", files::preprocessor_json())?;
    write("tokenizer.json", files::tokenizer_json())?;

    let cfg = ClipConfig::from_json(&files::config_json().to_string()).map_err(|reason| {
        mmembed_core::EmbedError::ModelLoad {
            model: out.display().to_string(),
            reason,
            source: None,
        }
    })?;
    let tok = ClipTokenizer::from_file(&out.join("tokenizer.json"), files::CONTEXT, None)?;
    let pre = ClipPreprocessor::from_file(&out.join("preprocessor_config.json"))?;
    let side = cfg.vision.image_size;

    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = ClipModel::for_training(&cfg, vb.clone())?;
    let logit_scale = vb.get_with_hints(
        (),
        "logit_scale",
        candle_nn::Init::Const((1.0f64 / 0.07).ln()),
    )?;
    let scale_var = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .get("logit_scale")
        .cloned()
        .expect("logit_scale was just created");
    let max_scale = 100f64.ln();
    initialise(&varmap, opts.seed)?;

    // Weight decay on matrices only: decaying the temperature, norms,
    // biases and embeddings pulls them toward zero for no benefit.
    let (decayed, plain): (Vec<_>, Vec<_>) = {
        let data = varmap.data().lock().expect("varmap lock");
        let mut named: Vec<(&String, &Var)> = data.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named
            .into_iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .partition(|(n, v)| v.rank() >= 2 && !n.contains("embedding"))
    };
    let adamw = |vars: Vec<(String, Var)>, weight_decay| {
        AdamW::new(
            vars.into_iter().map(|(_, v)| v).collect(),
            ParamsAdamW {
                lr: opts.learning_rate,
                weight_decay,
                ..Default::default()
            },
        )
    };
    let mut opt = adamw(decayed, opts.weight_decay)?;
    let mut opt_plain = adamw(plain, 0.0)?;

    // Scenes are generated on another thread, two batches ahead, so
    // rendering overlaps the model's work.
    let (tx, rx) = mpsc::sync_channel::<Result<Batch, TrainError>>(2);
    let mut stream = SceneStream {
        position_group_every: opts.position_group_every,
        rng: ChaCha8Rng::seed_from_u64(opts.seed),
        pre,
        tok,
    };
    let (steps, batch) = (opts.steps, opts.batch);
    let producer = std::thread::spawn(move || {
        for _ in 0..steps {
            if tx.send(stream.next_batch(batch)).is_err() {
                break;
            }
        }
    });

    let mut window = Vec::new();
    let mut final_loss = f32::NAN;
    for step in 0..opts.steps {
        let b = rx.recv().expect("the scene thread outlives the loop")?;
        let n = b.pool.len();
        let pixels = Tensor::from_vec(b.pixels, (n, 3, side, side), &dev)?;
        let ids = Tensor::from_vec(b.ids, (n, ()), &dev)?;
        let targets = Tensor::from_vec(b.targets, (n, n), &dev)?;
        let img = l2n(&model.vision.forward(&pixels)?)?;
        let txt = l2n(&model.text.forward(&ids, &b.pool)?)?;
        let logits = txt.matmul(&img.t()?)?.broadcast_mul(&logit_scale.exp()?)?;
        let loss = ((soft_cross_entropy(&logits, &targets)?
            + soft_cross_entropy(&logits.t()?, &targets.t()?)?)?
            / 2.0)?;
        let lr = lr_at(opts, step);
        opt.set_learning_rate(lr);
        opt_plain.set_learning_rate(lr);
        let grads = loss.backward()?;
        opt.step(&grads)?;
        opt_plain.step(&grads)?;
        clamp(&scale_var, max_scale)?;
        window.push(loss.to_scalar::<f32>()?);
        if (step + 1) % opts.log_every == 0 || step + 1 == opts.steps {
            final_loss = window.iter().sum::<f32>() / window.len() as f32;
            window.clear();
            let t = logit_scale.exp()?.to_scalar::<f32>()?;
            progress(step + 1, final_loss, t);
        }
    }
    drop(rx);
    let _ = producer.join();

    let path = out.join("model.safetensors");
    varmap.save(&path)?;
    Ok(TrainReport {
        steps: opts.steps,
        final_loss,
        logit_scale: logit_scale.exp()?.to_scalar::<f32>()?,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Seeded CLIP-style initial weights (candle's CPU initialisers draw from
/// the thread's RNG, so they cannot make a run reproducible): unit/zero
/// layer norms, zero biases, N(0, 0.02) token and N(0, 0.01) position
/// embeddings, N(0, 1/fan_in) for every projection.
fn initialise(varmap: &VarMap, seed: u64) -> candle_core::Result<()> {
    use rand_distr::{Distribution, StandardNormal};
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_1417);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let norm = name.contains("norm") || name.contains("layrnorm");
        let value = |rng: &mut ChaCha8Rng| -> f32 {
            let z: f32 = StandardNormal.sample(rng);
            if name == "logit_scale" {
                (1.0f32 / 0.07).ln()
            } else if norm && name.ends_with("weight") {
                1.0
            } else if name.ends_with("bias") {
                0.0
            } else if name.ends_with("token_embedding.weight") {
                0.02 * z
            } else if name.ends_with("position_embedding.weight") {
                0.01 * z
            } else if name.ends_with("class_embedding") {
                z / (dims[0] as f32).sqrt()
            } else {
                let fan_in: usize = dims[1..].iter().product();
                z / (fan_in as f32).sqrt()
            }
        };
        let v: Vec<f32> = (0..n).map(|_| value(&mut rng)).collect();
        var.set(&Tensor::from_vec(v, dims, var.device())?)?;
    }
    Ok(())
}

fn clamp(v: &Var, max: f64) -> candle_core::Result<()> {
    if v.as_tensor().to_scalar::<f32>()? as f64 > max {
        v.set(&Tensor::new(max as f32, v.device())?)?;
    }
    Ok(())
}

fn lr_at(o: &TrainOptions, step: usize) -> f64 {
    if step < o.warmup {
        return o.learning_rate * (step + 1) as f64 / o.warmup as f64;
    }
    let p = (step - o.warmup) as f64 / (o.steps - o.warmup).max(1) as f64;
    let floor = 0.05;
    o.learning_rate * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn stream(position_group_every: usize, dir: &Path) -> SceneStream {
        let tok = dir.join("tokenizer.json");
        let pre = dir.join("preprocessor_config.json");
        std::fs::write(&tok, files::tokenizer_json().to_string()).expect("write");
        std::fs::write(&pre, files::preprocessor_json().to_string()).expect("write");
        SceneStream {
            position_group_every,
            rng: ChaCha8Rng::seed_from_u64(7),
            pre: ClipPreprocessor::from_file(&pre).expect("preprocessor"),
            tok: ClipTokenizer::from_file(&tok, files::CONTEXT, None).expect("tokenizer"),
        }
    }

    #[test]
    fn batches_mix_shape_groups_and_position_groups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = stream(3, dir.path()).next_batch(24).expect("batch");
        assert_eq!(b.pixels.len(), 24 * 3 * 64 * 64);
        for (g, group) in b.captions.chunks(6).enumerate() {
            let colours: HashSet<_> = group.iter().map(|c| c.attributes.colour).collect();
            let shapes: HashSet<_> = group.iter().map(|c| c.attributes.shape).collect();
            let positions: HashSet<_> = group.iter().map(|c| c.attributes.position).collect();
            assert_eq!(colours.len(), 1, "group {g} shares a colour");
            if g % 3 == 1 {
                assert_eq!(shapes.len(), 1, "position group {g}: one shape");
                assert_eq!(positions.len(), 5, "position group {g}: every position");
                assert!(group.iter().all(|c| c.names_position));
            } else {
                assert_eq!(shapes.len(), 6, "shape group {g}: every shape");
            }
        }
        // Targets: a caption fits its own scene, and in a position group
        // only the scenes in its position (and size, if named).
        let n = b.captions.len();
        for (i, c) in b.captions.iter().enumerate() {
            assert_eq!(b.targets[i * n + i], 1.0);
            for (j, d) in b.captions.iter().enumerate().skip(6).take(6) {
                assert_eq!(b.targets[i * n + j] == 1.0, c.fits(&d.attributes));
            }
        }
    }

    #[test]
    fn shape_groups_only_when_position_groups_are_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = stream(0, dir.path()).next_batch(18).expect("batch");
        for group in b.captions.chunks(6) {
            let shapes: HashSet<_> = group.iter().map(|c| c.attributes.shape).collect();
            assert_eq!(shapes.len(), 6);
        }
    }
}
