//! CPU prefill and decode on real GGUF models, our server (`--cpu --kv-policy full`) against llama.cpp
//! (llama-cpp-python, pinned below, driven by scripts/bench/llama_cpp_driver.py): Qwen2.5-Coder-1.5B
//! and -0.5B Q4_K_M and SmolLM2-135M Q4_1, at about 512 and 2K prompt tokens; and the embedded default
//! (SmolLM2 f32 safetensors) under each --dtype, against its memory floor.
//!
//! `cargo bench -p mistralrs-retro --bench cpu_models` after `scripts/fetch-model.sh NAME` for each
//! model (a missing one is skipped) and scripts/fetch-text.sh. CPU_MODELS=name,name and
//! CPU_MODELS_CONTEXTS=512,2048 select. The first run installs llama-cpp-python into
//! target/bench-venv (pip builds llama.cpp from source: minutes). Both engines stay loaded side by
//! side, the same prompt goes to each in alternating order, and a cell is the best of its runs.
//! Prefill: prompt tokens / prompt time; decode: steps after the first token / their time (ours from
//! the usage report, (completion_tokens - 1) / total_completion_time_sec). Rows go to
//! docs/results/cpu_models.json (this run only).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../kernels/benches/support/bandwidth.rs"]
mod bandwidth;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::{workspace_root, Server};
use serde_json::{json, Value};

const LLAMA_CPP_PYTHON: &str = "0.3.36";
const NEW_TOKENS: usize = 32;
const REPEATS: usize = 3;
const N_BATCH: usize = 512;
/// Characters of the Verne passage per ten tokens, about, for all three tokenizers (the real counts
/// are reported).
const CHARS_PER_TEN_TOKENS: usize = 43;

