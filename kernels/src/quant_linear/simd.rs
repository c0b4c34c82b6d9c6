//! The AVX2 dot products, reading each weight block in place: 32 weights at a time are expanded
//! to bytes in registers (nibbles masked, high bits merged) and multiplied with up to four input
//! rows while there. Byte products are summed to 16 then 32 bits with the block's integer scales,
//! and one float multiply-add per block and row applies `d`. Where the CPU has AVX-512 VNNI, the
//! same code fuses the sums (one instruction instead of two or three per 32 weights and row).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::activations::RowRef;
use super::formats::{block_header_with, BlockHeader, WeightType};

/// `out[v][r] = w[v] · x[r]` for one or two weight rows `w[v]` (raw GGUF blocks of `ty`, whose
/// scales are `headers[v]`, or read in place when `headers[0]` is empty, as always for 32-weight
/// blocks) and `x.len()` in 1..=4 input rows. Two weight rows share each input load (a prompt's
/// inputs stream from L2).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` and `headers` have the same length, 1 or 2.
pub unsafe fn dot_rows(ty: WeightType, w: &[&[u8]], headers: &[&[BlockHeader]], x: &[RowRef], out: &mut [[f32; 4]]) {
    if vnni() {
        dot_rows_vnni(ty, w, headers, x, out)
    } else {
        dot_rows_avx2(ty, w, headers, x, out)
    }
}

