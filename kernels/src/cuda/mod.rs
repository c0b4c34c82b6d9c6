//! Launchers of the CUDA kernels on candle CUDA tensors (upstream's paged-cache layout, see
//! `cuda/common.cuh`). Each checks shapes and dtypes and fails with a message naming the argument;
//! none synchronizes: everything runs in order on the tensors' device stream.
//!
//! In the order a step uses them: [`refresh_page_bounds`] after each cache write (`summaries`);
//! the plan on the device ([`DevicePlan`]) and the selection ([`select_pages`], with retro's
//! [`retro_row_masks`]: `select`); the fused decode ([`selected_decode`]: `decode`); retro's
//! output-cache step ([`merge_step`]: `merge`); and the causal prompt attention (`prompt`). Here:
//! loading the cubins, and the checks every launcher shares.

mod decode;
mod merge;
mod prompt;
mod select;
mod summaries;

pub use decode::selected_decode;
pub use merge::merge_step;
pub use prompt::causal_prompt_attention;
pub use select::{retro_row_masks, select_pages};
pub use summaries::refresh_page_bounds;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    sys::CUfunction_attribute, CudaFunction, CudaModule, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Device, Layout, Result, Storage, Tensor};

use crate::DecodePlan;

const CUBINS: &[(&str, &[u8])] = &[
    ("page_summaries", include_bytes!(concat!(env!("OUT_DIR"), "/page_summaries.cubin"))),
    ("plan", include_bytes!(concat!(env!("OUT_DIR"), "/plan.cubin"))),
    ("prompt_attention", include_bytes!(concat!(env!("OUT_DIR"), "/prompt_attention.cubin"))),
    ("selected_decode", include_bytes!(concat!(env!("OUT_DIR"), "/selected_decode.cubin"))),
];

/// Most query vectors (GQA group x window rows) one decode block serves (the largest `MAXQ`
/// instantiation in selected_decode.cu; the launcher picks the smallest of 8, 32, 64 that fits).
pub const MAX_QUERIES: usize = 64;

fn queries_per_block(nq: usize) -> usize {
    [8, 32, 64].into_iter().find(|&q| nq <= q).unwrap_or(MAX_QUERIES)
}

type ModuleKey = (usize, &'static str);
type FunctionKey = (usize, String);

#[derive(Default)]
struct Loaded {
    modules: HashMap<ModuleKey, Arc<CudaModule>>,
    functions: HashMap<FunctionKey, CudaFunction>,
}

fn loaded() -> &'static Mutex<Loaded> {
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// A kernel of one of our cubins, loaded once per CUDA context.
fn function(dev: &CudaDevice, module: &'static str, name: &str) -> Result<CudaFunction> {
    function_with(dev, module, name, |_| Ok(()))
}

/// [`function`], running `on_load` (e.g. setting attributes) the one time the kernel is loaded, so
/// a decode step pays a map lookup, not driver calls, per launch.
fn function_with(
    dev: &CudaDevice,
    module: &'static str,
    name: &str,
    on_load: impl FnOnce(&CudaFunction) -> Result<()>,
) -> Result<CudaFunction> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let ctx_key = Arc::as_ptr(ctx) as usize;
    let mut cache = loaded().lock().expect("retro-kernels kernel cache poisoned");
    if let Some(f) = cache.functions.get(&(ctx_key, name.to_string())) {
        return Ok(f.clone());
    }
    let module_handle = match cache.modules.get(&(ctx_key, module)) {
        Some(m) => m.clone(),
        None => {
            let image = CUBINS.iter().find(|(n, _)| *n == module).expect("known module").1;
            let m = ctx.load_module(Ptx::from_binary(image.to_vec())).w()?;
            cache.modules.insert((ctx_key, module), m.clone());
            m
        }
    };
    let f = module_handle.load_function(name).w()?;
    on_load(&f)?;
    cache.functions.insert((ctx_key, name.to_string()), f.clone());
    Ok(f)
}

fn cuda_device(t: &Tensor, what: &str) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("retro-kernels: {what} must be on a CUDA device, is on {other:?}"),
    }
}

