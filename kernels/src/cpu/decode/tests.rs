//! Tests of the decode kernels' split plan, SIMD helpers and results against the reference.

use super::super::reference::paged_decode_reference;
use super::super::test_support::{
    assert_close, dense_decode, paged_batch, to_f32_vec, PagedBatch, Rng,
};
use super::kernel::*;
use super::*;

#[derive(Debug)]
struct Case {
    dtype: DType,
    block_size: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rows: usize,
    softcap: Option<f32>,
}

fn decode_args(batch: &PagedBatch) -> (&Tensor, &Tensor, &Tensor, &Tensor) {
    (
        &batch.key_cache,
        &batch.value_cache,
        &batch.block_tables,
        &batch.context_lens,
    )
}

/// Checks `paged_decode` against the reference and the dense f64 attention, and the reference
/// against the dense one.
fn check_case(rng: &mut Rng, case: &Case, lens: &[usize], rel_tol: f32) {
    let batch = paged_batch(
        rng,
        lens,
        case.kv_heads,
        case.head_dim,
        case.block_size,
        case.dtype,
    );
    // Larger queries with a softcap, so that the cap really bends the scores.
    let amplitude = if case.softcap.is_some() { 16.0 } else { 4.0 };
    let query = rng.tensor(
        &[lens.len() * case.rows, case.heads, case.head_dim],
        amplitude,
        case.dtype,
    );
    let scale = 1.0 / (case.head_dim as f32).sqrt();
    let (kc, vc, bt, cl) = decode_args(&batch);

    let out = paged_decode(&query, kc, vc, bt, cl, scale, case.softcap).unwrap();
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // The AVX2 build of the kernel must be the SSE2 one with wider vectors, bit for bit.
        FORCE_PORTABLE.store(true, std::sync::atomic::Ordering::SeqCst);
        let portable = paged_decode(&query, kc, vc, bt, cl, scale, case.softcap);
        FORCE_PORTABLE.store(false, std::sync::atomic::Ordering::SeqCst);
        let bits = |t: &Tensor| to_f32_vec(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&out) == bits(&portable.unwrap()), "AVX2 and SSE2 kernels differ: {case:?} lens {lens:?}");
    }
    let reference =
        paged_decode_reference(&query, kc, vc, bt, cl, scale, case.softcap).unwrap();
    assert_eq!(out.dims(), query.dims());
    assert_eq!(out.dtype(), case.dtype);
    let dense = dense_decode(&batch, &query, scale, case.softcap);
    let what = format!(
        "{:?} block {} heads {}/{} head_dim {} rows {} softcap {:?} lens {lens:?}",
        case.dtype,
        case.block_size,
        case.heads,
        case.kv_heads,
        case.head_dim,
        case.rows,
        case.softcap
    );
    let (out, reference) = (to_f32_vec(&out), to_f32_vec(&reference));
    assert_close(
        &out,
        &reference,
        rel_tol,
        &format!("kernel vs reference: {what}"),
    );
    assert_close(&out, &dense, rel_tol, &format!("kernel vs dense: {what}"));
    assert_close(
        &reference,
        &dense,
        rel_tol,
        &format!("reference vs dense: {what}"),
    );
}

fn check_all_shapes(dtype: DType, rel_tol: f32, seed: u64) {
    let mut rng = Rng::new(seed);
    for block_size in [8, 16, 32] {
        let lens = [1, block_size - 1, block_size, block_size + 1, 300, 1000];
        for (heads, kv_heads) in [(3, 3), (9, 3), (8, 2)] {
            for head_dim in [64, 128] {
                for rows in [1, 3] {
                    for softcap in [None, Some(30.0)] {
                        let case = Case {
                            dtype,
                            block_size,
                            heads,
                            kv_heads,
                            head_dim,
                            rows,
                            softcap,
                        };
                        check_case(&mut rng, &case, &lens, rel_tol);
                    }
                }
            }
        }
    }
}

#[test]
fn decode_f32_matches_reference_and_dense() {
    check_all_shapes(DType::F32, 1e-5, 10);
}

