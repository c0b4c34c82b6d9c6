//! RetroAttention's output cache: per sequence, the last w−1 rows' attention outputs at every
//! layer, with what each row has seen, in fixed-size blocks from a bounded pool.
//!
//! A row's entry holds its output `O[heads, head_dim]` and log-sum-exp `lse[heads]` (natural log,
//! over exactly the tokens it attended to), and per KV head the set of pages it has attended to
//! (a bitset over logical pages). That set is the union of the selections of the steps the row
//! has been through, which is all the plan needs to find the row's supplement pages: the newest
//! selection minus the set. Rows from a dense prefill have seen everything (`seen_all`).
//!
//! Blocks are created on demand up to the pool's capacity and reused after their sequence ends, so
//! the steady state allocates nothing per step beyond a bitset growing with the context.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One cached row at one layer.
#[derive(Clone, Debug, Default)]
pub struct RowEntry {
    /// Token position of the row; `None` = empty slot.
    pub pos: Option<usize>,
    /// The row came from a dense prefill: it attended to every token before it.
    pub seen_all: bool,
    /// `[heads * head_dim]`.
    pub out: Vec<f32>,
    /// `[heads]`.
    pub lse: Vec<f32>,
    /// `[kv_heads][words]` bitsets of the logical pages the row has attended to.
    seen: Vec<u64>,
    words: usize,
    /// Pages the row selected at its own step, summed over KV heads (the nominal budget it had).
    pub own_pages: u64,
}

impl RowEntry {
    /// Start an entry for `pos` with output and lse, having seen nothing yet.
    pub fn reset(&mut self, pos: usize, kv_heads: usize, pages: usize, out: &[f32], lse: &[f32]) {
        self.pos = Some(pos);
        self.seen_all = false;
        self.out.clear();
        self.out.extend_from_slice(out);
        self.lse.clear();
        self.lse.extend_from_slice(lse);
        self.words = pages.div_ceil(64).max(1);
        self.seen.clear();
        self.seen.resize(kv_heads * self.words, 0);
        self.own_pages = 0;
    }

    pub fn has_seen(&self, kv_head: usize, page: usize) -> bool {
        if self.seen_all {
            return true;
        }
        let word = page / 64;
        word < self.words && self.seen[kv_head * self.words + word] & (1 << (page % 64)) != 0
    }

    pub fn mark_seen(&mut self, kv_head: usize, page: usize) {
        let word = page / 64;
        if word >= self.words {
            // The context grew past the bitset: widen every head's row, keeping the bits.
            let kv_heads = self.seen.len() / self.words;
            let words = word + 1;
            let mut seen = vec![0u64; kv_heads * words];
            for h in 0..kv_heads {
                seen[h * words..h * words + self.words]
                    .copy_from_slice(&self.seen[h * self.words..(h + 1) * self.words]);
            }
            self.seen = seen;
            self.words = words;
        }
        self.seen[kv_head * self.words + word] |= 1 << (page % 64);
    }