/// Whether the CPU has AVX-512 VNNI on 256-bit vectors (byte and word dot products that add into
/// 32-bit lanes in one instruction).
pub fn vnni() -> bool {
    std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512vl")
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_avx2(ty: WeightType, w: &[&[u8]], headers: &[&[BlockHeader]], x: &[RowRef], out: &mut [[f32; 4]]) {
    by_shape::<false>(ty, w, headers, x, out)
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn dot_rows_vnni(ty: WeightType, w: &[&[u8]], headers: &[&[BlockHeader]], x: &[RowRef], out: &mut [[f32; 4]]) {
    by_shape::<true>(ty, w, headers, x, out)
}

#[inline(always)]
unsafe fn by_shape<const VNNI: bool>(ty: WeightType, w: &[&[u8]], headers: &[&[BlockHeader]], x: &[RowRef], out: &mut [[f32; 4]]) {
    macro_rules! by_type {
        ($r:literal, $w:literal) => {{
            let w: [&[u8]; $w] = std::array::from_fn(|v| w[v]);
            let h: [&[BlockHeader]; $w] = std::array::from_fn(|v| headers[v]);
            match ty {
                WeightType::Q4_0 => dot::<$r, $w, Q4_0, VNNI>(w, h, x, out),
                WeightType::Q4_1 => dot::<$r, $w, Q4_1, VNNI>(w, h, x, out),
                WeightType::Q5_0 => dot::<$r, $w, Q5_0, VNNI>(w, h, x, out),
                WeightType::Q5_1 => dot::<$r, $w, Q5_1, VNNI>(w, h, x, out),
                WeightType::Q8_0 => dot::<$r, $w, Q8_0, VNNI>(w, h, x, out),
                WeightType::Q4K => dot::<$r, $w, Q4K, VNNI>(w, h, x, out),
                WeightType::Q5K => dot::<$r, $w, Q5K, VNNI>(w, h, x, out),
                WeightType::Q6K => dot::<$r, $w, Q6K, VNNI>(w, h, x, out),
            }
        }};
    }
    match (x.len(), w.len()) {
        (1, 1) => by_type!(1, 1),
        (2, 1) => by_type!(2, 1),
        (3, 1) => by_type!(3, 1),
        (_, 1) => by_type!(4, 1),
        (1, _) => by_type!(1, 2),
        (2, _) => by_type!(2, 2),
        (3, _) => by_type!(3, 2),
        (_, _) => by_type!(4, 2),
    }
}

/// One block type: how to expand its `c`-th 32 weights into bytes.
trait Chunks {
    const TY: WeightType;
    /// # Safety
    /// `b` points at a whole block; AVX2 is present.
    unsafe fn chunk(b: *const u8, c: usize) -> __m256i;
}

#[inline(always)]
unsafe fn load16(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

#[inline(always)]
unsafe fn load32(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// 16 bytes of nibbles: weights 0..16 from the low nibbles, 16..32 from the high ones.
#[inline(always)]
unsafe fn nibbles16(p: *const u8) -> __m256i {
    let v = load16(p);
    let lo = _mm_and_si128(v, _mm_set1_epi8(0x0F));
    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F));
    _mm256_set_m128i(hi, lo)
}

/// Bit `i` of `bits` as 0x10 in byte `i`.
#[inline(always)]
unsafe fn bit4_of_each(bits: u32) -> __m256i {
    // Byte i takes byte i / 8 of `bits`, then keeps its bit i % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0),
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(0x10))
}

struct Q4_0;
impl Chunks for Q4_0 {
    const TY: WeightType = WeightType::Q4_0;
    #[inline(always)]
    unsafe fn chunk(b: *const u8, _: usize) -> __m256i {
        _mm256_sub_epi8(nibbles16(b.add(2)), _mm256_set1_epi8(8))
    }
}

struct Q4_1;
impl Chunks for Q4_1 {
    const TY: WeightType = WeightType::Q4_1;
    #[inline(always)]
    unsafe fn chunk(b: *const u8, _: usize) -> __m256i {
        nibbles16(b.add(4))
    }
}

struct Q5_0;
impl Chunks for Q5_0 {
    const TY: WeightType = WeightType::Q5_0;
    #[inline(always)]
    unsafe fn chunk(b: *const u8, _: usize) -> __m256i {
        let qh = u32::from_le_bytes(*(b.add(2) as *const [u8; 4]));
        let v = _mm256_or_si256(nibbles16(b.add(6)), bit4_of_each(qh));
        _mm256_sub_epi8(v, _mm256_set1_epi8(16))
    }
}

struct Q5_1;
impl Chunks for Q5_1 {
    const TY: WeightType = WeightType::Q5_1;
    #[inline(always)]
    unsafe fn chunk(b: *const u8, _: usize) -> __m256i {
        let qh = u32::from_le_bytes(*(b.add(4) as *const [u8; 4]));
        _mm256_or_si256(nibbles16(b.add(8)), bit4_of_each(qh))
    }
}

struct Q8_0;
impl Chunks for Q8_0 {
    const TY: WeightType = WeightType::Q8_0;
    #[inline(always)]
    unsafe fn chunk(b: *const u8, _: usize) -> __m256i {
        load32(b.add(2))
    }
}

/// Q4_K / Q5_K: 32 bytes of nibbles hold weights 64p..64p+32 (low) and 64p+32..64p+64 (high).
#[inline(always)]
unsafe fn k_nibbles(qs: *const u8, c: usize) -> __m256i {
    let v = load32(qs.add(32 * (c / 2)));
    let v = if c % 2 == 0 { v } else { _mm256_srli_epi16(v, 4) };
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

struct Q4K;
impl Chunks for Q4K {
    const TY: WeightType = WeightType::Q4K;
    #[inline(always)]
    unsafe fn chunk(b: *const u8, c: usize) -> __m256i {
        k_nibbles(b.add(16), c)
    }
}

struct Q5K;
impl Chunks for Q5K {
    const TY: WeightType = WeightType::Q5K;
    #[inline(always)]
    unsafe fn chunk(b: *const u8, c: usize) -> __m256i {
        // Bit c of qh[l] is bit 4 of weight 32c + l.
        let m = _mm256_set1_epi8(1 << c);
        let qh = _mm256_and_si256(load32(b.add(16)), m);
        let high = _mm256_and_si256(_mm256_cmpeq_epi8(qh, m), _mm256_set1_epi8(0x10));
        _mm256_or_si256(k_nibbles(b.add(48), c), high)
    }
}

struct Q6K;
impl Chunks for Q6K {
    const TY: WeightType = WeightType::Q6K;
    #[inline(always)]
    unsafe fn chunk(b: *const u8, c: usize) -> __m256i {
        // Half n = c / 4 holds 128 weights; its g-th 32 (g = c % 4) take the low (g < 2) or high
        // nibbles of ql[64n + 32(g % 2)..][..32] and bits 2g..2g+2 of qh[32n..][..32].
        let (n, g) = (c / 4, c % 4);
        let ql = load32(b.add(64 * n + 32 * (g % 2)));
        let ql = if g < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
        let ql = _mm256_and_si256(ql, _mm256_set1_epi8(0x0F));
        let qh = load32(b.add(128 + 32 * n));
        let qh = match g {
            0 => _mm256_slli_epi16(qh, 4),
            1 => _mm256_slli_epi16(qh, 2),
            2 => qh,
            _ => _mm256_srli_epi16(qh, 2),
        };
        let qh = _mm256_and_si256(qh, _mm256_set1_epi8(0x30));
        _mm256_sub_epi8(_mm256_or_si256(ql, qh), _mm256_set1_epi8(32))
    }
}

#[inline(always)]
unsafe fn dot<const R: usize, const W: usize, T: Chunks, const VNNI: bool>(w: [&[u8]; W], headers: [&[BlockHeader]; W], x: &[RowRef], out: &mut [[f32; 4]]) {
    let ty = T::TY;
    let (len, bytes) = (ty.block_len(), ty.block_bytes());
    let chunks = len / 32;
    let signed = ty.signed();
    let has_min = ty.has_min();
    let x: [RowRef; R] = std::array::from_fn(|r| x[r]);
    let mut facc = [[_mm256_setzero_ps(); R]; W];
    let mut min_acc = [[0f32; R]; W];
    // K blocks: the block's scales as 16-bit lanes, from which each 32 weights' scale vector is one
    // byte shuffle (Q4_K / Q5_K: the eight per-32 scales in both 128-bit halves; Q6_K: the even
    // per-16 scales in the low half, the odd ones in the high half, as the products land).
    let per32 = matches!(ty, WeightType::Q4K | WeightType::Q5K);
    // Without precomputed headers (decode), each K block's scales are read as the block streams
    // in, so the row is read once, in order; 32-weight blocks always read their `d` (and min) so.
    let in_place = headers[0].is_empty();
    // Decode waits on memory: with the hardware prefetcher alone, each block's first line is a
    // miss (a quarter of the kernel's samples sat on the header loads). The caller passes rows
    // that are contiguous and then the next `W` rows, so while a block of these rows is read, the
    // same block of the rows `2 W` further on is fetched: one token of Qwen2.5-Coder-1.5B's linear
    // layers went from 78 to 46-50 ms (bench quant_decode_step; `W` ahead: 46-50, `4 W`: 47-50).
    let ahead = 2 * W * w[0].len();
    for b in 0..w[0].len() / bytes {
        for v in 0..W {
            let next = w[v].as_ptr().wrapping_add(b * bytes + ahead);
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line) as *const i8);
            }
        }
        let mut iacc = [[_mm256_setzero_si256(); R]; W];
        let mut scales = [_mm256_setzero_si256(); W];
        let mut hs = [BlockHeader { d: 0.0, dmin: 0.0, sc: [0; 16], mn: [0; 8] }; W];
        for v in 0..W {
            hs[v] = if len == 32 {
                legacy_header(ty, w[v].as_ptr().add(b * bytes))
            } else if in_place {
                block_header_with(ty, &w[v][b * bytes..(b + 1) * bytes], f16c_at)
            } else {
                headers[v][b]
            };
        }
        if len == 256 {
            for v in 0..W {
                let sc = hs[v].sc.as_ptr() as *const __m128i;
                scales[v] = if per32 {
                    _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(sc)))
                } else {
                    let even_odd = _mm_set_epi8(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0);
                    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_loadu_si128(sc), even_odd))
                };
            }
        }
        // Written out per chunk (a macro, not a closure: a closure loses the target features), so
        // that each chunk's shifts and shuffles are constants.
        macro_rules! chunk {
            ($c:expr) => {{
                let c: usize = $c;
            let mut wv = [_mm256_setzero_si256(); W];
            let mut wa = [_mm256_setzero_si256(); W];
            let mut scale = [_mm256_setzero_si256(); W];
            for v in 0..W {
                wv[v] = T::chunk(w[v].as_ptr().add(b * bytes), c);
                // The byte product takes an unsigned first operand: signed weights give |w| and
                // move their sign onto x.
                wa[v] = if signed { _mm256_abs_epi8(wv[v]) } else { wv[v] };
                scale[v] = if len == 32 {
                    // No integer scales in 32-weight blocks.
                    _mm256_set1_epi16(1)
                } else {
                    // 16-bit lane c of each half.
                    _mm256_shuffle_epi8(scales[v], _mm256_set1_epi16((((2 * c + 1) << 8) | 2 * c) as i16))
                };
            }
            let at = b * len + 32 * c;
            for r in 0..R {
                let xv = load32(x[r].q.as_ptr().add(at) as *const u8);
                for v in 0..W {
                    let xs = if signed { _mm256_sign_epi8(xv, wv[v]) } else { xv };
                    iacc[v][r] = if VNNI && len == 32 {
                        // Blocks of 32 have no integer scales: bytes to 32 bits in one step.
                        _mm256_dpbusd_epi32(iacc[v][r], wa[v], xs)
                    } else if VNNI {
                        _mm256_dpwssd_epi32(iacc[v][r], _mm256_maddubs_epi16(wa[v], xs), scale[v])
                    } else {
                        _mm256_add_epi32(iacc[v][r], _mm256_madd_epi16(_mm256_maddubs_epi16(wa[v], xs), scale[v]))
                    };
                }
            }
            }};
        }
        if chunks == 8 {
            chunk!(0);
            chunk!(1);
            chunk!(2);
            chunk!(3);
            chunk!(4);
            chunk!(5);
            chunk!(6);
            chunk!(7);
        } else {
            for c in 0..chunks {
                chunk!(c);
            }
        }
        for v in 0..W {
            let h = &hs[v];
            for r in 0..R {
                let dx = x[r].d[b];
                facc[v][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[v][r]), _mm256_set1_ps(h.d * dx), facc[v][r]);
                if has_min && chunks == 8 {
                    // The eight (min, sum of 32 inputs) products of a K block.
                    let mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64(h.mn.as_ptr() as *const __m128i));
                    let sums = _mm256_loadu_si256(x[r].sums.as_ptr().add(8 * b) as *const __m256i);
                    let m = _mm256_cvtepi32_ps(_mm256_mullo_epi32(mn, sums));
                    facc[v][r] = _mm256_fnmadd_ps(m, _mm256_set1_ps(h.dmin * dx), facc[v][r]);
                } else if has_min {
                    min_acc[v][r] += h.dmin * dx * x[r].sums[b] as f32;
                }
            }
        }
    }
    for v in 0..W {
        for r in 0..R {
            let f = facc[v][r];
            let s4 = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            out[v][r] = _mm_cvtss_f32(s1) - min_acc[v][r];
        }
    }
}

