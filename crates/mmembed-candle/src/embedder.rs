//! The local backend: a CLIP checkpoint behind the [`Embedder`] trait.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mmembed_core::{
    EmbedError, EmbedRequest, Embedder, EmbedderInfo, Embeddings, MediaSource, Modality,
    SegmentEmbedding, SpaceId, async_trait, l2_normalize,
};
use mmembed_media::{ClipPreprocessor, ImageLimits, read_media};
use tokio::sync::oneshot;

use crate::config::ClipConfig;
use crate::device::{DeviceSpec, Precision};
use crate::hub::{HubOptions, ModelFiles, hub_files, local_files};
use crate::manifest::Manifest;
use crate::model::ClipModel;
use crate::model::Kernels;
use crate::tokenizer::ClipTokenizer;

const BACKEND: &str = "local";

/// The default model batch on the CPU, the batch the CPU benchmarks
/// measure (BENCHMARKS.md): larger batches add latency there, not speed.
pub const CPU_MAX_BATCH: usize = 32;

/// The default model batch on GPUs: 256 images of ViT-B/32 are 12,800
/// token rows per GEMM, enough to occupy a large GPU's SMs, while one
/// batch's host buffer stays at 38.5 MB of crops (154 MB once normalised
/// to f32 on the device). A starting point:
/// `scripts/gpu-check.sh` measures batches 32 to 1024 on a real GPU.
pub const GPU_MAX_BATCH: usize = 256;

/// How to build a [`LocalEmbedder`].
///
/// ```
/// use mmembed_candle::{LocalOptions, DeviceSpec};
/// let opts = LocalOptions::new("openai/clip-vit-base-patch32")
///     .with_device(DeviceSpec::Cpu)
///     .with_max_batch(16);
/// assert_eq!(opts.max_batch, Some(16));
/// ```
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// `mmembed/demo` (or `demo`: the bundled demo model, see
    /// [`crate::DEMO_MODEL_ID`]), a checkpoint directory, a built-in
    /// manifest id, or a hub repository (`owner/name` or `owner/name@revision`).
    pub model: String,
    /// Where to run.
    pub device: DeviceSpec,
    /// Weight/activation precision (f32 on CPU).
    pub precision: Precision,
    /// Most texts or images per forward pass; `None` (the default) picks
    /// the device's: [`CPU_MAX_BATCH`] on the CPU, [`GPU_MAX_BATCH`] on GPUs.
    pub max_batch: Option<usize>,
    /// Image decoding limits.
    pub image_limits: ImageLimits,
    /// Decode JPEGs reduced by 2, 4 or 8 when that still covers the
    /// model's resize, as Pillow's `Image.draft` does (default false):
    /// faster, the more so the larger the photos, at the price of inputs
    /// about a level off the exact decode's on average. See
    /// [`mmembed_media::decode_image_draft`].
    pub jpeg_draft: bool,
    /// Decode HEIC photos as their embedded thumbnail when one covers the
    /// model's resize, as pillow-heif's `Image.draft` does (default
    /// false): a phone photo's second of HEVC decoding becomes
    /// milliseconds, but the thumbnail is its encoder's downscaled and
    /// recompressed copy, so inputs differ from the photo's by several
    /// levels. See [`mmembed_media::decode_image_draft`].
    pub heic_thumbnail: bool,
    /// Hub access (default: from the environment).
    pub hub: HubOptions,
    /// Overrides the space id (default: the manifest's, else a hash of the weights).
    pub space: Option<String>,
    /// Video frames sampled per second of each segment (default 1, at most
    /// 1000; at least one frame per segment whatever the rate).
    pub video_fps: f64,
    /// Take the keyframe nearest each sample time instead of the exact
    /// frame (default false): only keyframes are decoded, several times
    /// faster, at the price of frames up to half a keyframe interval away
    /// from their time. See `mmembed_media::video::SampleMode`.
    pub video_keyframes_only: bool,
    /// Largest video read from an object store, in bytes (default 2 GiB).
    /// Remote videos are held in memory while they are embedded; local
    /// files are read by FFmpeg from disk whatever their size.
    pub max_video_bytes: u64,
    /// SigLIP 2 NaFlex: the most patches an image is resized into (1 to
    /// 16,384; default: the checkpoint's `max_num_patches`, 256 on the
    /// hub's), as transformers' processor takes `max_num_patches`. More
    /// patches see finer detail and cost more (attention grows with their
    /// square); the learned positions are resized to any grid. An error
    /// for a model of one image size.
    pub max_patches: Option<u32>,
}

impl LocalOptions {
    /// Options for `model` with defaults: auto device, f32, the device's
    /// batch size, hub settings from the environment.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            device: DeviceSpec::Auto,
            precision: Precision::F32,
            max_batch: None,
            image_limits: ImageLimits::default(),
            jpeg_draft: false,
            heic_thumbnail: false,
            hub: HubOptions::from_env(),
            space: None,
            video_fps: 1.0,
            video_keyframes_only: false,
            max_video_bytes: 2 << 30,
            max_patches: None,
        }
    }

    /// Sets a SigLIP 2 NaFlex model's patch budget (see
    /// [`LocalOptions::max_patches`]).
    pub fn with_max_patches(mut self, patches: u32) -> Self {
        self.max_patches = Some(patches);
        self
    }

    /// Sets the largest video read from an object store.
    pub fn with_max_video_bytes(mut self, bytes: u64) -> Self {
        self.max_video_bytes = bytes;
        self
    }

    /// Samples only keyframes (see [`LocalOptions::video_keyframes_only`]).
    pub fn with_video_keyframes_only(mut self, yes: bool) -> Self {
        self.video_keyframes_only = yes;
        self
    }

    /// Sets the video sampling rate in frames per second (above 0, at most
    /// 1000).
    pub fn with_video_fps(mut self, fps: f64) -> Self {
        self.video_fps = fps;
        self
    }

    /// Sets the device.
    pub fn with_device(mut self, device: DeviceSpec) -> Self {
        self.device = device;
        self
    }

    /// Sets the precision.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Sets the largest model batch (at least 1).
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = Some(max_batch.max(1));
        self
    }

    /// Sets the hub options.
    pub fn with_hub(mut self, hub: HubOptions) -> Self {
        self.hub = hub;
        self
    }

    /// Decodes JPEGs reduced where the model's resize allows (see
    /// [`LocalOptions::jpeg_draft`]).
    pub fn with_jpeg_draft(mut self, yes: bool) -> Self {
        self.jpeg_draft = yes;
        self
    }

    /// Decodes HEIC photos as their embedded thumbnails where the model's
    /// resize allows (see [`LocalOptions::heic_thumbnail`]).
    pub fn with_heic_thumbnail(mut self, yes: bool) -> Self {
        self.heic_thumbnail = yes;
        self
    }

    /// Sets the image limits.
    pub fn with_image_limits(mut self, limits: ImageLimits) -> Self {
        self.image_limits = limits;
        self
    }

    /// Overrides the space id.
    pub fn with_space(mut self, space: impl Into<String>) -> Self {
        self.space = Some(space.into());
        self
    }
}

/// Where a model's files come from, and the identity that follows.
fn locate(opts: &LocalOptions) -> Result<(ModelFiles, Option<String>), EmbedError> {
    if crate::demo::is_demo(&opts.model) {
        let dir = crate::demo::demo_model_dir(&crate::demo::cache_dir())?;
        return Ok((local_files(&dir)?, None));
    }
    let path = Path::new(&opts.model);
    if path.is_dir() {
        return Ok((local_files(path)?, None));
    }
    if let Some(m) = Manifest::find(&opts.model) {
        return Ok((hub_files(&m.repo, &m.revision, &opts.hub)?, Some(m.space)));
    }
    let (repo, rev) = opts
        .model
        .split_once('@')
        .unwrap_or((opts.model.as_str(), "main"));
    let looks_like_repo = repo.split('/').count() == 2
        && repo.split('/').all(|p| !p.is_empty())
        && !opts.model.starts_with('.')
        && !opts.model.starts_with('/');
    if !looks_like_repo {
        return Err(EmbedError::ModelLoad {
            model: opts.model.clone(),
            reason: "not a checkpoint directory, a built-in model id or a hub repository \
                     (owner/name[@revision])"
                .into(),
            source: None,
        });
    }
    Ok((hub_files(repo, rev, &opts.hub)?, None))
}

