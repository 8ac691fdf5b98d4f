//! Packing a solver result ([`QuantizedLinear`]) into GPTQ "v1" tensors ([`GptqWeight`]).
//!
//! Mirrors the `pack` methods of AutoGPTQ 0.6 (`qlinear_cuda_old.py`, `qlinear_exllama.py`), with
//! the two deliberate differences of spec §2.3: the integer codes come straight from the solver
//! (clamped to `0..=maxq`, GPTQModel's `pack_original` does the same) instead of being re-derived by
//! rounding the fake-quantized weight, and scales are always written as F16.
//!
//! Layout: an LSB-first bit stream of `bits`-bit values along the packed axis (value `i` at bits
//! `[b·i, b·i+b)` of the concatenated little-endian 32-bit words), `qweight` packed along K,
//! `qzeros` along N storing `zero − 1`. For 3 bits this is exactly AutoGPTQ's cross-word layout.
//! The inverse lives in [`runtime::qlinear`].

use half::f16;
use rayon::prelude::*;
use runtime::qlinear::{gptq_shapes, GptqWeight};

use crate::error::{Error, Result};
use crate::module::QuantizedLinear;

/// Word `word` of the LSB-first bit stream of `bits`-bit values given by `value(i)`.
///
/// Only the values overlapping bits `[32·word, 32·word + 32)` are read; each is masked to `bits`
/// bits, and a value that straddles a word boundary contributes its low bits to this word and its
/// high bits to the next (the 3-bit v10/v21 split).
#[inline]
pub fn pack_stream_word(value: impl Fn(usize) -> u32, word: usize, bits: u32) -> u32 {
    let b = bits as usize;
    let mask = (1u64 << bits) - 1;
    let start = 32 * word;
    let first = start / b;
    let last = (start + 31) / b;
    let mut w = 0u64;
    for i in first..=last {
        let v = value(i) as u64 & mask;
        let offset = (i * b) as i64 - start as i64;
        if offset >= 0 {
            w |= v << offset;
        } else {
            w |= v >> (-offset);
        }
    }
    (w & 0xFFFF_FFFF) as u32
}

/// Packs a `[rows, cols]` matrix given by `value(row, col)` along **rows** into `[rows·b/32, cols]`
/// words (the `qweight` layout). `rows·bits` must be a multiple of 32.
pub fn pack_rows_with(
    rows: usize,
    cols: usize,
    bits: u32,
    value: impl Fn(usize, usize) -> u32 + Sync,
) -> Vec<i32> {
    let word_rows = rows * bits as usize / 32;
    let mut out = vec![0i32; word_rows * cols];
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            for (c, d) in dst.iter_mut().enumerate() {
                *d = pack_stream_word(|i| value(i, c), r, bits) as i32;
            }
        });
    out
}

/// Packs a `[rows, cols]` matrix given by `value(row, col)` along **columns** into
/// `[rows, cols·b/32]` words (the `qzeros` layout). `cols·bits` must be a multiple of 32.
pub fn pack_cols_with(
    rows: usize,
    cols: usize,
    bits: u32,
    value: impl Fn(usize, usize) -> u32,
) -> Vec<i32> {
    let wpr = cols * bits as usize / 32;
    let mut out = Vec::with_capacity(rows * wpr);
    for r in 0..rows {
        for w in 0..wpr {
            out.push(pack_stream_word(|i| value(r, i), w, bits) as i32);
        }
    }
    out
}

/// Packs row-major `[rows, cols]` values along rows: the inverse of [`runtime::qlinear::unpack_rows`].
pub fn pack_rows(values: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    pack_rows_with(rows, cols, bits, |r, c| values[r * cols + c] as u32)
}

/// Packs row-major `[rows, cols]` values along columns: the inverse of [`runtime::qlinear::unpack_cols`].
pub fn pack_cols(values: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    pack_cols_with(rows, cols, bits, |r, c| values[r * cols + c] as u32)
}

