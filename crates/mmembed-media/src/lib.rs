//! Media handling for mmembed: reading media from bytes, paths or URIs with
//! size limits, decoding images safely (limits checked from the header,
//! before any pixel is allocated), and CLIP preprocessing that follows a
//! model's own `preprocessor_config.json`.
//!
//! Video probing and frame sampling live here too, behind the `video`
//! feature (it needs the system's FFmpeg libraries).

mod bmp;
mod heif;
mod ico;
mod image;
mod jpeg;
mod pillow;
mod preprocess;
mod source;
mod upload;
#[cfg(feature = "video")]
pub mod video;

pub use crate::image::{Draft, ImageLimits, decode_image, decode_image_draft, to_rgb_on_white};
pub use preprocess::{
    AlphaMode, ClipPreprocessor, CropOrigin, MAX_PATCHES, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
    Resample, ResizeTarget, patch_grid_size,
};
pub use source::{fetch_remote, read_media, store_error};
pub use upload::{UploadImage, encode_for_upload};

/// The `image` crate, re-exported so callers use the same version.
pub use ::image as image_crate;

#[cfg(test)]
mod fixture;
