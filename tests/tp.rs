//! The policies under mistral.rs tensor parallelism (the `ring` backend on CPU): 2 and 4 ranks as
//! processes talking TCP over loopback, started by `scripts/serve-tp.sh` exactly as a user would.
//! The model is SmolLM2 with its heads zero-padded to 12 query / 4 KV heads (`common::tp_model`) so
//! they split over the ranks while the text stays SmolLM2's. The ring binary is
//! `target/ring/mistralrs-server` (`scripts/build-ring.sh`; the test command builds it first).

mod common;

use common::{http_request, long_prompt, smollm2_dir, tp_model, workspace_root, Server};

fn model() -> String {
    let dir = workspace_root().join("target/tp/smollm2-padded");
    tp_model::write_padded_smollm2(&smollm2_dir(), &dir).expect("writing the padded SmolLM2");
    dir.to_str().unwrap().to_owned()
}

/// `ranks` = 1: the normal server; otherwise `scripts/serve-tp.sh ranks` over the ring binary.
fn start(ranks: usize, policy: &[&str]) -> Server {
    let model = model();
    let mut args = vec!["--model", model.as_str(), "--cpu", "--pa-block-size", "16"];
    args.extend_from_slice(policy);
    if ranks == 1 {
        return Server::start(&args);
    }
    let ring = workspace_root().join("target/ring/mistralrs-server");
    assert!(ring.is_file(), "{} is missing: run scripts/build-ring.sh", ring.display());
    let base = ring_base_port(ranks).to_string();
    let script = workspace_root().join("scripts/serve-tp.sh");
    let ranks = ranks.to_string();
    let server = Server::start_command(
        &["bash", script.to_str().unwrap(), &ranks],
        &args,
        &[("RETRO_SKIP_BUILD", "1"), ("RING_BASE_PORT", &base)],
    );
    assert_eq!(server.worker_ports.len() + 1, ranks.parse::<usize>().unwrap(), "every worker rank reports its metrics port");
    server
}

/// The first of `ranks + 1` consecutive free ports for the ring, below the kernel's ephemeral range:
/// every rank's /metrics server binds port 0, and a port taken from the ephemeral range could be handed
/// to one of them between our check and the ring's bind ("bind left: Address already in use", seen in CI).
/// Each start gets a fresh range, since the previous ranks' sockets may still be closing.
fn ring_base_port(ranks: usize) -> u16 {
    static STARTS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, span) = (20000u16, ephemeral_low.saturating_sub(20000 + 16).max(100));
    for _ in 0..200 {
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let offset = ((std::process::id() as u64 * 7919 + n as u64 * 16) % span as u64) as u16;
        let base = low + offset;
        let all_free = (0..=ranks as u16).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no {} consecutive free ports in {low}..{}", ranks + 1, low + span);
}