/// Packs one solver result into GPTQ v1 tensors.
///
/// Codes are clamped to `0..=maxq`; scales are rounded to f16 (round-to-nearest-even, as
/// `tensor.half()`); zero points must be integers in `1..=maxq` and are stored as `zero − 1`.
/// The transposition from the solver's `[N, K]` to the file's K-major packing happens here.
///
/// # Errors
/// [`Error::Layout`] for unsupported bits, group sizes or dimensions that do not pack into whole
/// words, and `g_idx` values outside `0..G`; [`Error::QuantizedLength`] when a vector's length does
/// not match the shape; [`Error::ZeroPoint`] for a zero point v1 cannot store.
pub fn pack(q: &QuantizedLinear) -> Result<GptqWeight> {
    let (k_dim, n_dim, bits) = (q.in_features, q.out_features, q.bits);
    let layout = |source| Error::Layout {
        module: "pack".to_string(),
        source,
    };
    // Validate bits, group size and dimensions before sizing anything from them.
    let probe = GptqWeight {
        bits,
        group_size: q.group_size,
        in_features: k_dim,
        out_features: n_dim,
        qweight: Vec::new(),
        qzeros: Vec::new(),
        scales: Vec::new(),
        g_idx: Vec::new(),
    };
    match probe.check() {
        Ok(()) | Err(runtime::qlinear::QlinearError::Length { .. }) => {}
        Err(e) => return Err(layout(e)),
    }
    let shapes = gptq_shapes(bits, q.group_size, k_dim, n_dim);
    let groups = shapes.scales[0];
    for (field, expected, got) in [
        ("codes", n_dim * k_dim, q.codes.len()),
        ("scales", groups * n_dim, q.scales.len()),
        ("zeros", groups * n_dim, q.zeros.len()),
        ("g_idx", k_dim, q.g_idx.len()),
    ] {
        if expected != got {
            return Err(Error::QuantizedLength {
                field,
                expected,
                got,
            });
        }
    }
    let maxq = q.maxq();
    let mut stored_zeros = Vec::with_capacity(q.zeros.len());
    for (i, &z) in q.zeros.iter().enumerate() {
        if !(z.is_finite() && z.fract() == 0.0 && z >= 1.0 && z <= maxq as f32) {
            return Err(Error::ZeroPoint {
                group: i / n_dim.max(1),
                column: i % n_dim.max(1),
                got: z,
                maxq,
            });
        }
        stored_zeros.push(z as u8 - 1);
    }
    let codes = &q.codes;
    let qweight = pack_rows_with(k_dim, n_dim, bits, |k, n| {
        (codes[n * k_dim + k] as u32).min(maxq)
    });
    let qzeros = pack_cols(&stored_zeros, groups, n_dim, bits);
    let w = GptqWeight {
        bits,
        group_size: q.group_size,
        in_features: k_dim,
        out_features: n_dim,
        qweight,
        qzeros,
        scales: q.scales.iter().map(|&s| f16::from_f32(s)).collect(),
        g_idx: q.g_idx.clone(),
    };
    w.check().map_err(layout)?;
    Ok(w)
}

