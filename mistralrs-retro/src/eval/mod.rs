//! The quality evaluation (`retro-eval`, issue 5): does `retro` stay closer to `full` than `quest`?
//!
//! One process loads the model once and runs every configuration on the same engine and KV cache,
//! swapping the policy between runs ([`switch::SwitchPolicy`]). Per window w, the budgets of the grid
//! run as concurrent sequences of one batch, each with its own budget
//! (`QuestPolicy::set_sequence_budget`); w = 1 is `quest` (retro with w = 1 is quest bit for bit,
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

pub mod forcing;
pub mod longgen;
pub mod oracle;
pub mod switch;

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

#[derive(Parser, Debug, Clone)]
#[command(name = "retro-eval", about = "Quality of the KV policies against full attention (teacher-forced KL/perplexity, free-generation agreement, exposure)")]
pub struct EvalArgs {
    /// The small grid CI runs (about a minute): budget 10%, w = 1, 2 (and retro w = 1 as a check),
    /// 256-token prompt, 128 forced steps, 64 generated tokens.
    #[arg(long)]
    pub quick: bool,
    /// Model directory or .gguf file [default: the embedded SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,

    /// tokenizer.json for the text [default: the model directory's, or the one a .gguf file
    /// describes].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    /// CPU linear layers, as mistralrs-server's --cpu-linear (ours or upstream).
    #[arg(long, value_enum, default_value_t = crate::linear::CpuLinear::Ours)]
    pub cpu_linear: crate::linear::CpuLinear,
    /// Long text for teacher forcing.
    #[arg(long, default_value = "models/text/in_the_year_2889.txt")]
    pub text: PathBuf,
    /// Which part of a Project Gutenberg text: `story` (between the START and END markers; what we
    /// report on) or `license` (after the END marker; what settings were explored on).
    #[arg(long, default_value = "story")]
    pub section: String,
    /// Prompt tokens before the forced steps [default: 1024; quick 256].
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// Forced decode steps [default: 4096; quick 128].
    #[arg(long)]
    pub decode_steps: Option<usize>,
    /// Disjoint segments the forced steps are split into for means and spread.
    #[arg(long, default_value_t = 4)]
    pub segments: usize,
    /// Budgets as fractions of the context [default: 0.05,0.10,0.15,0.25; quick 0.10].
    #[arg(long, value_delimiter = ',')]
    pub budgets: Option<Vec<f64>>,
    /// Windows; 1 is quest [default: 1,2,4,8; quick 1,2].
    #[arg(long, value_delimiter = ',')]
    pub windows: Option<Vec<usize>>,
    /// Quest also runs at these multiples of every budget, so that each retro point has a Quest
    /// point of about its cost [default: 1.25,1.5,2; quick none]; `--quest-cost-multiples 1` for none.
    #[arg(long, value_delimiter = ',')]
    pub quest_cost_multiples: Option<Vec<f64>>,
    /// Decode steps each (policy, budget, window) point runs alone after the quality runs, to
    /// measure its step time on this machine (0 skips; a refresh runs at least two periods)
    /// [default: 48; quick 16].
    #[arg(long)]
    pub cost_steps: Option<usize>,
    /// Context the step time is measured at [default: the forced run's mean context, prompt +
    /// half the steps].
    #[arg(long)]
    pub cost_context: Option<usize>,
    /// Also run retro with a refresh every N decode steps (`refresh_every`: a dense replay of the
    /// last N tokens), at every window of --windows below N (w = 1 is quest with refreshes). One N
    /// for every budget, or one per budget of --budgets (each budget then runs in its own batch:
    /// the refresh steps are the whole batch's).
    #[arg(long, value_delimiter = ',')]
    pub refresh_every: Vec<usize>,
    /// Windows the refresh runs at [default: every window of --windows below N].
    #[arg(long, value_delimiter = ',')]
    pub refresh_windows: Option<Vec<usize>>,
    /// Also run retro with w = 1 and check it equals quest [default: on with --quick].
    #[arg(long)]
    pub check_retro_w1: bool,
    /// LongGenBench-style problems (made by scripts/gen-longgen.py).
    #[arg(long, default_value = "tests/fixtures/longgen_gsm.json")]
    pub longgen: PathBuf,
    /// Problems in the free-generation prompt (0 = all) [default: all; quick 2].
    #[arg(long)]
    pub problems: Option<usize>,
    /// Greedy tokens generated [default: 1024; quick 64]; 0 skips free generation.
    #[arg(long)]
    pub gen_tokens: Option<usize>,
    /// Skip teacher forcing.
    #[arg(long)]
    pub no_forced: bool,
    /// Diagnostic: also run quest with every decoded token's K/V replaced by full's (`oracle`),
    /// splitting quest's KL into selection (what is left) and drift (the rest). Teacher forcing only.
    #[arg(long)]
    pub drift_split: bool,
    /// Page (block) size in tokens.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Leading layers that stay dense.
    #[arg(long, default_value_t = 2)]
    pub dense_layers: usize,
    /// Results (one record per policy, budget, window) [default:
    /// docs/results/quality_<model>.json, the model named by its file or directory].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Per-step KL series at the budget nearest 10%, for the plot (`none` to skip) [default:
    /// docs/results/quality_<model>_kl_curves.json].
    #[arg(long)]
    pub curves: Option<PathBuf>,
}

