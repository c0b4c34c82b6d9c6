//! Decode throughput on the embedded SmolLM2 (f32): upstream's eager CPU path, CPU paged attention
//! with `--kv-policy full`, and `quest` and `retro` (w = 2 and 4) at a 12.5% budget, at prompt
//! lengths of about 128, 512 and 2048. Ratios are to our paged `full`.
//!
//! `cargo bench -p mistralrs-retro --bench decode` (after scripts/setup.sh). All servers run
//! side by side in one process tree and the requests alternate, so machine noise hits all alike;
//! each cell is the best of `REPEATS` runs. Tokens/s come from the engine's own usage report
//! (completion tokens / completion time), so HTTP and prefill time are excluded.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{log_prompt, smollm2_dir, Server};
use serde_json::json;

const TARGET_PROMPT_TOKENS: [usize; 3] = [128, 512, 2048];
const NEW_TOKENS: usize = 64;
const REPEATS: usize = 2;


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
    let common = ["--model", model, "--cpu", "--no-prefix-cache", "--pa-block-size", "16"];
    let with = |extra: &[&'static str]| -> Vec<&str> { common.iter().copied().chain(extra.iter().copied()).collect() };
    let servers = [
        ("upstream eager", Server::start(&with(&["--no-paged-attn"]))),
        ("paged full", Server::start(&with(&["--kv-policy", "full"]))),
        ("quest 12.5%", Server::start(&with(&["--kv-policy", "quest", "--kv-budget-ratio", "0.125", "--kv-budget-min-tokens", "0"]))),
        ("retro w=2 12.5%", Server::start(&with(&["--kv-policy", "retro", "--kv-window", "2", "--kv-budget-ratio", "0.125", "--kv-budget-min-tokens", "0"]))),
        ("retro w=4 12.5%", Server::start(&with(&["--kv-policy", "retro", "--kv-window", "4", "--kv-budget-ratio", "0.125", "--kv-budget-min-tokens", "0"]))),
        // The same retro w=2 with linear layers on gemm's packed path (before patch mistralrs-quant/0001).
        (
            "retro w=2 packed gemm",
            Server::start(&with(&[
                "--kv-policy", "retro", "--kv-window", "2", "--kv-budget-ratio", "0.125", "--kv-budget-min-tokens", "0",
                "--linear-rows", "upstream",
            ])),
        ),
    ];
    const FULL: usize = 1;

    println!("decode tok/s (best of {REPEATS}, {NEW_TOKENS} new tokens), ratio to paged full in brackets");
    println!("| prompt tokens | {} |", servers.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" | "));
    println!("|---:|{}", "---:|".repeat(servers.len()));
    for target in TARGET_PROMPT_TOKENS {
        let prompt = log_prompt(target);
        // Warm-up (allocations, first touch of the cache) outside the measurement.
        let mut n_prompt = 0;
        for (_, server) in &servers {
            n_prompt = decode_rate(server, &prompt).0;
        }
        let mut best = vec![0.0f64; servers.len()];
        for _ in 0..REPEATS {
            // Alternate so machine noise hits every configuration alike.
            for (i, (_, server)) in servers.iter().enumerate() {
                best[i] = best[i].max(decode_rate(server, &prompt).2);
            }
        }
        let cells: Vec<String> = best.iter().map(|r| format!("{r:.1} ({:.2}x)", r / best[FULL])).collect();
        println!("| {n_prompt} | {} |", cells.join(" | "));
    }
    drop(servers);
    exposure(&common);
}

/// Effective KV exposure (docs/design.md §3) after one long greedy generation, per window, from /metrics.
fn exposure(common: &[&str]) {
    const GENERATED: usize = 512;
    let prompt = log_prompt(2048);
    println!("\neffective exposure after {GENERATED} generated tokens (12.5% budget, ~2K-token prompt)");
    println!("| window | exposure | supplement pages per generated token |");
    println!("|---:|---:|---:|");
    for window in ["2", "4", "8"] {
        let args: Vec<&str> = common
            .iter()
            .copied()
            .chain(["--kv-policy", "retro", "--kv-window", window, "--kv-budget-ratio", "0.125", "--kv-budget-min-tokens", "0"])
            .collect();
        let server = Server::start(&args);
        let v = server.post_json(
            "/v1/completions",
            &json!({"model": "default", "prompt": prompt, "max_tokens": GENERATED, "temperature": 0.0}),
        );
        let generated = v["usage"]["completion_tokens"].as_f64().unwrap();
        // The engine frees a sequence (and files its numbers) just after the response: poll.
        let mut metrics = String::new();
        for _ in 0..50 {
            metrics = server.request("GET", "/metrics", None).1;
            if !metrics.contains("mistralrs_kv_retro_effective_exposure 0\n") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let value = |name: &str| -> f64 {
            metrics.lines().find(|l| l.starts_with(&format!("{name} "))).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(f64::NAN)
        };
        println!(
            "| {window} | {:.3} | {:.1} |",
            value("mistralrs_kv_retro_effective_exposure"),
            value("mistralrs_kv_retro_supplement_pages_total") / generated
        );
    }
}
