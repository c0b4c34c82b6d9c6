//! Teacher forcing and greedy recording through mistral.rs's `CustomLogitsProcessor`, with no patch.
//!
//! mistralrs-core 0.8.1 calls a request's logits processors once per sampled token
//! (`Sampler::sample`, sampler.rs): it takes the last row's logits as f32, applies the request's
//! penalties (`apply_penalties`: none are set here, so the logits pass through unchanged), then each
//! processor with the sequence's tokens so far (`context` = prompt + generated), and only then the
//! temperature (none: argmax). So a processor sees the model's raw next-token logits, knows the step
//! from `context.len()` and can decide the token by returning logits that are `-inf` everywhere
//! but one entry. Engine, scheduler, KV cache and policy run exactly as when serving.
//!
//! [`Forcer`] does that along a fixed text: at step `s` (0 = the distribution after the prompt,
//! computed by the dense prefill; `s ≥ 1` = decode steps) it records the NLL of text token `s` and,
//! against a stored reference run (`full`), KL(full ‖ policy) of the whole next-token distribution,
//! then forces text token `s`. Every policy therefore sees the same history. [`Greedy`] records the
//! greedy tokens of a free generation (with end-of-sequence tokens masked so that every run is as
//! long as asked).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use mistralrs_core::CustomLogitsProcessor;

