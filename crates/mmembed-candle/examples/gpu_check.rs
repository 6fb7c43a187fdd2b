//! Our side of `scripts/gpu-check.sh`: parity inputs in, embeddings out;
//! model-only and host-to-host throughput; the decode ceiling.
//!
//! ```text
//! gpu_check parity MODEL_DIR INPUTS_DIR OUT.safetensors [--device cuda] [--precision f32]
//!                  [--kernels auto|cuda|cublas|portable] (a GPU graph, e.g. on the CPU)
//! gpu_check speed MODEL_DIR [--device cuda] [--precisions f32,f16,bf16]
//!                 [--images 1,32,256,1024] [--texts 32,256] [--seconds 3]
//!                 [--kernels auto|cuda|cublas|portable] [--host true|false]
//!                 [--stack NAME]
//! gpu_check decode IMAGE_DIR [--model MODEL_DIR] [--seconds 3] [--draft false|true]
//! gpu_check families FIXTURES_DIR [--device cuda] [--precisions f32,f16,bf16]
//!                    [--kernels auto|cuda|cublas|portable]
//! ```
//!
//! `parity` reads `INPUTS_DIR/inputs.json` (texts and the token ids
//! Hugging Face's tokenizer gave them) and `INPUTS_DIR/pixels.safetensors`
//! (`pixel_values`, f32 `[n, 3, 224, 224]`, from Hugging Face's image
//! processor), checks our tokenizer gives the same ids (the CPU path), embeds
//! both with our model and writes the unit vectors as `text` and `image`,
//! then checks that the crops' bytes (what `mmembed batch` sends) become
//! the host's floats on the device, bit for bit.
//! `speed` prints one JSON line per measurement: model-only (inputs already on
//! the device, as PyTorch is timed) and, for images, the library's own calls
//! (host f32 pixels, or the crops' bytes as `mmembed batch` sends them, in;
//! unit vectors out: transfers included; `--host false` leaves those out).
//! Its lines name the stack `mmembed`, or `mmembed-cuda`,
//! `mmembed-cublas` or `mmembed-portable` for a graph chosen with
//! `--kernels`, or `--stack`'s name (a run under an environment variable
//! that swaps one of our CUDA kernels for the op before it). `decode`
//! times JPEG decoding and preprocessing on all cores, the host's ceiling
//! (`--draft true`: with `mmembed batch --jpeg-draft`'s reduced decoding).
//! `families` runs every tiny fixture model (`FIXTURES_DIR/tiny-*`: CLIP,
//! SigLIP, SigLIP 2 NaFlex, Chinese-CLIP, MobileCLIP's FastViT and ViT
//! towers) on the device against the PyTorch embeddings committed beside
//! it, one JSON line per model and precision: the families the seeded
//! ViT-B/32 leaves out.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use mmembed_candle::{DeviceSpec, Kernels, LoadedClip, Precision, local_files};
use rayon::prelude::*;

fn main() -> Result<()> {
    // As the `mmembed` CLI does, so that the decode ceiling and the model
    // timings see the allocator the batch job runs with.
    mmembed_candle::tune_malloc_for_inference();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args.split_first().context(USAGE)?;
    let (pos, flags) = split_flags(rest)?;
    let flag = |name: &str, default: &str| -> String {
        flags
            .iter()
            .find(|(k, _)| k == name)
            .map_or_else(|| default.to_string(), |(_, v)| v.clone())
    };
    match (cmd.as_str(), pos.as_slice()) {
        ("parity", [model, inputs, out]) => parity(
            Path::new(model),
            Path::new(inputs),
            Path::new(out),
            &flag("device", "cuda"),
            flag("precision", "f32")
                .parse()
                .map_err(anyhow::Error::msg)?,
            &flag("kernels", "auto"),
        ),
        ("speed", [model]) => speed(
            Path::new(model),
            &flag("device", "cuda"),
            &flag("precisions", "f32,f16,bf16"),
            &Workloads {
                images: numbers(&flag("images", "1,32,256,1024"))?,
                texts: numbers(&flag("texts", "32,256"))?,
                budget: seconds(&flag("seconds", "3"))?,
                kernels: flag("kernels", "auto"),
                host: flag("host", "true").parse().context("--host true|false")?,
                stack: flags
                    .iter()
                    .find(|(k, _)| k == "stack")
                    .map(|(_, v)| v.clone()),
            },
        ),
        ("decode", [dir]) => decode(
            Path::new(dir),
            flags
                .iter()
                .find(|(k, _)| k == "model")
                .map(|(_, v)| v.as_str()),
            seconds(&flag("seconds", "3"))?,
            flag("draft", "false")
                .parse()
                .context("--draft true|false")?,
        ),
        ("families", [fixtures]) => families(
            Path::new(fixtures),
            &flag("device", "cuda"),
            &flag("precisions", "f32,f16,bf16"),
            &flag("kernels", "auto"),
        ),
        _ => bail!(USAGE),
    }
}

