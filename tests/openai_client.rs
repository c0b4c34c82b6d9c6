//! A real client: the official `openai` Python package (installed by scripts/fetch-openai-client.sh)
//! drives chat, completions and streaming against `mistralrs-server --kv-policy retro`.

mod common;

use std::process::Command;

use common::{smollm2_dir, workspace_root, Server};

#[test]
fn the_official_openai_python_client_works() {
    let python = workspace_root().join(".venv/bin/python");
    assert!(python.exists(), "run scripts/setup.sh (it installs the openai client into .venv)");
    let model = smollm2_dir();
    let server = Server::start(&["--model", model.to_str().unwrap(), "--cpu", "--pa-block-size", "16", "--kv-policy", "retro"]);
    let out = Command::new(python)
        .arg(workspace_root().join("tests/clients/openai_client.py"))
        .arg(format!("http://127.0.0.1:{}/v1", server.port))
        .output()
        .expect("run the openai client script");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai client failed:\n{text}");
    assert!(text.contains("ok: models"), "{text}");
}
