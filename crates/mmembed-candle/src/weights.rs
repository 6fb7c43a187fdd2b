//! Reads safetensors checkpoints tensor by tensor with positioned reads.
//!
//! Why not candle's memory-mapped loader: every tensor it hands out on the
//! CPU is a copy of the mapped bytes, and the mapped pages the copy was made
//! from stay resident until the map is dropped, so loading a 605 MB ViT-B/32
//! peaked at twice the weights. Reading each tensor into a short-lived
//! buffer keeps the peak at the weights plus the largest tensor, and tensors
//! the model never asks for (a checkpoint's unused heads) are never read.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

struct Located {
    file: usize,
    dtype: DType,
    shape: Shape,
    /// Absolute byte range in the file.
    start: u64,
    len: usize,
}

/// A [`SimpleBackend`] over one or more safetensors files.
pub(crate) struct SafetensorsFiles {
    files: Vec<(PathBuf, File)>,
    tensors: HashMap<String, Located>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {msg}", path.display()))
}

fn dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl SafetensorsFiles {
    /// Reads the headers of `paths` (shards of one checkpoint) and checks
    /// every tensor's byte range against its file's size.
    pub(crate) fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| bad(path, e))?;
            let size = file.metadata().map_err(|e| bad(path, e))?.len();
            let mut len = [0u8; 8];
            read_at(&file, &mut len, 0).map_err(|e| bad(path, format!("no header: {e}")))?;
            let header_len = u64::from_le_bytes(len);
            // The format caps headers at 100 MB; anything larger is not a
            // safetensors file, and must not make us allocate it.
            if header_len > 100_000_000 || 8 + header_len > size {
                return Err(bad(path, "not a safetensors file (bad header length)"));
            }
            let mut header = vec![0u8; header_len as usize];
            read_at(&file, &mut header, 8).map_err(|e| bad(path, e))?;
            let entries: HashMap<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| bad(path, format!("header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, value) in entries {
                if name == "__metadata__" {
                    continue;
                }
                let e: Entry = serde_json::from_value(value)
                    .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
                let dt = dtype(&e.dtype).ok_or_else(|| {
                    bad(
                        path,
                        format!("tensor {name}: dtype {} unsupported", e.dtype),
                    )
                })?;
                let [a, b] = e.data_offsets;
                let elems = e.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                let want = elems.and_then(|n| n.checked_mul(dt.size_in_bytes()));
                if b < a || data_start + b > size || want != Some((b - a) as usize) {
                    return Err(bad(
                        path,
                        format!(
                            "tensor {name}: byte range {a}..{b} does not fit its shape or the file"
                        ),
                    ));
                }
                tensors.insert(
                    name,
                    Located {
                        file: i,
                        dtype: dt,
                        shape: Shape::from(e.shape),
                        start: data_start + a,
                        len: (b - a) as usize,
                    },
                );
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, tensors })
    }

    fn load(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let (path, file) = &self.files[t.file];
        let mut bytes = vec![0u8; t.len];
        read_at(file, &mut bytes, t.start).map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
        Tensor::from_raw_buffer(&bytes, t.dtype, t.shape.dims(), dev)
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// A tensor of another shape than the model asks for, named by `what`.
fn shape_mismatch(what: String, expected: Shape, got: Shape) -> candle_core::Error {
    candle_core::Error::UnexpectedShape {
        msg: format!("shape mismatch for {what}"),
        expected,
        got,
    }
    .bt()
}

impl SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if let Some(t) = self.tensors.get(name)
            && t.shape != s
        {
            return Err(shape_mismatch(name.to_string(), s, t.shape.clone()));
        }
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// open_clip's text-tower names read under Hugging Face CLIP's, so one
/// text tower loads both: `text_model.encoder.layers.{i}.self_attn.q_proj`
/// is the first third of `text.transformer.resblocks.{i}.attn.in_proj_*`,
/// `text_projection.weight` the transpose of `text.text_projection` (open_clip
/// multiplies by it from the right), and so on; likewise a timm ViT image
/// tower's blocks (`vision_model.encoder.layers.{i}.*` are
/// `visual.trunk.blocks.{i}.*`, q/k/v thirds of `attn.qkv`). Other names
/// (the rest of the image tower's `visual.*`) pass through unchanged.
pub(crate) struct OpenClipNames(pub(crate) Box<dyn SimpleBackend>);

/// What of a stored tensor a Hugging Face name is.
#[derive(Debug, PartialEq)]
enum Part {
    Whole,
    /// Rows `[i · n / 3, (i + 1) · n / 3)` of a packed q/k/v tensor.
    Third(usize),
    Transposed,
}

fn open_clip_name(name: &str) -> (String, Part) {
    let whole = |s: String| (s, Part::Whole);
    // open_clip's text blocks (torch's MultiheadAttention names), then a
    // timm ViT image tower's blocks.
    for (hf, block, qkv_as, names) in [
        (
            "text_model.encoder.layers.",
            "text.transformer.resblocks.",
            "attn.in_proj_",
            [
                ("layer_norm1.", "ln_1."),
                ("layer_norm2.", "ln_2."),
                ("self_attn.out_proj.", "attn.out_proj."),
                ("mlp.fc1.", "mlp.c_fc."),
                ("mlp.fc2.", "mlp.c_proj."),
            ],
        ),
        (
            "vision_model.encoder.layers.",
            "visual.trunk.blocks.",
            "attn.qkv.",
            [
                ("layer_norm1.", "norm1."),
                ("layer_norm2.", "norm2."),
                ("self_attn.out_proj.", "attn.proj."),
                ("mlp.fc1.", "mlp.fc1."),
                ("mlp.fc2.", "mlp.fc2."),
            ],
        ),
    ] {
        let Some((i, rest)) = name.strip_prefix(hf).and_then(|r| r.split_once('.')) else {
            continue;
        };
        let block = format!("{block}{i}");
        for (j, qkv) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            if let Some(leaf) = rest.strip_prefix(&format!("self_attn.{qkv}.")) {
                return (format!("{block}.{qkv_as}{leaf}"), Part::Third(j));
            }
        }
        for (hf, oc) in names {
            if let Some(leaf) = rest.strip_prefix(hf) {
                return whole(format!("{block}.{oc}{leaf}"));
            }
        }
        return whole(format!("{block}.{rest}"));
    }
    match name {
        "text_model.embeddings.token_embedding.weight" => {
            whole("text.token_embedding.weight".into())
        }
        "text_model.embeddings.position_embedding.weight" => {
            whole("text.positional_embedding".into())
        }
        "text_projection.weight" => ("text.text_projection".into(), Part::Transposed),
        _ => match name.strip_prefix("text_model.final_layer_norm.") {
            Some(leaf) => whole(format!("text.ln_final.{leaf}")),
            None => whole(name.to_string()),
        },
    }
}