const USAGE: &str = "usage: gpu_check parity MODEL INPUTS OUT | speed MODEL | decode DIR | \
     families FIXTURES (see the source's header)";

/// Positional arguments, and `--name value` pairs.
type Parsed = (Vec<String>, Vec<(String, String)>);

fn split_flags(args: &[String]) -> Result<Parsed> {
    let (mut pos, mut flags) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.strip_prefix("--") {
            Some(name) => {
                let v = it
                    .next()
                    .with_context(|| format!("--{name} needs a value"))?;
                flags.push((name.to_string(), v.clone()));
            }
            None => pos.push(a.clone()),
        }
    }
    Ok((pos, flags))
}

fn numbers(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.trim()
                .parse()
                .with_context(|| format!("not a number: {p}"))
        })
        .collect()
}

fn seconds(s: &str) -> Result<Duration> {
    Ok(Duration::from_secs_f64(s.parse().context("--seconds")?))
}

fn open(model: &Path, device: &str, precision: Precision, kernels: &str) -> Result<LoadedClip> {
    let device = device
        .parse::<DeviceSpec>()
        .map_err(anyhow::Error::msg)?
        .open()?;
    let kernels = match kernels {
        "auto" => Kernels::for_device(&device, precision),
        "cuda" => Kernels::Cuda,
        "cublas" => Kernels::Cublas,
        "portable" => Kernels::Portable,
        other => bail!("--kernels {other}: expected auto, cuda, cublas or portable"),
    };
    let files = local_files(model)?;
    Ok(LoadedClip::load_with_kernels(
        &files, &device, precision, kernels,
    )?)
}

fn parity(
    model: &Path,
    inputs: &Path,
    out: &Path,
    device: &str,
    precision: Precision,
    kernels: &str,
) -> Result<()> {
    let clip = open(model, device, precision, kernels)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(inputs.join("inputs.json"))?)?;
    let texts = meta["texts"].as_array().context("inputs.json: texts")?;
    let mut seqs = Vec::new();
    let mut mismatched = 0;
    for t in texts {
        let text = t["text"].as_str().context("text")?;
        let want: Vec<u32> = serde_json::from_value(t["ids"].clone())?;
        let ours = clip.tokenizer.encode(text)?;
        if ours != want {
            mismatched += 1;
            eprintln!("token ids differ for {text:?}: ours {ours:?}, theirs {want:?}");
        }
        seqs.push(want);
    }
    let px = candle_core::safetensors::load(inputs.join("pixels.safetensors"), &Device::Cpu)?;
    let px = px
        .get("pixel_values")
        .context("pixels.safetensors: pixel_values")?;
    let n = px.dim(0)?;
    let images: Vec<Vec<f32>> = (0..n)
        .map(|i| px.get(i)?.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let text = clip.embed_token_ids(&seqs)?;
    let image = clip.embed_pixels(&images)?;
    let to_tensor = |rows: Vec<Vec<f32>>| -> candle_core::Result<Tensor> {
        let (r, c) = (rows.len(), rows.first().map_or(0, Vec::len));
        Tensor::from_vec(rows.concat(), (r, c), &Device::Cpu)
    };
    candle_core::safetensors::save(
        &[("text", to_tensor(text)?), ("image", to_tensor(image)?)]
            .into_iter()
            .collect(),
        out,
    )?;
    println!(
        "{}",
        serde_json::json!({
            "check": "parity", "precision": format!("{precision:?}").to_lowercase(),
            "texts": texts.len(), "images": n, "token_id_mismatches": mismatched,
        })
    );
    if mismatched > 0 {
        bail!("{mismatched} texts tokenised differently");
    }
    u8_pixels(&clip, precision)
}

/// The floor for any one embedding's cosine to PyTorch's f32, and for
/// their mean, per precision: `tests/parity.rs`'s bars on the CPU (bf16's
/// single worst at 0.997: the fixtures' 16-dimensional text embeddings
/// magnify its 8-bit mantissa, PyTorch's own bf16 reaches 0.9979 there).
fn bars(precision: Precision) -> (f64, f64, f64) {
    match precision {
        // (texts, images, mean)
        Precision::F32 => (0.99999, 0.9999, 0.9999),
        Precision::Bf16 => (0.997, 0.997, 0.999),
        _ => (0.999, 0.999, 0.999),
    }
}