/// A hash of the weights, for a space id that follows the weights wherever
/// they are loaded from. BLAKE3 rather than SHA-256: measured on ViT-B/32's
/// 605 MB here, SHA-256 added 1.5 s to every load, BLAKE3 a fraction of that.
fn weights_space(files: &ModelFiles) -> Result<String, EmbedError> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for w in &files.weights {
        let read_err = |e: std::io::Error| EmbedError::ModelLoad {
            model: w.display().to_string(),
            reason: "cannot read weights".into(),
            source: Some(Arc::new(e)),
        };
        let mut f = std::fs::File::open(w).map_err(read_err)?;
        loop {
            let n = f.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    let hex = h.finalize().to_hex();
    Ok(format!("clip-blake3:{}", &hex[..16]))
}

/// A loaded checkpoint: model, tokenizer and preprocessing, on one device.
pub struct LoadedClip {
    /// The network.
    pub model: ClipModel,
    /// Its tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Its image preprocessing.
    pub preprocessor: ClipPreprocessor,
    /// Its architecture.
    pub config: ClipConfig,
    /// The device it runs on.
    pub device: Device,
    /// The dtype it computes in.
    pub dtype: DType,
    /// The kernels its forward pass runs on.
    pub kernels: Kernels,
}

impl fmt::Debug for LoadedClip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedClip")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("kernels", &self.kernels)
            .finish_non_exhaustive()
    }
}

impl LoadedClip {
    /// Loads a checkpoint's files: config, tokenizer, preprocessor, and the
    /// weights, read tensor by tensor (peak memory about the weights' size).
    /// [`Precision::Int8`] quantises the encoder layers while loading.
    pub fn load(
        files: &ModelFiles,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, EmbedError> {
        Self::load_with_kernels(
            files,
            device,
            precision,
            Kernels::for_device(device, precision),
        )
    }

    /// [`LoadedClip::load`] on a chosen kernel set, e.g. the GPU's
    /// [`Kernels::Portable`] on the CPU to check it against references.
    /// With those kernels the CPU also takes f16 and bf16 (refused by
    /// [`LoadedClip::load`] there, where they would only be slow): so the
    /// GPU's half-precision graphs run, and are tested, without a GPU.
    pub fn load_with_kernels(
        files: &ModelFiles,
        device: &Device,
        precision: Precision,
        kernels: Kernels,
    ) -> Result<Self, EmbedError> {
        let dtype = match precision {
            Precision::F16 if kernels.gpu_graph() && device.is_cpu() => DType::F16,
            Precision::Bf16 if kernels.gpu_graph() && device.is_cpu() => DType::BF16,
            _ => precision.dtype_for(device)?,
        };
        let model_name = files
            .config
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            .display()
            .to_string();
        let err = |reason: String| EmbedError::ModelLoad {
            model: model_name.clone(),
            reason,
            source: None,
        };
        let open_clip = files
            .config
            .file_name()
            .is_some_and(|n| n == crate::hub::OPEN_CLIP_CONFIG);
        let config_name = if open_clip {
            crate::hub::OPEN_CLIP_CONFIG
        } else {
            "config.json"
        };
        let config_text = std::fs::read_to_string(&files.config)
            .map_err(|e| err(format!("cannot read {config_name}: {e}")))?;
        let config = if open_clip {
            ClipConfig::from_open_clip_json(&config_text)
        } else {
            ClipConfig::from_json(&config_text)
        }
        .map_err(|e| err(format!("{config_name}: {e}")))?;
        let tokenizer = ClipTokenizer::for_config(&files.tokenizer, &config)?;
        let preprocessor = if open_clip {
            ClipPreprocessor::from_open_clip_json(&config_text).map_err(|e| match e {
                EmbedError::ModelLoad { reason, .. } => err(reason),
                other => other,
            })?
        } else {
            ClipPreprocessor::from_file(&files.preprocessor)?
        };
        let (h, w) = preprocessor.output_size();
        let side = config.vision.image_size as u32;
        let naflex = match preprocessor.resize {
            Some(mmembed_media::ResizeTarget::Patches { patch, .. }) => Some(patch),
            _ => None,
        };
        if naflex.is_some() != config.vision.naflex_grid.is_some() {
            return Err(err(if naflex.is_some() {
                "preprocessor_config.json is SigLIP 2 NaFlex's (Siglip2ImageProcessor), \
                 config.json's model is not (model_type `siglip2`)"
                    .into()
            } else {
                "config.json is SigLIP 2 NaFlex's (model_type `siglip2`), \
                 preprocessor_config.json is not (Siglip2ImageProcessor)"
                    .into()
            }));
        }
        if let Some(patch) = naflex {
            if patch as usize != config.vision.patch_size {
                return Err(err(format!(
                    "preprocessor_config.json cuts patches of {patch} pixels, the vision tower \
                     takes {}",
                    config.vision.patch_size
                )));
            }
        } else if (h, w) != (side, side) {
            return Err(err(format!(
                "preprocessor_config.json makes {h}x{w} images but the vision tower expects \
                 {side}x{side}"
            )));
        }
        let weights = crate::weights::SafetensorsFiles::open(&files.weights)
            .map_err(|e| err(format!("cannot read the weights: {e}")))?;
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = if open_clip {
            Box::new(crate::weights::OpenClipNames(Box::new(weights)))
        } else {
            Box::new(weights)
        };
        let vb = VarBuilder::from_backend(backend, dtype, device.clone());
        let model = ClipModel::with_kernels(&config, kernels, vb)
            .map_err(|e| err(format!("the weights do not match {config_name}: {e}")))?;
        crate::malloc::return_freed_pages();
        Ok(Self {
            model,
            tokenizer,
            preprocessor,
            config,
            device: device.clone(),
            dtype,
            kernels,
        })
    }

    /// Unit-length text embeddings for a batch of token id sequences.
    pub fn embed_token_ids(&self, seqs: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        self.on_pool(|| {
            let batch = self.tokenizer.batch(seqs);
            let ids = Tensor::from_vec(batch.ids, (seqs.len(), batch.len), &self.device)?;
            let out = self
                .model
                .text
                .forward_padded(&ids, &batch.pool, Some(&batch.lens))?;
            rows(&out)
        })
    }

    /// Runs a CPU forward pass on one of rayon's worker threads. Each of
    /// its parallel ops is then forked from inside the pool, where the
    /// calling worker takes a share of the work and the others are still
    /// spinning from the op before; called from any other thread, every
    /// op is a hand-off to the pool and a sleep until it is done (~70 per
    /// ViT-B/32 forward).
    fn on_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            rayon::scope(|_| f())
        } else {
            f()
        }
    }

    /// Refuses a model whose images vary in size (NaFlex) in the entry
    /// points that take one size.
    fn one_size(&self) -> candle_core::Result<()> {
        if self.config.vision.naflex_grid.is_some() {
            candle_core::bail!(
                "a NaFlex model takes images of varying sizes: use embed_u8_images \
                 (or LocalEmbedder), not the entry points for one fixed size"
            );
        }
        Ok(())
    }

    /// Unit-length image embeddings for preprocessed CHW pixel buffers.
    pub fn embed_pixels(&self, images: &[Vec<f32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        use rayon::prelude::*;
        self.one_size()?;
        let len = self.pixels_per_image();
        if let Some(bad) = images.iter().position(|i| i.len() != len) {
            candle_core::bail!(
                "image {bad} has {} values, the model takes {len}",
                images[bad].len()
            );
        }
        if images.is_empty() {
            return Ok(Vec::new());
        }
        self.on_pool(|| {
            // One batch is large (ViT-B/32 at 256 images: 154 MB of f32),
            // and gathering it on one thread costs as much as a GPU's
            // forward pass: copied in parallel instead.
            let mut flat = vec![0f32; images.len() * len];
            flat.par_chunks_mut(len.max(1))
                .zip(images.par_iter())
                .for_each(|(dst, src)| dst.copy_from_slice(src));
            let px = Tensor::from_vec(flat, self.pixel_shape(images.len()), &self.device)?;
            self.forward_pixels(px)
        })
    }

    /// [`embed_pixels`](Self::embed_pixels) for `n` images already laid
    /// out one after another in `flat` (each
    /// [`pixels_per_image`](Self::pixels_per_image) values), e.g. a batch
    /// buffer that is filled and reused: on a GPU the pixels are copied
    /// straight from it to the device.
    pub fn embed_pixel_rows(&self, flat: &[f32], n: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        self.one_size()?;
        let len = self.pixels_per_image();
        if flat.len() != n * len {
            candle_core::bail!(
                "{} values for {n} images, the model takes {len} per image",
                flat.len()
            );
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        self.on_pool(|| {
            let px = Tensor::from_slice(flat, self.pixel_shape(n), &self.device)?;
            self.forward_pixels(px)
        })
    }

    /// Unit-length image embeddings for `n` resized and cropped images
    /// given as their RGB bytes (`side × side × 3` each, row-major, the
    /// channels interleaved: [`ClipPreprocessor::resize_and_crop`]'s
    /// output), one after another in `hwc`. This is what the embedder's
    /// batches take: a quarter of the f32 pixels' bytes to hold and, on a
    /// GPU, to copy to the device (38.5 MB instead of 154 MB for 256
    /// ViT-B/32 images), where they are normalised. The floats are the same
    /// as [`ClipPreprocessor::normalize_u8`]'s on every device.
    pub fn embed_u8_rows(&self, hwc: &[u8], n: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        // One hop onto the pool on the CPU for the normalisation and the
        // forward pass (the input is made, and freed, on a worker, as the
        // model's activations are).
        self.on_pool(|| {
            // (Checked before the empty case: bytes for no images are an error.)
            let px = self.pixels_from_u8_rows(hwc, n)?;
            if n == 0 {
                return Ok(Vec::new());
            }
            self.forward_pixels(px)
        })
    }

    /// The vision tower's input for `n` crops' bytes laid out as
    /// [`embed_u8_rows`](Self::embed_u8_rows) takes them: `(n, 3, side,
    /// side)` in the model's dtype on its device, the floats of
    /// [`ClipPreprocessor::normalize_hwc_into`] (rounded once to the
    /// dtype). On the CPU they are normalised on the host, in parallel; on
    /// a GPU the bytes are copied and normalised there (on CUDA by one
    /// kernel of ours, elsewhere by candle's tensor ops).
    pub fn pixels_from_u8_rows(&self, hwc: &[u8], n: usize) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        self.one_size()?;
        let len = self.pixels_per_image();
        if self.config.vision.num_channels != 3 || hwc.len() != n * len {
            candle_core::bail!(
                "{} bytes for {n} images, the model takes {len} per image ({} channels)",
                hwc.len(),
                self.config.vision.num_channels
            );
        }
        if !self.device.is_cpu() {
            let side = self.config.vision.image_size;
            let pre = &self.preprocessor;
            return crate::pixels::from_u8_rows(
                hwc,
                n,
                side,
                pre,
                &self.device,
                self.dtype,
                self.kernels,
            );
        }
        // Normalised in parallel straight into the model's input (one
        // buffer, which the tensor then owns).
        let mut flat = vec![0f32; n * len];
        self.on_pool(|| {
            flat.par_chunks_mut(len.max(1))
                .zip(hwc.par_chunks(len.max(1)))
                .try_for_each(|(dst, src)| self.preprocessor.normalize_hwc_into(src, dst))
        })
        .map_err(candle_core::Error::msg)?;
        Tensor::from_vec(flat, self.pixel_shape(n), &self.device)?.to_dtype(self.dtype)
    }

    /// Floats of one preprocessed image: channels × side × side; for a
    /// NaFlex model, of its largest (its patch budget's pixels).
    pub fn pixels_per_image(&self) -> usize {
        if self.config.vision.naflex_grid.is_some() {
            let most = self.preprocessor.max_output_pixels().unwrap_or(0);
            return self.config.vision.num_channels * most as usize;
        }
        let side = self.config.vision.image_size;
        self.config.vision.num_channels * side * side
    }

    /// Unit-length image embeddings for images of any size the model's
    /// preprocessing makes: image `i`'s RGB bytes (`sizes[i]` = `(width,
    /// height)`, row-major, the channels interleaved, as
    /// [`ClipPreprocessor::decode_resize_into`] writes them) at the start of
    /// its row of [`pixels_per_image`](Self::pixels_per_image) bytes in
    /// `buf`. For a model of one size this is
    /// [`embed_u8_rows`](Self::embed_u8_rows) (every size must be it); a
    /// NaFlex model ([`crate::VisionConfig::naflex_grid`]) runs the images
    /// of each grid of patches as one batch, unpadded. As for one size, the
    /// CPU normalises on the host and a GPU is sent the bytes and
    /// normalises there, to the same floats.
    ///
    /// [`ClipPreprocessor::decode_resize_into`]: mmembed_media::ClipPreprocessor::decode_resize_into
    pub fn embed_u8_images(
        &self,
        buf: &[u8],
        sizes: &[(u32, u32)],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        use rayon::prelude::*;
        let n = sizes.len();
        let row = self.pixels_per_image();
        if buf.len() != n * row {
            candle_core::bail!(
                "{} bytes for {n} images, the model takes rows of {row}",
                buf.len()
            );
        }
        if self.config.vision.naflex_grid.is_none() {
            let side = self.config.vision.image_size as u32;
            if let Some((w, h)) = sizes.iter().find(|s| **s != (side, side)) {
                candle_core::bail!("a {w}x{h} image; the model takes {side}x{side}");
            }
            return self.embed_u8_rows(buf, n);
        }
        let p = self.config.vision.patch_size;
        let most = row / (3 * p * p).max(1);
        // The images of each grid, in order.
        let mut grids: std::collections::BTreeMap<(usize, usize), Vec<usize>> =
            std::collections::BTreeMap::new();
        for (i, &(w, h)) in sizes.iter().enumerate() {
            let (w, h) = (w as usize, h as usize);
            let (gw, gh) = (w / p, h / p);
            if w % p != 0 || h % p != 0 || gw * gh == 0 || gw * gh > most {
                candle_core::bail!(
                    "image {i} is {w}x{h}: not a grid of at most {most} patches of {p} pixels"
                );
            }
            grids.entry((gh, gw)).or_default().push(i);
        }
        let scale = self.preprocessor.rescale_factor.unwrap_or(1.0);
        let (mean, std) = self.preprocessor.normalize_stats();
        let mut out = vec![Vec::new(); n];
        self.on_pool(|| {
            for ((gh, gw), idx) in grids {
                let len = gh * gw * p * p * 3;
                let px = if self.device.is_cpu() {
                    let mut flat = vec![0f32; idx.len() * len];
                    flat.par_chunks_mut(len)
                        .zip(idx.par_iter())
                        .for_each(|(dst, &i)| {
                            let hwc = &buf[i * row..i * row + len];
                            naflex_patches(hwc, (gw, p), scale, (mean, std), dst);
                        });
                    Tensor::from_vec(flat, (idx.len(), gh * gw, p * p * 3), &self.device)?
                        .to_dtype(self.dtype)?
                } else {
                    // The images' bytes up, normalised and cut into
                    // patches there: a quarter of the f32 rows' bytes.
                    let mut bytes = Vec::with_capacity(idx.len() * len);
                    for &i in &idx {
                        bytes.extend_from_slice(&buf[i * row..i * row + len]);
                    }
                    crate::pixels::patches_from_u8(
                        &bytes,
                        idx.len(),
                        (gh, gw),
                        p,
                        &self.preprocessor,
                        &self.device,
                        self.dtype,
                    )?
                };
                let vecs = rows(&self.model.vision.forward_patches(&px, (gh, gw))?)?;
                for (i, v) in idx.into_iter().zip(vecs) {
                    out[i] = v;
                }
            }
            Ok::<_, candle_core::Error>(())
        })?;
        Ok(out)
    }

    fn pixel_shape(&self, n: usize) -> (usize, usize, usize, usize) {
        let side = self.config.vision.image_size;
        (n, self.config.vision.num_channels, side, side)
    }

    fn forward_pixels(&self, px: Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
        let out = self.model.vision.forward(&px.to_dtype(self.dtype)?)?;
        rows(&out)
    }
}

