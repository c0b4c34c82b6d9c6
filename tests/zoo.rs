//! The policies across mistral.rs's model zoo: tiny random-weight Mistral, Qwen2, Phi-3 and Llama
//! checkpoints (written by `common::zoo`) and the real SmolLM2 GGUF (upstream's quantized Llama).
//! For each: a budget covering the context gives `full`'s tokens under `quest` and `retro`, and
//! `retro` at a small budget runs and reads fewer pages than `full` would.

mod common;

use common::zoo::{write_model, ZooArch};
use common::{smollm2_dir, smollm2_gguf, workspace_root, Server};

/// About 300 tokens of varied text, so a 32-token budget is a real restriction.
fn prompt() -> String {
    (0..40).map(|i| format!("Item {i} is a {} of size {}.", ["cup", "lamp", "kite", "drum"][i % 4], i * 7 % 23)).collect::<Vec<_>>().join(" ")
}

fn metric(server: &Server, name: &str) -> f64 {
    let (_, text) = server.request("GET", "/metrics", None);
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Greedy completion of `prompt()` under each policy setting; returns the texts in order.
fn completions(model: &str, settings: &[&[&str]], tokens: usize) -> Vec<String> {
    settings
        .iter()
        .map(|policy| {
            let mut args = vec!["--model", model, "--cpu", "--pa-block-size", "16", "--kv-dense-layers", "1"];
            args.extend_from_slice(policy);
            let server = Server::start(&args);
            let text = server.greedy_completion(&prompt(), tokens);
            if policy.contains(&"32") {
                let (loaded, all) = (metric(&server, "mistralrs_kv_pages_loaded_total"), metric(&server, "mistralrs_kv_pages_full_total"));
                assert!(loaded > 0.0 && loaded < all, "{model} {policy:?}: read {loaded} of {all} pages");
            }
            text
        })
        .collect()
}

fn check_model(model: &str, tokens: usize) {
    let everything = ["--kv-budget-tokens", "100000"];
    let outs = completions(
        model,
        &[
            &["--kv-policy", "full"],
            &[&["--kv-policy", "quest"][..], &everything].concat(),
            &[&["--kv-policy", "retro", "--kv-window", "2"][..], &everything].concat(),
            &["--kv-policy", "retro", "--kv-window", "4", "--kv-budget-tokens", "32"],
        ],
        tokens,
    );
    assert!(!outs[0].is_empty(), "{model}: empty output");
    assert_eq!(outs[0], outs[1], "{model}: quest with a budget over the context differs from full");
    assert_eq!(outs[0], outs[2], "{model}: retro with a budget over the context differs from full");
    assert!(!outs[3].is_empty(), "{model}: retro at a small budget produced nothing");
}

#[test]
fn random_weight_mistral_qwen2_phi3_llama() {
    for arch in ZooArch::ALL {
        let dir = workspace_root().join("target/zoo").join(arch.name());
        write_model(arch, &dir, &smollm2_dir()).unwrap_or_else(|e| panic!("writing the {} fixture: {e}", arch.name()));
        check_model(dir.to_str().unwrap(), 48);
    }
}

#[test]
fn smollm2_gguf_quantized_llama() {
    let gguf = smollm2_gguf();
    check_model(gguf.to_str().unwrap(), 24);
}