    /// Pages seen, summed over KV heads.
    pub fn seen_pages(&self) -> u64 {
        self.seen.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The seen bitsets as `kv_heads × words` 32-bit words (the device layout; `words * 32` must
    /// cover every page marked).
    pub fn seen_words32(&self, kv_heads: usize, words: usize) -> Vec<u32> {
        let mut out = vec![0u32; kv_heads * words];
        for h in 0..kv_heads.min(self.seen.len() / self.words.max(1)) {
            for (w, &bits) in self.seen[h * self.words..(h + 1) * self.words].iter().enumerate() {
                for (half, value) in [(2 * w, bits as u32), (2 * w + 1, (bits >> 32) as u32)] {
                    if half < words {
                        out[h * words + half] = value;
                    } else {
                        debug_assert_eq!(value, 0, "a marked page past the device bitset");
                    }
                }
            }
        }
        out
    }

    /// Replace the seen bitsets with `kv_heads × words` 32-bit words (from the device).
    pub fn set_seen_words32(&mut self, kv_heads: usize, words: usize, bits: &[u32]) {
        self.words = words.div_ceil(2).max(1);
        self.seen.clear();
        self.seen.resize(kv_heads * self.words, 0);
        for h in 0..kv_heads {
            for (w, &value) in bits[h * words..(h + 1) * words].iter().enumerate() {
                self.seen[h * self.words + w / 2] |= u64::from(value) << (32 * (w % 2));
            }
        }
    }
}

/// One sequence's output cache: `layers × (w−1)` row slots; a row at position `p` lives in slot
/// `p % (w−1)`, so the row entering the window replaces the one leaving it.
#[derive(Debug)]
pub struct OutputCacheBlock {
    /// Which of the pool's blocks this is (0..capacity): places its rows in a device-resident cache.
    id: usize,
    slots: usize,
    rows: Vec<RowEntry>,
}

impl OutputCacheBlock {
    fn new(id: usize, layers: usize, slots: usize) -> Self {
        Self { id, slots, rows: vec![RowEntry::default(); layers * slots] }
    }

    /// Which of the pool's blocks this is (0..capacity).
    #[cfg(feature = "cuda")]
    pub fn id(&self) -> usize {
        self.id
    }

    /// Row slots in the block (layers × (w − 1)); slot `i` is pool row `id * row_slots + i`.
    #[cfg(feature = "cuda")]
    pub fn row_slots(&self) -> usize {
        self.rows.len()
    }

    #[cfg(feature = "cuda")]
    pub fn at(&self, slot: usize) -> &RowEntry {
        &self.rows[slot]
    }

    #[cfg(feature = "cuda")]
    pub fn at_mut(&mut self, slot: usize) -> &mut RowEntry {
        &mut self.rows[slot]
    }

    /// Where the row at `pos` in `layer` lives in a cache of `capacity × layers × slots` rows (the
    /// CUDA path keeps outputs and lse there and only the bookkeeping here).
    pub fn device_row(&self, layer: usize, pos: usize) -> usize {
        self.id * self.rows.len() + self.slot_index(layer, pos)
    }

    fn slot_index(&self, layer: usize, pos: usize) -> usize {
        layer * self.slots + pos % self.slots
    }

    /// The entry of the row at `pos` in `layer`, if cached.
    pub fn row(&mut self, layer: usize, pos: usize) -> Option<&mut RowEntry> {
        let at = self.slot_index(layer, pos);
        let entry = &mut self.rows[at];
        (entry.pos == Some(pos)).then_some(entry)
    }

    /// The slot for the row at `pos` in `layer`, whatever it holds now (the caller resets it).
    pub fn slot(&mut self, layer: usize, pos: usize) -> &mut RowEntry {
        let at = self.slot_index(layer, pos);
        &mut self.rows[at]
    }

    /// Every occupied entry (for exposure accounting when rows leave).
    pub fn entries(&self) -> impl Iterator<Item = &RowEntry> {
        self.rows.iter().filter(|r| r.pos.is_some())
    }

    /// Forget rows at `from` and later (the sequence was trimmed).
    pub fn forget_from(&mut self, from: usize) {
        for row in &mut self.rows {
            if row.pos.is_some_and(|p| p >= from) {
                row.pos = None;
            }
        }
    }

    /// Heap bytes the block's rows hold (outputs, lse, seen bitsets), whether occupied or not.
    pub fn bytes(&self) -> usize {
        self.rows.iter().map(|r| 4 * (r.out.capacity() + r.lse.capacity()) + 8 * r.seen.capacity()).sum()
    }

    fn clear(&mut self) {
        for row in &mut self.rows {
            row.pos = None;
        }
    }
}

/// Per-sequence numbers, logged at debug level when the sequence ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct SequenceNumbers {
    /// (page, KV head) pairs the sparse layers read.
    pub pages_loaded: u64,
    /// (row, page, KV head) triples read for past rows (supplements).
    pub supplement_pages: u64,
    /// Pages the closed rows attended to, and the pages they selected at their own step.
    pub exposure_seen: u64,
    pub exposure_own: u64,
    /// (page, KV head) pairs the sparse layers read in refresh steps (`refresh_every`).
    pub refresh_pages: u64,
}

impl SequenceNumbers {
    /// Record a row whose window closed. A slot without a row (never used, or emptied when its
    /// block was returned to the pool or its sequence trimmed) holds nothing to count.
    pub fn close_row(&mut self, row: &RowEntry) {
        if self.close_row_own(row) {
            self.exposure_seen += row.seen_pages();
        }
    }

