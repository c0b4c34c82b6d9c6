//! Tests of `paged_decode_selected`, its reference and `merge_partial`.

use super::decode::{decode_lists, DecodeInputs};
use crate::selection::{all_rows_mask, merge_partial, PageSelection};
use super::test_support::{
    assert_close, dense_attention, paged_batch, to_f32_vec, PagedBatch, Rng,
};
use super::{
    paged_decode, paged_decode_selected, paged_decode_selected_reference, AttentionWithLse,
};
use candle_core::{DType, Tensor};

fn selected(
    batch: &PagedBatch,
    query: &Tensor,
    selection: &PageSelection,
    scale: f32,
    softcap: Option<f32>,
) -> AttentionWithLse {
    paged_decode_selected(
        query,
        &batch.key_cache,
        &batch.value_cache,
        &batch.block_tables,
        &batch.context_lens,
        selection,
        scale,
        softcap,
    )
    .unwrap()
}

fn selected_reference(
    batch: &PagedBatch,
    query: &Tensor,
    selection: &PageSelection,
    scale: f32,
    softcap: Option<f32>,
) -> AttentionWithLse {
    paged_decode_selected_reference(
        query,
        &batch.key_cache,
        &batch.value_cache,
        &batch.block_tables,
        &batch.context_lens,
        selection,
        scale,
        softcap,
    )
    .unwrap()
}

/// Dense f64 attention from the original K/V over exactly the tokens `selection` allows.
fn dense_selected(
    batch: &PagedBatch,
    query: &Tensor,
    selection: &PageSelection,
    block_size: usize,
    scale: f32,
    softcap: Option<f32>,
) -> (Vec<f32>, Vec<f32>) {
    dense_attention(batch, query, scale, softcap, |seq, row, kv_head, t| {
        selection
            .list(seq, kv_head)
            .iter()
            .any(|u| u.page as usize == t / block_size && (u.rows >> row) & 1 == 1)
    })
}

/// Equal infinities, or finite and within `tol * max(1, |expected|)`.
fn assert_lse_close(actual: &[f32], expected: &[f32], tol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lse length");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok = if e == f32::NEG_INFINITY {
            a == e
        } else {
            (a - e).abs() <= tol * e.abs().max(1.0)
        };
        assert!(ok, "{what}: lse {a} at {i}, expected {e}");
    }
}

/// Random subsets of each (seq, kv head)'s pages (sometimes none, sometimes all) with random row
/// masks; some lists drop a row from every page, so that row attends to nothing for that head.
fn random_selection(
    rng: &mut Rng,
    lens: &[usize],
    block_size: usize,
    kv_heads: usize,
    rows: usize,
) -> PageSelection {
    let all_rows = all_rows_mask(rows);
    let mut selection = PageSelection::new(kv_heads);
    for &len in lens {
        for _ in 0..kv_heads {
            let percent = [0, 10, 50, 100][rng.below(4)];
            let dropped_row = if rng.below(3) == 0 {
                !(1u32 << rng.below(rows))
            } else {
                u32::MAX
            };
            for page in 0..len.div_ceil(block_size) {
                if rng.below(100) < percent {
                    let mask = if rng.below(2) == 0 {
                        all_rows
                    } else {
                        rng.next_u64() as u32 & all_rows
                    };
                    selection.push(page as u32, mask & dropped_row);
                }
            }
            selection.finish_list();
        }
    }
    selection
}

struct Case {
    dtype: DType,
    block_size: usize,
    heads: usize,
    kv_heads: usize,
    rows: usize,
    softcap: Option<f32>,
}

