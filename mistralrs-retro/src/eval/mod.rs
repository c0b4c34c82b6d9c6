//! The quality evaluation (`retro-eval`): does `retro` stay closer to `full` than `quest`?
//!
//! One process loads the model once and runs every configuration on the same engine and KV cache,
//! swapping the policy between runs ([`switch::SwitchPolicy`]). Per window w, the budgets of the grid
//! run as concurrent sequences of one batch, each with its own budget
//! (`SparseEngine::set_sequence_budget`); w = 1 is `quest` (retro with w = 1 is quest bit for bit,
//! oracle (c); `--check-retro-w1` runs it anyway and compares).
//!
//! 1. Teacher forcing ([`forcing::Forcer`]): a prompt of the text's first tokens, then decode steps
//!    forced to follow the text. `full` runs first and keeps its next-token distribution at every
//!    step; every other run measures per step the NLL of the text token and KL(full ‖ policy).
//! 2. Free generation ([`forcing::Greedy`]): a LongGenBench-style prompt (`longgen`), greedy:
//!    tokens agreeing with `full` up to the first divergence, and per-problem final answers.
//! 3. Effective exposure of retro's rows (docs/design.md §3.2), per sequence, from the policy.
//!
//! `docs/quality.md` describes the method and the results.

mod args;
pub mod forcing;
pub mod longgen;
pub mod oracle;
mod phase;
mod report;
pub mod switch;

pub use args::EvalArgs;
pub use report::QualityRecord;
use args::*;
use phase::*;
use report::*;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mistralrs_core::{Constraint, CustomLogitsProcessor, MistralRs, NormalRequest, Request, RequestMessage, Response, SamplingParams};
use serde::Serialize;

use crate::config::Budget;
use crate::policy::{QuestPolicy, RetroPolicy, ServedPolicy};
use crate::server::{CacheSize, EngineSettings, ModelSource, PagedCache};
use forcing::{ForcedRecord, Forcer, Greedy, Reference};
use switch::SwitchPolicy;

/// Progress on stderr: one line rewritten in place.
struct Progress {
    done: Arc<AtomicU64>,
    total: u64,
    phase: Mutex<String>,
    stop: AtomicBool,
    start: Instant,
}

impl Progress {
    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed).min(self.total);
        let frac = if self.total == 0 { 1.0 } else { done as f64 / self.total as f64 };
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 { elapsed / frac - elapsed } else { f64::NAN };
        let fmt = |s: f64| if s.is_finite() { format!("{}:{:02}", s as u64 / 60, s as u64 % 60) } else { "?".into() };
        format!(
            "\r[{}{}] {:5.1}% {done}/{} tokens  {}  elapsed {}  eta {}   ",
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0,
            self.total,
            self.phase.lock().expect("lock poisoned"),
            fmt(elapsed),
            fmt(eta)
        )
    }
}

fn spawn_ticker(progress: Arc<Progress>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !progress.stop.load(Ordering::Relaxed) {
            eprint!("{}", progress.line());
            let _ = std::io::stderr().flush();
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("{}", progress.line());
    })
}

/// Token ids of the chosen section of a Project Gutenberg text.
pub fn section_text(text: &str, section: &str) -> Result<String> {
    let start = text.find("*** START OF THE PROJECT GUTENBERG").and_then(|i| text[i..].find('\n').map(|j| i + j + 1));
    let end = text.find("*** END OF THE PROJECT GUTENBERG");
    Ok(match (section, start, end) {
        ("story", Some(s), Some(e)) => text[s..e].trim().to_string(),
        ("license", _, Some(e)) => {
            let after = text[e..].find('\n').map_or(text.len(), |j| e + j + 1);
            text[after..].trim().to_string()
        }
        ("all", _, _) => text.to_string(),
        (s, _, _) => bail!("--section {s}: expected story, license or all (and a Project Gutenberg text for the first two)"),
    })
}

/// Send one request (requests reach the engine, and get their sequence ids, in the order sent).
async fn submit(
    engine: &MistralRs,
    prompt: Vec<u32>,
    max_len: usize,
    processor: Arc<dyn CustomLogitsProcessor>,
) -> Result<tokio::sync::mpsc::Receiver<Response>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut sampling = SamplingParams::neutral();
    sampling.max_len = Some(max_len);
    let request = NormalRequest {
        messages: RequestMessage::CompletionTokens(prompt),
        sampling_params: sampling,
        response: tx,
        return_logprobs: false,
        is_streaming: false,
        id: engine.next_request_id(),
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: Some(vec![processor]),
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    };
    engine.get_sender(None)?.send(Request::Normal(Box::new(request))).await.context("engine stopped")?;
    Ok(rx)
}

