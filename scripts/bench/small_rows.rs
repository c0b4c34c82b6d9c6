// Standalone microbenchmark for issue 4: the 2..8-row linear kernel of patch
// mistralrs-quant/0001 (`rows::<M>`, one 8-lane accumulator per input row) against a variant with four
// accumulators per input row (`rows4`). A perf profile of the server at ~6.5K context puts 64% of
// retro w=2's extra CPU time over quest in `rows_avx2::<2>`: with one accumulator per row, M = 2 gives
// two dependent add chains, so the loop waits on add latency. Patch 0001 now keeps 4 accumulators per
// row for 2 or 3 rows (2 for 4 rows); `rows` below is the kernel as it was before.
//
//   rustc -O scripts/bench/small_rows.rs -o /tmp/small_rows && /tmp/small_rows
//
// SmolLM2-135M's 30 layers of weights (425 MB, f32), one thread, best of 5, three alternating reps.
use std::time::Instant;
#[inline(always)]
fn rows<const M: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let body = k / 8 * 8;
    for (j, wj) in w.chunks_exact(k).enumerate() {
        let mut acc = [[0f32; 8]; M];
        let mut c = 0;
        while c < body {
            let wv = &wj[c..c + 8];
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = &x[i * k + c..i * k + c + 8];
                for l in 0..8 { a[l] += xv[l] * wv[l]; }
            }
            c += 8;
        }
        for (i, a) in acc.iter().enumerate() {
            let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            for t in body..k { s += x[i * k + t] * wj[t]; }
            out[j * M + i] = s;
        }
    }
}
#[inline(always)]
fn rows4<const M: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let body = k / 32 * 32;
    for (j, wj) in w.chunks_exact(k).enumerate() {
        let mut acc = [[[0f32; 8]; 4]; M];
        let mut c = 0;
        while c < body {
            for u in 0..4 {
                let wv = &wj[c + 8 * u..c + 8 * u + 8];
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = &x[i * k + c + 8 * u..i * k + c + 8 * u + 8];
                    for l in 0..8 { a[u][l] += xv[l] * wv[l]; }
                }
            }
            c += 32;
        }
        for (i, a) in acc.iter().enumerate() {
            let mut v = [0f32; 8];
            for l in 0..8 { v[l] = (a[0][l] + a[1][l]) + (a[2][l] + a[3][l]); }
            let mut s = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
            for t in body..k { s += x[i * k + t] * wj[t]; }
            out[j * M + i] = s;
        }
    }
}
#[target_feature(enable = "avx2,fma")]
unsafe fn a1(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) { rows::<1>(x, w, k, out) }
#[target_feature(enable = "avx2,fma")]
unsafe fn a2(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) { rows::<2>(x, w, k, out) }
#[target_feature(enable = "avx2,fma")]
unsafe fn b1(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) { rows4::<1>(x, w, k, out) }
#[target_feature(enable = "avx2,fma")]
unsafe fn b2(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) { rows4::<2>(x, w, k, out) }
fn main() {
    // SmolLM2-135M per layer: q 576x576, k,v 192x576, o 576x576, gate/up 1536x576, down 576x1536; 30 layers.
    let shapes = [(576usize, 576usize), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    let layers = 30;
    let ws: Vec<Vec<(Vec<f32>, usize, usize)>> = (0..layers).map(|l| shapes.iter().map(|&(n, k)| ((0..n * k).map(|i| ((i * 7 + l) % 13) as f32 * 0.01).collect(), n, k)).collect()).collect();
    let x: Vec<f32> = (0..2 * 1536).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut out = vec![0f32; 2 * 1536];
    let names = ["rows M=1", "rows M=2", "rows4 M=1", "rows4 M=2"];
    for rep in 0..3 {
        for (v, name) in names.iter().enumerate() {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for layer in &ws { for (w, n, k) in layer {
                    unsafe { match v { 0 => a1(&x, w, *k, &mut out), 1 => a2(&x, w, *k, &mut out), 2 => b1(&x, w, *k, &mut out), _ => b2(&x, w, *k, &mut out) } }
                    let _ = n;
                } }
                best = best.min(t.elapsed().as_secs_f64());
                std::hint::black_box(&out);
            }
            println!("rep {rep} {name}: {:.2} ms per step (single thread)", best * 1e3);
        }
    }
}
