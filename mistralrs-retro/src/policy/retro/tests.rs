//! The oracles of docs/design.md §5 for the sparse policies, on random data, through the real policy
//! objects (`KvPolicy` calls as paged attention makes them) over a simulated decode:
//! (a) a budget ≥ the context gives full attention; (c) `retro` with w = 1 is `quest` bit for bit;
//! (d) after its supplements, every row of the window equals its query attending to exactly the
//! union of the pages it has seen (an independent f64 dense reference with an independent Quest
//! selection). (b), the LSE merge identity, is tested beside the kernel (`cpu::selected_tests`).
//!
//! The simulation keeps every token's q/k/v fixed (a replayed row re-writes the same K/V), which
//! is what makes (d) an exact statement about what each row has attended to.

use std::sync::atomic::Ordering;

use candle_core::{DType, Device, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, KvPolicy, StepInfo};

use retro_kernels::cpu::page_bound;
use super::RetroPolicy;
use crate::policy::QuestPolicy;
use crate::config::Budget;
use retro_kernels::cpu::test_support::{assert_close, garbage_caches, Rng};

const HEAD_DIM: usize = 16;
const SCALE: f32 = 0.25;

struct Case {
    window: usize,
    group: usize,
    kv_heads: usize,
    block_size: usize,
    budget_tokens: usize,
    prompt_lens: Vec<usize>,
    steps: usize,
}

/// Fixed random q/k/v for every token of every sequence, and a paged cache to hold them.
struct World {
    heads: usize,
    kv_heads: usize,
    block_size: usize,
    /// `[seq][token][heads][HEAD_DIM]`
    queries: Vec<Vec<f32>>,
    /// `[seq][token][kv_heads][HEAD_DIM]`
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    key_cache: Tensor,
    value_cache: Tensor,
    tables: Vec<Vec<u32>>,
    block_tables: Tensor,
}

impl World {
    fn new(rng: &mut Rng, case: &Case) -> Self {
        let heads = case.kv_heads * case.group;
        let max_lens: Vec<usize> = case.prompt_lens.iter().map(|p| p + case.steps).collect();
        let pages: Vec<usize> = max_lens.iter().map(|l| l.div_ceil(case.block_size)).collect();
        let num_blocks = pages.iter().sum::<usize>() + 2;
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        rng.shuffle(&mut free);
        let width = pages.iter().copied().max().unwrap();
        let mut next = free.into_iter();
        let tables: Vec<Vec<u32>> =
            pages.iter().map(|&n| (0..width).map(|p| if p < n { next.next().unwrap() } else { 0 }).collect()).collect();
        let block_tables =
            Tensor::from_vec(tables.concat(), (tables.len(), width), &Device::Cpu).unwrap();
        let (key_cache, value_cache) =
            garbage_caches(rng, num_blocks, case.kv_heads, HEAD_DIM, case.block_size, DType::F32);
        let mut random = |n: usize| (0..n).map(|_| rng.uniform()).collect::<Vec<f32>>();
        let queries = max_lens.iter().map(|&l| random(l * heads * HEAD_DIM)).collect();
        let keys = max_lens.iter().map(|&l| random(l * case.kv_heads * HEAD_DIM)).collect();
        let values = max_lens.iter().map(|&l| random(l * case.kv_heads * HEAD_DIM)).collect();
        Self {
            heads,
            kv_heads: case.kv_heads,
            block_size: case.block_size,
            queries,
            keys,
            values,
            key_cache,
            value_cache,
            tables,
            block_tables,
        }
    }

    fn allocation(&self) -> Vec<(Tensor, Tensor)> {
        vec![(self.key_cache.clone(), self.value_cache.clone())]
    }

    fn slot(&self, seq: usize, pos: usize) -> i64 {
        (self.tables[seq][pos / self.block_size] as usize * self.block_size + pos % self.block_size) as i64
    }

