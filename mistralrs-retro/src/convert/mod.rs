//! GGUF (llama architecture) → Hugging Face model directory.
//!
//! Writes `config.json`, `model.safetensors` (every tensor dequantized to f32),
//! `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`, so a
//! quantized GGUF can be loaded by loaders that only read plain HF checkpoints.

mod metadata;
mod tokenizer;
mod weights;

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

use metadata::Metadata;

pub use tokenizer::{build_tokenizer, BuiltTokenizer, GgufVocab};
pub use weights::unpermute_qk_rows;

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub tensor_count: usize,
    pub parameter_count: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// Every file written, in the order written.
    pub files: Vec<PathBuf>,
    /// Things in the GGUF that the HF directory cannot express exactly.
    pub warnings: Vec<String>,
}

/// Hyperparameters of a llama-architecture GGUF, in HF terms.
#[derive(Debug, Clone)]
pub(crate) struct LlamaParams {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
}

impl LlamaParams {
    fn from_metadata(md: &Metadata, n_tokens: usize) -> Result<Self> {
        let hidden_size = md.usize("llama.embedding_length")?;
        let num_heads = md.usize("llama.attention.head_count")?;
        // Absent head_count_kv means plain multi-head attention.
        let num_kv_heads = md
            .opt_usize("llama.attention.head_count_kv")?
            .unwrap_or(num_heads);
        let head_dim = md
            .opt_usize("llama.attention.key_length")?
            .unwrap_or(hidden_size / num_heads.max(1));
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            bail!("invalid head counts: {num_heads} query heads, {num_kv_heads} KV heads");
        }
        if !head_dim.is_multiple_of(2) {
            bail!("head dim {head_dim} is odd; RoPE needs an even head dim");
        }
        Ok(Self {
            hidden_size,
            intermediate_size: md.usize("llama.feed_forward_length")?,
            num_layers: md.usize("llama.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: md.f64("llama.attention.layer_norm_rms_epsilon")?,
            // llama.cpp's own default when the key is missing.
            rope_theta: md.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: md.usize("llama.context_length")?,
            vocab_size: md.opt_usize("llama.vocab_size")?.unwrap_or(n_tokens),
        })
    }
}

/// Converts a llama-architecture GGUF file into a Hugging Face model directory.
pub fn convert_gguf_to_hf(gguf: &Path, out_dir: &Path) -> Result<ConvertReport> {
    let mut reader = open_gguf(gguf)?;
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("parsing GGUF header of {}", gguf.display()))?;
    let md = Metadata::new(&content.metadata);

    let arch = md.str("general.architecture")?;
    if arch != "llama" {
        bail!("unsupported GGUF architecture {arch:?}: only \"llama\" is converted");
    }

    let vocab = GgufVocab::from_metadata(&md)?;
    let params = LlamaParams::from_metadata(&md, vocab.tokens.len())?;
    if params.vocab_size != vocab.tokens.len() {
        bail!(
            "llama.vocab_size is {} but the tokenizer has {} tokens",
            params.vocab_size,
            vocab.tokens.len()
        );
    }
    let mut warnings = unsupported_metadata_warnings(&md);
    // Built before any weights are written so an unsupported tokenizer fails fast.
    let tok = build_tokenizer(&vocab)?;
    warnings.extend(tok.warnings.iter().cloned());

    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let mut files = Vec::new();

    let weights = weights::write_safetensors(
        &content,
        &mut reader,
        &params,
        &out_dir.join("model.safetensors"),
    )?;
    warnings.extend(weights.warnings.iter().cloned());
    files.push(out_dir.join("model.safetensors"));

    let tokenizer_path = out_dir.join("tokenizer.json");
    tok.tokenizer
        .save(&tokenizer_path, true)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tokenizer_path.display()))?;
    files.push(tokenizer_path);

    let config = config_json(&params, &vocab, weights.tie_word_embeddings);
    files.push(write_json(out_dir, "config.json", &config)?);
    let tok_config = tokenizer_config_json(&vocab, md.opt_str("tokenizer.chat_template")?, &params);
    files.push(write_json(out_dir, "tokenizer_config.json", &tok_config)?);
    files.push(write_json(
        out_dir,
        "generation_config.json",
        &generation_config_json(&vocab),
    )?);

    Ok(ConvertReport {
        tensor_count: weights.tensor_count,
        parameter_count: weights.parameter_count,
        vocab_size: params.vocab_size,
        tie_word_embeddings: weights.tie_word_embeddings,
        files,
        warnings,
    })
}

/// The tokenizer a GGUF file describes (any architecture), for tools that tokenize text for a
/// GGUF model without a `tokenizer.json`.
pub fn tokenizer_from_gguf(gguf: &Path) -> Result<BuiltTokenizer> {
    let mut reader = open_gguf(gguf)?;
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("parsing GGUF header of {}", gguf.display()))?;
    build_tokenizer(&GgufVocab::from_metadata(&Metadata::new(&content.metadata))?)
}

fn open_gguf(path: &Path) -> Result<BufReader<File>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 4];
    reader
        .read_exact(&mut magic)
        .with_context(|| format!("{} is too short to be a GGUF file", path.display()))?;
    if &magic != b"GGUF" {
        bail!(
            "{} is not a GGUF file (magic bytes {magic:02x?})",
            path.display()
        );
    }
    reader.seek(SeekFrom::Start(0))?;
    Ok(reader)
}

/// Keys whose meaning the plain HF llama config written here would silently drop.
fn unsupported_metadata_warnings(md: &Metadata) -> Vec<String> {
    md.keys()
        .filter(|k| {
            k.starts_with("llama.rope.scaling.") || k.starts_with("llama.attention.sliding")
        })
        .map(|k| format!("GGUF key {k} is not carried into config.json"))
        .collect()
}

fn config_json(p: &LlamaParams, vocab: &GgufVocab, tie_word_embeddings: bool) -> Value {
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "rope_scaling": null,
        "max_position_embeddings": p.max_position_embeddings,
        "vocab_size": p.vocab_size,
        "bos_token_id": vocab.bos,
        "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    // HF derives head_dim as hidden/heads; only spell it out when the GGUF disagrees.
    if p.head_dim * p.num_heads != p.hidden_size {
        config["head_dim"] = json!(p.head_dim);
    }
    config
}

fn tokenizer_config_json(vocab: &GgufVocab, chat_template: Option<&str>, p: &LlamaParams) -> Value {
    let token = |id: Option<u32>| id.map(|id| vocab.tokens[id as usize].clone());
    let added_tokens_decoder: serde_json::Map<String, Value> = vocab
        .added_token_ids()
        .map(|(id, special)| {
            let entry = json!({
                "content": vocab.tokens[id as usize],
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "single_word": false,
                "special": special,
            });
            (id.to_string(), entry)
        })
        .collect();
    let mut config = json!({
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "add_prefix_space": false,
        "bos_token": token(vocab.bos),
        "eos_token": token(vocab.eos),
        "pad_token": token(vocab.pad),
        "unk_token": token(vocab.unk),
        "clean_up_tokenization_spaces": false,
        "model_max_length": p.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
    });
    if let Some(template) = chat_template {
        config["chat_template"] = json!(template);
    }
    config
}

fn generation_config_json(vocab: &GgufVocab) -> Value {
    json!({
        "bos_token_id": vocab.bos,
        "eos_token_id": vocab.eos,
        "pad_token_id": vocab.pad,
    })
}

fn write_json(dir: &Path, name: &str, value: &Value) -> Result<PathBuf> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
