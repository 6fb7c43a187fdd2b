//! CLIP image preprocessing driven by a model's `preprocessor_config.json`.
//!
//! Follows Hugging Face's PIL-based `CLIPImageProcessor` step by step:
//! resize (shortest side to `size`, aspect kept, Pillow's filters in uint8),
//! centre crop (zero padding if the image is smaller), rescale, normalise
//! with the model's own mean and std. Candle's CLIP example maps pixels to
//! [-1, 1] instead; that is wrong for OpenAI CLIP and we do not copy it.

use std::path::Path;
use std::sync::Arc;

use crate::pillow::Columns;
use image::RgbImage;
use mmembed_core::EmbedError;
use serde::Deserialize;

/// OpenAI CLIP's normalisation mean (the default when a config omits it).
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's normalisation std.
// OpenAI's published digits, verbatim, as they appear in configs.
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// How the image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Shortest side to this many pixels, aspect ratio kept (CLIP's way).
    ShortestEdge(u32),
    /// Exactly this size (aspect ratio not kept).
    Exact {
        /// Output height.
        height: u32,
        /// Output width.
        width: u32,
    },
    /// SigLIP 2 NaFlex: the aspect ratio kept, each side a multiple of
    /// `patch` pixels, as large as fits in `max_patches` patches
    /// ([`patch_grid_size`]); no crop. The output size varies per image.
    Patches {
        /// Patch side in pixels.
        patch: u32,
        /// The most patches an image may have.
        max_patches: u32,
    },
}

/// The largest patch budget a NaFlex preprocessing may have: 16,384
/// patches of 16 are 4.2 megapixels, far above any published budget (256
/// to 1,024), and a bound on what one image may cost.
pub const MAX_PATCHES: u32 = 16_384;

/// The size `(width, height)` SigLIP 2's NaFlex processor resizes a
/// `width × height` image to: transformers'
/// `get_image_size_for_max_num_patches`, the largest scale (found by
/// bisection, as there, in double precision like Python's floats) at which
/// both sides, each rounded up to a multiple of `patch` (at least one
/// patch), make at most `max_patches` patches.
///
/// ```
/// use mmembed_media::patch_grid_size;
/// // A 4:3 photo in 256 patches of 16: an 18 x 14 grid (252 patches).
/// assert_eq!(patch_grid_size(640, 480, 16, 256), (288, 224));
/// // A sliver still gets one patch across.
/// assert_eq!(patch_grid_size(5000, 1, 16, 256), (4096, 16));
/// ```
pub fn patch_grid_size(width: u32, height: u32, patch: u32, max_patches: u32) -> (u32, u32) {
    let p = f64::from(patch.max(1));
    let scaled =
        |scale: f64, size: u32| -> f64 { ((f64::from(size) * scale) / p).ceil().max(1.0) * p };
    let eps = 1e-5;
    let (mut lo, mut hi) = (eps / 10.0, 100.0);
    while hi - lo >= eps {
        let scale = (lo + hi) / 2.0;
        let patches = (scaled(scale, height) / p) * (scaled(scale, width) / p);
        if patches <= f64::from(max_patches) {
            lo = scale;
        } else {
            hi = scale;
        }
    }
    // At most 100 × a u32 side: saturates only for sides over 42 million
    // pixels, which no decoder here accepts.
    let side = |size| scaled(lo, size).min(f64::from(u32::MAX)) as u32;
    (side(width), side(height))
}

/// Resampling filter, numbered as Pillow numbers them in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 0
    Nearest,
    /// 1
    Lanczos,
    /// 2
    Bilinear,
    /// 3 (CLIP's)
    Bicubic,
    /// 4
    Box,
    /// 5
    Hamming,
}

impl Resample {
    pub(crate) fn from_pil(code: u32) -> Result<Self, String> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            other => return Err(format!("unknown resample code {other} (Pillow uses 0-5)")),
        })
    }
}

/// A model's image preprocessing, read from `preprocessor_config.json`.
///
/// ```
/// use mmembed_media::ClipPreprocessor;
/// let p = ClipPreprocessor::from_json(r#"{"size": 224, "crop_size": 224}"#)?;
/// assert_eq!(p.output_size(), (224, 224));
/// let img = image::RgbImage::from_pixel(640, 480, image::Rgb([255, 0, 0]));
/// let chw = p.preprocess(&img);
/// assert_eq!(chw.len(), 3 * 224 * 224);
/// # Ok::<(), mmembed_core::EmbedError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessor {
    /// Resize step; `None` when `do_resize` is false.
    pub resize: Option<ResizeTarget>,
    /// Filter for the resize.
    pub resample: Resample,
    /// Centre crop `(height, width)`; `None` when `do_center_crop` is false.
    pub crop: Option<(u32, u32)>,
    /// Multiplier applied to 0..255 values (`None`: no rescale).
    pub rescale_factor: Option<f32>,
    /// Per-channel mean and std (`None`: no normalisation).
    pub normalize: Option<([f32; 3], [f32; 3])>,
    /// Where the centre crop starts when the margin is odd.
    pub crop_origin: CropOrigin,
    /// What becomes of an image's transparency.
    pub alpha: AlphaMode,
}

/// What becomes of a transparent image's alpha: the libraries differ, and
/// a model's references follow the library it was published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlphaMode {
    /// transformers' processors (`convert_to_rgb`): composited onto white
    /// before anything else, Pillow's `alpha_composite` arithmetic.
    OnWhite,
    /// open_clip's transform: the image resized with its alpha (Pillow
    /// premultiplies the colours for the resize and divides them after),
    /// cropped, and its alpha then dropped (`convert("RGB")`), so what
    /// was transparent shows the colours stored under it, black where
    /// they were premultiplied away. Only the decoding entry points that
    /// resize (`decode_crop_into`, `decode_resize_into`) see the alpha;
    /// [`ClipPreprocessor::decode`] returns the image on white.
    ResizedThenDropped,
}

/// Where a centre crop starts when the margin around it is odd: the
/// libraries differ by one pixel there, and a model's references follow
/// the library it was published with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropOrigin {
    /// transformers' processors: `(size - crop) // 2`.
    Floor,
    /// torchvision's `CenterCrop` (open_clip): `round((size - crop) / 2)`,
    /// halves to even.
    RoundHalfEven,
}

