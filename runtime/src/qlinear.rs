//! GPTQ "v1" quantized linear weights (the AutoGPTQ 0.6 on-disk layout): checks, unpacking and
//! dequantization.
//!
//! Conventions (spec `gptq-spec.md` §2.1–§2.3), with K = `in_features`, N = `out_features`,
//! b = `bits`, G = groups:
//! - `qweight` `[K·b/32, N]` I32: integer codes packed along **K**;
//! - `qzeros` `[G, N·b/32]` I32: `zero − 1` packed along **N**;
//! - `scales` `[G, N]` F16; `g_idx` `[K]` I32, the group of each input row.
//!
//! Packing is an LSB-first bit stream along the packed axis: value `i` occupies bits
//! `[b·i, b·i + b)` of the little-endian concatenation of the 32-bit words. For 2/4/8 bits that is
//! "value j of a word at bits `[b·j, b·j+b)`"; for 3 bits it is exactly AutoGPTQ's cross-word layout
//! (32 values in 3 words, v10 split 2 + 1 bits across words 0/1, v21 split 1 + 2 bits across words 1/2).
//! Words are uint32 bit patterns stored as I32 (reinterpreted, not converted).
//!
//! Dequantization (v1, what every loader does):
//! `W[n, k] = scales[g_idx[k], n] · (q[k, n] − (qzeros_unpacked[g_idx[k], n] + 1))`.

use rayon::prelude::*;

/// Bit widths the GPTQ v1 layout supports here.
pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

/// Why a [`GptqWeight`] is not a consistent GPTQ v1 layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QlinearError {
    /// `bits` is not one of 2, 3, 4, 8.
    #[error("GPTQ weight: `bits` is {got}, expected one of 2, 3, 4, 8")]
    Bits {
        /// The value found.
        got: u32,
    },
    /// `group_size` is neither -1 nor positive.
    #[error("GPTQ weight: `group_size` is {got}, expected -1 or a positive number")]
    GroupSize {
        /// The value found.
        got: i32,
    },
    /// A dimension cannot be packed into whole 32-bit words at this bit width.
    #[error(
        "GPTQ weight: `{field}` is {got}, expected a multiple of {expected} for {bits}-bit packing"
    )]
    Dimension {
        /// `in_features` or `out_features`.
        field: &'static str,
        /// The required multiple.
        expected: usize,
        /// The value found.
        got: usize,
        /// The bit width.
        bits: u32,
    },
    /// A tensor has the wrong number of elements.
    #[error("GPTQ weight: `{field}` has {got} elements, expected {expected} (shape {shape:?})")]
    Length {
        /// `qweight`, `qzeros`, `scales` or `g_idx`.
        field: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements found.
        got: usize,
        /// The expected shape.
        shape: Vec<usize>,
    },
    /// A `g_idx` entry names a group that does not exist.
    #[error("GPTQ weight: `g_idx[{index}]` is {got}, expected a group in 0..{groups}")]
    GroupIndex {
        /// The input row.
        index: usize,
        /// The group found.
        got: i32,
        /// G.
        groups: usize,
    },
}

/// The expected shapes of the four GPTQ v1 tensors of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptqShapes {
    /// `[K·b/32, N]`.
    pub qweight: [usize; 2],
    /// `[G, N·b/32]`.
    pub qzeros: [usize; 2],
    /// `[G, N]`.
    pub scales: [usize; 2],
    /// `[K]`.
    pub g_idx: [usize; 1],
}

/// Number of groups: 1 for `group_size <= 0` (−1 = one group over all of K), else `⌈K / group_size⌉`.
pub fn group_count(group_size: i32, in_features: usize) -> usize {
    if group_size <= 0 {
        1
    } else {
        in_features.div_ceil(group_size as usize).max(1)
    }
}