impl OpenClipNames {
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (stored, part) = open_clip_name(name);
        let t = self.0.get_unchecked(&stored, dtype, dev)?;
        match part {
            Part::Whole => Ok(t),
            Part::Third(i) => {
                let n = t.dim(0)?;
                if n % 3 != 0 {
                    candle_core::bail!("{stored}: {n} rows do not split into q, k and v");
                }
                t.narrow(0, i * n / 3, n / 3)?.contiguous()
            }
            Part::Transposed => t.t()?.contiguous(),
        }
    }
}

impl SimpleBackend for OpenClipNames {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.read(name, dtype, dev)?;
        if t.shape() != &s {
            let what = format!("{name} ({})", open_clip_name(name).0);
            return Err(shape_mismatch(what, s, t.shape().clone()));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(&open_clip_name(name).0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, tensors: &[(&str, &Tensor)]) -> PathBuf {
        let path = dir.join(name);
        candle_core::safetensors::save(
            &tensors
                .iter()
                .map(|(n, t)| (n.to_string(), (*t).clone()))
                .collect(),
            &path,
        )
        .unwrap();
        path
    }

    #[test]
    fn reads_what_candle_wrote_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[1u32, 2, 3], &dev).unwrap();
        let c = Tensor::new(&[0.5f32, -2.0], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let p1 = write(dir.path(), "1.safetensors", &[("a", &a), ("b", &b)]);
        let p2 = write(dir.path(), "2.safetensors", &[("c", &c)]);
        let st = SafetensorsFiles::open(&[p1, p2]).unwrap();
        let vb = candle_nn::VarBuilder::from_backend(Box::new(st), DType::F32, dev.clone());
        let got = vb.get((2, 3), "a").unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(
            vb.get_with_hints_dtype(3, "b", Default::default(), DType::U32)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(
            vb.get(2, "c").unwrap().to_vec1::<f32>().unwrap(),
            vec![0.5, -2.0]
        );
        let e = vb.get((3, 2), "a").unwrap_err().to_string();
        assert!(e.contains("shape mismatch"), "{e}");
        assert!(!vb.contains_tensor("d"));
        assert!(vb.get(1, "d").is_err());
    }

    #[test]
    fn open_clip_names_map_to_hugging_face_names() {
        for (hf, oc, part) in [
            (
                "text_model.encoder.layers.3.self_attn.k_proj.weight",
                "text.transformer.resblocks.3.attn.in_proj_weight",
                Part::Third(1),
            ),
            (
                "text_model.encoder.layers.0.self_attn.v_proj.bias",
                "text.transformer.resblocks.0.attn.in_proj_bias",
                Part::Third(2),
            ),
            (
                "text_model.encoder.layers.11.mlp.fc2.weight",
                "text.transformer.resblocks.11.mlp.c_proj.weight",
                Part::Whole,
            ),
            (
                "text_model.encoder.layers.2.layer_norm1.bias",
                "text.transformer.resblocks.2.ln_1.bias",
                Part::Whole,
            ),
            (
                "text_projection.weight",
                "text.text_projection",
                Part::Transposed,
            ),
            (
                "text_model.final_layer_norm.weight",
                "text.ln_final.weight",
                Part::Whole,
            ),
            (
                "visual.trunk.head.fc.bias",
                "visual.trunk.head.fc.bias",
                Part::Whole,
            ),
            (
                "vision_model.encoder.layers.5.self_attn.q_proj.weight",
                "visual.trunk.blocks.5.attn.qkv.weight",
                Part::Third(0),
            ),
            (
                "vision_model.encoder.layers.0.self_attn.out_proj.bias",
                "visual.trunk.blocks.0.attn.proj.bias",
                Part::Whole,
            ),
            (
                "vision_model.encoder.layers.1.layer_norm2.weight",
                "visual.trunk.blocks.1.norm2.weight",
                Part::Whole,
            ),
            (
                "vision_model.encoder.layers.1.mlp.fc1.weight",
                "visual.trunk.blocks.1.mlp.fc1.weight",
                Part::Whole,
            ),
        ] {
            assert_eq!(open_clip_name(hf), (oc.to_string(), part), "{hf}");
        }
    }

    #[test]
    fn rejects_truncated_and_garbage_files() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
        let good = write(dir.path(), "good.safetensors", &[("t", &t)]);
        let bytes = std::fs::read(&good).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let e = SafetensorsFiles::open(&[cut]).err().unwrap().to_string();
        assert!(e.contains("does not fit"), "{e}");
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
        let e = SafetensorsFiles::open(&[junk]).err().unwrap().to_string();
        assert!(e.contains("bad header length"), "{e}");
        let short = dir.path().join("short.safetensors");
        std::fs::write(&short, b"\x04").unwrap();
        let e = SafetensorsFiles::open(&[short]).err().unwrap().to_string();
        assert!(e.contains("no header"), "{e}");
    }
}
