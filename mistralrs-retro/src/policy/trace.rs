//! `RETRO_TRACE_DECODE=N` (read in `crate::env`): for the first N decode steps, print per layer and per query row the sum and
//! norm of the keys written, the query and the attention output (stderr, one line per tensor). Two runs
//! of the same request (e.g. CUDA and `--cpu`) diffed line by line show the first layer and row where
//! they part: before attention (query or keys differ: upstream's layers) or in it (only the output does).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Result, Tensor};

fn steps_traced() -> usize {
    crate::env::diagnostics().trace_decode_steps
}

/// Decode steps seen so far (counted at layer 0's cache write).
static STEP: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn enabled() -> bool {
    steps_traced() > 0 && STEP.load(Ordering::Relaxed) <= steps_traced()
}

/// Count a decode step (call at layer 0's write).
pub(crate) fn next_step() {
    if steps_traced() > 0 {
        STEP.fetch_add(1, Ordering::Relaxed);
    }
}

/// One line per row of `t` (`[rows, ...]`): sum and L2 norm, 6 significant digits.
pub(crate) fn rows(what: &str, layer: usize, t: &Tensor) -> Result<()> {
    let rows = t.dim(0)?;
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let per = data.len() / rows.max(1);
    for (r, row) in data.chunks(per.max(1)).enumerate() {
        let sum: f64 = row.iter().map(|&x| x as f64).sum();
        let norm: f64 = row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
        eprintln!("trace step {} layer {layer} {what} row {r}: sum {sum:.6e} norm {norm:.6e}", STEP.load(Ordering::Relaxed));
    }
    Ok(())
}

/// On a device: the same attention by the CPU kernel over host copies of the inputs (every page,
/// each row limited to its causal prefix), with the lengths and tables it was given.
pub(crate) fn reference(layer: usize, attn: &mistralrs_core::kv_policy::DecodeAttention<'_>, seq_context_lens: &[usize]) -> Result<()> {
    if attn.query.device().is_cpu() {
        return Ok(());
    }
    let host = candle_core::Device::Cpu;
    let (q, k, v) = (attn.query.to_device(&host)?, attn.key_cache.to_device(&host)?, attn.value_cache.to_device(&host)?);
    let (tables, lens) = (attn.block_tables.to_device(&host)?, attn.context_lens.to_device(&host)?);
    eprintln!(
        "trace step {} layer {layer} lens {:?} host lens {seq_context_lens:?} tables {:?} query contiguous {} offset {}",
        STEP.load(Ordering::Relaxed),
        lens.to_vec1::<u32>()?,
        tables.to_vec2::<u32>()?.iter().map(|t| t.iter().take(4).copied().collect::<Vec<_>>()).collect::<Vec<_>>(),
        attn.query.is_contiguous(),
        attn.query.layout().start_offset(),
    );
    let out = super::full::decode_every_page(&mistralrs_core::kv_policy::DecodeAttention {
        query: &q,
        key_cache: &k,
        value_cache: &v,
        block_tables: &tables,
        context_lens: &lens,
        ..*attn
    })?;
    rows("reference", layer, &out)
}