#[test]
fn decode_f16_matches_reference_and_dense() {
    check_all_shapes(DType::F16, 2e-2, 11);
}

#[test]
fn decode_bf16_matches_reference_and_dense() {
    check_all_shapes(DType::BF16, 2e-2, 12);
}

#[test]
fn forced_uneven_splits_merge_exactly() {
    let mut rng = Rng::new(20);
    let lens = [1000, 37, 513, 16];
    let batch = paged_batch(&mut rng, &lens, 2, 128, 16, DType::F32);
    let query = rng.tensor(&[lens.len() * 3, 8, 128], 6.0, DType::F32);
    let (kc, vc, bt, cl) = decode_args(&batch);
    let inputs = DecodeInputs::read(&query, kc, vc, bt, cl).unwrap();
    for softcap in [None, Some(30.0)] {
        let dense = dense_decode(&batch, &query, 0.088, softcap);
        // 63 pages of the first sequence: chunks of 5 leave 3, of 7 divide evenly, 1 is the
        // most splits possible, 64 leaves everything in one split.
        for pages_per_split in [1, 5, 7, 64] {
            let out = decode_with_split(&inputs, kc, vc, 0.088, softcap, Some(pages_per_split))
                .unwrap();
            let what = format!("{pages_per_split} pages per split, softcap {softcap:?}");
            assert_close(&to_f32_vec(&out), &dense, 1e-5, &what);
        }
    }
}

#[test]
fn split_plan_covers_every_page_once_with_uneven_chunks() {
    let lens = [1000, 0, 37, 16];
    let plan = SplitPlan::new(&lens, 16, 3, 5);
    assert_eq!(plan.first_split, vec![0, 13, 13, 14, 15]);
    // Dense lists: one task per split walks all 3 kv heads.
    assert_eq!(plan.heads_per_task, 3);
    assert_eq!(plan.tasks.len(), 15);
    for (seq, &len) in lens.iter().enumerate() {
        for kv_head in 0..3 {
            let mut pages: Vec<(usize, usize)> = plan
                .tasks
                .iter()
                .filter(|t| t.seq == seq && t.kv_heads().contains(&kv_head))
                .map(|t| (t.first_page, t.end_page))
                .collect();
            pages.sort();
            let mut next = 0;
            for (first, end) in pages {
                assert_eq!(first, next);
                assert!(end > first && end - first <= 5);
                next = end;
            }
            assert_eq!(next, len.div_ceil(16));
        }
    }
    for (index, task) in plan.tasks.iter().enumerate() {
        assert_eq!((task.kv_head, task.kv_head_count), (0, 3), "task {index}");
    }
}

#[test]
fn auto_split_gives_every_thread_several_tasks_at_batch_one() {
    for threads in [2, 8, 32] {
        let lens = [8192];
        let pages_per_split = SplitPlan::auto_pages_per_split(&lens, 16, 3, threads);
        let tasks = SplitPlan::new(&lens, 16, 3, pages_per_split).tasks.len();
        assert!(
            tasks >= TASKS_PER_THREAD * threads,
            "{threads} threads: {tasks} tasks"
        );
    }
    // Short contexts stay in one split rather than many tiny ones.
    let pages_per_split = SplitPlan::auto_pages_per_split(&[40], 16, 3, 64);
    assert_eq!(SplitPlan::new(&[40], 16, 3, pages_per_split).tasks.len(), 1);
}

