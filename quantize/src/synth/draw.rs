//! The random draws behind [`super::write_synth`]: counter-based SplitMix64, approximately normal
//! dense weights, and GPTQ layers generated directly in their packed form.
//!
//! Value `i` of a tensor's stream is `splitmix64(key + (i+1)·γ)`, the key derived from the seed and
//! the tensor's name ([`tensor_key`]). Any chunk can be drawn by any thread, so the output is
//! bit-identical for a given seed whatever the number of threads.
//!
//! "N(0, 1)" is Irwin–Hall: the centred sum of four 16-bit uniforms, scaled to unit variance
//! (bounded at ±3.46σ, no outliers), which costs one draw per weight.
//!
//! A GPTQ layer: codes uniform in `1..2^bits`, symmetric around the zero ([`synth_qweight`]);
//! zeros the symmetric `2^(bits-1)` stored as `zero − 1` (`0x77777777` at 4 bits); per-group F16
//! scales the target std divided by the codes' std, times a jitter in `[0.75, 1.25)` normalised
//! to keep the std; with act-order and a group size `g_idx[perm[i]] = i / group_size` for a random
//! permutation, so each group has exactly `group_size` members as in a real act-order branch
//! (spec §2.1–§2.3).

use half::f16;
use rayon::prelude::*;
use runtime::qlinear::{group_count, GptqWeight};

use crate::pack::pack_cols_with;
use crate::presets::Preset;

/// Elements drawn per parallel task (values do not depend on it: only the scheduling does).
const CHUNK: usize = 1 << 16;

/// Jitter of the per-group scales: `0.75 + 0.5·u`, divided by `sqrt(E[(0.75 + 0.5·u)²])`
/// `= sqrt(0.5625 + 0.375 + 0.25/3)` so it leaves the weights' std unchanged.
const SCALE_JITTER_RMS: f32 = 1.010_363;

/// A random GPTQ v1 layer `[K = k, N = n]` of `preset` whose dequantized weights have std `std`
/// (see the module doc). Deterministic in `key`, whatever the number of threads.
pub fn synth_gptq(preset: &Preset, k: usize, n: usize, std: f32, key: u64) -> GptqWeight {
    GptqWeight {
        qweight: synth_qweight(preset.bits, k, n, key),
        ..gptq_params(preset, k, n, std, key)
    }
}

/// [`synth_gptq`] without its `qweight` (left empty): the small tensors `qzeros`, `scales` and
/// `g_idx`, for a caller that draws `qweight` into its own buffer ([`synth_qweight_into`]).
pub fn gptq_params(preset: &Preset, k: usize, n: usize, std: f32, key: u64) -> GptqWeight {
    let bits = preset.bits;
    let groups = group_count(preset.group_size, k);
    // Symmetric zero 2^(b-1), stored as zero − 1 in every field; all rows alike.
    let stored_zero = (1u32 << (bits - 1)) - 1;
    let row = pack_cols_with(1, n, bits, |_, _| stored_zero);
    let qzeros = row.repeat(groups);
    // Scales: q − zero takes each of ±1..=±m with probability 1/M and 0 with 2/M (M = 2^b,
    // m = M/2 − 1), so its variance is Σ j²/M = m(m+1)(2m+1)/(3M).
    let levels = (1u32 << bits) as f32;
    let m = levels / 2.0 - 1.0;
    let base = std / (m * (m + 1.0) * (2.0 * m + 1.0) / (3.0 * levels)).sqrt();
    let scale_key = mix(key ^ 0x005C_A1E5);
    let scales = (0..groups * n)
        .into_par_iter()
        .map(|i| {
            let u = (draw(scale_key, i as u64) >> 40) as f32 / (1u64 << 24) as f32;
            f16::from_f32(base * (0.75 + 0.5 * u) / SCALE_JITTER_RMS)
        })
        .collect();
    let g_idx = synth_g_idx(preset, k, mix(key ^ 0x0006_01D8));
    GptqWeight {
        bits,
        group_size: preset.group_size,
        in_features: k,
        out_features: n,
        qweight: Vec::new(),
        qzeros,
        scales,
        g_idx,
    }
}

