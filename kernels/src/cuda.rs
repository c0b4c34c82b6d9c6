//! Launchers of the CUDA kernels on candle CUDA tensors (upstream's paged-cache layout, see
//! `cuda/common.cuh`). Each checks shapes and dtypes and fails with a message naming the argument;
//! none synchronizes: everything runs in order on the tensors' device stream.

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

/// Recompute the page bounds (`[num_blocks, kv_heads, 2, head_dim]` in the cache's dtype, min then
/// max: exact, a min or max of cache values is a cache value) of every block `slot_mapping` (i64,
/// -1 = no write) touches, from the key cache. Run after each cache write.
pub fn refresh_page_bounds(key_cache: &Tensor, slot_mapping: &Tensor, bounds: &Tensor) -> Result<()> {
    let dev = cuda_device(key_cache, "key_cache")?;
    let (blocks, kv_heads, chunks, block_size, x) = key_cache.dims5()?;
    let head_dim = chunks * x;
    check_dims(bounds, &[blocks, kv_heads, 2, head_dim], "page bounds")?;
    check_dtype(bounds, key_cache.dtype(), "page bounds")?;
    check_dtype(slot_mapping, DType::I64, "slot_mapping")?;
    let slots = slot_mapping.elem_count();
    if slots == 0 {
        return Ok(());
    }
    let name = format!("refresh_page_bounds_{}", suffix(key_cache.dtype(), "key_cache")?);
    let func = function(&dev, "page_summaries", &name)?;
    let (ks, kl) = key_cache.storage_and_layout();
    let (ss, sl) = slot_mapping.storage_and_layout();
    let (bs, bl) = bounds.storage_and_layout();
    let (kv_heads_i, head_dim_i, block_size_i, blocks_i) = (kv_heads as i32, head_dim as i32, block_size as i32, blocks as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    macro_rules! go {
        ($t:ty) => {{
            let k = view::<$t>(&ks, kl, "key_cache")?;
            let s = view::<i64>(&ss, sl, "slot_mapping")?;
            let o = view::<$t>(&bs, bl, "page bounds")?;
            b.arg(&k).arg(&s).arg(&o).arg(&kv_heads_i).arg(&head_dim_i).arg(&block_size_i).arg(&blocks_i);
            unsafe { b.launch(launch1d((slots as u32, kv_heads as u32, 1), head_dim.min(128) as u32, 0)) }.w()?;
        }};
    }
    match key_cache.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
    Ok(())
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

/// Quest's selection for every (sequence, KV head): the first and last page plus the top pages
/// by page bound for the newest query row, `budget_pages` in all (every page when the budget covers
/// them). `queries [batch * rows, heads, head_dim]`, `bounds` in the queries' (the cache's) dtype,
/// `block_tables` u32 `[batch, max_blocks]`.
pub fn select_pages(plan: &DevicePlan, queries: &Tensor, bounds: &Tensor, block_tables: &Tensor) -> Result<Selection> {
    let p = &plan.plan;
    let dev = cuda_device(queries, "queries")?;
    let (qrows, heads, head_dim) = queries.dims3()?;
    if qrows != p.batch * p.rows {
        bail!("retro-kernels: queries have {qrows} rows, the plan {} x {}", p.batch, p.rows);
    }
    if heads % p.kv_heads != 0 {
        bail!("retro-kernels: {heads} query heads do not group over {} kv heads", p.kv_heads);
    }
    // The kernel reads budgets as int: a larger one would wrap negative and select two pages.
    if let Some(b) = p.budget_pages.iter().find(|&&b| b > i32::MAX as u32) {
        bail!("retro-kernels: budget of {b} pages exceeds i32::MAX (clamp it to the sequence's pages)");
    }
    let (num_blocks, kv_heads, two, bounds_dim) = bounds.dims4()?;
    if kv_heads != p.kv_heads || two != 2 || bounds_dim != head_dim {
        bail!("retro-kernels: page bounds {:?} do not fit {} kv heads x head dim {head_dim}", bounds.dims(), p.kv_heads);
    }
    let _ = num_blocks;
    check_dtype(bounds, queries.dtype(), "page bounds")?;
    check_dtype(block_tables, DType::U32, "block_tables")?;
    let (bt_rows, max_blocks) = block_tables.dims2()?;
    if bt_rows != p.batch || max_blocks < p.max_pages {
        bail!("retro-kernels: block_tables {:?} too small for {} sequences of {} pages", block_tables.dims(), p.batch, p.max_pages);
    }
    if head_dim % 4 != 0 || (heads / p.kv_heads) * head_dim > 8 * 256 {
        bail!("retro-kernels: page scoring needs head dim % 4 == 0 and GQA group x head dim <= 2048, got {} x {head_dim}", heads / p.kv_heads);
    }
    let lists = p.lists();
    let pages = new_tensor::<u32>(&dev, &[lists, p.stride.max(1)])?;
    let counts = new_tensor::<u32>(&dev, &[lists])?;
    if lists == 0 {
        return Ok(Selection { pages, counts, masks: None });
    }
    let scores = new_tensor::<f32>(&dev, &[lists, p.max_pages.max(1)])?;
    let stream = dev.cuda_stream();
    // When every budget covers its sequence, the selection is every page: no scores needed.
    let sparse = p.context_lens.iter().zip(&p.budget_pages).any(|(&c, &b)| (b as usize) < (c as usize).div_ceil(p.block_size));
    if sparse {
        let score = function(&dev, "plan", &format!("score_pages_{}", suffix(queries.dtype(), "queries")?))?;
        let (qs, ql) = queries.storage_and_layout();
        let (bs, bl) = bounds.storage_and_layout();
        let (ts, tl) = block_tables.storage_and_layout();
        let (cs, cl) = plan.context_lens.storage_and_layout();
        let (ss, sl) = scores.storage_and_layout();
        let t_ = view::<u32>(&ts, tl, "block_tables")?;
        let c_ = view::<u32>(&cs, cl, "context_lens")?;
        let s_ = view::<f32>(&ss, sl, "scores")?;
        let ints = [max_blocks as i32, p.rows as i32, heads as i32, p.kv_heads as i32, head_dim as i32, p.block_size as i32, p.max_pages as i32];
        // 4 warps of 8 pages per block (SCORE_PAGES_PER_WARP in plan.cu).
        let cfg = launch1d((p.max_pages.div_ceil(32).max(1) as u32, p.kv_heads as u32, p.batch as u32), 128, 0);
        let mut b = stream.launch_builder(&score);
        macro_rules! go {
            ($t:ty) => {{
                let q_ = view::<$t>(&qs, ql, "queries")?;
                let b_ = view::<$t>(&bs, bl, "page bounds")?;
                b.arg(&q_).arg(&b_).arg(&t_).arg(&ints[0]).arg(&c_).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&ints[5]).arg(&s_).arg(&ints[6]);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match queries.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    {
        let select = function(&dev, "plan", "select_top_pages_u32")?;
        let (ss, sl) = scores.storage_and_layout();
        let (cs, cl) = plan.context_lens.storage_and_layout();
        let (gs, gl) = plan.budget_pages.storage_and_layout();
        let (ps, pl) = pages.storage_and_layout();
        let (ns, nl) = counts.storage_and_layout();
        let s_ = view::<f32>(&ss, sl, "scores")?;
        let c_ = view::<u32>(&cs, cl, "context_lens")?;
        let g_ = view::<u32>(&gs, gl, "budget_pages")?;
        let p_ = view::<u32>(&ps, pl, "selected pages")?;
        let n_ = view::<u32>(&ns, nl, "selected counts")?;
        let ints = [p.max_pages as i32, p.block_size as i32, p.kv_heads as i32, p.stride.max(1) as i32];
        let mut b = stream.launch_builder(&select);
        b.arg(&s_).arg(&ints[0]).arg(&c_).arg(&g_).arg(&ints[1]).arg(&ints[2]).arg(&p_).arg(&n_).arg(&ints[3]);
        unsafe { b.launch(launch1d((p.kv_heads as u32, p.batch as u32, 1), 512, 0)) }.w()?;
    }
    Ok(Selection { pages, counts, masks: None })
}

/// Retro's row masks for a selection, from seen-page bitsets kept on the device across steps.
///
/// `seen` u32 `[pool_rows, kv_heads, words]` (`words * 32` ≥ the plan's pages); `meta` (i32 values
/// in a u32 tensor) `[batch, 2 * rows + 1]`, per sequence: the states of its `rows - 1` past rows (1 = a cached row,
/// which uses the listed pages its bitset lacks and then marks them; 0 = skip), the pool row of
/// each row (past rows, then the newest; -1 = none), its counter slot (-1 = none) and whether the
/// row leaving the window counts toward exposure (1/0); `counters` i64 `[slots, 2]` accumulate
/// supplement pages and the pages the leaving rows had seen. The newest row always uses every listed
/// page; afterwards its pool row (the leaving row's slot) holds exactly this selection. Pool rows in
/// `meta` are relative to `row_offset`, so one uploaded table serves every layer of a step.
pub fn retro_row_masks(plan: &DevicePlan, selection: &mut Selection, seen: &Tensor, meta: &Tensor, counters: &Tensor, row_offset: usize) -> Result<()> {
    let p = &plan.plan;
    let dev = cuda_device(&selection.pages, "selection")?;
    if p.rows < 2 {
        bail!("retro-kernels: row masks need a window of at least 2 rows, the plan has {}", p.rows);
    }
    check_dtype(seen, DType::U32, "seen")?;
    // i32 values carried in a u32 tensor (-1 = 0xffff_ffff): candle has no i32 dtype.
    check_dtype(meta, DType::U32, "meta")?;
    check_dims(meta, &[p.batch, 2 * p.rows + 1], "meta")?;
    check_dtype(counters, DType::I64, "counters")?;
    let (_, two) = counters.dims2()?;
    let (_, sh, words) = seen.dims3()?;
    if sh != p.kv_heads || words * 32 < p.max_pages || two != 2 {
        bail!("retro-kernels: seen {:?} / counters {:?} do not fit {} kv heads x {} pages", seen.dims(), counters.dims(), p.kv_heads, p.max_pages);
    }
    if !seen.is_contiguous() || !meta.is_contiguous() || !counters.is_contiguous() {
        bail!("retro-kernels: seen, meta and counters must be contiguous");
    }
    let masks = new_tensor::<u32>(&dev, &[p.lists(), p.stride.max(1)])?;
    if p.lists() > 0 {
        let func = function(&dev, "plan", "retro_row_masks")?;
        let (ps, pl) = selection.pages.storage_and_layout();
        let (ns, nl) = selection.counts.storage_and_layout();
        let (ms, ml) = masks.storage_and_layout();
        let (es, el) = seen.storage_and_layout();
        let (rs, rl) = meta.storage_and_layout();
        let (cs, cl) = plan.context_lens.storage_and_layout();
        let (ks, kl) = counters.storage_and_layout();
        let p_ = view::<u32>(&ps, pl, "selected pages")?;
        let n_ = view::<u32>(&ns, nl, "selected counts")?;
        let m_ = view::<u32>(&ms, ml, "masks")?;
        let e_ = view::<u32>(&es, el, "seen")?;
        let r_ = view::<u32>(&rs, rl, "meta")?;
        let c_ = view::<u32>(&cs, cl, "context_lens")?;
        let k_ = view::<i64>(&ks, kl, "counters")?;
        let ints = [p.stride.max(1) as i32, words as i32, p.block_size as i32, p.rows as i32, p.kv_heads as i32, row_offset as i32];
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&p_).arg(&n_).arg(&ints[0]).arg(&m_).arg(&e_).arg(&ints[1]).arg(&r_).arg(&c_).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&k_).arg(&ints[5]);
        unsafe { b.launch(launch1d((p.kv_heads as u32, p.batch as u32, 1), 256, 0)) }.w()?;
    }
    selection.masks = Some(masks);
    Ok(())
}

/// Dynamic shared memory of the decode kernel (see the layouts in selected_decode.cu).
fn decode_smem(dtype: DType, head_dim: usize, block_size: usize, maxq: usize) -> usize {
    // decode_stages() in selected_decode.cu: pages of K and V in shared memory at once.
    let stages = if dtype == DType::F32 { 2 } else { 3 };
    let pages = stages * 2 * head_dim * block_size * dtype.size_in_bytes();
    if dtype == DType::F32 {
        // selected_decode_fma: f32 queries [maxq][d], probabilities [maxq][bs], three [maxq] rows.
        pages + (maxq * head_dim + maxq * block_size + 3 * maxq) * 4
    } else {
        // selected_decode_mma: queries padded to 16-row tiles, rows padded by 8 (bank conflicts).
        let rows = maxq.div_ceil(16) * 16;
        pages + rows * (head_dim + 8) * 2 + (rows * (block_size + 8) + 3 * rows) * 4
    }
}

/// Sparse decode attention of `query [batch * rows, heads, head_dim]` over the selection: row r of
/// sequence b attends to the listed pages whose mask has bit r, within its causal prefix (the
/// first `context_len - (rows - 1 - r)` tokens). Returns the output in the query's dtype and the
/// natural-log lse per (row, head) in f32 (`-inf` for a row that attended to nothing, output 0).
/// Same semantics as `cpu::paged_decode_selected`. `softcap`: `c * tanh(s / c)` when `Some(c)`.
#[allow(clippy::too_many_arguments)]
pub fn selected_decode(
    plan: &DevicePlan,
    query: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    selection: &Selection,
    softmax_scale: f32,
    softcap: Option<f32>,
) -> Result<(Tensor, Tensor)> {
    let p = &plan.plan;
    let dev = cuda_device(query, "query")?;
    let (_, kv_heads, head_dim, block_size) = cache_geometry(key_cache, value_cache)?;
    let (qrows, heads, qdim) = query.dims3()?;
    check_dtype(key_cache, query.dtype(), "key_cache")?;
    if qdim != head_dim || kv_heads != p.kv_heads || block_size != p.block_size || qrows != p.batch * p.rows {
        bail!(
            "retro-kernels: query {:?} / caches (kv heads {kv_heads}, head dim {head_dim}, block {block_size}) do not fit the plan (batch {}, rows {}, kv heads {}, block {})",
            query.dims(), p.batch, p.rows, p.kv_heads, p.block_size
        );
    }
    if heads % kv_heads != 0 || (heads / kv_heads) * p.rows > MAX_QUERIES {
        bail!("retro-kernels: GQA group {} x window {} exceeds {MAX_QUERIES} queries per block", heads / kv_heads.max(1), p.rows);
    }
    if !matches!(head_dim, 64 | 128) || !matches!(block_size, 16 | 32) {
        bail!("retro-kernels: decode kernels are built for head dim 64/128 and block size 16/32, not {head_dim}/{block_size}");
    }
    check_dtype(block_tables, DType::U32, "block_tables")?;
    let (bt_rows, max_blocks) = block_tables.dims2()?;
    if bt_rows != p.batch || max_blocks < p.max_pages {
        bail!("retro-kernels: block_tables {:?} too small for {} sequences of {} pages", block_tables.dims(), p.batch, p.max_pages);
    }
    check_dims(&selection.pages, &[p.lists(), p.stride.max(1)], "selection pages")?;
    if let Some(c) = softcap {
        if !(c.is_finite() && c > 0.0) {
            bail!("retro-kernels: softcap must be a positive number, got {c}");
        }
    }
    let out = new_tensor_dtype(&dev, query.dtype(), &[qrows, heads, head_dim])?;
    let lse = new_tensor::<f32>(&dev, &[qrows, heads])?;
    if qrows == 0 {
        return Ok((out, lse));
    }
    let splits = p.splits;
    let part_o = new_tensor::<f32>(&dev, &[splits, qrows, heads, head_dim])?;
    let part_lse = new_tensor::<f32>(&dev, &[splits, qrows, heads])?;
    let sfx = suffix(query.dtype(), "query")?;
    let stream = dev.cuda_stream();
    {
        let maxq = queries_per_block((heads / kv_heads) * p.rows);
        let smem = decode_smem(query.dtype(), head_dim, block_size, maxq);
        let name = format!("selected_decode_{sfx}_d{head_dim}_bs{block_size}_q{maxq}");
        let func = function_with(&dev, "selected_decode", &name, |f| {
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()
        })?;
        let (qs, ql) = query.storage_and_layout();
        let (ks, kl) = key_cache.storage_and_layout();
        let (vs, vl) = value_cache.storage_and_layout();
        let (ts, tl) = block_tables.storage_and_layout();
        let (cs, cl) = plan.context_lens.storage_and_layout();
        let (ps, pl) = selection.pages.storage_and_layout();
        let (ns, nl) = selection.counts.storage_and_layout();
        let masks = selection.masks.as_ref().map(|m| m.storage_and_layout());
        let (os, ol) = part_o.storage_and_layout();
        let (ls, ll) = part_lse.storage_and_layout();
        let t_ = view::<u32>(&ts, tl, "block_tables")?;
        let c_ = view::<u32>(&cs, cl, "context_lens")?;
        let p_ = view::<u32>(&ps, pl, "selection pages")?;
        let n_ = view::<u32>(&ns, nl, "selection counts")?;
        let m_ = match &masks {
            Some((ms, ml)) => Some(view::<u32>(ms, ml, "selection masks")?),
            None => None,
        };
        let null: u64 = 0;
        let o_ = view::<f32>(&os, ol, "partial outputs")?;
        let l_ = view::<f32>(&ls, ll, "partial lse")?;
        let ints = [max_blocks as i32, p.stride.max(1) as i32, p.rows as i32, heads as i32, kv_heads as i32, p.pages_per_split as i32];
        let floats = [softmax_scale, softcap.unwrap_or(0.0)];
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, kv_heads as u32, p.batch as u32),
            block_dim: (head_dim as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = stream.launch_builder(&func);
        macro_rules! go {
            ($t:ty) => {{
                let q_ = view::<$t>(&qs, ql, "query")?;
                let k_ = view::<$t>(&ks, kl, "key_cache")?;
                let v_ = view::<$t>(&vs, vl, "value_cache")?;
                b.arg(&q_).arg(&k_).arg(&v_).arg(&t_).arg(&ints[0]).arg(&c_).arg(&p_).arg(&n_);
                match &m_ {
                    Some(m) => b.arg(m),
                    None => b.arg(&null),
                };
                b.arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&floats[0]).arg(&floats[1]).arg(&ints[5]).arg(&o_).arg(&l_);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match query.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    {
        let func = function(&dev, "selected_decode", &format!("combine_splits_{sfx}"))?;
        let (os, ol) = part_o.storage_and_layout();
        let (ls, ll) = part_lse.storage_and_layout();
        let (us, ul) = out.storage_and_layout();
        let (es, el) = lse.storage_and_layout();
        let o_ = view::<f32>(&os, ol, "partial outputs")?;
        let l_ = view::<f32>(&ls, ll, "partial lse")?;
        let e_ = view::<f32>(&es, el, "lse")?;
        let ints = [splits as i32, qrows as i32, heads as i32, head_dim as i32];
        let cfg = launch1d((qrows as u32, heads as u32, 1), head_dim as u32, 0);
        let mut b = stream.launch_builder(&func);
        macro_rules! go {
            ($t:ty) => {{
                let u_ = view::<$t>(&us, ul, "output")?;
                b.arg(&o_).arg(&l_).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&u_).arg(&e_);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match query.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    Ok((out, lse))
}

fn new_tensor_dtype(dev: &CudaDevice, dtype: DType, dims: &[usize]) -> Result<Tensor> {
    match dtype {
        DType::F32 => new_tensor::<f32>(dev, dims),
        DType::F16 => new_tensor::<half::f16>(dev, dims),
        DType::BF16 => new_tensor::<half::bf16>(dev, dims),
        other => bail!("retro-kernels: unsupported dtype {other:?}"),
    }
}

/// Retro's output-cache step for one layer. `entries` (i32 values in a u32 tensor) `[k, 3]`: a cached
/// row of `cache_o` f32 `[n, heads, head_dim]` / `cache_lse` f32 `[n, heads]` (plus `row_offset`),
/// the partial row of `part_o [m, heads, head_dim]` / `part_lse [m, heads]` it absorbs (-1: none),
/// exactly by log-sum-exp over disjoint tokens, and the partial row that then replaces it (-1: none;
/// a row entering the window). A merged row is also written back over its partial row, so `part_o`
/// becomes the layer's corrected output. Rows are checked against `n` and `m` on the host side
/// (the caller's tables), not here: reading them back would stall the stream.
pub fn merge_step(cache_o: &Tensor, cache_lse: &Tensor, part_o: &Tensor, part_lse: &Tensor, entries: &Tensor, row_offset: usize) -> Result<()> {
    let dev = cuda_device(cache_o, "cache_o")?;
    let (n, heads, head_dim) = cache_o.dims3()?;
    check_dtype(cache_o, DType::F32, "cache_o")?;
    check_dims(cache_lse, &[n, heads], "cache_lse")?;
    let (m, ph, pd) = part_o.dims3()?;
    if (ph, pd) != (heads, head_dim) {
        bail!("retro-kernels: partial output {:?} does not match the cache's heads x head dim", part_o.dims());
    }
    check_dims(part_lse, &[m, heads], "part_lse")?;
    check_dtype(entries, DType::U32, "entries")?;
    let (k, three) = entries.dims2()?;
    if three != 3 || row_offset > n {
        bail!("retro-kernels: entries {:?} must be [k, 3] and row offset {row_offset} within {n} rows", entries.dims());
    }
    if k == 0 {
        return Ok(());
    }
    let func = function(&dev, "selected_decode", &format!("merge_step_{}", suffix(part_o.dtype(), "part_o")?))?;
    let (cs, cl) = cache_o.storage_and_layout();
    let (es, el) = cache_lse.storage_and_layout();
    let (ps, pl) = part_o.storage_and_layout();
    let (ls, ll) = part_lse.storage_and_layout();
    let (rs, rl) = entries.storage_and_layout();
    let c_ = view::<f32>(&cs, cl, "cache_o")?;
    let e_ = view::<f32>(&es, el, "cache_lse")?;
    let l_ = view::<f32>(&ls, ll, "part_lse")?;
    let r_ = view::<u32>(&rs, rl, "entries")?;
    let ints = [row_offset as i32, heads as i32, head_dim as i32];
    let stream = dev.cuda_stream();
    let cfg = launch1d((k as u32, heads as u32, 1), head_dim as u32, 0);
    let mut b = stream.launch_builder(&func);
    macro_rules! go {
        ($t:ty) => {{
            let p_ = view::<$t>(&ps, pl, "part_o")?;
            b.arg(&c_).arg(&e_).arg(&p_).arg(&l_).arg(&r_).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]);
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match part_o.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
    Ok(())
}

/// Query rows and keys per tile of the prompt kernel (`PROMPT_BM`, `PROMPT_BN` in prompt_attention.cu).
const PROMPT_TILE: usize = 64;

/// Causal attention of one prompt over itself on tensor cores (a prefill with no cached tokens):
/// `q` `[1, heads, n, d]`, `k`/`v` `[1, kv_heads, n, d]` (query head `h` reads KV head
/// `h / (heads / kv_heads)`), f16 or bf16, head dim 64 or 128; `softmax(q kᵀ · scale + causal) v` as
/// `[1, heads, n, d]` in `q`'s dtype. Same semantics as `cpu::causal_prompt_attention` (the reference
/// of `retro-gpu-check`). Strided inputs are made contiguous first.
pub fn causal_prompt_attention(q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32) -> Result<Tensor> {
    let dev = cuda_device(q, "q")?;
    let crate::PromptShape { heads, kv_heads, n, d } = crate::PromptShape::of(q, k, v)?;
    if !matches!(d, 64 | 128) || !matches!(q.dtype(), DType::F16 | DType::BF16) {
        bail!("retro-kernels: prompt attention is built for f16/bf16 and head dim 64/128, not {:?}/{d}", q.dtype());
    }
    check_dtype(k, q.dtype(), "k")?;
    check_dtype(v, q.dtype(), "v")?;
    let out = new_tensor_dtype(&dev, q.dtype(), &[1, heads, n, d])?;
    if n == 0 || heads == 0 {
        return Ok(out);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let sfx = suffix(q.dtype(), "q")?;
    // Two buffers of a K and a V tile, rows padded by 8 elements.
    let smem = 2 * 2 * PROMPT_TILE * (d + 8) * q.dtype().size_in_bytes();
    let func = function_with(&dev, "prompt_attention", &format!("causal_prompt_attention_{sfx}_d{d}"), |f| {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()
    })?;
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = out.storage_and_layout();
        let ints = [n as i32, heads as i32, kv_heads as i32];
        let stream = dev.cuda_stream();
        let cfg = launch1d((n.div_ceil(PROMPT_TILE) as u32, heads as u32, 1), 128, smem as u32);
        let mut b = stream.launch_builder(&func);
        macro_rules! go {
            ($t:ty) => {{
                let q_ = view::<$t>(&qs, ql, "q")?;
                let k_ = view::<$t>(&ks, kl, "k")?;
                let v_ = view::<$t>(&vs, vl, "v")?;
                let o_ = view::<$t>(&os, ol, "out")?;
                b.arg(&q_).arg(&k_).arg(&v_).arg(&o_).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&softmax_scale);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match q.dtype() {
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    Ok(out)
}