/// A deterministic random [`QuantizedLinear`] for tests and benchmarks (not a real quantization).
///
/// Codes uniform in `0..=maxq`, scales in `[1e-3, 0.1)`, sym zeros `(maxq+1)/2` or asym zeros in
/// `1..=maxq`. With `act_order` and a group size, `g_idx[perm[i]] = i / group_size` for a random
/// permutation `perm` (GPTQ's act-order g_idx); without, `g_idx[k] = k / group_size`; all zeros for
/// `group_size == -1`. The same `seed` gives the same layer.
pub fn synthetic_layer(
    bits: u32,
    group_size: i32,
    in_features: usize,
    out_features: usize,
    act_order: bool,
    sym: bool,
    seed: u64,
) -> QuantizedLinear {
    let mut rng = SplitMix64(seed);
    let maxq = (1u32 << bits) - 1;
    let groups = runtime::qlinear::group_count(group_size, in_features);
    let codes = (0..out_features * in_features)
        .map(|_| (rng.next() % (maxq as u64 + 1)) as u8)
        .collect();
    let scales = (0..groups * out_features)
        .map(|_| 1e-3 + 0.099 * rng.unit() as f32)
        .collect();
    let zeros = (0..groups * out_features)
        .map(|_| {
            if sym {
                (maxq + 1) as f32 / 2.0
            } else {
                (1 + rng.next() % maxq as u64) as f32
            }
        })
        .collect();
    let mut g_idx = vec![0i32; in_features];
    if group_size > 0 {
        let gs = group_size as usize;
        let mut perm: Vec<usize> = (0..in_features).collect();
        if act_order {
            for i in (1..in_features).rev() {
                let j = (rng.next() % (i as u64 + 1)) as usize;
                perm.swap(i, j);
            }
        }
        for (rank, &col) in perm.iter().enumerate() {
            g_idx[col] = (rank / gs) as i32;
        }
    }
    QuantizedLinear {
        bits,
        group_size,
        out_features,
        in_features,
        codes,
        scales,
        zeros,
        g_idx,
    }
}

