//! Paged decode attention (flash-decoding on the CPU), dense or restricted to page selections.
//!
//! Both entry points walk a page list per (sequence, kv head): every page for [`paged_decode`],
//! the policy's [`PageSelection`] for [`paged_decode_selected`]. One task per (sequence, split of
//! its lists, kv heads) streams its pages once and serves every query head of the GQA group and
//! every query row that uses the page, keeping an online softmax per (head, row). Splits are merged
//! exactly afterwards by log-sum-exp. Dense tasks take every kv head of a block in turn: a block's
//! pages are one contiguous run of `kv_heads` pages, a longer stream for the prefetcher than one
//! scattered page.

use super::access::{
    ensure_cpu, ensure_float_dtype, small_u32_vec, BlockTables, CacheElem, CacheGeometry, CpuRead,
};
use crate::selection::{PageSelection, PageUse};
use candle_core::{bail, DType, Device, Result, Tensor};
use rayon::prelude::*;

mod kernel;
#[cfg(test)]
mod tests;

use kernel::{axpy, SplitKernel};

/// Splits shorter than this many tokens cost more in bookkeeping and merging than they gain.
const MIN_SPLIT_TOKENS: usize = 64;
/// Tasks per rayon thread to aim for, so uneven sequences still balance.
const TASKS_PER_THREAD: usize = 4;

/// Decode attention of query `[B * rows, heads, head_dim]` against the paged caches.
///
/// Row `r` of sequence `b` is query index `b * rows + r` and sees the first
/// `context_lens[b] - (rows - 1 - r)` tokens of its sequence (none: zeros). Query head `h` reads kv
/// head `h / (heads / kv_heads)`. `score = softmax_scale * q.k`, soft-capped to
/// `c * tanh(score / c)` when `softcap` is `Some(c)`. Returns `[B * rows, heads, head_dim]` in the
/// query's dtype.
pub fn paged_decode(
    query: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    softmax_scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    check_softcap(softcap)?;
    let inputs = DecodeInputs::read(query, key_cache, value_cache, block_tables, context_lens)?;
    decode_with_split(
        &inputs,
        key_cache,
        value_cache,
        softmax_scale,
        softcap,
        None,
    )
}

/// Attention output and log-sum-exp per query row and head.
pub struct AttentionWithLse {
    /// `[B * rows, heads, head_dim]` in the query's dtype.
    pub out: Tensor,
    /// `[B * rows * heads]`, row-major (seq, row, head): natural-log log-sum-exp of the scaled,
    /// soft-capped scores over exactly the tokens the row attended to; `f32::NEG_INFINITY` when it
    /// attended to none (its `out` is zero then).
    pub lse: Vec<f32>,
}

/// Decode attention restricted to `selection`: row `r` of sequence `b` (query index
/// `b * rows + r`) attends to the tokens of the pages of its kv head's list whose mask has bit `r`,
/// intersected with its causal limit, the first `context_lens[b] - (rows - 1 - r)` tokens.
/// Otherwise as [`paged_decode`]; the selection must fit the batch (see [`PageSelection`]) and
/// `rows <= 32`, or this is an error.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_selected(
    query: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    selection: &PageSelection,
    softmax_scale: f32,
    softcap: Option<f32>,
) -> Result<AttentionWithLse> {
    check_softcap(softcap)?;
    let inputs = DecodeInputs::read(query, key_cache, value_cache, block_tables, context_lens)?;
    inputs.check_selection(selection)?;
    let (out, lse) = decode_lists(
        &inputs,
        key_cache,
        value_cache,
        selection,
        softmax_scale,
        softcap,
        None,
    )?;
    Ok(AttentionWithLse {
        out: inputs.output_tensor(out)?,
        lse,
    })
}

pub(crate) fn check_softcap(softcap: Option<f32>) -> Result<()> {
    match softcap {
        Some(cap) if !(cap.is_finite() && cap > 0.0) => {
            bail!("softcap must be positive and finite, got {cap}")
        }
        _ => Ok(()),
    }
}