impl CropOrigin {
    fn offset(self, margin: i64) -> i64 {
        let floor = margin.div_euclid(2);
        match self {
            Self::RoundHalfEven if margin.rem_euclid(2) == 1 && floor.rem_euclid(2) == 1 => {
                floor + 1
            }
            _ => floor,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(u32),
    Dict {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

#[derive(Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<SizeSpec>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<SizeSpec>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f32>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    image_processor_type: Option<String>,
    /// SigLIP 2 NaFlex.
    max_num_patches: Option<u32>,
    patch_size: Option<u32>,
}

/// Defaults for the fields a `preprocessor_config.json` leaves out, as the
/// transformers processor class it names has them.
struct Defaults {
    resize: ResizeTarget,
    resample: u32,
    center_crop: bool,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Defaults {
    fn for_processor(kind: Option<&str>) -> Self {
        match kind {
            // Siglip2ImageProcessor (and its Fast twin): NaFlex, patches of
            // 16, at most 256, bilinear, mean/std 0.5; the patch values
            // come from the config (see from_json).
            Some(k) if k.starts_with("Siglip2") => Self {
                resize: ResizeTarget::Patches {
                    patch: 16,
                    max_patches: 256,
                },
                resample: 2,
                center_crop: false,
                mean: [0.5; 3],
                std: [0.5; 3],
            },
            // SiglipImageProcessor: a square resize without cropping,
            // mean/std 0.5 ("IMAGENET_STANDARD").
            Some(k) if k.starts_with("Siglip") => Self {
                resize: ResizeTarget::Exact {
                    height: 224,
                    width: 224,
                },
                resample: 3,
                center_crop: false,
                mean: [0.5; 3],
                std: [0.5; 3],
            },
            // CLIPImageProcessor (and CLIPFeatureExtractor, unnamed
            // configs): shortest side, centre crop, OpenAI's statistics.
            _ => Self {
                resize: ResizeTarget::ShortestEdge(224),
                resample: 3,
                center_crop: true,
                mean: OPENAI_CLIP_MEAN,
                std: OPENAI_CLIP_STD,
            },
        }
    }
}

fn three(name: &str, v: Option<Vec<f32>>, default: [f32; 3]) -> Result<[f32; 3], String> {
    match v {
        None => Ok(default),
        Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
        Some(v) if v.len() == 1 => Ok([v[0]; 3]),
        Some(v) => Err(format!("{name} has {} values, expected 3", v.len())),
    }
}

impl ClipPreprocessor {
    /// OpenAI CLIP ViT-B/32's preprocessing (224, bicubic, OpenAI mean/std).
    pub fn openai(size: u32) -> Self {
        Self {
            resize: Some(ResizeTarget::ShortestEdge(size)),
            resample: Resample::Bicubic,
            crop: Some((size, size)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
            crop_origin: CropOrigin::Floor,
            alpha: AlphaMode::OnWhite,
        }
    }

    /// Parses `preprocessor_config.json` text. Accepts both the old integer
    /// form (`"size": 224`) and the dict form (`{"shortest_edge": 224}`).
    pub fn from_json(json: &str) -> Result<Self, EmbedError> {
        let bad = |reason: String| EmbedError::ModelLoad {
            model: "preprocessor_config.json".into(),
            reason,
            source: None,
        };
        let raw: RawConfig = serde_json::from_str(json)
            .map_err(|e| bad(format!("not a valid preprocessor config: {e}")))?;
        let defaults = Defaults::for_processor(raw.image_processor_type.as_deref());
        let naflex = matches!(defaults.resize, ResizeTarget::Patches { .. });
        let resize = if naflex {
            // transformers' NaFlex processor ignores `size` (the size is
            // found per image) and always resizes: without it the image's
            // edges would be cut to whole patches, which nothing needs.
            if raw.do_resize == Some(false) {
                return Err(bad(
                    "do_resize false with Siglip2ImageProcessor (NaFlex) is not supported".into(),
                ));
            }
            let (patch, max_patches) = (
                raw.patch_size.unwrap_or(16),
                raw.max_num_patches.unwrap_or(256),
            );
            if patch == 0 || !(1..=MAX_PATCHES).contains(&max_patches) || patch > 1024 {
                return Err(bad(format!(
                    "patch_size {patch} and max_num_patches {max_patches}: need a patch of \
                     1 to 1024 pixels and 1 to 16384 patches"
                )));
            }
            Some(ResizeTarget::Patches { patch, max_patches })
        } else if raw.do_resize.unwrap_or(true) {
            Some(match raw.size {
                None => defaults.resize,
                Some(SizeSpec::Int(n)) => ResizeTarget::ShortestEdge(n),
                Some(SizeSpec::Dict {
                    shortest_edge: Some(n),
                    ..
                }) => ResizeTarget::ShortestEdge(n),
                Some(SizeSpec::Dict {
                    height: Some(height),
                    width: Some(width),
                    ..
                }) => ResizeTarget::Exact { height, width },
                Some(SizeSpec::Dict { .. }) => {
                    return Err(bad(
                        "`size` needs `shortest_edge` or `height` and `width`".into()
                    ));
                }
            })
        } else {
            None
        };
        let crop = if raw.do_center_crop.unwrap_or(defaults.center_crop) {
            Some(match raw.crop_size {
                None => match resize {
                    Some(ResizeTarget::ShortestEdge(n)) => (n, n),
                    Some(ResizeTarget::Exact { height, width }) => (height, width),
                    Some(ResizeTarget::Patches { .. }) => {
                        return Err(bad(
                            "a centre crop with NaFlex resizing is not supported".into()
                        ));
                    }
                    None => (224, 224),
                },
                Some(SizeSpec::Int(n)) => (n, n),
                Some(SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    ..
                }) => (h, w),
                Some(SizeSpec::Dict {
                    shortest_edge: Some(n),
                    ..
                }) => (n, n),
                Some(SizeSpec::Dict { .. }) => {
                    return Err(bad("`crop_size` needs `height` and `width`".into()));
                }
            })
        } else {
            None
        };
        let resize_empty = match resize {
            Some(ResizeTarget::ShortestEdge(n)) => n == 0,
            Some(ResizeTarget::Exact { height, width }) => height == 0 || width == 0,
            Some(ResizeTarget::Patches { .. }) | None => false,
        };
        if resize_empty || crop.is_some_and(|(h, w)| h == 0 || w == 0) {
            return Err(bad("`size` and `crop_size` must be positive".into()));
        }
        let resample =
            Resample::from_pil(raw.resample.unwrap_or(defaults.resample)).map_err(bad)?;
        let rescale_factor = raw
            .do_rescale
            .unwrap_or(true)
            .then_some(raw.rescale_factor.unwrap_or(1.0 / 255.0));
        let normalize = if raw.do_normalize.unwrap_or(true) {
            let mean = three("image_mean", raw.image_mean, defaults.mean).map_err(bad)?;
            let std = three("image_std", raw.image_std, defaults.std).map_err(bad)?;
            if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
                return Err(bad("image_std must be finite and non-zero".into()));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            resize,
            resample,
            crop,
            rescale_factor,
            normalize,
            crop_origin: CropOrigin::Floor,
            alpha: AlphaMode::OnWhite,
        })
    }

    /// The preprocessing of an open_clip checkpoint, from its
    /// `open_clip_config.json`: `preprocess_cfg` (mean, std,
    /// interpolation, resize mode; open_clip's defaults where absent: OpenAI's
    /// statistics, bicubic, shortest side) and the vision tower's
    /// `image_size`, as open_clip's `image_transform` composes them for
    /// inference: torchvision's `Resize` of the shortest side (Pillow's
    /// filter, the same rounding as transformers) and `CenterCrop` (whose
    /// origin rounds halves to even), or a squash to the square.
    ///
    /// ```
    /// use mmembed_media::{ClipPreprocessor, CropOrigin, Resample};
    /// let p = ClipPreprocessor::from_open_clip_json(r#"{
    ///     "model_cfg": {"vision_cfg": {"image_size": 256}},
    ///     "preprocess_cfg": {"mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear"}}"#)?;
    /// assert_eq!((p.output_size(), p.resample, p.crop_origin), ((256, 256), Resample::Bilinear, CropOrigin::RoundHalfEven));
    /// # Ok::<(), mmembed_core::EmbedError>(())
    /// ```
    pub fn from_open_clip_json(json: &str) -> Result<Self, EmbedError> {
        let bad = |reason: String| EmbedError::ModelLoad {
            model: "open_clip_config.json".into(),
            reason,
            source: None,
        };
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let size = match v.pointer("/model_cfg/vision_cfg/image_size") {
            None => 224,
            Some(serde_json::Value::Array(hw)) if hw.len() == 2 && hw[0] == hw[1] => {
                hw[0].as_u64().unwrap_or(0)
            }
            Some(x) => x.as_u64().unwrap_or(0),
        };
        let size = u32::try_from(size)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("vision_cfg: image_size must be a positive square size".into()))?;
        let p = v.get("preprocess_cfg").cloned().unwrap_or_default();
        let three_of = |k: &str, d: [f32; 3]| -> Result<[f32; 3], EmbedError> {
            let v = match p.get(k) {
                None | Some(serde_json::Value::Null) => None,
                Some(x) => Some(
                    serde_json::from_value::<Vec<f32>>(x.clone())
                        .map_err(|e| bad(format!("preprocess_cfg.{k}: {e}")))?,
                ),
            };
            three(k, v, d).map_err(bad)
        };
        let mean = three_of("mean", OPENAI_CLIP_MEAN)?;
        let std = three_of("std", OPENAI_CLIP_STD)?;
        if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(bad("preprocess_cfg.std must be finite and non-zero".into()));
        }
        let resample = match p.get("interpolation").and_then(|x| x.as_str()) {
            None | Some("bicubic") | Some("random") => Resample::Bicubic,
            Some("bilinear") => Resample::Bilinear,
            Some(other) => {
                return Err(bad(format!(
                    "preprocess_cfg: interpolation `{other}` is not supported (bicubic, bilinear)"
                )));
            }
        };
        let (resize, crop) = match p.get("resize_mode").and_then(|x| x.as_str()) {
            None | Some("shortest") => (ResizeTarget::ShortestEdge(size), Some((size, size))),
            Some("squash") => (
                ResizeTarget::Exact {
                    height: size,
                    width: size,
                },
                None,
            ),
            Some(other) => {
                return Err(bad(format!(
                    "preprocess_cfg: resize_mode `{other}` is not supported (shortest, squash)"
                )));
            }
        };
        Ok(Self {
            resize: Some(resize),
            resample,
            crop,
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((mean, std)),
            crop_origin: CropOrigin::RoundHalfEven,
            alpha: AlphaMode::ResizedThenDropped,
        })
    }

    /// Reads `preprocessor_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self, EmbedError> {
        let text = std::fs::read_to_string(path).map_err(|e| EmbedError::ModelLoad {
            model: path.display().to_string(),
            reason: "cannot read preprocessor_config.json".into(),
            source: Some(Arc::new(e)),
        })?;
        Self::from_json(&text).map_err(|e| match e {
            EmbedError::ModelLoad { reason, source, .. } => EmbedError::ModelLoad {
                model: path.display().to_string(),
                reason,
                source,
            },
            other => other,
        })
    }

