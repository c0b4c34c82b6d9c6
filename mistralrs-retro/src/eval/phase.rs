//! The policy of each batch the harness runs: which kind, its budgets per sequence, and the
//! sequence ids the engine gave it.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kind {
    Full,
    Quest,
    /// Quest with full's K/V for decoded tokens (`--drift-split`).
    QuestOracle,
    Retro(usize),
    /// Retro with `refresh_every`, at one budget (`None`: every budget of the grid).
    RetroRefresh { window: usize, every: usize, budget: Option<f64> },
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Quest => "quest",
            Kind::QuestOracle => "quest-oracle-kv",
            Kind::Retro(_) => "retro",
            Kind::RetroRefresh { .. } => "retro-refresh",
        }
    }
    pub(super) fn window(self) -> usize {
        match self {
            Kind::Retro(w) | Kind::RetroRefresh { window: w, .. } => w,
            _ => 1,
        }
    }
    pub(super) fn refresh_every(self) -> Option<usize> {
        match self {
            Kind::RetroRefresh { every, .. } => Some(every),
            _ => None,
        }
    }
    pub(super) fn label(self) -> String {
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
    pub(super) served: Arc<dyn ServedPolicy>,
    pub(super) quest: Option<Arc<QuestPolicy>>,
    pub(super) retro: Option<Arc<RetroPolicy>>,
}

impl PhasePolicy {
    pub(super) fn new(kind: Kind, budgets: usize, dense_layers: usize, oracle: Option<&Arc<oracle::KvStore>>) -> Self {
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
                q.engine().keep_sequence_reads();
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
                r.engine().keep_sequence_reads();
                Self { served: r.clone(), quest: None, retro: Some(r) }
            }
        }
    }
    pub(super) fn set_budget(&self, seq_id: usize, budget: f64) {
        let b = Budget::Ratio { ratio: budget, min_tokens: 0 };
        if let Some(q) = &self.quest {
            q.engine().set_sequence_budget(seq_id, b);
        }
        if let Some(r) = &self.retro {
            r.engine().set_sequence_budget(seq_id, b);
        }
    }
}

/// Makes `policy` the one the engine runs for the next batch, whose requests are `order` (prompt
/// length, budget); returns where the batch's sequence ids will be recorded (see [`check_ids`]).
pub(super) fn activate(switch: &SwitchPolicy, kind: Kind, policy: &Arc<PhasePolicy>, order: Vec<(usize, f64)>) -> Result<Arc<Mutex<Vec<Option<usize>>>>> {
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
pub(super) fn budget_hook(policy: Arc<PhasePolicy>, order: Vec<(usize, f64)>, assigned: Arc<Mutex<Vec<Option<usize>>>>) -> Box<dyn FnMut(usize, usize) + Send> {
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
pub(super) fn check_ids(switch: &SwitchPolicy, assigned: &Mutex<Vec<Option<usize>>>, requests: usize) -> Result<Vec<usize>> {
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
pub(super) async fn wait_numbers(retro: &RetroPolicy, seq_id: usize) -> Option<crate::policy::SequenceNumbers> {
    for _ in 0..100 {
        if let Some(n) = retro.sequence_numbers(seq_id) {
            return Some(n);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