/// One image's RGB bytes (`gw` patches of `p` pixels wide, row-major, the
/// channels interleaved) as NaFlex's model input: a row per patch (row by
/// row of patches), each patch's pixels in (row, column, channel) order
/// (transformers' `convert_image_to_patches`), rescaled and normalised as
/// [`ClipPreprocessor::normalize_hwc_into`] does, op by op.
fn naflex_patches(
    hwc: &[u8],
    (gw, p): (usize, usize),
    scale: f32,
    (mean, std): ([f32; 3], [f32; 3]),
    out: &mut [f32],
) {
    let width = gw * p * 3;
    let line = p * 3;
    for (k, patch) in out.chunks_exact_mut(p * line).enumerate() {
        let (gy, gx) = (k / gw, k % gw);
        for (ry, dst) in patch.chunks_exact_mut(line).enumerate() {
            let at = (gy * p + ry) * width + gx * line;
            for (x, (d, v)) in dst.iter_mut().zip(&hwc[at..at + line]).enumerate() {
                let c = x % 3;
                *d = (f32::from(*v) * scale - mean[c]) / std[c];
            }
        }
    }
}

fn rows(t: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    let mut v = t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    v.iter_mut().for_each(|r| l2_normalize(r));
    Ok(v)
}

enum Item {
    /// Failed before reaching the model (a remote object that could not be fetched).
    Failed(EmbedError),
    Text(String),
    Image(MediaSource),
    Video(MediaSource, Option<mmembed_core::VideoSegmentConfig>),
}

/// What one item turns into.
enum ItemOut {
    Vector(Vec<f32>),
    Segments(Vec<SegmentEmbedding>),
}