/// `qweight` `[K·b/32, N]` of codes uniform over `0..2^b`, with code 0 replaced by the zero
/// `2^(b−1)`: `q − zero` is symmetric over `−m..=m` (`m = 2^(b−1) − 1`, 0 twice as likely), as in a
/// real symmetric GPTQ layer, whose scale `2·max|w|/maxq` leaves code 0 all but unused and whose
/// codes peak at the zero. Plain codes `0..2^b` would have a mean of −½ step: a bias shared by
/// every output that grows the residual stream layer after layer.
///
/// For 2/4/8 bits word `i` is the low half of draw `i` with its zero fields set to the zero point
/// (a few bit operations per word); for 3 bits each block of 32 inputs of one column (3 words,
/// fields straddling words) comes from 2 draws. Either way a word depends only on its position.
pub fn synth_qweight(bits: u32, k: usize, n: usize, key: u64) -> Vec<i32> {
    let mut bytes = vec![0u8; k * bits as usize / 32 * n * 4];
    synth_qweight_into(bits, k, n, key, &mut bytes);
    bytes
        .chunks_exact(4)
        .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect()
}

/// [`synth_qweight`] as little-endian bytes into `out` (`K·b/32·N·4` bytes), the form the file
/// holds.
pub fn synth_qweight_into(bits: u32, k: usize, n: usize, key: u64, out: &mut [u8]) {
    let b = bits as usize;
    debug_assert_eq!(out.len(), k * b / 32 * n * 4);
    if n == 0 {
        return;
    }
    if 32 % b == 0 {
        out.par_chunks_mut(4 * CHUNK)
            .enumerate()
            .for_each(|(c, dst)| {
                for (j, w) in dst.chunks_exact_mut(4).enumerate() {
                    let word = draw(key, (c * CHUNK + j) as u64) as u32;
                    w.copy_from_slice(&zero_fields_to_zero_point(word, bits).to_le_bytes());
                }
            });
    } else {
        out.par_chunks_mut(4 * b * n)
            .enumerate()
            .for_each(|(block, rows)| qweight_block(bits, key, block, n, rows));
    }
}

/// `word` (fields of `bits` bits, `bits` dividing 32) with every field equal to 0 set to
/// `2^(bits−1)`: OR-ing a field's bits into its lowest bit finds the zero fields.
#[inline]
fn zero_fields_to_zero_point(word: u32, bits: u32) -> u32 {
    // The lowest bit of every field: 0x11111111 at 4 bits, 0x01010101 at 8, 0x55555555 at 2.
    let lows = u32::MAX / ((1u32 << bits) - 1);
    let mut any = word;
    for j in 1..bits {
        any |= word >> j;
    }
    word | ((!any & lows) << (bits - 1))
}

/// One block of 32 inputs (`bits` rows) of `qweight` for widths not dividing 32 (3 bits): per
/// column the 32 codes are the low `32·bits` bits of two draws read as an LSB-first stream (the
/// packing's own layout, fields straddling words), with zero fields set to the zero point as in
/// [`synth_qweight`]; word `w` is bits `[32·w, 32·w + 32)` of the stream. `rows` may hold fewer
/// than `bits` rows at the end of K.
fn qweight_block(bits: u32, key: u64, block: usize, n: usize, rows: &mut [u8]) {
    debug_assert!(bits <= 4, "32 codes of {bits} bits must fit two draws");
    let words = rows.len() / 4 / n;
    let width = 32 * bits;
    let lows = (0..32).fold(0u128, |acc, i| acc | 1 << (bits * i));
    for col in 0..n {
        let first = ((block * n + col) * 2) as u64;
        let r = draw(key, first) as u128 | (draw(key, first + 1) as u128) << 64;
        let codes = r & ((1u128 << width) - 1);
        let mut any = codes;
        for j in 1..bits {
            any |= codes >> j;
        }
        let stream = codes | ((!any & lows) << (bits - 1));
        for w in 0..words {
            let at = 4 * (w * n + col);
            rows[at..at + 4].copy_from_slice(&((stream >> (32 * w)) as u32).to_le_bytes());
        }
    }
}

/// `g_idx` of a `k`-input layer: all 0 without groups; with act-order `g_idx[perm[i]] = i / gs` for
/// a random permutation `perm` (each group exactly `gs` inputs, the last possibly fewer), as
/// GPTQ's act-order produces; without act-order `k / gs`.
pub fn synth_g_idx(preset: &Preset, k: usize, key: u64) -> Vec<i32> {
    if preset.group_size <= 0 {
        return vec![0; k];
    }
    let gs = preset.group_size as usize;
    let mut perm: Vec<usize> = (0..k).collect();
    if preset.desc_act {
        // Fisher–Yates with the tensor's own stream (Lemire's multiply-shift for the bound).
        for i in (1..k).rev() {
            let j = ((draw(key, i as u64) >> 32) * (i as u64 + 1)) >> 32;
            perm.swap(i, j as usize);
        }
    }
    let mut g_idx = vec![0i32; k];
    for (rank, &col) in perm.iter().enumerate() {
        g_idx[col] = (rank / gs) as i32;
    }
    g_idx
}

