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
    /// `host_tables`: keep a host copy of the block tables (the CPU plan reads them).
    pub fn new(info: &StepInfo<'_>, budget_pages: Vec<usize>, host_tables: bool) -> Self {
        let block_tables = if host_tables {
            info.block_tables.iter().map(|t| t.iter().map(|&b| b as u32).collect()).collect()
        } else {
            Vec::new()
        };
        Self {
            step: info.step,
            rows: info.rows,
            context_lens: info.seq_context_lens.to_vec(),
            block_tables,
            budget_pages,
            #[cfg(feature = "cuda")]
            plans: Default::default(),
        }
    }

    /// Whether a call's lengths are the step's. On the host the CPU kernels read the call's tensor
    /// while the plan reads the step: they must agree. (They do not in one place: mistral.rs's
    /// start-up dummy run decodes a one-token sequence whose length tensor says 0; the call's own
    /// tables then make the step.) Free on the host; on a device the kernels take the step's.
    pub fn agrees_with(&self, attn: &DecodeAttention<'_>) -> Result<bool> {
        if !attn.context_lens.device().is_cpu() {
            return Ok(true);
        }
        let lens = attn.context_lens.to_vec1::<u32>()?;
        Ok(lens.len() == self.context_lens.len() && lens.iter().zip(&self.context_lens).all(|(&a, &b)| a as usize == b))
    }

    /// A step for a call the engine did not announce, from the call's own tables (the budgets are
    /// the caller's to fill).
    pub fn from_call(batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Self> {
        // The host plan reads the call's tables; on a device the kernels do, and the lengths come
        // with the batch.
        let (context_lens, block_tables) = if attn.block_tables.device().is_cpu() {
            let lens = attn.context_lens.to_vec1::<u32>()?.into_iter().map(|c| c as usize).collect();
            (lens, attn.block_tables.to_vec2::<u32>()?)
        } else {
            (batch.seq_context_lens.to_vec(), Vec::new())
        };
        let rows = attn.query.dim(0)? / context_lens.len().max(1);
        Ok(Self {
            step: batch.step,
            rows,
            context_lens,
            block_tables,
            budget_pages: Vec::new(),
            #[cfg(feature = "cuda")]
            plans: Default::default(),
        })
    }
}
