//! Decode throughput: CPU paged attention with `--kv-policy full` against upstream's eager CPU path,
//! on the embedded SmolLM2 (f32), at prompt lengths of about 128, 512 and 2048 tokens.
//!
//! `cargo bench -p mistralrs-retro --bench decode` (after scripts/fetch-smollm2.sh). Both servers run
//! side by side in one process tree and the requests alternate, so machine noise hits both alike;
//! each cell is the best of `REPEATS` runs. Tokens/s come from the engine's own usage report
//! (completion tokens / completion time), so HTTP and prefill time are excluded.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{smollm2_dir, Server};
use serde_json::json;

const TARGET_PROMPT_TOKENS: [usize; 3] = [128, 512, 2048];
const NEW_TOKENS: usize = 64;
const REPEATS: usize = 3;

/// Text of roughly `tokens` tokens that does not repeat exactly (so nothing degenerates).
fn prompt_of(tokens: usize) -> String {
    let mut text = String::from("Here is a log of measurements.\n");
    let mut i = 0;
    // About 12 tokens per line for SmolLM2's tokenizer; the real count is read back from usage.
    // SmolLM2 averages about 2.8 characters per token on these lines.
    while text.len() < tokens * 28 / 10 - 60 {
        text.push_str(&format!("Reading {i}: sensor {} reports {} units.\n", i % 7, (i * 37) % 101));
        i += 1;
    }
    text.push_str("Summarize the log:");
    text
}

/// (prompt tokens, completion tokens, decode tok/s)
fn decode_rate(server: &Server, prompt: &str) -> (u64, u64, f64) {
    let v = server.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0}),
    );
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    let secs = usage["total_completion_time_sec"].as_f64().unwrap();
    (usage["prompt_tokens"].as_u64().unwrap(), completion, completion as f64 / secs)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: only run when benched.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let model = smollm2_dir();
    let model = model.to_str().unwrap();
    let eager = Server::start(&["--model", model, "--cpu", "--no-paged-attn", "--no-prefix-cache"]);
    let paged = Server::start(&["--model", model, "--cpu", "--kv-policy", "full", "--no-prefix-cache"]);

    println!("| prompt tokens | eager tok/s | paged full tok/s | ratio |");
    println!("|---:|---:|---:|---:|");
    for target in TARGET_PROMPT_TOKENS {
        let prompt = prompt_of(target);
        // Warm-up (allocations, first-touch of the cache) outside the measurement.
        decode_rate(&eager, &prompt);
        decode_rate(&paged, &prompt);
        let (mut best_eager, mut best_paged, mut n_prompt) = (0.0f64, 0.0f64, 0);
        for _ in 0..REPEATS {
            let (p, _, r) = decode_rate(&eager, &prompt);
            best_eager = best_eager.max(r);
            n_prompt = p;
            let (_, _, r) = decode_rate(&paged, &prompt);
            best_paged = best_paged.max(r);
        }
        println!(
            "| {n_prompt} | {best_eager:.1} | {best_paged:.1} | {:.2} |",
            best_paged / best_eager
        );
    }
}