/// `n` values ~ N(0, std²) (Irwin–Hall, see the module doc) encoded by `encode` as little-endian
/// 16-bit words. Deterministic in `key`, whatever the number of threads.
pub fn normal_bytes(key: u64, n: usize, std: f32, encode: impl Fn(f32) -> u16 + Sync) -> Vec<u8> {
    let mut out = vec![0u8; 2 * n];
    normal_into(key, std, encode, &mut out);
    out
}

/// [`normal_bytes`] into `out` (two bytes per value).
pub fn normal_into(key: u64, std: f32, encode: impl Fn(f32) -> u16 + Sync, out: &mut [u8]) {
    // Four 16-bit uniforms: mean 4·32767.5, std 65536/sqrt(3) (to 1e-9).
    const MEAN: f32 = 131_070.0;
    let scale = std * 3f32.sqrt() / 65536.0;
    out.par_chunks_mut(2 * CHUNK)
        .enumerate()
        .for_each(|(c, dst)| {
            for (j, b) in dst.chunks_exact_mut(2).enumerate() {
                let r = draw(key, (c * CHUNK + j) as u64);
                let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
                let x = (sum as f32 - MEAN) * scale;
                b.copy_from_slice(&encode(x).to_le_bytes());
            }
        });
}

/// `bf16::from_f32(x).to_bits()` for finite `x` (round to nearest even), without the NaN branch
/// that keeps the generic conversion from vectorising.
#[inline]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// The key of a tensor's random stream: the seed mixed with a hash (FNV-1a) of its name.
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ h)
}

