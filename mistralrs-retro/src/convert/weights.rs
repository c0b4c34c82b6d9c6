//! GGUF tensors → one f32 `model.safetensors` with Hugging Face llama names.
//!
//! The file is written by hand rather than with `candle_core::safetensors::save` for two
//! reasons: the header can carry `{"format": "pt"}` metadata, which transformers insists
//! on, and tensors can be dequantized and streamed one at a time instead of holding the
//! whole f32 model in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use serde_json::{json, Map, Value};

use super::LlamaParams;

pub(crate) struct WeightsSummary {
    pub tensor_count: usize,
    pub parameter_count: usize,
    pub tie_word_embeddings: bool,
    pub warnings: Vec<String>,
}

/// llama.cpp stores Q and K rows interleaved per head; these must be put back in
/// HF's half-split order for rotate-half RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RopeRows {
    Plain,
    Interleaved { n_head: usize },
}

struct PlannedTensor {
    gguf_name: String,
    shape: Vec<usize>,
    rope_rows: RopeRows,
}

const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Maps a GGUF tensor name to its HF name and the shape HF expects (PyTorch order).
/// `None` for tensors that have no HF llama counterpart.
fn hf_tensor(gguf_name: &str, p: &LlamaParams) -> Result<Option<(String, Vec<usize>, RopeRows)>> {
    let (h, v) = (p.hidden_size, p.vocab_size);
    let q_dim = p.num_heads * p.head_dim;
    let kv_dim = p.num_kv_heads * p.head_dim;
    let global = match gguf_name {
        "token_embd.weight" => Some(("model.embed_tokens.weight", vec![v, h])),
        "output_norm.weight" => Some(("model.norm.weight", vec![h])),
        "output.weight" => Some(("lm_head.weight", vec![v, h])),
        _ => None,
    };
    if let Some((name, shape)) = global {
        return Ok(Some((name.to_string(), shape, RopeRows::Plain)));
    }

    let Some(rest) = gguf_name.strip_prefix("blk.") else {
        return Ok(None);
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return Ok(None);
    };
    let Some(kind) = rest.strip_suffix(".weight") else {
        return Ok(None);
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return Ok(None);
    };
    ensure!(
        layer < p.num_layers,
        "{gguf_name}: layer {layer} >= block_count {}",
        p.num_layers
    );
    let Some(&(_, hf_kind)) = LAYER_TENSORS.iter().find(|(g, _)| *g == kind) else {
        return Ok(None);
    };
    let (shape, rope_rows) = match kind {
        "attn_q" => (
            vec![q_dim, h],
            RopeRows::Interleaved {
                n_head: p.num_heads,
            },
        ),
        "attn_k" => (
            vec![kv_dim, h],
            RopeRows::Interleaved {
                n_head: p.num_kv_heads,
            },
        ),
        "attn_v" => (vec![kv_dim, h], RopeRows::Plain),
        "attn_output" => (vec![h, q_dim], RopeRows::Plain),
        "ffn_gate" | "ffn_up" => (vec![p.intermediate_size, h], RopeRows::Plain),
        "ffn_down" => (vec![h, p.intermediate_size], RopeRows::Plain),
        _ => (vec![h], RopeRows::Plain),
    };
    Ok(Some((
        format!("model.layers.{layer}.{hf_kind}.weight"),
        shape,
        rope_rows,
    )))
}

/// Dequantizes every GGUF tensor to f32 and writes them to `path` under HF names.
pub(crate) fn write_safetensors<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    p: &LlamaParams,
    path: &Path,
) -> Result<WeightsSummary> {
    let mut warnings = Vec::new();
    let mut plan: BTreeMap<String, PlannedTensor> = BTreeMap::new();
    let mut gguf_names: Vec<&String> = content.tensor_infos.keys().collect();
    gguf_names.sort();
    for gguf_name in gguf_names {
        let info = &content.tensor_infos[gguf_name];
        let Some((hf_name, expected, rope_rows)) = hf_tensor(gguf_name, p)? else {
            // llama3-style RoPE frequency factors are recomputed by HF from config.json.
            if gguf_name == "rope_freqs.weight" {
                warnings.push(format!(
                    "skipped {gguf_name}: RoPE scaling is not carried over"
                ));
                continue;
            }
            bail!("GGUF tensor {gguf_name} has no Hugging Face llama counterpart");
        };
        let shape = info.shape.dims().to_vec();
        ensure!(
            shape == expected,
            "{gguf_name} has shape {shape:?} (PyTorch order), expected {expected:?} for {hf_name}"
        );
        plan.insert(
            hf_name,
            PlannedTensor {
                gguf_name: gguf_name.clone(),
                shape,
                rope_rows,
            },
        );
    }

    let mut missing: Vec<String> = ["model.embed_tokens.weight", "model.norm.weight"]
        .iter()
        .map(|s| s.to_string())
        .chain((0..p.num_layers).flat_map(|l| {
            LAYER_TENSORS
                .iter()
                .map(move |(_, hf)| format!("model.layers.{l}.{hf}.weight"))
        }))
        .filter(|name| !plan.contains_key(name))
        .collect();
    if !missing.is_empty() {
        missing.truncate(8);
        bail!(
            "GGUF lacks tensors needed for a llama model, e.g. {}",
            missing.join(", ")
        );
    }
    let tie_word_embeddings = !plan.contains_key("lm_head.weight");

    let (header, data_len) = safetensors_header(&plan)?;
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;

    let mut parameter_count = 0usize;
    for (hf_name, t) in &plan {
        let values = content
            .tensor(reader, &t.gguf_name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|x| x.flatten_all())
            .and_then(|x| x.to_vec1::<f32>())
            .with_context(|| format!("reading and dequantizing {}", t.gguf_name))?;
        ensure!(
            values.len() == t.shape.iter().product::<usize>(),
            "{hf_name}: element count mismatch"
        );
        let values = match t.rope_rows {
            RopeRows::Plain => values,
            RopeRows::Interleaved { n_head } => unpermute_qk_rows(&values, n_head, t.shape[1]),
        };
        parameter_count += values.len();
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        out.write_all(&bytes)
            .with_context(|| format!("writing {hf_name}"))?;
    }
    out.flush()?;
    ensure!(
        parameter_count * 4 == data_len,
        "wrote {} data bytes, header says {data_len}",
        parameter_count * 4
    );

    Ok(WeightsSummary {
        tensor_count: plan.len(),
        parameter_count,
        tie_word_embeddings,
        warnings,
    })
}