/// The block scales of one weight row into `out`, halves converted with F16C. A plain loop with
/// a named function (no iterator adapters or closures, which are compiled without this function's
/// target features and would call the intrinsics out of line).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn block_headers(ty: WeightType, row: &[u8], out: &mut Vec<BlockHeader>) {
    let bytes = ty.block_bytes();
    let blocks = row.len() / bytes;
    out.clear();
    out.reserve(blocks);
    for b in 0..blocks {
        out.push(block_header_with(ty, &row[b * bytes..(b + 1) * bytes], f16c_at));
    }
}

/// The half at byte `at` of `b`, by F16C (inlined into callers that enable it).
#[inline(always)]
fn f16c_at(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    // SAFETY: only reached from functions that enable F16C.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
}

/// `d` and the min of a 32-weight block: both halves converted by one F16C instruction (this runs
/// once per 32 weights, so it is worth its own path).
#[inline(always)]
unsafe fn legacy_header(ty: WeightType, b: *const u8) -> BlockHeader {
    let halves = _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()));
    let d = _mm_cvtss_f32(halves);
    let dmin = if ty.has_min() { -_mm_cvtss_f32(_mm_shuffle_ps(halves, halves, 1)) } else { 0.0 };
    BlockHeader { d, dmin, sc: [1; 16], mn: [1; 8] }
}
