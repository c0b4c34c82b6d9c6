//! `retro-eval`'s command line, and the settings it resolves to before anything runs.

use super::*;

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

pub(super) struct Setup {
    pub(super) prompt_tokens: usize,
    pub(super) decode_steps: usize,
    pub(super) budgets: Vec<f64>,
    /// Quest's budgets: `budgets` and their cost multiples.
    pub(super) quest_budgets: Vec<f64>,
    pub(super) windows: Vec<usize>,
    pub(super) cost_steps: usize,
    pub(super) cost_context: usize,
    pub(super) gen_tokens: usize,
    pub(super) problems: usize,
    pub(super) check_retro_w1: bool,
}

impl EvalArgs {
    pub(super) fn setup(&self) -> Result<Setup> {
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
pub(super) const COST_WARMUP_STEPS: usize = 3;

impl Setup {
    /// Decode steps a point's cost run takes: a refresh's dense steps are part of its cost, so it
    /// runs two whole periods after the warm-up.
    pub(super) fn cost_steps_for(&self, kind: Kind) -> usize {
        kind.refresh_every().map_or(self.cost_steps, |every| self.cost_steps.max(2 * every + COST_WARMUP_STEPS + 1))
    }
}
