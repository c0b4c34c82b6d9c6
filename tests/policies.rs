//! The sparse policies end to end on the embedded SmolLM2 (f32, CPU paged attention).

mod common;

use common::{run_server_expecting_exit, smollm2_dir, workspace_root, Server};

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

/// About 1.4K tokens of Verne's "In the year 2889" (public domain, from reasoning-gym), and a task.
fn long_prompt() -> String {
    let text = std::fs::read_to_string(workspace_root().join("models/text/in_the_year_2889.txt"))
        .expect("run scripts/fetch-text.sh");
    let start = text.find("Little though they seem to think of it").expect("passage start");
    let excerpt: String = text[start..].chars().take(6000).collect();
    format!("Read this passage and summarize what it describes.\n\n{excerpt}")
}

/// Oracle (a) end to end: with a budget that covers the whole context, quest's plan selects every
/// page and its kernel must reproduce `full` token for token.
#[test]
fn quest_with_budget_over_context_equals_full() {
    let prompts: Vec<String> = PROMPTS.iter().map(|s| s.to_string()).collect();
    let full = greedy_chats(&["--kv-policy", "full"], &prompts, 128);
    let quest = greedy_chats(&["--kv-policy", "quest", "--kv-budget-tokens", "100000", "--kv-dense-layers", "0"], &prompts, 128);
    assert_eq!(full, quest);
}

/// At a 256-token budget over a ~1.4K-token prompt, quest runs, reads fewer pages than full, and its
/// output is pinned (read the snapshot: it must be fluent text).
#[test]
fn quest_small_budget_runs_and_is_pinned() {
    let prompts = vec![long_prompt()];
    let full = greedy_chats(&["--kv-policy", "full"], &prompts, 64);
    let quest = greedy_chats(&["--kv-policy", "quest", "--kv-budget-tokens", "256"], &prompts, 64);
    assert!(!quest[0].trim().is_empty());
    println!("full : {:?}\nquest: {:?}", full[0], quest[0]);
    insta::assert_json_snapshot!("quest_budget256_long_prompt", serde_json::json!({"full": full[0], "quest": quest[0]}));
}

#[test]
fn bad_policy_config_values_exit_nonzero_naming_them() {
    let dir = std::env::temp_dir().join(format!("retro-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = smollm2_dir();
    let model = model.to_str().unwrap();
    let cases: [(&str, &[&str]); 4] = [
        ("[kv_policy]\npolicy = \"quest\"\nwindow = 0\n", &["window", "0"]),
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
    let (code, out) = run_server_expecting_exit(&["--model", model, "--kv-window", "0"]);
    assert_ne!(code, 0);
    assert!(out.contains("window") && out.contains('0'), "{out}");
}
