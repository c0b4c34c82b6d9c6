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

/// What every split task of one decode call shares.
struct SplitKernel<'a, T, L> {
    inputs: &'a DecodeInputs,
    lists: &'a L,
    key_cache: &'a [T],
    value_cache: &'a [T],
    scaled_queries: &'a [f32],
    softcap: Option<f32>,
}

impl<T: CacheElem, L: PageLists> SplitKernel<'_, T, L> {
    /// Online softmax over the task's pages for every (group head, row) state.
    fn run(&self, task: &SplitTask, scratch: &mut PageScratch, partial: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 (checked at run time).
            return unsafe { self.run_avx2(task, scratch, partial) };
        }
        self.run_portable(task, scratch, partial)
    }

    /// The same code with 256-bit vectors: the build targets x86_64's baseline (SSE2), and the dot
    /// products and axpys here are the kernel's arithmetic. Rust never fuses a multiply and an add
    /// on its own, so each lane computes exactly what the SSE2 code computes: bit-identical results.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, task: &SplitTask, scratch: &mut PageScratch, partial: &mut [f32]) {
        self.run_portable(task, scratch, partial)
    }

    /// `partial` holds the states of the task's kv heads, one `partial_stride` each.
    #[inline(always)]
    fn run_portable(&self, task: &SplitTask, scratch: &mut PageScratch, partial: &mut [f32]) {
        let (inputs, lists) = (self.inputs, self.lists);
        let g = &inputs.geometry;
        let states = inputs.group * inputs.rows;
        let stride = partial_stride(states, g.head_dim);
        partial.fill(0.0);
        for head_partial in partial.chunks_exact_mut(stride) {
            head_partial[..states].fill(f32::NEG_INFINITY);
        }
        let table = inputs.tables.of(task.seq);
        let heads = task.kv_heads();

        for at in task.first_page..task.end_page {
            if at + 1 < task.end_page {
                // Pages are scattered blocks of a few KB, too short for the hardware prefetcher to
                // ramp up on: ask for the next one while this one is computed. A dense task's heads
                // share the page, whose pages for consecutive heads are one contiguous run.
                let next = lists.entry(task.seq, task.kv_head, at + 1).page as usize;
                if let Some(&block) = table.get(next) {
                    let next_at = g.page_offset(block as usize, heads.start);
                    let next_end = g.page_offset(block as usize, heads.end - 1) + g.page_len();
                    prefetch(self.key_cache.get(next_at..next_end));
                    prefetch(self.value_cache.get(next_at..next_end));
                }
            }
            for (kv_head, head_partial) in heads.clone().zip(partial.chunks_exact_mut(stride)) {
                let entry = lists.entry(task.seq, kv_head, at);
                let state = split_partial(head_partial, states);
                self.attend_page(task.seq, kv_head, entry, table, scratch, state);
            }
        }
    }

    /// Folds one page of one kv head into the online softmax of every (group head, row) using it.
    #[inline(always)]
    fn attend_page(
        &self,
        seq: usize,
        kv_head: usize,
        PageUse { page, rows: mask }: PageUse,
        table: &[u32],
        scratch: &mut PageScratch,
        state: PartialView<'_>,
    ) {
        let Self {
            inputs,
            key_cache,
            value_cache,
            scaled_queries,
            softcap,
            ..
        } = *self;
        let g = &inputs.geometry;
        let (rows, head_dim, block_size) = (inputs.rows, g.head_dim, g.block_size);
        let page_start = page as usize * block_size;
        let uses_row = |row: usize| L::EVERY_ROW || (mask >> row) & 1 != 0;
        // Causal limits grow with the row, so the last using row bounds what must be read:
        // pages no using row can see are skipped without touching the cache.
        let last_row = if L::EVERY_ROW {
            rows - 1
        } else if mask == 0 {
            return;
        } else {
            (u32::BITS - 1 - mask.leading_zeros()) as usize
        };
        // Tokens of this page a row can see; never more for an earlier row than for a later one.
        let visible_in_page = |row: usize| inputs.visible_tokens(seq, row).saturating_sub(page_start).min(block_size);
        let page_tokens = visible_in_page(last_row);
        if page_tokens == 0 {
            return;
        }
        let page_at = g.page_offset(table[page as usize] as usize, kv_head);
        let page_range = page_at..page_at + g.page_len();
        // Row-major copies, made once per page and shared by every head and row of the group,
        // turn each score into a contiguous dot product and each value into a contiguous axpy.
        let key_page = T::as_f32_slice(&key_cache[page_range.clone()], &mut scratch.key_staging);
        g.key_page_to_rows(key_page, page_tokens, &mut scratch.key_rows);
        let value_page = T::as_f32_slice(&value_cache[page_range], &mut scratch.value_staging);
        g.value_page_to_rows(value_page, page_tokens, &mut scratch.value_rows);

        for row in (0..rows).filter(|&row| uses_row(row)) {
            let visible = visible_in_page(row);
            if visible == 0 {
                continue;
            }
            for member in 0..inputs.group {
                let head = kv_head * inputs.group + member;
                let q_at = inputs.query_index(seq, row, head);
                let q = &scaled_queries[q_at..q_at + head_dim];
                let scores = &mut scratch.scores[..visible];
                for (score, key) in scores
                    .iter_mut()
                    .zip(scratch.key_rows.chunks_exact(head_dim))
                {
                    *score = dot(q, key);
                }
                if let Some(cap) = softcap {
                    scores.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
                }

                let s = member * rows + row;
                let acc = &mut state.acc[s * head_dim..(s + 1) * head_dim];
                let page_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let new_max = state.max[s].max(page_max);
                if state.sum[s] > 0.0 && new_max > state.max[s] {
                    let rescale = (state.max[s] - new_max).exp();
                    state.sum[s] *= rescale;
                    acc.iter_mut().for_each(|a| *a *= rescale);
                }
                state.max[s] = new_max;
                let mut page_sum = 0f32;
                for (&score, value) in
                    scores.iter().zip(scratch.value_rows.chunks_exact(head_dim))
                {
                    let p = (score - new_max).exp();
                    page_sum += p;
                    axpy(acc, p, value);
                }
                state.sum[s] += page_sum;
            }
        }
    }
}

