//! Shared plumbing for the CPU kernels: cache element types, paged-cache geometry, and read access
//! to CPU tensor storage.

use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::sync::RwLockReadGuard;

/// A dtype a paged cache (or a kernel output) may hold; all arithmetic happens in f32.
pub(crate) trait CacheElem: WithDType + Copy + Send + Sync {
    /// `src` viewed as f32: f32 borrows `src` itself, other types convert into `staging`, which
    /// must be exactly as long as `src`.
    fn as_f32_slice<'a>(src: &'a [Self], staging: &'a mut [f32]) -> &'a [f32];

    fn from_f32_slice(src: &[f32], dst: &mut [Self]);

    fn cpu_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

impl CacheElem for f32 {
    #[inline]
    fn as_f32_slice<'a>(src: &'a [Self], _staging: &'a mut [f32]) -> &'a [f32] {
        src
    }

    #[inline]
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }

    fn cpu_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F32(data) => Some(data),
            _ => None,
        }
    }
}

// The slice conversions (rather than per-element `to_f32`) pick up F16C/NEON at runtime.
macro_rules! impl_half_cache_elem {
    ($ty:ty, $variant:ident) => {
        impl CacheElem for $ty {
            #[inline]
            fn as_f32_slice<'a>(src: &'a [Self], staging: &'a mut [f32]) -> &'a [f32] {
                src.convert_to_f32_slice(staging);
                staging
            }

            #[inline]
            fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
                dst.convert_from_f32_slice(src)
            }

            fn cpu_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$variant(data) => Some(data),
                    _ => None,
                }
            }
        }
    };
}
impl_half_cache_elem!(f16, F16);
impl_half_cache_elem!(bf16, BF16);

/// Elements per innermost key-cache chunk: the upstream layout packs 16 bytes per chunk.
pub(crate) fn key_chunk_len(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

pub(crate) fn ensure_float_dtype(dtype: DType, what: &str) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => bail!("{what}: dtype {other:?} is not supported (expected f32, f16 or bf16)"),
    }
}

pub(crate) fn ensure_cpu(t: &Tensor, what: &str) -> Result<()> {
    if !t.device().is_cpu() {
        bail!(
            "{what}: tensor is on {:?}; the cpu paged-attention kernels need CPU tensors",
            t.device().location()
        );
    }
    Ok(())
}

/// Shape of a pair of paged caches, validated against each other.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheGeometry {
    pub dtype: DType,
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Key-cache innermost chunk length (`x`).
    pub chunk: usize,
}

impl CacheGeometry {
    /// Validates `key_cache` `[blocks, kv_heads, head_dim / x, block_size, x]` and `value_cache`
    /// `[blocks, kv_heads, head_dim, block_size]`: CPU, same float dtype, contiguous.
    pub fn of(key_cache: &Tensor, value_cache: &Tensor) -> Result<Self> {
        ensure_cpu(key_cache, "key_cache")?;
        ensure_cpu(value_cache, "value_cache")?;
        let dtype = key_cache.dtype();
        ensure_float_dtype(dtype, "key_cache")?;
        if value_cache.dtype() != dtype {
            bail!(
                "value_cache dtype {:?} differs from key_cache dtype {dtype:?}",
                value_cache.dtype()
            );
        }
        let chunk = key_chunk_len(dtype);
        let (num_blocks, kv_heads, chunks, block_size, x) = match key_cache.dims() {
            &[a, b, c, d, e] => (a, b, c, d, e),
            dims => bail!(
                "key_cache must be [blocks, kv_heads, head_dim/x, block_size, x], got {dims:?}"
            ),
        };
        if x != chunk {
            bail!("key_cache innermost dim is {x}, expected x = 16 / sizeof({dtype:?}) = {chunk}");
        }
        let head_dim = chunks * chunk;
        let expected_value = [num_blocks, kv_heads, head_dim, block_size];
        if value_cache.dims() != expected_value {
            bail!(
                "value_cache must be [blocks, kv_heads, head_dim, block_size] = {expected_value:?} to match key_cache {:?}, got {:?}",
                key_cache.dims(),
                value_cache.dims()
            );
        }
        if block_size == 0 || head_dim == 0 || kv_heads == 0 {
            bail!(
                "paged caches have an empty dimension: key_cache {:?}",
                key_cache.dims()
            );
        }
        for (t, what) in [(key_cache, "key_cache"), (value_cache, "value_cache")] {
            if !t.is_contiguous() {
                bail!("{what} must be contiguous");
            }
        }
        Ok(Self {
            dtype,
            num_blocks,
            kv_heads,
            head_dim,
            block_size,
            chunk,
        })
    }

    /// Elements of one (block, kv head) page, identical for key and value caches.
    pub fn page_len(&self) -> usize {
        self.head_dim * self.block_size
    }

