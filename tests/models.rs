//! The embedded model in both forms: our f32 conversion and the original Q4_1 GGUF.

mod common;

use std::collections::HashMap;

use common::{smollm2_dir, smollm2_gguf, Server};
use serde_json::{json, Value};

/// The greedy step's top-20 next-token *logits*, as (token id, logit).
///
/// Upstream 0.8.1's argmax sampler fills `top_logprobs[].logprob` with log10 of the raw logit (it
/// calls `log(10)` on the logits vector, see `sample_argmax` in sampler.rs), and `token` with the id,
/// so the logit is `10^logprob`. The top-20 logits of this model are positive, so that is exact.
fn top_logits(server: &Server, prompt: &str) -> Vec<(u64, f64)> {
    let v: Value = server.post_json(
        "/v1/chat/completions",
        &json!({"model": "default", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 1, "temperature": 0.0, "logprobs": true, "top_logprobs": 20}),
    );
    let top = v["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no top_logprobs in {v}"));
    top.iter()
        .map(|t| {
            let id = t["token"].as_u64().unwrap_or_else(|| panic!("token id in {t}"));
            let logit = 10f64.powf(t["logprob"].as_f64().unwrap_or_else(|| panic!("logprob in {t}")));
            assert!(logit.is_finite() && logit > 0.0, "unexpected top logit {t}");
            (id, logit)
        })
        .collect()
}

/// KL(p ‖ q) of the softmax of both models' logits over p's top tokens. A token of p's top list
/// missing from q's gets q's smallest listed logit, an upper bound on its true logit.
fn kl_on_top_support(p: &[(u64, f64)], q: &[(u64, f64)]) -> f64 {
    let q_map: HashMap<u64, f64> = q.iter().copied().collect();
    let q_floor = q.iter().map(|(_, l)| *l).fold(f64::INFINITY, f64::min);
    let softmax = |logits: Vec<f64>| {
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.into_iter().map(|e| e / sum).collect::<Vec<_>>()
    };
    let p_probs = softmax(p.iter().map(|(_, l)| *l).collect());
    let q_probs = softmax(p.iter().map(|(t, _)| *q_map.get(t).unwrap_or(&q_floor)).collect());
    p_probs.iter().zip(&q_probs).map(|(pi, qi)| pi * (pi / qi).ln()).sum()
}

#[test]
fn safetensors_and_gguf_agree() {
    let prompt = "Name the largest planet in the solar system.";
    let dir = smollm2_dir();
    let (f32_paris, f32_top) = {
        let server = Server::start(&["--model", dir.to_str().unwrap(), "--cpu"]);
        (server.greedy_completion("The capital of France is", 8), top_logits(&server, prompt))
    };
    let gguf = smollm2_gguf();
    let (gguf_paris, gguf_top) = {
        let server = Server::start(&["--model", gguf.to_str().unwrap(), "--cpu"]);
        (server.greedy_completion("The capital of France is", 8), top_logits(&server, prompt))
    };
    assert!(f32_paris.contains("Paris"), "f32 conversion: {f32_paris:?}");
    assert!(gguf_paris.contains("Paris"), "GGUF: {gguf_paris:?}");

    assert_eq!(f32_top[0].0, gguf_top[0].0, "greedy next token differs: {f32_top:?} vs {gguf_top:?}");
    let kl = kl_on_top_support(&f32_top, &gguf_top);
    println!("KL(f32 conversion ‖ GGUF Q4_1) on the top-20 support: {kl:.4} nats");
    // Q4_1 quantisation noise on a 135M model: close, not equal. Wrong weights give KL of order 1+.
    assert!(kl < 0.15, "next-token distributions disagree: KL = {kl}\n{f32_top:?}\n{gguf_top:?}");
}