/// Kernel vs reference vs dense for one random selection; returns how many (row, head) pairs
/// attended to nothing.
fn check_case(rng: &mut Rng, case: &Case, lens: &[usize], rel_tol: f32) -> usize {
    let head_dim = 64;
    let batch = paged_batch(
        rng,
        lens,
        case.kv_heads,
        head_dim,
        case.block_size,
        case.dtype,
    );
    let amplitude = if case.softcap.is_some() { 16.0 } else { 4.0 };
    let query = rng.tensor(
        &[lens.len() * case.rows, case.heads, head_dim],
        amplitude,
        case.dtype,
    );
    let selection = random_selection(rng, lens, case.block_size, case.kv_heads, case.rows);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let what = format!(
        "{:?} block {} heads {}/{} rows {} softcap {:?}",
        case.dtype, case.block_size, case.heads, case.kv_heads, case.rows, case.softcap
    );

    let got = selected(&batch, &query, &selection, scale, case.softcap);
    let reference = selected_reference(&batch, &query, &selection, scale, case.softcap);
    let (dense_out, dense_lse) = dense_selected(
        &batch,
        &query,
        &selection,
        case.block_size,
        scale,
        case.softcap,
    );
    assert_eq!(got.out.dims(), query.dims());
    assert_eq!(got.out.dtype(), case.dtype);
    let (out, ref_out) = (to_f32_vec(&got.out), to_f32_vec(&reference.out));
    assert_close(
        &out,
        &ref_out,
        rel_tol,
        &format!("kernel vs reference: {what}"),
    );
    assert_close(
        &ref_out,
        &dense_out,
        rel_tol,
        &format!("reference vs dense: {what}"),
    );
    assert_lse_close(
        &got.lse,
        &reference.lse,
        rel_tol,
        &format!("kernel vs reference: {what}"),
    );
    assert_lse_close(
        &reference.lse,
        &dense_lse,
        rel_tol,
        &format!("reference vs dense: {what}"),
    );

    let mut empty = 0;
    for (at, &lse) in dense_lse.iter().enumerate() {
        if lse == f32::NEG_INFINITY {
            empty += 1;
            assert_eq!(got.lse[at], f32::NEG_INFINITY, "{what}: empty row lse");
            assert!(
                out[at * head_dim..(at + 1) * head_dim]
                    .iter()
                    .all(|&o| o == 0.0),
                "{what}: empty row {at} has nonzero output"
            );
        }
    }
    empty
}

fn check_all_shapes(dtype: DType, rel_tol: f32, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut empty = 0;
    for block_size in [8, 16, 32] {
        let lens = [1, block_size - 1, block_size, block_size + 1, 300, 1000];
        for (heads, kv_heads) in [(3, 3), (9, 3), (8, 2)] {
            for rows in [1, 2, 4, 8] {
                for softcap in [None, Some(30.0)] {
                    let case = Case {
                        dtype,
                        block_size,
                        heads,
                        kv_heads,
                        rows,
                        softcap,
                    };
                    empty += check_case(&mut rng, &case, &lens, rel_tol);
                }
            }
        }
    }
    assert!(
        empty > 0,
        "the random selections should leave some rows empty"
    );
}

#[test]
fn selected_f32_matches_reference_and_dense() {
    check_all_shapes(DType::F32, 1e-5, 40);
}

#[test]
fn selected_bf16_matches_reference_and_dense() {
    check_all_shapes(DType::BF16, 2e-2, 41);
}

#[test]
fn forced_splits_over_uneven_lists_merge_exactly() {
    let mut rng = Rng::new(42);
    let lens = [1000, 37, 513, 16, 0];
    let (block_size, kv_heads, rows) = (16, 2, 3);
    let batch = paged_batch(&mut rng, &lens, kv_heads, 64, block_size, DType::F32);
    let query = rng.tensor(&[lens.len() * rows, 6, 64], 6.0, DType::F32);
    let (kc, vc, bt, cl) = (
        &batch.key_cache,
        &batch.value_cache,
        &batch.block_tables,
        &batch.context_lens,
    );
    let inputs = DecodeInputs::read(&query, kc, vc, bt, cl).unwrap();
    for softcap in [None, Some(30.0)] {
        let selection = random_selection(&mut rng, &lens, block_size, kv_heads, rows);
        let (dense_out, dense_lse) =
            dense_selected(&batch, &query, &selection, block_size, 0.088, softcap);
        // 1 is the most splits possible; 5 and 7 leave ragged tails and empty tasks for the
        // shorter list of a sequence; 64 keeps every list in one task.
        for pages_per_split in [1, 5, 7, 64] {
            let (out, lse) = decode_lists(
                &inputs,
                kc,
                vc,
                &selection,
                0.088,
                softcap,
                Some(pages_per_split),
            )
            .unwrap();
            let what = format!("{pages_per_split} pages per split, softcap {softcap:?}");
            assert_close(&out, &dense_out, 1e-5, &what);
            assert_lse_close(&lse, &dense_lse, 1e-5, &what);
        }
    }
}

