//! The plan step of a sparse decode: which pages each (sequence, KV head) reads.
//!
//! Quest's rule: per KV head, always the first page (attention sink) and the last (partial, newest)
//! page, plus the top pages by the upper bound `Σ_d max(q_d·kmin_d, q_d·kmax_d)` of q·k over the
//! page. The query heads of a GQA group share their KV head's pages; their bounds are summed.

use rayon::prelude::*;

use super::summaries::PageSummaries;
use crate::cpu::PageSelection;

/// One decode step's view for planning.
pub struct PlanInputs<'a> {
    /// `[batch * rows, heads, head_dim]` f32, token-major; the newest row of each sequence selects.
    pub queries: &'a [f32],
    pub rows: usize,
    pub heads: usize,
    /// Tokens in the cache per sequence.
    pub context_lens: &'a [usize],
    /// Block table per sequence (logical page → block).
    pub block_tables: &'a [Vec<u32>],
    /// Pages each sequence may read (`Budget::pages`).
    pub budget_pages: &'a [usize],
}

/// Upper bound of q·k over a page: `Σ_d max(q_d·kmin_d, q_d·kmax_d)`.
#[inline]
pub fn page_bound(query: &[f32], bounds: &[f32]) -> f32 {
    let (mins, maxs) = bounds.split_at(query.len());
    query.iter().zip(mins).zip(maxs).map(|((q, lo), hi)| (q * lo).max(q * hi)).sum()
}

/// Select pages for every (sequence, KV head). Each chosen page is used by every row (`rows` mask
/// all ones). Returns the selection, lists in ascending page order.
pub fn select_pages(inputs: &PlanInputs<'_>, summaries: &PageSummaries, layer_bounds: &[f32]) -> PageSelection {
    let kv_heads = summaries.kv_heads;
    let group = inputs.heads / kv_heads;
    let head_dim = summaries.head_dim;
    let all_rows = if inputs.rows >= 32 { u32::MAX } else { (1u32 << inputs.rows) - 1 };
    let batch = inputs.context_lens.len();

    let lists: Vec<Vec<u32>> = (0..batch * kv_heads)
        .into_par_iter()
        .map(|task| {
            let (seq, kv_head) = (task / kv_heads, task % kv_heads);
            let pages = inputs.context_lens[seq].div_ceil(summaries.block_size);
            let keep = inputs.budget_pages[seq];
            if keep >= pages {
                return (0..pages as u32).collect();
            }
            let newest = (seq * inputs.rows + inputs.rows - 1) * inputs.heads;
            let table = &inputs.block_tables[seq];
            // Middle pages only: the first and last are always in.
            let mut scored: Vec<(f32, u32)> = (1..pages - 1)
                .map(|page| {
                    let at = summaries.offset(table[page] as usize, kv_head);
                    let bounds = &layer_bounds[at..at + 2 * head_dim];
                    let score = (0..group)
                        .map(|g| {
                            let q = (newest + kv_head * group + g) * head_dim;
                            page_bound(&inputs.queries[q..q + head_dim], bounds)
                        })
                        .sum::<f32>();
                    (score, page as u32)
                })
                .collect();
            let take = keep.saturating_sub(2).min(scored.len());
            if take < scored.len() {
                scored.select_nth_unstable_by(take, |a, b| b.0.total_cmp(&a.0));
            }
            let mut chosen: Vec<u32> = scored[..take].iter().map(|&(_, p)| p).collect();
            chosen.push(0);
            chosen.push(pages as u32 - 1);
            chosen.sort_unstable();
            chosen
        })
        .collect();

    let mut selection = PageSelection::new(kv_heads);
    for list in lists {
        for page in list {
            selection.push(page, all_rows);
        }
        selection.finish_list();
    }
    selection
}

/// Pages a selection reads, summed over all lists (for stats).
pub fn pages_read(selection: &PageSelection) -> usize {
    selection.entries.len()
}

/// The list-length rule [`select_pages`] follows, shared with the device plan.
pub use retro_kernels::selected_len;

/// Budgets as the device plan takes them: a budget above a sequence's pages means all of them
/// (`selected_len`), so it is clamped to the page count, because the select kernel reads budgets as
/// `int` (an unclamped `usize::MAX` became -1 there and selected two pages).
pub fn device_budgets(context_lens: &[usize], budget_pages: &[usize], block_size: usize) -> Vec<u32> {
    budget_pages
        .iter()
        .zip(context_lens)
        .map(|(&b, &c)| b.min(c.div_ceil(block_size)).min(i32::MAX as usize) as u32)
        .collect()
}

