//! Graceful shutdown: on SIGTERM the server stops accepting connections, lets requests in flight
//! finish until `--shutdown-timeout`, then ends the rest (a stream with an error event and
//! `[DONE]`) and exits with code 0.

mod common;

use std::time::{Duration, Instant};

use common::{http_request, smollm2_dir, sse_events, Server};
use serde_json::{json, Value};

/// What a SIGTERM during one greedy stream of `max_tokens` did, with `--shutdown-timeout` `deadline_s`.
struct Stopped {
    exit_code: Option<i32>,
    /// From SIGTERM to the exit.
    took: Duration,
    port: u16,
    /// The stream's events; the last is `[DONE]`.
    events: Vec<String>,
}

impl Stopped {
    fn during_stream(policy: &str, max_tokens: usize, deadline_s: u64) -> Stopped {
        let model = smollm2_dir();
        let deadline = deadline_s.to_string();
        let mut server = Server::start(&["--model", model.to_str().unwrap(), "--cpu", "--kv-policy", policy, "--shutdown-timeout", &deadline]);
        let port = server.port;
        // Counting gives a long greedy answer, so the stream is still running at the signal.
        let body = json!({"model": "default", "stream": true, "max_tokens": max_tokens, "temperature": 0,
                          "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]});
        let stream = std::thread::spawn(move || http_request(port, "POST", "/v1/chat/completions", Some(&body)));
        std::thread::sleep(Duration::from_millis(1500));
        let start = Instant::now();
        let exit_code = server.terminate_and_wait(Duration::from_secs(deadline_s + 30));
        let took = start.elapsed();
        let (status, raw) = stream.join().unwrap();
        assert_eq!(status, 200, "{raw}");
        let events = sse_events(&raw);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the stream ends with [DONE]: {raw}");
        Stopped { exit_code, took, port, events }
    }

    /// The event before `[DONE]`.
    fn last_event(&self) -> Value {
        serde_json::from_str(&self.events[self.events.len() - 2]).expect("a JSON event before [DONE]")
    }
}

#[test]
fn sigterm_ends_a_long_stream_with_an_error_event_and_exits_zero() {
    let stopped = Stopped::during_stream("retro", 4000, 2);
    assert_eq!(stopped.exit_code, Some(0), "exit code after SIGTERM");
    assert!(stopped.took >= Duration::from_secs(2), "exited after {:?}, before the 2 s deadline", stopped.took);
    assert!(stopped.events.len() >= 3, "some text streamed before the deadline: {:?}", stopped.events);
    let last = stopped.last_event();
    assert_eq!(last["error"]["type"], "internal_error", "the stream cut at the deadline says so: {last}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", stopped.port)).is_err(), "the port still accepts connections");
}

#[test]
fn sigterm_lets_a_short_request_finish() {
    let stopped = Stopped::during_stream("full", 48, 60);
    assert_eq!(stopped.exit_code, Some(0), "exit code after SIGTERM");
    let last = stopped.last_event();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "the request in flight finished normally: {last}");
}