/// Validated decode arguments, shared with the reference implementation.
pub(crate) struct DecodeInputs {
    pub geometry: CacheGeometry,
    pub batch: usize,
    pub rows: usize,
    pub heads: usize,
    /// Query heads per kv head.
    pub group: usize,
    /// `[batch * rows, heads, head_dim]` in f32.
    pub queries: Vec<f32>,
    pub context_lens: Vec<usize>,
    pub tables: BlockTables,
    pub out_dtype: DType,
}

impl DecodeInputs {
    pub fn read(
        query: &Tensor,
        key_cache: &Tensor,
        value_cache: &Tensor,
        block_tables: &Tensor,
        context_lens: &Tensor,
    ) -> Result<Self> {
        let geometry = CacheGeometry::of(key_cache, value_cache)?;
        ensure_cpu(query, "query")?;
        ensure_float_dtype(query.dtype(), "query")?;
        let (query_rows, heads, head_dim) = query.dims3()?;
        if head_dim != geometry.head_dim {
            bail!(
                "query head_dim {head_dim} differs from the caches' {}",
                geometry.head_dim
            );
        }
        if heads == 0 || heads % geometry.kv_heads != 0 {
            bail!(
                "query heads {heads} is not a multiple of the caches' {} kv heads",
                geometry.kv_heads
            );
        }
        let context_lens: Vec<usize> = small_u32_vec(context_lens, "context_lens", 1)?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let batch = context_lens.len();
        let tables = BlockTables::read(block_tables, batch)?;
        if batch == 0 && query_rows != 0 {
            bail!("query has {query_rows} rows but the batch is empty");
        }
        if batch > 0 && (query_rows == 0 || query_rows % batch != 0) {
            bail!("query rows {query_rows} are not a positive multiple of the batch size {batch}");
        }
        let rows = query_rows.checked_div(batch).unwrap_or(0);
        for (seq, &tokens) in context_lens.iter().enumerate() {
            tables.check_sequence(seq, tokens, &geometry)?;
        }
        let queries = query
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            geometry,
            batch,
            rows,
            heads,
            group: heads / geometry.kv_heads,
            queries,
            context_lens,
            tables,
            out_dtype: query.dtype(),
        })
    }

    pub fn check_selection(&self, selection: &PageSelection) -> Result<()> {
        selection.validate(
            &self.context_lens,
            self.geometry.block_size,
            self.geometry.kv_heads,
            self.rows,
        )
    }

    /// Tokens visible to query row `row` of sequence `seq`.
    #[inline]
    pub fn visible_tokens(&self, seq: usize, row: usize) -> usize {
        self.context_lens[seq].saturating_sub(self.rows - 1 - row)
    }

    #[inline]
    pub fn query_index(&self, seq: usize, row: usize, head: usize) -> usize {
        ((seq * self.rows + row) * self.heads + head) * self.geometry.head_dim
    }

    pub fn output_len(&self) -> usize {
        self.batch * self.rows * self.heads * self.geometry.head_dim
    }

    pub fn lse_len(&self) -> usize {
        self.batch * self.rows * self.heads
    }

    pub fn output_tensor(&self, out: Vec<f32>) -> Result<Tensor> {
        let shape = (self.batch * self.rows, self.heads, self.geometry.head_dim);
        Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(self.out_dtype)
    }
}

/// The ascending page list each (sequence, kv head) walks. Implementations are only handed
/// (seq, kv head, position) triples that exist, and lists already checked against the batch.
pub(crate) trait PageLists: Sync {
    /// Every row uses every listed page: masks are never read, so `rows` may exceed 32.
    const EVERY_ROW: bool;
    fn list_len(&self, seq: usize, kv_head: usize) -> usize;
    fn entry(&self, seq: usize, kv_head: usize, at: usize) -> PageUse;
}

/// All pages of every sequence, for every row: `paged_decode`'s lists, without materialising them.
pub(crate) struct EveryPage<'a> {
    pub context_lens: &'a [usize],
    pub block_size: usize,
}

