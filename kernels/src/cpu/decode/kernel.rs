//! The inner loop of the CPU decode: one split task's online softmax over its pages, for every
//! (query head of the GQA group, row) state, with AVX2 where the CPU has it.

use super::{partial_stride, split_partial, DecodeInputs, PageLists, PageScratch, PartialView, SplitTask};
use crate::selection::PageUse;
use crate::cpu::access::CacheElem;

/// What every split task of one decode call shares.
pub(super) struct SplitKernel<'a, T, L> {
    pub(super) inputs: &'a DecodeInputs,
    pub(super) lists: &'a L,
    pub(super) key_cache: &'a [T],
    pub(super) value_cache: &'a [T],
    pub(super) scaled_queries: &'a [f32],
    pub(super) softcap: Option<f32>,
}

impl<T: CacheElem, L: PageLists> SplitKernel<'_, T, L> {
    /// Online softmax over the task's pages for every (group head, row) state.
    pub(super) fn run(&self, task: &SplitTask, scratch: &mut PageScratch, partial: &mut [f32]) {
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
pub(super) static FORCE_PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2() -> bool {
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
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in acc.iter_mut().zip(x) {
        *y += a * x;
    }
}
