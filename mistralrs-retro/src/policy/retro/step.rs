//! What retro decides once per step (at `begin_step`) and every layer of the step reuses: which
//! rows' K/V writes are kept, the slot mapping that says so, and on CUDA the row tables of the
//! device-side masks and merge.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor};

pub(super) struct RetroStep {
    /// The engine's step number.
    pub step: u64,
    /// Per batch row, whether its K/V write is kept (`None`: every row's): sequences running as
    /// quest keep their older rows' K/V as they are.
    keep: Option<Vec<bool>>,
    /// The step's slot mapping with the dropped rows at -1, made by the first layer's write.
    filtered: Mutex<Option<Tensor>>,
    /// CUDA: the per-sequence row table and the merge entries, uploaded by the first sparse layer.
    #[cfg(feature = "cuda")]
    row_tables: Mutex<Option<(Tensor, Tensor)>>,
}

impl RetroStep {
    pub fn new(step: u64, keep: Option<Vec<bool>>) -> Self {
        Self {
            step,
            keep,
            filtered: Mutex::new(None),
            #[cfg(feature = "cuda")]
            row_tables: Mutex::new(None),
        }
    }

    /// The slot mapping a layer's cache write uses, if rows are dropped this step. Every layer of a
    /// step writes the same slots (on one device; a layer on another device makes its own copy).
    pub fn slot_mapping(&self, slots: &Tensor) -> Result<Option<Tensor>> {
        let Some(keep) = &self.keep else { return Ok(None) };
        let mut filtered = self.filtered.lock().expect("lock poisoned");
        if let Some(t) = &*filtered {
            if t.device().same_device(slots.device()) {
                return Ok(Some(t.clone()));
            }
        }
        let rows = slots.dim(0)?;
        if rows != keep.len() {
            candle_core::bail!("kv-policy=retro: the step's cache write has {rows} rows, its plan {}", keep.len());
        }
        let kept: Vec<i64> = slots
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .zip(keep)
            .map(|(slot, &keep)| if keep { slot } else { -1 })
            .collect();
        let t = Tensor::from_vec(kept, rows, slots.device())?;
        *filtered = Some(t.clone());
        Ok(Some(t))
    }

    /// The row tables, uploaded by `upload` at the step's first call.
    #[cfg(feature = "cuda")]
    pub fn row_tables(&self, upload: impl FnOnce() -> Result<(Tensor, Tensor)>) -> Result<(Tensor, Tensor)> {
        let mut kept = self.row_tables.lock().expect("lock poisoned");
        if let Some(tables) = &*kept {
            return Ok(tables.clone());
        }
        let tables = upload()?;
        *kept = Some(tables.clone());
        Ok(tables)
    }
}
