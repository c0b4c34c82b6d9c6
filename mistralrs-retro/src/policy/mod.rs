//! The KV policies this build provides.
//!
//! Data flow: a [`PolicyConfig`] (from flags and config files, `crate::config`) → [`build`] makes
//! the policy object → the engine registers it with mistral.rs's `kv_policy` seam
//! (`crate::server::build_engine`) → mistral.rs announces every step (`begin_step`) and paged
//! attention calls the policy for every cache write, decode attention, prompt and prefix gather.
//!
//! - [`full`]: every cached token, upstream's math;
//! - [`sparse`]: the sparse engine (page summaries, budgets, the per-step plan, selection and the
//!   fused decode on a CPU or CUDA backend) that both sparse policies run on;
//! - [`quest`]: the engine as a policy;
//! - [`retro`]: the engine plus RetroAttention's window and output cache;
//! - [`prompt`]: every policy's prompt attention; [`preemptions`]: the lifecycle counter;
//! - [`trace`], [`step_timing`]: diagnostics (`crate::env`).

mod full;
mod preemptions;
mod prompt;
mod quest;
mod retro;
mod sparse;
mod step_timing;
mod trace;

use std::sync::Arc;

pub use full::FullPolicy;
use mistralrs_core::kv_policy::{KvPolicy, StepInfo};
pub use quest::QuestPolicy;
pub use preemptions::preemptions;
pub(crate) use preemptions::{note_freed, note_preempted};
pub use prompt::PromptAttention;
pub use retro::{RetroPolicy, SequenceNumbers};
pub use sparse::SparseEngine;

pub use crate::config::{PolicyConfig, PolicyKind};

/// One number a policy reports on `/metrics` (Prometheus text format, prefixed `mistralrs_kv_`).
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: &'static str,
    pub help: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    pub value: f64,
}

impl Metric {
    pub fn counter(name: &'static str, help: &'static str, value: f64) -> Self {
        Self { name, help, kind: "counter", value }
    }

    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Self {
        Self { name, help, kind: "gauge", value }
    }
}

/// What every policy does when a step begins: note a prompt's sequences for the preemption
/// counter, count a decode step for the trace.
pub(crate) fn step_began(step: &StepInfo<'_>) {
    preemptions::note_prefill(step);
    if step.rows > 0 {
        trace::next_step();
    }
}

/// The numbers a policy exposes while it serves.
pub trait PolicyMetrics {
    fn metrics(&self) -> Vec<Metric>;
}

/// A policy the server can install and report on.
pub trait ServedPolicy: KvPolicy + PolicyMetrics {}
impl<T: KvPolicy + PolicyMetrics> ServedPolicy for T {}

impl PolicyConfig {
    pub fn build(&self) -> Arc<dyn ServedPolicy> {
        let prompt = self.prompt_attention;
        match self.kind {
            PolicyKind::Full => Arc::new(FullPolicy::new().with_prompt_attention(prompt)),
            PolicyKind::Quest => Arc::new(QuestPolicy::new(self.budget, self.dense_layers).with_prompt_attention(prompt)),
            PolicyKind::Retro => Arc::new(
                RetroPolicy::new(self.budget, self.dense_layers, self.window, self.output_cache_blocks)
                    .with_refresh(self.refresh_every)
                    .with_prompt_attention(prompt),
            ),
        }
    }
}

/// The policy `config` selects, with the linear layers' paths set for it. The engine registers it
/// with mistral.rs (`server::build_engine`) before the model and its KV cache load.
pub fn build(config: &PolicyConfig) -> Arc<dyn ServedPolicy> {
    crate::linear::set_row_paths(config.kind, config.linear_rows);
    config.build()
}