/// One row of the results file (`docs/results/quality_<model>.json`).
#[derive(Serialize, Clone, Debug)]
pub struct QualityRecord {
    pub policy: String,
    pub budget: f64,
    pub window: usize,
    /// Mean KL(full ‖ policy) in nats over the forced decode steps.
    pub kl_mean: Option<f64>,
    /// Sample standard deviation of the per-segment mean KL.
    pub kl_std: Option<f64>,
    pub kl_segments: Vec<f64>,
    /// exp(mean NLL) of the forced text tokens.
    pub ppl: Option<f64>,
    pub ppl_std: Option<f64>,
    pub ppl_segments: Vec<f64>,
    /// Fraction of forced steps whose top token equals full's.
    pub top1_agree: Option<f64>,
    /// Free generation: leading tokens equal to full's.
    pub agree_tokens: Option<usize>,
    /// Free generation: fraction of problems whose extracted final answer equals full's.
    pub agree_answers: Option<f64>,
    /// Free generation: fraction of problems answered correctly (vs the generator's answer).
    pub correct_answers: Option<f64>,
    /// Effective KV exposure (retro: pages a row attended to once its window closed, over the
    /// pages it selected itself; 1 for quest and full), over the forced run.
    pub exposure: Option<f64>,
    /// Retro: supplement (row, page, KV head) reads per forced step, over the sparse reads.
    pub supplement_ratio: Option<f64>,
    /// `retro-refresh`: decode steps between refresh steps.
    pub refresh_every: Option<usize>,
    /// (page, KV head) pairs the sparse layers read per forced step (the bytes a step reads are
    /// proportional), and the same over quest's at this budget.
    pub reads_per_step: Option<f64>,
    pub reads_vs_quest: Option<f64>,
    /// Wall seconds of the batch this configuration ran in (shared by the budgets of one window).
    pub forced_batch_seconds: Option<f64>,
    pub gen_batch_seconds: Option<f64>,
    /// K/V bytes a decode step reads at the forced run's mean context: pages (and, for the sparse
    /// policies, the dense layers and the page summaries scored).
    pub kv_bytes_per_step: Option<f64>,
    /// Decode step of this point running alone, batch 1, at `cost_context`, this machine: the
    /// median step, or for a refresh the mean over two whole refresh periods.
    pub step_ms_cpu: Option<f64>,
    /// The same on the GPU (random-weight Llama-3.1-8B shape), merged in from its own run.
    pub step_ms_gpu_b1: Option<f64>,
    pub step_ms_gpu_b8: Option<f64>,
    /// Fraction of task problems answered correctly (not measured by this harness yet).
    pub task_score: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Full,
    Quest,
    /// Quest with full's K/V for decoded tokens (`--drift-split`).
    QuestOracle,
    Retro(usize),
    /// Retro with `refresh_every`, at one budget (`None`: every budget of the grid).
    RetroRefresh { window: usize, every: usize, budget: Option<f64> },
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Quest => "quest",
            Kind::QuestOracle => "quest-oracle-kv",
            Kind::Retro(_) => "retro",
            Kind::RetroRefresh { .. } => "retro-refresh",
        }
    }
    fn window(self) -> usize {
        match self {
            Kind::Retro(w) | Kind::RetroRefresh { window: w, .. } => w,
            _ => 1,
        }
    }
    fn refresh_every(self) -> Option<usize> {
        match self {
            Kind::RetroRefresh { every, .. } => Some(every),
            _ => None,
        }
    }
    fn label(self) -> String {
        match self {
            Kind::Retro(w) => format!("retro w={w}"),
            Kind::RetroRefresh { window, every, budget: None } => format!("retro w={window} refresh {every}"),
            Kind::RetroRefresh { window, every, budget: Some(b) } => format!("retro w={window} refresh {every} at {b}"),
            k => k.name().into(),
        }
    }
}

