//! Random GPTQ v1 layers (codes, zeros, scales, act-order `g_idx`) for the kernel tests and
//! `mixtral-gptq bench kernels`: fresh, never-zero inputs at any shape.

use half::f16;
use rayon::prelude::*;

use super::gptq::pack_rows;
use crate::qlinear::GptqWeight;

/// A small, fast, seedable generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Packs `[rows, cols]` values along columns into `[rows, cols·b/32]` words (the `qzeros` layout).
pub fn pack_cols(values: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    let b = bits as usize;
    let wpr = cols * b / 32;
    let mut out = vec![0u32; rows * wpr];
    for r in 0..rows {
        for c in 0..cols {
            let v = values[r * cols + c] as u32;
            let bit = c * b;
            let (w, s) = (bit / 32, (bit % 32) as u32);
            out[r * wpr + w] |= v << s;
            if s as usize + b > 32 {
                out[r * wpr + w + 1] |= v >> (32 - s);
            }
        }
    }
    out.into_iter().map(|v| v as i32).collect()
}

/// A random layer: codes and stored zeros uniform over all 2^b values (stored 2^b−1, i.e. zero = 2^b,
/// included), scales in [0.002, 0.02), and with `act_order` a random permutation of the rows
/// (`g_idx[perm[i]] = i / group_size`, as GPTQ with `desc_act` writes it).
pub fn random_gptq(
    bits: u32,
    group_size: i32,
    k: usize,
    n: usize,
    act_order: bool,
    seed: u64,
) -> GptqWeight {
    let gs = if group_size < 0 {
        k
    } else {
        group_size as usize
    };
    let groups = k.div_ceil(gs);
    let mut codes = vec![0u8; k * n];
    let maxq = 1u64 << bits;
    codes
        .par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(r as u64));
            for v in row.iter_mut() {
                *v = rng.below(maxq) as u8;
            }
        });
    let qweight: Vec<i32> = pack_rows(&codes, k, n, bits)
        .into_iter()
        .map(|v| v as i32)
        .collect();
    let mut rng = Rng::new(seed ^ 0xABCDEF);
    let zeros: Vec<u8> = (0..groups * n).map(|_| rng.below(maxq) as u8).collect();
    let qzeros = pack_cols(&zeros, groups, n, bits);
    let scales: Vec<f16> = (0..groups * n)
        .map(|_| f16::from_f64(0.002 + 0.018 * rng.uniform()))
        .collect();
    let mut g_idx: Vec<i32> = (0..k).map(|i| (i / gs) as i32).collect();
    if act_order {
        let mut perm: Vec<usize> = (0..k).collect();
        for i in (1..k).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        for (i, &p) in perm.iter().enumerate() {
            g_idx[p] = (i / gs) as i32;
        }
    }
    GptqWeight {
        bits,
        group_size,
        in_features: k,
        out_features: n,
        qweight,
        qzeros,
        scales,
        g_idx,
    }
}

/// Random activations in [-1, 1) as f32 (the caller rounds them to f16/bf16).
pub fn random_activations(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed ^ 0x5151);
    (0..len)
        .map(|_| (2.0 * rng.uniform() - 1.0) as f32)
        .collect()
}