#[test]
fn all_pages_selection_equals_paged_decode_and_dense_lse() {
    let mut rng = Rng::new(43);
    for (dtype, block_size, heads, kv_heads, rows, softcap) in [
        (DType::F32, 16, 9, 3, 1, None),
        (DType::F32, 8, 8, 2, 3, Some(30.0)),
        (DType::BF16, 32, 3, 3, 8, None),
        (DType::F16, 16, 8, 2, 32, Some(30.0)),
    ] {
        let lens = [1, block_size - 1, block_size, block_size + 1, 300, 1000];
        let batch = paged_batch(&mut rng, &lens, kv_heads, 64, block_size, dtype);
        let query = rng.tensor(&[lens.len() * rows, heads, 64], 4.0, dtype);
        let selection = PageSelection::all_pages(&lens, block_size, kv_heads, rows);
        let got = selected(&batch, &query, &selection, 0.125, softcap);
        let dense = paged_decode(
            &query,
            &batch.key_cache,
            &batch.value_cache,
            &batch.block_tables,
            &batch.context_lens,
            0.125,
            softcap,
        )
        .unwrap();
        let what = format!("{dtype:?} block {block_size} heads {heads}/{kv_heads} rows {rows}");
        // Dense tasks walk every kv head and so split the pages differently: the f32 sums agree to
        // rounding, which can move a 16-bit output by one unit in the last place.
        let tol = match dtype {
            DType::F16 => 1e-3,
            DType::BF16 => 8e-3,
            _ => 1e-6,
        };
        assert_close(&to_f32_vec(&got.out), &to_f32_vec(&dense), tol, &what);
        let (_, dense_lse) = dense_attention(&batch, &query, 0.125, softcap, |_, _, _, _| true);
        assert_lse_close(&got.lse, &dense_lse, 1e-5, &what);
    }
}

/// Merges `b` into `a` per (query row, head).
fn merge_all(a: &AttentionWithLse, b: &AttentionWithLse) -> (Vec<f32>, Vec<f32>) {
    let (mut out, mut lse) = (to_f32_vec(&a.out), a.lse.clone());
    let out_b = to_f32_vec(&b.out);
    let head_dim = out.len() / lse.len();
    for (i, (o, l)) in out
        .chunks_exact_mut(head_dim)
        .zip(lse.iter_mut())
        .enumerate()
    {
        merge_partial(o, l, &out_b[i * head_dim..(i + 1) * head_dim], b.lse[i]);
    }
    (out, lse)
}

/// Splits each entry of `whole` between two selections: whole pages (`by_rows` false) or the
/// entry's rows (`by_rows` true, the page then sits in both lists, possibly with an empty mask).
fn split_selection(
    rng: &mut Rng,
    whole: &PageSelection,
    lists: usize,
    by_rows: bool,
) -> (PageSelection, PageSelection) {
    let mut a = PageSelection::new(whole.kv_heads);
    let mut b = PageSelection::new(whole.kv_heads);
    for list in 0..lists {
        for u in &whole.entries[whole.offsets[list]..whole.offsets[list + 1]] {
            if by_rows {
                let to_a = u.rows & rng.next_u64() as u32;
                a.push(u.page, to_a);
                b.push(u.page, u.rows & !to_a);
            } else if rng.below(2) == 0 {
                a.push(u.page, u.rows);
            } else {
                b.push(u.page, u.rows);
            }
        }
        a.finish_list();
        b.finish_list();
    }
    (a, b)
}

#[test]
fn merging_disjoint_halves_equals_attention_over_their_union() {
    let mut rng = Rng::new(44);
    let lens = [1000, 300, 17, 1];
    let (block_size, kv_heads) = (16, 2);
    for rows in [1, 4] {
        let batch = paged_batch(&mut rng, &lens, kv_heads, 64, block_size, DType::F32);
        let query = rng.tensor(&[lens.len() * rows, 6, 64], 8.0, DType::F32);
        for softcap in [None, Some(30.0)] {
            let whole_sel = random_selection(&mut rng, &lens, block_size, kv_heads, rows);
            let whole = selected(&batch, &query, &whole_sel, 0.125, softcap);
            for by_rows in [false, true] {
                let (sel_a, sel_b) =
                    split_selection(&mut rng, &whole_sel, lens.len() * kv_heads, by_rows);
                let a = selected(&batch, &query, &sel_a, 0.125, softcap);
                let b = selected(&batch, &query, &sel_b, 0.125, softcap);
                let (out, lse) = merge_all(&a, &b);
                let what = format!("rows {rows} softcap {softcap:?} split by rows {by_rows}");
                assert!(out.iter().chain(&lse).all(|x| !x.is_nan()), "{what}: NaN");
                assert_close(&out, &to_f32_vec(&whole.out), 1e-5, &what);
                assert_lse_close(&lse, &whole.lse, 1e-5, &what);
            }

            // An empty selection attends to nothing; merging it either way changes nothing.
            let none = PageSelection::all_pages(&lens, block_size, kv_heads, 0);
            let empty = selected(&batch, &query, &none, 0.125, softcap);
            assert!(empty.lse.iter().all(|&l| l == f32::NEG_INFINITY));
            assert!(to_f32_vec(&empty.out).iter().all(|&o| o == 0.0));
            for (merged, what) in [
                (merge_all(&whole, &empty), "whole + empty"),
                (merge_all(&empty, &whole), "empty + whole"),
            ] {
                assert_eq!(merged.0, to_f32_vec(&whole.out), "{what}");
                assert_eq!(merged.1, whole.lse, "{what}");
            }
            let (out, lse) = merge_all(&empty, &empty);
            assert!(out.iter().all(|&o| o == 0.0) && lse.iter().all(|&l| l == f32::NEG_INFINITY));
        }
    }
}