/// Every `FIXTURES/tiny-*` model with a committed reference, in each of
/// `precisions` on `device`: the reference texts' token ids and the
/// fixture photos (decoded and preprocessed on the host, as `mmembed
/// batch` does) against PyTorch's f32 embeddings from
/// `models/fixtures/make_fixtures.py`. Fails if any misses [`bars`] or
/// does not load.
fn families(fixtures: &Path, device: &str, precisions: &str, kernels: &str) -> Result<()> {
    let mut models: Vec<PathBuf> = std::fs::read_dir(fixtures)
        .with_context(|| format!("reading {}", fixtures.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tiny-"))
                && p.join("reference.safetensors").exists()
        })
        .collect();
    models.sort();
    if models.is_empty() {
        bail!(
            "no tiny-* fixture with a reference in {}",
            fixtures.display()
        );
    }
    let mut failed = Vec::new();
    for dir in &models {
        let name = dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        for p in precisions.split(',').filter(|p| !p.is_empty()) {
            let precision: Precision = p.parse().map_err(anyhow::Error::msg)?;
            let line = |fields: serde_json::Value| {
                let mut v = serde_json::json!({"check": "family", "model": name, "precision": p});
                v.as_object_mut()
                    .expect("an object")
                    .extend(fields.as_object().cloned().unwrap_or_default());
                println!("{v}");
            };
            match family(dir, &fixtures.join("images"), device, precision, kernels) {
                Ok((text_min, image_min, mean, n)) => {
                    let (t, i, m) = bars(precision);
                    let pass = f64::from(text_min) >= t
                        && f64::from(image_min) >= i
                        && f64::from(mean) >= m;
                    line(serde_json::json!({
                        "embeddings": n, "text_min": text_min, "image_min": image_min,
                        "mean": mean, "bars": [t, i, m], "pass": pass,
                    }));
                    if !pass {
                        failed.push(format!("{name} {p}"));
                    }
                }
                Err(e) => {
                    line(serde_json::json!({"error": format!("{e:#}"), "pass": false}));
                    failed.push(format!("{name} {p}"));
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("below the bar or failed: {}", failed.join(", "));
    }
    Ok(())
}

/// One fixture in one precision: (min text cosine, min image cosine, mean
/// cosine, embeddings compared).
fn family(
    dir: &Path,
    images: &Path,
    device: &str,
    precision: Precision,
    kernels: &str,
) -> Result<(f32, f32, f32, usize)> {
    let clip = open(dir, device, precision, kernels)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let refs = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
    let reference = |key: &str| -> Result<Vec<f32>> {
        let mut v = refs
            .get(key)
            .with_context(|| format!("reference.safetensors: {key}"))?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        mmembed_core::l2_normalize(&mut v);
        Ok(v)
    };
    let texts = meta["texts"].as_array().context("reference.json: texts")?;
    let seqs = texts
        .iter()
        .map(|t| serde_json::from_value::<Vec<u32>>(t["ids"].clone()))
        .collect::<serde_json::Result<Vec<_>>>()?;
    let mut cosines = Vec::new();
    let mut text_min = 1f32;
    for (i, got) in clip.embed_token_ids(&seqs)?.iter().enumerate() {
        let c = mmembed_core::cosine(got, &reference(&format!("text.{i}"))?);
        text_min = text_min.min(c);
        cosines.push(c);
    }
    let photos = meta["images"]
        .as_array()
        .context("reference.json: images")?;
    // The images as the embedder's batches carry them (each model's own
    // sizes: SigLIP 2 NaFlex's vary per image).
    let row = clip.pixels_per_image();
    let (mut buf, mut sizes) = (vec![0u8; photos.len() * row], Vec::new());
    for (im, slot) in photos.iter().zip(buf.chunks_mut(row.max(1))) {
        let file = im["file"].as_str().context("image file")?;
        let bytes = std::fs::read(images.join(file))?;
        let limits = mmembed_media::ImageLimits::default();
        // From the bytes, as the embedder decodes them (open_clip's models
        // resize a transparent image with its alpha).
        sizes.push(clip.preprocessor.decode_resize_into(
            &bytes,
            file,
            &limits,
            mmembed_media::Draft::NONE,
            slot,
        )?);
    }
    let mut image_min = 1f32;
    for (im, got) in photos.iter().zip(clip.embed_u8_images(&buf, &sizes)?) {
        let key = im["key"].as_str().context("image key")?;
        let c = mmembed_core::cosine(&got, &reference(&format!("image.{key}"))?);
        image_min = image_min.min(c);
        cosines.push(c);
    }
    let mean = cosines.iter().sum::<f32>() / cosines.len().max(1) as f32;
    Ok((text_min, image_min, mean, cosines.len()))
}

/// `n` crops' bytes (every byte value, in every channel and position),
/// and the first `k` of them normalised on the host: what the device's
/// normalisation is checked against.
fn crops(clip: &LoadedClip, n: usize, k: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    let len = clip.pixels_per_image();
    let hwc: Vec<u8> = (0..n * len).map(|i| (i * 7 + i / 3) as u8).collect();
    let mut host = vec![0f32; k * len];
    for (dst, src) in host.chunks_mut(len).zip(hwc.chunks(len)) {
        clip.preprocessor
            .normalize_hwc_into(src, dst)
            .map_err(anyhow::Error::msg)?;
    }
    Ok((hwc, host))
}

/// What `mmembed batch` sends the model, the crops' bytes, normalised on
/// the device (on CUDA by our kernel): the model's input must be the
/// host's floats rounded once to its dtype, bit for bit, or the parity
/// step fails (and the script falls back to the graph before ours).
fn u8_pixels(clip: &LoadedClip, precision: Precision) -> Result<()> {
    let (k, len) = (8, clip.pixels_per_image());
    let (hwc, host) = crops(clip, k, k)?;
    let f32s = |t: Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let want = f32s(Tensor::from_vec(host, k * len, &Device::Cpu)?.to_dtype(clip.dtype)?)?;
    let line = |fields: serde_json::Value| {
        let mut v = serde_json::json!({
            "check": "u8_pixels", "precision": format!("{precision:?}").to_lowercase(),
            "graph": format!("{:?}", clip.kernels).to_lowercase(), "values": want.len(),
        });
        v.as_object_mut()
            .expect("an object")
            .extend(fields.as_object().cloned().unwrap_or_default());
        println!("{v}");
    };
    // An error is every value differing, so that the script falls back.
    let got = match clip
        .pixels_from_u8_rows(&hwc, k)
        .map_err(anyhow::Error::from)
        .and_then(f32s)
    {
        Ok(got) => got,
        Err(e) => {
            line(serde_json::json!({"differ": want.len(), "error": e.to_string()}));
            return Err(e.context("normalising the crops' bytes on the device"));
        }
    };
    let differ = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let max_abs_diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    line(serde_json::json!({"differ": differ, "max_abs_diff": max_abs_diff}));
    if differ > 0 || got.len() != want.len() {
        bail!(
            "the crops' bytes normalised on the device differ from the host's floats in {differ} of \
             {} values (max abs diff {max_abs_diff:e})",
            want.len()
        );
    }
    Ok(())
}

/// Runs `f` until `budget` has passed (at least 3 times after 2 warm-up
/// runs), synchronising the device only around the timed run so queued
/// kernels overlap as they would in a job. Returns seconds per call.
fn time(dev: &Device, budget: Duration, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    f()?;
    dev.synchronize()?;
    let one = t.elapsed().as_secs_f64().max(1e-6);
    let n = ((budget.as_secs_f64() / one) as usize).clamp(3, 100_000);
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / n as f64)
}

/// What `speed` times, and on which graph.
struct Workloads {
    /// Image batch sizes.
    images: Vec<usize>,
    /// Text batch sizes.
    texts: Vec<usize>,
    /// Seconds per measurement.
    budget: Duration,
    kernels: String,
    /// Also the library's calls from host memory.
    host: bool,
    /// The lines' stack name, if not the graph's.
    stack: Option<String>,
}

fn speed(model: &Path, device: &str, precisions: &str, w: &Workloads) -> Result<()> {
    let Workloads {
        images,
        texts,
        budget,
        kernels,
        host,
        stack,
    } = w;
    let (budget, host, kernels) = (*budget, *host, kernels.as_str());
    let stack = match (stack, kernels) {
        (Some(name), _) => name.clone(),
        (None, "auto") => "mmembed".to_string(),
        (None, k) => format!("mmembed-{k}"),
    };
    for p in precisions.split(',').filter(|p| !p.is_empty()) {
        let precision: Precision = p.parse().map_err(anyhow::Error::msg)?;
        let clip = open(model, device, precision, kernels)?;
        let dev = clip.device.clone();
        let side = clip.config.vision.image_size;
        let report = |workload: &str, batch: usize, secs: f64| {
            println!(
                "{}",
                serde_json::json!({
                    "stack": stack, "precision": p, "workload": workload,
                    "batch": batch, "ms": secs * 1e3, "per_s": batch as f64 / secs,
                })
            );
        };
        for &b in images {
            let px = Tensor::randn(0f32, 1.0, (b, 3, side, side), &dev)?.to_dtype(clip.dtype)?;
            let secs = time(&dev, budget, || {
                clip.model.vision.forward(&px)?;
                Ok(())
            })?;
            report("images", b, secs);
        }
        // The library's call: host pixels up, unit vectors down.
        if let (Some(&b), true) = (images.iter().max(), host) {
            let host: Vec<Vec<f32>> = (0..b)
                .map(|i| vec![(i % 7) as f32 * 0.1; 3 * side * side])
                .collect();
            let secs = time(&dev, budget, || {
                clip.embed_pixels(&host)?;
                Ok(())
            })?;
            report("images_from_host", b, secs);
            // What `mmembed batch` sends: the crops' bytes, normalised on
            // the device. First a check that the device's normalisation
            // gives the host's vectors (the CPU test holds it bit for bit
            // there; here the GPU's kernels do it).
            let len = clip.pixels_per_image();
            let k = b.min(8);
            let (hwc, flat) = crops(&clip, b, k)?;
            let (a, f) = (
                clip.embed_u8_rows(&hwc[..k * len], k)?,
                clip.embed_pixel_rows(&flat, k)?,
            );
            let diff = a
                .iter()
                .flatten()
                .zip(f.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            println!(
                "{}",
                serde_json::json!({
                    "stack": stack, "precision": p, "workload": "u8_vs_f32_rows",
                    "batch": k, "max_abs_diff": diff,
                })
            );
            let secs = time(&dev, budget, || {
                clip.embed_u8_rows(&hwc, b)?;
                Ok(())
            })?;
            report("images_from_host_u8", b, secs);
        }
        let t = clip.config.text.max_position_embeddings;
        let vocab = clip.config.text.vocab_size as u32;
        let eos = clip.tokenizer.eos_id();
        for &b in texts {
            // Full-length rows ending in end-of-text, as PyTorch is fed.
            let ids: Vec<u32> = (0..b * t)
                .map(|i| {
                    if i % t == t - 1 {
                        eos
                    } else {
                        (i as u32 * 7919) % (vocab - 2)
                    }
                })
                .collect();
            let ids = Tensor::from_vec(ids, (b, t), &dev)?;
            let pool = vec![t - 1; b];
            let secs = time(&dev, budget, || {
                clip.model.text.forward(&ids, &pool)?;
                Ok(())
            })?;
            report(&format!("texts{t}"), b, secs);
        }
        drop(clip);
    }
    Ok(())
}

fn decode(dir: &Path, model: Option<&str>, budget: Duration, draft: bool) -> Result<()> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg" || e == "jpeg"))
        .collect();
    if files.is_empty() {
        bail!("no .jpg files in {}", dir.display());
    }
    // The preprocessing of the model that will be run (CLIP's by default).
    let Some(model) = model else {
        bail!("decode needs --model (for its preprocessor_config.json)")
    };
    let pre = mmembed_media::ClipPreprocessor::from_file(
        &Path::new(model).join("preprocessor_config.json"),
    )?;
    let limits = mmembed_media::ImageLimits::default();
    let (h, w) = pre.output_size();
    let len = 3 * (h * w) as usize;
    let run = |files: &[PathBuf]| -> Result<usize> {
        files
            .par_iter()
            // Into a buffer reused per task, as the backend fills its batch
            // buffers with the crops' bytes (the model normalises them).
            .map_init(
                || vec![0u8; len],
                |buf, f| -> Result<usize> {
                    let bytes = std::fs::read(f)?;
                    // As the backend decodes with and without --jpeg-draft.
                    let draft = mmembed_media::Draft {
                        jpeg: draft,
                        heic_thumbnail: false,
                    };
                    pre.decode_crop_into(&bytes, &f.display().to_string(), &limits, draft, buf)?;
                    Ok(buf.len())
                },
            )
            .try_reduce(|| 0, |a, b| Ok(a + b))
    };
    run(&files[..files.len().min(64)])?;
    let t = Instant::now();
    let mut done = 0;
    while t.elapsed() < budget || done == 0 {
        run(&files)?;
        done += files.len();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "stack": "mmembed", "workload": if draft { "decode_preprocess_draft" } else { "decode_preprocess" },
            "threads": rayon::current_num_threads(),
            "files": files.len(), "per_s": done as f64 / secs,
        })
    );
    Ok(())
}