/// The policy of one batch, with handles to set budgets and read exposure.
pub(crate) struct PhasePolicy {
    served: Arc<dyn ServedPolicy>,
    quest: Option<Arc<QuestPolicy>>,
    retro: Option<Arc<RetroPolicy>>,
}

impl PhasePolicy {
    fn new(kind: Kind, budgets: usize, dense_layers: usize, oracle: Option<&Arc<oracle::KvStore>>) -> Self {
        let default = Budget::Ratio { ratio: 1.0, min_tokens: 0 };
        match kind {
            Kind::Full => {
                let full: Arc<dyn ServedPolicy> = Arc::new(crate::policy::FullPolicy::new());
                let served: Arc<dyn ServedPolicy> = match oracle {
                    Some(store) => Arc::new(oracle::OracleKv::new(full, store.clone(), oracle::Mode::Record)),
                    None => full,
                };
                Self { served, quest: None, retro: None }
            }
            Kind::Quest | Kind::QuestOracle => {
                let q = Arc::new(QuestPolicy::new(default, dense_layers));
                q.keep_sequence_reads();
                let served: Arc<dyn ServedPolicy> = match (kind, oracle) {
                    (Kind::QuestOracle, Some(store)) => Arc::new(oracle::OracleKv::new(q.clone(), store.clone(), oracle::Mode::Replace)),
                    _ => q.clone(),
                };
                Self { served, quest: Some(q), retro: None }
            }
            Kind::Retro(_) | Kind::RetroRefresh { .. } => {
                let r = RetroPolicy::new(default, dense_layers, kind.window(), budgets.max(1));
                let r = Arc::new(r.with_refresh(kind.refresh_every().unwrap_or(0)));
                r.keep_sequence_numbers();
                r.quest().keep_sequence_reads();
                Self { served: r.clone(), quest: None, retro: Some(r) }
            }
        }
    }
    fn set_budget(&self, seq_id: usize, budget: f64) {
        let b = Budget::Ratio { ratio: budget, min_tokens: 0 };
        if let Some(q) = &self.quest {
            q.set_sequence_budget(seq_id, b);
        }
        if let Some(r) = &self.retro {
            r.quest().set_sequence_budget(seq_id, b);
        }
    }
}

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

struct Setup {
    prompt_tokens: usize,
    decode_steps: usize,
    budgets: Vec<f64>,
    /// Quest's budgets: `budgets` and their cost multiples.
    quest_budgets: Vec<f64>,
    windows: Vec<usize>,
    cost_steps: usize,
    cost_context: usize,
    gen_tokens: usize,
    problems: usize,
    check_retro_w1: bool,
}

