//! Which device and precision the model runs on.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use mmembed_core::EmbedError;

/// A device request: `auto`, `cpu`, `cuda[:N]` or `metal[:N]`.
///
/// `auto` takes CUDA if this build has it and a GPU answers, else Metal, else
/// the CPU. An explicit device that is missing is an error, never a silent
/// fallback to the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// Best available.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU by ordinal.
    Cuda(usize),
    /// Metal GPU by ordinal.
    Metal(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let ordinal = |rest: &str| -> Result<usize, String> {
            match rest.strip_prefix(':') {
                None if rest.is_empty() => Ok(0),
                Some(n) => n.parse().map_err(|_| format!("bad device ordinal `{n}`")),
                None => Err(format!("unknown device `{s}`")),
            }
        };
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            _ if s.starts_with("cuda") => ordinal(&s[4..]).map(Self::Cuda),
            _ if s.starts_with("metal") => ordinal(&s[5..]).map(Self::Metal),
            _ => Err(format!(
                "unknown device `{s}` (expected auto, cpu, cuda[:N] or metal[:N])"
            )),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

/// Whether one of our CUDA kernels runs, by its switch: the environment
/// variable `var` set to `theirs` takes the op the kernel replaced
/// (`MMEMBED_CUDA_PIXELS=candle`, `MMEMBED_CUDA_ATTENTION=gemm`, ...);
/// unset, empty or `ours` runs ours. Anything else runs ours too, said once
/// per variable. Read per call: a switch costs nothing next to a batch.
pub(crate) fn our_kernel(var: &'static str, ours: &str, theirs: &str) -> bool {
    match std::env::var(var).as_deref().map(str::trim) {
        Ok(v) if v == theirs => false,
        Ok(v) if v.is_empty() || v == ours => true,
        Err(_) => true,
        Ok(other) => {
            static WARNED: std::sync::Mutex<Vec<&str>> = std::sync::Mutex::new(Vec::new());
            let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
            if !warned.contains(&var) {
                warned.push(var);
                tracing::warn!("{var}={other:?}: expected {ours} or {theirs}; using {ours}");
            }
            true
        }
    }
}

fn unavailable(spec: DeviceSpec, why: String) -> EmbedError {
    EmbedError::Backend {
        backend: "local".into(),
        message: format!("device {spec} is not available: {why}"),
        retryable: false,
    }
}

impl DeviceSpec {
    /// Opens the device.
    pub fn open(self) -> Result<Device, EmbedError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(i) => {
                if !cfg!(feature = "cuda") {
                    return Err(unavailable(
                        self,
                        "this build has no CUDA support (rebuild with `--features cuda`)".into(),
                    ));
                }
                let dev = Device::new_cuda(i).map_err(|e| unavailable(self, e.to_string()))?;
                check_kernels_run(&dev).map_err(|why| unavailable(self, why))?;
                wait_by_blocking(&dev, std::env::var("MMEMBED_CUDA_SYNC").ok().as_deref());
                Ok(dev)
            }
            Self::Metal(i) => {
                if !cfg!(feature = "metal") {
                    return Err(unavailable(
                        self,
                        "this build has no Metal support (rebuild with `--features metal`)".into(),
                    ));
                }
                Device::new_metal(i).map_err(|e| unavailable(self, e.to_string()))
            }
            Self::Auto => {
                for gpu in [Self::Cuda(0), Self::Metal(0)] {
                    match gpu.open() {
                        Ok(d) => return Ok(d),
                        Err(e) => tracing::debug!("auto device: {e}"),
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// `MMEMBED_CUDA_SYNC=block`: a thread waiting for the GPU sleeps instead
/// of spinning. CUDA's default with one context on a machine of many cores
/// is to spin, which in a batch job keeps one core busy doing nothing
/// while the decoders (every core) wait for it; whether sleeping pays, in
/// the end-to-end rate, is for `scripts/gpu-check.sh` to measure (a
/// measurement switch, not yet a default). Anything else keeps CUDA's
/// choice.
#[cfg(feature = "cuda")]
fn wait_by_blocking(device: &Device, var: Option<&str>) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let (Some("block"), Device::Cuda(d)) = (var.map(str::trim), device) else {
        return;
    };
    let set = d
        .cuda_stream()
        .context()
        .bind_to_thread()
        .and_then(|()| result::ctx::set_flags(sys::CUctx_flags::CU_CTX_SCHED_BLOCKING_SYNC));
    match set {
        Ok(()) => tracing::info!("CUDA: waits for the GPU block (MMEMBED_CUDA_SYNC=block)"),
        Err(e) => tracing::warn!("MMEMBED_CUDA_SYNC=block: CUDA refused ({e}); waits spin"),
    }
}

#[cfg(not(feature = "cuda"))]
fn wait_by_blocking(_device: &Device, _var: Option<&str>) {}

/// The GPU's name and compute capability, where the device can say.
#[cfg(feature = "cuda")]
fn gpu_model(device: &Device) -> Option<(String, (i32, i32))> {
    let Device::Cuda(d) = device else { return None };
    let stream = d.cuda_stream();
    let ctx = stream.context();
    Some((ctx.name().ok()?, ctx.compute_capability().ok()?))
}

#[cfg(not(feature = "cuda"))]
fn gpu_model(_device: &Device) -> Option<(String, (i32, i32))> {
    None
}

/// Runs one of candle's kernels on a freshly opened device. candle-kernels
/// compiles its PTX for one compute capability at build time
/// (`CUDA_COMPUTE_CAP`), and the driver cannot load it on an older GPU;
/// without this check that would surface at the first forward pass as a
/// bare driver error.
fn check_kernels_run(device: &Device) -> Result<(), String> {
    let probe = || -> candle_core::Result<Vec<f32>> {
        candle_core::Tensor::ones(4, DType::F32, device)?
            .affine(2.0, 1.0)?
            .to_vec1()
    };
    match probe() {
        Ok(v) if v == [3.0; 4] => Ok(()),
        Ok(v) => Err(format!("a test kernel computed {v:?} instead of 3s")),
        Err(e) => {
            let gpu = gpu_model(device).map_or_else(String::new, |(name, (major, minor))| {
                format!(" on {name} (compute capability {major}.{minor})")
            });
            Err(format!(
                "candle's kernels in this build cannot run{gpu}: {e}. The kernels are \
                 compiled for the compute capability in CUDA_COMPUTE_CAP at build time \
                 (the GPU's own when one is present); rebuild with this GPU's, e.g. \
                 CUDA_COMPUTE_CAP=80 for an A100"
            ))
        }
    }
}

/// Floating-point precision of the weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// 32-bit (the only choice on CPU).
    #[default]
    F32,
    /// 16-bit IEEE half (GPU only).
    F16,
    /// bfloat16 (GPU only).
    Bf16,
    /// CPU only: the encoder layers' linear weights in int8 (one scale per
    /// output channel) with activations quantised per row on the fly (to 8
    /// bits with a zero point on CPUs with AVX-512 VNNI, else to 16 bits);
    /// everything else f32, MobileCLIP's convolutional (FastViT) image
    /// tower included. ViT-B/32 on 2 cores: 1.4–1.5x f32 with AVX2, 2.3–3x
    /// with VNNI; mean cosine to f32 embeddings 0.9997 (texts) and 0.99995
    /// (images) (BENCHMARKS.md).
    Int8,
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "int8" | "i8" | "q8" => Ok(Self::Int8),
            other => Err(format!(
                "unknown precision `{other}` (expected f32, f16, bf16 or int8)"
            )),
        }
    }
}

impl Precision {
    /// The candle dtype, checked against the device: half precision on the
    /// CPU is refused (candle's CPU kernels are f32-first; f16 there is slower
    /// and less accurate, so asking for it is almost certainly a mistake).
    /// Int8 is the reverse: a CPU path, refused on GPUs.
    pub fn dtype_for(self, device: &Device) -> Result<DType, EmbedError> {
        match (self, device.is_cpu()) {
            (Self::F32, _) | (Self::Int8, true) => Ok(DType::F32),
            (Self::Int8, false) => Err(EmbedError::invalid(
                "precision",
                "int8 is a CPU path; on GPUs use f16 or bf16",
            )),
            (_, true) => Err(EmbedError::invalid(
                "precision",
                format!("{self:?} is for GPU devices; the CPU runs f32"),
            )),
            (Self::F16, false) => Ok(DType::F16),
            (Self::Bf16, false) => match gpu_model(device) {
                // bf16 arithmetic (and candle's bf16 kernels) need Ampere.
                Some((name, (major, minor))) if major < 8 => Err(EmbedError::invalid(
                    "precision",
                    format!(
                        "bf16 needs compute capability 8.0 or newer; {name} is \
                         {major}.{minor}: use f16"
                    ),
                )),
                _ => Ok(DType::BF16),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:1".parse(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("metal:0".parse(), Ok(DeviceSpec::Metal(0)));
        assert!("cudax".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn explicit_missing_device_is_an_error_not_a_fallback() {
        if !cfg!(feature = "cuda") {
            let e = DeviceSpec::Cuda(0).open().unwrap_err();
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
        if !cfg!(feature = "metal") {
            assert!(DeviceSpec::Metal(0).open().is_err());
        }
        assert!(DeviceSpec::Auto.open().is_ok());
    }

    #[test]
    fn half_precision_is_refused_on_cpu() {
        assert_eq!(Precision::F32.dtype_for(&Device::Cpu).unwrap(), DType::F32);
        assert!(Precision::F16.dtype_for(&Device::Cpu).is_err());
        assert!(Precision::Bf16.dtype_for(&Device::Cpu).is_err());
        assert_eq!("bf16".parse(), Ok(Precision::Bf16));
        assert_eq!("INT8".parse(), Ok(Precision::Int8));
        assert_eq!(Precision::Int8.dtype_for(&Device::Cpu).unwrap(), DType::F32);
    }
}