impl PageLists for EveryPage<'_> {
    const EVERY_ROW: bool = true;

    #[inline]
    fn list_len(&self, seq: usize, _kv_head: usize) -> usize {
        self.context_lens[seq].div_ceil(self.block_size)
    }

    #[inline]
    fn entry(&self, _seq: usize, _kv_head: usize, at: usize) -> PageUse {
        PageUse {
            page: at as u32,
            rows: u32::MAX,
        }
    }
}

impl PageLists for PageSelection {
    const EVERY_ROW: bool = false;

    #[inline]
    fn list_len(&self, seq: usize, kv_head: usize) -> usize {
        self.list(seq, kv_head).len()
    }

    #[inline]
    fn entry(&self, seq: usize, kv_head: usize, at: usize) -> PageUse {
        self.entries[self.offsets[seq * self.kv_heads + kv_head] + at]
    }
}

/// A contiguous run of the page lists of kv heads `kv_head..kv_head + kv_head_count` of one
/// sequence: positions `first_page..end_page` of each list (for `paged_decode`'s lists, position =
/// page), clipped to each list's length (a list shorter than its sequence's longest may have none).
#[derive(Debug, Clone, Copy)]
struct SplitTask {
    seq: usize,
    kv_head: usize,
    kv_head_count: usize,
    first_page: usize,
    end_page: usize,
}

impl SplitTask {
    fn kv_heads(&self) -> std::ops::Range<usize> {
        self.kv_head..self.kv_head + self.kv_head_count
    }
}

/// Partial states are ordered (sequence, split, kv head): state `(first_split[seq] + split) *
/// kv_heads + kv_head` holds split `split` of `seq` for `kv_head`, and each task owns the
/// `kv_head_count` consecutive states of its heads. A sequence has as many splits as its longest
/// list needs.
#[derive(Debug)]
struct SplitPlan {
    tasks: Vec<SplitTask>,
    /// Kv heads per task: all of them for lists that every head shares (the pages of one block are
    /// then read in one run), else 1.
    heads_per_task: usize,
    /// Per sequence, its first split's global index; one extra entry closes the last sequence.
    first_split: Vec<usize>,
}

impl SplitPlan {
    #[cfg(test)]
    fn new(
        context_lens: &[usize],
        block_size: usize,
        kv_heads: usize,
        pages_per_split: usize,
    ) -> Self {
        let lists = EveryPage {
            context_lens,
            block_size,
        };
        Self::for_lists(&lists, context_lens.len(), kv_heads, pages_per_split)
    }

    /// Kv heads one task walks together: every head's list is the same for `EVERY_ROW` lists.
    fn heads_per_task<L: PageLists>(kv_heads: usize) -> usize {
        if L::EVERY_ROW {
            kv_heads.max(1)
        } else {
            1
        }
    }

    fn for_lists<L: PageLists>(
        lists: &L,
        batch: usize,
        kv_heads: usize,
        pages_per_split: usize,
    ) -> Self {
        let pages_per_split = pages_per_split.max(1);
        let heads_per_task = Self::heads_per_task::<L>(kv_heads);
        let mut tasks = Vec::new();
        let mut first_split = Vec::with_capacity(batch + 1);
        let mut splits = 0;
        for seq in 0..batch {
            first_split.push(splits);
            let longest = (0..kv_heads)
                .map(|kv_head| lists.list_len(seq, kv_head))
                .max()
                .unwrap_or(0);
            for first in (0..longest).step_by(pages_per_split) {
                tasks.extend((0..kv_heads).step_by(heads_per_task).map(|kv_head| {
                    // Lists shared by a task's heads have one length: the first head's.
                    let len = lists.list_len(seq, kv_head);
                    SplitTask {
                        seq,
                        kv_head,
                        kv_head_count: heads_per_task,
                        first_page: first.min(len),
                        end_page: (first + pages_per_split).min(len),
                    }
                }));
                splits += 1;
            }
        }
        first_split.push(splits);
        Self {
            tasks,
            heads_per_task,
            first_split,
        }
    }

