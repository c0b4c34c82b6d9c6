//! RETRO_STEP_TIMING=1 (read in `crate::env`): where a decode step's time goes, for any policy, from the host's clock.
//!
//! Every policy sees each layer's cache write (`write_kv`), so the writes of the first and the last
//! layer split a step into "the layers" (first write to last write) and "the rest" (the last layer's
//! attention and MLP, the LM head, sampling, the scheduler, building the next step's inputs). The
//! device is synchronized at those two writes only, so the host's clock measures GPU progress; that
//! costs the overlap of host and GPU work across the two points, a few percent of a step. Averages go
//! to the log every 64 decode steps of one batch size. There is no Nsight Systems on the GPU machine;
//! this says without one where a batch-8 step's extra time goes (docs/gpu.md, "The step around
//! attention").

use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use candle_core::{Device, Result};
use mistralrs_core::kv_policy::BatchInfo;

const REPORT_EVERY: u32 = 64;

#[derive(Default)]
struct StepClock {
    /// Highest layer index seen: the last layer of a step.
    last_layer: usize,
    batch: usize,
    first_write: Option<Instant>,
    last_write: Option<Instant>,
    steps: u32,
    step_s: f64,
    layers_s: f64,
}

impl StepClock {
    fn restart(&mut self, batch: usize) {
        *self = StepClock { last_layer: self.last_layer, batch, ..Default::default() };
    }
}

static CLOCK: LazyLock<Option<Mutex<StepClock>>> = LazyLock::new(|| {
    crate::env::diagnostics().step_timing.then(|| Mutex::new(StepClock::default()))
});

/// From every policy's `write_kv`.
pub(crate) fn cache_written(batch: &BatchInfo<'_>, device: &Device) -> Result<()> {
    let (Some(clock), Some(layer)) = (CLOCK.as_ref(), batch.layer) else {
        return Ok(());
    };
    let mut c = clock.lock().expect("step clock lock poisoned");
    if batch.is_prompt {
        // A prefill between decode steps is not part of any step.
        let b = c.batch;
        c.restart(b);
        return Ok(());
    }
    c.last_layer = c.last_layer.max(layer);
    if layer != 0 && layer != c.last_layer {
        return Ok(());
    }
    device.synchronize()?;
    let now = Instant::now();
    if layer != 0 {
        c.last_write = Some(now);
        return Ok(());
    }
    let batch_size = batch.seq_ids.len();
    if batch_size != c.batch {
        c.restart(batch_size);
    }
    if let (Some(first), Some(last)) = (c.first_write, c.last_write) {
        c.step_s += (now - first).as_secs_f64();
        c.layers_s += (last - first).as_secs_f64();
        c.steps += 1;
    }
    if c.steps == REPORT_EVERY {
        let n = f64::from(c.steps);
        let (step, layers) = (1e3 * c.step_s / n, 1e3 * c.layers_s / n);
        tracing::info!(
            "step timing: batch {}, {} decode steps: {step:.2} ms per step = layers 0..{} {layers:.2} ms + the rest {:.2} ms (layer {}'s attention and MLP, LM head, sampling, scheduling, next inputs)",
            c.batch,
            c.steps,
            c.last_layer,
            step - layers,
            c.last_layer
        );
        c.restart(batch_size);
    }
    c.first_write = Some(now);
    c.last_write = None;
    Ok(())
}
