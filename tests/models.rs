//! The embedded model in both forms: our f32 conversion and the original Q4_1 GGUF.

mod common;

use std::collections::HashMap;

use common::{smollm2_dir, smollm2_gguf, Server};
use serde_json::{json, Value};

fn top_logprobs(server: &Server, prompt: &str) -> Vec<(String, f64)> {
    let v: Value = server.post_json(
        "/v1/chat/completions",
        &json!({"model": "default", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 1, "temperature": 0.0, "logprobs": true, "top_logprobs": 20}),
    );
    v["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no top_logprobs in {v}"))
        .iter()
        .map(|t| (t["token"].as_str().unwrap().to_string(), t["logprob"].as_f64().unwrap()))
        .collect()
}

/// KL(p ‖ q) over p's top tokens, both renormalised to that support. A token of p's top list that is
/// missing from q's top list gets q's smallest listed probability, an upper bound on its true value.
fn kl_on_top_support(p: &[(String, f64)], q: &[(String, f64)]) -> f64 {
    let q_map: HashMap<&str, f64> = q.iter().map(|(t, lp)| (t.as_str(), lp.exp())).collect();
    let q_floor = q.iter().map(|(_, lp)| lp.exp()).fold(f64::INFINITY, f64::min);
    let p_probs: Vec<f64> = p.iter().map(|(_, lp)| lp.exp()).collect();
    let q_probs: Vec<f64> = p.iter().map(|(t, _)| *q_map.get(t.as_str()).unwrap_or(&q_floor)).collect();
    let (p_sum, q_sum): (f64, f64) = (p_probs.iter().sum(), q_probs.iter().sum());
    p_probs
        .iter()
        .zip(&q_probs)
        .map(|(pi, qi)| {
            let (pi, qi) = (pi / p_sum, qi / q_sum);
            if pi > 0.0 { pi * (pi / qi).ln() } else { 0.0 }
        })
        .sum()
}

#[test]
fn safetensors_and_gguf_agree() {
    let prompt = "Name the largest planet in the solar system.";
    let dir = smollm2_dir();
    let (f32_paris, f32_top) = {
        let server = Server::start(&["--model", dir.to_str().unwrap(), "--cpu"]);
        (server.greedy_completion("The capital of France is", 8), top_logprobs(&server, prompt))
    };
    let gguf = smollm2_gguf();
    let (gguf_paris, gguf_top) = {
        let server = Server::start(&["--model", gguf.to_str().unwrap(), "--cpu"]);
        (server.greedy_completion("The capital of France is", 8), top_logprobs(&server, prompt))
    };
    assert!(f32_paris.contains("Paris"), "f32 conversion: {f32_paris:?}");
    assert!(gguf_paris.contains("Paris"), "GGUF: {gguf_paris:?}");

    assert_eq!(f32_top[0].0, gguf_top[0].0, "greedy next token differs: {f32_top:?} vs {gguf_top:?}");
    let kl = kl_on_top_support(&f32_top, &gguf_top);
    println!("KL(f32 conversion ‖ GGUF Q4_1) on the top-20 support: {kl:.4} nats");
    // Q4_1 quantisation noise on a 135M model: close, not equal. Wrong weights give KL of order 1+.
    assert!(kl < 0.15, "next-token distributions disagree: KL = {kl}\n{f32_top:?}\n{gguf_top:?}");
}