    /// Enough splits for `TASKS_PER_THREAD` tasks per thread over the whole batch.
    #[cfg(test)]
    fn auto_pages_per_split(
        context_lens: &[usize],
        block_size: usize,
        kv_heads: usize,
        threads: usize,
    ) -> usize {
        let lists = EveryPage {
            context_lens,
            block_size,
        };
        Self::auto_split_len(&lists, context_lens.len(), kv_heads, block_size, threads)
    }

    /// List positions per split, so that the batch makes about `TASKS_PER_THREAD` tasks per thread.
    fn auto_split_len<L: PageLists>(
        lists: &L,
        batch: usize,
        kv_heads: usize,
        block_size: usize,
        threads: usize,
    ) -> usize {
        let page_visits: usize = (0..batch)
            .flat_map(|seq| (0..kv_heads).map(move |kv_head| (seq, kv_head)))
            .map(|(seq, kv_head)| lists.list_len(seq, kv_head))
            .sum();
        let target_tasks = TASKS_PER_THREAD * threads.max(1);
        page_visits
            .div_ceil(target_tasks * Self::heads_per_task::<L>(kv_heads))
            .max(MIN_SPLIT_TOKENS.div_ceil(block_size))
            .max(1)
    }
}

/// Per-thread page buffers, reused across tasks.
struct PageScratch {
    key_staging: Vec<f32>,
    value_staging: Vec<f32>,
    /// `[block_size][head_dim]`
    key_rows: Vec<f32>,
    /// `[block_size][head_dim]`
    value_rows: Vec<f32>,
    scores: Vec<f32>,
}

impl PageScratch {
    fn new<T: CacheElem>(geometry: &CacheGeometry) -> Self {
        let page = geometry.page_len();
        // f32 pages are read in place and need no staging.
        let staging = if T::DTYPE == DType::F32 { 0 } else { page };
        Self {
            key_staging: vec![0.0; staging],
            value_staging: vec![0.0; staging],
            key_rows: vec![0.0; page],
            value_rows: vec![0.0; page],
            scores: vec![0.0; geometry.block_size],
        }
    }
}

/// One task's online-softmax state per (group head g, row r) at index `g * rows + r`: running max,
/// running sum of exponentials, and unnormalised output, laid out `[max..][sum..][acc..]`.
struct PartialView<'a> {
    max: &'a mut [f32],
    sum: &'a mut [f32],
    acc: &'a mut [f32],
}

fn partial_stride(states: usize, head_dim: usize) -> usize {
    states * (head_dim + 2)
}

fn split_partial(partial: &mut [f32], states: usize) -> PartialView<'_> {
    let (max, rest) = partial.split_at_mut(states);
    let (sum, acc) = rest.split_at_mut(states);
    PartialView { max, sum, acc }
}

fn read_partial(
    partial: &[f32],
    states: usize,
    state: usize,
    head_dim: usize,
) -> (f32, f32, &[f32]) {
    let acc = &partial[2 * states + state * head_dim..2 * states + (state + 1) * head_dim];
    (partial[state], partial[states + state], acc)
}

/// Dense decode over every page. `pages_per_split: None` picks the split size from the thread
/// count.
pub(crate) fn decode_with_split(
    inputs: &DecodeInputs,
    key_cache: &Tensor,
    value_cache: &Tensor,
    softmax_scale: f32,
    softcap: Option<f32>,
    pages_per_split: Option<usize>,
) -> Result<Tensor> {
    let lists = EveryPage {
        context_lens: &inputs.context_lens,
        block_size: inputs.geometry.block_size,
    };
    let (out, _lse) = decode_lists(
        inputs,
        key_cache,
        value_cache,
        &lists,
        softmax_scale,
        softcap,
        pages_per_split,
    )?;
    inputs.output_tensor(out)
}