type ItemResult = Result<ItemOut, EmbedError>;

struct Job {
    items: Vec<Item>,
    reply: oneshot::Sender<Vec<ItemResult>>,
}

fn backend_err(message: String) -> EmbedError {
    EmbedError::Backend {
        backend: BACKEND.into(),
        message,
        retryable: false,
    }
}

/// One model batch of images, decoded and preprocessed: the item indices
/// of its rows, the items that failed, and the rows (in a batch buffer that
/// goes back to the preparing thread once the model has read it).
struct Prepared {
    idx: Vec<usize>,
    /// Each row's image's `(width, height)` (one size but for NaFlex).
    sizes: Vec<(u32, u32)>,
    failed: Vec<(usize, EmbedError)>,
    buf: Vec<u8>,
}

/// Model work, handed from the preparing thread to the model thread in
/// call order. Each work unit travels with a pipeline slot (a batch buffer,
/// used by images, empty for the rest) that the model thread sends back
/// when it is done with the unit: with [`SLOTS`] of them the preparing
/// thread is one unit ahead of the model, across calls as within one.
enum Unit {
    /// A group of calls starts: who gets the answers, and how many items
    /// each sent.
    Begin {
        replies: Vec<oneshot::Sender<Vec<ItemResult>>>,
        lens: Vec<usize>,
    },
    /// Items answered before reaching the model (a text the tokenizer
    /// refused, an object that could not be fetched).
    Answered(Vec<(usize, ItemResult)>),
    Texts {
        idx: Vec<usize>,
        seqs: Vec<Vec<u32>>,
        slot: Vec<u8>,
    },
    Images(Prepared),
    /// Decoded on the model thread: frames go to the model as they come.
    Video {
        i: usize,
        src: MediaSource,
        cfg: Option<mmembed_core::VideoSegmentConfig>,
        slot: Vec<u8>,
    },
    /// The group is complete: answer its callers. `panicked`: preparing it
    /// panicked, so its unprepared items get that error.
    End {
        panicked: bool,
    },
}

/// Units prepared or being run at once: one in the model, one ready or
/// being prepared. More would only hold more memory (a batch buffer each,
/// 38.5 MB at 256 ViT-B/32 images): the slower side sets the pace anyway.
const SLOTS: usize = 2;

/// Where a local pipeline spends its time, from its first call on: the
/// share of the time its model thread ran units and the share during which
/// images were being decoded. A job bound by the host's decoding keeps the
/// decoding near 100 % and leaves the model thread waiting; one bound by
/// the model the other way round. Cumulative, logged at debug level
/// (`MMEMBED_LOG=mmembed_candle=debug`) as each group of calls is
/// answered, so a job's last line sums it up; `scripts/gpu-check.sh` puts
/// that line in its report.
#[derive(Default)]
struct Clock {
    /// When the preparing thread took its first call.
    start: std::sync::OnceLock<Instant>,
    /// Nanoseconds the model thread ran units (uploads, forward passes,
    /// the wait for a GPU's results, videos).
    model_busy: AtomicU64,
    /// Nanoseconds during which at least one batch of images was being
    /// decoded (batches overlap: see [`Worker::send_images`]).
    decoding: AtomicU64,
    /// Batches being decoded now, and since when one has been.
    decoding_now: std::sync::Mutex<(usize, Option<Instant>)>,
    /// Nanoseconds the preparing thread waited for calls (the caller was
    /// behind).
    waiting_for_calls: AtomicU64,
    /// Images and texts the model thread has taken (failed ones too).
    images: AtomicU64,
    texts: AtomicU64,
}

impl Clock {
    fn add(counter: &AtomicU64, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counter.fetch_add(ns, Ordering::Relaxed);
    }

    fn count(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A batch's decoding starts; it ends when the guard is dropped.
    fn decoding(&self) -> Decoding<'_> {
        let mut now = self.decoding_now.lock().unwrap_or_else(|e| e.into_inner());
        if now.0 == 0 {
            now.1 = Some(Instant::now());
        }
        now.0 += 1;
        Decoding(self)
    }

    fn log(&self) {
        let Some(start) = self.start.get() else {
            return;
        };
        let wall = start.elapsed().as_secs_f64();
        let secs = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / 1e9;
        let share = |c: &AtomicU64| 100.0 * secs(c) / wall.max(1e-9);
        tracing::debug!(
            images = self.images.load(Ordering::Relaxed),
            texts = self.texts.load(Ordering::Relaxed),
            wall_s = wall,
            model_busy_s = secs(&self.model_busy),
            decoding_s = secs(&self.decoding),
            waiting_for_calls_s = secs(&self.waiting_for_calls),
            "local pipeline since its first call: model thread busy {:.0} %, images being \
             decoded {:.0} %, waiting for calls {:.0} %",
            share(&self.model_busy),
            share(&self.decoding),
            share(&self.waiting_for_calls),
        );
    }
}

/// A batch of images being decoded (see [`Clock::decoding`]).
struct Decoding<'a>(&'a Clock);

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        let mut now = self
            .0
            .decoding_now
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        now.0 = now.0.saturating_sub(1);
        if now.0 == 0
            && let Some(t) = now.1.take()
        {
            Clock::add(&self.0.decoding, t);
        }
    }
}

/// The preparing thread's slots: the one it holds for the next group, the
/// ones the model thread sends back, and how many it made up for.
struct SlotPool {
    back: mpsc::Receiver<Vec<u8>>,
    held: Option<Vec<u8>>,
    /// Taken for the unit being prepared, not yet sent (0 or 1).
    in_hand: usize,
    /// Slots lost to a panic while preparing: new ones replace them
    /// (with a sender of its own here the channel would never close, and
    /// this thread would wait forever for a model thread that is gone).
    lost: usize,
}

impl SlotPool {
    /// A slot, waiting for the model to give one back if need be; None when
    /// the model thread is gone.
    fn take(&mut self) -> Option<Vec<u8>> {
        let slot = match self.held.take() {
            Some(s) => s,
            None if self.lost > 0 => {
                self.lost -= 1;
                Vec::new()
            }
            None => self.back.recv().ok()?,
        };
        self.in_hand += 1;
        Some(slot)
    }

    /// Holds a slot for the next group, if it does not hold one yet.
    fn hold(&mut self) -> bool {
        if self.held.is_none() {
            let Some(slot) = self.take() else {
                return false;
            };
            self.in_hand -= 1;
            self.held = Some(slot);
        }
        true
    }

    /// After a panic while preparing: a slot taken for a unit that was
    /// never sent is gone with the unwinding, so a new one will replace it.
    fn unwound(&mut self) {
        self.lost += std::mem::take(&mut self.in_hand);
    }

    /// Hands a unit (and its slot) to the model thread; false when it is gone.
    fn send(&mut self, units: &mpsc::Sender<Unit>, unit: Unit) -> bool {
        self.in_hand -= 1;
        units.send(unit).is_ok()
    }
}

/// The model's calls as they run on the model thread: the answers so far.
struct Group {
    out: Vec<Option<ItemResult>>,
    replies: Vec<oneshot::Sender<Vec<ItemResult>>>,
    lens: Vec<usize>,
}

impl Group {
    fn answer(self, panicked: bool) {
        let missing = if panicked {
            "preparing this call panicked"
        } else {
            "item was not processed"
        };
        let mut results = self
            .out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(backend_err(missing.into()))));
        for (reply, n) in self.replies.into_iter().zip(self.lens) {
            // The caller may have gone away; nothing to do then.
            let _ = reply.send(results.by_ref().take(n).collect());
        }
    }
}

/// Runs `f`, turning a panic into an error for the items it was working on
/// (the other items and later calls go on).
fn unpanicked<T>(what: &str, f: impl FnOnce() -> Result<T, EmbedError>) -> Result<T, EmbedError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(backend_err(format!("{what} panicked"))))
}

struct Worker {
    clip: LoadedClip,
    max_batch: usize,
    limits: ImageLimits,
    draft: mmembed_media::Draft,
    #[cfg_attr(not(feature = "video"), allow(dead_code))]
    video_fps: f64,
    #[cfg_attr(not(feature = "video"), allow(dead_code))]
    video_keyframes_only: bool,
    clock: Clock,
}

