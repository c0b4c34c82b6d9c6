//! Memory bandwidth measured in the bench's own run, the floor its rates are compared with.

use std::time::Instant;

/// Best-of-5 copy bandwidth over all cores (rayon, one chunk per thread) of a 256 MiB buffer, bytes/s
/// counted as read + written, as STREAM's copy does. A step's reads stream at about this rate.
pub fn copy_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 64 << 20;
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let chunk = n.div_ceil(rayon::current_num_threads());
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(&dst);
        best = best.max(2.0 * (n * 4) as f64 / secs);
    }
    best
}
