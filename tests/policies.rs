//! The sparse policies end to end on the embedded SmolLM2 (f32, CPU paged attention).

mod common;

use common::{long_prompt, run_server_expecting_exit, smollm2_dir, Server};

const PROMPTS: [&str; 3] = [
    "What is the capital of France? Answer in one sentence, then name two famous landmarks there.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain in simple words why the sky is blue. Use at least three sentences and mention sunlight.",
];

fn model_args() -> Vec<String> {
    vec!["--model".into(), smollm2_dir().to_str().unwrap().into(), "--cpu".into(), "--pa-block-size".into(), "16".into()]
}

fn greedy_chats(policy_args: &[&str], prompts: &[String], max_tokens: usize) -> Vec<String> {
    let mut args = model_args();
    args.extend(policy_args.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    prompts.iter().map(|p| server.greedy_chat(p, max_tokens)).collect()
}

/// Oracle (a) end to end: with a budget that covers the whole context, every page is selected and
/// quest and retro (w = 2 and 4, whose older rows are replayed and rewrite their K/V) must
/// reproduce `full` token for token.
#[test]
fn sparse_policies_with_budget_over_context_equal_full() {
    let prompts: Vec<String> = PROMPTS.iter().map(|s| s.to_string()).collect();
    let full = greedy_chats(&["--kv-policy", "full"], &prompts, 128);
    let everything = ["--kv-budget-tokens", "100000", "--kv-dense-layers", "0"];
    let quest = greedy_chats(&[&["--kv-policy", "quest"][..], &everything].concat(), &prompts, 128);
    assert_eq!(full, quest, "quest");
    for window in ["2", "4"] {
        let retro = greedy_chats(&[&["--kv-policy", "retro", "--kv-window", window][..], &everything].concat(), &prompts, 128);
        assert_eq!(full, retro, "retro w={window}");
    }
    // Refresh steps (a dense replay of the last N tokens every N steps) rewrite K/V that already are
    // full attention's here: the text must not change, with or without a window.
    for (window, every) in [("1", "3"), ("2", "5")] {
        let refresh = ["--kv-policy", "retro", "--kv-window", window, "--kv-refresh-every", every];
        let retro = greedy_chats(&[&refresh[..], &everything].concat(), &prompts, 128);
        assert_eq!(full, retro, "retro w={window} refresh_every={every}");
    }
}

/// Oracle (c) end to end: retro with w = 1 is quest, at a budget small enough that quest differs
/// from full (so the equality says something).
#[test]
fn retro_with_window_one_equals_quest() {
    let prompts: Vec<String> = PROMPTS.iter().map(|s| s.to_string()).collect();
    let budget = ["--kv-budget-tokens", "48", "--kv-dense-layers", "1"];
    let quest = greedy_chats(&[&["--kv-policy", "quest"][..], &budget].concat(), &prompts, 128);
    let retro = greedy_chats(&[&["--kv-policy", "retro", "--kv-window", "1"][..], &budget].concat(), &prompts, 128);
    assert_eq!(quest, retro);
    let full = greedy_chats(&["--kv-policy", "full"], &prompts, 128);
    assert_ne!(full, quest, "the budget is too large to tell quest from full");
}

/// At a 256-token budget over a ~1.4K-token prompt, quest and retro run, differ from each other,
/// and their outputs are pinned (read the snapshot: fluent text, not garbage). The retro server
/// also reports its window and budget at startup and its numbers on /metrics.
#[test]
fn sparse_policies_at_a_small_budget_run_differ_and_are_pinned() {
    let prompts = vec![long_prompt()];
    let full = greedy_chats(&["--kv-policy", "full"], &prompts, 128);
    let quest = greedy_chats(&["--kv-policy", "quest", "--kv-budget-tokens", "256"], &prompts, 128);

    let mut args = model_args();
    args.extend(["--kv-policy", "retro", "--kv-budget-tokens", "256", "--kv-window", "2"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let retro = server.greedy_chat(&prompts[0], 128);
    let log = server.log_lines().join("\n");
    assert!(log.contains("kv-policy=retro budget_tokens=256 dense_layers=2 window=2 output_cache_blocks=16"), "{log}");
    // The engine frees the sequence, and files its numbers, just after the response: wait for it.
    let mut metrics = String::new();
    for _ in 0..50 {
        let (status, text) = server.request("GET", "/metrics", None);
        assert_eq!(status, 200);
        metrics = text;
        if metrics.contains("mistralrs_kv_retro_output_cache_blocks_in_use 0\n") && !metrics.contains("mistralrs_kv_retro_supplement_pages_total 0\n") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} missing: {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (loaded, all) = (value("mistralrs_kv_pages_loaded_total"), value("mistralrs_kv_pages_full_total"));
    assert!(loaded > 0.0 && loaded < 0.5 * all, "sparse layers read {loaded} of {all} pages");
    assert!(value("mistralrs_kv_retro_supplement_pages_total") > 0.0, "{metrics}");
    let exposure = value("mistralrs_kv_retro_effective_exposure");
    assert!(exposure > 1.0 && exposure < 2.0, "exposure {exposure} at w=2");
    assert_eq!(value("mistralrs_kv_retro_output_cache_blocks_in_use"), 0.0);

    for text in [&quest[0], &retro] {
        assert!(text.split_whitespace().count() > 40, "too short: {text:?}");
    }
    assert_ne!(quest[0], retro, "retro w=2 should correct quest somewhere in 128 tokens");
    println!("full : {:?}\nquest: {:?}\nretro: {:?}", full[0], quest[0], retro);
    insta::assert_json_snapshot!(
        "sparse_budget256_long_prompt",
        serde_json::json!({"full": full[0], "quest": quest[0], "retro_w2": retro})
    );
}

#[test]
fn bad_policy_config_values_exit_nonzero_naming_them() {
    let dir = std::env::temp_dir().join(format!("retro-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = smollm2_dir();
    let model = model.to_str().unwrap();
    let cases: [(&str, &[&str]); 6] = [
        ("[kv_policy]\npolicy = \"quest\"\nwindow = 0\n", &["window", "0"]),
        ("[kv_policy]\npolicy = \"retro\"\nwindow = 17\n", &["window", "17", "1..=16"]),
        ("[kv_policy]\npolicy = \"retro\"\noutput_cache_blocks = 0\n", &["output_cache_blocks", "0"]),
        ("[kv_policy]\npolicy = \"quest\"\nbudget_tokens = 0\n", &["budget_tokens", "0"]),
        ("[kv_policy]\npage_size = 32\n", &["page_size", "32", "16"]),
        ("[kv_policy]\nbudjet_tokens = 5\n", &["budjet_tokens"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, out) = run_server_expecting_exit(&["--model", model, "--pa-block-size", "16", "--kv-policy-config", path.to_str().unwrap()]);
        assert_ne!(code, 0, "{text} exited 0");
        assert!(!out.contains("panicked"), "{text}: {out}");
        for needle in *needles {
            assert!(out.contains(needle), "{text}: message lacks `{needle}`: {out}");
        }
    }
    for (flag, value) in [("--kv-window", "0"), ("--kv-output-cache-blocks", "0"), ("--kv-policy", "retr0"), ("--kv-refresh-every", "2"), ("--prompt-attention", "fast"), ("--linear-rows", "fused")] {
        let (code, out) = run_server_expecting_exit(&["--model", model, flag, value]);
        assert_ne!(code, 0, "{flag} {value} exited 0");
        let key = flag.trim_start_matches("--kv-").replace('-', "_");
        assert!((out.contains(&key) || out.contains(flag)) && out.contains(value), "{flag} {value}: {out}");
    }
}
