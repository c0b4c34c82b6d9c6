//! Request checks in front of upstream's OpenAI handlers: values upstream accepts silently (an empty
//! `messages`, `max_tokens: 0`, a temperature of −1), or answers with a 500 (an unknown model, a
//! prompt larger than the KV cache), get a 4xx that names the field, the value and what is allowed.
//! Bodies that do not parse are left to upstream, whose 400/422 messages already say why.

use axum::http::StatusCode;
use serde_json::Value;

/// What the server can serve, for the checks.
pub struct RequestLimits {
    /// Model ids a request may name besides `default`.
    pub model_ids: Vec<String>,
    /// Tokens of KV cache one sequence may use (prompt plus generation).
    pub max_sequence_tokens: usize,
    /// Counts prompt tokens when the model directory has a `tokenizer.json` (not for GGUF files).
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// The model's sampling settings, for requests that set none of them.
    pub sampling_defaults: SamplingDefaults,
}

/// The sampling settings a model directory's `generation_config.json` recommends. mistral.rs 0.8.1
/// reads that file but its OpenAI handlers never apply it, so a request without `temperature`
/// sampled at 1.0 whatever the model's authors advise (the embedded SmolLM2 then answers nonsense).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
}

impl SamplingDefaults {
    /// From `dir/generation_config.json`; none when the file is missing, unreadable or sets none.
    pub fn from_model_dir(dir: &std::path::Path) -> Self {
        let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else { return Self::default() };
        let Ok(config) = serde_json::from_str::<Value>(&text) else { return Self::default() };
        // `do_sample: false` means greedy, whatever temperature the file also names.
        if config.get("do_sample").and_then(Value::as_bool) == Some(false) {
            return Self { temperature: Some(0.0), top_p: None, top_k: None };
        }
        Self {
            temperature: config.get("temperature").and_then(Value::as_f64),
            top_p: config.get("top_p").and_then(Value::as_f64),
            top_k: config.get("top_k").and_then(Value::as_u64),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Each request field the defaults stand in for, with its default if there is one.
    fn fields(&self) -> [(&'static str, Option<Value>); 3] {
        [
            ("temperature", self.temperature.map(Value::from)),
            ("top_p", self.top_p.map(Value::from)),
            ("top_k", self.top_k.map(Value::from)),
        ]
    }

    /// Fills in the defaults when `body` (a generation request) sets none of the sampling fields
    /// (a request that sets any of them keeps its own choices); whether it did.
    pub fn apply(&self, body: &mut Value) -> bool {
        let Some(request) = body.as_object_mut() else { return false };
        let fields = self.fields();
        if self.is_empty() || fields.iter().any(|(key, _)| request.get(*key).is_some_and(|v| !v.is_null())) {
            return false;
        }
        for (key, value) in fields {
            if let Some(value) = value {
                request.insert(key.to_string(), value);
            }
        }
        true
    }
}

impl std::fmt::Display for SamplingDefaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.fields().into_iter().filter_map(|(key, value)| value.map(|v| format!("{key} {v}"))).collect();
        write!(f, "{}", parts.join(", "))
    }
}

/// Roles the chat template understands.
const ROLES: [&str; 6] = ["system", "user", "assistant", "tool", "developer", "function"];

/// `Err((status, message))` for a request the server must refuse.
pub fn check(path: &str, body: &Value, limits: &RequestLimits) -> Result<(), (StatusCode, String)> {
    let bad = |msg: String| Err((StatusCode::BAD_REQUEST, msg));
    if let Some(model) = body.get("model").and_then(Value::as_str) {
        if model != "default" && !limits.model_ids.iter().any(|m| m == model) {
            return Err((
                StatusCode::NOT_FOUND,
                format!("`model` = \"{model}\" is not served here; use \"default\" or one of {:?}", limits.model_ids),
            ));
        }
    }
    for key in ["max_tokens", "max_completion_tokens", "n"] {
        if let Some(n) = body.get(key).and_then(Value::as_i64) {
            if n < 1 {
                return bad(format!("`{key}` = {n}: must be at least 1"));
            }
        }
    }
    if let Some(t) = body.get("temperature").and_then(Value::as_f64) {
        if !(0.0..=2.0).contains(&t) {
            return bad(format!("`temperature` = {t}: must be in [0, 2]"));
        }
    }
    if let Some(p) = body.get("top_p").and_then(Value::as_f64) {
        if !(p > 0.0 && p <= 1.0) {
            return bad(format!("`top_p` = {p}: must be in (0, 1]"));
        }
    }
    let mut text = String::new();
    if path == "/v1/chat/completions" {
        let Some(messages) = body.get("messages").and_then(Value::as_array) else {
            return bad("`messages` must be an array of {role, content} objects".into());
        };
        if messages.is_empty() {
            return bad("`messages` is empty: give at least one message".into());
        }
        for (i, message) in messages.iter().enumerate() {
            let role = message.get("role").and_then(Value::as_str).unwrap_or("");
            if !ROLES.contains(&role) {
                return bad(format!("`messages[{i}].role` = \"{role}\": must be one of {ROLES:?}"));
            }
            if let Some(content) = message.get("content").and_then(Value::as_str) {
                text.push_str(content);
            }
        }
    } else if let Some(prompt) = body.get("prompt").and_then(Value::as_str) {
        text.push_str(prompt);
    }
    if let Some(tokenizer) = &limits.tokenizer {
        // A lower bound (no chat template): enough to refuse prompts that can never fit.
        let tokens = tokenizer.encode(text.as_str(), false).map(|e| e.len()).unwrap_or(0);
        if tokens >= limits.max_sequence_tokens {
            return bad(format!(
                "the prompt is at least {tokens} tokens; a sequence here holds at most {} tokens of KV cache (--pa-context-len)",
                limits.max_sequence_tokens
            ));
        }
    }
    Ok(())
}

/// What [`check`] holds requests against, for the model the server loaded.
pub(super) fn request_limits(source: &super::ModelSource, max_sequence_tokens: usize, engine: &mistralrs_core::MistralRs) -> RequestLimits {
    let (tokenizer, sampling_defaults) = match source {
        super::ModelSource::SafetensorsDir(dir) => {
            (tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).ok(), SamplingDefaults::from_model_dir(dir))
        }
        _ => (None, SamplingDefaults::default()),
    };
    if !sampling_defaults.is_empty() {
        tracing::info!("requests that set none of temperature, top_p, top_k get the model's generation_config.json: {sampling_defaults}");
    }
    RequestLimits {
        model_ids: engine.list_models().unwrap_or_default(),
        max_sequence_tokens,
        tokenizer,
        sampling_defaults,
    }
}