#[test]
fn a_selected_page_never_shows_a_row_tokens_past_its_causal_limit() {
    let mut rng = Rng::new(45);
    // Page 2 holds tokens 16..20 of sequence 0 and only token 16 of sequence 1.
    let lens = [20, 17];
    let (block_size, kv_heads, heads, rows, head_dim) = (8, 1, 2, 4, 64);
    let batch = paged_batch(&mut rng, &lens, kv_heads, head_dim, block_size, DType::F32);
    let query = rng.tensor(&[lens.len() * rows, heads, head_dim], 4.0, DType::F32);
    let mut selection = PageSelection::new(kv_heads);
    for _ in lens {
        selection.push(2, all_rows_mask(rows));
        selection.finish_list();
    }
    let got = selected(&batch, &query, &selection, 0.125, None);
    let out = to_f32_vec(&got.out);
    let q = to_f32_vec(&query);
    let at = |seq: usize, row: usize, head: usize| (seq * rows + row) * heads + head;

    // Sequence 0, row 0 sees 17 tokens, so of page 2 only token 16: attention is that one value,
    // where ignoring the causal limit would mix in tokens 17-19.
    for head in 0..heads {
        let i = at(0, 0, head);
        let key = &batch.keys[0][16 * head_dim..17 * head_dim];
        let score: f32 = 0.125
            * q[i * head_dim..(i + 1) * head_dim]
                .iter()
                .zip(key)
                .map(|(a, b)| a * b)
                .sum::<f32>();
        assert_close(
            &out[i * head_dim..(i + 1) * head_dim],
            &batch.values[0][16 * head_dim..17 * head_dim],
            1e-6,
            "row 0 sees token 16 only",
        );
        assert!(
            (got.lse[i] - score).abs() < 1e-5,
            "lse {} vs score {score}",
            got.lse[i]
        );
    }
    // Sequence 1: rows 0-2 see 14-16 tokens, none of page 2; row 3 sees token 16.
    for row in 0..rows {
        for head in 0..heads {
            let i = at(1, row, head);
            let o = &out[i * head_dim..(i + 1) * head_dim];
            if row < 3 {
                assert_eq!(got.lse[i], f32::NEG_INFINITY, "row {row}");
                assert!(o.iter().all(|&x| x == 0.0), "row {row}");
            } else {
                assert_close(
                    o,
                    &batch.values[1][16 * head_dim..17 * head_dim],
                    1e-6,
                    "row 3",
                );
            }
        }
    }
    let (dense_out, dense_lse) =
        dense_selected(&batch, &query, &selection, block_size, 0.125, None);
    assert_close(&out, &dense_out, 1e-5, "vs dense");
    assert_lse_close(&got.lse, &dense_lse, 1e-5, "vs dense");
}

#[test]
fn bad_selections_are_errors() {
    let mut rng = Rng::new(46);
    let lens = [20, 9];
    let batch = paged_batch(&mut rng, &lens, 2, 64, 8, DType::F32);
    let query = rng.tensor(&[4, 4, 64], 1.0, DType::F32);
    let run = |query: &Tensor, selection: &PageSelection| {
        let args = (
            &batch.key_cache,
            &batch.value_cache,
            &batch.block_tables,
            &batch.context_lens,
        );
        let kernel =
            paged_decode_selected(query, args.0, args.1, args.2, args.3, selection, 0.1, None);
        let reference = paged_decode_selected_reference(
            query, args.0, args.1, args.2, args.3, selection, 0.1, None,
        );
        assert_eq!(kernel.is_ok(), reference.is_ok());
        kernel.is_ok()
    };
    let valid = PageSelection::all_pages(&lens, 8, 2, 2);
    assert!(run(&query, &valid));

    let mut s = valid.clone();
    s.offsets.pop();
    assert!(!run(&query, &s), "offsets length");
    assert!(
        !run(&query, &PageSelection::all_pages(&lens, 8, 1, 2)),
        "kv heads"
    );
    let mut s = valid.clone();
    s.entries[1].page = 0;
    assert!(!run(&query, &s), "pages not ascending");
    let mut s = valid.clone();
    s.entries[2].page = 3;
    assert!(!run(&query, &s), "page past the sequence");
    let mut s = valid.clone();
    s.entries[0].rows = 0b100;
    assert!(!run(&query, &s), "row past the query rows");
    assert!(
        run(&query, &PageSelection::all_pages(&lens, 8, 2, 1)),
        "masks naming fewer rows than the query has are fine"
    );

    let tall = rng.tensor(&[2 * 33, 4, 64], 1.0, DType::F32);
    let mut s = PageSelection::new(2);
    for _ in 0..4 {
        s.finish_list();
    }
    assert!(!run(&tall, &s), "33 rows");
    let softcap = paged_decode_selected(
        &query,
        &batch.key_cache,
        &batch.value_cache,
        &batch.block_tables,
        &batch.context_lens,
        &valid,
        0.1,
        Some(-1.0),
    );
    assert!(softcap.is_err(), "softcap");
}

