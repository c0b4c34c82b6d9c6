//! A zoo of tiny random-weight checkpoints, one per mistral.rs architecture we care about.
//!
//! Why: the KV policies (full, quest, retro) sit under paged attention, which every mistral.rs text
//! model reaches through its own attention code, config struct and tensor layout. Real Mistral /
//! Qwen2 / Phi-3 / Llama checkpoints are far too big for tests, so this writes Hugging Face-style
//! directories (`config.json`, `model.safetensors`, tokenizer files) with the real layouts at toy
//! sizes (hidden 64, 4 layers, 4 query heads over 2 KV heads, head_dim 16). They go through the
//! same code as real models: `architectures` auto-detection, each loader's serde `Config`, the
//! exact tensor names, GQA, Qwen2's q/k/v biases, Phi-3's fused `qkv_proj` / `gate_up_proj`.
//! The weights are random, so the text is gibberish: tests compare policies with each other.
//!
//! Self-contained on purpose: its own splitmix64 PRNG (no `rand`) seeded per (architecture, tensor
//! name), so weights are bit-identical on every machine and Mistral and Llama (same maths, same
//! names) still differ; candle-core (already a dependency) writes the safetensors. The vocabulary is
//! SmolLM2's, whose tokenizer files are copied in, so `vocab_size` must stay 49152.
//!
//! Beware: mistral.rs's unquantized linear constructors silently build a dummy layer when
//! `<prefix>.weight` is missing and skip a missing `<prefix>.bias`, so a wrong name here would not
//! fail at load time. The names below were checked against the 0.8.1 loaders.
#![allow(dead_code)]

use std::{collections::HashMap, fs, io, path::Path, sync::Mutex};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

/// Bump whenever shapes, config keys or the PRNG change: directories with another stamp are rewritten.
const VERSION: &str = "zoo-v1 vocab49152 h64 i128 l4 heads4 kv2 d16 f32 seed5eed";
const STAMP: &str = ".zoo-stamp";
const SEED: u64 = 0x5EED_2024_C0FF_EE00;

const VOCAB: usize = 49152;
const HIDDEN: usize = 64;
const INTER: usize = 128;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS; // 16: Qwen2, Llama and Phi-3 derive it as hidden / heads
const MAX_POS: usize = 4096;

#[derive(Clone, Copy, Debug)]
pub enum ZooArch {
    Mistral,
    Qwen2,
    Phi3,
    Llama,
}

impl ZooArch {
    pub const ALL: [ZooArch; 4] = [ZooArch::Mistral, ZooArch::Qwen2, ZooArch::Phi3, ZooArch::Llama];

    pub fn name(self) -> &'static str {
        match self {
            ZooArch::Mistral => "mistral",
            ZooArch::Qwen2 => "qwen2",
            ZooArch::Phi3 => "phi3",
            ZooArch::Llama => "llama",
        }
    }

    /// The Hugging Face class name; mistral.rs's `AutoNormalLoader` picks the loader from it.
    fn class(self) -> &'static str {
        match self {
            ZooArch::Mistral => "MistralForCausalLM",
            ZooArch::Qwen2 => "Qwen2ForCausalLM",
            ZooArch::Phi3 => "Phi3ForCausalLM",
            ZooArch::Llama => "LlamaForCausalLM",
        }
    }
}

/// How a tensor is initialised.
#[derive(Clone, Copy)]
enum Init {
    Matrix, // uniform in [-a, a], a = 1/sqrt(fan_in), fan_in = the last dimension
    Ones,   // RMSNorm weights
    Bias,   // uniform in [-0.02, 0.02]
}

/// Every tensor the mistral.rs 0.8.1 loader of `arch` reads, with its shape (PyTorch `[out, in]`).
pub fn tensor_specs(arch: ZooArch) -> Vec<(String, Vec<usize>)> {
    specs(arch).into_iter().map(|(n, s, _)| (n, s)).collect()
}

fn specs(arch: ZooArch) -> Vec<(String, Vec<usize>, Init)> {
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN], Init::Matrix),
        ("model.norm.weight".to_string(), vec![HIDDEN], Init::Ones),
        ("lm_head.weight".to_string(), vec![VOCAB, HIDDEN], Init::Matrix),
    ];
    for i in 0..LAYERS {
        let mut add =
            |n: &str, s: Vec<usize>, init| t.push((format!("model.layers.{i}.{n}"), s, init));
        add("input_layernorm.weight", vec![HIDDEN], Init::Ones);
        add("post_attention_layernorm.weight", vec![HIDDEN], Init::Ones);
        add("self_attn.o_proj.weight", vec![HIDDEN, q], Init::Matrix);
        add("mlp.down_proj.weight", vec![HIDDEN, INTER], Init::Matrix);
        if let ZooArch::Phi3 = arch {
            add("self_attn.qkv_proj.weight", vec![q + 2 * kv, HIDDEN], Init::Matrix);
            add("mlp.gate_up_proj.weight", vec![2 * INTER, HIDDEN], Init::Matrix);
            continue;
        }
        add("self_attn.q_proj.weight", vec![q, HIDDEN], Init::Matrix);
        add("self_attn.k_proj.weight", vec![kv, HIDDEN], Init::Matrix);
        add("self_attn.v_proj.weight", vec![kv, HIDDEN], Init::Matrix);
        add("mlp.gate_proj.weight", vec![INTER, HIDDEN], Init::Matrix);
        add("mlp.up_proj.weight", vec![INTER, HIDDEN], Init::Matrix);
        if let ZooArch::Qwen2 = arch {
            add("self_attn.q_proj.bias", vec![q], Init::Bias);
            add("self_attn.k_proj.bias", vec![kv], Init::Bias);
            add("self_attn.v_proj.bias", vec![kv], Init::Bias);
        }
    }
    t
}

