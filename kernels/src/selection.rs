//! Per-(sequence, kv head) page lists with per-row masks: what the sparse KV policies (Quest,
//! RetroAttention) hand to [`crate::cpu::paged_decode_selected`] (and its CUDA twin).

use candle_core::{bail, Result};

/// One listed page and the query rows that use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageUse {
    /// Logical page index into the sequence's block table row: tokens
    /// `page * block_size .. (page + 1) * block_size`.
    pub page: u32,
    /// Bit `r` set: query row `r` attends to this page (still subject to its causal limit).
    pub rows: u32,
}

/// Which pages each (sequence, kv head) attends to, and for which query rows.
///
/// Entries for (seq, kv_head) are
/// `entries[offsets[seq * kv_heads + kv_head] .. offsets[seq * kv_heads + kv_head + 1]]`, pages
/// strictly ascending within a list; `rows` masks have bit `r` for query row `r < rows <= 32`.
#[derive(Clone, Debug, Default)]
pub struct PageSelection {
    pub kv_heads: usize,
    pub offsets: Vec<usize>,
    pub entries: Vec<PageUse>,
}

/// The mask with one bit per row, for `rows <= 32`.
pub fn all_rows_mask(rows: usize) -> u32 {
    u32::MAX.checked_shr(32 - rows as u32).unwrap_or(0)
}

impl PageSelection {
    /// Every page of every sequence for every row (what `paged_decode` attends to).
    ///
    /// Panics if `rows > 32` (a row mask has 32 bits) or `block_size == 0`.
    pub fn all_pages(
        context_lens: &[usize],
        block_size: usize,
        kv_heads: usize,
        rows: usize,
    ) -> Self {
        assert!(
            rows <= 32,
            "a page selection holds at most 32 rows, got {rows}"
        );
        let mask = all_rows_mask(rows);
        let mut selection = Self::new(kv_heads);
        for &tokens in context_lens {
            let pages = tokens.div_ceil(block_size) as u32;
            for _ in 0..kv_heads {
                selection
                    .entries
                    .extend((0..pages).map(|page| PageUse { page, rows: mask }));
                selection.finish_list();
            }
        }
        selection
    }

    /// No lists yet; fill with [`Self::push`] and [`Self::finish_list`] in (seq, kv head) order.
    pub fn new(kv_heads: usize) -> Self {
        Self {
            kv_heads,
            offsets: vec![0],
            entries: Vec::new(),
        }
    }

    /// Appends a page to the list being built.
    pub fn push(&mut self, page: u32, rows: u32) {
        self.entries.push(PageUse { page, rows });
    }

    /// Closes the list being built; the next push starts the next (seq, kv head).
    pub fn finish_list(&mut self) {
        self.offsets.push(self.entries.len());
    }

    /// The list of (seq, kv_head). Panics if that list does not exist.
    pub fn list(&self, seq: usize, kv_head: usize) -> &[PageUse] {
        let at = seq * self.kv_heads + kv_head;
        &self.entries[self.offsets[at]..self.offsets[at + 1]]
    }

    /// Checks the selection against a decode call's batch, so the kernel may index freely.
    pub(crate) fn validate(
        &self,
        context_lens: &[usize],
        block_size: usize,
        kv_heads: usize,
        rows: usize,
    ) -> Result<()> {
        if self.kv_heads != kv_heads {
            bail!(
                "page selection is for {} kv heads, the caches have {kv_heads}",
                self.kv_heads
            );
        }
        if rows > 32 {
            bail!("page selections support at most 32 query rows per sequence, got {rows}");
        }
        let lists = context_lens.len() * kv_heads;
        if self.offsets.len() != lists + 1 {
            bail!(
                "page selection has {} offsets, expected batch {} * kv_heads {kv_heads} + 1 = {}",
                self.offsets.len(),
                context_lens.len(),
                lists + 1
            );
        }
        if self.offsets[0] != 0 || self.offsets[lists] != self.entries.len() {
            bail!(
                "page selection offsets must run from 0 to the {} entries, got {} .. {}",
                self.entries.len(),
                self.offsets[0],
                self.offsets[lists]
            );
        }
        if let Some(at) = self.offsets.windows(2).position(|w| w[1] < w[0]) {
            bail!("page selection offsets decrease at list {at}");
        }
        let mask = all_rows_mask(rows);
        for (seq, &tokens) in context_lens.iter().enumerate() {
            let pages = tokens.div_ceil(block_size);
            for kv_head in 0..kv_heads {
                let list = self.list(seq, kv_head);
                if let Some(pair) = list.windows(2).find(|w| w[1].page <= w[0].page) {
                    bail!(
                        "page selection for sequence {seq}, kv head {kv_head}: pages must be strictly ascending, got {} then {}",
                        pair[0].page,
                        pair[1].page
                    );
                }
                if let Some(last) = list.last() {
                    if last.page as usize >= pages {
                        bail!(
                            "page selection for sequence {seq}, kv head {kv_head}: page {} is past its {pages} pages ({tokens} tokens)",
                            last.page
                        );
                    }
                }
                if let Some(bad) = list.iter().find(|u| u.rows & !mask != 0) {
                    bail!(
                        "page selection for sequence {seq}, kv head {kv_head}: row mask {:#x} of page {} names rows beyond the {rows} query rows",
                        bad.rows,
                        bad.page
                    );
                }
            }
        }
        Ok(())
    }
}

