//! Our cuBLASLt calls (CUDA only): one handle and workspace per device,
//! each [`Gemm`] made as one `cublasLtMatmul`, its algorithm looked up once
//! per call shape.
//!
//! Hand-rolled over cudarc's `result` layer rather than its safe `Matmul`
//! for three things that one lacks:
//! - **`C` apart from `D`**: a linear layer's residual is read where it lies
//!   (`D = W·X + bias + R`), where cudarc's call accumulates onto its output
//!   in place, which costs a copy of the residual into it first: two passes
//!   over the residual stream per layer;
//! - **f32 accumulation for f32** (`CUBLAS_COMPUTE_32F`): cudarc's f32 call
//!   asks for TF32, a 10-bit mantissa, which would miss the f32 parity goal
//!   (cosine ≥ 0.99999 against PyTorch, whose f32 matmuls are exact);
//! - **the algorithm kept**: cudarc asks cuBLASLt's heuristic on every call
//!   (about 50 per forward); the heuristic's answer depends only on the
//!   call's shape, types, epilogue and workspace, so it is kept per shape,
//!   as NVIDIA's documentation suggests. Pointers are assumed 256-byte
//!   aligned (cuBLASLt's default preference), which `blas_ops` ensures.
//!
//! The workspace is allocated fallibly (cudarc's unwraps its allocation).

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublaslt::result as lt;
use candle_core::cuda_backend::cudarc::cublaslt::sys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{DType, Result};
use half::{bf16, f16};

use crate::blas::Gemm;
use crate::cuda_ops::cu;

/// cuBLASLt's recommended workspace on Hopper (4 MiB before it); one
/// per device, so the larger everywhere.
const WORKSPACE: usize = 32 << 20;

/// Kept algorithms per device before the cache starts over (a server
/// seeing every batch size up to its maximum makes a few per size).
const MAX_ALGOS: usize = 4096;

/// An element type cuBLASLt multiplies, accumulating in f32.
pub(crate) trait LtType:
    candle_core::cuda_backend::CudaDType + candle_core::WithDType
{
    const DATA: sys::cudaDataType;
}

impl LtType for f32 {
    const DATA: sys::cudaDataType = sys::cudaDataType_t::CUDA_R_32F;
}
impl LtType for f16 {
    const DATA: sys::cudaDataType = sys::cudaDataType_t::CUDA_R_16F;
}
impl LtType for bf16 {
    const DATA: sys::cudaDataType = sys::cudaDataType_t::CUDA_R_16BF;
}

/// What an algorithm is chosen for: the call with its offsets cleared
/// (they move pointers, which stay 256-byte aligned), the element type and
/// whether there is a bias epilogue.
type Shape = (Gemm, DType, bool);

/// One device's cuBLASLt handle, workspace and kept algorithms, on the
/// device's stream (so the calls are ordered with candle's kernels).
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    algos: Mutex<HashMap<Shape, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: a cuBLASLt handle may be used from any host thread (cudarc's
// own handle is Send + Sync on the same grounds); the one thing calls must
// not share while running is a workspace, and every call here is enqueued
// on the one stream this workspace belongs to, so the GPU runs them one
// after another. The algorithm cache is behind a mutex.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in `for_device`, destroyed once here.
        if let Err(e) = unsafe { lt::destroy_handle(self.handle) } {
            tracing::warn!("destroying a cuBLASLt handle: {e}");
        }
    }
}

