//! Parity with PyTorch + Hugging Face transformers on the same weights and
//! the same real photos. References come from
//! `models/fixtures/make_fixtures.py`; see its docstring to regenerate.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mmembed_candle::{Kernels, LoadedClip, Precision, local_files};
use mmembed_core::cosine;
use mmembed_media::{Draft, ImageLimits, decode_image};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures")
}

struct Reference {
    /// (text, reference ids, whether tokenizer.json must give those ids:
    /// false where the reference tokenizer is open_clip's and differs).
    texts: Vec<(String, Vec<u32>, bool)>,
    images: Vec<(String, String)>, // (file, key)
    tensors: std::collections::HashMap<String, Tensor>,
}

fn reference(model_dir: &Path) -> Reference {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("reference.json")).unwrap())
            .unwrap();
    let texts = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let ids = t["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect();
            let agrees = t["tokenizer_json_agrees"].as_bool().unwrap_or(true);
            (t["text"].as_str().unwrap().to_string(), ids, agrees)
        })
        .collect();
    let images = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["file"].as_str().unwrap().to_string(),
                i["key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let tensors =
        candle_core::safetensors::load(model_dir.join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    Reference {
        texts,
        images,
        tensors,
    }
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    mmembed_core::l2_normalize(&mut v);
    v
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// int8's floor for any one embedding. The tiny fixtures' 16-dimensional
/// text embeddings are the hard case (every coordinate weighs a lot); the
/// issue's goal is on the mean, 0.999.
const INT8_MIN: f32 = 0.998;

/// bf16's floor for any one embedding: the tiny text towers (16 wide,
/// heads of 8) are at bf16's noise floor. PyTorch's own bf16 on the CPU
/// against its f32, worst text: tiny-mobileclip-b 0.99793 (below
/// [`INT8_MIN`]), tiny-mobileclip2-l14 0.99935; ours on candle's CPU bf16
/// kernels 0.99898 and 0.99736 on the portable graph, and rounding the
/// query scale once instead of twice moved those by ±0.0008 either way
/// (so not a fault of one op). The mean's bar stays 0.999.
const BF16_MIN: f32 = 0.997;

/// Token ids (identical to the reference's where the reference tokenizer
/// is this one) and text embeddings, all in one padded batch, against the
/// references: PyTorch's precision in f32, [`BF16_MIN`] or [`INT8_MIN`]
/// for any one text otherwise. Returns (min cosine, max abs diff, sum of
/// cosines).
fn check_texts(clip: &LoadedClip, r: &Reference, precision: Precision) -> (f32, f32, f32) {
    let exact = precision == Precision::F32;
    // Token ids, identical (where the reference tokenizer is open_clip's,
    // on the texts tokenizer.json tokenises as it does; the model is fed
    // the reference ids for every text).
    let mut seqs = Vec::new();
    for (text, want, agrees) in &r.texts {
        let got = clip.tokenizer.encode(text).unwrap();
        assert!(got.len() <= clip.tokenizer.context());
        if *agrees {
            assert_eq!(&got, want, "token ids for {text:?}");
        } else {
            assert_ne!(&got, want, "{text:?}: tokenizers marked as differing agree");
        }
        seqs.push(want.clone());
    }

    // Text embeddings, all in one padded batch (padding must not matter).
    let got = clip.embed_token_ids(&seqs).unwrap();
    let mut sum = 0.0f32;
    let mut min_text = 1.0f32;
    let mut worst_text = 0.0f32;
    for (i, (text, ..)) in r.texts.iter().enumerate() {
        let want = unit(vec_of(&r.tensors[&format!("text.{i}")]));
        let c = cosine(&got[i], &want);
        let d = max_abs(&got[i], &want);
        min_text = min_text.min(c);
        worst_text = worst_text.max(d);
        sum += c;
        if exact {
            assert!(c >= 0.99999, "text {text:?}: cosine {c}");
            // Unit vectors: 1e-4 absolute is 1e-4 of the norm. The
            // gelu/quick_gelu fixtures differ by at least 7.7e-4 here
            // (make_fixtures.py checks).
            assert!(d <= 1e-4, "text {text:?}: max abs diff {d}");
        } else {
            let floor = match precision {
                Precision::Bf16 => BF16_MIN,
                _ => INT8_MIN,
            };
            assert!(c >= floor, "{precision:?} text {text:?}: cosine {c}");
        }
    }
    (min_text, worst_text, sum)
}

/// Checks one model directory against its references: f32 to PyTorch's
/// precision, int8 to a mean cosine of 0.999 (and [`INT8_MIN`] for any one
/// embedding). Returns
/// (min text cosine, min image cosine, mean cosine).
fn check_model(model_dir: &Path, image_dir: &Path, precision: Precision) -> (f32, f32, f32) {
    let kernels = Kernels::for_device(&Device::Cpu, precision);
    check_model_on(model_dir, image_dir, precision, kernels)
}

fn check_model_on(
    model_dir: &Path,
    image_dir: &Path,
    precision: Precision,
    kernels: Kernels,
) -> (f32, f32, f32) {
    let files = local_files(model_dir).unwrap();
    let clip = LoadedClip::load_with_kernels(&files, &Device::Cpu, precision, kernels).unwrap();
    let exact = precision == Precision::F32;
    let r = reference(model_dir);
    assert!(r.texts.len() >= 20 && r.images.len() >= 6);

    let (min_text, worst_text, mut sum) = check_texts(&clip, &r, precision);

    // Pixels and image embeddings. The resized (and cropped) pixels depend
    // on the preprocessing: a model with its own (SigLIP squashes to a
    // square) keeps them beside it.
    let own = model_dir.join("crops.safetensors");
    let crops_file = if own.exists() {
        own
    } else {
        image_dir.join("crops.safetensors")
    };
    let crops = candle_core::safetensors::load(crops_file, &Device::Cpu).unwrap();
    let mut pixels = Vec::new();
    // The crops' bytes, as the embedder's batches carry them.
    let mut crop_bytes = Vec::new();
    let mut min_image = 1.0f32;
    for (file, key) in &r.images {
        let bytes = std::fs::read(image_dir.join(file)).unwrap();
        // From the file's bytes, as the embedder reads them (the way that
        // keeps a transparent image's alpha through the resize where the
        // model's library does).
        let (h, w) = clip.preprocessor.output_size();
        let mut row = vec![0u8; (h * w * 3) as usize];
        clip.preprocessor
            .decode_crop_into(&bytes, file, &ImageLimits::default(), Draft::NONE, &mut row)
            .unwrap();
        let ours = image::RgbImage::from_raw(w, h, row).unwrap();
        let theirs: Vec<u8> = crops[key].flatten_all().unwrap().to_vec1().unwrap();
        let plane = (ours.width() * ours.height()) as usize;
        let mut diffs = Vec::with_capacity(theirs.len());
        for (i, p) in ours.pixels().enumerate() {
            for c in 0..3 {
                diffs.push((i32::from(p[c]) - i32::from(theirs[c * plane + i])).unsigned_abs());
            }
        }
        let max = diffs.iter().copied().max().unwrap();
        let mean = diffs.iter().map(|d| f64::from(*d)).sum::<f64>() / diffs.len() as f64;
        eprintln!("pixels {file}: max abs diff {max} levels, mean {mean:.4}");
        // Same decoder output as Pillow (PNG by the format's definition,
        // JPEG because both decode with libjpeg-turbo's defaults) and
        // Pillow's resampling reimplemented exactly.
        assert_eq!(
            max, 0,
            "{file}: decode/resize/crop must match Pillow exactly"
        );
        pixels.push(clip.preprocessor.normalize_u8(&ours));
        crop_bytes.extend_from_slice(ours.as_raw());
    }
    let got = clip.embed_pixels(&pixels).unwrap();
    // The batch-buffer entry point (what the embedder's worker calls) is
    // the same model on the same rows.
    let flat = pixels.concat();
    let rows = clip.embed_pixel_rows(&flat, pixels.len()).unwrap();
    for (a, b) in rows.iter().zip(&got) {
        assert!(
            max_abs(a, b) < 1e-6,
            "embed_pixel_rows differs from embed_pixels"
        );
    }
    // The bytes normalised by the model: the same vectors.
    assert_eq!(clip.embed_u8_rows(&crop_bytes, pixels.len()).unwrap(), rows);
    assert!(clip.embed_pixel_rows(&flat[1..], pixels.len()).is_err());
    assert!(clip.embed_pixel_rows(&[], 0).unwrap().is_empty());
    assert!(clip.embed_pixels(&[]).unwrap().is_empty());
    for (i, (file, key)) in r.images.iter().enumerate() {
        let want = unit(vec_of(&r.tensors[&format!("image.{key}")]));
        let c = cosine(&got[i], &want);
        eprintln!(
            "image {file}: cosine {c:.7}, max abs diff {:.2e}",
            max_abs(&got[i], &want)
        );
        min_image = min_image.min(c);
        sum += c;
        assert!(
            c >= if exact { 0.9999 } else { INT8_MIN },
            "{precision:?} {file}: cosine {c}"
        );
    }
    let mean = sum / (r.texts.len() + r.images.len()) as f32;
    assert!(exact || mean >= 0.999, "{precision:?}: mean cosine {mean}");
    eprintln!(
        "{} {precision:?}: texts min cosine {min_text:.7} (max abs diff {worst_text:.2e}), \
         images min cosine {min_image:.7}, mean {mean:.7}",
        model_dir.display()
    );
    (min_text, min_image, mean)
}

#[test]
fn tiny_clip_matches_pytorch() {
    let f = fixtures();
    check_model(&f.join("tiny-clip"), &f.join("images"), Precision::F32);
}

/// The GPU path's graph ([`Kernels::Portable`]: packed QKV with the scale
/// folded into the queries, candle's fused layer norm and softmax, the
/// patch embedding as a matmul), run on the CPU: what CUDA runs, held to
/// the f32 bar here; `scripts/gpu-check.sh` holds it there on a GPU.
#[test]
fn portable_kernels_match_pytorch() {
    let f = fixtures();
    for model in ["tiny-clip", "tiny-clip-gelu"] {
        check_model_on(
            &f.join(model),
            &f.join("images"),
            Precision::F32,
            Kernels::Portable,
        );
    }
}

/// The CUDA graph ([`Kernels::Cublas`]: every linear layer one cuBLASLt
/// call with its bias and residual in the epilogue, attention as per-head
/// cuBLAS calls reading the packed Q/K/V and writing the merged heads in
/// place), its calls run through the CPU reference of cuBLAS's semantics:
/// the index arithmetic CUDA is handed, held to the f32 bar against
/// PyTorch, for every family (causal and padded masks, attention pooling,
/// a patch bias) and in half precision.
#[test]
fn cublas_graph_matches_pytorch() {
    every_family_matches_pytorch(
        Kernels::Cublas,
        &[Precision::F32, Precision::Bf16, Precision::F16],
    );
}

/// The default CUDA graph ([`Kernels::Cuda`]: the cuBLAS graph's calls, and
/// our row kernels for softmax and layer norm, the mask added by the
/// softmax rather than accumulated by the scores' GEMM), through the CPU
/// references of both: held to the same bars as the cuBLAS graph.
#[test]
fn cuda_graph_matches_pytorch() {
    every_family_matches_pytorch(
        Kernels::Cuda,
        &[Precision::F32, Precision::Bf16, Precision::F16],
    );
}

/// Every fixture family through `kernels` in each of `precisions`, against
/// PyTorch's f32: f32 at its own bar ([`check_model_on`]), f16 at the
/// issue's 0.999, bf16's worst text at [`BF16_MIN`] (see below).
fn every_family_matches_pytorch(kernels: Kernels, precisions: &[Precision]) {
    let f = fixtures();
    for model in [
        "tiny-clip",
        "tiny-clip-gelu",
        "tiny-siglip",
        "tiny-chinese-clip",
        "tiny-mobileclip",
        "tiny-mobileclip2",
        "tiny-mobileclip-b",
        "tiny-mobileclip2-l14",
    ] {
        for &precision in precisions {
            let (text, image, _) =
                check_model_on(&f.join(model), &f.join("images"), precision, kernels);
            let floor = match precision {
                Precision::Bf16 => BF16_MIN,
                _ => 0.999,
            };
            assert!(
                text.min(image) >= floor,
                "{model} {kernels:?} {precision:?}: min cosine text {text}, image {image}"
            );
        }
    }
}

/// The GPU's half-precision graphs, run on the CPU (candle's CPU kernels
/// take f16 and bf16): every tensor of the graph in that dtype, against
/// PyTorch's f32. A dtype the graph forgets to carry (a mask or a scale
/// left in f32) fails here, not on a lent GPU. The bar is the issue's,
/// cosine ≥ 0.999, for every f16 embedding and for bf16's mean; one bf16
/// text may fall to [`BF16_MIN`]: the tiny models' 16-dimensional text
/// embeddings magnify bf16's 8-bit mantissa. PyTorch's own bf16 on the CPU
/// is at that edge too (worst text against its f32: tiny-clip 0.99900,
/// tiny-clip-gelu 0.99933; ours 0.99857 and 0.99856 with candle's CPU bf16
/// kernels). The GPU's numerics are measured on the GPU, against PyTorch
/// there (`scripts/gpu-check.sh`).
#[test]
fn portable_kernels_in_half_precision_match_pytorch() {
    every_family_matches_pytorch(Kernels::Portable, &[Precision::Bf16, Precision::F16]);
}

/// MobileCLIP in open_clip's format (`open_clip_config.json`,
/// `open_clip_model.safetensors` with the training-time FastViT branches,
/// tokenizer.json) against open_clip + timm: `tiny-mobileclip` has MCi0–2's
/// layout (four stages, batch norm before attention, SE downsampling,
/// bidirectional text over the zero-padded context, no mean/std),
/// `tiny-mobileclip2` MCi3/4's (five stages, LayerNorm2d, no stem scale
/// branch, causal text, OpenAI's statistics). Pixels follow torchvision's
/// resize and centre crop (bilinear, crop origin rounded half to even).
/// int8 quantises the text tower; the image tower stays f32.
///
/// And the ViT image towers: `tiny-mobileclip-b` has MobileCLIP-B's
/// (`vit_base_mci_224`: a convolutional stem with batch norm, no position
/// for the class token, eps 1e-6; causal text), `tiny-mobileclip2-l14`
/// MobileCLIP 2 L-14's (`vit_large_patch14_clip_224`: patches, a norm
/// before the blocks, eps 1e-5; bidirectional text, bicubic resizing).
/// int8 quantises both of their towers.
#[test]
fn tiny_mobileclip_matches_open_clip() {
    let f = fixtures();
    for model in [
        "tiny-mobileclip",
        "tiny-mobileclip2",
        "tiny-mobileclip-b",
        "tiny-mobileclip2-l14",
    ] {
        let dir = f.join(model);
        check_model(&dir, &f.join("images"), Precision::F32);
        check_model_on(&dir, &f.join("images"), Precision::F32, Kernels::Portable);
        let (text, _, _) = check_model(&dir, &f.join("images"), Precision::Int8);
        assert!(text < 0.99999, "int8 text matches f32 exactly");
    }
}

/// Inference exports of MobileCLIP hold the image tower reparameterised
/// (timm's `reparameterize_model`: each block one `reparam_conv`): the
/// fixture's tower folded by timm, with the original text tower, gives the
/// same references.
#[test]
fn reparameterized_mobileclip_matches_open_clip() {
    let f = fixtures();
    let src = f.join("tiny-mobileclip");
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let original =
        candle_core::safetensors::load(src.join("open_clip_model.safetensors"), &dev).unwrap();
    let mut merged =
        candle_core::safetensors::load(src.join("reparameterized_visual.safetensors"), &dev)
            .unwrap();
    assert!(merged.keys().any(|k| k.ends_with("reparam_conv.weight")));
    merged.extend(
        original
            .into_iter()
            .filter(|(k, _)| !k.starts_with("visual.")),
    );
    candle_core::safetensors::save(&merged, dir.path().join("open_clip_model.safetensors"))
        .unwrap();
    for name in [
        "open_clip_config.json",
        "tokenizer.json",
        "reference.json",
        "reference.safetensors",
        "crops.safetensors",
    ] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    check_model(dir.path(), &f.join("images"), Precision::F32);
}

/// The batch path's decode (a JPEG decoded only in the columns its crop
/// reads, `decode_crop_into`) gives the bytes of the whole decode's crop
/// under open_clip's preprocessing too: bilinear, and a crop origin that
/// rounds half to even (the rocket's margin, 383 − 256, is odd).
#[test]
fn mobileclip_partial_jpeg_decode_crops_as_the_whole_decode() {
    let f = fixtures();
    let files = local_files(&f.join("tiny-mobileclip")).unwrap();
    let clip = LoadedClip::load(&files, &Device::Cpu, Precision::F32).unwrap();
    let pre = &clip.preprocessor;
    let bytes = std::fs::read(f.join("images/rocket_640x427.jpg")).unwrap();
    let limits = ImageLimits::default();
    let whole = decode_image(&bytes, "rocket", &limits).unwrap();
    let mut want = vec![0u8; 256 * 256 * 3];
    pre.crop_into(&whole, &mut want).unwrap();
    let mut got = vec![0u8; want.len()];
    pre.decode_crop_into(&bytes, "rocket", &limits, Draft::NONE, &mut got)
        .unwrap();
    assert_eq!(got, want);
}

/// MobileCLIP S0–S2 read their text bidirectionally over the whole padded
/// context: the padding is part of the input, so the same ids pooled
/// without it (as a causal CLIP tower could) give another vector.
#[test]
fn mobileclip_padding_changes_the_output() {
    padding_changes_the_output("tiny-mobileclip");
}

/// A text embedded as the fixture's tokenizer pads it, against the same
/// ids alone pooled at their end-of-text token: more than rounding apart.
fn padding_changes_the_output(fixture: &str) {
    let files = local_files(&fixtures().join(fixture)).unwrap();
    let clip = LoadedClip::load(&files, &Device::Cpu, Precision::F32).unwrap();
    let ids = clip.tokenizer.encode("a photo of a cat").unwrap();
    let padded = clip.embed_token_ids(std::slice::from_ref(&ids)).unwrap();
    let n = ids.len();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let bare = clip.model.text.forward(&t, &[n - 1]).unwrap();
    let bare = unit(bare.squeeze(0).unwrap().to_vec1().unwrap());
    let c = cosine(&padded[0], &bare);
    assert!(c < 0.999, "{fixture}: padding made no difference: {c}");
}

/// SigLIP: attention-pooling head, bias in the patch embedding, no class
/// token or pre-norm, bidirectional text attention over a sequence padded to
/// 64 with the pad id and pooled at its end, a text head with bias,
/// `gelu_pytorch_tanh`, a squashed 224 x 224 image with mean/std 0.5, and a
/// SentencePiece tokenizer (ids checked against the sentencepiece library).
#[test]
fn tiny_siglip_matches_pytorch() {
    let f = fixtures();
    let dir = f.join("tiny-siglip");
    check_model(&dir, &f.join("images"), Precision::F32);
    check_model_on(&dir, &f.join("images"), Precision::F32, Kernels::Portable);
    let (text, image, _) = check_model(&dir, &f.join("images"), Precision::Int8);
    assert!(text.min(image) < 0.99999, "int8 matches f32 exactly");
}

/// The fixture `src` without its tokenizer.json: `keep` copied to a
/// temporary directory, whose tokenizer must be `tokenizer` (converted at
/// load), checked against the references like the fixture itself. Returns
/// the directory (kept alive) and the model loaded from it.
fn without_tokenizer_json(
    src: &Path,
    keep: &[&str],
    tokenizer: &str,
) -> (tempfile::TempDir, LoadedClip) {
    let dir = tempfile::tempdir().unwrap();
    for name in keep {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    let files = local_files(dir.path()).unwrap();
    assert!(files.tokenizer.ends_with(tokenizer));
    check_model(dir.path(), &fixtures().join("images"), Precision::F32);
    let clip = LoadedClip::load(&files, &Device::Cpu, Precision::F32).unwrap();
    (dir, clip)
}

/// 2,000 random strings (up to 40 characters of `alphabet`) give the same
/// ids through both models' tokenizers.
fn tokenizers_agree(a: &LoadedClip, b: &LoadedClip, alphabet: &str) {
    let alphabet: Vec<char> = alphabet.chars().collect();
    let mut state = 0x2545_f491_u64;
    for _ in 0..2000 {
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let len = (next() % 40) as usize;
        let text: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        assert_eq!(
            a.tokenizer.encode(&text).unwrap(),
            b.tokenizer.encode(&text).unwrap(),
            "{text:?}"
        );
    }
}

/// Google's SigLIP v1 repositories ship `spiece.model` and no
/// `tokenizer.json`: the same checkpoint without its tokenizer.json loads
/// from the SentencePiece model, converted in Rust, and gives the
/// sentencepiece library's ids (the references) and the same embeddings;
/// on random strings it agrees with the Python-converted tokenizer.json.
#[test]
fn siglip_loads_from_spiece_model_alone() {
    let src = fixtures().join("tiny-siglip");
    let keep = [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "spiece.model",
        "reference.json",
        "reference.safetensors",
        "crops.safetensors",
    ];
    let (_dir, from_spm) = without_tokenizer_json(&src, &keep, "spiece.model");
    let from_json =
        LoadedClip::load(&local_files(&src).unwrap(), &Device::Cpu, Precision::F32).unwrap();
    tokenizers_agree(
        &from_spm,
        &from_json,
        "abcXYZ019 .,!?'-_\t\néüßﬁＦ日本🚀\u{a0}\u{301}\u{2581}",
    );
}

/// Padding is part of SigLIP's input: the same text pooled without its
/// padding (as CLIP's rule would) gives another vector, so the test above
/// really checks where and with what we pad.
#[test]
fn siglip_padding_changes_the_output() {
    padding_changes_the_output("tiny-siglip");
}

/// Chinese-CLIP: CLIP's vision tower, and a BERT text tower (post-norm
/// layers, exact GELU, eps 1e-12, token-type embeddings, `[CLS]` pooling)
/// whose padding is masked: `check_model` embeds every text in one padded
/// batch, and the references are each text alone (make_fixtures.py checks
/// that the masked batch equals them and the unmasked one does not).
/// WordPiece ids are checked against transformers' pure-Python
/// `BertTokenizerLegacy`.
#[test]
fn tiny_chinese_clip_matches_pytorch() {
    let f = fixtures();
    let dir = f.join("tiny-chinese-clip");
    check_model(&dir, &f.join("images"), Precision::F32);
    check_model_on(&dir, &f.join("images"), Precision::F32, Kernels::Portable);
    let (text, image, _) = check_model(&dir, &f.join("images"), Precision::Int8);
    assert!(text.min(image) < 0.99999, "int8 matches f32 exactly");
}

/// Chinese-CLIP repositories ship a BERT `vocab.txt` and no
/// `tokenizer.json`: the checkpoint without its tokenizer.json loads from
/// the vocabulary, converted in Rust, with the reference ids and
/// embeddings, and agrees with transformers' tokenizer.json on random
/// strings (CJK, kana, accents, controls, special tokens).
#[test]
fn chinese_clip_loads_from_vocab_txt_alone() {
    let src = fixtures().join("tiny-chinese-clip");
    let keep = [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "vocab.txt",
        "reference.json",
        "reference.safetensors",
    ];
    let (dir, from_vocab) = without_tokenizer_json(&src, &keep, "vocab.txt");
    let from_json =
        LoadedClip::load(&local_files(&src).unwrap(), &Device::Cpu, Precision::F32).unwrap();
    tokenizers_agree(
        &from_vocab,
        &from_json,
        "abcXYZ019 .,!?'-_\t\n\u{0}éüßﬁ一只猫龘のテпр🚀\u{a0}\u{301}[]SEPCLS",
    );
    // `do_lower_case: false` in tokenizer_config.json is honoured.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"do_lower_case": false}"#,
    )
    .unwrap();
    let files = local_files(dir.path()).unwrap();
    let cased = LoadedClip::load(&files, &Device::Cpu, Precision::F32).unwrap();
    assert_ne!(
        cased.tokenizer.encode("Photo").unwrap(),
        from_vocab.tokenizer.encode("Photo").unwrap()
    );
}

/// The mask is what keeps a short text's vector when it shares a batch with
/// a long one: the same padded batch read without it gives another vector.
#[test]
fn chinese_clip_padding_is_masked() {
    let f = fixtures();
    let files = local_files(&f.join("tiny-chinese-clip")).unwrap();
    let clip = LoadedClip::load(&files, &Device::Cpu, Precision::F32).unwrap();
    let short = clip.tokenizer.encode("a photo of a cat").unwrap();
    let long = clip
        .tokenizer
        .encode("an astronaut riding a rocket into space, seen from far away")
        .unwrap();
    let alone = clip.embed_token_ids(std::slice::from_ref(&short)).unwrap();
    let batched = clip
        .embed_token_ids(&[short.clone(), long.clone()])
        .unwrap();
    assert!(cosine(&alone[0], &batched[0]) > 0.999_999);
    let b = clip.tokenizer.batch(&[short, long]);
    let ids = Tensor::from_vec(b.ids, (2, b.len), &Device::Cpu).unwrap();
    let unmasked = clip.model.text.forward(&ids, &b.pool).unwrap();
    let unmasked = unit(unmasked.get(0).unwrap().to_vec1().unwrap());
    let c = cosine(&alone[0], &unmasked);
    assert!(c < 0.999, "padding made no difference unmasked: {c}");
}

#[test]
fn tiny_clip_int8_stays_close_to_pytorch() {
    let f = fixtures();
    let (text, image, _) = check_model(&f.join("tiny-clip"), &f.join("images"), Precision::Int8);
    // Close, but really quantised: not the f32 path under another name.
    assert!(
        text.min(image) < 0.99999,
        "int8 matches f32 exactly: {text} {image}"
    );
}

#[test]
fn gelu_variant_matches_pytorch() {
    // Same weights, `hidden_act: gelu` and eps 1e-6 in config.json: passing
    // this and the test above shows the config drives the architecture.
    let f = fixtures();
    check_model(&f.join("tiny-clip-gelu"), &f.join("images"), Precision::F32);
}

#[test]
fn activation_really_changes_the_output() {
    // Guards the two tests above against fixtures where the activation
    // makes no difference.
    let f = fixtures();
    let a = reference(&f.join("tiny-clip"));
    let b = reference(&f.join("tiny-clip-gelu"));
    let d = max_abs(
        &unit(vec_of(&a.tensors["text.0"])),
        &unit(vec_of(&b.tensors["text.0"])),
    );
    assert!(d > 1e-4, "{d}");
}

/// Full-size ViT-B/32 with seeded random weights (about 600 MB, not
/// committed). Build it with
/// `python3 models/fixtures/make_fixtures.py --full /tmp/vit-b-32`, then run
/// `MMEMBED_FULL_FIXTURE=/tmp/vit-b-32 cargo test --release -p mmembed-candle --test parity -- --ignored --nocapture`
/// (both precisions, then the CUDA graph's calls and row kernels through
/// their CPU references at full size: 12 heads of 64, fewer images than heads, so
/// attention splits per image, and more texts than heads, per head; about
/// two minutes of naive loops).
#[test]
#[ignore = "needs MMEMBED_FULL_FIXTURE (see the doc comment)"]
fn full_size_vit_b_32_matches_pytorch() {
    let dir = PathBuf::from(
        std::env::var("MMEMBED_FULL_FIXTURE").expect("MMEMBED_FULL_FIXTURE=dir from --full"),
    );
    check_model(&dir, &dir.join("images"), Precision::F32);
    check_model(&dir, &dir.join("images"), Precision::Int8);
    let (text, image, _) = check_model_on(&dir, &dir.join("images"), Precision::F32, Kernels::Cuda);
    eprintln!("CUDA graph (CPU references), f32: min cosine text {text}, image {image}");
}

/// SigLIP 2 NaFlex: each image resized to keep its aspect ratio in at most
/// 48 patches of 8 (grids 3x15 to 9x5 here), a linear patch embedding over
/// (row, column, channel) pixels, the 4x4 learned positions resized per
/// image (antialiased where they shrink), SigLIP's text tower. Truth is
/// transformers' Siglip2ImageProcessorPil and Siglip2Model, one image at a
/// time, padded and masked; ours runs each grid unpadded.
#[test]
fn tiny_siglip2_naflex_matches_pytorch() {
    let f = fixtures();
    let dir = f.join("tiny-siglip2-naflex");
    let r = reference(&dir);
    let resized =
        candle_core::safetensors::load(dir.join("resized.safetensors"), &Device::Cpu).unwrap();
    let files = local_files(&dir).unwrap();
    for (precision, kernels) in [
        (Precision::F32, Kernels::Fused),
        (Precision::F32, Kernels::Portable),
        (Precision::Int8, Kernels::Int8),
    ] {
        let clip = LoadedClip::load_with_kernels(&files, &Device::Cpu, precision, kernels).unwrap();
        let (min_text, _, mut sum) = check_texts(&clip, &r, precision);
        let row = clip.pixels_per_image();
        assert_eq!(row, 48 * 8 * 8 * 3);
        let (mut buf, mut sizes) = (Vec::new(), Vec::new());
        for (file, key) in &r.images {
            let bytes = std::fs::read(f.join("images").join(file)).unwrap();
            let img = decode_image(&bytes, file, &ImageLimits::default()).unwrap();
            let ours = clip.preprocessor.resize_and_crop(&img);
            let theirs = &resized[key];
            let (h, w, _) = theirs.dims3().unwrap();
            assert_eq!(ours.dimensions(), (w as u32, h as u32), "{file}: size");
            let theirs: Vec<u8> = theirs.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(
                ours.as_raw(),
                &theirs,
                "{file}: resize must match Pillow exactly"
            );
            let at = buf.len();
            buf.resize(at + row, 0);
            let size = clip.preprocessor.resize_into(&img, &mut buf[at..]).unwrap();
            sizes.push(size);
        }
        // Every grid in one call: grouped by grid inside.
        let got = clip.embed_u8_images(&buf, &sizes).unwrap();
        let mut min_image = 1.0f32;
        for (i, (file, key)) in r.images.iter().enumerate() {
            let want = unit(vec_of(&r.tensors[&format!("image.{key}")]));
            let c = cosine(&got[i], &want);
            min_image = min_image.min(c);
            sum += c;
            let floor = if precision == Precision::F32 {
                0.99999
            } else {
                INT8_MIN
            };
            assert!(c >= floor, "{precision:?} {kernels:?} {file}: cosine {c}");
            // One image alone: the same vector.
            let one = clip
                .embed_u8_images(&buf[i * row..(i + 1) * row], &sizes[i..=i])
                .unwrap();
            assert!(
                max_abs(&one[0], &got[i]) < 1e-6,
                "{file}: alone vs in the batch"
            );
        }
        let mean = sum / (r.texts.len() + r.images.len()) as f32;
        assert!(mean >= 0.999, "{precision:?}: mean cosine {mean}");
        eprintln!(
            "tiny-siglip2-naflex {precision:?} {kernels:?}: texts min cosine {min_text:.7}, \
             images min cosine {min_image:.7}, mean {mean:.7}"
        );
        // Sizes that are not a grid of the budget, and the one-size entry
        // points, are errors.
        for bad in [(60, 48), (8, 0), (8 * 49, 8)] {
            assert!(
                clip.embed_u8_images(&buf[..row], &[bad]).is_err(),
                "{bad:?}"
            );
        }
        assert!(clip.embed_u8_images(&buf[1..], &sizes).is_err());
        assert!(clip.embed_u8_rows(&buf[..row], 1).is_err());
        assert!(clip.embed_pixel_rows(&vec![0.0; row], 1).is_err());
    }
}
