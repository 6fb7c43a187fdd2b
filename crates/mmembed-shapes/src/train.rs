//! Contrastive training of the demo CLIP model on procedural scenes.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use candle_core::backprop::GradStore;
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
    /// Seed of the scene stream and of the initial weights.
    pub seed: u64,
    /// Log the loss every this many steps.
    pub log_every: usize,
    /// Every this many groups of scenes in a batch is a position group
    /// (one colour and shape in every position; 0 = none), the others are
    /// shape groups (one colour, every shape). See `SceneStream`.
    pub position_group_every: usize,
    /// Start the vision tower's patch position embeddings from 2-D sines and
    /// cosines (amplitude 1, periods from twice the patch grid down to four
    /// patches) instead of N(0, 0.01). See
    /// `sincos_positions`.
    pub sincos_positions: bool,
    /// Threads that compute a step, each the forward and backward pass of
    /// its share of the batch (see `gradients`). The gradients are the
    /// whole batch's whatever the count, up to float rounding: a run is
    /// reproducible bit for bit for a given count, and close for another.
    pub threads: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 10_000,
            batch: 48,
            learning_rate: 3e-3,
            warmup: 150,
            weight_decay: 0.05,
            seed: 20261122,
            log_every: 50,
            position_group_every: 0,
            sincos_positions: true,
            threads: 2,
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
        // groups (off by default) hold one shape in every position (and one
        // more at random), captioned with the position. They were tried
        // when the model did not learn position; what fixed that was the
        // sin-cos start of the position embeddings, and with it position
        // groups only cost shape accuracy (one in four: 88.5 % zero-shot,
        // one in eight: 90.8 %, none: 97.1 %, same seed and steps). Two
        // groups of the same colour in a batch already put the same shape
        // in different positions often enough.
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
                by_position =
                    self.position_group_every > 0 && (g + 1) % self.position_group_every == 0;
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

/// CLIP's symmetric contrastive loss of unit-norm text and image embeddings
/// (`[n, dim]` each), with `targets[i][j]` = caption i fits scene j.
fn contrastive_loss(
    txt: &Tensor,
    img: &Tensor,
    logit_scale: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    let logits = txt.matmul(&img.t()?)?.broadcast_mul(&logit_scale.exp()?)?;
    (soft_cross_entropy(&logits, targets)? + soft_cross_entropy(&logits.t()?, &targets.t()?)?)?
        / 2.0
}

/// Cross-entropy against soft targets whose rows sum to one.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let t = targets.broadcast_div(&targets.sum_keepdim(D::Minus1)?)?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (t * logp)?.sum_all()?.neg()? / logits.dim(0)? as f64
}

/// The loss of one batch and its gradients, computed by `threads` threads.
///
/// Each thread runs the forward pass of a contiguous share of the batch and
/// keeps its graph; the (small) contrastive loss over the whole batch is
/// then computed from the gathered embeddings, and each thread backpropagates
/// its share of the loss's gradient with respect to the embeddings
/// (`sum(embedding * gradient)`). The gradients are exactly those of the
/// whole-batch loss, as in GradCache or CLIP's all-gather, without a second
/// forward pass. Why: candle's kernels on this small model cannot use a
/// second core (most ops are too small to split, and two kernel threads
/// made a step slower), so the second core was idle during training.
fn gradients(
    model: &ClipModel,
    logit_scale: &Tensor,
    vars: &[Var],
    b: &Batch,
    side: usize,
    threads: usize,
) -> candle_core::Result<(f32, GradStore)> {
    let dev = logit_scale.device();
    let n = b.pool.len();
    let pixels = Tensor::from_slice(&b.pixels, (n, 3, side, side), dev)?;
    let ids = Tensor::from_slice(&b.ids, (n, b.ids.len() / n.max(1)), dev)?;
    let targets = Tensor::from_slice(&b.targets, (n, n), dev)?;
    let per = n.div_ceil(threads.clamp(1, n.max(1)));
    let shares: Vec<(usize, usize)> = (0..n).step_by(per).map(|s| (s, per.min(n - s))).collect();
    std::thread::scope(|scope| {
        let mut workers = Vec::with_capacity(shares.len());
        for &(start, len) in &shares {
            let (emb_tx, emb_rx) = mpsc::sync_channel::<(Tensor, Tensor)>(1);
            let (grad_tx, grad_rx) = mpsc::sync_channel::<(Tensor, Tensor)>(1);
            let (pixels, ids, pool) = (&pixels, &ids, &b.pool[start..start + len]);
            let handle = scope.spawn(move || -> candle_core::Result<GradStore> {
                let img = l2n(&model.vision.forward(&pixels.narrow(0, start, len)?)?)?;
                let txt = l2n(&model.text.forward(&ids.narrow(0, start, len)?, pool)?)?;
                if emb_tx.send((img.detach(), txt.detach())).is_err() {
                    return Err(candle_core::Error::Msg("the step was abandoned".into()));
                }
                let Ok((gi, gt)) = grad_rx.recv() else {
                    return Err(candle_core::Error::Msg("the step was abandoned".into()));
                };
                ((img * gi)?.sum_all()? + (txt * gt)?.sum_all()?)?.backward()
            });
            workers.push((emb_rx, grad_tx, handle));
        }
        let gathered: Option<Vec<(Tensor, Tensor)>> =
            workers.iter().map(|(rx, _, _)| rx.recv().ok()).collect();
        let outcome = match gathered {
            Some(parts) => whole_batch_loss(logit_scale, &targets, &parts),
            None => Err(candle_core::Error::Msg("a step thread failed".into())),
        };
        let (loss, loss_grads, img, txt) = match outcome {
            Ok(v) => v,
            Err(e) => {
                // Dropping the senders releases the threads; their own error,
                // if any, says more than ours.
                let results: Vec<_> = workers.into_iter().map(|(_, _, h)| join(h)).collect();
                return Err(results.into_iter().find_map(|r| r.err()).unwrap_or(e));
            }
        };
        let g_img = loss_grads
            .get(img.as_tensor())
            .expect("the loss depends on it");
        let g_txt = loss_grads
            .get(txt.as_tensor())
            .expect("the loss depends on it");
        let mut handles = Vec::with_capacity(workers.len());
        for (&(start, len), (_, grad_tx, handle)) in shares.iter().zip(workers) {
            let share = (g_img.narrow(0, start, len)?, g_txt.narrow(0, start, len)?);
            // A thread that has gone reports its error at the join below.
            let _ = grad_tx.send(share);
            handles.push(handle);
        }
        // Each thread's gradients are its share's; the model's are their sum
        // (added in thread order, so a run is reproducible).
        let mut handles = handles.into_iter();
        let mut total = join(handles.next().expect("at least one share"))?;
        for h in handles {
            let g = join(h)?;
            for v in vars {
                if let Some(add) = g.get(v) {
                    let sum = match total.get(v) {
                        Some(prev) => (prev + add)?,
                        None => add.clone(),
                    };
                    total.insert(v, sum);
                }
            }
        }
        if let Some(g) = loss_grads.get(logit_scale) {
            total.insert(logit_scale, g.clone());
        }
        Ok((loss, total))
    })
}