    /// `(height, width)` of the tensor [`preprocess`](Self::preprocess) makes
    /// (for an image of any size when a crop is configured); `(0, 0)` where
    /// it varies with the image (no resize nor crop, or
    /// [`ResizeTarget::Patches`]: see [`max_output_pixels`](Self::max_output_pixels)).
    pub fn output_size(&self) -> (u32, u32) {
        match (self.crop, self.resize) {
            (Some(c), _) => c,
            (None, Some(ResizeTarget::Exact { height, width })) => (height, width),
            (None, Some(ResizeTarget::ShortestEdge(n))) => (n, n),
            (None, Some(ResizeTarget::Patches { .. }) | None) => (0, 0),
        }
    }

    /// The most pixels an output may have: the fixed output's, or for
    /// [`ResizeTarget::Patches`] the patch budget's; `None` without a
    /// bound (no resize nor crop).
    ///
    /// ```
    /// use mmembed_media::ClipPreprocessor;
    /// let p = ClipPreprocessor::from_json(r#"{"image_processor_type": "Siglip2ImageProcessor",
    ///     "patch_size": 16, "max_num_patches": 256}"#)?;
    /// assert_eq!((p.output_size(), p.max_output_pixels()), ((0, 0), Some(65_536)));
    /// # Ok::<(), mmembed_core::EmbedError>(())
    /// ```
    pub fn max_output_pixels(&self) -> Option<u64> {
        match (self.crop, self.resize) {
            (None, Some(ResizeTarget::Patches { patch, max_patches })) => {
                Some(u64::from(patch) * u64::from(patch) * u64::from(max_patches))
            }
            (None, None) => None,
            _ => {
                let (h, w) = self.output_size();
                Some(u64::from(h) * u64::from(w))
            }
        }
    }