fn metric_at(port: u16, name: &str) -> f64 {
    let (status, text) = http_request(port, "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn prompt() -> String {
    // ~450 tokens: long enough for several pages of 16, short enough for four CPU ranks.
    long_prompt().chars().take(2000).collect()
}

/// Greedy text at TP = 2 (and 4) equals TP = 1 for `full`, and for `quest` / `retro` with a budget
/// over the context (which must then equal `full`).
#[test]
fn greedy_output_at_tp2_and_tp4_equals_tp1() {
    let everything = ["--kv-budget-tokens", "100000"];
    let settings: [(&[&str], &[usize]); 3] = [
        (&["--kv-policy", "full"], &[2, 4]),
        (&[&["--kv-policy", "quest"][..], &everything].concat(), &[2]),
        (&[&["--kv-policy", "retro", "--kv-window", "2"][..], &everything].concat(), &[2, 4]),
    ];
    let prompt = prompt();
    let tp1 = start(1, settings[0].0).greedy_chat(&prompt, 32);
    assert!(tp1.split_whitespace().count() > 10, "expected text, got {tp1:?}");
    for (policy, ranks) in settings {
        for &n in ranks {
            let server = start(n, policy);
            let text = server.greedy_chat(&prompt, 32);
            assert_eq!(text, tp1, "{policy:?} at TP={n} differs from full at TP=1");
            let again = server.post_json("/v1/completions", &serde_json::json!({"model": "default", "prompt": "x", "max_tokens": 1}));
            assert_eq!(again["object"], "text_completion", "TP={n} keeps serving: {again}");
        }
    }
}

/// At a 64-token budget retro w = 4 runs on 2 ranks, each rank reports its own share (half the KV
/// heads, half the summaries and output-cache bytes of TP = 1) and reads fewer pages than full; the
/// text equals TP = 1's at the same budget (each KV head's selection needs only its own heads) and
/// is pinned by a snapshot.
#[test]
fn retro_at_a_small_budget_on_two_ranks_is_per_rank_and_pinned() {
    let policy = ["--kv-policy", "retro", "--kv-window", "4", "--kv-budget-tokens", "64", "--kv-dense-layers", "1"];
    let prompt = prompt();
    let one = start(1, &policy);
    let tp1 = one.greedy_chat(&prompt, 48);
    let tp1_numbers = (
        metric_at(one.port, "mistralrs_kv_cache_kv_heads"),
        metric_at(one.port, "mistralrs_kv_page_summary_bytes"),
        metric_at(one.port, "mistralrs_kv_retro_output_cache_bytes"),
    );
    drop(one);
    assert_eq!(tp1_numbers.0, tp_model::KV_HEADS as f64);

    let two = start(2, &policy);
    let tp2 = two.greedy_chat(&prompt, 48);
    let ports: Vec<u16> = std::iter::once(two.port).chain(two.worker_ports.iter().copied()).collect();
    for (rank, &port) in ports.iter().enumerate() {
        let (_, text) = http_request(port, "GET", "/metrics", None);
        assert!(text.contains(&format!("mistralrs_tp_info{{backend=\"ring\",rank=\"{rank}\",world_size=\"2\"}} 1")), "rank {rank}:\n{text}");
        assert_eq!(metric_at(port, "mistralrs_kv_cache_kv_heads"), (tp_model::KV_HEADS / 2) as f64, "rank {rank}");
        assert_eq!(metric_at(port, "mistralrs_kv_page_summary_bytes") * 2.0, tp1_numbers.1, "rank {rank}: summaries");
        let cache = metric_at(port, "mistralrs_kv_retro_output_cache_bytes");
        assert!((cache * 2.0 - tp1_numbers.2).abs() <= 0.05 * tp1_numbers.2, "rank {rank}: output cache {cache} vs TP=1 {}", tp1_numbers.2);
        let (loaded, all) = (metric_at(port, "mistralrs_kv_pages_loaded_total"), metric_at(port, "mistralrs_kv_pages_full_total"));
        assert!(loaded > 0.0 && loaded < 0.5 * all, "rank {rank}: read {loaded} of {all} pages");
        // A worker frees the sequence on its own step after rank 0 answered: give it a moment.
        let back = (0..50).any(|_| {
            let idle = metric_at(port, "mistralrs_kv_retro_output_cache_blocks_in_use") == 0.0;
            if !idle {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            idle
        });
        assert!(back, "rank {rank}: output-cache block not returned");
        // Supplements are counted for finished sequences, so only once the block is back.
        assert!(metric_at(port, "mistralrs_kv_retro_supplement_pages_total") > 0.0, "rank {rank}: no supplements");
    }
    assert_eq!(tp2, tp1, "retro at a 64-token budget: TP=2 differs from TP=1");
    insta::assert_snapshot!("tp2_retro_w4_budget64", tp2);
}

/// A ring build without RING_CONFIG, RING_CONFIG in a normal build, a GGUF model and a bad ring file
/// each stop the server before it loads anything, with an error that names the problem.
#[test]
fn misconfigured_tensor_parallelism_fails_fast_and_says_why() {
    let ring = workspace_root().join("target/ring/mistralrs-server");
    let dir = workspace_root().join("target/tp");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad-ring.json");
    std::fs::write(&bad, r#"{"rank":0,"world_size":3,"master_port":29400,"port":29401,"right_port":29402}"#).unwrap();
    let good = dir.join("rank0-ring.json");
    std::fs::write(&good, r#"{"rank":0,"world_size":2,"master_port":29400,"port":29401,"right_port":29402}"#).unwrap();
    let model = model();
    let gguf = common::smollm2_gguf();
    let cases: [(&std::path::Path, Option<&std::path::Path>, &str, &str); 4] = [
        (&ring, None, &model, "set RING_CONFIG"),
        (&common::server_exe(), Some(&good), &model, "RING_CONFIG is set, but this mistralrs-server has no tensor parallelism"),
        (&ring, Some(&bad), &model, "world_size 3"),
        (&ring, Some(&good), gguf.to_str().unwrap(), "does not shard GGUF models"),
    ];
    for (exe, config, model, needle) in cases {
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["--model", model, "--cpu", "--port", "0"]).env_remove("RING_CONFIG");
        if let Some(config) = config {
            cmd.env("RING_CONFIG", config);
        }
        let out = cmd.output().expect("run mistralrs-server");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{exe:?} {config:?}: {text}");
        assert!(text.contains(needle), "{exe:?} {config:?}: expected {needle:?} in:\n{text}");
    }
}