/// The smallest count of `bits`-bit values that fills whole 32-bit words (8 for 4-bit, 32 for 3-bit).
pub fn pack_multiple(bits: u32) -> usize {
    let b = bits.max(1) as usize;
    32 / gcd(b, 32)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The tensor shapes of a layer with these parameters (no validation; see [`GptqWeight::check`]).
pub fn gptq_shapes(
    bits: u32,
    group_size: i32,
    in_features: usize,
    out_features: usize,
) -> GptqShapes {
    let b = bits as usize;
    let g = group_count(group_size, in_features);
    GptqShapes {
        qweight: [in_features * b / 32, out_features],
        qzeros: [g, out_features * b / 32],
        scales: [g, out_features],
        g_idx: [in_features],
    }
}

/// Reads value `index` (of `bits` bits) from an LSB-first bit stream split over 32-bit words;
/// `word(i)` returns word `i` of the stream.
///
/// Handles values that straddle two words (3-bit).
#[inline]
pub fn extract_bits(word: impl Fn(usize) -> u32, index: usize, bits: u32) -> u32 {
    let bit = index * bits as usize;
    let w = bit / 32;
    let s = (bit % 32) as u32;
    let mut v = (word(w) >> s) as u64;
    if s + bits > 32 {
        v |= (word(w + 1) as u64) << (32 - s);
    }
    (v & ((1u64 << bits) - 1)) as u32
}

/// Unpacks a `[rows·b/32, cols]` word matrix packed along **rows** (the `qweight` layout) into a
/// `[rows, cols]` row-major matrix of codes. The caller guarantees `words.len() == rows·b/32·cols`.
pub fn unpack_rows(words: &[i32], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; rows * cols];
    let mask = (1u64 << bits) - 1;
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let bit = r * bits as usize;
            let w = bit / 32;
            let s = (bit % 32) as u32;
            let lo = &words[w * cols..(w + 1) * cols];
            if s + bits > 32 {
                let hi = &words[(w + 1) * cols..(w + 2) * cols];
                for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                    let v = ((l as u32 as u64) >> s) | ((h as u32 as u64) << (32 - s));
                    *d = (v & mask) as u8;
                }
            } else {
                for (d, &l) in dst.iter_mut().zip(lo) {
                    *d = (((l as u32 as u64) >> s) & mask) as u8;
                }
            }
        });
    out
}

/// Unpacks a `[rows, cols·b/32]` word matrix packed along **columns** (the `qzeros` layout) into a
/// `[rows, cols]` row-major matrix of values. The caller guarantees `words.len() == rows·cols·b/32`.
pub fn unpack_cols(words: &[i32], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    let wpr = cols * bits as usize / 32;
    let mut out = vec![0u8; rows * cols];
    for (r, dst) in out.chunks_mut(cols.max(1)).enumerate() {
        let row = &words[r * wpr..(r + 1) * wpr];
        for (c, d) in dst.iter_mut().enumerate() {
            *d = extract_bits(|i| row[i] as u32, c, bits) as u8;
        }
    }
    out
}

/// One GPTQ v1 quantized linear layer as stored on disk (host memory).
#[derive(Debug, Clone, PartialEq)]
pub struct GptqWeight {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Input rows per group, or -1 for a single group.
    pub group_size: i32,
    /// K.
    pub in_features: usize,
    /// N.
    pub out_features: usize,
    /// `[K·b/32, N]` codes packed along K.
    pub qweight: Vec<i32>,
    /// `[G, N·b/32]` stored zeros (`zero − 1`) packed along N.
    pub qzeros: Vec<i32>,
    /// `[G, N]` scales.
    pub scales: Vec<half::f16>,
    /// `[K]` group of each input row.
    pub g_idx: Vec<i32>,
}

impl GptqWeight {
    /// Number of groups G.
    pub fn groups(&self) -> usize {
        group_count(self.group_size, self.in_features)
    }

    /// The expected shapes of the four tensors.
    pub fn shapes(&self) -> GptqShapes {
        gptq_shapes(
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
        )
    }

    /// Checks bits, group size, that K and N pack into whole words, the tensor lengths, and that
    /// every `g_idx` value lies in `0..G`. Call it before [`unpack_codes`](Self::unpack_codes),
    /// [`unpack_zeros`](Self::unpack_zeros) or [`dequantize`](Self::dequantize), which assume it holds.
    ///
    /// # Errors
    /// The first inconsistency found, naming the field, what was expected and what was found.
    pub fn check(&self) -> Result<(), QlinearError> {
        if !SUPPORTED_BITS.contains(&self.bits) {
            return Err(QlinearError::Bits { got: self.bits });
        }
        if self.group_size == 0 || self.group_size < -1 {
            return Err(QlinearError::GroupSize {
                got: self.group_size,
            });
        }
        let m = pack_multiple(self.bits);
        for (field, got) in [
            ("in_features", self.in_features),
            ("out_features", self.out_features),
        ] {
            if got % m != 0 {
                return Err(QlinearError::Dimension {
                    field,
                    expected: m,
                    got,
                    bits: self.bits,
                });
            }
        }
        let s = self.shapes();
        let lens = [
            ("qweight", self.qweight.len(), s.qweight.to_vec()),
            ("qzeros", self.qzeros.len(), s.qzeros.to_vec()),
            ("scales", self.scales.len(), s.scales.to_vec()),
            ("g_idx", self.g_idx.len(), s.g_idx.to_vec()),
        ];
        for (field, got, shape) in lens {
            let expected = shape.iter().product();
            if got != expected {
                return Err(QlinearError::Length {
                    field,
                    expected,
                    got,
                    shape,
                });
            }
        }
        let groups = self.groups();
        if let Some((index, &got)) = self
            .g_idx
            .iter()
            .enumerate()
            .find(|(_, &g)| g < 0 || g as usize >= groups)
        {
            return Err(QlinearError::GroupIndex { index, got, groups });
        }
        Ok(())
    }

