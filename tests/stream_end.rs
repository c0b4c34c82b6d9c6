//! Fault injection on the SSE streamers: a response channel that closes before any finish reason
//! (an engine that dropped the request) must end the stream with an error event and `[DONE]`
//! (patch mistralrs-server-core/0001), for chat and for plain completions.

mod common;

use axum::response::{IntoResponse, Sse};
use clap::Parser;
use common::{smollm2_dir, sse_events};
use mistralrs_server_core::chat_completion::ChatCompletionStreamer;
use mistralrs_server_core::completions::CompletionStreamer;
use mistralrs_server_core::streaming::DoneState;

/// The SSE body of a streamer (a struct expression of `$streamer`) whose sender is already dropped.
macro_rules! body_after_drop {
    ($streamer:ident, $state:expr) => {{
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        drop(tx);
        let streamer = $streamer {
            rx,
            done_state: DoneState::Running,
            state: $state,
            store_chunks: false,
            chunks: Vec::new(),
            on_chunk: None,
            on_done: None,
        };
        let body = Sse::new(streamer).into_response().into_body();
        let bytes = tokio::time::timeout(std::time::Duration::from_secs(30), axum::body::to_bytes(body, 1 << 20))
            .await
            .expect("the stream ends")
            .expect("a readable body");
        String::from_utf8(bytes.to_vec()).unwrap()
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_closed_without_a_finish_reason_ends_with_an_error_event_and_done() {
    let model = smollm2_dir();
    let args = mistralrs_retro::server::ServerArgs::parse_from(["mistralrs-server", "--model", model.to_str().unwrap(), "--cpu", "--kv-policy", "full"]);
    let (_, source) = args.validate().expect("valid arguments");
    let settings = args.engine_settings(&source).expect("engine settings");
    let (state, _) = mistralrs_retro::server::build_engine(&settings, None).await.expect("engine");
    let chat = body_after_drop!(ChatCompletionStreamer, state.clone());
    let completion = body_after_drop!(CompletionStreamer, state.clone());
    for (kind, raw) in [("chat", chat), ("completion", completion)] {
        let events = sse_events(&raw);
        assert_eq!(events.len(), 2, "{kind}: an error event, then [DONE]: {raw}");
        let error: serde_json::Value = serde_json::from_str(&events[0]).unwrap_or_else(|e| panic!("{kind}: {e}: {raw}"));
        assert_eq!(error["error"]["type"], "internal_error", "{kind}: {raw}");
        assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("closed")), "{kind}: {raw}");
        assert_eq!(events[1], "[DONE]", "{kind}: {raw}");
    }
}