impl Worker {
    /// The preparing thread: takes calls (merging those that wait, see
    /// [`merge_waiting`]), tokenizes texts, decodes and preprocesses images
    /// into batch buffers, and hands the model thread one unit at a time.
    /// It holds a slot before it takes a call, so the calls that arrive
    /// while both slots are busy are merged into one group, as they were
    /// when the model thread took calls itself.
    fn prepare_loop(
        &self,
        jobs: &mpsc::Receiver<Job>,
        units: &mpsc::Sender<Unit>,
        slots: mpsc::Receiver<Vec<u8>>,
    ) {
        let mut slots = SlotPool {
            back: slots,
            held: None,
            in_hand: 0,
            lost: 0,
        };
        loop {
            // False: the model thread is gone (it never stops first).
            if !slots.hold() {
                return;
            }
            // Err: the LocalEmbedder was dropped.
            let first = match jobs.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    let t = Instant::now();
                    let Ok(job) = jobs.recv() else { return };
                    if self.clock.start.get().is_some() {
                        Clock::add(&self.clock.waiting_for_calls, t);
                    }
                    job
                }
            };
            self.clock.start.get_or_init(Instant::now);
            let jobs = merge_waiting(first, jobs, self.max_batch);
            if jobs.is_empty() {
                continue;
            }
            let lens: Vec<usize> = jobs.iter().map(|j| j.items.len()).collect();
            let (items, replies): (Vec<Vec<Item>>, Vec<_>) =
                jobs.into_iter().map(|j| (j.items, j.reply)).unzip();
            if units.send(Unit::Begin { replies, lens }).is_err() {
                return;
            }
            let items = items.into_iter().flatten().collect();
            // Texts and images are guarded one by one; this is for the rest.
            let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.prepare_group(items, units, &mut slots)
            }));
            let (panicked, going) = match prepared {
                Ok(going) => (false, going),
                Err(_) => {
                    slots.unwound();
                    (true, true)
                }
            };
            if units.send(Unit::End { panicked }).is_err() || !going {
                return;
            }
        }
    }

    /// Sends one group's units: texts, then images, then videos, in model
    /// batches. Returns false when the model thread is gone.
    fn prepare_group(
        &self,
        items: Vec<Item>,
        units: &mpsc::Sender<Unit>,
        slots: &mut SlotPool,
    ) -> bool {
        let mut answered = Vec::new();
        // Item indices and model inputs kept side by side.
        let (mut text_idx, mut seqs) = (Vec::new(), Vec::new());
        let mut images = Vec::new();
        let mut videos = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match item {
                Item::Text(t) => {
                    match unpanicked("tokenizing the text", || self.clip.tokenizer.encode(&t)) {
                        Ok(ids) => {
                            text_idx.push(i);
                            seqs.push(ids);
                        }
                        Err(e) => answered.push((i, Err(e))),
                    }
                }
                Item::Failed(e) => answered.push((i, Err(e))),
                Item::Image(src) => images.push((i, src)),
                Item::Video(src, cfg) => videos.push((i, src, cfg)),
            }
        }
        if !answered.is_empty() && units.send(Unit::Answered(answered)).is_err() {
            return false;
        }
        let batch = self.max_batch;
        let (mut text_idx, mut seqs) = (text_idx.into_iter(), seqs.into_iter());
        loop {
            let seqs: Vec<Vec<u32>> = seqs.by_ref().take(batch).collect();
            if seqs.is_empty() {
                break;
            }
            let idx = text_idx.by_ref().take(seqs.len()).collect();
            let Some(slot) = slots.take() else {
                return false;
            };
            if !slots.send(units, Unit::Texts { idx, seqs, slot }) {
                return false;
            }
        }
        if !self.send_images(&images, units, slots) {
            return false;
        }
        for (i, src, cfg) in videos {
            let Some(slot) = slots.take() else {
                return false;
            };
            if !slots.send(units, Unit::Video { i, src, cfg, slot }) {
                return false;
            }
        }
        true
    }

    /// Decodes a group's images into model batches and sends each as it is
    /// done. Returns false when the model thread is gone.
    ///
    /// Each batch is a task on rayon's pool, started as soon as it has a
    /// batch buffer, so the next batch's images are decoded by the threads
    /// the current one's last images leave idle: one parallel loop per
    /// batch, waited for before the next (as before), left most of the
    /// pool idle at every batch's end while its last images finished
    /// (about half an image per thread and batch; at 256 images on 16
    /// threads a few percent of the decoding). Batches may so reach the
    /// model out of order, which is fine: each carries its items' indices,
    /// and the group ends only once all are sent.
    fn send_images(
        &self,
        images: &[(usize, MediaSource)],
        units: &mpsc::Sender<Unit>,
        slots: &mut SlotPool,
    ) -> bool {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        let gone = AtomicBool::new(false);
        // Batch buffers that went down with a panicking task (see below).
        let lost = AtomicUsize::new(0);
        let mut taken = true;
        rayon::in_place_scope(|scope| {
            for chunk in images.chunks(self.max_batch) {
                if gone.load(Ordering::Relaxed) {
                    break;
                }
                let Some(buf) = slots.take() else {
                    taken = false;
                    break;
                };
                // The task owns the buffer now, and sends it on.
                slots.in_hand -= 1;
                let (gone, lost) = (&gone, &lost);
                scope.spawn(move |_| {
                    let decoding = self.clock.decoding();
                    // Each image is guarded in `prepare_images`; this is for
                    // the rest, whose items then fail instead of the group
                    // waiting for them.
                    let unit = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.prepare_images(chunk, buf)
                    })) {
                        Ok(prepared) => Unit::Images(prepared),
                        Err(_) => {
                            lost.fetch_add(1, Ordering::Relaxed);
                            let err = || Err(backend_err("preparing this batch panicked".into()));
                            Unit::Answered(chunk.iter().map(|(i, _)| (*i, err())).collect())
                        }
                    };
                    drop(decoding);
                    if units.send(unit).is_err() {
                        gone.store(true, Ordering::Relaxed);
                    }
                });
            }
        });
        slots.lost += lost.into_inner();
        taken && !gone.into_inner()
    }

    /// The model thread: runs each unit as it comes and answers each group
    /// when its last unit is done, handing slots back as it goes.
    fn model_loop(&self, units: &mpsc::Receiver<Unit>, slots: &mpsc::Sender<Vec<u8>>) {
        let mut group: Option<Group> = None;
        while let Ok(unit) = units.recv() {
            let (t, runs) = (
                Instant::now(),
                matches!(
                    unit,
                    Unit::Texts { .. } | Unit::Images(_) | Unit::Video { .. }
                ),
            );
            let slot = match unit {
                Unit::Begin { replies, lens } => {
                    let n = lens.iter().sum();
                    let out = (0..n).map(|_| None).collect();
                    group = Some(Group { out, replies, lens });
                    None
                }
                Unit::End { panicked } => {
                    if let Some(g) = group.take() {
                        g.answer(panicked);
                    }
                    self.clock.log();
                    None
                }
                Unit::Answered(done) => {
                    if let Some(g) = group.as_mut() {
                        for (i, r) in done {
                            g.out[i] = Some(r);
                        }
                    }
                    None
                }
                Unit::Texts { idx, seqs, slot } => {
                    Clock::count(&self.clock.texts, idx.len());
                    if let Some(g) = group.as_mut() {
                        let res = unpanicked("the text model", || {
                            self.clip.embed_token_ids(&seqs).map_err(forward_err)
                        });
                        fill(&mut g.out, idx.into_iter(), res);
                    }
                    Some(slot)
                }
                Unit::Images(Prepared {
                    idx,
                    sizes,
                    failed,
                    buf,
                }) => {
                    Clock::count(&self.clock.images, idx.len() + failed.len());
                    if let Some(g) = group.as_mut() {
                        for (i, e) in failed {
                            g.out[i] = Some(Err(e));
                        }
                        // All failed: no rows, and embed_u8_images answers
                        // none without running the model.
                        let res = unpanicked("the image model", || {
                            self.clip.embed_u8_images(&buf, &sizes).map_err(forward_err)
                        });
                        fill(&mut g.out, idx.into_iter(), res);
                    }
                    Some(buf)
                }
                Unit::Video { i, src, cfg, slot } => {
                    if let Some(g) = group.as_mut() {
                        let res =
                            unpanicked("decoding or embedding the video", || self.video(&src, cfg));
                        g.out[i] = Some(res.map(ItemOut::Segments));
                    }
                    Some(slot)
                }
            };
            if runs {
                Clock::add(&self.clock.model_busy, t);
            }
            if let Some(slot) = slot {
                // Err: the preparing thread has stopped; this ends next.
                let _ = slots.send(slot);
            }
        }
    }

    #[cfg(not(feature = "video"))]
    fn video(
        &self,
        _src: &MediaSource,
        _cfg: Option<mmembed_core::VideoSegmentConfig>,
    ) -> Result<Vec<SegmentEmbedding>, EmbedError> {
        Err(EmbedError::UnsupportedModality {
            modality: Modality::Video,
            backend: BACKEND.into(),
        })
    }

    /// One embedding per segment: the mean of the segment's L2-normalised
    /// frame embeddings, normalised again. Frames are embedded in model
    /// batches as they are decoded, so memory holds at most one batch of
    /// frames however long the video.
    #[cfg(feature = "video")]
    fn video(
        &self,
        src: &MediaSource,
        cfg: Option<mmembed_core::VideoSegmentConfig>,
    ) -> Result<Vec<SegmentEmbedding>, EmbedError> {
        use mmembed_media::video::{
            SampleMode, SampleOptions, VideoBytes, probe, sample_frames_with, sample_times,
        };
        let owned;
        let vb = match src {
            MediaSource::Path(p) => VideoBytes::Path(p),
            other => {
                owned = read_media(other, Modality::Video, u64::MAX)?;
                VideoBytes::Bytes(owned.clone())
            }
        };
        let info = probe(&vb)?;
        let segments = cfg.unwrap_or_default().segments(info.duration_sec)?;
        let per_seg = sample_times(&segments, self.video_fps);
        let times: Vec<f64> = per_seg.iter().flatten().copied().collect();
        let owner: Vec<usize> = per_seg
            .iter()
            .enumerate()
            .flat_map(|(i, t)| std::iter::repeat_n(i, t.len()))
            .collect();
        let dim = self.clip.config.projection_dim;
        let mut sums = vec![vec![0f32; dim]; segments.len()];
        let mut counts = vec![0usize; segments.len()];
        let mut errors: Vec<Option<String>> = vec![None; segments.len()];
        // Decoded frames waiting for a model batch: their segments and the
        // crops' bytes, one after another (as image batches carry them).
        let len = self.clip.pixels_per_image();
        // Never more than the video's frames wait (`max_batch` is the
        // caller's and may be far larger: room for it would be terabytes).
        let room = self.max_batch.min(times.len());
        let mut pending_seg: Vec<usize> = Vec::with_capacity(room);
        let mut pending_px: Vec<u8> = Vec::with_capacity(room * len);
        // Each frame's (width, height): one size, but for NaFlex.
        let mut pending_size: Vec<(u32, u32)> = Vec::with_capacity(room);
        let mut fatal: Option<EmbedError> = None;
        let flush = |pending_seg: &mut Vec<usize>,
                     pending_px: &mut Vec<u8>,
                     pending_size: &mut Vec<(u32, u32)>,
                     sums: &mut Vec<Vec<f32>>,
                     counts: &mut Vec<usize>,
                     fatal: &mut Option<EmbedError>| {
            if !pending_seg.is_empty() && fatal.is_none() {
                match self.clip.embed_u8_images(pending_px, pending_size) {
                    Ok(vecs) => {
                        for (seg, v) in pending_seg.iter().zip(vecs) {
                            sums[*seg].iter_mut().zip(&v).for_each(|(s, x)| *s += x);
                            counts[*seg] += 1;
                        }
                    }
                    Err(e) => *fatal = Some(backend_err(format!("model forward failed: {e}"))),
                }
            }
            pending_seg.clear();
            pending_px.clear();
            pending_size.clear();
        };
        let sampling = SampleOptions {
            mode: if self.video_keyframes_only {
                SampleMode::Keyframes
            } else {
                SampleMode::Exact
            },
            // swscale resizes while converting from YUV: one pass over the
            // full frame instead of two.
            resize_for: Some(self.clip.preprocessor.clone()),
            ..SampleOptions::default()
        };
        sample_frames_with(&vb, &times, &sampling, |k, r| match r {
            Ok(frame) => {
                let at = pending_px.len();
                pending_px.resize(at + len, 0);
                let cropped = self
                    .clip
                    .preprocessor
                    .resize_into(&frame.image, &mut pending_px[at..]);
                match cropped {
                    Ok(size) => pending_size.push(size),
                    Err(e) => {
                        pending_px.truncate(at);
                        errors[owner[k]].get_or_insert_with(|| format!("frame {e}"));
                        return;
                    }
                }
                pending_seg.push(owner[k]);
                if pending_seg.len() >= self.max_batch {
                    flush(
                        &mut pending_seg,
                        &mut pending_px,
                        &mut pending_size,
                        &mut sums,
                        &mut counts,
                        &mut fatal,
                    );
                }
            }
            Err(e) => {
                errors[owner[k]].get_or_insert_with(|| e.to_string());
            }
        })?;
        flush(
            &mut pending_seg,
            &mut pending_px,
            &mut pending_size,
            &mut sums,
            &mut counts,
            &mut fatal,
        );
        if let Some(e) = fatal {
            return Err(e);
        }
        Ok(segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (embedding, error) = if counts[i] > 0 {
                    let mut v = std::mem::take(&mut sums[i]);
                    l2_normalize(&mut v);
                    (v, None)
                } else {
                    (
                        Vec::new(),
                        Some(
                            errors[i]
                                .take()
                                .unwrap_or_else(|| "no frame decoded".into()),
                        ),
                    )
                };
                SegmentEmbedding {
                    start_sec: s.start_sec,
                    end_sec: s.end_sec,
                    embedding,
                    error,
                }
            })
            .collect())
    }

    /// Decodes and preprocesses one model batch of images into `buf`, in
    /// parallel on rayon's pool (the one the model's CPU kernels use, so on
    /// the CPU decoding fills the cores the model leaves idle instead of
    /// adding threads that compete with it), each image straight into its
    /// row of the batch buffer.
    ///
    /// The rows are the crops' bytes, normalised by the model
    /// ([`LoadedClip::embed_u8_rows`]: on a GPU, after a copy of a quarter
    /// of the f32 pixels' size). The [`SLOTS`] batch buffers live as long
    /// as the embedder: a fresh one is fresh pages for the kernel to fault
    /// in and zero, on top of a copy of every image from its own buffer
    /// into the batch (what this did before: 2,000 JPEGs on 2 cores at
    /// batch 256 spent 1.6-2.6 s in the kernel then, 1.5 s with reused f32
    /// buffers; BENCHMARKS.md, issue #19).
    fn prepare_images(&self, chunk: &[(usize, MediaSource)], mut buf: Vec<u8>) -> Prepared {
        use rayon::prelude::*;
        let len = self.clip.pixels_per_image();
        buf.resize(chunk.len() * len, 0);
        let results: Vec<Result<(u32, u32), EmbedError>> = buf
            .par_chunks_mut(len.max(1))
            .zip(chunk.par_iter())
            .map(|(slot, (_, src))| {
                unpanicked("decoding the image", || self.pixels_into(src, slot))
            })
            .collect();
        // Failed images leave holes: the rows after them move up (the model
        // runs on good rows only).
        let (mut idx, mut sizes, mut failed, mut n) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for ((i, _), (k, res)) in chunk.iter().zip(results.into_iter().enumerate()) {
            match res {
                Ok(size) => {
                    if k != n {
                        buf.copy_within(k * len..(k + 1) * len, n * len);
                    }
                    idx.push(*i);
                    sizes.push(size);
                    n += 1;
                }
                Err(e) => failed.push((*i, e)),
            }
        }
        buf.truncate(n * len);
        Prepared {
            idx,
            sizes,
            failed,
            buf,
        }
    }

    /// Decodes, resizes and crops one image into its row of a batch
    /// buffer: the crop's RGB bytes, which the model normalises
    /// ([`LoadedClip::embed_u8_images`]); returns its `(width, height)`.
    fn pixels_into(&self, src: &MediaSource, slot: &mut [u8]) -> Result<(u32, u32), EmbedError> {
        let what = src.describe(Modality::Image);
        let bytes = read_media(src, Modality::Image, self.limits.max_bytes)?;
        self.clip
            .preprocessor
            .decode_resize_into(&bytes, &what, &self.limits, self.draft, slot)
    }
}

