//! Preemptions that threw computed work away, for `/metrics`: every policy reports its sequence
//! lifecycle hooks here.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

/// Preemptions that threw computed work away: sequences the scheduler preempted after their
/// prefill. (Upstream's prompt bucketing also "preempts" prompts it defers before computing them;
/// those cost nothing and are not counted.) Every policy reports its lifecycle hooks here.
#[derive(Default)]
struct Preemptions {
    prefilled: Mutex<HashSet<usize>>,
    count: AtomicU64,
}

static PREEMPTIONS: LazyLock<Preemptions> = LazyLock::new(Preemptions::default);

/// From `begin_step`: a prompt step's sequences are about to hold computed K/V.
pub(crate) fn note_prefill(step: &mistralrs_core::kv_policy::StepInfo<'_>) {
    if step.is_prompt {
        PREEMPTIONS.prefilled.lock().expect("lock poisoned").extend(step.seq_ids.iter().copied());
    }
}

pub(crate) fn note_preempted(seq_id: usize) {
    if PREEMPTIONS.prefilled.lock().expect("lock poisoned").remove(&seq_id) {
        PREEMPTIONS.count.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) fn note_freed(seq_id: usize) {
    PREEMPTIONS.prefilled.lock().expect("lock poisoned").remove(&seq_id);
}

/// Preemptions of prefilled sequences since startup.
pub fn preemptions() -> u64 {
    PREEMPTIONS.count.load(Ordering::Relaxed)
}
