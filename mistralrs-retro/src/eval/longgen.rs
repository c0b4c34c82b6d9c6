//! LongGenBench-style free generation: several GSM-style problems in one prompt, answered in
//! sequence. The problems are a committed fixture made by `scripts/gen-longgen.py` from
//! reasoning-gym's seeded `gsm_symbolic` generator.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Deserialize, Clone, Debug)]
pub struct Problem {
    pub question: String,
    pub answer: String,
}

#[derive(Deserialize)]
struct Fixture {
    instructions: String,
    problems: Vec<Problem>,
}

pub struct LongGen {
    pub problems: Vec<Problem>,
    /// The user message.
    pub prompt: String,
}

/// SmolLM2-Instruct's chat template (ChatML with its default system message), applied here so the
/// request can carry token ids.
pub fn chatml(user: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

impl LongGen {
    /// The first `count` problems of the fixture (0 = all).
    pub fn load(path: &Path, count: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--longgen {}", path.display()))?;
        let fixture: Fixture = serde_json::from_str(&text).with_context(|| format!("--longgen {}", path.display()))?;
        let mut problems = fixture.problems;
        if count > 0 {
            problems.truncate(count);
        }
        let mut prompt = fixture.instructions.replace("{n}", &problems.len().to_string());
        for (i, p) in problems.iter().enumerate() {
            prompt.push_str(&format!("\n\nProblem {}: {}", i + 1, p.question));
        }
        Ok(Self { problems, prompt })
    }

    /// Final answer per problem from a generation: the first number after the last "Answer k:"
    /// (any case) in the part of the text that belongs to problem k (from its "Problem k" to the
    /// next problem's); without such a line, the last number of that part; `None` when the text
    /// never reaches problem k.
    pub fn answers(&self, text: &str) -> Vec<Option<String>> {
        let lower = text.to_lowercase();
        let n = self.problems.len();
        let mut starts: Vec<Option<usize>> = vec![None; n + 1];
        let mut from = 0;
        for (k, start) in starts.iter_mut().enumerate().take(n) {
            if let Some(at) = lower[from..].find(&format!("problem {}", k + 1)) {
                *start = Some(from + at);
                from += at + 1;
            }
        }
        (0..n)
            .map(|k| {
                let start = starts[k]?;
                let end = starts[k + 1..].iter().flatten().next().copied().unwrap_or(text.len());
                let part = &lower[start..end.max(start)];
                let marker = format!("answer {}:", k + 1);
                match part.rfind(&marker) {
                    Some(at) => first_number(&part[at + marker.len()..]),
                    None => last_number(&part[format!("problem {}", k + 1).len().min(part.len())..]),
                }
            })
            .collect()
    }

    /// Fraction of problems whose answer equals the generator's.
    pub fn correct(&self, answers: &[Option<String>]) -> f64 {
        let right = self.problems.iter().zip(answers).filter(|(p, a)| a.as_deref() == Some(normalize(&p.answer).as_str())).count();
        right as f64 / self.problems.len().max(1) as f64
    }
}

fn normalize(number: &str) -> String {
    let n = number.replace(',', "");
    let n = n.trim_end_matches('.');
    match n.split_once('.') {
        Some((int, frac)) if frac.chars().all(|c| c == '0') => int.to_string(),
        _ => n.to_string(),
    }
}

fn numbers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || (!cur.is_empty() && (c == '.' || c == ',')) || (cur.is_empty() && c == '-') {
            cur.push(c);
        } else if !cur.is_empty() {
            let n = normalize(cur.trim_end_matches([',', '.']));
            if n.chars().any(|c| c.is_ascii_digit()) {
                out.push(n);
            }
            cur.clear();
        }
    }
    out
}

fn first_number(text: &str) -> Option<String> {
    numbers(text).into_iter().next()
}

fn last_number(text: &str) -> Option<String> {
    numbers(text).pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> LongGen {
        LongGen {
            problems: vec![
                Problem { question: "q1".into(), answer: "12".into() },
                Problem { question: "q2".into(), answer: "1,500".into() },
            ],
            prompt: String::new(),
        }
    }

    #[test]
    fn answers_follow_markers_and_fall_back_to_the_last_number() {
        let g = two();
        let text = "Problem 1: 3 + 9 = 12.\nAnswer 1: 12\n\nProblem 2: 500 times 3 is 1,500 dollars.";
        assert_eq!(g.answers(text), vec![Some("12".into()), Some("1500".into())]);
        assert_eq!(g.correct(&g.answers(text)), 1.0);
        assert_eq!(g.answers("Problem 1: no idea"), vec![None, None]);
        assert_eq!(numbers("costs $-3.50, then 4."), vec!["-3.50".to_string(), "4".to_string()]);
    }
}