#[test]
fn long_context_with_automatic_split_matches_dense() {
    let mut rng = Rng::new(21);
    let lens = [5000];
    let (block_size, kv_heads) = (16, 3);
    let pages_per_split = SplitPlan::auto_pages_per_split(
        &lens,
        block_size,
        kv_heads,
        rayon::current_num_threads(),
    );
    let pages = lens[0].div_ceil(block_size);
    assert!(pages_per_split < pages, "the context must be split");
    assert!(
        pages % pages_per_split != 0,
        "the last chunk should be shorter: {pages} pages / {pages_per_split}"
    );
    for dtype in [DType::F32, DType::BF16] {
        let batch = paged_batch(&mut rng, &lens, kv_heads, 128, block_size, dtype);
        let query = rng.tensor(&[2, 9, 128], 6.0, dtype);
        let (kc, vc, bt, cl) = decode_args(&batch);
        let out = paged_decode(&query, kc, vc, bt, cl, 0.088, None).unwrap();
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        assert_close(
            &to_f32_vec(&out),
            &dense_decode(&batch, &query, 0.088, None),
            tol,
            &format!("{dtype:?}"),
        );
    }
}

#[test]
fn query_dtype_may_differ_from_cache_dtype() {
    let mut rng = Rng::new(22);
    for (cache_dtype, query_dtype) in [
        (DType::BF16, DType::F32),
        (DType::F32, DType::F16),
        (DType::F16, DType::BF16),
    ] {
        let lens = [70, 5];
        let batch = paged_batch(&mut rng, &lens, 2, 64, 16, cache_dtype);
        let query = rng.tensor(&[4, 4, 64], 4.0, query_dtype);
        let (kc, vc, bt, cl) = decode_args(&batch);
        let out = paged_decode(&query, kc, vc, bt, cl, 0.125, Some(30.0)).unwrap();
        assert_eq!(out.dtype(), query_dtype);
        let dense = dense_decode(&batch, &query, 0.125, Some(30.0));
        let tol = if query_dtype == DType::F32 {
            1e-5
        } else {
            2e-2
        };
        assert_close(
            &to_f32_vec(&out),
            &dense,
            tol,
            &format!("{cache_dtype:?} cache, {query_dtype:?} query"),
        );
    }
}

#[test]
fn rows_without_visible_tokens_are_zero() {
    let mut rng = Rng::new(23);
    let lens = [0, 1, 2, 20];
    let batch = paged_batch(&mut rng, &lens, 1, 64, 8, DType::F32);
    let query = rng.tensor(&[lens.len() * 3, 2, 64], 4.0, DType::F32);
    let (kc, vc, bt, cl) = decode_args(&batch);
    let out = to_f32_vec(&paged_decode(&query, kc, vc, bt, cl, 0.125, None).unwrap());
    let row_len = 2 * 64;
    // (sequence, row) pairs whose window is empty: all of sequence 0, rows 0-1 of 1, row 0 of 2.
    for (seq, row) in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)] {
        let at = (seq * 3 + row) * row_len;
        assert!(
            out[at..at + row_len].iter().all(|&o| o == 0.0),
            "seq {seq} row {row}"
        );
    }
    assert_close(
        &out,
        &dense_decode(&batch, &query, 0.125, None),
        1e-5,
        "ragged",
    );
}

#[test]
fn softcap_changes_the_output() {
    let mut rng = Rng::new(24);
    let batch = paged_batch(&mut rng, &[200], 1, 64, 16, DType::F32);
    let query = rng.tensor(&[1, 1, 64], 16.0, DType::F32);
    let (kc, vc, bt, cl) = decode_args(&batch);
    let capped = to_f32_vec(&paged_decode(&query, kc, vc, bt, cl, 0.125, Some(5.0)).unwrap());
    let plain = to_f32_vec(&paged_decode(&query, kc, vc, bt, cl, 0.125, None).unwrap());
    let diff = capped
        .iter()
        .zip(&plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 1e-3,
        "softcap 5 should change the output, max diff {diff}"
    );
    assert_close(
        &capped,
        &dense_decode(&batch, &query, 0.125, Some(5.0)),
        1e-5,
        "softcap 5",
    );
}