/// splitmix64 (Steele, Lea & Flood 2014): tiny, fast, and fully specified, hence reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-a, a) from the top 24 bits (exact in f32).
    fn uniform(&mut self, a: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * a
    }
}

/// FNV-1a, to give each tensor its own stream whatever order tensors are generated in.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

fn make_tensor(arch: ZooArch, name: &str, shape: &[usize], init: Init) -> io::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = SplitMix64(SEED ^ fnv1a(&format!("{}/{name}", arch.name())));
    let data: Vec<f32> = match init {
        Init::Ones => vec![1.0; n],
        Init::Bias => (0..n).map(|_| rng.uniform(0.02)).collect(),
        Init::Matrix => {
            let a = 1.0 / (shape[shape.len() - 1] as f32).sqrt();
            (0..n).map(|_| rng.uniform(a)).collect()
        }
    };
    Tensor::from_vec(data, shape.to_vec(), &Device::Cpu).map_err(io::Error::other)
}

/// `config.json` for `arch`. Token ids are copied from the tokenizer's own `config.json`.
fn config(arch: ZooArch, src_cfg: &Value) -> Value {
    let tok = |k: &str, default: u64| src_cfg.get(k).cloned().unwrap_or(json!(default));
    let mut c = json!({
        "architectures": [arch.class()],
        "model_type": arch.name(),
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POS,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "bos_token_id": tok("bos_token_id", 1),
        "eos_token_id": tok("eos_token_id", 2),
        "pad_token_id": tok("pad_token_id", 2),
    });
    let extra = match arch {
        ZooArch::Mistral => json!({ "sliding_window": null }),
        ZooArch::Qwen2 => json!({
            "sliding_window": null,
            "use_sliding_window": false,
            "max_window_layers": LAYERS,
        }),
        ZooArch::Phi3 => json!({
            "sliding_window": null,
            "original_max_position_embeddings": MAX_POS,
            "partial_rotary_factor": null,
        }),
        ZooArch::Llama => json!({ "attention_bias": false, "mlp_bias": false }),
    };
    let obj = c.as_object_mut().unwrap();
    obj.extend(extra.as_object().unwrap().clone());
    c
}

/// Write to a temporary name in the same directory, then rename: a reader never sees half a file.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let tmp = path.with_file_name(format!(
        "{}.{}.tmp",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    write(&tmp)?;
    fs::rename(&tmp, path)
}

/// Serialises writers within one test binary (tests run on parallel threads).
static LOCK: Mutex<()> = Mutex::new(());

/// Writes (unless `dir` already holds this exact version, see [`VERSION`]) `config.json`,
/// `model.safetensors` (f32, deterministic random weights) and the tokenizer files copied from
/// `tokenizer_from` (the SmolLM2 directory).
pub fn write_model(arch: ZooArch, dir: &Path, tokenizer_from: &Path) -> io::Result<()> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let stamp = format!("{VERSION} {}\n", arch.name());
    let stamp_path = dir.join(STAMP);
    let complete = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        .iter()
        .all(|f| dir.join(f).is_file());
    if complete && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let _ = fs::remove_file(&stamp_path); // until the stamp is rewritten, the directory is stale

    let src_cfg: Value = match fs::read_to_string(tokenizer_from.join("config.json")) {
        Ok(s) => serde_json::from_str(&s).map_err(io::Error::other)?,
        Err(_) => json!({}),
    };
    let cfg = serde_json::to_string_pretty(&config(arch, &src_cfg)).map_err(io::Error::other)?;
    write_atomic(&dir.join("config.json"), |p| fs::write(p, cfg + "\n"))?;

    let mut tensors = HashMap::new();
    for (name, shape, init) in specs(arch) {
        let t = make_tensor(arch, &name, &shape, init)?;
        tensors.insert(name, t);
    }
    write_atomic(&dir.join("model.safetensors"), |p| {
        candle_core::safetensors::save(&tensors, p).map_err(io::Error::other)
    })?;

    for (file, required) in [
        ("tokenizer.json", true),
        ("tokenizer_config.json", true),
        ("generation_config.json", false),
        ("special_tokens_map.json", false),
        ("chat_template.jinja", false),
    ] {
        let src = tokenizer_from.join(file);
        if required || src.is_file() {
            write_atomic(&dir.join(file), |p| fs::copy(&src, p).map(|_| ()))?;
        }
    }
    write_atomic(&stamp_path, |p| fs::write(p, &stamp))
}