    /// [`Self::close_row`] for the pages the row selected itself only, when the pages it has seen
    /// are counted elsewhere (on the device); returns whether the row counts.
    pub fn close_row_own(&mut self, row: &RowEntry) -> bool {
        let counts = row.pos.is_some() && !row.seen_all && row.own_pages > 0;
        if counts {
            self.exposure_own += row.own_pages;
        }
        counts
    }

    pub fn exposure(&self) -> Option<f64> {
        (self.exposure_own > 0).then(|| self.exposure_seen as f64 / self.exposure_own as f64)
    }
}

/// What the policy keeps per sequence.
#[derive(Debug)]
pub struct SequenceState {
    /// Leading tokens whose K/V came from a dense prefill (never rewritten).
    pub dense_kv_len: usize,
    /// Whether the sequence has had its first decode step (and so asked for a block).
    pub decoding: bool,
    /// `None` while decoding: the pool was dry and the sequence runs as `quest`.
    pub block: Option<OutputCacheBlock>,
    pub numbers: SequenceNumbers,
}

/// Totals since startup, for `/metrics`.
#[derive(Debug, Default)]
pub struct PoolTotals {
    pub supplement_pages: AtomicU64,
    pub exposure_seen: AtomicU64,
    pub exposure_own: AtomicU64,
    /// Sequences that found the pool dry and ran as `quest`.
    pub degraded_sequences: AtomicU64,
    pub blocks_in_use: AtomicUsize,
}

/// The bounded pool of output-cache blocks and the per-sequence states.
#[derive(Debug)]
pub struct OutputCachePool {
    capacity: usize,
    /// Row slots per layer (w − 1).
    slots: usize,
    inner: Mutex<PoolInner>,
    pub totals: PoolTotals,
}

#[derive(Debug, Default)]
pub struct PoolInner {
    free: Vec<OutputCacheBlock>,
    created: usize,
    pub sequences: HashMap<usize, SequenceState>,
}

impl OutputCachePool {
    /// A pool of `capacity` blocks of `window − 1` row slots per layer.
    pub fn new(capacity: usize, window: usize) -> Self {
        Self {
            capacity,
            slots: window.saturating_sub(1).max(1),
            inner: Mutex::new(PoolInner::default()),
            totals: PoolTotals::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Row slots per layer and block (w − 1).
    #[cfg(feature = "cuda")]
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Heap bytes of every block created so far (in use or free). Rows hold this process's query
    /// heads only, so under tensor parallelism it is the rank's share.
    pub fn bytes(&self) -> usize {
        let inner = self.lock();
        let held = inner.sequences.values().filter_map(|s| s.block.as_ref());
        inner.free.iter().chain(held).map(OutputCacheBlock::bytes).sum()
    }

    pub fn lock(&self) -> MutexGuard<'_, PoolInner> {
        self.inner.lock().expect("output-cache pool lock poisoned")
    }

    /// A block for a sequence's first decode step, or `None` when every block is in use.
    pub fn take(&self, inner: &mut PoolInner, layers: usize) -> Option<OutputCacheBlock> {
        let block = match inner.free.pop() {
            Some(block) => block,
            None if inner.created < self.capacity => {
                inner.created += 1;
                OutputCacheBlock::new(inner.created - 1, layers, self.slots)
            }
            None => return None,
        };
        self.totals.blocks_in_use.fetch_add(1, Ordering::Relaxed);
        Some(block)
    }

    /// Drop a sequence's state, closing its open rows and returning its block.
    pub fn release(&self, inner: &mut PoolInner, seq_id: usize) -> Option<SequenceState> {
        let mut state = inner.sequences.remove(&seq_id)?;
        let block = state.block.take();
        // Rows still in the window have seen all they will: count them.
        for row in block.iter().flat_map(|b| b.entries()) {
            state.numbers.close_row(row);
        }
        // The finished-sequence totals go out before the block count drops, so whoever sees the
        // block returned (a TP worker's metrics, a test) also sees this sequence's numbers.
        let n = &state.numbers;
        self.totals.supplement_pages.fetch_add(n.supplement_pages, Ordering::Release);
        self.totals.exposure_seen.fetch_add(n.exposure_seen, Ordering::Release);
        self.totals.exposure_own.fetch_add(n.exposure_own, Ordering::Release);
        if let Some(mut block) = block {
            block.clear();
            inner.free.push(block);
            self.totals.blocks_in_use.fetch_sub(1, Ordering::Release);
        }
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_at_most_capacity_and_reuses_returned_blocks() {
        let pool = OutputCachePool::new(2, 3);
        let mut inner = pool.lock();
        let a = pool.take(&mut inner, 4).expect("first block");
        let b = pool.take(&mut inner, 4).expect("second block");
        assert!(pool.take(&mut inner, 4).is_none(), "a dry pool must say so");
        assert_eq!(pool.totals.blocks_in_use.load(Ordering::Relaxed), 2);
        inner.sequences.insert(7, SequenceState { dense_kv_len: 5, decoding: true, block: Some(a), numbers: Default::default() });
        pool.release(&mut inner, 7).expect("state");
        assert_eq!(pool.totals.blocks_in_use.load(Ordering::Relaxed), 1);
        assert!(pool.take(&mut inner, 4).is_some(), "a returned block is reused");
        drop(b);
        drop(inner);
        assert_eq!(pool.bytes(), 0, "no row written yet");
        let mut block = OutputCacheBlock::new(0, 1, 1);
        block.slot(0, 0).reset(0, 2, 100, &[0.0; 6], &[0.0; 3]);
        assert!(block.bytes() >= 4 * 9 + 8 * 2, "{}", block.bytes());
        pool.lock().free.push(block);
        assert!(pool.bytes() >= 4 * 9 + 8 * 2);
    }

    #[test]
    fn slots_follow_positions_and_seen_sets_grow() {
        let mut block = OutputCacheBlock::new(1, 2, 3);
        assert_eq!(block.device_row(1, 10), 6 + 3 + 10 % 3, "block 1 starts after block 0's 2 x 3 rows");
        block.slot(1, 10).reset(10, 2, 3, &[1.0; 4], &[0.5; 2]);
        assert!(block.row(1, 10).is_some());
        assert!(block.row(0, 10).is_none(), "layers are separate");
        assert!(block.row(1, 13).is_none(), "same slot, other position");
        let row = block.row(1, 10).unwrap();
        row.mark_seen(1, 2);
        row.mark_seen(1, 200); // past the initial bitset
        assert!(row.has_seen(1, 2) && row.has_seen(1, 200));
        assert!(!row.has_seen(0, 2) && !row.has_seen(1, 3));
        assert_eq!(row.seen_pages(), 2);
        block.forget_from(10);
        assert!(block.row(1, 10).is_none());
    }

    #[test]
    fn seen_bitsets_round_trip_through_the_device_layout() {
        let mut row = RowEntry::default();
        row.reset(5, 2, 70, &[], &[]);
        for (h, page) in [(0, 0), (0, 31), (0, 32), (0, 63), (0, 64), (1, 69), (1, 33)] {
            row.mark_seen(h, page);
        }
        let words = 70usize.div_ceil(32);
        let bits = row.seen_words32(2, words);
        assert_eq!(bits[0], 1 | 1 << 31);
        assert_eq!(bits[1], 1 | 1 << 31, "pages 32 and 63");
        assert_eq!(bits[2], 1, "page 64");
        assert_eq!(bits[words + 1], 1 << 1, "head 1, page 33");
        assert_eq!(bits[words + 2], 1 << 5, "head 1, page 69");
        let mut back = RowEntry::default();
        back.reset(5, 2, 1, &[], &[]);
        back.set_seen_words32(2, words, &bits);
        for h in 0..2 {
            for page in 0..96 {
                assert_eq!(back.has_seen(h, page), row.has_seen(h, page), "head {h} page {page}");
            }
        }
        assert_eq!(back.seen_pages(), 7);
    }

    #[test]
    fn an_emptied_slot_is_not_counted_when_its_block_is_reused() {
        let mut numbers = SequenceNumbers::default();
        let mut row = RowEntry::default();
        row.reset(9, 1, 4, &[], &[]);
        row.mark_seen(0, 1);
        row.own_pages = 1;
        numbers.close_row(&row);
        assert_eq!((numbers.exposure_seen, numbers.exposure_own), (1, 1));
        row.pos = None; // what `OutputCacheBlock::clear` leaves behind
        numbers.close_row(&row);
        assert_eq!((numbers.exposure_seen, numbers.exposure_own), (1, 1), "counted twice");
    }
}