/// `cargo test --release -p mistralrs-retro --lib cpu::selected_tests::bench -- --ignored --nocapture`
#[test]
#[ignore = "timing report, not a check"]
fn bench_selected_decode() {
    let mut rng = Rng::new(47);
    let block_size = 16;
    for dtype in [DType::F32, DType::BF16] {
        for (sequences, tokens, heads, kv_heads, head_dim, rows) in [
            (1, 32768, 32, 8, 128, 1),
            (1, 32768, 32, 8, 128, 4),
            (8, 4096, 32, 8, 128, 1),
        ] {
            let lens = vec![tokens; sequences];
            let batch = paged_batch(&mut rng, &lens, kv_heads, head_dim, block_size, dtype);
            let query = rng.tensor(&[sequences * rows, heads, head_dim], 1.0, dtype);
            let time = |f: &dyn Fn()| {
                f();
                let iterations = 10;
                let start = std::time::Instant::now();
                for _ in 0..iterations {
                    f();
                }
                start.elapsed().as_secs_f64() * 1e3 / iterations as f64
            };
            let dense = time(&|| {
                paged_decode(
                    &query,
                    &batch.key_cache,
                    &batch.value_cache,
                    &batch.block_tables,
                    &batch.context_lens,
                    0.1,
                    None,
                )
                .unwrap();
            });
            let all = PageSelection::all_pages(&lens, block_size, kv_heads, rows);
            let all_ms = time(&|| {
                selected(&batch, &query, &all, 0.1, None);
            });
            // Quest-like: an eighth of the pages per kv head, random per head.
            let mut eighth = PageSelection::new(kv_heads);
            for _ in 0..sequences * kv_heads {
                for page in 0..tokens.div_ceil(block_size) {
                    if rng.below(8) == 0 {
                        eighth.push(page as u32, all_rows_mask(rows));
                    }
                }
                eighth.finish_list();
            }
            let eighth_ms = time(&|| {
                selected(&batch, &query, &eighth, 0.1, None);
            });
            println!(
                "{dtype:?} {sequences}x{tokens} heads {heads}/{kv_heads} d{head_dim} rows {rows}: paged_decode {dense:.3} ms, selected all {all_ms:.3} ms, selected 1/8 {eighth_ms:.3} ms"
            );
        }
    }
}

/// Fuzzing: random shapes (block size, GQA ratio, window rows, ragged lengths including empty and
/// one-token contexts, random page lists and row masks, softcap) through the kernel, the reference
/// and the dense f64 attention. `PROPTEST_CASES` sets the count: CI runs the default 512; the full
/// run is `PROPTEST_CASES=100000 cargo test --release -p retro-kernels --lib fuzz_`.
mod fuzz {
    use super::*;
    use super::super::test_support::Rng;
    use proptest::prelude::*;

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn fuzz_selected_decode_matches_reference_and_dense(
            seed in any::<u64>(),
            half in any::<bool>(),
            block_size in prop::sample::select(vec![8usize, 16, 32]),
            kv_heads in 1usize..4,
            group in 1usize..5,
            rows in 1usize..9,
            lens in prop::collection::vec(0usize..150, 1..5),
            softcap in prop::option::of(5.0f32..50.0),
        ) {
            let (dtype, tol) = if half { (DType::BF16, 2e-2) } else { (DType::F32, 1e-5) };
            let case = Case { dtype, block_size, heads: kv_heads * group, kv_heads, rows, softcap };
            check_case(&mut Rng::new(seed), &case, &lens, tol);
        }
    }
}