impl Lt {
    /// The handle of `dev`, made at its first call and kept for the
    /// process's life (devices live as long as the models on them).
    pub(crate) fn for_device(dev: &CudaDevice) -> Result<Arc<Lt>> {
        static HANDLES: OnceLock<Mutex<HashMap<DeviceId, Arc<Lt>>>> = OnceLock::new();
        let mut handles = HANDLES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(h) = handles.get(&dev.id()) {
            return Ok(h.clone());
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().map_err(cu)?;
        // SAFETY: filled by nothing, read by nothing: cuBLASLt's scratch.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE) }.map_err(cu)?;
        let handle = lt::create_handle().map_err(cu)?;
        let h = Arc::new(Lt {
            handle,
            workspace,
            stream,
            algos: Mutex::new(HashMap::new()),
        });
        handles.insert(dev.id(), h.clone());
        Ok(h)
    }

    /// `D = op(A)·op(B) + beta·C (+ bias)` for the call `g` (its offsets
    /// into `a`, `b` and `d`): `C` is `c` where given (the same layout as
    /// `D`, from its own start: a residual read where it lies, `beta` 1),
    /// else `D` itself (`beta` 1 when `g` accumulates, else 0).
    ///
    /// Checks every extent against its buffer first ([`Gemm::check`]).
    pub(crate) fn matmul<T: LtType>(
        &self,
        g: &Gemm,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        c: Option<&CudaView<'_, T>>,
        d: &mut CudaSlice<T>,
        bias: Option<&CudaView<'_, T>>,
    ) -> Result<()> {
        g.check(a.len(), b.len(), d.len())?;
        if let Some(c) = c
            && (!g.accumulate || c.len() != d.len())
        {
            candle_core::bail!(
                "gemm: C of {} elements for D of {} (accumulating: {})",
                c.len(),
                d.len(),
                g.accumulate
            );
        }
        if let Some(bias) = bias
            && bias.len() != g.m
        {
            candle_core::bail!("gemm: {} bias values for {} rows", bias.len(), g.m);
        }
        let desc = Desc::new(g, bias.is_some())?;
        let ((ar, ac), (br, bc)) = g.stored();
        let a_layout = Layout::new::<T>(ar, ac, g.lda, g, g.stride_a)?;
        let b_layout = Layout::new::<T>(br, bc, g.ldb, g, g.stride_b)?;
        let d_layout = Layout::new::<T>(g.m, g.n, g.ldc, g, g.stride_c)?;
        let stream = self.stream.as_ref();
        // The device pointers, each with its guard (cudarc's event
        // tracking) alive until the call is enqueued.
        let a = a.slice(g.a_offset..);
        let b = b.slice(g.b_offset..);
        let (a_ptr, _a) = a.device_ptr(stream);
        let (b_ptr, _b) = b.device_ptr(stream);
        let bias_ptr = bias.map(|v| v.device_ptr(stream));
        if let Some((ptr, _)) = &bias_ptr {
            desc.set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                ptr,
            )?;
        }
        let c_ptr = c.map(|v| v.device_ptr(stream));
        let mut d = d.slice_mut(g.c_offset..);
        let (d_ptr, _d) = d.device_ptr_mut(stream);
        let c_at = match &c_ptr {
            Some((ptr, _)) => *ptr,
            // In place: C is D.
            None => d_ptr,
        };
        let algo = self.algo::<T>(g, bias.is_some(), &desc, [&a_layout, &b_layout, &d_layout])?;
        let (alpha, beta) = (1f32, if g.accumulate { 1f32 } else { 0f32 });
        let (ws_ptr, _ws) = self.workspace.device_ptr(stream);
        // SAFETY: the extents were checked against the buffers above, the
        // descriptors live until after the call, every buffer is on the
        // stream the call is enqueued on, and the workspace is this
        // handle's, used by one enqueued call at a time.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                a_ptr as *const c_void,
                a_layout.0,
                b_ptr as *const c_void,
                b_layout.0,
                c_at as *const c_void,
                d_layout.0,
                d_ptr as *mut c_void,
                d_layout.0,
                &algo,
                ws_ptr as *mut c_void,
                WORKSPACE,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(cu)
    }

    /// The kept algorithm for this call's shape, else cuBLASLt's
    /// heuristic's first choice, kept.
    fn algo<T: LtType>(
        &self,
        g: &Gemm,
        bias: bool,
        desc: &Desc,
        [a, b, d]: [&Layout; 3],
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let key = (
            Gemm {
                a_offset: 0,
                b_offset: 0,
                c_offset: 0,
                ..*g
            },
            T::DTYPE,
            bias,
        );
        let mut algos = self.algos.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(algo) = algos.get(&key) {
            return Ok(*algo);
        }
        let pref = Pref::new()?;
        // SAFETY: every descriptor is live; one result is written.
        let found = unsafe {
            lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, d.0, d.0, pref.0)
        }
        .map_err(cu)?;
        if algos.len() >= MAX_ALGOS {
            algos.clear();
        }
        algos.insert(key, found.algo);
        Ok(found.algo)
    }
}

/// A matmul descriptor: f32 compute and scale, the transposes, and the
/// bias epilogue when there is a bias.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Desc {
    fn new(g: &Gemm, bias: bool) -> Result<Self> {
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(cu)?,
        );
        // cuBLASLt takes cuBLAS's operation enum (32-bit).
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSA, &op(g.transa))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSB, &op(g.transb))?;
        let epilogue = if bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        desc.set(A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        Ok(desc)
    }

    /// Sets one attribute to `value` (its size is the attribute's: the
    /// enums are 32-bit, the bias pointer a device pointer).
    fn set<V>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &V) -> Result<()> {
        // SAFETY: `value` is read for its own size during the call.
        unsafe {
            lt::set_matmul_desc_attribute(self.0, attr, (value as *const V).cast(), size_of::<V>())
        }
        .map_err(cu)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// A column-major matrix layout, batched as the call is.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new<T: LtType>(
        rows: usize,
        cols: usize,
        ld: usize,
        g: &Gemm,
        stride: usize,
    ) -> Result<Self> {
        let layout = Layout(
            lt::create_matrix_layout(T::DATA, rows as u64, cols as u64, ld as i64).map_err(cu)?,
        );
        if g.batch > 1 {
            let count = i32::try_from(g.batch)
                .map_err(|_| candle_core::Error::Msg(format!("gemm: {} batches", g.batch)))?;
            let stride = stride as i64;
            use sys::cublasLtMatrixLayoutAttribute_t as A;
            layout.set(A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count)?;
            layout.set(A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride)?;
        }
        Ok(layout)
    }

    fn set<V>(&self, attr: sys::cublasLtMatrixLayoutAttribute_t, value: &V) -> Result<()> {
        // SAFETY: `value` is read for its own size during the call.
        unsafe {
            lt::set_matrix_layout_attribute(
                self.0,
                attr,
                (value as *const V).cast(),
                size_of::<V>(),
            )
        }
        .map_err(cu)
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// The heuristic's preference: at most our workspace.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Pref {
    fn new() -> Result<Self> {
        let pref = Pref(lt::create_matmul_pref().map_err(cu)?);
        let size = WORKSPACE;
        // SAFETY: `size` is read for its own size during the call.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size as *const usize).cast(),
                size_of::<usize>(),
            )
        }
        .map_err(cu)?;
        Ok(pref)
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}