fn forward_err(e: candle_core::Error) -> EmbedError {
    backend_err(format!("model forward failed: {e}"))
}

/// Puts a model batch's vectors (or its one error) in the items' places.
fn fill(
    out: &mut [Option<ItemResult>],
    idx: impl Iterator<Item = usize>,
    res: Result<Vec<Vec<f32>>, EmbedError>,
) {
    match res {
        Ok(vecs) => {
            for (i, v) in idx.zip(vecs) {
                out[i] = Some(Ok(ItemOut::Vector(v)));
            }
        }
        Err(err) => {
            for i in idx {
                out[i] = Some(Err(err.clone()));
            }
        }
    }
}

/// Gives a NaFlex model's preprocessing another patch budget.
fn set_max_patches(clip: &mut LoadedClip, model: &str, n: u32) -> Result<(), EmbedError> {
    let err = |reason: String| EmbedError::ModelLoad {
        model: model.into(),
        reason,
        source: None,
    };
    match &mut clip.preprocessor.resize {
        Some(mmembed_media::ResizeTarget::Patches { max_patches, .. }) => {
            if !(1..=mmembed_media::MAX_PATCHES).contains(&n) {
                return Err(err(format!(
                    "max_patches {n}: a NaFlex budget is 1 to {} patches",
                    mmembed_media::MAX_PATCHES
                )));
            }
            *max_patches = n;
            Ok(())
        }
        _ => Err(err(format!(
            "max_patches {n} is for SigLIP 2 NaFlex models; this one takes images of one size \
             ({0}x{0})",
            clip.config.vision.image_size
        ))),
    }
}