    /// Rows `(seq, pos)` in batch order → (key, value, query) tensors.
    fn rows(&self, rows: &[(usize, usize)]) -> (Tensor, Tensor, Tensor) {
        let kv = self.kv_heads * HEAD_DIM;
        let q = self.heads * HEAD_DIM;
        let gather = |src: &Vec<Vec<f32>>, len: usize| -> Vec<f32> {
            rows.iter().flat_map(|&(s, p)| src[s][p * len..(p + 1) * len].iter().copied()).collect()
        };
        let n = rows.len();
        (
            Tensor::from_vec(gather(&self.keys, kv), (n, self.kv_heads, HEAD_DIM), &Device::Cpu).unwrap(),
            Tensor::from_vec(gather(&self.values, kv), (n, self.kv_heads, HEAD_DIM), &Device::Cpu).unwrap(),
            Tensor::from_vec(gather(&self.queries, q), (n, self.heads, HEAD_DIM), &Device::Cpu).unwrap(),
        )
    }

    /// Quest's selection for the query of (seq, pos) over the first `ctx` tokens, computed from the
    /// original keys (an independent reference for the policy's plan).
    fn quest_pages(&self, seq: usize, pos: usize, ctx: usize, kv_head: usize, budget: usize) -> Vec<usize> {
        let pages = ctx.div_ceil(self.block_size);
        // Quest's rule, written out again: the first and last page always, so at least two.
        let keep = Budget::Tokens(budget).pages(ctx, self.block_size).max(2);
        if keep >= pages {
            return (0..pages).collect();
        }
        let group = self.heads / self.kv_heads;
        let mut scored: Vec<(f32, usize)> = (1..pages - 1)
            .map(|page| {
                let mut bounds = vec![f32::INFINITY; HEAD_DIM];
                bounds.extend(vec![f32::NEG_INFINITY; HEAD_DIM]);
                for t in page * self.block_size..((page + 1) * self.block_size).min(ctx) {
                    let k = &self.keys[seq][(t * self.kv_heads + kv_head) * HEAD_DIM..][..HEAD_DIM];
                    for d in 0..HEAD_DIM {
                        bounds[d] = bounds[d].min(k[d]);
                        bounds[HEAD_DIM + d] = bounds[HEAD_DIM + d].max(k[d]);
                    }
                }
                let score = (0..group)
                    .map(|g| {
                        let q = &self.queries[seq][(pos * self.heads + kv_head * group + g) * HEAD_DIM..][..HEAD_DIM];
                        page_bound(q, &bounds)
                    })
                    .sum::<f32>();
                (score, page)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut chosen: Vec<usize> = scored.iter().take(keep - 2).map(|&(_, p)| p).collect();
        chosen.extend([0, pages - 1]);
        chosen.sort_unstable();
        chosen
    }

    /// Oracle (d) for a decoded row: (seq, pos)'s query attending to the union of the Quest
    /// selections of every step it has been through as the newest row or a replayed one, up to the
    /// step with context `ctx`.
    fn union_row(&self, seq: usize, pos: usize, ctx: usize, budget: usize) -> Vec<f32> {
        let seen: Vec<Vec<usize>> = (0..self.kv_heads)
            .map(|h| {
                let mut pages: Vec<usize> =
                    (pos..ctx).flat_map(|newest| self.quest_pages(seq, newest, newest + 1, h, budget)).collect();
                pages.sort_unstable();
                pages.dedup();
                pages
            })
            .collect();
        self.dense_row(seq, pos, |h, t| seen[h].binary_search(&(t / self.block_size)).is_ok())
    }

    /// f64 attention of (seq, pos)'s query, per head, over tokens `t <= pos` with `allowed(kv_head, t)`.
    fn dense_row(&self, seq: usize, pos: usize, allowed: impl Fn(usize, usize) -> bool) -> Vec<f32> {
        let group = self.heads / self.kv_heads;
        let mut out = vec![0f32; self.heads * HEAD_DIM];
        for head in 0..self.heads {
            let kv_head = head / group;
            let q = &self.queries[seq][(pos * self.heads + head) * HEAD_DIM..][..HEAD_DIM];
            let tokens: Vec<usize> = (0..=pos).filter(|&t| allowed(kv_head, t)).collect();
            let at = |t: usize| (t * self.kv_heads + kv_head) * HEAD_DIM;
            let scores: Vec<f64> = tokens
                .iter()
                .map(|&t| {
                    let k = &self.keys[seq][at(t)..at(t) + HEAD_DIM];
                    SCALE as f64 * q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..HEAD_DIM {
                let o: f64 = tokens.iter().zip(&weights).map(|(&t, w)| w * self.values[seq][at(t) + d] as f64).sum();
                out[head * HEAD_DIM + d] = (o / total) as f32;
            }
        }
        out
    }
}

/// One decode step's outputs: per sequence, `rows` rows of `[heads * HEAD_DIM]`, oldest first.
struct StepOutput {
    rows: usize,
    /// Context length per sequence (the newest row is at `ctx - 1`).
    ctx: Vec<usize>,
    out: Vec<f32>,
}

/// Prefill, then `case.steps` decode steps through `policy`, as paged attention calls it.
fn simulate(policy: &dyn KvPolicy, world: &World, case: &Case) -> Vec<StepOutput> {
    let caches = world.allocation();
    policy
        .cache_allocated(&CacheAllocation { block_size: case.block_size, num_blocks: world.key_cache.dim(0).unwrap(), dtype: DType::F32, caches: &caches })
        .unwrap();
    let seq_ids: Vec<usize> = (0..case.prompt_lens.len()).map(|s| 100 + s).collect();
    let write = |batch: &BatchInfo<'_>, rows: &[(usize, usize)], slots: Vec<i64>| {
        let (key, value, _) = world.rows(rows);
        let slot_mapping = Tensor::from_vec(slots, rows.len(), &Device::Cpu).unwrap();
        let write = CacheWrite { key: &key, value: &value, key_cache: &caches[0].0, value_cache: &caches[0].1, slot_mapping: &slot_mapping };
        assert!(policy.write_kv(batch, &write).unwrap());
    };

    let prompt_rows: Vec<(usize, usize)> =
        case.prompt_lens.iter().enumerate().flat_map(|(s, &l)| (0..l).map(move |p| (s, p))).collect();
    let slots = prompt_rows.iter().map(|&(s, p)| world.slot(s, p)).collect();
    // What the engine does: announce each step, then call every layer with its number.
    let prompt_step = StepInfo { step: 1, seq_ids: &seq_ids, seq_context_lens: &case.prompt_lens, is_prompt: true, rows: 0, block_tables: &[] };
    policy.begin_step(&prompt_step).unwrap();
    let batch = BatchInfo { layer: Some(0), seq_ids: &seq_ids, seq_context_lens: &case.prompt_lens, is_prompt: true, step: 1 };
    write(&batch, &prompt_rows, slots);
    let block_tables: Vec<Vec<usize>> =
        world.block_tables.to_vec2::<u32>().unwrap().into_iter().map(|t| t.into_iter().map(|b| b as usize).collect()).collect();

    let mut steps = Vec::new();
    for step in 0..case.steps {
        let ctx: Vec<usize> = case.prompt_lens.iter().map(|p| p + step + 1).collect();
        let rows = ctx.iter().copied().fold(policy.replay_window(), usize::min);
        let batch_rows: Vec<(usize, usize)> =
            ctx.iter().enumerate().flat_map(|(s, &c)| (c - rows..c).map(move |p| (s, p))).collect();
        // What the replay-window patch does: dense-prefill rows keep their slots.
        let slots = batch_rows
            .iter()
            .map(|&(s, p)| if rows > 1 && p < policy.dense_kv_len(seq_ids[s]) { -1 } else { world.slot(s, p) })
            .collect();
        let number = 2 + step as u64;
        policy
            .begin_step(&StepInfo { step: number, seq_ids: &seq_ids, seq_context_lens: &ctx, is_prompt: false, rows, block_tables: &block_tables })
            .unwrap();
        let batch = BatchInfo { layer: Some(0), seq_ids: &seq_ids, seq_context_lens: &ctx, is_prompt: false, step: number };
        write(&batch, &batch_rows, slots);
        let (_, _, query) = world.rows(&batch_rows);
        let context_lens = Tensor::from_vec(ctx.iter().map(|&c| c as u32).collect::<Vec<_>>(), ctx.len(), &Device::Cpu).unwrap();
        let attn = DecodeAttention {
            query: &query,
            key_cache: &caches[0].0,
            value_cache: &caches[0].1,
            block_tables: &world.block_tables,
            context_lens: &context_lens,
            max_context_len: *ctx.iter().max().unwrap(),
            softmax_scale: SCALE,
            softcap: None,
            alibi_slopes: None,
            sinks: None,
        };
        let out = policy.decode_attention(&batch, &attn).unwrap().expect("the policy handles decode");
        let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        steps.push(StepOutput { rows, ctx, out });
    }
    for &id in &seq_ids {
        policy.sequence_freed(id);
    }
    steps
}

fn row_out<'a>(step: &'a StepOutput, seq: usize, row: usize, row_len: usize) -> &'a [f32] {
    let at = seq * step.rows + row;
    &step.out[at * row_len..(at + 1) * row_len]
}

/// Oracle (d): every row equals attention over exactly the pages it has seen.
fn check_union_oracle(case: &Case, seed: u64) {
    let mut rng = Rng::new(seed);
    let world = World::new(&mut rng, case);
    let policy = RetroPolicy::new(Budget::Tokens(case.budget_tokens), 0, case.window, 8);
    let steps = simulate(&policy, &world, case);
    let row_len = world.heads * HEAD_DIM;
    for (index, step) in steps.iter().enumerate() {
        for (seq, &ctx) in step.ctx.iter().enumerate() {
            let prompt = case.prompt_lens[seq];
            for row in 0..step.rows {
                let pos = ctx - step.rows + row;
                let expected = if pos < prompt {
                    world.dense_row(seq, pos, |_, _| true)
                } else {
                    // Row `pos` was the newest at step `pos - prompt` and has been replayed since.
                    world.union_row(seq, pos, ctx, case.budget_tokens)
                };
                assert_close(
                    row_out(step, seq, row, row_len),
                    &expected,
                    2e-5,
                    &format!("w={} group={} step {index} seq {seq} row {row} (pos {pos})", case.window, case.group),
                );
            }
        }
    }
    assert_eq!(policy.pool_blocks_in_use(), 0, "every block is back in the pool");
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for window in [1, 2, 4, 8] {
        for (group, kv_heads) in [(1, 2), (3, 2)] {
            for block_size in [8, 16] {
                cases.push(Case {
                    window,
                    group,
                    kv_heads,
                    block_size,
                    budget_tokens: 3 * block_size,
                    // Ragged: one shorter than the window, one within a page, two long.
                    prompt_lens: vec![3, block_size + 5, 5 * block_size + 1, 7 * block_size - 2],
                    steps: 2 * block_size + 3,
                });
            }
        }
    }
    cases
}

#[test]
fn every_row_attends_to_exactly_the_union_of_pages_it_has_seen() {
    for (i, case) in cases().iter().enumerate() {
        check_union_oracle(case, 1000 + i as u64);
    }
}

/// Refresh steps (`refresh_every`): every row of such a step attends to everything, and a row a
/// refresh step covered stays dense while it is in the window; the other rows keep oracle (d).
#[test]
fn refresh_steps_attend_densely_and_their_rows_stay_dense() {
    for (i, case) in cases().into_iter().filter(|c| c.block_size == 8).enumerate() {
        let every = case.window + 3;
        let mut rng = Rng::new(5000 + i as u64);
        let world = World::new(&mut rng, &case);
        let policy = RetroPolicy::new(Budget::Tokens(case.budget_tokens), 0, case.window, 8).with_refresh(every);
        policy.keep_sequence_numbers();
        let steps = simulate(&policy, &world, &case);
        let row_len = world.heads * HEAD_DIM;
        let refreshes: Vec<usize> = (0..steps.len()).filter(|&s| steps[s].rows > case.window).collect();
        assert!(refreshes.len() >= case.steps / every - 1, "w={}: refresh steps {refreshes:?}", case.window);
        for (index, step) in steps.iter().enumerate() {
            for (seq, &ctx) in step.ctx.iter().enumerate() {
                let prompt = case.prompt_lens[seq];
                for row in 0..step.rows {
                    let pos = ctx - step.rows + row;
                    // Row `pos` was the newest at step `pos - prompt`.
                    let refreshed = pos < prompt || refreshes.iter().any(|&r| r <= index && r + prompt >= pos);
                    let expected = if refreshed {
                        world.dense_row(seq, pos, |_, _| true)
                    } else {
                        world.union_row(seq, pos, ctx, case.budget_tokens)
                    };
                    let what = format!("w={} every {every} group={} step {index} seq {seq} pos {pos}", case.window, case.group);
                    assert_close(row_out(step, seq, row, row_len), &expected, 2e-5, &what);
                }
            }
        }
        for (seq, &prompt) in case.prompt_lens.iter().enumerate() {
            // Every refresh step reads every page of the context once per KV head (one layer here).
            let expected: usize = refreshes.iter().map(|&r| (prompt + r + 1).div_ceil(case.block_size) * world.kv_heads).sum();
            let numbers = policy.sequence_numbers(100 + seq).expect("numbers kept");
            assert_eq!(numbers.refresh_pages, expected as u64, "w={} seq {seq}", case.window);
        }
    }
}

#[test]
fn a_budget_covering_the_context_is_full_attention() {
    for (i, mut case) in cases().into_iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        case.budget_tokens = 10_000;
        let mut rng = Rng::new(2000 + i as u64);
        let world = World::new(&mut rng, &case);
        for policy in [
            Box::new(RetroPolicy::new(Budget::Tokens(case.budget_tokens), 0, case.window, 8)) as Box<dyn KvPolicy>,
            Box::new(QuestPolicy::new(Budget::Tokens(case.budget_tokens), 0)),
        ] {
            let steps = simulate(policy.as_ref(), &world, &case);
            let row_len = world.heads * HEAD_DIM;
            for step in &steps {
                for (seq, &ctx) in step.ctx.iter().enumerate() {
                    for row in 0..step.rows {
                        let pos = ctx - step.rows + row;
                        let what = format!("{} w={} seq {seq} pos {pos}", policy.name(), case.window);
                        assert_close(row_out(step, seq, row, row_len), &world.dense_row(seq, pos, |_, _| true), 2e-5, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn retro_with_a_window_of_one_is_quest_bit_for_bit() {
    for (i, case) in cases().into_iter().filter(|c| c.window == 1).enumerate() {
        let mut rng = Rng::new(3000 + i as u64);
        let world = World::new(&mut rng, &case);
        let budget = Budget::Tokens(case.budget_tokens);
        let retro = simulate(&RetroPolicy::new(budget, 0, 1, 8), &world, &case);
        let quest = simulate(&QuestPolicy::new(budget, 0), &world, &case);
        for (r, q) in retro.iter().zip(&quest) {
            assert_eq!(r.out, q.out, "retro w=1 differs from quest");
        }
    }
}

#[test]
fn a_dry_pool_runs_the_sequences_without_a_block_as_quest() {
    let case = Case { window: 4, group: 3, kv_heads: 2, block_size: 8, budget_tokens: 24, prompt_lens: vec![40, 57], steps: 20 };
    let mut rng = Rng::new(4000);
    let world = World::new(&mut rng, &case);
    let budget = Budget::Tokens(case.budget_tokens);
    let retro = RetroPolicy::new(budget, 0, case.window, 1);
    let steps = simulate(&retro, &world, &case);
    assert_eq!(retro.degraded_sequences(), 1);
    assert_eq!(retro.pool_blocks_in_use(), 0);
    let row_len = world.heads * HEAD_DIM;
    for step in &steps {
        // The second sequence found the pool dry: its newest row is quest's, its older rows are
        // left alone (zero, and their K/V are not rewritten).
        let ctx = step.ctx[1];
        let pages: Vec<Vec<usize>> =
            (0..world.kv_heads).map(|h| world.quest_pages(1, ctx - 1, ctx, h, case.budget_tokens)).collect();
        let expected = world.dense_row(1, ctx - 1, |h, t| pages[h].binary_search(&(t / world.block_size)).is_ok());
        assert_close(row_out(step, 1, step.rows - 1, row_len), &expected, 2e-5, "degraded newest row");
        for row in 0..step.rows - 1 {
            assert!(row_out(step, 1, row, row_len).iter().all(|&x| x == 0.0), "degraded past rows are not attended");
        }
    }
}

impl RetroPolicy {
    fn pool_blocks_in_use(&self) -> usize {
        self.pool_totals().blocks_in_use.load(Ordering::Relaxed)
    }

    fn degraded_sequences(&self) -> u64 {
        self.pool_totals().degraded_sequences.load(Ordering::Relaxed)
    }
}