/// The tensor's elements as a device view (contiguous, dtype T).
fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    if !layout.is_contiguous() {
        bail!("retro-kernels: {what} must be contiguous");
    }
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(layout.start_offset()..)),
        _ => bail!("retro-kernels: {what} must be a CUDA tensor"),
    }
}

fn check_dtype(t: &Tensor, dtype: DType, what: &str) -> Result<()> {
    if t.dtype() != dtype {
        bail!("retro-kernels: {what} must be {dtype:?}, is {:?}", t.dtype());
    }
    Ok(())
}

fn check_dims(t: &Tensor, dims: &[usize], what: &str) -> Result<()> {
    if t.dims() != dims {
        bail!("retro-kernels: {what} must have shape {dims:?}, has {:?}", t.dims());
    }
    Ok(())
}

fn suffix(dtype: DType, what: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("retro-kernels: {what} must be f32, f16 or bf16, is {other:?}"),
    })
}

/// An uninitialized device tensor: only for outputs the kernels write in full (or only read where
/// they wrote), so the GPU checks can poison the allocator's memory and catch unwritten elements.
fn new_tensor<T: CudaDType + DeviceRepr>(dev: &CudaDevice, dims: &[usize]) -> Result<Tensor> {
    let n = dims.iter().product::<usize>().max(1);
    // SAFETY: see above; every caller's kernel writes what is later read.
    let slice = unsafe { dev.alloc::<T>(n)? };
    let storage = Storage::Cuda(T::wrap_cuda_slice(slice, dev.clone()));
    let t = Tensor::from_storage(storage, n, BackpropOp::none(), false);
    t.narrow(0, 0, dims.iter().product())?.reshape(dims)
}

fn launch1d(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

/// Cache geometry `(num_blocks, kv_heads, head_dim, block_size)` from the key cache
/// `[blocks, kv_heads, head_dim / x, block_size, x]`, checked against the value cache.
pub fn cache_geometry(key_cache: &Tensor, value_cache: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (blocks, kv_heads, chunks, block_size, x) = key_cache.dims5()?;
    let head_dim = chunks * x;
    if x * key_cache.dtype().size_in_bytes() != 16 {
        bail!("retro-kernels: key_cache's last dim must hold 16 bytes, has {x} x {:?}", key_cache.dtype());
    }
    check_dims(value_cache, &[blocks, kv_heads, head_dim, block_size], "value_cache")?;
    check_dtype(value_cache, key_cache.dtype(), "value_cache")?;
    Ok((blocks, kv_heads, head_dim, block_size))
}

/// A decode step's plan on the device: the host plan plus its per-sequence arrays.
pub struct DevicePlan {
    pub plan: DecodePlan,
    /// u32 `[batch]`.
    pub context_lens: Tensor,
    /// u32 `[batch]`.
    pub budget_pages: Tensor,
}

impl DevicePlan {
    pub fn upload(plan: DecodePlan, device: &Device) -> Result<Self> {
        let context_lens = Tensor::new(plan.context_lens.as_slice(), device)?;
        let budget_pages = Tensor::new(plan.budget_pages.as_slice(), device)?;
        Ok(Self { plan, context_lens, budget_pages })
    }
}

/// Page lists per (sequence, KV head), padded to the plan's stride: list `l` is
/// `pages[l, ..counts[l]]`, ascending; `masks[l, i]` has bit r when query row r uses page i
/// (`None`: every row uses every listed page).
pub struct Selection {
    /// u32 `[lists, stride]`.
    pub pages: Tensor,
    /// u32 `[lists]`.
    pub counts: Tensor,
    /// u32 `[lists, stride]`.
    pub masks: Option<Tensor>,
}

fn new_tensor_dtype(dev: &CudaDevice, dtype: DType, dims: &[usize]) -> Result<Tensor> {
    match dtype {
        DType::F32 => new_tensor::<f32>(dev, dims),
        DType::F16 => new_tensor::<half::f16>(dev, dims),
        DType::BF16 => new_tensor::<half::bf16>(dev, dims),
        other => bail!("retro-kernels: unsupported dtype {other:?}"),
    }
}