/// `log_softmax` of `logits` in f64 accumulation, returned as f32.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// KL(p ‖ q) in nats from log-probabilities.
pub fn kl(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .filter(|(&lp, _)| lp > -80.0)
        .map(|(&lp, &lq)| {
            let lp = lp as f64;
            lp.exp() * (lp - lq as f64)
        })
        .sum::<f64>()
        .max(0.0)
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// `full`'s next-token log-probabilities at every step of a forced run.
#[derive(Default)]
pub struct Reference {
    pub log_probs: Vec<Vec<f32>>,
}

/// What a forced run measured, per step (index = step; step 0 is the prefill's distribution).
#[derive(Clone, Debug, Default)]
pub struct ForcedRecord {
    pub nll: Vec<f64>,
    /// KL(reference ‖ this run); 0 for the reference run itself.
    pub kl: Vec<f64>,
    /// Whether this run's top token equals the reference's.
    pub top1_agree: Vec<bool>,
    /// Steps whose context did not end with the previously forced token (must stay 0).
    pub forcing_errors: usize,
}

pub struct Forcer {
    /// Tokens of the prompt; the context at step `s` holds `prompt_len + s` tokens.
    prompt_len: usize,
    /// The text after the prompt: step `s` forces `continuation[s]`.
    continuation: Arc<Vec<u32>>,
    /// `None`: this is the reference run, keep the distributions.
    reference: Option<Arc<Reference>>,
    keep: Option<Mutex<Reference>>,
    record: Mutex<ForcedRecord>,
    progress: Arc<AtomicU64>,
}

impl Forcer {
    pub fn new(prompt_len: usize, continuation: Arc<Vec<u32>>, reference: Option<Arc<Reference>>, progress: Arc<AtomicU64>) -> Self {
        let keep = reference.is_none().then(|| Mutex::new(Reference::default()));
        Self { prompt_len, continuation, reference, keep, record: Mutex::new(ForcedRecord::default()), progress }
    }

    pub fn record(&self) -> ForcedRecord {
        self.record.lock().expect("lock poisoned").clone()
    }

    /// The reference distributions (reference runs only).
    pub fn take_reference(&self) -> Option<Reference> {
        self.keep.as_ref().map(|k| std::mem::take(&mut *k.lock().expect("lock poisoned")))
    }
}

impl CustomLogitsProcessor for Forcer {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> Result<Tensor> {
        let step = context.len().checked_sub(self.prompt_len).ok_or_else(|| candle_core::Error::Msg("context shorter than the prompt".into()))?;
        let Some(&forced) = self.continuation.get(step) else {
            candle_core::bail!("forced run went past its text (step {step})");
        };
        let values: Vec<f32> = logits.to_vec1()?;
        let log_probs = log_softmax(&values);
        let mut record = self.record.lock().expect("lock poisoned");
        if record.nll.len() != step {
            candle_core::bail!("forcer: step {step} arrived after {} steps", record.nll.len());
        }
        if step > 0 && context.last() != self.continuation.get(step - 1) {
            record.forcing_errors += 1;
        }
        record.nll.push(-(log_probs[forced as usize] as f64));
        match (&self.reference, &self.keep) {
            (Some(reference), _) => {
                let reference = reference.log_probs.get(step).ok_or_else(|| candle_core::Error::Msg(format!("no reference at step {step}")))?;
                record.kl.push(kl(reference, &log_probs));
                record.top1_agree.push(argmax(reference) == argmax(&log_probs));
            }
            (None, Some(keep)) => {
                record.kl.push(0.0);
                record.top1_agree.push(true);
                keep.lock().expect("lock poisoned").log_probs.push(log_probs);
            }
            (None, None) => unreachable!("a forcer either has a reference or keeps one"),
        }
        drop(record);
        self.progress.fetch_add(1, Ordering::Relaxed);
        let mut out = vec![f32::NEG_INFINITY; values.len()];
        out[forced as usize] = 0.0;
        Tensor::from_vec(out, values.len(), &Device::Cpu)
    }
}

/// Records a greedy free generation; end-of-sequence tokens are masked.
pub struct Greedy {
    masked: Vec<u32>,
    tokens: Mutex<Vec<u32>>,
    /// When each token was decided: the gaps are the decode step times.
    times: Mutex<Vec<Instant>>,
    progress: Arc<AtomicU64>,
}

impl Greedy {
    pub fn new(masked: Vec<u32>, progress: Arc<AtomicU64>) -> Self {
        Self { masked, tokens: Mutex::new(Vec::new()), times: Mutex::new(Vec::new()), progress }
    }

    pub fn tokens(&self) -> Vec<u32> {
        self.tokens.lock().expect("lock poisoned").clone()
    }

    /// Milliseconds between consecutive tokens after the first `skip` (warm-up) gaps.
    fn step_gaps_ms(&self, skip: usize) -> Vec<f64> {
        let times = self.times.lock().expect("lock poisoned");
        times.windows(2).skip(skip).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect()
    }

    /// The median step after `skip` warm-up gaps: the decode step time of a sequence running
    /// alone, robust to the machine's hiccups.
    pub fn median_step_ms(&self, skip: usize) -> Option<f64> {
        let mut gaps = self.step_gaps_ms(skip);
        if gaps.is_empty() {
            return None;
        }
        gaps.sort_by(f64::total_cmp);
        Some(gaps[gaps.len() / 2])
    }

    /// The mean step over the last `periods × period` gaps: for a policy whose steps differ by
    /// design (a refresh every `period` steps), the cost per step amortized over whole periods.
    pub fn mean_step_ms_over_periods(&self, period: usize, periods: usize) -> Option<f64> {
        let gaps = self.step_gaps_ms(0);
        let n = period * periods;
        (n > 0 && gaps.len() >= n).then(|| gaps[gaps.len() - n..].iter().sum::<f64>() / n as f64)
    }
}

impl CustomLogitsProcessor for Greedy {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> Result<Tensor> {
        let mut values: Vec<f32> = logits.to_vec1()?;
        for &t in &self.masked {
            if let Some(v) = values.get_mut(t as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        // Decide the token here (the sampler's own argmax breaks ties differently).
        let token = argmax(&values);
        self.times.lock().expect("lock poisoned").push(Instant::now());
        self.tokens.lock().expect("lock poisoned").push(token);
        self.progress.fetch_add(1, Ordering::Relaxed);
        let mut out = vec![f32::NEG_INFINITY; values.len()];
        out[token as usize] = 0.0;
        Tensor::from_vec(out, values.len(), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let p = log_softmax(&[1.0, 2.0, 3.0]);
        let q = log_softmax(&[3.0, 2.0, 1.0]);
        assert!(kl(&p, &p).abs() < 1e-9);
        assert!(kl(&p, &q) > 0.1);
        let sum: f64 = p.iter().map(|&x| (x as f64).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
}
