//! End-to-end tests of `mistralrs-server` on the embedded SmolLM2-135M-Instruct (f32).

mod common;

use common::{run_server_expecting_exit, smollm2_dir, sse_events, Server};
use serde_json::{json, Value};

/// Fixed prompts for the equality and snapshot tests: chat, code, and a long-ish instruction.
const PROMPTS: [&str; 3] = [
    "What is the capital of France? Answer in one sentence, then name two famous landmarks there.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain in simple words why the sky is blue. Use at least three sentences and mention sunlight.",
];
const NEW_TOKENS: usize = 64;

fn greedy_outputs(extra_args: &[&str]) -> Vec<String> {
    let model = smollm2_dir();
    let mut args = vec!["--model", model.to_str().unwrap(), "--cpu"];
    args.extend_from_slice(extra_args);
    let server = Server::start(&args);
    PROMPTS.iter().map(|p| server.greedy_chat(p, NEW_TOKENS)).collect()
}

/// CPU paged attention with `--kv-policy full` must give exactly the greedy text of upstream's eager
/// (non-paged) CPU path: both computed here, nothing hard-coded.
#[test]
fn paged_full_matches_upstream_eager() {
    let eager = greedy_outputs(&["--no-paged-attn"]);
    let paged = greedy_outputs(&["--kv-policy", "full", "--pa-block-size", "16"]);
    for (i, (e, p)) in eager.iter().zip(&paged).enumerate() {
        assert!(!e.trim().is_empty(), "eager output {i} is empty");
        assert_eq!(e, p, "prompt {i}: paged `full` diverged from upstream eager");
    }
    insta::assert_json_snapshot!("full_policy_greedy_outputs", paged);
}

#[test]
fn http_api_is_well_formed() {
    let model = smollm2_dir();
    let server = Server::start(&["--model", model.to_str().unwrap(), "--cpu", "--kv-policy", "full"]);
    let startup = server.log_lines().join("\n");
    assert!(
        startup.contains("kv-policy=full"),
        "startup log does not name the policy:\n{startup}"
    );
    // The fixture carries the model card's sampling settings, applied to requests that set none.
    assert!(
        startup.contains("get the model's generation_config.json: temperature 0.2, top_p 0.9"),
        "startup log does not name the sampling defaults:\n{startup}"
    );

    let (status, models) = server.request("GET", "/v1/models", None);
    assert_eq!(status, 200, "{models}");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert!(!models["data"].as_array().unwrap().is_empty(), "{models}");
    assert!(models["data"][0]["id"].as_str().is_some_and(|id| !id.is_empty()));

    let chat = server.post_json(
        "/v1/chat/completions",
        &json!({"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}),
    );
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert!(!chat["choices"][0]["message"]["content"].as_str().unwrap().trim().is_empty());
    assert!(chat["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let (status, body) = server.request(
        "POST",
        "/v1/chat/completions",
        Some(&json!({"model": "default", "stream": true, "max_tokens": 16,
                     "messages": [{"role": "user", "content": "Count to five."}]})),
    );
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {body}");
    let mut streamed = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap_or_else(|e| panic!("bad chunk {event}: {e}"));
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(text);
        }
    }
    assert!(!streamed.trim().is_empty(), "streamed no text: {body}");

    let completion = server.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0}),
    );
    assert_eq!(completion["object"], "text_completion");
    assert!(completion["choices"][0]["text"].as_str().unwrap().contains("Paris"), "{completion}");
}

/// Each bad flag exits non-zero before serving, with a message naming the flag and the value.
#[test]
fn bad_flags_exit_nonzero_with_a_message() {
    let model = smollm2_dir();
    let model = model.to_str().unwrap();
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--kv-policy", "sparse", "--model", model], &["--kv-policy", "sparse", "full"]),
        (&["--shutdown-timeout", "soon", "--model", model], &["--shutdown-timeout", "soon"]),
        (&["--model", "/nonexistent/model.gguf"], &["--model", "/nonexistent/model.gguf", "no such file"]),
        (&["--pa-block-size", "7", "--model", model], &["--pa-block-size", "7", "[8, 16, 32]"]),
        (&["--max-seqs", "0", "--model", model], &["--max-seqs"]),
    ];
    for (args, needles) in cases {
        let (code, text) = run_server_expecting_exit(args);
        assert_ne!(code, 0, "{args:?} exited 0:\n{text}");
        assert!(!text.contains("panicked"), "{args:?} panicked:\n{text}");
        for needle in needles {
            assert!(text.contains(needle), "{args:?}: message does not mention `{needle}`:\n{text}");
        }
    }
}