/// The symmetric contrastive loss of the gathered embeddings, with its
/// gradients with respect to them (returned as the two leaf variables) and
/// to the temperature.
fn whole_batch_loss(
    logit_scale: &Tensor,
    targets: &Tensor,
    parts: &[(Tensor, Tensor)],
) -> candle_core::Result<(f32, GradStore, Var, Var)> {
    let img = Var::from_tensor(&Tensor::cat(
        &parts.iter().map(|p| &p.0).collect::<Vec<_>>(),
        0,
    )?)?;
    let txt = Var::from_tensor(&Tensor::cat(
        &parts.iter().map(|p| &p.1).collect::<Vec<_>>(),
        0,
    )?)?;
    let loss = contrastive_loss(txt.as_tensor(), img.as_tensor(), logit_scale, targets)?;
    let grads = loss.backward()?;
    Ok((loss.to_scalar::<f32>()?, grads, img, txt))
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, candle_core::Result<T>>) -> candle_core::Result<T> {
    h.join()
        .unwrap_or_else(|_| Err(candle_core::Error::Msg("a step thread panicked".into())))
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
    initialise(&varmap, opts.seed, opts.sincos_positions)?;

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
    let all_vars: Vec<Var> = decayed
        .iter()
        .chain(&plain)
        .map(|(_, v)| v.clone())
        .collect();
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
        let (loss, grads) = gradients(&model, &logit_scale, &all_vars, &b, side, opts.threads)?;
        let lr = lr_at(opts, step);
        opt.set_learning_rate(lr);
        opt_plain.set_learning_rate(lr);
        opt.step(&grads)?;
        opt_plain.step(&grads)?;
        clamp(&scale_var, max_scale)?;
        window.push(loss);
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
fn initialise(varmap: &VarMap, seed: u64, sincos: bool) -> candle_core::Result<()> {
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
        let mut v: Vec<f32> = (0..n).map(|_| value(&mut rng)).collect();
        if sincos && name == "vision_model.embeddings.position_embedding.weight" {
            // Row 0 is the class token's and keeps its random start.
            let patches = sincos_positions(dims[0] - 1, dims[1]);
            v[dims[1]..].copy_from_slice(&patches);
        }
        var.set(&Tensor::from_vec(v, dims, var.device())?)?;
    }
    Ok(())
}

