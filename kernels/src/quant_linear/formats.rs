//! GGUF weight blocks, unpacked one weight row at a time into one integer form that a single dot
//! kernel reads for every type: a value is `d·sc·q − dmin·mn`, with `q` a byte per weight, `sc` an
//! integer scale per 16 weights, `mn` an integer min per 32 weights and `d`, `dmin` floats per
//! block. Unpacking costs one pass over the row's bytes; the dot then reuses it for every input row.

use half::f16;

/// A GGUF block type this module multiplies with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl WeightType {
    pub const ALL: [WeightType; 8] = [
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
    ];

    /// Weights per block (and per activation scale: the activations are quantized in blocks of
    /// the same length, as llama.cpp's q8_0 / q8_K).
    pub const fn block_len(self) -> usize {
        match self {
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block, as GGUF stores it.
    pub const fn block_bytes(self) -> usize {
        match self {
            WeightType::Q4_0 => 18,
            WeightType::Q4_1 => 20,
            WeightType::Q5_0 => 22,
            WeightType::Q5_1 => 24,
            WeightType::Q8_0 => 34,
            WeightType::Q4K => 144,
            WeightType::Q5K => 176,
            WeightType::Q6K => 210,
        }
    }

    /// Whether `q` is signed (the dot kernel then moves the sign onto the activation, since the
    /// byte product instruction takes one unsigned operand).
    pub const fn signed(self) -> bool {
        matches!(self, WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 | WeightType::Q6K)
    }

    /// Whether the type has a min (`dmin·mn` term).
    pub const fn has_min(self) -> bool {
        matches!(self, WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K)
    }
}

/// One weight row in the unpacked form (buffers reused from row to row).
#[derive(Default)]
pub struct UnpackedRow {
    /// A byte per weight: `i8` for signed types, `u8` (stored as `i8` bits) otherwise.
    pub q: Vec<i8>,
    /// Scale per 16 weights.
    pub sc: Vec<i16>,
    /// Min per 32 weights (unused unless the type has one).
    pub mn: Vec<i16>,
    /// Per block.
    pub d: Vec<f32>,
    pub dmin: Vec<f32>,
}

impl UnpackedRow {
    pub fn resize(&mut self, k: usize, block_len: usize) {
        self.q.resize(k, 0);
        self.sc.resize(k / 16, 0);
        self.mn.resize(k / 32, 0);
        self.d.resize(k / block_len, 0.0);
        self.dmin.resize(k / block_len, 0.0);
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Unpacks one row (`row.len()` = blocks × block bytes) into `out` (sized by [`UnpackedRow::resize`]).
#[inline(always)]
pub fn unpack_row(ty: WeightType, row: &[u8], out: &mut UnpackedRow) {
    let bytes = ty.block_bytes();
    let len = ty.block_len();
    for (b, block) in row.chunks_exact(bytes).enumerate() {
        let q = &mut out.q[b * len..(b + 1) * len];
        let sc = &mut out.sc[b * len / 16..(b + 1) * len / 16];
        let mn = &mut out.mn[b * len / 32..(b + 1) * len / 32];
        let (d, dmin) = match ty {
            WeightType::Q4_0 => unpack_q4_0(block, q, sc),
            WeightType::Q4_1 => unpack_q4_1(block, q, sc, mn),
            WeightType::Q5_0 => unpack_q5_0(block, q, sc),
            WeightType::Q5_1 => unpack_q5_1(block, q, sc, mn),
            WeightType::Q8_0 => unpack_q8_0(block, q, sc),
            WeightType::Q4K => unpack_q4k(block, q, sc, mn),
            WeightType::Q5K => unpack_q5k(block, q, sc, mn),
            WeightType::Q6K => unpack_q6k(block, q, sc),
        };
        out.d[b] = d;
        out.dmin[b] = dmin;
    }
}

/// 16 bytes of nibbles: low nibbles are weights 0..16, high nibbles 16..32.
#[inline(always)]
fn nibbles(qs: &[u8], q: &mut [i8], bias: i8) {
    for i in 0..16 {
        q[i] = (qs[i] & 0xF) as i8 - bias;
        q[i + 16] = (qs[i] >> 4) as i8 - bias;
    }
}

#[inline(always)]
fn unpack_q4_0(b: &[u8], q: &mut [i8], sc: &mut [i16]) -> (f32, f32) {
    nibbles(&b[2..18], q, 8);
    sc.fill(1);
    (f16_at(b, 0), 0.0)
}

#[inline(always)]
fn unpack_q4_1(b: &[u8], q: &mut [i8], sc: &mut [i16], mn: &mut [i16]) -> (f32, f32) {
    nibbles(&b[4..20], q, 0);
    sc.fill(1);
    mn.fill(1);
    // value = d·q + m, written as d·q − dmin·1.
    (f16_at(b, 0), -f16_at(b, 2))
}

/// Five-bit weights: nibbles plus bit `i` of `qh` as bit 4 of weight `i`.
#[inline(always)]
fn fives(qh: u32, qs: &[u8], q: &mut [i8], bias: i8) {
    for i in 0..16 {
        let lo = ((qh >> i) & 1) as u8;
        let hi = ((qh >> (i + 16)) & 1) as u8;
        q[i] = ((qs[i] & 0xF) | (lo << 4)) as i8 - bias;
        q[i + 16] = ((qs[i] >> 4) | (hi << 4)) as i8 - bias;
    }
}

#[inline(always)]
fn unpack_q5_0(b: &[u8], q: &mut [i8], sc: &mut [i16]) -> (f32, f32) {
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    fives(qh, &b[6..22], q, 16);
    sc.fill(1);
    (f16_at(b, 0), 0.0)
}

#[inline(always)]
fn unpack_q5_1(b: &[u8], q: &mut [i8], sc: &mut [i16], mn: &mut [i16]) -> (f32, f32) {
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    fives(qh, &b[8..24], q, 0);
    sc.fill(1);
    mn.fill(1);
    (f16_at(b, 0), -f16_at(b, 2))
}

#[inline(always)]
fn unpack_q8_0(b: &[u8], q: &mut [i8], sc: &mut [i16]) -> (f32, f32) {
    for i in 0..32 {
        q[i] = b[2 + i] as i8;
    }
    sc.fill(1);
    (f16_at(b, 0), 0.0)
}

/// The eight 6-bit (scale, min) pairs of a Q4_K / Q5_K block, packed in 12 bytes.
#[inline(always)]
fn k_scales(s: &[u8], sc: &mut [i16], mn: &mut [i16]) {
    for j in 0..8 {
        let (scale, min) = if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
        };
        // Scales are per 32 weights here; the kernel takes one per 16.
        sc[2 * j] = scale as i16;
        sc[2 * j + 1] = scale as i16;
        mn[j] = min as i16;
    }
}

#[inline(always)]
fn unpack_q4k(b: &[u8], q: &mut [i8], sc: &mut [i16], mn: &mut [i16]) -> (f32, f32) {
    k_scales(&b[4..16], sc, mn);
    let qs = &b[16..144];
    // Each 32 bytes hold 64 weights: low nibbles first, then high nibbles.
    for c in 0..4 {
        for l in 0..32 {
            let v = qs[32 * c + l];
            q[64 * c + l] = (v & 0xF) as i8;
            q[64 * c + 32 + l] = (v >> 4) as i8;
        }
    }
    (f16_at(b, 0), f16_at(b, 2))
}

#[inline(always)]
fn unpack_q5k(b: &[u8], q: &mut [i8], sc: &mut [i16], mn: &mut [i16]) -> (f32, f32) {
    k_scales(&b[4..16], sc, mn);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        for l in 0..32 {
            let v = qs[32 * c + l];
            let h = qh[l] >> (2 * c);
            q[64 * c + l] = ((v & 0xF) | ((h & 1) << 4)) as i8;
            q[64 * c + 32 + l] = ((v >> 4) | ((h & 2) << 3)) as i8;
        }
    }
    (f16_at(b, 0), f16_at(b, 2))
}

#[inline(always)]
fn unpack_q6k(b: &[u8], q: &mut [i8], sc: &mut [i16]) -> (f32, f32) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    for n in 0..2 {
        let (ql, qh, q) = (&ql[64 * n..], &qh[32 * n..], &mut q[128 * n..]);
        for l in 0..32 {
            let h = qh[l];
            q[l] = ((ql[l] & 0xF) | ((h & 3) << 4)) as i8 - 32;
            q[l + 32] = ((ql[l + 32] & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
            q[l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            q[l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    // Weights 16i..16i+16 use scale i.
    for i in 0..16 {
        sc[i] = scales[i] as i8 as i16;
    }
    (f16_at(b, 208), 0.0)
}

/// The scales of one block (the SIMD path reads the weight bytes in place and needs only these).
#[derive(Clone, Copy)]
pub struct BlockHeader {
    pub d: f32,
    pub dmin: f32,
    /// Q6_K: per 16 weights; Q4_K, Q5_K: the first 8, per 32 weights; 32-weight blocks: unused.
    pub sc: [i8; 16],
    /// Per 32 weights.
    pub mn: [u8; 8],
}

#[inline(always)]
pub fn block_header(ty: WeightType, b: &[u8]) -> BlockHeader {
    block_header_with(ty, b, f16_at)
}

/// [`block_header`] with `f16(block, at)` converting the half at byte `at` (the SIMD path passes
/// a hardware conversion).
#[inline(always)]
pub fn block_header_with(ty: WeightType, b: &[u8], f16: impl Fn(&[u8], usize) -> f32) -> BlockHeader {
    let mut h = BlockHeader { d: 0.0, dmin: 0.0, sc: [1; 16], mn: [1; 8] };
    match ty {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => h.d = f16(b, 0),
        WeightType::Q4_1 | WeightType::Q5_1 => (h.d, h.dmin) = (f16(b, 0), -f16(b, 2)),
        WeightType::Q4K | WeightType::Q5K => {
            (h.d, h.dmin) = (f16(b, 0), f16(b, 2));
            // The 6-bit pairs of `k_scales`, four at a time in 32-bit words.
            let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let (u0, u1, u2) = (word(4), word(8), word(12));
            let sc_lo = u0 & 0x3f3f_3f3f;
            let sc_hi = (u2 & 0x0f0f_0f0f) | (((u0 >> 6) & 0x0303_0303) << 4);
            let mn_lo = u1 & 0x3f3f_3f3f;
            let mn_hi = ((u2 >> 4) & 0x0f0f_0f0f) | (((u1 >> 6) & 0x0303_0303) << 4);
            let sc = (sc_lo as u64 | (sc_hi as u64) << 32).to_le_bytes();
            h.mn = (mn_lo as u64 | (mn_hi as u64) << 32).to_le_bytes();
            for j in 0..8 {
                h.sc[j] = sc[j] as i8;
            }
        }
        WeightType::Q6K => {
            h.d = f16(b, 208);
            for i in 0..16 {
                h.sc[i] = b[192 + i] as i8;
            }
        }
    }
    h
}
