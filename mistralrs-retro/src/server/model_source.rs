//! What `--model` names: a Hugging Face-style model directory or a GGUF file, and what the server
//! reads from it before loading (architecture, sliding window).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mistralrs_core::{AutoDeviceMapParams, ModelDType, ModelSelected};

/// The model a path names.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    SafetensorsDir(PathBuf),
    GgufFile(PathBuf),
}

impl ModelSource {
    pub fn from_path(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "--model {}: no such file or directory (run scripts/fetch-smollm2.sh for the embedded model)",
                path.display()
            );
        }
        if path.is_dir() {
            for needed in ["config.json", "tokenizer.json"] {
                if !path.join(needed).is_file() {
                    bail!("--model {}: directory has no {needed}", path.display());
                }
            }
            return Ok(Self::SafetensorsDir(path.to_path_buf()));
        }
        let mut magic = [0u8; 4];
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .with_context(|| format!("--model {}: cannot read", path.display()))?;
        if &magic != b"GGUF" {
            bail!("--model {}: not a GGUF file and not a model directory", path.display());
        }
        Ok(Self::GgufFile(path.to_path_buf()))
    }

    /// The architecture (`model_type` of config.json, `general.architecture` of a GGUF), for
    /// matching `[[models]]` entries; `None` when it cannot be read.
    pub fn architecture(&self) -> Option<String> {
        match self {
            ModelSource::SafetensorsDir(dir) => {
                let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
                let config: serde_json::Value = serde_json::from_str(&text).ok()?;
                config["model_type"].as_str().map(str::to_owned)
            }
            ModelSource::GgufFile(file) => {
                let mut reader = std::fs::File::open(file).ok()?;
                let content = candle_core::quantized::gguf_file::Content::read(&mut reader).ok()?;
                content.metadata.get("general.architecture")?.to_string().ok().cloned()
            }
        }
    }

    /// The attention window of a sliding-window model (config.json `sliding_window`, and for
    /// Qwen2 only with `use_sliding_window`); `None` for GGUF files and full-attention models.
    pub fn sliding_window(&self) -> Option<usize> {
        let ModelSource::SafetensorsDir(dir) = self else { return None };
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        let config: serde_json::Value = serde_json::from_str(&text).ok()?;
        if config["use_sliding_window"] == serde_json::Value::Bool(false) {
            return None;
        }
        config["sliding_window"].as_u64().map(|w| w as usize)
    }

    pub(super) fn selected(&self, dtype: ModelDType, max_seq_len: usize) -> Result<ModelSelected> {
        let utf8 = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .with_context(|| format!("model path {} is not UTF-8", p.display()))
        };
        Ok(match self {
            ModelSource::SafetensorsDir(dir) => ModelSelected::Plain {
                model_id: utf8(dir)?,
                tokenizer_json: None,
                arch: None,
                dtype,
                topology: None,
                organization: None,
                write_uqff: None,
                from_uqff: None,
                imatrix: None,
                calibration_file: None,
                max_seq_len,
                max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
                hf_cache_path: None,
                matformer_config_path: None,
                matformer_slice_name: None,
            },
            ModelSource::GgufFile(file) => {
                let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let name = file.file_name().context("GGUF path has no file name")?;
                ModelSelected::GGUF {
                    tok_model_id: None,
                    quantized_model_id: utf8(dir)?,
                    quantized_filename: utf8(Path::new(name))?,
                    dtype,
                    topology: None,
                    max_seq_len,
                    max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
                }
            }
        })
    }
}
