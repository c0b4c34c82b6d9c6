//! A policy that forwards to another one, swappable between runs, so the quality harness loads the
//! model and allocates the KV cache once and then runs `full`, `quest` and `retro` one after another.
//!
//! mistral.rs tells the policy about the KV cache once, when it allocates it; a policy installed
//! later would never hear of it. This wrapper keeps the allocation and hands it to every policy it
//! switches to. Switch only while no sequence is running: a policy's page summaries are built from
//! the cache writes it sees, so a sequence must be prefilled under the policy that decodes it (the
//! harness runs with the prefix cache off for the same reason).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, KvPolicy, StepInfo};

use crate::policy::{FullPolicy, Metric, PolicyMetrics, ServedPolicy};

struct SavedAllocation {
    block_size: usize,
    num_blocks: usize,
    dtype: DType,
    caches: Vec<(Tensor, Tensor)>,
}

/// The KV cache's shape, for the bytes a decode step reads.
#[derive(Clone, Copy, Debug)]
pub struct KvGeometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub element_bytes: usize,
}

impl KvGeometry {
    /// K/V bytes one decode step of one sequence reads at `context` tokens: every layer's K and V
    /// for `full`; for a sparse policy the dense layers' K and V, the `sparse_reads` (page, KV head)
    /// pairs its sparse layers load, and the page summaries (f32 min and max) they score.
    pub fn bytes_per_step(&self, context: f64, dense_layers: usize, full: bool, sparse_reads: Option<f64>) -> Option<f64> {
        let token = (self.kv_heads * self.head_dim * 2 * self.element_bytes) as f64;
        if full {
            return Some(context * self.layers as f64 * token);
        }
        let dense = dense_layers.min(self.layers);
        let page = (self.block_size * self.head_dim * 2 * self.element_bytes) as f64;
        let summaries = (self.layers - dense) as f64 * (context / self.block_size as f64).ceil() * (self.kv_heads * 2 * self.head_dim * 4) as f64;
        Some(dense as f64 * context * token + sparse_reads? * page + summaries)
    }
}

pub struct SwitchPolicy {
    inner: RwLock<Arc<dyn ServedPolicy>>,
    allocation: Mutex<Option<SavedAllocation>>,
    /// Sequence ids seen in cache writes since the last switch, in order of arrival.
    seen: Mutex<BTreeSet<usize>>,
    /// Called once per new sequence id (ascending within a batch) at its first cache write, before
    /// its first decode step: the harness gives the sequence its budget there.
    on_new_sequence: Mutex<Option<NewSequenceHook>>,
}

/// `(sequence id, tokens in its first write)`.
pub type NewSequenceHook = Box<dyn FnMut(usize, usize) + Send>;

impl Default for SwitchPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl SwitchPolicy {
    /// Starts as `full`.
    pub fn new() -> Self {
        Self { inner: RwLock::new(Arc::new(FullPolicy::new())), allocation: Mutex::new(None), seen: Mutex::new(BTreeSet::new()), on_new_sequence: Mutex::new(None) }
    }

    fn current(&self) -> Arc<dyn ServedPolicy> {
        self.inner.read().expect("lock poisoned").clone()
    }

    /// Make `policy` the active one, telling it about the KV cache allocated so far; `hook` sees
    /// each new sequence.
    pub fn switch_to(&self, policy: Arc<dyn ServedPolicy>, hook: Option<NewSequenceHook>) -> Result<()> {
        if let Some(saved) = &*self.allocation.lock().expect("lock poisoned") {
            policy.cache_allocated(&CacheAllocation {
                block_size: saved.block_size,
                num_blocks: saved.num_blocks,
                dtype: saved.dtype,
                caches: &saved.caches,
            })?;
        }
        *self.inner.write().expect("lock poisoned") = policy;
        self.seen.lock().expect("lock poisoned").clear();
        *self.on_new_sequence.lock().expect("lock poisoned") = hook;
        Ok(())
    }

    /// The shape of the KV cache allocated so far.
    pub fn kv_geometry(&self) -> Option<KvGeometry> {
        let saved = self.allocation.lock().expect("lock poisoned");
        let saved = saved.as_ref()?;
        // Value cache: `[blocks, kv_heads, head_dim, block_size]`.
        let (_, kv_heads, head_dim, _) = saved.caches.first()?.1.dims4().ok()?;
        Some(KvGeometry { layers: saved.caches.len(), kv_heads, head_dim, block_size: saved.block_size, element_bytes: saved.dtype.size_in_bytes() })
    }

    /// Sequence ids written since the last switch.
    pub fn seen_sequences(&self) -> BTreeSet<usize> {
        self.seen.lock().expect("lock poisoned").clone()
    }
}

impl KvPolicy for SwitchPolicy {
    fn name(&self) -> &str {
        "switch"
    }
    fn provides_cpu_kernels(&self) -> bool {
        true
    }
    fn cache_allocated(&self, alloc: &CacheAllocation<'_>) -> Result<()> {
        *self.allocation.lock().expect("lock poisoned") = Some(SavedAllocation {
            block_size: alloc.block_size,
            num_blocks: alloc.num_blocks,
            dtype: alloc.dtype,
            caches: alloc.caches.to_vec(),
        });
        self.current().cache_allocated(alloc)
    }
    /// New sequences are announced to the hook (which sets their budgets) before the policy
    /// plans the step.
    fn begin_step(&self, step: &StepInfo<'_>) -> Result<()> {
        {
            let mut seen = self.seen.lock().expect("lock poisoned");
            let mut new: Vec<(usize, usize)> = step
                .seq_ids
                .iter()
                .copied()
                .zip(step.seq_context_lens.iter().copied())
                .filter(|(id, _)| !seen.contains(id))
                .collect();
            new.sort_unstable();
            if let Some(hook) = self.on_new_sequence.lock().expect("lock poisoned").as_mut() {
                for &(id, len) in &new {
                    hook(id, len);
                }
            }
            seen.extend(new.into_iter().map(|(id, _)| id));
        }
        self.current().begin_step(step)
    }
    fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<bool> {
        self.current().write_kv(batch, write)
    }
    fn decode_attention(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Option<Tensor>> {
        self.current().decode_attention(batch, attn)
    }
    fn gather_kv(&self, batch: &BatchInfo<'_>, gather: &GatherKv<'_>) -> Result<Option<(Tensor, Tensor)>> {
        self.current().gather_kv(batch, gather)
    }
    fn replay_window(&self) -> usize {
        self.current().replay_window()
    }
    fn dense_kv_len(&self, seq_id: usize) -> usize {
        self.current().dense_kv_len(seq_id)
    }
    fn ragged_decode(&self) -> bool {
        self.current().ragged_decode()
    }
    fn sequence_freed(&self, seq_id: usize) {
        self.current().sequence_freed(seq_id)
    }
    fn sequence_preempted(&self, seq_id: usize) {
        self.current().sequence_preempted(seq_id)
    }
    fn sequence_trimmed(&self, seq_id: usize, num_tokens: usize) {
        self.current().sequence_trimmed(seq_id, num_tokens)
    }
}

impl PolicyMetrics for SwitchPolicy {
    fn metrics(&self) -> Vec<Metric> {
        self.current().metrics()
    }
}
