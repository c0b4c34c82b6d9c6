//! The mistral.rs engine, built from a typed value ([`EngineSettings`]) with a KV policy
//! registered. The server fills the settings from its flags; the quality harness fills them itself.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use mistralrs_core::{
    get_auto_device_map_params, get_model_dtype, DefaultSchedulerMethod, DeviceMapSetting, LoaderBuilder,
    MemoryGpuConfig, MistralRsBuilder, ModelDType, PagedAttentionConfig, PagedCacheType, SchedulerConfig, TokenSource,
};
use tracing::info;

use super::model_source::ModelSource;
use crate::linear::CpuLinear;
use crate::policy::ServedPolicy;

/// What the engine is built from.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub source: ModelSource,
    /// Run on the CPU even when a GPU is available.
    pub cpu: bool,
    pub dtype: ModelDType,
    /// The paged KV cache; `None` for upstream's eager cache and attention (no policy runs).
    pub paged: Option<PagedCache>,
    /// Sequences running at once.
    pub max_seqs: usize,
    pub prefix_cache: bool,
    /// Seed for sampling.
    pub seed: Option<u64>,
    /// Longest sequence automatic device mapping plans for.
    pub max_seq_len: usize,
    pub cpu_linear: CpuLinear,
}

/// The paged KV cache: page size and how much of it to allocate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PagedCache {
    pub block_size: usize,
    pub size: CacheSize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheSize {
    /// Tokens of context across all sequences.
    Tokens(usize),
    Megabytes(usize),
}

impl PagedCache {
    fn config(&self) -> Result<PagedAttentionConfig> {
        let mem = match self.size {
            CacheSize::Tokens(tokens) => MemoryGpuConfig::ContextSize(tokens),
            CacheSize::Megabytes(mb) => MemoryGpuConfig::MbAmount(mb),
        };
        Ok(PagedAttentionConfig::new(Some(self.block_size), mem, PagedCacheType::Auto)?)
    }
}

fn device(force_cpu: bool) -> Result<Device> {
    if force_cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        return Ok(Device::cuda_if_available(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

/// Load the model with `policy` registered (the only place a policy is registered) and build the
/// engine; also returns the policy, for `/metrics`. The server passes the one its flags select, the
/// quality harness one that it can swap between runs; `None`, or no paged cache: upstream's eager
/// attention.
pub async fn build_engine(
    settings: &EngineSettings,
    policy: Option<Arc<dyn ServedPolicy>>,
) -> Result<(mistralrs_server_core::types::SharedMistralRsState, Option<Arc<dyn ServedPolicy>>)> {
    // Never reach for the hub: models are local paths.
    crate::env::set_hub_offline();
    crate::env::log_diagnostics();
    crate::linear::install(settings.cpu_linear);

    let paged = settings.paged.as_ref().map(PagedCache::config).transpose()?;
    let installed = match (&paged, policy) {
        (Some(_), Some(policy)) => {
            mistralrs_core::kv_policy::register_kv_policy(policy.clone());
            Some(policy)
        }
        _ => {
            info!("paged attention disabled (--no-paged-attn): upstream eager attention, kv-policy unused");
            None
        }
    };

    let source = &settings.source;
    let selected = source.selected(settings.dtype, settings.max_seq_len)?;
    let model_dtype = get_model_dtype(&selected)?;
    let mapper = DeviceMapSetting::Auto(get_auto_device_map_params(&selected)?);
    let device = device(settings.cpu)?;
    if let Some(seed) = settings.seed {
        device.set_seed(seed)?;
    }

    let loader = LoaderBuilder::new(selected).build()?;
    info!("loading {:?} on {:?}", source, device.location());
    let pipeline = loader.load_model_from_hf(
        None,
        TokenSource::None,
        &model_dtype,
        &device,
        false,
        mapper,
        None,
        paged,
    )?;

    let cache_config = pipeline.lock().await.get_metadata().cache_config.clone();
    let scheduler = match cache_config {
        Some(config) => SchedulerConfig::PagedAttentionMeta { max_num_seqs: settings.max_seqs, config },
        None => SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(
                settings.max_seqs.try_into().context("max_seqs must be at least 1")?,
            ),
        },
    };
    let engine = MistralRsBuilder::new(pipeline, scheduler, true, None)
        .with_no_prefix_cache(!settings.prefix_cache)
        .build()
        .await;
    Ok((engine, installed))
}
