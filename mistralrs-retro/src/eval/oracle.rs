//! Diagnostic for splitting Quest's error into *selection* and *drift* (issue 5, "beyond the paper").
//!
//! Under teacher forcing every policy decodes the same tokens, so `full`'s K/V of every decoded
//! position is well defined. [`OracleKv`] records them during the `full` run (`Record`) and, wrapped
//! around a sparse policy (`Replace`), overwrites each decode step's freshly computed K/V with
//! `full`'s before they enter the cache. Older decoded tokens then hold exactly the K/V full
//! attention built; what error is left comes from the current step alone: the pages it did not
//! read (its hidden state drifts within the step, through the layers, but never across steps).
//! So KL(full ‖ quest with oracle K/V) is the *selection* error, and the difference to plain
//! quest's KL is the *drift*: K/V of older decoded tokens computed under sparse attention and never
//! corrected (retro corrects them only while they are in its window).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, KvPolicy, StepInfo};

use crate::policy::{Metric, PolicyMetrics, ServedPolicy};

/// `full`'s K/V rows by (layer, position): `[kv_heads * head_dim]` each.
#[derive(Default)]
pub struct KvStore {
    rows: RwLock<HashMap<(usize, usize), (Vec<f32>, Vec<f32>)>>,
}

impl KvStore {
    pub fn len(&self) -> usize {
        self.rows.read().expect("lock poisoned").len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    Record,
    Replace,
}

pub struct OracleKv {
    inner: Arc<dyn ServedPolicy>,
    store: Arc<KvStore>,
    mode: Mode,
}

impl OracleKv {
    pub fn new(inner: Arc<dyn ServedPolicy>, store: Arc<KvStore>, mode: Mode) -> Self {
        Self { inner, store, mode }
    }

    /// Positions of the rows of a decode write: per sequence, its last `rows` tokens.
    fn positions(batch: &BatchInfo<'_>, rows_total: usize) -> Vec<usize> {
        let rows = rows_total / batch.seq_context_lens.len().max(1);
        batch
            .seq_context_lens
            .iter()
            .flat_map(|&len| (len - rows..len).collect::<Vec<_>>())
            .collect()
    }
}

impl KvPolicy for OracleKv {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn provides_cpu_kernels(&self) -> bool {
        true
    }
    fn cache_allocated(&self, alloc: &CacheAllocation<'_>) -> Result<()> {
        self.inner.cache_allocated(alloc)
    }
    fn begin_step(&self, step: &StepInfo<'_>) -> Result<()> {
        self.inner.begin_step(step)
    }
    fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<bool> {
        let (Some(layer), false) = (batch.layer, batch.is_prompt) else {
            return self.inner.write_kv(batch, write);
        };
        let (rows_total, kv_heads, head_dim) = write.key.dims3()?;
        let width = kv_heads * head_dim;
        let positions = Self::positions(batch, rows_total);
        let key: Vec<f32> = write.key.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let value: Vec<f32> = write.value.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        match self.mode {
            Mode::Record => {
                let mut rows = self.store.rows.write().expect("lock poisoned");
                for (i, &pos) in positions.iter().enumerate() {
                    rows.insert((layer, pos), (key[i * width..(i + 1) * width].to_vec(), value[i * width..(i + 1) * width].to_vec()));
                }
                drop(rows);
                self.inner.write_kv(batch, write)
            }
            Mode::Replace => {
                let (mut key, mut value) = (key, value);
                let rows = self.store.rows.read().expect("lock poisoned");
                for (i, &pos) in positions.iter().enumerate() {
                    if let Some((k, v)) = rows.get(&(layer, pos)) {
                        key[i * width..(i + 1) * width].copy_from_slice(k);
                        value[i * width..(i + 1) * width].copy_from_slice(v);
                    }
                }
                drop(rows);
                let device = write.key.device();
                let key = Tensor::from_vec(key, (rows_total, kv_heads, head_dim), device)?.to_dtype(write.key.dtype())?;
                let value = Tensor::from_vec(value, (rows_total, kv_heads, head_dim), device)?.to_dtype(write.value.dtype())?;
                self.inner.write_kv(batch, &CacheWrite { key: &key, value: &value, ..*write })
            }
        }
    }
    fn decode_attention(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Option<Tensor>> {
        self.inner.decode_attention(batch, attn)
    }
    fn gather_kv(&self, batch: &BatchInfo<'_>, gather: &GatherKv<'_>) -> Result<Option<(Tensor, Tensor)>> {
        self.inner.gather_kv(batch, gather)
    }
    fn replay_window(&self) -> usize {
        self.inner.replay_window()
    }
    fn dense_kv_len(&self, seq_id: usize) -> usize {
        self.inner.dense_kv_len(seq_id)
    }
    fn ragged_decode(&self) -> bool {
        self.inner.ragged_decode()
    }
    fn sequence_freed(&self, seq_id: usize) {
        self.inner.sequence_freed(seq_id)
    }
    fn sequence_preempted(&self, seq_id: usize) {
        self.inner.sequence_preempted(seq_id)
    }
    fn sequence_trimmed(&self, seq_id: usize, num_tokens: usize) {
        self.inner.sequence_trimmed(seq_id, num_tokens)
    }
}

impl PolicyMetrics for OracleKv {
    fn metrics(&self) -> Vec<Metric> {
        self.inner.metrics()
    }
}