/// (name for scripts/fetch-model.sh, file under the workspace root)
const MODELS: [(&str, &str); 3] = [
    ("qwen2.5-coder-1.5b", "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    ("qwen2.5-coder-0.5b", "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ("smollm2-135m-q4_1", "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
];

/// The embedded default (SmolLM2-135M-Instruct, f32 safetensors) as `mistralrs-server` runs it
/// with each `--dtype`, and f16 under upstream's linear layers (the path before ours); our server
/// only (llama.cpp does not read safetensors). Name in CPU_MODELS: `smollm2-135m-embedded`.
const EMBEDDED: &str = "smollm2-135m-embedded";
const EMBEDDED_CONFIGS: [(&str, &[&str]); 4] = [
    ("--dtype auto", &["--dtype", "auto"]),
    ("--dtype f16", &["--dtype", "f16"]),
    ("--dtype f32", &["--dtype", "f32"]),
    ("--dtype f16 --cpu-linear upstream", &["--dtype", "f16", "--cpu-linear", "upstream"]),
];
/// SmolLM2-135M's parameters (the tied LM head reads the embedding matrix at every step).
const EMBEDDED_PARAMS: f64 = 134.5e6;

/// About `tokens` tokens of Verne's "In the year 2889" (scripts/fetch-text.sh) with a task.
fn prompt(tokens: usize) -> String {
    let path = workspace_root().join("models/text/in_the_year_2889.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} is missing: run scripts/fetch-text.sh", path.display()));
    let head = "Read this passage and summarize what it describes.\n\n";
    let tail = "\n\nSummary:";
    let text = &text[text.find("Little though they seem to think of it").expect("passage start")..];
    let want = (tokens * CHARS_PER_TEN_TOKENS / 10).saturating_sub(head.len() + tail.len());
    assert!(want < text.chars().count(), "{} is too short for {tokens} tokens", path.display());
    let mut excerpt: String = text.chars().take(want).collect();
    if let Some(cut) = excerpt.rfind(char::is_whitespace) {
        excerpt.truncate(cut);
    }
    format!("{head}{excerpt}{tail}")
}

/// The bench venv's python with llama-cpp-python==LLAMA_CPP_PYTHON, installed on first use.
fn llama_python() -> PathBuf {
    let venv = workspace_root().join("target/bench-venv");
    let python = venv.join("bin/python");
    let check = format!("import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '{LLAMA_CPP_PYTHON}')");
    let installed = |py: &Path| Command::new(py).args(["-c", &check]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if python.exists() && installed(&python) {
        return python;
    }
    if !python.exists() {
        println!("creating the bench venv {}", venv.display());
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success());
        assert!(ok, "python3 -m venv {} failed", venv.display());
    }
    println!(
        "installing llama-cpp-python=={LLAMA_CPP_PYTHON} into {}: pip builds llama.cpp from source (about 10-15 minutes on 2 cores)",
        venv.display()
    );
    let ok = Command::new(&python)
        .args(["-m", "pip", "install", "--disable-pip-version-check", &format!("llama-cpp-python=={LLAMA_CPP_PYTHON}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok && installed(&python), "pip install llama-cpp-python=={LLAMA_CPP_PYTHON} failed (see above)");
    python
}

/// One run's (prompt tokens, prefill tok/s, decode tok/s).
type Sample = (u64, f64, f64);

struct Llama {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Llama {
    fn start(python: &Path, model: &Path, threads: usize, n_ctx: usize) -> Llama {
        let driver = workspace_root().join("scripts/bench/llama_cpp_driver.py");
        let flash = std::env::var("CPU_MODELS_LLAMA_FLASH_ATTN").unwrap_or_else(|_| "1".into());
        let mut child = Command::new(python)
            .arg(driver)
            .args(["--model", model.to_str().unwrap(), "--threads", &threads.to_string(), "--ctx", &n_ctx.to_string()])
            .args(["--batch", &N_BATCH.to_string(), "--flash-attn", &flash])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start the llama.cpp driver");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut llama = Llama { child, stdin, stdout };
        let ready = llama.read();
        println!("llama.cpp driver ready: {ready}");
        llama
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading the llama.cpp driver");
        assert!(!line.is_empty(), "the llama.cpp driver exited (see its stderr above)");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON from the llama.cpp driver: {e}: {line}"))
    }

    fn run(&mut self, prompt: &str) -> Sample {
        let req = json!({"prompt": prompt, "max_tokens": NEW_TOKENS});
        writeln!(self.stdin, "{req}").and_then(|_| self.stdin.flush()).expect("writing to the llama.cpp driver");
        let v = self.read();
        let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        (f("prompt_tokens") as u64, f("prefill_tok_s"), f("decode_tok_s"))
    }
}

impl Drop for Llama {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_ours(server: &Server, prompt: &str) -> Sample {
    let v = server.post_json(
        "/v1/completions",
        &json!({"model": "default", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0}),
    );
    let u = &v["usage"];
    let f = |k: &str| u[k].as_f64().unwrap_or_else(|| panic!("usage.{k} missing: {v}"));
    let steps = f("completion_tokens") - 1.0;
    assert!(steps >= 1.0, "only {} token(s) generated: {v}", f("completion_tokens"));
    (f("prompt_tokens") as u64, f("prompt_tokens") / f("total_prompt_time_sec"), steps / f("total_completion_time_sec"))
}

fn best(samples: &[Sample]) -> Sample {
    samples.iter().fold((0, 0.0, 0.0), |b, s| (s.0, b.1.max(s.1), b.2.max(s.2)))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let contexts: Vec<usize> = std::env::var("CPU_MODELS_CONTEXTS")
        .unwrap_or_else(|_| "512,2048".into())
        .split(',')
        .map(|c| c.trim().parse().expect("CPU_MODELS_CONTEXTS: comma-separated token counts"))
        .collect();
    let names: Vec<String> = match std::env::var("CPU_MODELS") {
        Ok(list) => list.split(',').map(|n| n.trim().to_string()).collect(),
        Err(_) => MODELS.iter().map(|m| m.0.to_string()).chain([EMBEDDED.to_string()]).collect(),
    };
    let root = workspace_root();
    let mut models = Vec::new();
    for name in names.iter().filter(|n| *n != EMBEDDED) {
        let (_, file) = MODELS
            .iter()
            .find(|m| m.0 == name)
            .unwrap_or_else(|| panic!("CPU_MODELS: unknown model {name}; known: {:?} and {EMBEDDED}", MODELS.map(|m| m.0)));
        let path = root.join(file);
        if path.is_file() {
            models.push((name.clone(), path));
        } else {
            println!("skipping {name}: {} is missing: run scripts/fetch-model.sh {name}", path.display());
        }
    }
    let embedded = names.iter().any(|n| n == EMBEDDED);
    if models.is_empty() && !embedded {
        println!("no model to run");
        return;
    }
    let python = if models.is_empty() { PathBuf::new() } else { llama_python() };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Room for the longest prompt and its new tokens, the same KV size for both engines.
    let n_ctx = (2 * contexts.iter().max().unwrap()).max(1024);
    let prompts: Vec<String> = contexts.iter().map(|&c| prompt(c)).collect();
    println!("{threads} threads, n_ctx {n_ctx}, n_batch {N_BATCH}, {NEW_TOKENS} new tokens, best of {REPEATS}");

    let mut rows = Vec::new();
    let mut table = Vec::new();
    for (name, path) in &models {
        let file = path.to_str().unwrap();
        println!("{name}: starting our server and llama.cpp on {file}");
        let ctx = n_ctx.to_string();
        let server = Server::start(&[
            "--model", file, "--cpu", "--kv-policy", "full", "--no-prefix-cache", "--max-seqs", "1", "--pa-context-len", &ctx,
        ]);
        let mut llama = Llama::start(&python, path, threads, n_ctx);
        for (&target, prompt) in contexts.iter().zip(&prompts) {
            // A warm-up run each (page faults, lazy allocations), then alternate which engine goes first.
            run_ours(&server, prompt);
            llama.run(prompt);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for rep in 0..REPEATS {
                if rep % 2 == 0 {
                    ours.push(run_ours(&server, prompt));
                    theirs.push(llama.run(prompt));
                } else {
                    theirs.push(llama.run(prompt));
                    ours.push(run_ours(&server, prompt));
                }
                let (o, l) = (ours.last().unwrap(), theirs.last().unwrap());
                println!(
                    "  {name} ~{target}: run {}: ours {} tokens {:.1} / {:.2} tok/s, llama.cpp {} tokens {:.1} / {:.2} tok/s",
                    rep + 1, o.0, o.1, o.2, l.0, l.1, l.2
                );
            }
            let (o, l) = (best(&ours), best(&theirs));
            for (engine, s) in [("ours", o), ("llama.cpp", l)] {
                rows.push(json!({
                    "model": name, "engine": engine, "context": target, "prompt_tokens": s.0,
                    "prefill_tok_s": s.1, "decode_tok_s": s.2,
                }));
            }
            table.push(format!(
                "| {name} | {target} | {} / {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
                o.0, l.0, o.1, l.1, o.1 / l.1, o.2, l.2, o.2 / l.2
            ));
        }
    }
    let mut embedded_table = Vec::new();
    if embedded {
        run_embedded(&contexts, &prompts, n_ctx, &mut rows, &mut embedded_table);
    }
    println!();
    println!("| model | context | prompt tokens (ours / llama.cpp) | prefill ours | prefill llama.cpp | ratio | decode ours | decode llama.cpp | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for line in &table {
        println!("{line}");
    }
    if !embedded_table.is_empty() {
        println!();
        println!("| embedded default | context | prefill tok/s | decode tok/s | decode floor tok/s | of floor |");
        println!("|---|---:|---:|---:|---:|---:|");
        for line in &embedded_table {
            println!("{line}");
        }
    }
    let out = root.join("docs/results/cpu_models.json");
    std::fs::write(&out, serde_json::to_string_pretty(&rows).unwrap() + "\n").unwrap();
    println!("(tok/s, best of {REPEATS}; ratio = ours / llama.cpp)\nwrote {}", out.display());
}

/// The embedded default's configurations side by side, each request in turn; decode floor: the
/// weights (2 or 4 bytes per parameter) at this run's copy bandwidth.
fn run_embedded(contexts: &[usize], prompts: &[String], n_ctx: usize, rows: &mut Vec<Value>, table: &mut Vec<String>) {
    let bandwidth = bandwidth::copy_bandwidth();
    println!("{EMBEDDED}: copy bandwidth {:.1} GB/s (read + write)", bandwidth / 1e9);
    let ctx = n_ctx.to_string();
    let servers: Vec<Server> = EMBEDDED_CONFIGS
        .iter()
        .map(|(_, flags)| {
            let mut args = vec!["--cpu", "--kv-policy", "full", "--no-prefix-cache", "--max-seqs", "1", "--pa-context-len", &ctx];
            args.extend_from_slice(flags);
            Server::start(&args)
        })
        .collect();
    for (&target, prompt) in contexts.iter().zip(prompts) {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); servers.len()];
        for server in &servers {
            run_ours(server, prompt);
        }
        for rep in 0..REPEATS {
            for i in 0..servers.len() {
                let i = (i + rep) % servers.len();
                samples[i].push(run_ours(&servers[i], prompt));
            }
        }
        for ((config, flags), samples) in EMBEDDED_CONFIGS.iter().zip(&samples) {
            let s = best(samples);
            // `auto` runs f16 on CPU (the server's log says so); f32 reads twice the bytes.
            let bytes = EMBEDDED_PARAMS * if flags.contains(&"f32") { 4.0 } else { 2.0 };
            let floor = bandwidth / bytes;
            println!("  {EMBEDDED} {config} ~{target}: {} tokens {:.1} / {:.2} tok/s (floor {floor:.1})", s.0, s.1, s.2);
            rows.push(json!({
                "model": EMBEDDED, "engine": "ours", "config": config, "context": target, "prompt_tokens": s.0,
                "prefill_tok_s": s.1, "decode_tok_s": s.2, "decode_floor_tok_s": floor,
            }));
            table.push(format!("| {config} | {target} | {:.1} | {:.2} | {floor:.1} | {:.0}% |", s.1, s.2, 100.0 * s.2 / floor));
        }
    }
}