/// Decode over `lists` (already checked against `inputs`): returns the f32 output
/// `[B * rows, heads, head_dim]` and the log-sum-exp `[B * rows * heads]`. `pages_per_split`
/// counts list entries per task; `None` picks it from the thread count.
pub(crate) fn decode_lists<L: PageLists>(
    inputs: &DecodeInputs,
    key_cache: &Tensor,
    value_cache: &Tensor,
    lists: &L,
    softmax_scale: f32,
    softcap: Option<f32>,
    pages_per_split: Option<usize>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if inputs.batch == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let keys = CpuRead::new(key_cache, "key_cache")?;
    let values = CpuRead::new(value_cache, "value_cache")?;
    let job = (inputs, lists, softmax_scale, softcap, pages_per_split);
    Ok(match inputs.geometry.dtype {
        DType::F32 => decode_typed::<f32, L>(keys.slice()?, values.slice()?, job),
        DType::F16 => decode_typed::<half::f16, L>(keys.slice()?, values.slice()?, job),
        DType::BF16 => decode_typed::<half::bf16, L>(keys.slice()?, values.slice()?, job),
        other => bail!("paged decode: unsupported cache dtype {other:?}"),
    })
}

type DecodeJob<'a, L> = (&'a DecodeInputs, &'a L, f32, Option<f32>, Option<usize>);

fn decode_typed<T: CacheElem, L: PageLists>(
    key_cache: &[T],
    value_cache: &[T],
    (inputs, lists, softmax_scale, softcap, pages_per_split): DecodeJob<'_, L>,
) -> (Vec<f32>, Vec<f32>) {
    let g = &inputs.geometry;
    let pages_per_split = pages_per_split.unwrap_or_else(|| {
        SplitPlan::auto_split_len(
            lists,
            inputs.batch,
            g.kv_heads,
            g.block_size,
            rayon::current_num_threads(),
        )
    });
    let plan = SplitPlan::for_lists(lists, inputs.batch, g.kv_heads, pages_per_split);
    // Folding the scale into q saves a multiply per score.
    let scaled_queries: Vec<f32> = inputs.queries.iter().map(|q| q * softmax_scale).collect();
    let states = inputs.group * inputs.rows;
    let stride = partial_stride(states, g.head_dim);

    let kernel = SplitKernel {
        inputs,
        lists,
        key_cache,
        value_cache,
        scaled_queries: &scaled_queries,
        softcap,
    };
    let mut partials = vec![0f32; plan.tasks.len() * plan.heads_per_task * stride];
    partials
        .par_chunks_mut(plan.heads_per_task * stride)
        .zip(plan.tasks.par_iter())
        .for_each_init(
            || PageScratch::new::<T>(g),
            |scratch, (partial, task)| kernel.run(task, scratch, partial),
        );

    let head_dim = g.head_dim;
    let mut out = vec![0f32; inputs.output_len()];
    let mut lse = vec![f32::NEG_INFINITY; inputs.lse_len()];
    out.par_chunks_mut(inputs.heads * head_dim)
        .zip(lse.par_chunks_mut(inputs.heads))
        .enumerate()
        .for_each(|(query_row, (out_row, lse_row))| {
            let (seq, row) = (query_row / inputs.rows, query_row % inputs.rows);
            let splits = plan.first_split[seq]..plan.first_split[seq + 1];
            for (head, (out_head, lse_head)) in out_row
                .chunks_exact_mut(head_dim)
                .zip(lse_row.iter_mut())
                .enumerate()
            {
                let (kv_head, state) = (
                    head / inputs.group,
                    (head % inputs.group) * inputs.rows + row,
                );
                let partial_of = |split: usize| {
                    let at = split * g.kv_heads + kv_head;
                    read_partial(
                        &partials[at * stride..(at + 1) * stride],
                        states,
                        state,
                        head_dim,
                    )
                };
                let global_max = splits
                    .clone()
                    .map(|s| partial_of(s).0)
                    .fold(f32::NEG_INFINITY, f32::max);
                if global_max == f32::NEG_INFINITY {
                    continue; // no visible tokens: the output stays zero, the lse -inf
                }
                let mut total = 0f32;
                for split in splits.clone() {
                    let (max, sum, acc) = partial_of(split);
                    if sum == 0.0 {
                        continue;
                    }
                    let weight = (max - global_max).exp();
                    total += sum * weight;
                    axpy(out_head, weight, acc);
                }
                let inv_total = 1.0 / total;
                out_head.iter_mut().for_each(|o| *o *= inv_total);
                *lse_head = global_max + total.ln();
            }
        });
    (out, lse)
}