/// Refuse bad generation requests with a 4xx naming the field (see `validate`); pass the rest on.
pub(super) async fn check_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
    limits: &RequestLimits,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = request.uri().path().to_owned();
    if request.method() != axum::http::Method::POST || !matches!(path.as_str(), "/v1/chat/completions" | "/v1/completions") {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let mut bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(bytes) => bytes,
        Err(e) => return (axum::http::StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")).into_response(),
    };
    if let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        if let Err((status, message)) = check(&path, &json, limits) {
            return (status, axum::Json(serde_json::json!({ "message": message }))).into_response();
        }
        if limits.sampling_defaults.apply(&mut json) {
            bytes = serde_json::to_vec(&json).expect("a parsed JSON value serializes").into();
            parts.headers.insert(axum::http::header::CONTENT_LENGTH, bytes.len().into());
        }
    }
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusals_name_the_field_and_the_value() {
        let limits = RequestLimits { model_ids: vec!["m".into()], max_sequence_tokens: 100, tokenizer: None, sampling_defaults: SamplingDefaults::default() };
        let chat = "/v1/chat/completions";
        let user = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"model": "x", "messages": user}), "\"x\"", 404),
            (json!({"messages": []}), "`messages` is empty", 400),
            (json!({"messages": "hi"}), "`messages` must be", 400),
            (json!({"messages": [{"role": "wizard", "content": "hi"}]}), "\"wizard\"", 400),
            (json!({"messages": user, "max_tokens": 0}), "`max_tokens` = 0", 400),
            (json!({"messages": user, "temperature": -1.0}), "`temperature` = -1", 400),
            (json!({"messages": user, "top_p": 7}), "`top_p` = 7", 400),
        ];
        for (body, needle, status) in cases {
            let (code, msg) = check(chat, &body, &limits).expect_err(&body.to_string());
            assert_eq!(code.as_u16(), status, "{body}");
            assert!(msg.contains(needle), "{body}: {msg}");
        }
        for ok in [json!({"model": "m", "messages": user, "max_tokens": 5}), json!({"model": "default", "messages": user})] {
            assert!(check(chat, &ok, &limits).is_ok(), "{ok}");
        }
    }

    #[test]
    fn sampling_defaults_fill_only_requests_that_set_no_sampling_field() {
        let dir = std::env::temp_dir().join(format!("sampling-defaults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |text: &str| std::fs::write(dir.join("generation_config.json"), text).unwrap();
        write(r#"{"eos_token_id": 2, "do_sample": true, "temperature": 0.2, "top_p": 0.9}"#);
        let d = SamplingDefaults::from_model_dir(&dir);
        assert_eq!(d, SamplingDefaults { temperature: Some(0.2), top_p: Some(0.9), top_k: None });
        assert_eq!(d.to_string(), "temperature 0.2, top_p 0.9");
        let mut body = json!({"messages": [], "max_tokens": 4});
        assert!(d.apply(&mut body));
        assert_eq!((body["temperature"].as_f64(), body["top_p"].as_f64(), body.get("top_k")), (Some(0.2), Some(0.9), None));
        // Any sampling field of the request's own keeps all of its choices, greedy included.
        for own in [json!({"temperature": 0.0}), json!({"top_p": 0.5}), json!({"top_k": 1})] {
            let mut body = own.clone();
            assert!(!d.apply(&mut body));
            assert_eq!(body, own);
        }
        // A null is no choice.
        let mut body = json!({"temperature": null});
        assert!(d.apply(&mut body));
        assert_eq!(body["temperature"].as_f64(), Some(0.2));
        write(r#"{"do_sample": false, "temperature": 0.7}"#);
        assert_eq!(SamplingDefaults::from_model_dir(&dir), SamplingDefaults { temperature: Some(0.0), top_p: None, top_k: None });
        write(r#"{"eos_token_id": 2}"#);
        let none = SamplingDefaults::from_model_dir(&dir);
        assert!(none.is_empty());
        let mut body = json!({"messages": []});
        assert!(!none.apply(&mut body));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(SamplingDefaults::from_model_dir(&dir).is_empty(), "a missing file is no defaults");
    }
}
