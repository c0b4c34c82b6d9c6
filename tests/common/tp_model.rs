//! SmolLM2-135M with its attention padded from 9 query / 3 KV heads to 12 / 4, for tensor
//! parallelism tests.
//!
//! Why: TP splits heads over ranks, and 9/3 heads do not split over 2 or 4 ranks; the zoo's random
//! models do (4/2 heads) but their greedy text is one token repeated, which would let a broken
//! all-reduce pass. Padding keeps the real model's function: the new query head rows and the new
//! KV head are zero in q/k/v_proj, and the matching o_proj columns are zero, so the added heads
//! contribute exactly nothing; GQA groups stay 3 query heads per KV head, so heads 0..9 keep their
//! KV heads. `head_dim` must then be explicit (hidden 576 / 12 heads is not 64), which the Mistral
//! loader reads and the Llama one does not: the same maths and tensor names under Mistral's name.
#![allow(dead_code)]

use std::{collections::HashMap, fs, io, path::Path};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

const STAMP: &str = ".tp-stamp";
const VERSION: &str = "smollm2-padded-v1 heads12 kv4 d64 mistral";
const HEAD_DIM: usize = 64;
pub const HEADS: usize = 12;
pub const KV_HEADS: usize = 4;

/// Write the padded model into `dir` from the f32 SmolLM2 directory `src` (skipped when `dir`
/// already holds this version).
pub fn write_padded_smollm2(src: &Path, dir: &Path) -> io::Result<()> {
    let stamp_path = dir.join(STAMP);
    if fs::read_to_string(&stamp_path).ok().as_deref() == Some(VERSION) && dir.join("model.safetensors").is_file() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let _ = fs::remove_file(&stamp_path);

    let mut cfg: Value = serde_json::from_str(&fs::read_to_string(src.join("config.json"))?).map_err(io::Error::other)?;
    let (heads, kv_heads) = (cfg["num_attention_heads"].as_u64().unwrap() as usize, cfg["num_key_value_heads"].as_u64().unwrap() as usize);
    assert_eq!(cfg["hidden_size"].as_u64(), Some((heads * HEAD_DIM) as u64), "unexpected SmolLM2 layout");
    assert_eq!(heads / kv_heads, HEADS / KV_HEADS, "padding must keep the GQA group size");
    cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    cfg["model_type"] = "mistral".into();
    cfg["num_attention_heads"] = HEADS.into();
    cfg["num_key_value_heads"] = KV_HEADS.into();
    cfg["head_dim"] = HEAD_DIM.into();
    cfg["sliding_window"] = Value::Null;
    fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).map_err(io::Error::other)? + "\n")?;

    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).map_err(io::Error::other)?;
    let pad = |t: &Tensor, dim: usize, to: usize| -> candle_core::Result<Tensor> {
        let mut shape = t.dims().to_vec();
        shape[dim] = to - shape[dim];
        Tensor::cat(&[t, &Tensor::zeros(shape, DType::F32, &Device::Cpu)?], dim)
    };
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32).map_err(io::Error::other)?;
        let padded = if name.ends_with("self_attn.q_proj.weight") {
            pad(&t, 0, HEADS * HEAD_DIM)
        } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.v_proj.weight") {
            pad(&t, 0, KV_HEADS * HEAD_DIM)
        } else if name.ends_with("self_attn.o_proj.weight") {
            pad(&t, 1, HEADS * HEAD_DIM)
        } else {
            Ok(t)
        };
        out.insert(name, padded.map_err(io::Error::other)?);
    }
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&out, &tmp).map_err(io::Error::other)?;
    fs::rename(&tmp, dir.join("model.safetensors"))?;
    for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        if src.join(file).is_file() {
            fs::copy(src.join(file), dir.join(file))?;
        }
    }
    fs::write(&stamp_path, VERSION)
}