    /// Size after the resize step, with Hugging Face's rounding
    /// (`int(size * long / short)`, truncating).
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.resize {
            None => (width, height),
            Some(ResizeTarget::Exact { height, width }) => (width, height),
            Some(ResizeTarget::Patches { patch, max_patches }) => {
                patch_grid_size(width, height, patch, max_patches)
            }
            Some(ResizeTarget::ShortestEdge(n)) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // f64 like Python's float division, then truncation like int().
                let new_long = (f64::from(n) * f64::from(long) / f64::from(short)) as u32;
                if width <= height {
                    (n, new_long.max(1))
                } else {
                    (new_long.max(1), n)
                }
            }
        }
    }

    /// Decodes an image for this preprocessing: [`decode_image`], or where
    /// `draft` allows [`decode_image_draft`] reduced no further than this
    /// resize's size for it ([`resized_size`](Self::resized_size)), so the crop is
    /// made from at least as many pixels as it has. Transparency is
    /// composited onto white here whatever [`alpha`](Self::alpha) says:
    /// for [`AlphaMode::ResizedThenDropped`] take the model's pixels of a
    /// transparent image from [`decode_crop_into`](Self::decode_crop_into)
    /// or [`decode_resize_into`](Self::decode_resize_into), which resize
    /// with the alpha.
    ///
    /// [`decode_image`]: crate::decode_image
    /// [`decode_image_draft`]: crate::decode_image_draft
    pub fn decode(
        &self,
        bytes: &[u8],
        what: &str,
        limits: &crate::ImageLimits,
        draft: crate::Draft,
    ) -> Result<RgbImage, EmbedError> {
        if draft.any() {
            crate::decode_image_draft(bytes, what, limits, draft, |w, h| self.resized_size(w, h))
        } else {
            crate::decode_image(bytes, what, limits)
        }
    }

    /// Resizes and centre-crops in uint8, returning the cropped image: the
    /// exact pixels that get normalised.
    ///
    /// When the crop lies inside the resized image, only the cropped window
    /// is computed, by resizing the matching source box. The filter weights
    /// are the same as for the full resize (Pillow's box semantics: support
    /// clipped to the whole image, not the box), so the pixels are identical,
    /// while time and memory stay bounded for extreme aspect ratios (a
    /// 1x5000 image would otherwise resize to 224x1,120,000).
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        self.resize_and_crop_columns(img.into())
            .unwrap_or_else(|_| unreachable!("the whole image holds every column"))
    }

    /// The crop as a window of the resize, when it lies inside the resized
    /// image; `None` when the image is resized (if at all) and then
    /// cropped or padded.
    fn crop_box(&self, (w, h): (u32, u32)) -> Option<CropBox> {
        let (rw, rh) = self.resized_size(w, h);
        let (ch, cw) = self.crop?;
        let top = self.crop_origin.offset(i64::from(rh) - i64::from(ch));
        let left = self.crop_origin.offset(i64::from(rw) - i64::from(cw));
        if top < 0 || left < 0 || (rw, rh) == (w, h) {
            return None;
        }
        let (sx, sy) = (f64::from(w) / f64::from(rw), f64::from(h) / f64::from(rh));
        let src_box = [
            left as f64 * sx,
            top as f64 * sy,
            f64::from(cw) * sx,
            f64::from(ch) * sy,
        ];
        Some(CropBox {
            src_box,
            crop: (cw, ch),
            whole: (rw, rh),
        })
    }

    /// The columns of an image `(w, h)` that
    /// [`resize_and_crop`](Self::resize_and_crop) reads.
    fn columns_read(&self, (w, h): (u32, u32)) -> std::ops::Range<u32> {
        match self.crop_box((w, h)) {
            Some(CropBox {
                src_box: [l, t, bw, bh],
                crop: (cw, _),
                ..
            }) => crate::pillow::columns_read(w, cw, self.resample, [l, t, l + bw, t + bh]),
            None => 0..w,
        }
    }

    /// [`resize_and_crop`](Self::resize_and_crop) of an image of which
    /// `img` may hold only the columns [`columns_read`](Self::columns_read)
    /// names (an error if it lacks one).
    fn resize_and_crop_columns(&self, img: Columns<'_>) -> Result<RgbImage, String> {
        let (w, h) = (img.width, img.image.height());
        if let Some(b) = self.crop_box((w, h)) {
            return resize_rgb(img, b.crop, self.resample, Some((b.src_box, b.whole)));
        }
        if (img.x0, img.image.width()) != (0, w) {
            return Err(format!(
                "the whole image is read, the decoded columns are {}..",
                img.x0
            ));
        }
        let (rw, rh) = self.resized_size(w, h);
        let resized = if (rw, rh) == (w, h) {
            img.image.clone()
        } else {
            resize_rgb(img, (rw, rh), self.resample, None)?
        };
        Ok(match self.crop {
            Some((ch, cw)) => center_crop(&resized, ch, cw, self.crop_origin),
            None => resized,
        })
    }

    /// [`decode`](Self::decode) and [`crop_into`](Self::crop_into) in one
    /// step, in which a JPEG decodes only the columns the crop reads (and
    /// a margin), by libjpeg-turbo's partial decompression: its inverse DCT,
    /// colour conversion and output skip the rest (a fifth of a 640×480
    /// photo's columns for a 224 centre crop). The entropy decoding still
    /// reads every block, so what is refused is unchanged, and the crop's
    /// bytes are those of the whole decode (tested on every subsampling,
    /// progressive files, odd sizes and reductions).
    ///
    /// `out` must hold the crop's `H × W × 3` bytes, as for
    /// [`crop_into`](Self::crop_into).
    ///
    /// ```
    /// use mmembed_media::{ClipPreprocessor, Draft, ImageLimits};
    /// let mut jpeg = Vec::new();
    /// image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([x as u8, y as u8, 90]))
    ///     .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
    ///     .unwrap();
    /// let clip = ClipPreprocessor::openai(224);
    /// let mut row = vec![0u8; 224 * 224 * 3];
    /// clip.decode_crop_into(&jpeg, "photo.jpg", &ImageLimits::default(), Draft::NONE, &mut row)?;
    ///
    /// // The same bytes as decoding the whole image first.
    /// let whole = clip.decode(&jpeg, "photo.jpg", &ImageLimits::default(), Draft::NONE)?;
    /// let mut expected = vec![0u8; row.len()];
    /// clip.crop_into(&whole, &mut expected).unwrap();
    /// assert_eq!(row, expected);
    /// # Ok::<(), mmembed_core::EmbedError>(())
    /// ```
    pub fn decode_crop_into(
        &self,
        bytes: &[u8],
        what: &str,
        limits: &crate::ImageLimits,
        draft: crate::Draft,
        out: &mut [u8],
    ) -> Result<(), EmbedError> {
        let crop = self.decode_resized(bytes, what, limits, draft)?;
        self.crop_bytes_into(&crop, out)
            .map_err(|e| EmbedError::media(what, e, None))
    }

    /// [`decode_crop_into`](Self::decode_crop_into) for an output whose
    /// size may vary with the image ([`ResizeTarget::Patches`]): the bytes
    /// go to the start of `out`, which must hold at least them (room for
    /// [`max_output_pixels`](Self::max_output_pixels) always does), and
    /// the output's `(width, height)` is returned.
    pub fn decode_resize_into(
        &self,
        bytes: &[u8],
        what: &str,
        limits: &crate::ImageLimits,
        draft: crate::Draft,
        out: &mut [u8],
    ) -> Result<(u32, u32), EmbedError> {
        let img = self.decode_resized(bytes, what, limits, draft)?;
        bytes_into_start(&img, out).map_err(|e| EmbedError::media(what, e, None))
    }

    fn decode_resized(
        &self,
        bytes: &[u8],
        what: &str,
        limits: &crate::ImageLimits,
        draft: crate::Draft,
    ) -> Result<RgbImage, EmbedError> {
        let size = |w, h| self.resized_size(w, h);
        let need = draft
            .any()
            .then_some(crate::image::Need { size: &size, draft });
        let columns = |w, h| self.columns_read((w, h));
        let keep_alpha = self.alpha == AlphaMode::ResizedThenDropped;
        let mut decoded =
            crate::image::decode(bytes, what, limits, need, Some(&columns), keep_alpha)?;
        let fail = |e| EmbedError::media(what, e, None);
        // open_clip's way (AlphaMode::ResizedThenDropped) when the image is
        // resized: the colours premultiplied for the resize and divided
        // after, per pixel (so before or after the crop alike). Pillow's
        // resize of an image to its own size is a copy, so without a
        // resize the colours are the stored ones, as without alpha.
        let (w, h) = (decoded.width, decoded.image.height());
        let resized = self.resized_size(w, h) != (w, h);
        let Some(alpha) = decoded.alpha.take().filter(|_| resized) else {
            return self
                .resize_and_crop_columns(decoded.columns())
                .map_err(fail);
        };
        crate::image::premultiply(&mut decoded.image, &alpha);
        let mut out = self
            .resize_and_crop_columns(decoded.columns())
            .map_err(fail)?;
        let alpha = self
            .resize_and_crop_columns(crate::pillow::Columns {
                image: &alpha,
                x0: decoded.x0,
                width: decoded.width,
            })
            .map_err(fail)?;
        crate::image::unpremultiply(&mut out, &alpha);
        Ok(out)
    }

    /// [`resize_and_crop`](Self::resize_and_crop) into the start of `out`,
    /// as [`decode_resize_into`](Self::decode_resize_into) writes it;
    /// returns the output's `(width, height)`.
    pub fn resize_into(&self, img: &RgbImage, out: &mut [u8]) -> Result<(u32, u32), String> {
        bytes_into_start(&self.resize_and_crop(img), out)
    }

    /// The model input for one image: `3 × H × W` floats, channel-first.
    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        let cropped = self.resize_and_crop(img);
        self.normalize_u8(&cropped)
    }

    /// [`preprocess`](Self::preprocess) into `out`, e.g. an image's slot in
    /// a batch buffer (no buffer of its own, no copy into the batch). `out`
    /// must hold `3 × H × W` floats for [`output_size`](Self::output_size);
    /// an image whose crop is another size (no crop configured) is refused.
    pub fn preprocess_into(&self, img: &RgbImage, out: &mut [f32]) -> Result<(), String> {
        let cropped = self.resize_and_crop(img);
        self.normalize_u8_into(&cropped, out)
    }

    /// [`resize_and_crop`](Self::resize_and_crop) into `out`, e.g. an
    /// image's row of a batch of crops' bytes (what the embedder's batches
    /// carry; the model normalises them). `out` must hold the crop's
    /// `H × W × 3` bytes; a crop of another size (no crop configured) is
    /// refused.
    pub fn crop_into(&self, img: &RgbImage, out: &mut [u8]) -> Result<(), String> {
        self.crop_bytes_into(&self.resize_and_crop(img), out)
    }

    fn crop_bytes_into(&self, crop: &RgbImage, out: &mut [u8]) -> Result<(), String> {
        if crop.as_raw().len() != out.len() {
            let (w, h) = crop.dimensions();
            return Err(format!(
                "preprocessed to {w}x{h}, {} bytes; the model's input is {} bytes",
                crop.as_raw().len(),
                out.len()
            ));
        }
        out.copy_from_slice(crop.as_raw());
        Ok(())
    }

    /// Rescales and normalises an already cropped uint8 image into CHW floats.
    pub fn normalize_u8(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = img.dimensions();
        let mut out = vec![0f32; 3 * (w * h) as usize];
        // The buffer is sized from the image: cannot be refused.
        let _ = self.normalize_u8_into(img, &mut out);
        out
    }

    /// [`normalize_u8`](Self::normalize_u8) into `out`, which must hold
    /// exactly `3 × w × h` floats.
    pub fn normalize_u8_into(&self, img: &RgbImage, out: &mut [f32]) -> Result<(), String> {
        let (w, h) = img.dimensions();
        if out.len() != img.as_raw().len() {
            return Err(format!(
                "a {w}x{h} image is {} values, the buffer holds {}",
                img.as_raw().len(),
                out.len()
            ));
        }
        self.normalize_hwc_into(img.as_raw(), out)
    }

    /// Rescales and normalises `w × h` RGB pixels, row-major with the
    /// channels interleaved (an [`RgbImage`]'s bytes), into CHW floats:
    /// `out` must hold one float per byte.
    pub fn normalize_hwc_into(&self, hwc: &[u8], out: &mut [f32]) -> Result<(), String> {
        if out.len() != hwc.len() || !hwc.len().is_multiple_of(3) {
            return Err(format!(
                "{} pixel bytes and {} floats: need 3 per pixel, one float per byte",
                hwc.len(),
                out.len()
            ));
        }
        let plane = hwc.len() / 3;
        let scale = self.rescale_factor.unwrap_or(1.0);
        let (mean, std) = self.normalize_stats();
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        // Op by op as written (no fused multiply-add): a GPU that gets the
        // crops' bytes repeats these three steps and gets the same floats.
        for (((p, r), g), b) in hwc.chunks_exact(3).zip(r).zip(g).zip(b) {
            *r = (f32::from(p[0]) * scale - mean[0]) / std[0];
            *g = (f32::from(p[1]) * scale - mean[1]) / std[1];
            *b = (f32::from(p[2]) * scale - mean[2]) / std[2];
        }
        Ok(())
    }

    /// Per-channel mean and std, `([0; 3], [1; 3])` when there is no
    /// normalisation step.
    pub fn normalize_stats(&self) -> ([f32; 3], [f32; 3]) {
        self.normalize.unwrap_or(([0.0; 3], [1.0; 3]))
    }
}