impl EvalArgs {
    fn setup(&self) -> Result<Setup> {
        let q = self.quick;
        let prompt_tokens = self.prompt_tokens.unwrap_or(if q { 256 } else { 1024 });
        let decode_steps = self.decode_steps.unwrap_or(if q { 128 } else { 4096 });
        let budgets = self.budgets.clone().unwrap_or(if q { vec![0.10] } else { vec![0.05, 0.10, 0.15, 0.25] });
        let multiples = self.quest_cost_multiples.clone().unwrap_or(if q { vec![] } else { vec![1.25, 1.5, 2.0] });
        if multiples.iter().any(|m| !(*m >= 1.0)) {
            bail!("--quest-cost-multiples: each must be at least 1");
        }
        let mut quest_budgets = budgets.clone();
        for m in &multiples {
            quest_budgets.extend(budgets.iter().map(|b| (b * m).min(1.0)));
        }
        // Equal budgets from two products (0.10 × 1.5 = 0.15) are one point.
        quest_budgets.iter_mut().for_each(|b| *b = (*b * 1e6).round() / 1e6);
        quest_budgets.sort_by(f64::total_cmp);
        quest_budgets.dedup();
        let s = Setup {
            prompt_tokens,
            decode_steps,
            budgets,
            quest_budgets,
            cost_steps: self.cost_steps.unwrap_or(if q { 16 } else { 48 }),
            cost_context: self.cost_context.unwrap_or(prompt_tokens + decode_steps / 2),
            windows: self.windows.clone().unwrap_or(if q { vec![1, 2] } else { vec![1, 2, 4, 8] }),
            gen_tokens: self.gen_tokens.unwrap_or(if q { 64 } else { 1024 }),
            problems: self.problems.unwrap_or(if q { 2 } else { 0 }),
            check_retro_w1: self.check_retro_w1 || q,
        };
        if !crate::server::SUPPORTED_BLOCK_SIZES.contains(&self.page_size) {
            bail!("--page-size {}: must be one of {:?}", self.page_size, crate::server::SUPPORTED_BLOCK_SIZES);
        }
        if s.budgets.iter().any(|b| !(*b > 0.0 && *b <= 1.0)) {
            bail!("--budgets: each must be in (0, 1]");
        }
        if s.windows.iter().any(|&w| w == 0 || w > crate::config::MAX_WINDOW) {
            bail!("--windows: each must be in 1..={}", crate::config::MAX_WINDOW);
        }
        if self.refresh_windows.iter().flatten().any(|&w| w == 0 || w > crate::config::MAX_WINDOW) {
            bail!("--refresh-windows: each must be in 1..={}", crate::config::MAX_WINDOW);
        }
        if !(self.refresh_every.len() <= 1 || self.refresh_every.len() == s.budgets.len()) || self.refresh_every.contains(&0) {
            bail!("--refresh-every: one N > 0 for every budget, or one per budget of --budgets ({} given for {} budgets)", self.refresh_every.len(), s.budgets.len());
        }
        if self.segments == 0 || (!self.no_forced && s.decode_steps < self.segments) {
            bail!("--segments: at least 1 and at most --decode-steps");
        }
        Ok(s)
    }
}

/// Step gaps left out of a cost measurement: the first include the switch from prefill to decode.
const COST_WARMUP_STEPS: usize = 3;

