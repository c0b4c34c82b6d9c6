//! The plan step of a sparse decode: which pages each (sequence, KV head) reads.
//!
//! Quest's rule: per KV head, [`selected_len`] pages: always the first page (attention sink) and
//! the last (partial, newest) page, plus the top pages by the upper bound `Σ_d max(q_d·kmin_d, q_d·kmax_d)` of q·k over the
//! page. The query heads of a GQA group share their KV head's pages; their bounds are summed.

use rayon::prelude::*;

use super::summaries::PageSummaries;
use crate::plan::selected_len;
use crate::selection::PageSelection;

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
            let keep = selected_len(inputs.context_lens[seq], inputs.budget_pages[seq], summaries.block_size);
            if keep == pages {
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
            let take = keep - 2;
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