/// An image's bytes at the start of `out`; its `(width, height)`.
fn bytes_into_start(img: &RgbImage, out: &mut [u8]) -> Result<(u32, u32), String> {
    let raw = img.as_raw();
    let (w, h) = img.dimensions();
    match out.get_mut(..raw.len()) {
        Some(dst) => {
            dst.copy_from_slice(raw);
            Ok((w, h))
        }
        None => Err(format!(
            "preprocessed to {w}x{h}, {} bytes; room for {}",
            raw.len(),
            out.len()
        )),
    }
}

/// A centre crop inside the resized image, as a resize of a source box.
struct CropBox {
    /// `[left, top, width, height]` of the source.
    src_box: [f64; 4],
    /// `(width, height)` of the crop.
    crop: (u32, u32),
    /// `(width, height)` of the whole resize.
    whole: (u32, u32),
}

/// Resizes `img` (or the source box `[left, top, width, height]` of it) to
/// `w × h` with Pillow's arithmetic.
/// `window`: the source box `[left, top, width, height]` of a window of a
/// whole resize to `(width, height)`.
fn resize_rgb(
    img: Columns<'_>,
    (w, h): (u32, u32),
    resample: Resample,
    window: Option<([f64; 4], (u32, u32))>,
) -> Result<RgbImage, String> {
    let (sw, sh) = (img.width, img.image.height());
    let (bx, whole) = match window {
        Some(([l, t, bw, bh], whole)) => ([l, t, l + bw, t + bh], whole),
        None => ([0.0, 0.0, f64::from(sw), f64::from(sh)], (w, h)),
    };
    crate::pillow::resize(img, w, h, resample, bx, whole)
}