    /// The integer codes, `[K, N]` row-major (input row major, as packed).
    pub fn unpack_codes(&self) -> Vec<u8> {
        unpack_rows(
            &self.qweight,
            self.in_features,
            self.out_features,
            self.bits,
        )
    }

    /// The stored zeros (`zero − 1`), `[G, N]` row-major.
    pub fn unpack_zeros(&self) -> Vec<u8> {
        unpack_cols(&self.qzeros, self.groups(), self.out_features, self.bits)
    }

    /// The dequantized weight `[N, K]` row-major (the `nn.Linear` layout):
    /// `w[n, k] = f32(scales[g, n]) · (q[k, n] − (stored_zero[g, n] + 1))` with `g = g_idx[k]`.
    ///
    /// Assumes [`check`](Self::check) passed.
    pub fn dequantize(&self) -> Vec<f32> {
        let (k_dim, n_dim) = (self.in_features, self.out_features);
        let codes = self.unpack_codes();
        let zeros = self.unpack_zeros();
        let scales: Vec<f32> = self.scales.iter().map(|s| s.to_f32()).collect();
        let mut out = vec![0f32; n_dim * k_dim];
        if k_dim == 0 {
            return out;
        }
        const TILE: usize = 16;
        out.par_chunks_mut(TILE * k_dim)
            .enumerate()
            .for_each(|(t, block)| {
                let n0 = t * TILE;
                let rows = block.len() / k_dim;
                for k in 0..k_dim {
                    let g = self.g_idx[k] as usize;
                    let code_row = &codes[k * n_dim + n0..k * n_dim + n0 + rows];
                    let zero_row = &zeros[g * n_dim + n0..g * n_dim + n0 + rows];
                    let scale_row = &scales[g * n_dim + n0..g * n_dim + n0 + rows];
                    for i in 0..rows {
                        let q = code_row[i] as i32 - (zero_row[i] as i32 + 1);
                        block[i * k_dim + k] = scale_row[i] * q as f32;
                    }
                }
            });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn weight(bits: u32, group_size: i32, k: usize, n: usize) -> GptqWeight {
        let s = gptq_shapes(bits, group_size, k, n);
        GptqWeight {
            bits,
            group_size,
            in_features: k,
            out_features: n,
            qweight: vec![0; s.qweight[0] * s.qweight[1]],
            qzeros: vec![0; s.qzeros[0] * s.qzeros[1]],
            scales: vec![f16::ONE; s.scales[0] * s.scales[1]],
            g_idx: vec![0; k],
        }
    }

    #[test]
    fn sym_zero_words_unpack_to_the_spec_values() {
        // Spec §2.3 table: 4-bit stored 7 = 0x77777777, 8-bit stored 127 = 0x7F7F7F7F,
        // 3-bit stored 3 = triplet 0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D.
        let cases: [(u32, Vec<u32>, u8); 3] = [
            (4, vec![0x7777_7777], 7),
            (8, vec![0x7F7F_7F7F], 127),
            (3, vec![0xDB6D_B6DB, 0xB6DB_6DB6, 0x6DB6_DB6D], 3),
        ];
        for (bits, words, stored) in cases {
            let n = 32 * words.len() / bits as usize;
            let mut w = weight(bits, -1, 32, n);
            w.qzeros = words.iter().map(|&x| x as i32).collect();
            w.check().unwrap();
            assert_eq!(w.unpack_zeros(), vec![stored; n], "{bits}-bit");
        }
        assert_eq!(0x7777_7777u32 as i32, 2004318071);
        assert_eq!(0x7F7F_7F7Fu32 as i32, 2139062143);
        assert_eq!(0xDB6D_B6DBu32 as i32, -613566757);
    }

    #[test]
    fn three_bit_cross_word_layout() {
        // v_i = i % 8 along K for one column; words computed by hand from the spec formula:
        // w0 = Σ_{k<10} v_k<<3k | v10<<30 ; w1 = (v10>>2)&1 | Σ v_{11+k}<<(3k+1) | v21<<31 ;
        // w2 = (v21>>1)&3 | Σ v_{22+k}<<(3k+2).
        let v: Vec<u32> = (0..32).map(|i| i % 8).collect();
        let mut w = [0u32; 3];
        for k in 0..10 {
            w[0] |= v[k] << (3 * k);
            w[1] |= v[11 + k] << (3 * k + 1);
            w[2] |= v[22 + k] << (3 * k + 2);
        }
        w[0] |= v[10] << 30;
        w[1] |= (v[10] >> 2) & 1;
        w[1] |= v[21] << 31;
        w[2] |= (v[21] >> 1) & 3;
        // v10 = 2 (bits 0b010): low two bits 0b10 in w0[30:31], bit 2 (0) in w1[0].
        // v21 = 5 (0b101): bit 0 in w1[31], bits 1-2 (0b10) in w2[0:1].
        assert_eq!(w[0] >> 30, 0b10);
        assert_eq!(w[1] >> 31, 1);
        assert_eq!(w[2] & 3, 0b10);
        let mut q = weight(3, -1, 32, 32);
        // Column 0 holds v, all other columns zero.
        for (r, &word) in w.iter().enumerate() {
            q.qweight[r * 32] = word as i32;
        }
        q.check().unwrap();
        let codes = q.unpack_codes();
        for k in 0..32 {
            assert_eq!(codes[k * 32] as u32, v[k], "k={k}");
            assert!(codes[k * 32 + 1..k * 32 + 32].iter().all(|&c| c == 0));
        }
    }

    #[test]
    fn four_bit_words_lsb_first_along_k() {
        // One word 0x76543210 in column 1: rows 0..8 hold 0,1,..,7 (LSB first).
        let mut q = weight(4, -1, 8, 8);
        q.qweight[1] = 0x7654_3210;
        let codes = q.unpack_codes();
        for k in 0..8 {
            assert_eq!(codes[k * 8 + 1], k as u8);
            assert_eq!(codes[k * 8], 0);
        }
        // 2-bit: 0xE4 = 0b11_10_01_00 -> 0,1,2,3 then zeros.
        let mut q = weight(2, -1, 16, 16);
        q.qweight[0] = 0xE4;
        let codes = q.unpack_codes();
        let col0: Vec<u8> = (0..16).map(|k| codes[k * 16]).collect();
        assert_eq!(&col0[..5], &[0, 1, 2, 3, 0]);
    }

    #[test]
    fn dequantize_hand_computed() {
        // 4-bit, K=8, N=8, group_size 4 -> G=2; sym zeros (stored 7, zero 8).
        let mut q = weight(4, 4, 8, 8);
        q.qzeros = vec![0x7777_7777; 2];
        q.g_idx = vec![0, 0, 0, 0, 1, 1, 1, 1];
        q.scales = (0..16)
            .map(|i| f16::from_f32(0.5 + i as f32 / 8.0))
            .collect();
        // Column n=2: codes 0..8 along K.
        q.qweight[2] = 0x7654_3210u32 as i32;
        q.check().unwrap();
        let w = q.dequantize();
        for k in 0..8 {
            let g = k / 4;
            let scale = q.scales[g * 8 + 2].to_f32();
            assert_eq!(w[2 * 8 + k], scale * (k as f32 - 8.0), "k={k}");
            // Column 0 has code 0 everywhere: -8 · scale.
            assert_eq!(w[k], q.scales[g * 8].to_f32() * -8.0);
        }
    }

    #[test]
    fn check_names_the_problem() {
        let mut q = weight(5, -1, 32, 32);
        assert_eq!(q.check(), Err(QlinearError::Bits { got: 5 }));
        q.bits = 3;
        q.out_features = 48;
        let e = q.check().unwrap_err();
        assert!(matches!(
            e,
            QlinearError::Dimension {
                field: "out_features",
                expected: 32,
                got: 48,
                ..
            }
        ));
        let mut q = weight(4, 16, 32, 8);
        q.scales.pop();
        let e = q.check().unwrap_err();
        assert!(
            matches!(
                e,
                QlinearError::Length {
                    field: "scales",
                    expected: 16,
                    got: 15,
                    ..
                }
            ),
            "{e}"
        );
        let mut q = weight(4, 16, 32, 8);
        q.g_idx[5] = 2;
        assert_eq!(
            q.check(),
            Err(QlinearError::GroupIndex {
                index: 5,
                got: 2,
                groups: 2
            })
        );
        assert!(q.check().unwrap_err().to_string().contains("g_idx[5]"));
        let mut q = weight(4, 0, 32, 8);
        q.group_size = 0;
        assert_eq!(q.check(), Err(QlinearError::GroupSize { got: 0 }));
    }

    #[test]
    fn shapes_match_the_spec_table() {
        // Spec §2.2: w2 (K 14336, N 4096) 3-bit g128: qweight [1344, 4096], qzeros [112, 384].
        let s = gptq_shapes(3, 128, 14336, 4096);
        assert_eq!(s.qweight, [1344, 4096]);
        assert_eq!(s.qzeros, [112, 384]);
        assert_eq!(s.scales, [112, 4096]);
        assert_eq!(gptq_shapes(8, 32, 4096, 14336).qzeros, [128, 3584]);
        assert_eq!(gptq_shapes(4, -1, 4096, 1024).qzeros, [1, 128]);
        assert_eq!(pack_multiple(3), 32);
        assert_eq!(pack_multiple(4), 8);
    }
}