    pub fn block_len(&self) -> usize {
        self.kv_heads * self.page_len()
    }

    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Offset of the (block, kv head) page within either cache.
    #[inline]
    pub fn page_offset(&self, block: usize, kv_head: usize) -> usize {
        (block * self.kv_heads + kv_head) * self.page_len()
    }

    /// Offset of element `d` of token `off` inside a key page.
    #[inline]
    pub fn key_in_page(&self, off: usize, d: usize) -> usize {
        ((d / self.chunk) * self.block_size + off) * self.chunk + d % self.chunk
    }

    /// Offset of element `d` of token `off` inside a value page.
    #[inline]
    pub fn value_in_page(&self, off: usize, d: usize) -> usize {
        d * self.block_size + off
    }

    /// Rearranges the first `tokens` tokens of an f32 key page into row-major
    /// `[tokens][head_dim]`.
    #[inline]
    pub fn key_page_to_rows(&self, page: &[f32], tokens: usize, rows: &mut [f32]) {
        // A compile-time chunk length turns each chunk copy into plain vector moves.
        match self.chunk {
            4 => key_chunks_to_rows::<4>(page, self.block_size, self.head_dim, tokens, rows),
            8 => key_chunks_to_rows::<8>(page, self.block_size, self.head_dim, tokens, rows),
            other => unreachable!("key chunk {other}: only 4-byte and 2-byte dtypes are admitted"),
        }
    }

    /// Rearranges the first `tokens` tokens of an f32 value page into row-major
    /// `[tokens][head_dim]`.
    #[inline]
    pub fn value_page_to_rows(&self, page: &[f32], tokens: usize, rows: &mut [f32]) {
        let hd = self.head_dim;
        // Element by element this took about a fifth of the decode kernel's time (perf of the
        // decode_kernel bench at 8K); 4x4 register tiles move the same values a vector at a time.
        let tiled = value_tiles_to_rows(page, self.block_size, hd, tokens, rows);
        for (d, across_tokens) in page.chunks_exact(self.block_size).enumerate() {
            for (t, &v) in across_tokens[..tokens].iter().enumerate().skip(tiled) {
                rows[t * hd + d] = v;
            }
        }
    }
}

#[inline]
fn key_chunks_to_rows<const X: usize>(
    page: &[f32],
    block_size: usize,
    head_dim: usize,
    tokens: usize,
    rows: &mut [f32],
) {
    for (c, chunk_rows) in page.chunks_exact(block_size * X).enumerate() {
        let (chunks, _) = chunk_rows.as_chunks::<X>();
        for (t, src) in chunks[..tokens].iter().enumerate() {
            let dst: &mut [f32; X] = (&mut rows[t * head_dim + c * X..][..X]).try_into().unwrap();
            *dst = *src;
        }
    }
}

/// Transposes the value page's first `tokens / 4 * 4` tokens in 4x4 tiles and returns how many
/// it did; the caller does the rest. 0 where it does not apply.
#[inline]
fn value_tiles_to_rows(page: &[f32], block_size: usize, head_dim: usize, tokens: usize, rows: &mut [f32]) -> usize {
    let tiled = tokens / 4 * 4;
    if !(tiled > 0 && head_dim.is_multiple_of(4) && tokens <= block_size) {
        return 0;
    }
    assert!(page.len() >= head_dim * block_size && rows.len() >= tokens * head_dim);
    for d in (0..head_dim).step_by(4) {
        for t in (0..tiled).step_by(4) {
            // SAFETY: source rows d..d + 4 < head_dim of block_size values from t + 4 <= tokens,
            // destination rows t..t + 4 < tokens of head_dim values from d + 4 <= head_dim.
            unsafe { transpose_4x4(page.as_ptr().add(d * block_size + t), block_size, rows.as_mut_ptr().add(t * head_dim + d), head_dim) };
        }
    }
    tiled
}

/// `dst[j * dst_stride + k] = src[k * src_stride + j]` for j, k < 4, a vector at a time (SSE is
/// part of x86_64's baseline); elsewhere element by element.
///
/// # Safety
/// The 4x4 tile must lie inside both allocations.
#[inline(always)]
unsafe fn transpose_4x4(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let (r0, r1) = (_mm_loadu_ps(src), _mm_loadu_ps(src.add(src_stride)));
        let (r2, r3) = (_mm_loadu_ps(src.add(2 * src_stride)), _mm_loadu_ps(src.add(3 * src_stride)));
        let (lo01, hi01) = (_mm_unpacklo_ps(r0, r1), _mm_unpackhi_ps(r0, r1));
        let (lo23, hi23) = (_mm_unpacklo_ps(r2, r3), _mm_unpackhi_ps(r2, r3));
        _mm_storeu_ps(dst, _mm_movelh_ps(lo01, lo23));
        _mm_storeu_ps(dst.add(dst_stride), _mm_movehl_ps(lo23, lo01));
        _mm_storeu_ps(dst.add(2 * dst_stride), _mm_movelh_ps(hi01, hi23));
        _mm_storeu_ps(dst.add(3 * dst_stride), _mm_movehl_ps(hi23, hi01));
    }
    #[cfg(not(target_arch = "x86_64"))]
    for j in 0..4 {
        for k in 0..4 {
            *dst.add(j * dst_stride + k) = *src.add(k * src_stride + j);
        }
    }
}