/// SplitMix64: a tiny deterministic generator for synthetic layers (no dependency needed).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::qlinear::{unpack_cols, unpack_rows};

    #[test]
    fn round_trip_rows_and_cols_all_bits_odd_shapes() {
        for bits in [2u32, 3, 4, 8] {
            let maxq = (1u32 << bits) - 1;
            for (rows, cols) in [(96usize, 160usize), (32, 32 * 7), (64, 5), (32, 1)] {
                let mut rng = SplitMix64(bits as u64 * 1000 + rows as u64 + cols as u64);
                let v: Vec<u8> = (0..rows * cols)
                    .map(|_| (rng.next() % (maxq as u64 + 1)) as u8)
                    .collect();
                let words = pack_rows(&v, rows, cols, bits);
                assert_eq!(words.len(), rows * bits as usize / 32 * cols);
                assert_eq!(
                    unpack_rows(&words, rows, cols, bits),
                    v,
                    "rows {bits}-bit {rows}x{cols}"
                );
                // Along columns: transpose the shape so cols is the packed axis.
                let words = pack_cols(&v, cols, rows, bits);
                assert_eq!(
                    unpack_cols(&words, cols, rows, bits),
                    v,
                    "cols {bits}-bit {cols}x{rows}"
                );
            }
        }
    }

    #[test]
    fn sym_zero_words_match_the_spec_exactly() {
        // Spec §2.3: stored zero-1 for sym packs to these words (per word / per 3-word triplet).
        let cases: [(u32, Vec<u32>); 3] = [
            (4, vec![0x7777_7777]),
            (8, vec![0x7F7F_7F7F]),
            (3, vec![0xDB6D_B6DB, 0xB6DB_6DB6, 0x6DB6_DB6D]),
        ];
        for (bits, expected) in cases {
            let n = 64; // two triplets / several words
            let mut q = synthetic_layer(bits, -1, 32, n, false, true, 1);
            q.zeros
                .iter_mut()
                .for_each(|z| *z = (1u32 << (bits - 1)) as f32);
            let w = pack(&q).unwrap();
            let per_row = n * bits as usize / 32;
            assert_eq!(w.qzeros.len(), per_row);
            for (i, &word) in w.qzeros.iter().enumerate() {
                assert_eq!(
                    word as u32,
                    expected[i % expected.len()],
                    "{bits}-bit word {i}: {:#010X}",
                    word as u32
                );
            }
        }
    }

    #[test]
    fn three_bit_triplet_words_by_hand() {
        // Column of 32 codes v_i = i % 8 along K, checked against the spec formula computed here.
        let v: Vec<u32> = (0..32).map(|i| i % 8).collect();
        let mut expected = [0u32; 3];
        for k in 0..10 {
            expected[0] |= v[k] << (3 * k);
            expected[1] |= v[11 + k] << (3 * k + 1);
            expected[2] |= v[22 + k] << (3 * k + 2);
        }
        expected[0] |= v[10] << 30;
        expected[1] |= ((v[10] >> 2) & 1) | (v[21] << 31);
        expected[2] |= (v[21] >> 1) & 3;
        let got: Vec<u32> = (0..3).map(|w| pack_stream_word(|i| v[i], w, 3)).collect();
        assert_eq!(got, expected.to_vec());
    }

    #[test]
    fn codes_are_clamped_to_maxq() {
        let mut q = synthetic_layer(4, -1, 8, 8, false, true, 2);
        q.codes.iter_mut().for_each(|c| *c = 200);
        let w = pack(&q).unwrap();
        assert!(w.unpack_codes().iter().all(|&c| c == 15));
    }

    #[test]
    fn dequantize_of_pack_equals_fake_quant_exactly() {
        // bits {2,3,4,8} × group {-1, 32, 128} × act-order on/off (and an asym case per bit width):
        // dequant(pack(q))[n, k] == f16(scale[g, n]) · (q[n, k] − zero[g, n]) bit for bit.
        let (k_dim, n_dim) = (256usize, 96usize);
        for bits in [2u32, 3, 4, 8] {
            for gs in [-1i32, 32, 128] {
                for (act_order, sym) in [(false, true), (true, true), (true, false)] {
                    let seed =
                        bits as u64 * 100 + (gs + 1) as u64 + act_order as u64 * 7 + sym as u64;
                    let q = synthetic_layer(bits, gs, k_dim, n_dim, act_order, sym, seed);
                    let w = pack(&q).unwrap();
                    assert_eq!(w.g_idx, q.g_idx);
                    let deq = w.dequantize();
                    for n in 0..n_dim {
                        for k in 0..k_dim {
                            let g = q.g_idx[k] as usize;
                            let scale = f16::from_f32(q.scales[g * n_dim + n]).to_f32();
                            let expected =
                                scale * (q.codes[n * k_dim + k] as f32 - q.zeros[g * n_dim + n]);
                            let got = deq[n * k_dim + k];
                            assert!(
                                got.to_bits() == expected.to_bits() || (got == 0.0 && expected == 0.0),
                                "bits {bits} gs {gs} act {act_order} sym {sym} [{n},{k}]: {got} vs {expected}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn act_order_g_idx_groups_hold_group_size_columns() {
        let q = synthetic_layer(4, 32, 96, 8, true, true, 3);
        let mut counts = [0; 3];
        q.g_idx.iter().for_each(|&g| counts[g as usize] += 1);
        assert_eq!(counts, [32, 32, 32]);
        assert_ne!(q.g_idx, synthetic_layer(4, 32, 96, 8, false, true, 3).g_idx);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let mut q = synthetic_layer(4, 32, 64, 8, false, true, 4);
        q.scales.pop();
        assert!(matches!(
            pack(&q),
            Err(Error::QuantizedLength {
                field: "scales",
                ..
            })
        ));
        let mut q = synthetic_layer(4, 32, 64, 8, false, true, 4);
        q.zeros[3] = 0.0;
        let e = pack(&q).unwrap_err();
        assert!(
            matches!(
                e,
                Error::ZeroPoint {
                    group: 0,
                    column: 3,
                    ..
                }
            ),
            "{e}"
        );
        let mut q = synthetic_layer(3, -1, 64, 32, false, true, 4);
        q.out_features = 16;
        assert!(matches!(pack(&q), Err(Error::Layout { .. })));
        let mut q = synthetic_layer(4, 32, 64, 8, false, true, 4);
        q.g_idx[0] = 9;
        assert!(pack(&q).unwrap_err().to_string().contains("g_idx[0]"));
    }
}