/// Value `i` of the SplitMix64 stream with state `key`: `mix(key + (i+1)·γ)`.
#[inline]
pub(crate) fn draw(key: u64, i: u64) -> u64 {
    mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// SplitMix64's output function (Steele, Lea & Flood 2014).
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::PRESETS;
    use half::bf16;

    /// Std of the dequantized weights against the target: sampling error of ~1e5 values plus the
    /// f16 rounding of the scales stays far below this.
    const STD_REL_TOL: f64 = 0.03;

    use crate::synth::tests::mean_std;

    #[test]
    fn act_order_g_idx_has_exactly_group_size_members_per_group() {
        let g128 = Preset::by_name("gptq-4bit-128g-actorder_True").unwrap();
        let g = synth_g_idx(&g128, 1024, 7);
        let mut counts = vec![0usize; 8];
        for &x in &g {
            counts[x as usize] += 1;
        }
        assert_eq!(counts, vec![128; 8]);
        // Act-order: not the sequential k / 128 (and another key gives another permutation).
        let sequential: Vec<i32> = (0..1024).map(|k| k / 128).collect();
        assert_ne!(g, sequential);
        assert_ne!(g, synth_g_idx(&g128, 1024, 8));
        // Without act-order it is sequential; without groups all zero.
        let no_act = Preset {
            desc_act: false,
            ..g128
        };
        assert_eq!(synth_g_idx(&no_act, 1024, 7), sequential);
        let main = Preset::by_name("main").unwrap();
        assert!(synth_g_idx(&main, 1024, 7).iter().all(|&x| x == 0));
    }

    #[test]
    fn zero_fields_become_the_zero_point_and_nothing_else_changes() {
        for bits in [2u32, 4, 8] {
            let mask = (1u32 << bits) - 1;
            for i in 0..20_000u64 {
                // Sparse words too, so that many fields are zero.
                let word = draw(1, i) as u32
                    & if i % 2 == 0 {
                        u32::MAX
                    } else {
                        draw(2, i) as u32
                    };
                let got = zero_fields_to_zero_point(word, bits);
                for f in 0..32 / bits {
                    let (before, after) = ((word >> (f * bits)) & mask, (got >> (f * bits)) & mask);
                    let expected = if before == 0 { 1 << (bits - 1) } else { before };
                    assert_eq!(after, expected, "{bits}-bit word {word:#x} field {f}");
                }
            }
        }
    }

    #[test]
    fn stored_zeros_are_the_symmetric_words_of_the_spec() {
        // Spec §2.3: constant qzeros for sym.
        let expect: [(u32, Vec<i32>); 3] = [
            (4, vec![0x7777_7777]),
            (8, vec![0x7F7F_7F7F]),
            (3, vec![-613_566_757, -1_227_133_514, 1_840_700_269]),
        ];
        for (bits, words) in expect {
            let preset = PRESETS.iter().find(|p| p.bits == bits).unwrap();
            let w = synth_gptq(preset, 256, 64, 0.01, 1);
            let per_row = 64 * bits as usize / 32;
            assert_eq!(w.qzeros.len(), w.groups() * per_row);
            for row in w.qzeros.chunks(per_row) {
                for (i, &word) in row.iter().enumerate() {
                    assert_eq!(word, words[i % words.len()], "{bits}-bit word {i}");
                }
            }
            assert!(w
                .unpack_zeros()
                .iter()
                .all(|&z| z as u32 == (1 << (bits - 1)) - 1));
        }
    }

    #[test]
    fn dequantized_weights_have_the_target_std_in_every_preset() {
        let (k, n, std) = (512, 256, 0.02f32);
        for preset in PRESETS {
            let w = synth_gptq(&preset, k, n, std, tensor_key(3, preset.name));
            w.check().unwrap();
            assert!(w.scales.iter().all(|s| s.is_finite() && s.to_f32() > 0.0));
            let deq = w.dequantize();
            let (mean, got) = mean_std(deq.iter().map(|&x| x as f64));
            let rel = (got / std as f64 - 1.0).abs();
            assert!(rel < STD_REL_TOL, "{}: std {got} vs {std}", preset.name);
            // Codes symmetric around the zero 2^(b-1): no bias.
            assert!(
                mean.abs() < 0.02 * std as f64,
                "{}: mean {mean}",
                preset.name
            );
            // Codes cover 1..=maxq uniformly, the zero twice as often; 0 is never used.
            let codes = w.unpack_codes();
            let levels = 1usize << preset.bits;
            let mut hist = vec![0usize; levels];
            for &c in &codes {
                hist[c as usize] += 1;
            }
            assert_eq!(hist[0], 0, "{}", preset.name);
            let zero = levels / 2;
            hist[zero] /= 2;
            let expected = codes.len() / levels;
            for (c, &h) in hist.iter().enumerate().skip(1) {
                assert!(
                    h.abs_diff(expected) * 5 < expected,
                    "{}: code {c} seen {h} times, expected about {expected}",
                    preset.name
                );
            }
        }
    }

    #[test]
    fn dense_weights_are_normal_with_the_target_std() {
        let std = 0.5f32;
        let bytes = normal_bytes(11, 1 << 18, std, |x| bf16::from_f32(x).to_bits());
        let v: Vec<f64> = bytes
            .chunks(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect();
        let (mean, got) = mean_std(v.iter().copied());
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((got / std as f64 - 1.0).abs() < 0.01, "std {got}");
        // Irwin–Hall(4): bounded at sqrt(12)σ, excess kurtosis −6/20 (close to normal).
        let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(
            max <= 3.47 * std as f64 && max > 2.5 * std as f64,
            "max {max}"
        );
        let kurt = v.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / v.len() as f64 / got.powi(4);
        assert!((kurt - 2.7).abs() < 0.05, "kurtosis {kurt}");
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        for i in 0..200_000u64 {
            let x = f32::from_bits(draw(4, i) as u32);
            if x.is_finite() {
                assert_eq!(bf16_bits(x), bf16::from_f32(x).to_bits(), "{x:e}");
            }
        }
        // Ties round to even.
        for bits in [0x3F80_8000u32, 0x3F81_8000, 0xBF80_8000, 0x3F80_7FFF] {
            let x = f32::from_bits(bits);
            assert_eq!(bf16_bits(x), bf16::from_f32(x).to_bits(), "{bits:#x}");
        }
    }

    #[test]
    fn draws_do_not_depend_on_the_number_of_threads() {
        let preset = Preset::by_name("gptq-3bit-128g-actorder_True").unwrap();
        let g32 = Preset::by_name("gptq-4bit-32g-actorder_True").unwrap();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    (
                        synth_gptq(&preset, 1024, 512, 0.01, 5),
                        // 4 bits: 5.5 chunks of words.
                        synth_gptq(&g32, 2816, 1024, 0.01, 5),
                        normal_bytes(5, 3 * CHUNK + 17, 1.0, |x| f16::from_f32(x).to_bits()),
                    )
                })
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(8));
        assert_ne!(one.0, synth_gptq(&preset, 1024, 512, 0.01, 6));
        assert_ne!(tensor_key(0, "a.weight"), tensor_key(0, "b.weight"));
        assert_ne!(tensor_key(0, "a.weight"), tensor_key(1, "a.weight"));
    }
}