/// Builds the JSON header for f32 tensors laid out back to back in `plan` order, padded with
/// spaces to 8 bytes so the data that follows stays aligned.
fn safetensors_header(plan: &BTreeMap<String, PlannedTensor>) -> Result<(Vec<u8>, usize)> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, t) in plan {
        let end = offset + t.shape.iter().product::<usize>() * std::mem::size_of::<f32>();
        header.insert(
            name.clone(),
            json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(header))?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok((bytes, offset))
}

/// Undoes llama.cpp's Q/K row permutation for a row-major `[rows, cols]` matrix.
///
/// convert_hf_to_gguf stores each head's rows as `reshape(n_head, 2, head_dim/2, cols)
/// .swapaxes(1, 2)`, i.e. GGUF row `h*head_dim + 2*i + s` holds HF row
/// `h*head_dim + s*head_dim/2 + i`. llama.cpp's RoPE rotates adjacent pairs while HF
/// rotates the two halves of a head, so the rows must go back to the halves layout.
pub fn unpermute_qk_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let (head_dim, half) = qk_layout(w.len(), n_head, cols);
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                let gguf_row = h * head_dim + 2 * i + s;
                let hf_row = h * head_dim + s * half + i;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&w[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    out
}

/// The permutation convert_hf_to_gguf applies (HF → GGUF); kept to test the inverse against.
#[cfg(test)]
pub fn permute_qk_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let (head_dim, half) = qk_layout(w.len(), n_head, cols);
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + s * half + i;
                let gguf_row = h * head_dim + 2 * i + s;
                out[gguf_row * cols..(gguf_row + 1) * cols]
                    .copy_from_slice(&w[hf_row * cols..(hf_row + 1) * cols]);
            }
        }
    }
    out
}

fn qk_layout(len: usize, n_head: usize, cols: usize) -> (usize, usize) {
    assert!(
        cols > 0 && n_head > 0 && len.is_multiple_of(cols),
        "bad matrix: {len} values, {cols} cols"
    );
    let rows = len / cols;
    assert!(
        rows.is_multiple_of(n_head),
        "{rows} rows do not split into {n_head} heads"
    );
    let head_dim = rows / n_head;
    assert!(head_dim.is_multiple_of(2), "head dim {head_dim} is odd");
    (head_dim, head_dim / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols).map(|x| x as f32).collect()
    }

    #[test]
    fn unpermute_inverts_permute() {
        // 3 heads of dim 8 with 5 columns: big enough that a transposed index would show.
        let (n_head, head_dim, cols) = (3, 8, 5);
        let w = matrix(n_head * head_dim, cols);
        let permuted = permute_qk_rows(&w, n_head, cols);
        assert_ne!(permuted, w);
        assert_eq!(unpermute_qk_rows(&permuted, n_head, cols), w);
        assert_eq!(
            permute_qk_rows(&unpermute_qk_rows(&w, n_head, cols), n_head, cols),
            w
        );
    }

    #[test]
    fn unpermute_matches_hand_worked_example() {
        // One head of dim 4, one column: GGUF rows hold HF rows [0, 2, 1, 3], as
        // reshape(1, 2, 2, 1).swapaxes(1, 2) gives for HF rows [0, 1, 2, 3].
        let gguf = [10.0, 12.0, 11.0, 13.0];
        assert_eq!(permute_qk_rows(&[10.0, 11.0, 12.0, 13.0], 1, 1), gguf);
        assert_eq!(unpermute_qk_rows(&gguf, 1, 1), [10.0, 11.0, 12.0, 13.0]);
        // Two heads: the permutation stays within each head.
        let gguf2 = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        assert_eq!(
            unpermute_qk_rows(&gguf2, 2, 1),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        );
    }

    #[test]
    fn header_offsets_are_contiguous_and_aligned() {
        let mut plan = BTreeMap::new();
        for (name, shape) in [("b", vec![2, 3]), ("a", vec![4])] {
            let t = PlannedTensor {
                gguf_name: name.into(),
                shape,
                rope_rows: RopeRows::Plain,
            };
            plan.insert(name.to_string(), t);
        }
        let (header, len) = safetensors_header(&plan).unwrap();
        assert_eq!(header.len() % 8, 0);
        assert_eq!(len, (4 + 6) * 4);
        let v: Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(v["a"]["data_offsets"], json!([0, 16]));
        assert_eq!(v["b"]["data_offsets"], json!([16, 40]));
        assert_eq!(v["__metadata__"]["format"], "pt");
    }
}
