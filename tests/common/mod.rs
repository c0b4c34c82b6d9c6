//! Helpers shared by the integration tests: start `mistralrs-server` on a free loopback port, talk
//! HTTP/1.1 to it with nothing but std, and stop it.
#![allow(dead_code)]

pub mod tp_model;
pub mod zoo;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use serde_json::Value;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn server_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mistralrs-server"))
}

/// Text of roughly `tokens` SmolLM2 tokens that does not repeat exactly (so nothing degenerates), for
/// the benches. SmolLM2 averages about 2.8 characters per token on these lines at 2K (fewer as the
/// numbers grow); the real count comes back in `usage`.
pub fn log_prompt(tokens: usize) -> String {
    let mut text = String::from("Here is a log of measurements.\n");
    let mut i = 0;
    while text.len() < tokens * 28 / 10 - 60 {
        text.push_str(&format!("Reading {i}: sensor {} reports {} units.\n", i % 7, (i * 37) % 101));
        i += 1;
    }
    text.push_str("Summarize the log:");
    text
}

/// About 1.4K tokens of Verne's "In the year 2889" (public domain, from reasoning-gym), and a task.
pub fn long_prompt() -> String {
    let text = std::fs::read_to_string(workspace_root().join("models/text/in_the_year_2889.txt"))
        .expect("run scripts/fetch-text.sh");
    let start = text.find("Little though they seem to think of it").expect("passage start");
    let excerpt: String = text[start..].chars().take(6000).collect();
    format!("Read this passage and summarize what it describes.\n\n{excerpt}")
}

/// The f32 SmolLM2 directory; `scripts/fetch-smollm2.sh` creates it (the test command runs it).
pub fn smollm2_dir() -> PathBuf {
    let dir = workspace_root().join("models/smollm2-135m-instruct-f32");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh",
        dir.display()
    );
    dir
}

pub fn smollm2_gguf() -> PathBuf {
    let file = workspace_root().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(file.is_file(), "{} is missing: run scripts/fetch-smollm2.sh", file.display());
    file
}

/// Run the server binary to completion (for arguments that must fail before serving).
pub fn run_server_expecting_exit(args: &[&str]) -> (i32, String) {
    let out = Command::new(server_exe())
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .expect("cannot run mistralrs-server");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub struct Server {
    child: Child,
    pub port: u16,
    /// Tensor-parallel worker ranks' `/metrics` ports (`scripts/serve-tp.sh`), in the order they started.
    pub worker_ports: Vec<u16>,
    /// Behind a mutex so a `&Server` can be shared by client threads.
    log: Mutex<mpsc::Receiver<String>>,
}

impl Server {
    /// Start on port 0 and wait (up to 5 minutes) for the "ready on" line that names the port.
    /// Activations and KV cache are f32 (the CPU "auto" dtype would pick a half type) unless `args`
    /// say otherwise: later flags override earlier ones.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// [`Server::start`] with extra environment variables for the server process.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_command(&[server_exe().to_str().unwrap()], args, env)
    }

    /// [`Server::start_with_env`] through `command` (program and leading arguments), which takes
    /// the server's flags after its own: e.g. `["bash", "scripts/serve-tp.sh", "2"]` starts two
    /// tensor-parallel ranks and passes the flags on.
    pub fn start_command(command: &[&str], args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(command[0])
            .args(&command[1..])
            .args(["--port", "0", "--host", "127.0.0.1", "--dtype", "f32"])
            .args(args)
            .current_dir(workspace_root())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mistralrs-server");
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let tx_err = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx_err.send(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (port_tx, port_rx) = mpsc::channel();
        let (worker_tx, worker_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("worker, metrics on http://").nth(1) {
                    let port = rest.trim_end_matches("/metrics").rsplit(':').next().and_then(|p| p.trim().parse::<u16>().ok());
                    let _ = worker_tx.send(port.expect("worker metrics port"));
                }
                if let Some(rest) = line.split("ready on http://").nth(1) {
                    let port = rest.rsplit(':').next().and_then(|p| p.trim().parse::<u16>().ok());
                    let _ = port_tx.send(port);
                }
                let _ = tx.send(line);
            }
        });
        match port_rx.recv_timeout(Duration::from_secs(300)) {
            Ok(Some(port)) => Server { child, port, worker_ports: worker_rx.try_iter().collect(), log: Mutex::new(log) },
            other => {
                let _ = child.kill();
                let lines: Vec<String> = log.try_iter().collect();
                panic!("server did not become ready ({other:?}); log:\n{}", lines.join("\n"));
            }
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().try_iter().collect()
    }

    /// One HTTP/1.1 request; returns (status, body).
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        http_request(self.port, method, path, body)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, text) = self.request("POST", path, Some(body));
        assert_eq!(status, 200, "POST {path} -> {status}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON from {path}: {e}: {text}"))
    }

    /// Greedy chat completion; returns the assistant's text.
    pub fn greedy_chat(&self, prompt: &str, max_tokens: usize) -> String {
        let body = serde_json::json!({
            "model": "default",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        });
        let v = self.post_json("/v1/chat/completions", &body);
        v["choices"][0]["message"]["content"].as_str().expect("no content").to_string()
    }

    /// Greedy raw completion; returns the text.
    pub fn greedy_completion(&self, prompt: &str, max_tokens: usize) -> String {
        let body = serde_json::json!({
            "model": "default",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
        });
        let v = self.post_json("/v1/completions", &body);
        v["choices"][0]["text"].as_str().expect("no text").to_string()
    }
}

impl Server {
    /// Sends SIGTERM (so the server's graceful shutdown runs) and waits up to `limit` for the process
    /// to exit: its exit code, or `None` if it was still running (then it is killed).
    pub fn terminate_and_wait(&mut self, limit: Duration) -> Option<i32> {
        #[cfg(unix)]
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate_and_wait(Duration::from_secs(5));
    }
}

#[cfg(unix)]
extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub fn http_request(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    http_request_raw(port, method, path, &body.map(|b| b.to_string()).unwrap_or_default())
}

/// One HTTP/1.1 request with `payload` sent as is (it need not be valid JSON); returns (status, body).
pub fn http_request_raw(port: u16, method: &str, path: &str, payload: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, String::from_utf8_lossy(&body).to_string())
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else { break };
        let size_str = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// The `data:` payloads of a server-sent-event stream, `[DONE]` included.
pub fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.trim().to_string())
        .collect()
}
