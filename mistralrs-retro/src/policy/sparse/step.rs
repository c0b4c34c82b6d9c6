//! One decode step of the sparse engine, built once (when the engine announces the step) and
//! shared by every layer: the lengths, block tables and budgets the plan reads, and on CUDA the
//! device plans the kernels take, uploaded by the first layer that needs each.

use candle_core::Result;
use mistralrs_core::kv_policy::{BatchInfo, DecodeAttention, StepInfo};

pub(crate) struct SparseStep {
    /// The engine's step number (`BatchInfo::step`).
    pub step: u64,
    /// Query rows per sequence.
    pub rows: usize,
    /// Tokens in the cache per sequence, this step's included.
    pub context_lens: Vec<usize>,
    /// Per sequence, logical page → block (the host plan reads them).
    pub block_tables: Vec<Vec<u32>>,
    /// Pages each sequence may read (`Budget::pages`).
    pub budget_pages: Vec<usize>,
    /// The device plans: with the budgets (selection) and with every page (dense replay rows).
    #[cfg(feature = "cuda")]
    pub(super) plans: [std::sync::Mutex<Option<std::sync::Arc<retro_kernels::cuda::DevicePlan>>>; 2],
}

impl SparseStep {
    pub fn new(info: &StepInfo<'_>, budget_pages: Vec<usize>) -> Self {
        Self {
            step: info.step,
            rows: info.rows,
            context_lens: info.seq_context_lens.to_vec(),
            block_tables: info.block_tables.iter().map(|t| t.iter().map(|&b| b as u32).collect()).collect(),
            budget_pages,
            #[cfg(feature = "cuda")]
            plans: Default::default(),
        }
    }

    /// A step for a call the engine did not announce, from the call's own tables.
    pub fn from_call(batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, budget_pages: Vec<usize>) -> Result<Self> {
        let sequences = batch.seq_context_lens.len();
        let rows = attn.query.dim(0)? / sequences.max(1);
        // The host plan reads the block tables; on a device only the kernels do.
        let block_tables = if attn.block_tables.device().is_cpu() { attn.block_tables.to_vec2::<u32>()? } else { Vec::new() };
        Ok(Self {
            step: batch.step,
            rows,
            context_lens: batch.seq_context_lens.to_vec(),
            block_tables,
            budget_pages,
            #[cfg(feature = "cuda")]
            plans: Default::default(),
        })
    }
}