/// Exact merge of two partial attentions over disjoint token sets (the split-softmax identity),
/// in place into `(o_a, lse_a)`:
/// `o_a <- (e^lse_a o_a + e^lse_b o_b) / (e^lse_a + e^lse_b)`, `lse_a <- logaddexp(lse_a, lse_b)`.
/// A side with `lse = -inf` attended to nothing and leaves the other unchanged.
///
/// Panics if the outputs differ in length.
pub fn merge_partial(o_a: &mut [f32], lse_a: &mut f32, o_b: &[f32], lse_b: f32) {
    assert_eq!(o_a.len(), o_b.len(), "merge_partial: output lengths differ");
    if lse_b == f32::NEG_INFINITY {
        return;
    }
    if *lse_a == f32::NEG_INFINITY {
        o_a.copy_from_slice(o_b);
        *lse_a = lse_b;
        return;
    }
    // Weights relative to the larger side stay in (0, 1], so nothing overflows.
    let max = lse_a.max(lse_b);
    let (w_a, w_b) = ((*lse_a - max).exp(), (lse_b - max).exp());
    let total = w_a + w_b;
    let (w_a, w_b) = (w_a / total, w_b / total);
    for (a, &b) in o_a.iter_mut().zip(o_b) {
        *a = w_a * *a + w_b * b;
    }
    *lse_a = max + total.ln();
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
    fn builder_and_all_pages_agree() {
        let all = PageSelection::all_pages(&[17, 0, 8], 8, 2, 3);
        let mut built = PageSelection::new(2);
        for pages in [3, 3, 0, 0, 1, 1] {
            for page in 0..pages {
                built.push(page, 0b111);
            }
            built.finish_list();
        }
        assert_eq!(all.offsets, built.offsets);
        assert_eq!(all.entries, built.entries);
        assert_eq!(all.list(2, 1), &[PageUse { page: 0, rows: 7 }]);
        assert!(all.list(1, 0).is_empty());
        all.validate(&[17, 0, 8], 8, 2, 3).unwrap();
        assert_eq!(
            PageSelection::all_pages(&[1], 8, 1, 32).entries[0].rows,
            u32::MAX
        );
    }

    #[test]
    fn invalid_selections_are_errors() {
        let lens = [17, 8];
        let valid = || {
            let mut s = PageSelection::new(1);
            s.push(0, 1);
            s.push(2, 3);
            s.finish_list();
            s.push(0, 2);
            s.finish_list();
            s
        };
        valid().validate(&lens, 8, 1, 2).unwrap();
        let check = |s: PageSelection, rows: usize, what: &str| {
            assert!(s.validate(&lens, 8, 1, rows).is_err(), "{what}");
        };
        check(valid(), 33, "rows > 32");
        let mut s = valid();
        s.kv_heads = 2;
        assert!(s.validate(&lens, 8, 2, 2).is_err(), "offsets length");
        let mut s = valid();
        s.offsets.pop();
        check(s, 2, "missing offset");
        let mut s = valid();
        s.offsets = vec![0, 4, 3];
        check(s, 2, "decreasing offsets");
        let mut s = valid();
        s.offsets[2] = 2;
        check(s, 2, "entries past the last list");
        let mut s = valid();
        s.entries[1].page = 0;
        check(s, 2, "repeated page");
        let mut s = valid();
        s.entries[1].page = 3;
        check(s, 2, "page past the sequence");
        let mut s = valid();
        s.entries[2].page = 1;
        check(s, 2, "page past a one-page sequence");
        let mut s = valid();
        s.entries[0].rows = 4;
        check(s, 2, "mask beyond rows");
        assert!(valid().validate(&lens, 8, 2, 2).is_err(), "kv heads");
    }

    #[test]
    fn merge_with_an_empty_side_is_the_identity() {
        let mut o = [1.0, -2.0];
        let mut lse = 0.5;
        merge_partial(&mut o, &mut lse, &[7.0, 7.0], f32::NEG_INFINITY);
        assert_eq!((o, lse), ([1.0, -2.0], 0.5));

        let mut o = [0.0, 0.0];
        let mut lse = f32::NEG_INFINITY;
        merge_partial(&mut o, &mut lse, &[3.0, 4.0], -1.25);
        assert_eq!((o, lse), ([3.0, 4.0], -1.25));

        let mut o = [0.0, 0.0];
        let mut lse = f32::NEG_INFINITY;
        merge_partial(&mut o, &mut lse, &[0.0, 0.0], f32::NEG_INFINITY);
        assert_eq!((o, lse), ([0.0, 0.0], f32::NEG_INFINITY));
    }

    #[test]
    fn merge_weights_by_exp_lse_and_survives_large_magnitudes() {
        let mut o = [1.0];
        let mut lse = 2f32.ln();
        merge_partial(&mut o, &mut lse, &[4.0], 6f32.ln());
        assert!((o[0] - (2.0 + 24.0) / 8.0).abs() < 1e-6);
        assert!((lse - 8f32.ln()).abs() < 1e-6);

        // e^200 overflows f32; the merge must not.
        let mut o = [1.0];
        let mut lse = 200.0;
        merge_partial(&mut o, &mut lse, &[3.0], 200.0);
        assert!((o[0] - 2.0).abs() < 1e-6);
        assert!((lse - (200.0 + 2f32.ln())).abs() < 1e-4);
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
