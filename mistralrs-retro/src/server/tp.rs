//! Tensor parallelism over mistral.rs's `ring` backend: ranks are processes that talk TCP.
//!
//! Upstream decides at compile time: a build with the `ring` feature shards every safetensors model
//! over the ranks described by the JSON file that RING_CONFIG names (rank, world size, ports), rank 0
//! takes the requests and hands each one to the other ranks, which run the same schedule and meet it
//! in every all-reduce. So a tensor-parallel server is its own binary (`--features ring`), each rank
//! is one process, and `scripts/serve-tp.sh` starts them all. Attention heads are split across ranks,
//! so each rank's policy sees only its own heads: page summaries, selections and output-cache rows
//! are per rank by construction (they are sized from the tensors the rank's layers hand over).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::model_source::ModelSource;

/// This process's place in the ring.
#[derive(Debug, Clone, PartialEq)]
pub struct RingRank {
    pub rank: usize,
    pub world_size: usize,
    pub config: PathBuf,
}

/// The fields of upstream's `RingConfig` that we check before upstream reads the file (it panics on
/// a bad one, or fails 10 s into the first all-reduce).
#[derive(Debug, Deserialize)]
struct RingFile {
    rank: usize,
    world_size: usize,
    master_port: u16,
    port: u16,
    right_port: u16,
    master_ip: Option<String>,
}

/// `None` in a build without `ring`; in a ring build, RING_CONFIG's rank and world size.
pub fn ring_rank() -> Result<Option<RingRank>> {
    let var = crate::env::ring_config();
    match (cfg!(feature = "ring"), var) {
        (false, None) => Ok(None),
        (false, Some(_)) => bail!(
            "RING_CONFIG is set, but this mistralrs-server has no tensor parallelism: build it with \
             `--features ring` (scripts/serve-tp.sh does) or unset RING_CONFIG"
        ),
        (true, None) => bail!(
            "this mistralrs-server is a tensor-parallel build (feature `ring`): set RING_CONFIG to this \
             rank's ring config file, or start every rank with scripts/serve-tp.sh"
        ),
        (true, Some(path)) => read_ring_file(PathBuf::from(path)).map(Some),
    }
}

fn read_ring_file(path: PathBuf) -> Result<RingRank> {
    let text = std::fs::read_to_string(&path).with_context(|| format!("RING_CONFIG {}: cannot read", path.display()))?;
    let file: RingFile = serde_json::from_str(&text).with_context(|| {
        format!("RING_CONFIG {}: not a ring config (JSON with rank, world_size, master_port, port, right_port)", path.display())
    })?;
    let at = || format!("RING_CONFIG {}", path.display());
    if file.world_size < 2 || !file.world_size.is_power_of_two() {
        bail!("{}: world_size {}: the ring backend needs 2, 4, 8, ... ranks", at(), file.world_size);
    }
    if file.rank >= file.world_size {
        bail!("{}: rank {} is not below world_size {}", at(), file.rank, file.world_size);
    }
    if file.rank != 0 && file.master_ip.is_none() {
        bail!("{}: rank {} needs master_ip (the address of rank 0)", at(), file.rank);
    }
    if file.port == file.right_port || file.port == file.master_port {
        bail!("{}: port {} must differ from right_port and master_port", at(), file.port);
    }
    Ok(RingRank { rank: file.rank, world_size: file.world_size, config: path })
}

/// Refuse what the ring backend cannot shard, before loading anything.
pub fn check_model(ring: &RingRank, source: &ModelSource) -> Result<()> {
    let dir = match source {
        ModelSource::SafetensorsDir(dir) => dir,
        ModelSource::GgufFile(file) => bail!(
            "--model {}: mistral.rs 0.8.1 does not shard GGUF models; tensor parallelism (RING_CONFIG, world_size {}) \
             needs a safetensors model directory",
            file.display(),
            ring.world_size
        ),
    };
    let text = std::fs::read_to_string(dir.join("config.json"))?;
    let config: serde_json::Value = serde_json::from_str(&text).context("config.json")?;
    if let Some(heads) = config["num_attention_heads"].as_u64() {
        if heads as usize % ring.world_size != 0 {
            bail!(
                "--model {}: {heads} attention heads do not split over world_size {} (RING_CONFIG)",
                dir.display(),
                ring.world_size
            );
        }
    }
    Ok(())
}

/// `mistralrs_tp_info` for `/metrics`: which rank this is.
pub fn metrics_text(ring: Option<&RingRank>) -> String {
    let (rank, world) = ring.map_or((0, 1), |r| (r.rank, r.world_size));
    format!(
        "# HELP mistralrs_tp_info Tensor-parallel rank of this process (the policy's numbers above are this rank's heads only)\n\
         # TYPE mistralrs_tp_info gauge\nmistralrs_tp_info{{backend=\"{}\",rank=\"{rank}\",world_size=\"{world}\"}} 1\n",
        if ring.is_some() { "ring" } else { "none" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_file(json: &str) -> Result<RingRank> {
        let dir = std::env::temp_dir().join(format!("retro-ring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:x}.json", json.len() * 31 + json.bytes().map(usize::from).sum::<usize>()));
        std::fs::write(&path, json).unwrap();
        read_ring_file(path)
    }

    #[test]
    fn ring_files_are_checked_with_the_bad_field_named() {
        let ok = ring_file(r#"{"rank":1,"world_size":2,"master_ip":"127.0.0.1","master_port":7000,"port":7001,"right_port":7002}"#).unwrap();
        assert_eq!((ok.rank, ok.world_size), (1, 2));
        for (json, needle) in [
            (r#"{"rank":0,"world_size":3,"master_port":1,"port":2,"right_port":3}"#, "world_size 3"),
            (r#"{"rank":0,"world_size":1,"master_port":1,"port":2,"right_port":3}"#, "world_size 1"),
            (r#"{"rank":2,"world_size":2,"master_ip":"127.0.0.1","master_port":1,"port":2,"right_port":3}"#, "rank 2"),
            (r#"{"rank":1,"world_size":2,"master_port":1,"port":2,"right_port":3}"#, "master_ip"),
            (r#"{"rank":0,"world_size":2,"master_port":1,"port":3,"right_port":3}"#, "port 3"),
            (r#"{"rank":0,"world_size":2}"#, "not a ring config"),
        ] {
            let err = format!("{:#}", ring_file(json).unwrap_err());
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
