//! What the harness writes: one record per (policy, budget), the results file with its curves,
//! and the machine it ran on.

use super::*;

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

#[derive(Default)]
pub(super) struct Cell {
    pub(super) forced: Option<ForcedRecord>,
    pub(super) exposure: Option<f64>,
    pub(super) supplement_ratio: Option<f64>,
    pub(super) reads_per_step: Option<f64>,
    pub(super) refresh_every: Option<usize>,
    pub(super) forced_secs: Option<f64>,
    pub(super) gen_tokens: Option<Vec<u32>>,
    pub(super) gen_secs: Option<f64>,
    pub(super) kv_bytes_per_step: Option<f64>,
    pub(super) step_ms_cpu: Option<f64>,
}

pub(super) type Cells = BTreeMap<(String, u64, usize), Cell>;

/// Build the records from what was measured so far and write `--out` (and `--curves`).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_results(
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
pub(super) fn curves_json(cells: &Cells, setup: &Setup) -> Option<serde_json::Value> {
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
pub(super) fn model_name(model: &Path) -> String {
    let stem = if model.is_file() { model.file_stem() } else { model.file_name() };
    let stem = stem.map(|s| s.to_string_lossy().to_lowercase()).unwrap_or_else(|| "model".into());
    stem.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect()
}

pub(super) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n").with_context(|| format!("write {}", path.display()))
}

pub(super) fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()));
    serde_json::json!({
        "cpu": cpu,
        "threads": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "os": std::env::consts::OS,
    })
}
