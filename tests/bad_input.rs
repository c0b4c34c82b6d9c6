//! Bad requests get a clear 4xx naming what is wrong, never a 5xx, a panic or a hang, and the server
//! keeps serving (the checks: `mistralrs-retro/src/server/validate.rs`; bad flags and config values
//! are tested in `tests/server.rs` and `tests/policies.rs`).

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::{http_request_raw, smollm2_dir, Server};
use serde_json::{json, Value};

#[test]
fn bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving() {
    let model = smollm2_dir();
    let server = Server::start(&[
        "--model", model.to_str().unwrap(), "--cpu", "--pa-block-size", "16", "--kv-policy", "retro", "--pa-context-len", "2048",
    ]);
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": "hi"}]);
    let with = |extra: Value| {
        let mut body = json!({"model": "default", "messages": user, "max_tokens": 4});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    // (what, path, raw body, a substring the error must contain)
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("malformed JSON", chat, "{\"model\": \"default\", \"messages\": [".into(), "JSON"),
        ("wrong type", chat, with(json!({"temperature": "hot"})).to_string(), "temperature"),
        ("empty messages", chat, json!({"model": "default", "messages": []}).to_string(), "messages"),
        ("unknown role", chat, json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), "wizard"),
        ("max_tokens 0", chat, with(json!({"max_tokens": 0})).to_string(), "max_tokens"),
        ("max_tokens negative", chat, with(json!({"max_tokens": -5})).to_string(), "max_tokens"),
        ("temperature out of range", chat, with(json!({"temperature": -1.0})).to_string(), "temperature"),
        ("top_p out of range", chat, with(json!({"top_p": 7})).to_string(), "top_p"),
        ("unknown model", chat, with(json!({"model": "gpt-17"})).to_string(), "gpt-17"),
        ("empty prompt", "/v1/completions", json!({"model": "default", "prompt": "", "max_tokens": 4}).to_string(), "empty"),
        ("over-long prompt", "/v1/completions", json!({"prompt": "word ".repeat(5000), "max_tokens": 4}).to_string(), "2048"),
    ];
    for (what, path, body, needle) in &cases {
        let (status, text) = http_request_raw(server.port, "POST", path, body);
        assert!((400..500).contains(&status), "{what}: status {status}: {text}");
        assert!(text.contains(needle), "{what}: the message does not name `{needle}`: {text}");
    }
    // Garbage that is not HTTP, and a connection dropped mid-body.
    for junk in ["\x16\x03\x01 not http at all\r\n\r\n", "POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pro"] {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.write_all(junk.as_bytes()).unwrap();
    }
    // A huge max_tokens is clamped by the end of the answer or the context, not an error.
    let huge = server.post_json(chat, &with(json!({"max_tokens": 1_000_000_000_000u64, "temperature": 0.0})));
    assert!(huge["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()));
    assert!(!server.greedy_chat("Say hello.", 4).is_empty(), "the server stopped serving");
    let log = server.log_lines().join("\n");
    assert!(!log.contains("panicked"), "{log}");
    let (_, metrics) = server.request("GET", "/metrics", None);
    assert!(metrics.contains("mistralrs_http_requests_total{path=\"/v1/chat/completions\",status=\"400\"}"), "{metrics}");
}
