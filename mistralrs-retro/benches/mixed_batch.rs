//! Aggregate throughput of concurrent requests of mixed lengths (issue 7, item 9): upstream's eager
//! path, paged `full` (upstream's scheduling: decode batches bucketed by length, the other buckets
//! preempted at every step) and `quest` / `retro` (ragged decode batches, patch 0004), for 8 and 32
//! concurrent requests, in one run.
//!
//! `cargo bench -p mistralrs-retro --bench mixed_batch` (after scripts/setup.sh). Aggregate tok/s is
//! generated tokens over the wall time from the first request sent to the last answer (prefill
//! included), or over the deadline (5 minutes) when a configuration has not finished by then;
//! preemptions (of prefilled sequences) come from `/metrics` (none for the eager path, whose
//! scheduler does not report them).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{smollm2_dir, Server};
use serde_json::json;

const NEW_TOKENS: usize = 48;

/// `n` prompts from about 40 to 300 tokens.
fn prompts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let facts: String = (0..(i * 7) % 40).map(|k| format!(" Fact {k}: item {} weighs {} grams.", k * 3 % 11, k * 17 % 97)).collect();
            format!("Here are some notes.{facts} Summarize the notes in two sentences.")
        })
        .collect()
}

fn preemptions(server: &Server) -> f64 {
    let (_, text) = server.request("GET", "/metrics", None);
    text.lines()
        .find(|l| l.starts_with("mistralrs_kv_preemptions_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Give up on a configuration after this long (upstream's bucketing can take many minutes).
const DEADLINE: Duration = Duration::from_secs(300);

/// (generated tokens per second over the wall time, preemptions during the run, whether every
/// request finished before the deadline)
fn run(server: &Server, prompts: &[String]) -> (f64, f64, bool) {
    let before = preemptions(server);
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    for p in prompts {
        let (tx, port, body) = (tx.clone(), server.port, json!({"model": "default", "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0.0}));
        // Detached: a request still running at the deadline is abandoned with its server.
        std::thread::spawn(move || {
            let (status, text) = common::http_request(port, "POST", "/v1/completions", Some(&body));
            let tokens = serde_json::from_str::<serde_json::Value>(&text).ok().filter(|_| status == 200).and_then(|v| v["usage"]["completion_tokens"].as_u64());
            let _ = tx.send(tokens.unwrap_or(0));
        });
    }
    let mut tokens = 0;
    let mut done = 0;
    while done < prompts.len() {
        match rx.recv_timeout(DEADLINE.saturating_sub(start.elapsed())) {
            Ok(n) => {
                tokens += n;
                done += 1;
            }
            Err(_) => break,
        }
    }
    let rate = tokens as f64 / start.elapsed().as_secs_f64();
    (rate, preemptions(server) - before, done == prompts.len())
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let model = smollm2_dir();
    let model = model.to_str().unwrap();
    let common = ["--model", model, "--cpu", "--no-prefix-cache", "--pa-block-size", "16", "--max-seqs", "32"];
    let with = |extra: &[&'static str]| -> Vec<&str> { common.iter().copied().chain(extra.iter().copied()).collect() };
    let configs: [(&str, &[&'static str]); 4] = [
        ("upstream eager", &["--no-paged-attn"]),
        ("paged full (bucketed)", &["--kv-policy", "full"]),
        ("quest (ragged)", &["--kv-policy", "quest"]),
        ("retro w=2 (ragged)", &["--kv-policy", "retro", "--kv-window", "2"]),
    ];
    println!("aggregate generated tok/s over wall time ({NEW_TOKENS} new tokens each, greedy), preemptions in brackets; ratio to upstream eager");
    println!("| concurrent | {} |", configs.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" | "));
    println!("|---:|{}", "---:|".repeat(configs.len()));
    // MIXED_BATCH_SIZES=32 runs only the 32-request row (each row takes up to 4 x 5 minutes).
    let sizes: Vec<usize> = std::env::var("MIXED_BATCH_SIZES")
        .unwrap_or_else(|_| "8,32".into())
        .split(',')
        .map(|n| n.trim().parse().expect("MIXED_BATCH_SIZES: comma-separated request counts"))
        .collect();
    for n in sizes {
        let prompts = prompts(n);
        let mut cells = Vec::new();
        let mut base = 0.0;
        for (i, (_, extra)) in configs.iter().enumerate() {
            // One server at a time: each may use both cores.
            let server = Server::start(&with(extra));
            server.greedy_completion("Warm up.", 4);
            let (rate, preempted, finished) = run(&server, &prompts);
            if i == 0 {
                base = rate;
            }
            let cut = if finished { "" } else { ", cut at the deadline" };
            cells.push(format!("{rate:.1} ({preempted}{cut}) {:.2}x", rate / base));
        }
        println!("| {n} | {} |", cells.join(" | "));
    }
}
