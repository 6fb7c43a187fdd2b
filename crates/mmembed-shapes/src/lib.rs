//! Procedural scenes (one coloured shape on a plain background) with
//! captions, and the trainer of mmembed's bundled demo CLIP model
//! (`models/demo`).
//!
//! No pretrained CLIP weights can be fetched on an offline machine, yet a
//! new user still needs a model whose answers mean something. This crate
//! trains one from scratch in a few minutes on a CPU: the same [`ClipModel`]
//! code the local backend runs, the symmetric contrastive loss with a
//! learnable temperature, on scenes generated on the fly
//! ([`Scene`], [`random_caption`]). The result is an ordinary Hugging
//! Face-format CLIP checkpoint.
//!
//! ```
//! use mmembed_shapes::{Attributes, Colour, Position, Scene, Shape, Size};
//! use rand::SeedableRng;
//!
//! let a = Attributes { shape: Shape::Star, colour: Colour::Red, size: Size::Large, position: Position::Left };
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
//! let img = Scene::random(a, &mut rng).render(128, 128, 1);
//! assert_eq!(img.dimensions(), (128, 128));
//! assert_eq!(a.full_caption(), "a photo of a large red star on the left");
//! ```
//!
//! [`ClipModel`]: mmembed_candle::ClipModel

mod files;
mod scene;
mod train;

pub use files::{BOS, CONTEXT, EOS, UNK, config_json, preprocessor_json, tokenizer_json};
pub use scene::{
    Attributes, Caption, Colour, Position, Scene, Shape, Size, random_caption,
    random_caption_with_position, vocabulary,
};
pub use train::{TrainError, TrainOptions, TrainReport, train};