/// Read access to a contiguous CPU tensor's elements; holds the storage lock while alive.
pub(crate) struct CpuRead<'a> {
    storage: RwLockReadGuard<'a, Storage>,
    layout: &'a Layout,
    what: &'static str,
}

impl<'a> CpuRead<'a> {
    pub fn new(t: &'a Tensor, what: &'static str) -> Result<Self> {
        ensure_cpu(t, what)?;
        let (storage, layout) = t.storage_and_layout();
        if !layout.is_contiguous() {
            bail!("{what} must be contiguous");
        }
        Ok(Self {
            storage,
            layout,
            what,
        })
    }

    pub fn slice<T: WithDType>(&self) -> Result<&[T]> {
        let Storage::Cpu(cpu) = &*self.storage else {
            bail!("{}: expected CPU storage", self.what);
        };
        let all = cpu.as_slice::<T>()?;
        let start = self.layout.start_offset();
        Ok(&all[start..start + self.layout.shape().elem_count()])
    }
}

/// Copies a small integer tensor (any layout) to a Vec, checking its dtype and rank.
pub(crate) fn small_u32_vec(t: &Tensor, what: &str, rank: usize) -> Result<Vec<u32>> {
    ensure_cpu(t, what)?;
    if t.dtype() != DType::U32 {
        bail!("{what} must be u32, got {:?}", t.dtype());
    }
    if t.rank() != rank {
        bail!("{what} must have rank {rank}, got shape {:?}", t.dims());
    }
    t.flatten_all()?.to_vec1::<u32>()
}

/// Validated `block_tables` `[B, max_blocks]`.
pub(crate) struct BlockTables {
    pub entries: Vec<u32>,
    pub max_blocks: usize,
}

impl BlockTables {
    pub fn read(block_tables: &Tensor, batch: usize) -> Result<Self> {
        let entries = small_u32_vec(block_tables, "block_tables", 2)?;
        let (rows, max_blocks) = block_tables.dims2()?;
        if rows != batch {
            bail!("block_tables has {rows} rows but the batch has {batch} sequences");
        }
        Ok(Self {
            entries,
            max_blocks,
        })
    }

    pub fn of(&self, seq: usize) -> &[u32] {
        &self.entries[seq * self.max_blocks..(seq + 1) * self.max_blocks]
    }

    /// Checks that sequence `seq`'s first `tokens` tokens lie in valid blocks of `geometry`.
    pub fn check_sequence(
        &self,
        seq: usize,
        tokens: usize,
        geometry: &CacheGeometry,
    ) -> Result<()> {
        let pages = tokens.div_ceil(geometry.block_size);
        if pages > self.max_blocks {
            bail!(
                "sequence {seq} has {tokens} tokens = {pages} pages, but block_tables holds only {} per sequence",
                self.max_blocks
            );
        }
        if let Some(&bad) = self.of(seq)[..pages]
            .iter()
            .find(|&&b| b as usize >= geometry.num_blocks)
        {
            bail!(
                "sequence {seq} uses block {bad}, but the cache has {} blocks",
                geometry.num_blocks
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiled transpose against the plain definition, for every partial page length and for
    /// head dims the tiles do and do not divide; the rows past `tokens` must stay untouched.
    #[test]
    fn value_page_to_rows_is_the_transpose_for_every_token_count() {
        for (head_dim, block_size) in [(64, 16), (128, 32), (6, 16), (8, 8)] {
            let g = CacheGeometry { dtype: DType::F32, num_blocks: 1, kv_heads: 1, head_dim, block_size, chunk: 4 };
            let page: Vec<f32> = (0..head_dim * block_size).map(|i| i as f32 * 0.5 - 7.0).collect();
            for tokens in 0..=block_size {
                let mut rows = vec![f32::NAN; block_size * head_dim];
                g.value_page_to_rows(&page, tokens, &mut rows);
                for t in 0..block_size {
                    for d in 0..head_dim {
                        let got = rows[t * head_dim + d];
                        if t < tokens {
                            assert_eq!(got, page[g.value_in_page(t, d)], "hd {head_dim} bs {block_size} tokens {tokens} t {t} d {d}");
                        } else {
                            assert!(got.is_nan(), "hd {head_dim} bs {block_size} tokens {tokens}: row {t} written");
                        }
                    }
                }
            }
        }
    }
}