#[test]
fn empty_batch_gives_empty_output() {
    let mut rng = Rng::new(25);
    let batch = paged_batch(&mut rng, &[3], 2, 64, 16, DType::F16);
    let query = Tensor::zeros((0, 4, 64), DType::F16, &Device::Cpu).unwrap();
    let tables = Tensor::zeros((0, 4), DType::U32, &Device::Cpu).unwrap();
    let lens = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
    let out = paged_decode(
        &query,
        &batch.key_cache,
        &batch.value_cache,
        &tables,
        &lens,
        0.125,
        None,
    )
    .unwrap();
    assert_eq!(out.dims(), &[0, 4, 64]);
}

/// `cargo test --release -p mistralrs-retro --lib cpu::decode::tests::bench -- --ignored --nocapture`
#[test]
#[ignore = "timing report, not a check"]
fn bench_decode_throughput() {
    let mut rng = Rng::new(27);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (sequences, tokens, heads, kv_heads, head_dim) in [
            (1, 8192, 9, 3, 64),
            (1, 32768, 9, 3, 64),
            (8, 2048, 32, 8, 128),
            (32, 1024, 9, 3, 64),
        ] {
            let lens = vec![tokens; sequences];
            let batch = paged_batch(&mut rng, &lens, kv_heads, head_dim, 16, dtype);
            let query = rng.tensor(&[sequences, heads, head_dim], 1.0, dtype);
            let (kc, vc, bt, cl) = decode_args(&batch);
            let iterations = 20;
            paged_decode(&query, kc, vc, bt, cl, 0.1, None).unwrap();
            let start = std::time::Instant::now();
            for _ in 0..iterations {
                paged_decode(&query, kc, vc, bt, cl, 0.1, None).unwrap();
            }
            let seconds = start.elapsed().as_secs_f64() / iterations as f64;
            let kv_bytes =
                (sequences * tokens * kv_heads * head_dim * 2 * dtype.size_in_bytes()) as f64;
            println!(
                "{dtype:?} {sequences}x{tokens} heads {heads}/{kv_heads} d{head_dim}: {:.3} ms, {:.2} GB/s of K/V",
                seconds * 1e3,
                kv_bytes / seconds / 1e9
            );
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let mut rng = Rng::new(26);
    let batch = paged_batch(&mut rng, &[20, 9], 2, 64, 8, DType::F32);
    let (kc, vc, bt, _) = decode_args(&batch);
    let query = rng.tensor(&[2, 4, 64], 1.0, DType::F32);
    let lens = |l: &[u32]| Tensor::new(l, &Device::Cpu).unwrap();
    let decode = |q: &Tensor, bt: &Tensor, cl: &Tensor, softcap| {
        paged_decode(q, kc, vc, bt, cl, 0.1, softcap)
    };

    // 20 tokens use 3 of the 4 table columns; the spare column holds an invalid block id.
    assert!(
        decode(&query, bt, &lens(&[25, 9]), None).is_err(),
        "context past the valid blocks"
    );
    assert!(
        decode(&query, bt, &lens(&[40, 9]), None).is_err(),
        "context past the table"
    );
    assert!(
        decode(&query, bt, &lens(&[20]), None).is_err(),
        "batch mismatch"
    );
    assert!(
        decode(
            &rng.tensor(&[3, 4, 64], 1.0, DType::F32),
            bt,
            &lens(&[20, 9]),
            None
        )
        .is_err(),
        "rows"
    );
    assert!(
        decode(
            &rng.tensor(&[2, 3, 64], 1.0, DType::F32),
            bt,
            &lens(&[20, 9]),
            None
        )
        .is_err(),
        "gqa"
    );
    assert!(
        decode(
            &rng.tensor(&[2, 4, 32], 1.0, DType::F32),
            bt,
            &lens(&[20, 9]),
            None
        )
        .is_err(),
        "head_dim"
    );
    assert!(
        decode(
            &query,
            &bt.to_dtype(DType::I64).unwrap(),
            &lens(&[20, 9]),
            None
        )
        .is_err(),
        "table dtype"
    );
    assert!(
        decode(&query, bt, &lens(&[20, 9]), Some(0.0)).is_err(),
        "softcap 0"
    );
    assert!(decode(&query, bt, &lens(&[20, 9]), Some(30.0)).is_ok());
}