/// The job just received plus the jobs already waiting behind it, up to
/// `budget` items in all, so that concurrent callers share model batches
/// instead of queueing for a batch each (continuous batching: nothing
/// waits for company, but whatever piled up while the model was busy runs
/// together). Jobs whose callers stopped waiting are dropped unrun.
fn merge_waiting(first: Job, rx: &mpsc::Receiver<Job>, budget: usize) -> Vec<Job> {
    let mut n = first.items.len();
    let mut jobs = Vec::new();
    if !first.reply.is_closed() {
        jobs.push(first);
    }
    while n < budget {
        match rx.try_recv() {
            Ok(job) if job.reply.is_closed() => {}
            Ok(job) => {
                n += job.items.len();
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
    jobs
}

/// The local backend: a CLIP checkpoint run with candle.
///
/// Model work runs on a dedicated OS thread fed by a channel (async callers
/// await a oneshot reply), so the async executor never blocks on a matmul
/// and concurrent callers share one model without contending for cores.
/// A second thread prepares the model's next batch while it runs the
/// current one (tokenizing texts; decoding and preprocessing images on
/// rayon's pool), across calls too: a caller that keeps a second call
/// queued (as `mmembed batch` does) keeps the model and the decoders busy
/// at the seam between calls. Calls that queue up while the model is busy
/// are merged into the next model batches (up to `max_batch` items); for a
/// bounded queue, a waiting time and batching metrics, wrap it in
/// `mmembed_core::batching::Batcher`.
///
/// ```no_run
/// # async fn demo() -> Result<(), mmembed_core::EmbedError> {
/// use mmembed_candle::{LocalEmbedder, LocalOptions};
/// use mmembed_core::{Embedder, EmbedRequest};
/// let local = LocalEmbedder::load(LocalOptions::new("openai/clip-vit-base-patch32")).await?;
/// let v = local.embed(EmbedRequest::text("a photo of a cat")).await?;
/// assert_eq!(v.text.unwrap().len(), 512);
/// # Ok(()) }
/// ```
pub struct LocalEmbedder {
    info: EmbedderInfo,
    jobs: mpsc::Sender<Job>,
    max_image_bytes: u64,
    max_video_bytes: u64,
}

/// Remote objects fetched at once per call, so a large batch of URIs does
/// not open hundreds of connections.
const FETCH_CONCURRENCY: usize = 32;

impl LocalEmbedder {
    /// Replaces remote media (`gs://`, `s3://`, `az://`, `http(s)://`) by
    /// their bytes, concurrently and here on the async side, so the model
    /// thread never waits on the network; an object that cannot be fetched
    /// fails its own item only.
    async fn fetch_remote(&self, items: &mut [Item]) {
        use futures::StreamExt;
        let wanted: Vec<(usize, MediaSource, Modality, u64)> = items
            .iter()
            .enumerate()
            .filter_map(|(i, it)| match it {
                Item::Image(src @ MediaSource::Uri(u)) if mmembed_store::is_remote(u) => {
                    Some((i, src.clone(), Modality::Image, self.max_image_bytes))
                }
                Item::Video(src @ MediaSource::Uri(u), _) if mmembed_store::is_remote(u) => {
                    Some((i, src.clone(), Modality::Video, self.max_video_bytes))
                }
                _ => None,
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let fetched: Vec<_> = futures::stream::iter(wanted)
            .map(|(i, src, kind, max)| async move {
                (i, mmembed_media::fetch_remote(&src, kind, max).await)
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        for (i, r) in fetched {
            let item = &mut items[i];
            match (r, &mut *item) {
                (Ok(Some(b)), Item::Image(src) | Item::Video(src, _)) => {
                    *src = MediaSource::Bytes(b)
                }
                (Err(e), _) => *item = Item::Failed(e),
                _ => {}
            }
        }
    }
}

impl fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The highest video sampling rate: above any camera's (slow-motion
/// phones film at 240), and a bound on the sample times a segment holds (a
/// rate of 1e12 asked for 16 TB of them for a 2 s video, and aborted).
const MAX_FPS: f64 = 1000.0;

impl LocalEmbedder {
    /// Loads the model without blocking the async executor.
    pub async fn load(opts: LocalOptions) -> Result<Self, EmbedError> {
        tokio::task::spawn_blocking(move || Self::load_blocking(opts))
            .await
            .map_err(|e| backend_err(format!("model loading task failed: {e}")))?
    }

    /// Loads the model on the calling thread (may download; reads the weights).
    pub fn load_blocking(opts: LocalOptions) -> Result<Self, EmbedError> {
        // Before the weights are read: a mistyped rate should not cost a
        // model load first.
        if !(opts.video_fps.is_finite() && opts.video_fps > 0.0 && opts.video_fps <= MAX_FPS) {
            return Err(EmbedError::invalid(
                "video_fps",
                format!(
                    "{} is not a frame rate between 0 and {MAX_FPS} per second",
                    opts.video_fps
                ),
            ));
        }
        let device = opts.device.open()?;
        let (files, manifest_space) = locate(&opts)?;
        let space = match (&opts.space, manifest_space) {
            (Some(s), _) => s.clone(),
            (None, Some(s)) => s,
            (None, None) => weights_space(&files)?,
        };
        let mut clip = LoadedClip::load(&files, &device, opts.precision)?;
        if let Some(n) = opts.max_patches {
            set_max_patches(&mut clip, &opts.model, n)?;
        }
        let dim = clip.config.projection_dim;
        let info = EmbedderInfo {
            backend: BACKEND.into(),
            model_id: opts.model.clone(),
            space: SpaceId::new(space),
            native_dimension: dim,
            supported_dimensions: vec![dim as u32],
            modalities: if cfg!(feature = "video") {
                vec![Modality::Text, Modality::Image, Modality::Video]
            } else {
                vec![Modality::Text, Modality::Image]
            },
            max_text_tokens: Some(clip.tokenizer.context()),
        };
        let max_batch = opts
            .max_batch
            .unwrap_or(if device.is_cpu() {
                CPU_MAX_BATCH
            } else {
                GPU_MAX_BATCH
            })
            .max(1);
        tracing::info!(model = %info.model_id, space = %info.space, device = ?device, precision = ?opts.precision, max_batch, jpeg_draft = opts.jpeg_draft, heic_thumbnail = opts.heic_thumbnail, max_patches = ?opts.max_patches, "local model loaded");
        let worker = Arc::new(Worker {
            clip,
            max_batch,
            limits: opts.image_limits,
            draft: mmembed_media::Draft {
                jpeg: opts.jpeg_draft,
                heic_thumbnail: opts.heic_thumbnail,
            },
            video_fps: opts.video_fps,
            video_keyframes_only: opts.video_keyframes_only,
            clock: Clock::default(),
        });
        let (tx, jobs) = mpsc::channel::<Job>();
        let (units_tx, units) = mpsc::channel::<Unit>();
        let (slots_tx, slots) = mpsc::channel::<Vec<u8>>();
        for _ in 0..SLOTS {
            // Buffers grow to a batch on first use.
            let _ = slots_tx.send(Vec::new());
        }
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| backend_err(format!("cannot start the {name} thread: {e}")))
        };
        // Each thread ends when the one before it does: the preparing one
        // when every LocalEmbedder clone is gone, the model one after it.
        let w = worker.clone();
        spawn(
            "mmembed-local",
            Box::new(move || w.model_loop(&units, &slots_tx)),
        )?;
        spawn(
            "mmembed-prepare",
            Box::new(move || worker.prepare_loop(&jobs, &units_tx, slots)),
        )?;
        Ok(Self {
            info,
            jobs: tx,
            max_image_bytes: opts.image_limits.max_bytes,
            max_video_bytes: opts.max_video_bytes,
        })
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    async fn embed_batch(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>> {
        // Which item results belong to which request: [text, image, video].
        let mut slots: Vec<Result<[Option<usize>; 3], EmbedError>> = Vec::new();
        let mut items = Vec::new();
        for req in reqs {
            let checked = req.validate().and_then(|()| self.info.check(&req));
            slots.push(checked.map(|()| {
                let mut slot = [None; 3];
                let mut add = |k: usize, item: Item| {
                    slot[k] = Some(items.len());
                    items.push(item);
                };
                if let Some(t) = req.text {
                    add(0, Item::Text(t));
                }
                if let Some(m) = req.image {
                    add(1, Item::Image(m.source));
                }
                if let Some(v) = req.video {
                    add(2, Item::Video(v.media.source, v.segment_config));
                }
                slot
            }));
        }
        self.fetch_remote(&mut items).await;
        let n_items = items.len();
        let mut results: Vec<Option<ItemResult>> = if n_items == 0 {
            Vec::new()
        } else {
            let (tx, rx) = oneshot::channel();
            let stopped = || vec![Err(backend_err("the model worker stopped".into()))];
            let answer = match self.jobs.send(Job { items, reply: tx }) {
                Ok(()) => rx.await.unwrap_or_else(|_| stopped()),
                Err(_) => stopped(),
            };
            answer.into_iter().map(Some).collect()
        };
        if results.len() != n_items {
            // A stopped worker answers with one error for all (a panic
            // answers each item; see `Group::answer`).
            let e = match results.pop().flatten() {
                Some(Err(e)) => e,
                _ => backend_err("wrong number of results".into()),
            };
            results = (0..n_items).map(|_| Some(Err(e.clone()))).collect();
        }
        let mut take = |i: Option<usize>| -> Result<Option<ItemOut>, EmbedError> {
            match i.and_then(|i| results[i].take()) {
                None => Ok(None),
                Some(r) => r.map(Some),
            }
        };
        let vector = |o: Option<ItemOut>| match o {
            Some(ItemOut::Vector(v)) => Some(v),
            _ => None,
        };
        slots
            .into_iter()
            .map(|slot| {
                let [t, i, v] = slot?;
                let text = vector(take(t)?);
                let image = vector(take(i)?);
                let video = match take(v)? {
                    Some(ItemOut::Segments(s)) => s,
                    _ => Vec::new(),
                };
                Ok(Embeddings {
                    text,
                    image,
                    video,
                    dimension: self.info.native_dimension,
                    space: self.info.space.clone(),
                    model: self.info.model_id.clone(),
                    backend: BACKEND.into(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot lost to a panic is replaced once, and only once: the
    /// preparing thread neither waits forever for it nor adds slots.
    #[test]
    fn a_slot_lost_to_a_panic_is_replaced_once() {
        let (tx, rx) = mpsc::channel();
        tx.send(vec![1u8]).unwrap();
        let mut pool = SlotPool {
            back: rx,
            held: None,
            in_hand: 0,
            lost: 0,
        };
        assert!(pool.hold());
        let slot = pool.take().unwrap();
        assert_eq!(slot, [1], "the held slot comes first");
        drop(slot); // preparing its unit panicked
        pool.unwound();
        let made = pool.take().expect("made up for");
        assert!(made.is_empty());
        let (units, _model) = mpsc::channel();
        let texts = Unit::Texts {
            idx: vec![],
            seqs: vec![],
            slot: made,
        };
        assert!(pool.send(&units, texts));
        pool.unwound(); // a later panic with nothing in hand
        drop(tx); // no model thread: nothing more to take
        assert_eq!(pool.take(), None, "no second replacement");
    }

    /// The decoding share counts the time during which any batch was being
    /// decoded, once however many overlap, and nothing while none was.
    #[test]
    fn overlapping_batches_count_once_as_decoding() {
        use std::time::Duration;
        let clock = Clock::default();
        let t = Instant::now();
        let first = clock.decoding();
        std::thread::sleep(Duration::from_millis(30));
        let second = clock.decoding();
        std::thread::sleep(Duration::from_millis(30));
        drop(first);
        std::thread::sleep(Duration::from_millis(30));
        drop(second);
        let spanned = t.elapsed();
        // Nothing being decoded: not counted.
        std::thread::sleep(Duration::from_millis(50));
        let counted = Duration::from_nanos(clock.decoding.load(Ordering::Relaxed));
        assert!(counted >= Duration::from_millis(90), "{counted:?}");
        assert!(counted <= spanned, "{counted:?} > {spanned:?}");
    }

    /// A tensor's values as f32 bits.
    fn bits(t: Tensor) -> Vec<u32> {
        let v: Vec<f32> = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// The host's floats rounded once to `dtype` (`half`'s rounding, not
    /// candle's), as f32 bits: what a GPU model's input must hold.
    fn rounded_bits(host: &[f32], dtype: DType) -> Vec<u32> {
        host.iter()
            .map(|&x| match dtype {
                DType::BF16 => half::bf16::from_f32(x).to_f32(),
                DType::F16 => half::f16::from_f32(x).to_f32(),
                _ => x,
            })
            .map(f32::to_bits)
            .collect()
    }

    /// What a GPU runs for the embedder's batches (the crops' bytes
    /// normalised by tensor ops), run here on the CPU: the same floats as
    /// the host's normalisation, bit for bit, for CLIP's statistics and for
    /// SigLIP's (mean and std 0.5).
    #[test]
    fn crops_normalised_by_tensor_ops_equal_the_hosts() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures");
        for model in ["tiny-clip", "tiny-siglip"] {
            let files = crate::local_files(&fixtures.join(model)).unwrap();
            let clip = LoadedClip::load(&files, &Device::Cpu, Precision::F32).unwrap();
            let (n, len) = (3, clip.pixels_per_image());
            // Every byte value, in every channel and position.
            let hwc: Vec<u8> = (0..n * len).map(|i| (i * 7 + i / 3) as u8).collect();
            let mut host = vec![0f32; n * len];
            for (dst, src) in host.chunks_mut(len).zip(hwc.chunks(len)) {
                clip.preprocessor.normalize_hwc_into(src, dst).unwrap();
            }
            let side = clip.config.vision.image_size;
            // In each dtype a GPU model takes.
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let ops = crate::pixels::from_u8_rows(
                    &hwc,
                    n,
                    side,
                    &clip.preprocessor,
                    &Device::Cpu,
                    dtype,
                    Kernels::Portable,
                )
                .unwrap();
                assert_eq!(ops.dims(), [n, 3, side, side]);
                assert_eq!(ops.dtype(), dtype);
                assert!(
                    bits(ops) == rounded_bits(&host, dtype),
                    "{model}: tensor ops differ from the host's normalisation in {dtype:?}"
                );
            }
            // The CPU's own path: the host's floats as they are.
            let cpu = clip.pixels_from_u8_rows(&hwc, n).unwrap();
            assert_eq!(
                bits(cpu),
                host.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            // And the embedder's entry point on the CPU: the same vectors as
            // the f32 rows.
            let a = clip.embed_u8_rows(&hwc, n).unwrap();
            let b = clip.embed_pixel_rows(&host, n).unwrap();
            assert_eq!(a, b, "{model}");
            assert!(clip.embed_u8_rows(&hwc[1..], n).is_err());
            assert!(clip.embed_u8_rows(&[], 0).unwrap().is_empty());
        }
    }

    /// What a GPU runs for a NaFlex model's images (their bytes normalised
    /// and cut into patches by tensor ops), run here on the CPU: the host's
    /// patch rows, bit for bit, in each dtype a GPU model takes.
    #[test]
    fn naflex_patches_by_tensor_ops_equal_the_hosts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/fixtures/tiny-siglip2-naflex");
        let files = crate::local_files(&dir).unwrap();
        let clip = LoadedClip::load(&files, &Device::Cpu, Precision::F32).unwrap();
        let p = clip.config.vision.patch_size;
        let scale = clip.preprocessor.rescale_factor.unwrap_or(1.0);
        let stats = clip.preprocessor.normalize_stats();
        // Grids wide, tall and square; two images each.
        for (gh, gw) in [(3, 5), (5, 3), (4, 4), (1, 9)] {
            let (n, len) = (2, gh * gw * p * p * 3);
            // Every byte value, in every channel and position.
            let hwc: Vec<u8> = (0..n * len).map(|i| (i * 7 + i / 3) as u8).collect();
            let mut host = vec![0f32; n * len];
            for (dst, src) in host.chunks_mut(len).zip(hwc.chunks(len)) {
                naflex_patches(src, (gw, p), scale, stats, dst);
            }
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let ops = crate::pixels::patches_from_u8(
                    &hwc,
                    n,
                    (gh, gw),
                    p,
                    &clip.preprocessor,
                    &Device::Cpu,
                    dtype,
                )
                .unwrap();
                assert_eq!(ops.dims(), [n, gh * gw, p * p * 3]);
                assert_eq!(ops.dtype(), dtype);
                assert!(
                    bits(ops) == rounded_bits(&host, dtype),
                    "{gh}x{gw} in {dtype:?}: differs from the host's rows"
                );
            }
            // A byte short is an error, not a panic.
            let short = crate::pixels::patches_from_u8(
                &hwc[1..],
                n,
                (gh, gw),
                p,
                &clip.preprocessor,
                &Device::Cpu,
                DType::F32,
            );
            assert!(short.is_err());
        }
    }
}
