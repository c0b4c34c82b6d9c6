//! Graceful shutdown: on SIGTERM the server stops accepting connections, lets requests in flight
//! finish until `--shutdown-timeout`, then ends the rest (a stream with an error event and
//! `[DONE]`) and exits with code 0.

mod common;

use std::time::Duration;

use common::{http_request, smollm2_dir, sse_events, Server};
use serde_json::json;

fn stream_body(max_tokens: usize) -> serde_json::Value {
    json!({"model": "default", "stream": true, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]})
}

#[test]
fn sigterm_ends_a_long_stream_with_an_error_event_and_exits_zero() {
    let model = smollm2_dir();
    let mut server = Server::start(&["--model", model.to_str().unwrap(), "--cpu", "--kv-policy", "retro", "--shutdown-timeout", "2"]);
    let port = server.port;
    // A stream far longer than the deadline (4000 tokens at tens per second), in flight at SIGTERM.
    let long = std::thread::spawn(move || http_request(port, "POST", "/v1/chat/completions", Some(&stream_body(4000))));
    std::thread::sleep(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let code = server.terminate_and_wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "exited after {waited:?}, before the 2 s deadline");
    let (status, raw) = long.join().unwrap();
    assert_eq!(status, 200, "{raw}");
    let events = sse_events(&raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the stream ends with [DONE]: {raw}");
    assert!(events.len() >= 3, "some text streamed before the deadline: {raw}");
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("a JSON event before [DONE]");
    assert_eq!(last["error"]["type"], "internal_error", "the stream cut at the deadline says so: {last}");
    // The port no longer answers.
    let refused = std::net::TcpStream::connect(("127.0.0.1", port)).is_err();
    assert!(refused, "the server still accepts connections after exiting");
}

#[test]
fn sigterm_lets_a_short_request_finish() {
    let model = smollm2_dir();
    let mut server = Server::start(&["--model", model.to_str().unwrap(), "--cpu", "--kv-policy", "full", "--shutdown-timeout", "60"]);
    let port = server.port;
    let short = std::thread::spawn(move || http_request(port, "POST", "/v1/chat/completions", Some(&stream_body(48))));
    std::thread::sleep(Duration::from_millis(500));
    let code = server.terminate_and_wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    let (status, raw) = short.join().unwrap();
    assert_eq!(status, 200, "{raw}");
    let events = sse_events(&raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{raw}");
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("a JSON event before [DONE]");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "the request in flight finished normally: {raw}");
}