/// Tests set this to run the SSE2 code on a machine with AVX2 and compare the two bit for bit.
#[cfg(all(test, target_arch = "x86_64"))]
static FORCE_PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    #[cfg(test)]
    if FORCE_PORTABLE.load(std::sync::atomic::Ordering::SeqCst) {
        return false;
    }
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2"))
}

/// Asks for every cache line of `data` (a hint: no effect on results).
#[inline(always)]
fn prefetch<T>(data: Option<&[T]>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(data) = data {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (start, bytes) = (data.as_ptr() as *const i8, std::mem::size_of_val(data));
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and `line` stays inside `data` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Several independent accumulators so the reduction vectorises without reassociation flags.
/// Always inlined, so that it is compiled with the caller's target features (`run_avx2`).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut lanes = [0f32; LANES];
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in acc.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::super::reference::paged_decode_reference;
    use super::super::test_support::{
        assert_close, dense_decode, paged_batch, to_f32_vec, PagedBatch, Rng,
    };
    use super::*;

    #[derive(Debug)]
    struct Case {
        dtype: DType,
        block_size: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rows: usize,
        softcap: Option<f32>,
    }

    fn decode_args(batch: &PagedBatch) -> (&Tensor, &Tensor, &Tensor, &Tensor) {
        (
            &batch.key_cache,
            &batch.value_cache,
            &batch.block_tables,
            &batch.context_lens,
        )
    }

    /// Checks `paged_decode` against the reference and the dense f64 attention, and the reference
    /// against the dense one.
    fn check_case(rng: &mut Rng, case: &Case, lens: &[usize], rel_tol: f32) {
        let batch = paged_batch(
            rng,
            lens,
            case.kv_heads,
            case.head_dim,
            case.block_size,
            case.dtype,
        );
        // Larger queries with a softcap, so that the cap really bends the scores.
        let amplitude = if case.softcap.is_some() { 16.0 } else { 4.0 };
        let query = rng.tensor(
            &[lens.len() * case.rows, case.heads, case.head_dim],
            amplitude,
            case.dtype,
        );
        let scale = 1.0 / (case.head_dim as f32).sqrt();
        let (kc, vc, bt, cl) = decode_args(&batch);

        let out = paged_decode(&query, kc, vc, bt, cl, scale, case.softcap).unwrap();
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // The AVX2 build of the kernel must be the SSE2 one with wider vectors, bit for bit.
            FORCE_PORTABLE.store(true, std::sync::atomic::Ordering::SeqCst);
            let portable = paged_decode(&query, kc, vc, bt, cl, scale, case.softcap);
            FORCE_PORTABLE.store(false, std::sync::atomic::Ordering::SeqCst);
            let bits = |t: &Tensor| to_f32_vec(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&out) == bits(&portable.unwrap()), "AVX2 and SSE2 kernels differ: {case:?} lens {lens:?}");
        }
        let reference =
            paged_decode_reference(&query, kc, vc, bt, cl, scale, case.softcap).unwrap();
        assert_eq!(out.dims(), query.dims());
        assert_eq!(out.dtype(), case.dtype);
        let dense = dense_decode(&batch, &query, scale, case.softcap);
        let what = format!(
            "{:?} block {} heads {}/{} head_dim {} rows {} softcap {:?} lens {lens:?}",
            case.dtype,
            case.block_size,
            case.heads,
            case.kv_heads,
            case.head_dim,
            case.rows,
            case.softcap
        );
        let (out, reference) = (to_f32_vec(&out), to_f32_vec(&reference));
        assert_close(
            &out,
            &reference,
            rel_tol,
            &format!("kernel vs reference: {what}"),
        );
        assert_close(&out, &dense, rel_tol, &format!("kernel vs dense: {what}"));
        assert_close(
            &reference,
            &dense,
            rel_tol,
            &format!("reference vs dense: {what}"),
        );
    }

    fn check_all_shapes(dtype: DType, rel_tol: f32, seed: u64) {
        let mut rng = Rng::new(seed);
        for block_size in [8, 16, 32] {
            let lens = [1, block_size - 1, block_size, block_size + 1, 300, 1000];
            for (heads, kv_heads) in [(3, 3), (9, 3), (8, 2)] {
                for head_dim in [64, 128] {
                    for rows in [1, 3] {
                        for softcap in [None, Some(30.0)] {
                            let case = Case {
                                dtype,
                                block_size,
                                heads,
                                kv_heads,
                                head_dim,
                                rows,
                                softcap,
                            };
                            check_case(&mut rng, &case, &lens, rel_tol);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn decode_f32_matches_reference_and_dense() {
        check_all_shapes(DType::F32, 1e-5, 10);
    }

    #[test]
    fn decode_f16_matches_reference_and_dense() {
        check_all_shapes(DType::F16, 2e-2, 11);
    }

    #[test]
    fn decode_bf16_matches_reference_and_dense() {
        check_all_shapes(DType::BF16, 2e-2, 12);
    }

    #[test]
    fn forced_uneven_splits_merge_exactly() {
        let mut rng = Rng::new(20);
        let lens = [1000, 37, 513, 16];
        let batch = paged_batch(&mut rng, &lens, 2, 128, 16, DType::F32);
        let query = rng.tensor(&[lens.len() * 3, 8, 128], 6.0, DType::F32);
        let (kc, vc, bt, cl) = decode_args(&batch);
        let inputs = DecodeInputs::read(&query, kc, vc, bt, cl).unwrap();
        for softcap in [None, Some(30.0)] {
            let dense = dense_decode(&batch, &query, 0.088, softcap);
            // 63 pages of the first sequence: chunks of 5 leave 3, of 7 divide evenly, 1 is the
            // most splits possible, 64 leaves everything in one split.
            for pages_per_split in [1, 5, 7, 64] {
                let out = decode_with_split(&inputs, kc, vc, 0.088, softcap, Some(pages_per_split))
                    .unwrap();
                let what = format!("{pages_per_split} pages per split, softcap {softcap:?}");
                assert_close(&to_f32_vec(&out), &dense, 1e-5, &what);
            }
        }
    }

    #[test]
    fn split_plan_covers_every_page_once_with_uneven_chunks() {
        let lens = [1000, 0, 37, 16];
        let plan = SplitPlan::new(&lens, 16, 3, 5);
        assert_eq!(plan.first_split, vec![0, 13, 13, 14, 15]);
        // Dense lists: one task per split walks all 3 kv heads.
        assert_eq!(plan.heads_per_task, 3);
        assert_eq!(plan.tasks.len(), 15);
        for (seq, &len) in lens.iter().enumerate() {
            for kv_head in 0..3 {
                let mut pages: Vec<(usize, usize)> = plan
                    .tasks
                    .iter()
                    .filter(|t| t.seq == seq && t.kv_heads().contains(&kv_head))
                    .map(|t| (t.first_page, t.end_page))
                    .collect();
                pages.sort();
                let mut next = 0;
                for (first, end) in pages {
                    assert_eq!(first, next);
                    assert!(end > first && end - first <= 5);
                    next = end;
                }
                assert_eq!(next, len.div_ceil(16));
            }
        }
        for (index, task) in plan.tasks.iter().enumerate() {
            assert_eq!((task.kv_head, task.kv_head_count), (0, 3), "task {index}");
        }
    }

    #[test]
    fn auto_split_gives_every_thread_several_tasks_at_batch_one() {
        for threads in [2, 8, 32] {
            let lens = [8192];
            let pages_per_split = SplitPlan::auto_pages_per_split(&lens, 16, 3, threads);
            let tasks = SplitPlan::new(&lens, 16, 3, pages_per_split).tasks.len();
            assert!(
                tasks >= TASKS_PER_THREAD * threads,
                "{threads} threads: {tasks} tasks"
            );
        }
        // Short contexts stay in one split rather than many tiny ones.
        let pages_per_split = SplitPlan::auto_pages_per_split(&[40], 16, 3, 64);
        assert_eq!(SplitPlan::new(&[40], 16, 3, pages_per_split).tasks.len(), 1);
    }

    #[test]
    fn long_context_with_automatic_split_matches_dense() {
        let mut rng = Rng::new(21);
        let lens = [5000];
        let (block_size, kv_heads) = (16, 3);
        let pages_per_split = SplitPlan::auto_pages_per_split(
            &lens,
            block_size,
            kv_heads,
            rayon::current_num_threads(),
        );
        let pages = lens[0].div_ceil(block_size);
        assert!(pages_per_split < pages, "the context must be split");
        assert!(
            pages % pages_per_split != 0,
            "the last chunk should be shorter: {pages} pages / {pages_per_split}"
        );
        for dtype in [DType::F32, DType::BF16] {
            let batch = paged_batch(&mut rng, &lens, kv_heads, 128, block_size, dtype);
            let query = rng.tensor(&[2, 9, 128], 6.0, dtype);
            let (kc, vc, bt, cl) = decode_args(&batch);
            let out = paged_decode(&query, kc, vc, bt, cl, 0.088, None).unwrap();
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            assert_close(
                &to_f32_vec(&out),
                &dense_decode(&batch, &query, 0.088, None),
                tol,
                &format!("{dtype:?}"),
            );
        }
    }

    #[test]
    fn query_dtype_may_differ_from_cache_dtype() {
        let mut rng = Rng::new(22);
        for (cache_dtype, query_dtype) in [
            (DType::BF16, DType::F32),
            (DType::F32, DType::F16),
            (DType::F16, DType::BF16),
        ] {
            let lens = [70, 5];
            let batch = paged_batch(&mut rng, &lens, 2, 64, 16, cache_dtype);
            let query = rng.tensor(&[4, 4, 64], 4.0, query_dtype);
            let (kc, vc, bt, cl) = decode_args(&batch);
            let out = paged_decode(&query, kc, vc, bt, cl, 0.125, Some(30.0)).unwrap();
            assert_eq!(out.dtype(), query_dtype);
            let dense = dense_decode(&batch, &query, 0.125, Some(30.0));
            let tol = if query_dtype == DType::F32 {
                1e-5
            } else {
                2e-2
            };
            assert_close(
                &to_f32_vec(&out),
                &dense,
                tol,
                &format!("{cache_dtype:?} cache, {query_dtype:?} query"),
            );
        }
    }

    #[test]
    fn rows_without_visible_tokens_are_zero() {
        let mut rng = Rng::new(23);
        let lens = [0, 1, 2, 20];
        let batch = paged_batch(&mut rng, &lens, 1, 64, 8, DType::F32);
        let query = rng.tensor(&[lens.len() * 3, 2, 64], 4.0, DType::F32);
        let (kc, vc, bt, cl) = decode_args(&batch);
        let out = to_f32_vec(&paged_decode(&query, kc, vc, bt, cl, 0.125, None).unwrap());
        let row_len = 2 * 64;
        // (sequence, row) pairs whose window is empty: all of sequence 0, rows 0-1 of 1, row 0 of 2.
        for (seq, row) in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)] {
            let at = (seq * 3 + row) * row_len;
            assert!(
                out[at..at + row_len].iter().all(|&o| o == 0.0),
                "seq {seq} row {row}"
            );
        }
        assert_close(
            &out,
            &dense_decode(&batch, &query, 0.125, None),
            1e-5,
            "ragged",
        );
    }

    #[test]
    fn softcap_changes_the_output() {
        let mut rng = Rng::new(24);
        let batch = paged_batch(&mut rng, &[200], 1, 64, 16, DType::F32);
        let query = rng.tensor(&[1, 1, 64], 16.0, DType::F32);
        let (kc, vc, bt, cl) = decode_args(&batch);
        let capped = to_f32_vec(&paged_decode(&query, kc, vc, bt, cl, 0.125, Some(5.0)).unwrap());
        let plain = to_f32_vec(&paged_decode(&query, kc, vc, bt, cl, 0.125, None).unwrap());
        let diff = capped
            .iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff > 1e-3,
            "softcap 5 should change the output, max diff {diff}"
        );
        assert_close(
            &capped,
            &dense_decode(&batch, &query, 0.125, Some(5.0)),
            1e-5,
            "softcap 5",
        );
    }

    #[test]
    fn empty_batch_gives_empty_output() {
        let mut rng = Rng::new(25);
        let batch = paged_batch(&mut rng, &[3], 2, 64, 16, DType::F16);
        let query = Tensor::zeros((0, 4, 64), DType::F16, &Device::Cpu).unwrap();
        let tables = Tensor::zeros((0, 4), DType::U32, &Device::Cpu).unwrap();
        let lens = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
        let out = paged_decode(
            &query,
            &batch.key_cache,
            &batch.value_cache,
            &tables,
            &lens,
            0.125,
            None,
        )
        .unwrap();
        assert_eq!(out.dims(), &[0, 4, 64]);
    }

    /// `cargo test --release -p mistralrs-retro --lib cpu::decode::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "timing report, not a check"]
    fn bench_decode_throughput() {
        let mut rng = Rng::new(27);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (sequences, tokens, heads, kv_heads, head_dim) in [
                (1, 8192, 9, 3, 64),
                (1, 32768, 9, 3, 64),
                (8, 2048, 32, 8, 128),
                (32, 1024, 9, 3, 64),
            ] {
                let lens = vec![tokens; sequences];
                let batch = paged_batch(&mut rng, &lens, kv_heads, head_dim, 16, dtype);
                let query = rng.tensor(&[sequences, heads, head_dim], 1.0, dtype);
                let (kc, vc, bt, cl) = decode_args(&batch);
                let iterations = 20;
                paged_decode(&query, kc, vc, bt, cl, 0.1, None).unwrap();
                let start = std::time::Instant::now();
                for _ in 0..iterations {
                    paged_decode(&query, kc, vc, bt, cl, 0.1, None).unwrap();
                }
                let seconds = start.elapsed().as_secs_f64() / iterations as f64;
                let kv_bytes =
                    (sequences * tokens * kv_heads * head_dim * 2 * dtype.size_in_bytes()) as f64;
                println!(
                    "{dtype:?} {sequences}x{tokens} heads {heads}/{kv_heads} d{head_dim}: {:.3} ms, {:.2} GB/s of K/V",
                    seconds * 1e3,
                    kv_bytes / seconds / 1e9
                );
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let mut rng = Rng::new(26);
        let batch = paged_batch(&mut rng, &[20, 9], 2, 64, 8, DType::F32);
        let (kc, vc, bt, _) = decode_args(&batch);
        let query = rng.tensor(&[2, 4, 64], 1.0, DType::F32);
        let lens = |l: &[u32]| Tensor::new(l, &Device::Cpu).unwrap();
        let decode = |q: &Tensor, bt: &Tensor, cl: &Tensor, softcap| {
            paged_decode(q, kc, vc, bt, cl, 0.1, softcap)
        };

        // 20 tokens use 3 of the 4 table columns; the spare column holds an invalid block id.
        assert!(
            decode(&query, bt, &lens(&[25, 9]), None).is_err(),
            "context past the valid blocks"
        );
        assert!(
            decode(&query, bt, &lens(&[40, 9]), None).is_err(),
            "context past the table"
        );
        assert!(
            decode(&query, bt, &lens(&[20]), None).is_err(),
            "batch mismatch"
        );
        assert!(
            decode(
                &rng.tensor(&[3, 4, 64], 1.0, DType::F32),
                bt,
                &lens(&[20, 9]),
                None
            )
            .is_err(),
            "rows"
        );
        assert!(
            decode(
                &rng.tensor(&[2, 3, 64], 1.0, DType::F32),
                bt,
                &lens(&[20, 9]),
                None
            )
            .is_err(),
            "gqa"
        );
        assert!(
            decode(
                &rng.tensor(&[2, 4, 32], 1.0, DType::F32),
                bt,
                &lens(&[20, 9]),
                None
            )
            .is_err(),
            "head_dim"
        );
        assert!(
            decode(
                &query,
                &bt.to_dtype(DType::I64).unwrap(),
                &lens(&[20, 9]),
                None
            )
            .is_err(),
            "table dtype"
        );
        assert!(
            decode(&query, bt, &lens(&[20, 9]), Some(0.0)).is_err(),
            "softcap 0"
        );
        assert!(decode(&query, bt, &lens(&[20, 9]), Some(30.0)).is_ok());
    }
}