/// 2-D sine/cosine position embeddings for a square grid of `n` patches
/// (row-major, as the patch embedding lays them out) and width `d`: the
/// first half of the channels encodes the row, the second the column, each
/// as `sin`/`cos` pairs over `d / 4` frequencies spaced geometrically from
/// pi / grid (half a period across the image) to pi / 2 (a period every four
/// patches). Returns `n * d` values.
///
/// Why: with CLIP's N(0, 0.01) start, position is 100 times weaker than a
/// patch's content after the pre-layer norm, and the demo model never
/// learnt it (position-only probe at chance, 19-21 %, in every run before,
/// with or without batches where position decides). Fixed sin-cos
/// embeddings are what MAE and MoCo v3 use for ViTs; here they are only the
/// starting point and are trained like any weight.
fn sincos_positions(n: usize, d: usize) -> Vec<f32> {
    let grid = (n as f64).sqrt().round() as usize;
    assert_eq!(grid * grid, n, "a square patch grid");
    let freqs = (d / 4).max(1);
    let lo = std::f64::consts::PI / grid as f64;
    let hi = std::f64::consts::PI / 2.0;
    let omega = |k: usize| {
        if freqs == 1 {
            lo
        } else {
            lo * (hi / lo).powf(k as f64 / (freqs - 1) as f64)
        }
    };
    let mut out = vec![0f32; n * d];
    for (i, row) in out.chunks_mut(d).enumerate() {
        let (y, x) = ((i / grid) as f64, (i % grid) as f64);
        for (c, value) in row.iter_mut().enumerate() {
            let half = d / 2;
            let (coord, c) = if c < half { (y, c) } else { (x, c - half) };
            let k = (c / 2).min(freqs - 1);
            let phase = coord * omega(k);
            *value = if c % 2 == 0 { phase.sin() } else { phase.cos() } as f32;
        }
    }
    out
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
            if g % 3 == 2 {
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
    fn sincos_positions_tell_every_patch_apart_and_nearer_ones_are_more_alike() {
        let (grid, d) = (8, 64);
        let p = sincos_positions(grid * grid, d);
        assert_eq!(p.len(), grid * grid * d);
        assert!(p.iter().all(|v| (-1.0..=1.0).contains(v)));
        let row = |i: usize| &p[i * d..(i + 1) * d];
        let dist = |a: usize, b: usize| -> f32 {
            row(a)
                .iter()
                .zip(row(b))
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f32>()
                .sqrt()
        };
        for a in 0..grid * grid {
            for b in a + 1..grid * grid {
                assert!(dist(a, b) > 0.1, "patches {a} and {b} look alike");
            }
        }
        // Along a row and down a column, distance grows with the offset up
        // to three patches and then levels off, never back to a neighbour's.
        for step in 1..3 {
            assert!(dist(0, step) < dist(0, step + 1), "row offset {step}");
            assert!(
                dist(0, step * grid) < dist(0, (step + 1) * grid),
                "column offset {step}"
            );
        }
        for step in 3..grid {
            assert!(dist(0, step) > 1.5 * dist(0, 1), "row offset {step}");
            assert!(
                dist(0, step * grid) > 1.5 * dist(0, grid),
                "column offset {step}"
            );
        }
        // Rows encode y in the first half of the channels, x in the second.
        assert_eq!(row(0)[..d / 2], row(grid - 1)[..d / 2]);
        assert_eq!(row(0)[d / 2..], row(grid * (grid - 1))[d / 2..]);
    }

    #[test]
    fn gradients_shared_among_threads_are_the_whole_batch_gradients() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = stream(2, dir.path()).next_batch(14).expect("batch");
        let cfg = ClipConfig::from_json(&files::config_json().to_string()).expect("config");
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = ClipModel::for_training(&cfg, vb.clone()).expect("model");
        let scale = vb
            .get_with_hints((), "logit_scale", candle_nn::Init::Const(2.0))
            .expect("scale");
        initialise(&varmap, 3, true).expect("initialise");
        let vars: Vec<Var> = varmap.all_vars();
        let side = cfg.vision.image_size;

        // The reference: one graph over the whole batch.
        let n = b.pool.len();
        let pixels = Tensor::from_slice(&b.pixels, (n, 3, side, side), &Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&b.ids, (n, b.ids.len() / n), &Device::Cpu).unwrap();
        let targets = Tensor::from_slice(&b.targets, (n, n), &Device::Cpu).unwrap();
        let img = l2n(&model.vision.forward(&pixels).unwrap()).unwrap();
        let txt = l2n(&model.text.forward(&ids, &b.pool).unwrap()).unwrap();
        let loss = contrastive_loss(&txt, &img, &scale, &targets).unwrap();
        let reference = loss.backward().unwrap();
        let want_loss = loss.to_scalar::<f32>().unwrap();

        // 14 scenes: one share, equal shares, and a short last share.
        for threads in [1, 2, 3] {
            let (got_loss, grads) = gradients(&model, &scale, &vars, &b, side, threads).unwrap();
            assert!(
                (got_loss - want_loss).abs() < 1e-5,
                "{threads}: {got_loss} vs {want_loss}"
            );
            for v in vars.iter().map(Var::as_tensor).chain([&scale]) {
                let want = reference.get(v).expect("reference gradient");
                let got = grads.get(v).expect("gradient");
                let err = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                let size = want.abs().unwrap().max_all().unwrap();
                let (err, size) = (
                    err.to_scalar::<f32>().unwrap(),
                    size.to_scalar::<f32>().unwrap(),
                );
                assert!(
                    err <= 1e-4 * size.max(1e-3),
                    "{threads} threads: {err} of {size}"
                );
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
