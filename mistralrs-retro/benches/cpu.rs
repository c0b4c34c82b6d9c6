//! CPU prefill and decode on the embedded SmolLM2 (f32) at about 512, 2K and 8K tokens of context:
//! upstream's eager path, our paged `full` (with upstream's prompt attention and with ours), `quest`
//! and `retro` w = 2 at a 12.5% budget. For each decode cell: the bytes a step must read (weights +
//! the K/V the policy reads) and the tokens/s that memory-copy bandwidth, measured in the same run,
//! would allow. Results also go to docs/results/cpu.json.
//!
//! `cargo bench -p mistralrs-retro --bench cpu` (after scripts/setup.sh); CPU_BENCH_CONTEXTS=512,2048
//! picks contexts. All servers run side by side and the requests alternate, so machine noise hits
//! all alike; a cell is the best of its runs. Rates come from the engine's own usage report.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../kernels/benches/support/bandwidth.rs"]
mod bandwidth;
use bandwidth::copy_bandwidth;


use common::{log_prompt, smollm2_dir, workspace_root, Server};
use serde_json::{json, Value};

const NEW_TOKENS: usize = 32;
const BUDGET: f64 = 0.125;

/// SmolLM2-135M: 30 layers, 3 KV heads of 64, f32 K/V (the servers run --dtype f32).
const LAYERS: f64 = 30.0;
const KV_BYTES_PER_TOKEN_LAYER: f64 = 2.0 * 3.0 * 64.0 * 4.0;
const DENSE_LAYERS: f64 = 2.0;


struct Config {
    name: &'static str,
    policy: &'static str,
    window: usize,
    server: Server,
}

/// (prompt tokens, prefill tok/s, decode tok/s)
fn run(server: &Server, prompt: &str) -> (u64, f64, f64) {
    let v = server.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0}),
    );
    let u = &v["usage"];
    let f = |k: &str| u[k].as_f64().unwrap_or_else(|| panic!("usage.{k} missing: {v}"));
    (f("prompt_tokens") as u64, f("prompt_tokens") / f("total_prompt_time_sec"), f("completion_tokens") / f("total_completion_time_sec"))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let contexts: Vec<usize> = std::env::var("CPU_BENCH_CONTEXTS")
        .unwrap_or_else(|_| "512,2048,6800".into())
        .split(',')
        .map(|c| c.trim().parse().expect("CPU_BENCH_CONTEXTS: comma-separated token counts"))
        .collect();
    let model = smollm2_dir();
    let weight_bytes = std::fs::metadata(model.join("model.safetensors")).unwrap().len() as f64;
    let model = model.to_str().unwrap();
    let base = ["--model", model, "--cpu", "--no-prefix-cache", "--pa-block-size", "16", "--max-seqs", "1"];
    let with = |extra: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(extra.iter().copied()).collect() };
    let sparse = |w: &'static str| -> Vec<&str> {
        with(&["--kv-policy", "retro", "--kv-window", w, "--kv-budget-ratio", "0.125", "--kv-budget-min-tokens", "0"])
    };
    let configs = vec![
        Config { name: "upstream eager", policy: "eager", window: 1, server: Server::start(&with(&["--no-paged-attn"])) },
        Config {
            name: "full, upstream prompt attn",
            policy: "full-upstream-prefill",
            window: 1,
            server: Server::start(&with(&["--kv-policy", "full", "--prompt-attention", "upstream"])),
        },
        Config { name: "full", policy: "full", window: 1, server: Server::start(&with(&["--kv-policy", "full"])) },
        Config { name: "quest 12.5%", policy: "quest", window: 1, server: Server::start(&sparse("1")) },
        Config { name: "retro w=2 12.5%", policy: "retro", window: 2, server: Server::start(&sparse("2")) },
    ];
    let bandwidth = copy_bandwidth();
    println!("copy bandwidth {:.1} GB/s (read + write), weights {:.0} MB", bandwidth / 1e9, weight_bytes / 1e6);
    let mut records = Vec::new();
    println!("| context | config | prefill tok/s | decode tok/s | bytes/step (MB) | implied GB/s | floor tok/s | of floor |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for &target in &contexts {
        let prompt = log_prompt(target);
        // Long prompts take minutes upstream: one run each; short ones: best of 2 after a warm-up.
        let repeats = if target > 4096 { 1 } else { 2 };
        if target <= 4096 {
            for c in &configs {
                run(&c.server, &prompt);
            }
        }
        let mut best = vec![(0u64, 0f64, 0f64); configs.len()];
        for _ in 0..repeats {
            for (i, c) in configs.iter().enumerate() {
                let (n, p, d) = run(&c.server, &prompt);
                best[i] = (n, best[i].1.max(p), best[i].2.max(d));
            }
        }
        for (c, &(n, prefill, decode)) in configs.iter().zip(&best) {
            let ctx = n as f64 + NEW_TOKENS as f64 / 2.0;
            let kv_full = LAYERS * ctx * KV_BYTES_PER_TOKEN_LAYER;
            let kv = match c.policy {
                "quest" | "retro" => {
                    let sparse_layers = LAYERS - DENSE_LAYERS;
                    let dense = DENSE_LAYERS * ctx * KV_BYTES_PER_TOKEN_LAYER;
                    // A retro step also reads the pages its w − 1 older rows had not seen: at most
                    // another budget's worth per older row (an upper bound; the metric counts them).
                    dense + sparse_layers * (ctx * BUDGET) * KV_BYTES_PER_TOKEN_LAYER * c.window as f64
                }
                _ => kv_full,
            };
            let bytes = weight_bytes + kv;
            let floor = bandwidth / bytes;
            println!(
                "| {n} | {} | {prefill:.1} | {decode:.2} | {:.0} | {:.1} | {floor:.1} | {:.0}% |",
                c.name,
                bytes / 1e6,
                bytes * decode / 1e9,
                100.0 * decode / floor
            );
            records.push(json!({"kind": "prefill", "policy": c.policy, "context": n, "budget": Value::Null, "window": c.window, "tok_s": prefill, "floor_tok_s": Value::Null}));
            records.push(json!({
                "kind": "decode", "policy": c.policy, "context": n,
                "budget": if matches!(c.policy, "quest" | "retro") { json!(BUDGET) } else { Value::Null },
                "window": c.window, "tok_s": decode, "floor_tok_s": floor,
            }));
        }
    }
    let out = workspace_root().join("docs/results/cpu.json");
    std::fs::write(&out, serde_json::to_string_pretty(&records).unwrap() + "\n").unwrap();
    println!("wrote {}", out.display());
}
