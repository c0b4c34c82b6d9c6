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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusals_name_the_field_and_the_value() {
        let limits = RequestLimits { model_ids: vec!["m".into()], max_sequence_tokens: 100, tokenizer: None };
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
}