/// Wait for a submitted request's final answer.
async fn finish(mut rx: tokio::sync::mpsc::Receiver<Response>) -> Result<()> {
    match rx.recv().await {
        Some(Response::CompletionDone(_)) | Some(Response::Done(_)) => Ok(()),
        Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => bail!("engine: {e}"),
        Some(Response::ModelError(e, _)) | Some(Response::CompletionModelError(e, _)) => bail!("model: {e}"),
        Some(_) => bail!("unexpected response"),
        None => bail!("engine dropped the request"),
    }
}

/// Submit one request per (prompt, max_len, processor), in order, then wait for all.
async fn run_batch(engine: &MistralRs, jobs: Vec<(Vec<u32>, usize, Arc<dyn CustomLogitsProcessor>)>) -> Result<()> {
    let mut pending = Vec::new();
    for (prompt, max_len, p) in jobs {
        pending.push(submit(engine, prompt, max_len, p).await?);
    }
    for rx in pending {
        finish(rx).await?;
    }
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn std_dev(v: &[f64]) -> Option<f64> {
    (v.len() > 1).then(|| {
        let m = mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    })
}

/// Per-segment means over decode steps 1..=n (step 0, the prefill's distribution, is excluded).
fn segments(values: &[f64], count: usize) -> Vec<f64> {
    let steps = &values[1.min(values.len())..];
    let size = steps.len() / count;
    (0..count)
        .map(|i| {
            let end = if i + 1 == count { steps.len() } else { (i + 1) * size };
            mean(&steps[i * size..end])
        })
        .collect()
}

/// Run the evaluation; returns the records (also written to `--out`).
pub async fn run(args: EvalArgs) -> Result<Vec<QualityRecord>> {
    let setup = args.setup()?;
    let started = Instant::now();
    let model = args.model.clone().unwrap_or_else(|| PathBuf::from(crate::server::EMBEDDED_MODEL_DIR));
    let name = model_name(&model);
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("docs/results/quality_{name}.json")));
    let curves = args.curves.clone().unwrap_or_else(|| PathBuf::from(format!("docs/results/quality_{name}_kl_curves.json")));
    let tokenizer = load_tokenizer(&model, args.tokenizer.as_deref())?;

    // Teacher-forcing text.
    let raw = std::fs::read_to_string(&args.text).with_context(|| format!("--text {} (scripts/fetch-text.sh)", args.text.display()))?;
    let text = section_text(&raw, &args.section)?;
    let ids = tokenizer.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?.get_ids().to_vec();
    let forced_len = setup.prompt_tokens + setup.decode_steps + 1;
    if !args.no_forced && ids.len() < forced_len {
        bail!("--section {} has {} tokens; prompt + steps + 1 = {forced_len}", args.section, ids.len());
    }
    let prompt: Vec<u32> = ids[..setup.prompt_tokens.min(ids.len())].to_vec();
    let continuation = Arc::new(ids[setup.prompt_tokens.min(ids.len())..forced_len.min(ids.len())].to_vec());

    // Free-generation prompt.
    let longgen = longgen::LongGen::load(&args.longgen, setup.problems)?;
    let masked: Vec<u32> = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"].iter().filter_map(|t| tokenizer.token_to_id(t)).collect();

    // The configurations: full, then per window the batch of budgets.
    let mut kinds = vec![Kind::Full];
    for &w in &setup.windows {
        kinds.push(if w == 1 { Kind::Quest } else { Kind::Retro(w) });
    }
    let refresh_windows = args.refresh_windows.clone().unwrap_or_else(|| setup.windows.clone());
    match args.refresh_every[..] {
        [] => {}
        [every] => kinds.extend(refresh_windows.iter().filter(|&&w| every > w).map(|&window| Kind::RetroRefresh { window, every, budget: None })),
        ref per_budget => {
            for (&every, &budget) in per_budget.iter().zip(&setup.budgets) {
                let windows = refresh_windows.iter().filter(|&&w| every > w);
                kinds.extend(windows.map(|&window| Kind::RetroRefresh { window, every, budget: Some(budget) }));
            }
        }
    }
    if setup.check_retro_w1 && setup.windows.contains(&1) {
        kinds.push(Kind::Retro(1));
    }
    if args.drift_split && !args.no_forced {
        kinds.push(Kind::QuestOracle);
    }
    let oracle_store = args.drift_split.then(|| Arc::new(oracle::KvStore::default()));
    // The most budgets one batch runs (quest's, with the cost multiples).
    let nb = setup.quest_budgets.len().max(setup.budgets.len());
    let max_window = setup.windows.iter().chain(&refresh_windows).copied().max().unwrap_or(1);

    // One engine for everything. KV cache: the largest batch of either phase, with slack.
    let gen_prompt: Vec<u32> = tokenizer
        .encode(longgen::chatml(&longgen.prompt).as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?
        .get_ids()
        .to_vec();
    let gen_prompt_tokens = gen_prompt.len();
    if gen_prompt_tokens == prompt.len() {
        bail!("the forced and the free-generation prompts have the same length ({gen_prompt_tokens} tokens); the harness tells them apart by length: change --prompt-tokens");
    }
    // KV cache: a batch holds every budget's forced and generating sequences at once.
    let per_budget = (forced_len + gen_prompt_tokens + setup.gen_tokens).max(setup.cost_context + setup.cost_steps) + 2 * (max_window + 2 * args.page_size);
    let context = (nb * per_budget).div_ceil(1024) * 1024 + 1024;
    let model_str = model.to_string_lossy().to_string();
    let settings = EngineSettings {
        source: ModelSource::from_path(&model)?,
        cpu: true,
        dtype: mistralrs_core::ModelDType::F32,
        paged: Some(PagedCache { block_size: args.page_size, size: CacheSize::Tokens(context) }),
        max_seqs: 2 * nb + 1,
        prefix_cache: false,
        seed: None,
        max_seq_len: mistralrs_core::AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN,
        cpu_linear: args.cpu_linear,
    };
    let switch = Arc::new(SwitchPolicy::new());
    let (engine, _) = crate::server::build_engine(&settings, Some(switch.clone())).await?;
    let load_secs = started.elapsed().as_secs_f64();

    // The budgets each configuration's batch runs: `full` needs none, a refresh with its own N one.
    let kind_budgets = |k: Kind| -> Vec<f64> {
        match k {
            Kind::Full => vec![1.0],
            Kind::RetroRefresh { budget: Some(b), .. } => vec![b],
            Kind::Quest => setup.quest_budgets.clone(),
            _ => setup.budgets.clone(),
        }
    };
    // The points whose step time is measured alone (the w = 1 check and the oracle are not points).
    let cost_points: Vec<(Kind, f64)> = if setup.cost_steps == 0 {
        vec![]
    } else {
        kinds
            .iter()
            .filter(|k| !matches!(k, Kind::QuestOracle | Kind::Retro(1)))
            .flat_map(|&k| kind_budgets(k).into_iter().map(move |b| (k, b)))
            .collect()
    };
    if setup.cost_steps > 0 && (setup.cost_context == 0 || setup.cost_context > ids.len()) {
        bail!("--cost-context {}: must be in 1..={} (the text's tokens)", setup.cost_context, ids.len());
    }
    let total: u64 = kinds
        .iter()
        .map(|&k| {
            let n = kind_budgets(k).len() as u64;
            let forced = if args.no_forced { 0 } else { n * (setup.decode_steps as u64 + 1) };
            let gen = if k == Kind::QuestOracle { 0 } else { n * setup.gen_tokens as u64 };
            forced + gen
        })
        .sum::<u64>()
        + cost_points.iter().map(|&(k, _)| setup.cost_steps_for(k)).sum::<usize>() as u64;
    let progress = Arc::new(Progress { done: Arc::new(AtomicU64::new(0)), total, phase: Mutex::new("loading".into()), stop: AtomicBool::new(false), start: Instant::now() });
    let ticker = spawn_ticker(progress.clone());

    let mut cells: BTreeMap<(String, u64, usize), Cell> = BTreeMap::new();
    let key = |k: Kind, budget: f64| (k.name().to_string(), (budget * 1e6).round() as u64, k.window());
    let mut reference: Option<Arc<Reference>> = None;
    let mut full_gen: Option<Vec<u32>> = None;
    let mut phase_times = Vec::new();

    let decode = |t: &[u32]| tokenizer.decode(t, true).unwrap_or_default();
    // The cache is allocated once, with the engine; K/V bytes are counted at the forced run's mean context.
    let kv_geometry = switch.kv_geometry();
    let mean_context = setup.prompt_tokens as f64 + setup.decode_steps as f64 / 2.0;
    let meta = serde_json::json!({
        "description": format!("retro-eval: KV policies against full attention on {name} (f32 activations, CPU). See docs/quality.md."),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "quick": args.quick,
        "model": model_str,
        "model_name": name,
        "kv_geometry": kv_geometry.map(|g| serde_json::json!({"layers": g.layers, "kv_heads": g.kv_heads, "head_dim": g.head_dim, "page_size": g.block_size, "element_bytes": g.element_bytes})),
        "quest_budgets": setup.quest_budgets,
        "cost_steps": setup.cost_steps,
        "cost_context": setup.cost_context,
        "text": args.text.to_string_lossy(),
        "section": args.section,
        "section_tokens": ids.len(),
        "prompt_tokens": setup.prompt_tokens,
        "decode_steps": setup.decode_steps,
        "segments": args.segments,
        "gen_tokens": setup.gen_tokens,
        "gen_prompt": longgen.prompt,
        "problems": longgen.problems.len(),
        "page_size": args.page_size,
        "dense_layers": args.dense_layers,
        "gqa_aggregation": "sum",
        "machine": machine(),
        "load_seconds": load_secs,
    });
    let mut records = Vec::new();
    let outcome: Result<()> = async {
        for &kind in &kinds {
            let budgets = kind_budgets(kind);
            let forced = !args.no_forced;
            // retro w = 1 generates too: its check against quest needs the very same batch (the float
            // sums of a matmul depend on its row count).
            let generate = setup.gen_tokens > 0 && kind != Kind::QuestOracle;
            // One batch per configuration: the forced sequences of every budget, then the free
            // generations of every budget (they share the weight reads of each step). `full` runs its
            // two alone, one after the other: a lone sequence takes the faster one-row path.
            let mut batches: Vec<(bool, bool)> = vec![];
            if kind == Kind::Full {
                batches.extend([(forced, false), (false, generate)].into_iter().filter(|&(f, g)| f || g));
            } else if forced || generate {
                batches.push((forced, generate));
            }
            for (forced, generate) in batches {
                let label = format!("{}{}{}", kind.label(), if forced { " forced" } else { "" }, if generate { " generate" } else { "" });
                *progress.phase.lock().expect("lock poisoned") = label.clone();
                // full records its K/V for the diagnostic in the forced batch only (positions are per sequence).
                let oracle = if forced && !generate { oracle_store.as_ref() } else { None };
                let policy = Arc::new(PhasePolicy::new(kind, 2 * budgets.len(), args.dense_layers, oracle));
                let mut order: Vec<(usize, f64)> = Vec::new();
                let mut jobs: Vec<(Vec<u32>, usize, Arc<dyn CustomLogitsProcessor>)> = Vec::new();
                let mut forcers = Vec::new();
                let mut greedy = Vec::new();
                if forced {
                    for &b in &budgets {
                        let f = Arc::new(Forcer::new(prompt.len(), continuation.clone(), reference.clone(), progress.done.clone()));
                        jobs.push((prompt.clone(), setup.decode_steps + 1, f.clone()));
                        forcers.push((b, f));
                        order.push((prompt.len(), b));
                    }
                }
                if generate {
                    for &b in &budgets {
                        let g = Arc::new(Greedy::new(masked.clone(), progress.done.clone()));
                        jobs.push((gen_prompt.clone(), setup.gen_tokens, g.clone()));
                        greedy.push((b, g));
                        order.push((gen_prompt.len(), b));
                    }
                }
                let assigned = activate(&switch, kind, &policy, order.clone())?;
                let t = Instant::now();
                run_batch(&engine, jobs).await?;
                let secs = t.elapsed().as_secs_f64();
                phase_times.push((label.clone(), secs));
                let ids = check_ids(&switch, &assigned, order.len())?;
                if kind == Kind::Full && forced {
                    reference = Some(Arc::new(forcers[0].1.take_reference().expect("reference run")));
                }
                for (i, (b, f)) in forcers.iter().enumerate() {
                    let record = f.record();
                    if record.forcing_errors > 0 || record.nll.len() != setup.decode_steps + 1 {
                        bail!("{label}: forcing failed ({} errors, {} of {} steps)", record.forcing_errors, record.nll.len(), setup.decode_steps + 1);
                    }
                    let cell = cells.entry(key(kind, *b)).or_default();
                    cell.forced = Some(record);
                    cell.refresh_every = kind.refresh_every();
                    cell.forced_secs = Some(secs);
                    let engine = policy.quest.as_deref().map(QuestPolicy::engine).or(policy.retro.as_deref().map(RetroPolicy::engine));
                    cell.reads_per_step = engine.and_then(|e| e.sequence_reads(ids[i])).map(|r| r as f64 / setup.decode_steps as f64);
                    cell.kv_bytes_per_step = kv_geometry.and_then(|g| g.bytes_per_step(mean_context, args.dense_layers, kind == Kind::Full, cell.reads_per_step));
                    if let Some(retro) = &policy.retro {
                        let n = wait_numbers(retro, ids[i]).await;
                        // A window of one has no past rows: its rows see their own pages (as quest's).
                        cell.exposure = n.and_then(|n| n.exposure()).or((kind.window() == 1).then_some(1.0));
                        cell.supplement_ratio = n.map(|n| n.supplement_pages as f64 / n.pages_loaded.max(1) as f64);
                    } else {
                        cell.exposure = Some(1.0);
                    }
                }
                for (b, g) in &greedy {
                    let tokens = g.tokens();
                    if kind == Kind::Full {
                        full_gen = Some(tokens.clone());
                    }
                    let cell = cells.entry(key(kind, *b)).or_default();
                    cell.gen_tokens = Some(tokens);
                    cell.gen_secs = Some(secs);
                }
                // Results so far, so that an interrupted run keeps what it measured.
                records = write_results(&args, &out, &curves, &setup, &meta, &cells, &longgen, full_gen.as_deref(), &decode, &phase_times, started)?;
            }
        }
        // Cost: every point alone at batch 1, greedy from a prompt of `cost_context` text tokens.
        let cost_prompt: Vec<u32> = ids[..setup.cost_context.min(ids.len())].to_vec();
        for (i, &(kind, budget)) in cost_points.iter().enumerate() {
            let label = format!("cost {}/{}: {} at {budget}", i + 1, cost_points.len(), kind.label());
            *progress.phase.lock().expect("lock poisoned") = label.clone();
            let policy = Arc::new(PhasePolicy::new(kind, 2, args.dense_layers, None));
            let order = vec![(cost_prompt.len(), budget)];
            let assigned = activate(&switch, kind, &policy, order)?;
            let clock = Arc::new(Greedy::new(masked.clone(), progress.done.clone()));
            let t = Instant::now();
            run_batch(&engine, vec![(cost_prompt.clone(), setup.cost_steps_for(kind), clock.clone())]).await?;
            phase_times.push((label, t.elapsed().as_secs_f64()));
            check_ids(&switch, &assigned, 1)?;
            let cell = cells.entry(key(kind, budget)).or_default();
            cell.refresh_every = kind.refresh_every();
            cell.step_ms_cpu = match kind.refresh_every() {
                Some(every) => clock.mean_step_ms_over_periods(every, 2),
                None => clock.median_step_ms(COST_WARMUP_STEPS),
            };
            records = write_results(&args, &out, &curves, &setup, &meta, &cells, &longgen, full_gen.as_deref(), &decode, &phase_times, started)?;
        }
        Ok(())
    }
    .await;
    progress.stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    outcome?;
    eprintln!("retro-eval: {} records in {:.0} s → {}", records.len(), started.elapsed().as_secs_f64(), out.display());
    Ok(records)
}

/// `--tokenizer`, else the one a .gguf file describes, else the model directory's tokenizer.json.
fn load_tokenizer(model: &Path, file: Option<&Path>) -> Result<tokenizers::Tokenizer> {
    let file = match file {
        Some(file) => file.to_path_buf(),
        None if model.is_file() => {
            let built = crate::convert::tokenizer_from_gguf(model).with_context(|| format!("the tokenizer of {} (or name one with --tokenizer)", model.display()))?;
            for w in &built.warnings {
                eprintln!("retro-eval: tokenizer: {w}");
            }
            return Ok(built.tokenizer);
        }
        None => model.join("tokenizer.json"),
    };
    tokenizers::Tokenizer::from_file(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}