impl Setup {
    /// Decode steps a point's cost run takes: a refresh's dense steps are part of its cost, so it
    /// runs two whole periods after the warm-up.
    fn cost_steps_for(&self, kind: Kind) -> usize {
        kind.refresh_every().map_or(self.cost_steps, |every| self.cost_steps.max(2 * every + COST_WARMUP_STEPS + 1))
    }
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

#[derive(Default)]
struct Cell {
    forced: Option<ForcedRecord>,
    exposure: Option<f64>,
    supplement_ratio: Option<f64>,
    reads_per_step: Option<f64>,
    refresh_every: Option<usize>,
    forced_secs: Option<f64>,
    gen_tokens: Option<Vec<u32>>,
    gen_secs: Option<f64>,
    kv_bytes_per_step: Option<f64>,
    step_ms_cpu: Option<f64>,
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
                    let quest = policy.quest.as_deref().or(policy.retro.as_deref().map(RetroPolicy::quest));
                    cell.reads_per_step = quest.and_then(|q| q.sequence_reads(ids[i])).map(|r| r as f64 / setup.decode_steps as f64);
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

type Cells = BTreeMap<(String, u64, usize), Cell>;

/// Build the records from what was measured so far and write `--out` (and `--curves`).
#[allow(clippy::too_many_arguments)]
fn write_results(
    args: &EvalArgs,
    out_path: &Path,
    curves_path: &Path,
    setup: &Setup,
    meta: &serde_json::Value,
    cells: &Cells,
    longgen: &longgen::LongGen,
    full_gen: Option<&[u32]>,
    decode: &dyn Fn(&[u32]) -> String,
    phase_times: &[(String, f64)],
    started: Instant,
) -> Result<Vec<QualityRecord>> {
    let full_answers = full_gen.map(|t| longgen.answers(&decode(t)));
    let mut records = Vec::new();
    let mut retro_w1_check = None;
    for ((policy, budget, window), cell) in cells {
        let budget = *budget as f64 / 1e6;
        let (kl_segments, ppl_segments, kl_mean, ppl, top1) = match &cell.forced {
            Some(r) => {
                let kl = segments(&r.kl, args.segments);
                let nll = segments(&r.nll, args.segments);
                let steps = &r.nll[1..];
                let top1 = r.top1_agree[1..].iter().filter(|&&a| a).count() as f64 / steps.len().max(1) as f64;
                (kl.clone(), nll.iter().map(|n| n.exp()).collect::<Vec<_>>(), Some(mean(&r.kl[1..])), Some(mean(steps).exp()), Some(top1))
            }
            None => (vec![], vec![], None, None, None),
        };
        let (agree_tokens, agree_answers, correct_answers) = match (&cell.gen_tokens, full_gen, &full_answers) {
            (Some(mine), Some(full), Some(full_answers)) => {
                let agree = mine.iter().zip(full).take_while(|(a, b)| a == b).count();
                let answers = longgen.answers(&decode(mine));
                let same = answers.iter().zip(full_answers).filter(|(a, b)| a == b).count();
                let correct = longgen.correct(&answers);
                (Some(agree), Some(same as f64 / answers.len().max(1) as f64), Some(correct))
            }
            _ => (None, None, None),
        };
        let record = QualityRecord {
            policy: policy.clone(),
            budget,
            window: *window,
            kl_mean,
            kl_std: std_dev(&kl_segments),
            kl_segments,
            ppl,
            ppl_std: std_dev(&ppl_segments),
            ppl_segments,
            top1_agree: top1,
            agree_tokens,
            agree_answers,
            correct_answers,
            exposure: cell.exposure,
            supplement_ratio: cell.supplement_ratio,
            refresh_every: cell.refresh_every,
            reads_per_step: cell.reads_per_step,
            reads_vs_quest: cells
                .get(&("quest".into(), (budget * 1e6).round() as u64, 1))
                .and_then(|q| Some(cell.reads_per_step? / q.reads_per_step?)),
            forced_batch_seconds: cell.forced_secs,
            gen_batch_seconds: cell.gen_secs,
            kv_bytes_per_step: cell.kv_bytes_per_step,
            step_ms_cpu: cell.step_ms_cpu,
            step_ms_gpu_b1: None,
            step_ms_gpu_b8: None,
            task_score: None,
        };
        if policy == "retro" && *window == 1 {
            // The check run: it must equal quest exactly.
            let quest = cells.get(&("quest".into(), (budget * 1e6).round() as u64, 1)).and_then(|c| c.forced.as_ref());
            let same = match (quest, &cell.forced) {
                (Some(q), Some(r)) => q.kl == r.kl && q.nll == r.nll,
                _ => false,
            };
            let quest_gen = cells.get(&("quest".into(), (budget * 1e6).round() as u64, 1)).and_then(|c| c.gen_tokens.as_ref());
            let same = same && quest_gen == cell.gen_tokens.as_ref();
            retro_w1_check = Some(same);
            if !same {
                bail!("retro with w = 1 differs from quest at budget {budget}");
            }
            continue;
        }
        records.push(record);
    }
    let mut out = meta.clone();
    let obj = out.as_object_mut().expect("meta is an object");
    obj.insert("retro_w1_equals_quest".into(), serde_json::json!(retro_w1_check));
    obj.insert("full_generation".into(), serde_json::json!(full_gen.map(decode)));
    obj.insert("full_answers".into(), serde_json::json!(full_answers));
    obj.insert("total_seconds".into(), serde_json::json!(started.elapsed().as_secs_f64()));
    obj.insert(
        "phase_seconds".into(),
        phase_times.iter().map(|(n, s)| serde_json::json!({"phase": n, "seconds": s})).collect::<Vec<_>>().into(),
    );
    obj.insert("records".into(), serde_json::to_value(&records)?);
    write_json(out_path, &out)?;
    if curves_path.as_os_str() != "none" {
        if let Some(curves) = curves_json(cells, setup) {
            write_json(curves_path, &curves)?;
        }
    }
    Ok(records)
}

/// Per-step KL at the budget nearest 10% for full, quest and every retro window.
fn curves_json(cells: &Cells, setup: &Setup) -> Option<serde_json::Value> {
    let budget = setup.budgets.iter().copied().min_by(|a, b| (a - 0.10).abs().total_cmp(&(b - 0.10).abs()))?;
    let b = (budget * 1e6).round() as u64;
    let series: Vec<_> = cells
        .iter()
        .filter(|((p, bb, w), _)| (p == "full" || *bb == b) && !(p == "retro" && *w == 1))
        .filter_map(|((p, _, w), c)| {
            let r = c.forced.as_ref()?;
            Some(serde_json::json!({"policy": p, "window": w, "kl": r.kl[1..].iter().map(|x| (x * 1e6).round() / 1e6).collect::<Vec<_>>()}))
        })
        .collect();
    Some(serde_json::json!({"budget": budget, "prompt_tokens": setup.prompt_tokens, "series": series}))
}

/// The model's name in result file names: the file's stem or the directory's name, lowercase.
fn model_name(model: &Path) -> String {
    let stem = if model.is_file() { model.file_stem() } else { model.file_name() };
    let stem = stem.map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_else(|| "model".into());
    stem.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect()
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

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n").with_context(|| format!("write {}", path.display()))
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()));
    serde_json::json!({
        "cpu": cpu,
        "threads": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "os": std::env::consts::OS,
    })
}