/// Hugging Face's `center_crop`: offsets `(orig - crop) // 2` with Python's
/// floor division; parts of the crop outside the image are zero.
fn center_crop(img: &RgbImage, ch: u32, cw: u32, origin: CropOrigin) -> RgbImage {
    let (w, h) = img.dimensions();
    let top = origin.offset(i64::from(h) - i64::from(ch));
    let left = origin.offset(i64::from(w) - i64::from(cw));
    if top >= 0 && left >= 0 {
        return image::imageops::crop_imm(img, left as u32, top as u32, cw, ch).to_image();
    }
    let mut out = RgbImage::new(cw, ch);
    for y in 0..ch {
        let sy = i64::from(y) + top;
        if sy < 0 || sy >= i64::from(h) {
            continue;
        }
        for x in 0..cw {
            let sx = i64::from(x) + left;
            if sx >= 0 && sx < i64::from(w) {
                out.put_pixel(x, y, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Draft;

    /// transformers' `get_image_size_for_max_num_patches` (5.25) on 80
    /// random sizes, patches and budgets (1 to 100,000 pixels a side, budgets
    /// of 1 to 1,024): `(width, height, patch, max_patches, width', height')`.
    /// Made with `get_image_size_for_max_num_patches(h, w, p, m)` from
    /// `transformers.models.siglip2.image_processing_pil_siglip2`.
    #[test]
    fn patch_grid_size_matches_transformers() {
        #[rustfmt::skip]
        const CASES: [(u32, u32, u32, u32, u32, u32); 80] = [
        (4059,3,32,1024,32768,32),
        (56724,25,8,1024,8192,8),
        (1,2,8,1,8,8),
        (1,42,14,256,42,1190),
        (1793,3,16,1,16,16),
        (12,1,32,576,1216,128),
        (4091,3,8,256,2048,8),
        (12,54305,8,256,8,2048),
        (3222,2,8,256,2048,8),
        (7,2528,14,576,14,5068),
        (53013,101,16,576,8400,16),
        (1,35295,32,1024,32,32768),
        (3491,1059,16,576,688,208),
        (32,36,8,576,184,200),
        (7,2713,14,1,14,14),
        (682,4255,8,48,24,128),
        (1,2201,14,2,14,28),
        (18,22040,32,256,32,8192),
        (22,8,8,48,88,32),
        (1,4179,32,2,32,64),
        (7,58415,32,2,32,64),
        (2632,51761,8,1024,56,1104),
        (20,1,16,1024,2000,112),
        (1,3,14,576,112,308),
        (7,1406,16,1,16,16),
        (1,14,32,48,64,768),
        (1,3,14,2,14,28),
        (1,3,32,576,128,320),
        (1,4378,8,2,8,16),
        (78671,2,16,48,768,16),
        (4948,3,14,576,8064,14),
        (7,1,14,48,224,42),
        (29323,1,8,48,384,8),
        (1,2422,8,48,8,384),
        (7,1,32,2,64,32),
        (1,21940,32,256,32,8192),
        (1,3,14,1024,112,308),
        (4888,1,32,48,1536,32),
        (39,3,14,576,1148,98),
        (7,50,14,48,42,224),
        (733,1,8,1024,5864,8),
        (7,37,16,576,160,848),
        (1,1,14,2,14,14),
        (1,1,8,1024,104,104),
        (1,3,16,1,16,16),
        (1,2,16,2,16,32),
        (81728,71499,14,2,28,14),
        (1,2,32,256,128,224),
        (3714,36,16,2,32,16),
        (1,3200,16,576,16,9216),
        (52141,2,32,2,64,32),
        (1,40,32,1024,128,4000),
        (3923,3,16,576,9216,16),
        (4,2,14,576,406,210),
        (45,3,14,1024,1680,112),
        (67365,1,32,2,64,32),
        (428,2,16,256,3424,16),
        (3,71333,8,48,8,384),
        (7,686,32,256,64,4096),
        (1,26,32,576,128,2624),
        (2275,15479,8,2,8,16),
        (2,1,14,2,28,14),
        (18,2,32,2,64,32),
        (1712,35,14,48,672,14),
        (48,198,14,1,14,14),
        (28,3,16,1,16,16),
        (2497,8,16,1024,8192,32),
        (7,1,8,48,128,24),
        (4186,94672,32,1024,224,4672),
        (29,2,8,1024,928,64),
        (1,25,32,1024,128,2528),
        (1279,1,16,2,32,16),
        (2168,1,16,2,32,16),
        (30,2,8,1024,960,64),
        (7,3,14,1024,672,294),
        (7,83359,14,2,14,28),
        (45,1,32,576,4512,128),
        (42,3,14,256,784,56),
        (7,36,16,576,176,832),
        (3299,1,14,48,672,14),
        ];
        for (w, h, p, m, tw, th) in CASES {
            assert_eq!(
                patch_grid_size(w, h, p, m),
                (tw, th),
                "{w}x{h} in {m} patches of {p}"
            );
            assert!((tw / p) * (th / p) <= m.max(1));
        }
    }

    #[test]
    fn naflex_configs_are_read_and_checked() {
        let p = ClipPreprocessor::from_json(
            r#"{"image_processor_type": "Siglip2ImageProcessorFast", "max_num_patches": 48,
                "patch_size": 8, "size": {"height": 224, "width": 224}}"#,
        )
        .unwrap();
        assert_eq!(
            (p.resize, p.resample, p.crop, p.normalize),
            (
                Some(ResizeTarget::Patches {
                    patch: 8,
                    max_patches: 48
                }),
                Resample::Bilinear,
                None,
                Some(([0.5; 3], [0.5; 3]))
            )
        );
        assert_eq!(p.resized_size(451, 300), (64, 48));
        let img = RgbImage::from_pixel(451, 300, image::Rgb([1, 2, 3]));
        let mut out = vec![9u8; 48 * 64 * 3];
        assert!(p.resize_into(&img, &mut out[..64 * 48 * 3 - 1]).is_err());
        let mut out = vec![9u8; 48 * 64 * 3 + 1];
        assert_eq!(p.resize_into(&img, &mut out).unwrap(), (64, 48));
        assert_eq!((out[0], out[1], out[2], out[48 * 64 * 3]), (1, 2, 3, 9));
        for bad in [
            r#"{"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 0}"#,
            r#"{"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 16385}"#,
            r#"{"image_processor_type": "Siglip2ImageProcessor", "patch_size": 0}"#,
            r#"{"image_processor_type": "Siglip2ImageProcessor", "do_resize": false}"#,
            r#"{"image_processor_type": "Siglip2ImageProcessor", "do_center_crop": true}"#,
        ] {
            assert!(ClipPreprocessor::from_json(bad).is_err(), "{bad}");
        }
    }

    /// open_clip's alpha without a resize: Pillow's resize of an image to
    /// its own size is a copy, so the crop shows the colours as stored,
    /// however transparent (checked with open_clip's transform and Pillow
    /// 13 on a random 256x300 RGBA image: rows 22..278 as stored).
    /// transformers' way composites onto white instead.
    #[test]
    fn open_clip_alpha_without_a_resize_keeps_the_stored_colours() {
        let rgba = image::RgbaImage::from_fn(256, 300, |x, y| {
            image::Rgba([x as u8, y as u8, (x * 7 + y) as u8, (x + 3 * y) as u8])
        });
        let mut png = Vec::new();
        rgba.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let open_clip = ClipPreprocessor::from_open_clip_json(
            r#"{"model_cfg": {"vision_cfg": {"image_size": 256}}}"#,
        )
        .unwrap();
        assert_eq!(open_clip.alpha, AlphaMode::ResizedThenDropped);
        let limits = crate::ImageLimits::default();
        let mut row = vec![0u8; 256 * 256 * 3];
        open_clip
            .decode_crop_into(&png, "a.png", &limits, Draft::NONE, &mut row)
            .unwrap();
        let want: Vec<u8> = (22..278)
            .flat_map(|y| (0..256).flat_map(move |x| [x as u8, y as u8, (x * 7 + y) as u8]))
            .collect();
        assert!(row == want, "not the stored colours");
        let mut hf = open_clip.clone();
        hf.alpha = AlphaMode::OnWhite;
        let mut on_white = vec![0u8; row.len()];
        hf.decode_crop_into(&png, "a.png", &limits, Draft::NONE, &mut on_white)
            .unwrap();
        assert_ne!(on_white, want);
    }

    /// torchvision's `int(round((size - crop) / 2.0))` against
    /// transformers' `(size - crop) // 2`: they differ on odd margins whose
    /// half rounds up to even (383 - 256 = 127: 64 against 63).
    #[test]
    fn crop_origins_round_as_their_libraries_do() {
        for (margin, floor, even) in [
            (0, 0, 0),
            (1, 0, 0),
            (3, 1, 2),
            (5, 2, 2),
            (39, 19, 20),
            (127, 63, 64),
            (128, 64, 64),
        ] {
            assert_eq!(CropOrigin::Floor.offset(margin), floor, "{margin}");
            assert_eq!(CropOrigin::RoundHalfEven.offset(margin), even, "{margin}");
        }
    }

    #[test]
    fn open_clip_preprocessing_is_read_or_refused() {
        let p = ClipPreprocessor::from_open_clip_json(
            r#"{"model_cfg": {"vision_cfg": {"image_size": [224, 224]}}}"#,
        )
        .unwrap();
        // open_clip's defaults: OpenAI statistics, bicubic, shortest side.
        assert_eq!(p.normalize, Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)));
        assert_eq!(
            (p.resample, p.resize, p.crop),
            (
                Resample::Bicubic,
                Some(ResizeTarget::ShortestEdge(224)),
                Some((224, 224))
            )
        );
        let squash = ClipPreprocessor::from_open_clip_json(r#"{"model_cfg": {"vision_cfg": {"image_size": 64}}, "preprocess_cfg": {"resize_mode": "squash"}}"#).unwrap();
        assert_eq!(
            (squash.resize, squash.crop),
            (
                Some(ResizeTarget::Exact {
                    height: 64,
                    width: 64
                }),
                None
            )
        );
        for (json, needle) in [
            (
                r#"{"preprocess_cfg": {"resize_mode": "longest"}}"#,
                "resize_mode",
            ),
            (
                r#"{"preprocess_cfg": {"interpolation": "lanczos"}}"#,
                "interpolation",
            ),
            (r#"{"preprocess_cfg": {"std": [1, 0, 1]}}"#, "std"),
            (
                r#"{"model_cfg": {"vision_cfg": {"image_size": [224, 256]}}}"#,
                "square",
            ),
            ("[", "JSON"),
        ] {
            let e = ClipPreprocessor::from_open_clip_json(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn parses_both_config_forms() {
        let old = ClipPreprocessor::from_json(
            r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#,
        )
        .unwrap();
        let new = ClipPreprocessor::from_json(
            r#"{"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224},
                "rescale_factor": 0.00392156862745098, "image_processor_type": "CLIPImageProcessor"}"#,
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old, ClipPreprocessor::openai(224));
    }

    #[test]
    fn laion_style_mean_and_siglip_style_exact_size() {
        let p = ClipPreprocessor::from_json(
            r#"{"size": {"height": 256, "width": 256}, "do_center_crop": false,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}"#,
        )
        .unwrap();
        assert_eq!(
            p.resize,
            Some(ResizeTarget::Exact {
                height: 256,
                width: 256
            })
        );
        assert_eq!(p.resample, Resample::Bilinear);
        assert_eq!(p.output_size(), (256, 256));
        let white = RgbImage::from_pixel(300, 100, image::Rgb([255, 255, 255]));
        let v = p.preprocess(&white);
        assert_eq!(v.len(), 3 * 256 * 256);
        assert!(v.iter().all(|x| (x - 1.0).abs() < 1e-6));
    }

    #[test]
    fn siglip_processor_defaults_are_siglips() {
        // Only the processor named: transformers' SiglipImageProcessor fills
        // in a 224 x 224 squash, no crop, mean/std 0.5 (not CLIP's).
        let p = ClipPreprocessor::from_json(r#"{"image_processor_type": "SiglipImageProcessor"}"#)
            .unwrap();
        assert_eq!(
            p.resize,
            Some(ResizeTarget::Exact {
                height: 224,
                width: 224
            })
        );
        assert_eq!(p.crop, None);
        assert_eq!(p.normalize, Some(([0.5; 3], [0.5; 3])));
        // A wide image is squashed, not cropped: its left and right edges
        // survive.
        let mut img = RgbImage::from_pixel(600, 100, image::Rgb([0, 0, 0]));
        for y in 0..100 {
            img.put_pixel(0, y, image::Rgb([255, 255, 255]));
        }
        let out = p.resize_and_crop(&img);
        assert_eq!(out.dimensions(), (224, 224));
        assert!(out.get_pixel(0, 112)[0] > 50);
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            r#"{"image_std": [0, 1, 1]}"#,
            r#"{"image_mean": [0.5, 0.5]}"#,
            r#"{"resample": 9}"#,
            r#"{"size": {"longest_edge": 3}}"#,
            r#"{"size": 0}"#,
            r#"{"crop_size": {"height": 0, "width": 3}}"#,
            "not json",
        ] {
            assert!(ClipPreprocessor::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resized_size_truncates_like_python() {
        let p = ClipPreprocessor::openai(224);
        // int(224 * 451 / 300) = int(336.746...) = 336
        assert_eq!(p.resized_size(451, 300), (336, 224));
        assert_eq!(p.resized_size(180, 400), (224, 497));
        assert_eq!(p.resized_size(1, 1), (224, 224));
        assert_eq!(p.resized_size(1, 5000), (224, 1_120_000));
    }

    #[test]
    fn windowed_resize_equals_resize_then_crop() {
        let img = RgbImage::from_fn(451, 300, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        let p = ClipPreprocessor::openai(224);
        let full = resize_rgb((&img).into(), (336, 224), Resample::Bicubic, None).unwrap();
        let expected = center_crop(&full, 224, 224, CropOrigin::Floor);
        assert_eq!(p.resize_and_crop(&img), expected);
        let tall = RgbImage::from_fn(97, 403, |x, y| image::Rgb([(x * y % 251) as u8, 3, 200]));
        let full = resize_rgb((&tall).into(), (224, 930), Resample::Bicubic, None).unwrap();
        assert_eq!(
            p.resize_and_crop(&tall),
            center_crop(&full, 224, 224, CropOrigin::Floor)
        );
    }

    #[test]
    fn preprocess_into_fills_a_slot_and_refuses_a_wrong_one() {
        // `preprocess` is the path checked against transformers' fixtures;
        // the batch buffer's slots must hold exactly its output.
        let img = RgbImage::from_fn(451, 300, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let p = ClipPreprocessor::openai(32);
        let want = p.preprocess(&img);
        let mut batch = vec![f32::NAN; 3 * want.len()];
        p.preprocess_into(&img, &mut batch[want.len()..2 * want.len()])
            .unwrap();
        assert_eq!(&batch[want.len()..2 * want.len()], &want[..]);
        assert!(
            batch[..want.len()].iter().all(|v| v.is_nan()),
            "neighbours untouched"
        );
        let err = p.preprocess_into(&img, &mut batch[1..]).unwrap_err();
        assert!(err.contains("32x32 image is 3072 values"), "{err}");
    }

    #[test]
    fn crop_into_fills_a_slot_and_refuses_a_wrong_one() {
        let img = RgbImage::from_fn(451, 300, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let p = ClipPreprocessor::openai(32);
        let want = p.resize_and_crop(&img).into_raw();
        let mut batch = vec![0xAAu8; 3 * want.len()];
        p.crop_into(&img, &mut batch[want.len()..2 * want.len()])
            .unwrap();
        assert_eq!(&batch[want.len()..2 * want.len()], &want[..]);
        assert!(
            batch[..want.len()].iter().all(|v| *v == 0xAA),
            "neighbours untouched"
        );
        let err = p.crop_into(&img, &mut batch[1..]).unwrap_err();
        assert!(err.contains("preprocessed to 32x32, 3072 bytes"), "{err}");
    }

    #[test]
    fn extreme_aspect_ratio_stays_cheap() {
        let img = RgbImage::from_pixel(1, 5000, image::Rgb([1, 2, 3]));
        let out = ClipPreprocessor::openai(224).resize_and_crop(&img);
        assert_eq!(out.dimensions(), (224, 224));
        assert_eq!(out.get_pixel(0, 0).0, [1, 2, 3]);
    }

    #[test]
    fn crop_pads_with_zeros_when_image_is_small() {
        let img = RgbImage::from_pixel(3, 2, image::Rgb([9, 9, 9]));
        let c = center_crop(&img, 4, 5, CropOrigin::Floor);
        // top = (2-4)//2 = -1, left = (3-5)//2 = -1
        assert_eq!(c.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(c.get_pixel(1, 1).0, [9, 9, 9]);
        assert_eq!(c.get_pixel(3, 2).0, [9, 9, 9]);
        assert_eq!(c.get_pixel(4, 3).0, [0, 0, 0]);
    }

    #[test]
    fn one_pixel_image_fills_the_crop() {
        let p = ClipPreprocessor::openai(224);
        let img = RgbImage::from_pixel(1, 1, image::Rgb([10, 200, 30]));
        let out = p.resize_and_crop(&img);
        assert_eq!(out.dimensions(), (224, 224));
        assert_eq!(out.get_pixel(100, 100).0, [10, 200, 30]);
    }
}

#[cfg(test)]
mod partial_decode {
    use super::*;
    use crate::jpeg::make::{drop_refinement_scans, encode};
    use crate::{Draft, ImageLimits};

    /// Gradients, edges and noise (xorshift), the same on every run.
    fn picture(w: u32, h: u32, seed: u64) -> RgbImage {
        let mut s = seed | 1;
        RgbImage::from_fn(w, h, |x, y| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let n = (s >> 59) as u32;
            let edge = if (x / 23 + y / 17) % 2 == 0 { 60 } else { 0 };
            image::Rgb([
                ((x * 255 / w.max(1)) + n + edge).min(255) as u8,
                ((y * 255 / h.max(1)) + 2 * n) as u8,
                (((x + y) * 7) % 256) as u8,
            ])
        })
    }

    /// The crop from a partial decode equals the crop from the whole
    /// image's, for every subsampling, progressive files with and without
    /// their refinement scans (which libjpeg smooths across blocks), sizes
    /// that are not multiples of the iMCU, reductions and filters; and the
    /// partial decode does happen (most cases decode fewer columns).
    #[test]
    fn equals_the_whole_decode() {
        let limits = ImageLimits::default();
        let bilinear = ClipPreprocessor::from_json(
            r#"{"size": {"shortest_edge": 96}, "crop_size": 96, "resample": 2}"#,
        )
        .unwrap();
        let nearest = ClipPreprocessor::from_json(
            r#"{"size": {"shortest_edge": 50}, "crop_size": 40, "resample": 0}"#,
        )
        .unwrap();
        let pres = [ClipPreprocessor::openai(224), bilinear, nearest];
        let (mut cases, mut partial, mut bad) = (0, 0, Vec::new());
        let sizes = [
            (640, 480),
            (641, 479),
            (333, 250),
            (1000, 300),
            (250, 333),
            (225, 224),
            (100, 60),
        ];
        for (n, &(w, h)) in sizes.iter().enumerate() {
            let img = picture(w, h, n as u64 + 7);
            for subsamp in 0..7 {
                for scans in ["baseline", "progressive", "coarse"] {
                    let jpeg = encode(&img, subsamp, 90, scans != "baseline");
                    let jpeg = if scans == "coarse" {
                        drop_refinement_scans(&jpeg)
                    } else {
                        jpeg
                    };
                    for (p, pre) in pres.iter().enumerate() {
                        for draft in [Draft::NONE, Draft::JPEG] {
                            let (ch, cw) = pre.output_size();
                            let mut want = vec![0u8; (ch * cw * 3) as usize];
                            let whole = pre.decode(&jpeg, "whole", &limits, draft).unwrap();
                            pre.crop_into(&whole, &mut want).unwrap();
                            let mut got = vec![0u8; want.len()];
                            pre.decode_crop_into(&jpeg, "part", &limits, draft, &mut got)
                                .unwrap();
                            let size = |w, h| pre.resized_size(w, h);
                            let need = draft
                                .any()
                                .then_some(crate::image::Need { size: &size, draft });
                            let cols = |w, h| pre.columns_read((w, h));
                            let d = crate::image::decode(
                                &jpeg,
                                "part",
                                &limits,
                                need,
                                Some(&cols),
                                false,
                            )
                            .unwrap();
                            cases += 1;
                            partial += usize::from(d.image.width() < d.width);
                            let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                            if wrong > 0 {
                                bad.push(format!(
                                    "{w}x{h} subsamp {subsamp} {scans} pre {p} draft {draft:?}: \
                                     {wrong} bytes differ (columns {}.. of {})",
                                    d.x0, d.width
                                ));
                            }
                        }
                    }
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{} of {cases} differ:\n{}",
            bad.len(),
            bad.join("\n")
        );
        assert!(
            partial * 2 > cases,
            "only {partial} of {cases} decoded part of the width"
        );
    }
}
