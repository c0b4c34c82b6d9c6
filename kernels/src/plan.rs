//! Host-side planning of a sparse decode step: everything the kernels need that depends only on
//! the batch's lengths and budgets, computed once per step and reused by every layer.

/// Length of every page list a sequence of `context` tokens gets: all its pages when the budget
/// covers them, else the budget (never below the first + last page). The CPU and GPU selections
/// follow this rule, so the host knows what a step reads without reading it back.
pub fn selected_len(context: usize, budget_pages: usize, block_size: usize) -> usize {
    let pages = context.div_ceil(block_size);
    if budget_pages >= pages { pages } else { budget_pages.max(2).min(pages) }
}

/// Budgets as the device plan takes them: a budget above a sequence's pages means all of them
/// ([`selected_len`]), so it is clamped to the page count, because the select kernel reads budgets as
/// `int` (an unclamped `usize::MAX` became -1 there and selected two pages).
pub fn device_budgets(context_lens: &[usize], budget_pages: &[usize], block_size: usize) -> Vec<u32> {
    budget_pages
        .iter()
        .zip(context_lens)
        .map(|(&b, &c)| b.min(c.div_ceil(block_size)).min(i32::MAX as usize) as u32)
        .collect()
}

/// Shapes and work partition of one decode step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub batch: usize,
    /// Query rows per sequence (the replay window; 1 for quest).
    pub rows: usize,
    pub kv_heads: usize,
    pub block_size: usize,
    /// Tokens in the cache per sequence.
    pub context_lens: Vec<u32>,
    /// Pages each sequence may read.
    pub budget_pages: Vec<u32>,
    /// Most pages any sequence has (the scores' row length).
    pub max_pages: usize,
    /// Most pages any list selects (the padded page lists' row length).
    pub stride: usize,
    /// Splits of each list, each a CUDA block of `pages_per_split` pages.
    pub splits: usize,
    pub pages_per_split: usize,
}

impl DecodePlan {
    /// `target_blocks`: CUDA blocks to aim for so every SM has work (a few per SM); a long list is
    /// split until the batch reaches it, a split never holds fewer than `min_split_pages` pages
    /// (below that the combine costs more than the parallelism gains).
    pub fn new(
        context_lens: &[u32],
        budget_pages: &[u32],
        rows: usize,
        kv_heads: usize,
        block_size: usize,
        target_blocks: usize,
        min_split_pages: usize,
    ) -> Self {
        assert_eq!(context_lens.len(), budget_pages.len(), "one budget per sequence");
        assert!(block_size > 0 && kv_heads > 0 && (1..=32).contains(&rows));
        let pages = |tokens: u32| (tokens as usize).div_ceil(block_size);
        let max_pages = context_lens.iter().map(|&t| pages(t)).max().unwrap_or(0);
        let stride = context_lens
            .iter()
            .zip(budget_pages)
            .map(|(&t, &b)| selected_len(t as usize, b as usize, block_size))
            .max()
            .unwrap_or(0);
        let lists = context_lens.len() * kv_heads;
        let min_split_pages = min_split_pages.max(1);
        let max_splits = stride.div_ceil(min_split_pages).max(1);
        let splits = target_blocks.div_ceil(lists.max(1)).clamp(1, max_splits);
        let pages_per_split = stride.div_ceil(splits).max(1);
        let splits = stride.div_ceil(pages_per_split).max(1);
        Self {
            batch: context_lens.len(),
            rows,
            kv_heads,
            block_size,
            context_lens: context_lens.to_vec(),
            budget_pages: budget_pages.to_vec(),
            max_pages,
            stride,
            splits,
            pages_per_split,
        }
    }

    /// Page lists, one per (sequence, KV head).
    pub fn lists(&self) -> usize {
        self.batch * self.kv_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_is_the_longest_selection_and_splits_cover_it() {
        // 1000 tokens = 63 pages of 16: budget 8 keeps 8; 20 tokens = 2 pages, budget above: all.
        let plan = DecodePlan::new(&[1000, 20], &[8, 64], 2, 4, 16, 64, 2);
        assert_eq!(plan.max_pages, 63);
        assert_eq!(plan.stride, 8);
        assert!(plan.splits * plan.pages_per_split >= plan.stride);
        assert!((plan.splits - 1) * plan.pages_per_split < plan.stride, "no empty split");
        assert!(plan.pages_per_split >= 2);
    }

    #[test]
    fn a_big_batch_is_not_split_and_an_empty_one_is_harmless() {
        let plan = DecodePlan::new(&[4096; 64], &[512; 64], 1, 8, 32, 528, 4);
        assert_eq!((plan.stride, plan.splits, plan.pages_per_split), (128, 2, 64));
        let empty = DecodePlan::new(&[], &[], 1, 8, 32, 528, 4);
        assert_eq!((empty.stride, empty.splits), (0, 1));
    }

    #[test]
    fn a_tiny_budget_still_keeps_first_and_last_page() {
        let plan = DecodePlan::new(&[1000], &[1], 1, 1, 16, 8, 1);
        assert_eq!(plan.stride, 2);
    }

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
}