/// Makes `policy` the one the engine runs for the next batch, whose requests are `order` (prompt
/// length, budget); returns where the batch's sequence ids will be recorded (see [`check_ids`]).
fn activate(switch: &SwitchPolicy, kind: Kind, policy: &Arc<PhasePolicy>, order: Vec<(usize, f64)>) -> Result<Arc<Mutex<Vec<Option<usize>>>>> {
    let assigned = Arc::new(Mutex::new(Vec::new()));
    // As `policy::build` does when serving (the switch builds no policy itself).
    crate::linear::set_row_paths(if kind == Kind::Full { crate::policy::PolicyKind::Full } else { crate::policy::PolicyKind::Quest }, crate::config::KernelChoice::Auto);
    switch.switch_to(policy.served.clone(), Some(budget_hook(policy.clone(), order, assigned.clone())))?;
    Ok(assigned)
}

/// Gives the sequences of a batch their budgets. A batch holds up to two kinds of request (forced,
/// generating), told apart by prompt length; the engine numbers sequences in the order it receives
/// the requests (`submit` sends them one after another) and prefills prompts of one length first
/// come, first served, so within a kind the i-th new sequence is the i-th request of that kind.
/// `check_ids` verifies the ids afterwards.
fn budget_hook(policy: Arc<PhasePolicy>, order: Vec<(usize, f64)>, assigned: Arc<Mutex<Vec<Option<usize>>>>) -> Box<dyn FnMut(usize, usize) + Send> {
    Box::new(move |seq_id, prompt_len| {
        let mut assigned = assigned.lock().expect("lock poisoned");
        if assigned.len() < order.len() {
            assigned.resize(order.len(), None);
        }
        if let Some(i) = (0..order.len()).find(|&i| order[i].0 == prompt_len && assigned[i].is_none()) {
            policy.set_budget(seq_id, order[i].1);
            assigned[i] = Some(seq_id);
        } else {
            assigned.push(Some(seq_id)); // unexpected: check_ids fails
        }
    })
}

/// The batch's sequence ids, in request order; checks that exactly one new sequence per request
/// was seen and that the ids follow the request order.
fn check_ids(switch: &SwitchPolicy, assigned: &Mutex<Vec<Option<usize>>>, requests: usize) -> Result<Vec<usize>> {
    let ids: Vec<Option<usize>> = assigned.lock().expect("lock poisoned").clone();
    let seen: Vec<usize> = switch.seen_sequences().into_iter().collect();
    let ok = ids.len() == requests && ids.iter().all(Option::is_some);
    let ids: Vec<usize> = ids.into_iter().flatten().collect();
    let consecutive = ids.windows(2).all(|w| w[1] == w[0] + 1);
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    if !ok || sorted != seen || !consecutive {
        bail!("sequence ids {ids:?} (seen {seen:?}) for {requests} requests: per-sequence budgets would be wrong");
    }
    Ok(ids)
}

/// A retro sequence's numbers are recorded when the engine frees it, which may come just after
/// the response.
async fn wait_numbers(retro: &RetroPolicy, seq_id: usize) -> Option<crate::policy::output_cache::SequenceNumbers> {
    for _ in 0..100 {
        if let Some(n) = retro.sequence_numbers(seq_id) {
            return Some(n);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