/// A selection in the device kernels' layout: lists padded to `stride` pages (`pages` and `masks`
/// `[lists * stride]`, `counts [lists]`).
#[derive(Debug, PartialEq)]
pub struct PaddedLists {
    pub stride: usize,
    pub pages: Vec<u32>,
    pub counts: Vec<u32>,
    pub masks: Vec<u32>,
}

/// Per sequence, the longest of its KV heads' lists (what a device plan's stride must hold).
pub fn longest_lists(selection: &PageSelection, batch: usize) -> Vec<usize> {
    let kv_heads = selection.kv_heads;
    (0..batch)
        .map(|seq| (0..kv_heads).map(|h| selection.list(seq, h).len()).max().unwrap_or(0))
        .collect()
}

impl PaddedLists {
    /// Padded to `stride`, or to the longest list where that is longer, so one copy fits the plan.
    pub fn from_selection(selection: &PageSelection, batch: usize, stride: usize) -> Self {
        let lists = batch * selection.kv_heads;
        let stride = (0..lists).map(|l| selection.offsets[l + 1] - selection.offsets[l]).max().unwrap_or(0).max(stride).max(1);
        let mut out = Self { stride, pages: vec![0; lists * stride], counts: vec![0; lists], masks: vec![0; lists * stride] };
        for l in 0..lists {
            let entries = &selection.entries[selection.offsets[l]..selection.offsets[l + 1]];
            for (i, e) in entries.iter().enumerate() {
                out.pages[l * stride + i] = e.page;
                out.masks[l * stride + i] = e.rows;
            }
            out.counts[l] = entries.len() as u32;
        }
        out
    }

    /// Back to a host selection (the masks say which rows use each page).
    pub fn to_selection(&self, kv_heads: usize) -> PageSelection {
        let mut selection = PageSelection::new(kv_heads);
        for (l, &count) in self.counts.iter().enumerate() {
            for i in 0..count as usize {
                selection.push(self.pages[l * self.stride + i], self.masks[l * self.stride + i]);
            }
            selection.finish_list();
        }
        selection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_len_matches_the_budget_rule() {
        // 100 tokens = 7 pages of 16.
        assert_eq!(selected_len(100, 7, 16), 7);
        assert_eq!(selected_len(100, 64, 16), 7);
        assert_eq!(selected_len(100, 3, 16), 3);
        assert_eq!(selected_len(100, 1, 16), 2, "first and last page always");
        assert_eq!(selected_len(10, 1, 16), 1, "a one-page sequence reads its page");
        assert_eq!(selected_len(0, 4, 16), 0);
    }

    #[test]
    fn device_budgets_keep_the_rule_and_fit_an_int() {
        let ctx = [100, 10, 0, 1 << 40];
        let budgets = device_budgets(&ctx, &[usize::MAX, 3, 5, usize::MAX], 16);
        assert_eq!(budgets, vec![7, 1, 0, i32::MAX as u32]);
        for ((&c, &b), &d) in ctx.iter().zip(&[usize::MAX, 3, 5, usize::MAX]).zip(&budgets) {
            if c < 1 << 30 {
                assert_eq!(selected_len(c, d as usize, 16), selected_len(c, b, 16), "context {c} budget {b}");
            }
        }
    }

    #[test]
    fn padded_lists_round_trip_ragged_lists() {
        let mut sel = PageSelection::new(2);
        for (pages, mask) in [(vec![0u32, 3, 9], 3u32), (vec![0, 9], 2), (vec![0], 1), (vec![], 0)] {
            for p in pages {
                sel.push(p, mask);
            }
            sel.finish_list();
        }
        assert_eq!(longest_lists(&sel, 2), vec![3, 1]);
        let padded = PaddedLists::from_selection(&sel, 2, 0);
        assert_eq!(padded.stride, 3);
        assert_eq!(padded.counts, vec![3, 2, 1, 0]);
        assert_eq!(&padded.pages[3..6], &[0, 9, 0]);
        let wider = PaddedLists::from_selection(&sel, 2, 5);
        assert_eq!(wider.stride, 5);
        assert_eq!(&wider.pages[5..10], &[0, 9, 0, 0, 0]);
        assert_eq!(wider.to_selection(2).entries, sel.entries);
        assert_eq!(&padded.masks[0..3], &[3, 3, 3]);
        let back = padded.to_selection(2);
        assert_eq!(back.offsets, sel.offsets);
        assert_eq!(back.entries, sel.entries);
    }
}

