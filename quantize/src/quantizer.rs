//! The min/max quantizer of AutoGPTQ (`quantizer.py`, identical in IST-DASLab and GPTQModel), spec §1.6.
//!
//! Per output row over a range of columns: the range always contains 0; symmetric mode mirrors the
//! larger magnitude (a row with no negative weight keeps `xmin = 0`, as the reference does); an
//! all-zero row gets `(-1, +1)`; `zero = (maxq + 1) / 2` when symmetric, `round(-xmin / scale)`
//! otherwise. Rounding is half-to-even, like `torch.round`.
//!
//! The scale's last bit depends on how the reference divides by `maxq` ([`ScaleDivision`]), and
//! that bit decides whether a row's most negative weight (exactly `-maxq/2` scales away) rounds to
//! the lowest code or one above: worth up to 0.3 % of perplexity at 3 bits on the fixture.

/// How `(xmax - xmin) / maxq` is rounded, i.e. how the reference implementation divides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDivision {
    /// IEEE division: AutoGPTQ's `Quantizer` keeps `maxq` as a tensor, and PyTorch divides by a
    /// tensor exactly. GPTQ uses this.
    True,
    /// `range * fl32(1 / maxq)`: PyTorch on CUDA divides a tensor by a Python number through the
    /// number's reciprocal. The reference's round-to-nearest figures are computed this way
    /// (checked: 3-bit g128 on python.txt gives 22.3686 this way, the reference's figure, and
    /// 22.4159 with true division).
    Reciprocal,
}

/// A configured quantizer: bit width, symmetry and scale rounding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    /// Largest code, `2^bits - 1`, as f32 (the reference keeps it as a float).
    pub maxq: f32,
    /// Symmetric mode: the zero point is fixed at `(maxq + 1) / 2`.
    pub sym: bool,
    /// How the scale is divided by `maxq`.
    pub division: ScaleDivision,
}

impl Quantizer {
    /// AutoGPTQ's quantizer with `bits` bits per code (2..=8): true division.
    pub fn new(bits: u32, sym: bool) -> Self {
        Quantizer {
            maxq: ((1u32 << bits) - 1) as f32,
            sym,
            division: ScaleDivision::True,
        }
    }

    /// The round-to-nearest quantizer of the reference: scales through the reciprocal of `maxq`.
    pub fn rtn(bits: u32, sym: bool) -> Self {
        Quantizer {
            division: ScaleDivision::Reciprocal,
            ..Self::new(bits, sym)
        }
    }

    /// Scale and zero of one row, from its values (spec §1.6 `find_params`).
    pub fn params_of(&self, values: impl IntoIterator<Item = f32>) -> (f32, f32) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        self.params_from_range(lo, hi)
    }

    /// Scale and zero of one row from its minimum and maximum (before 0 is added to the range).
    pub fn params_from_range(&self, lo: f32, hi: f32) -> (f32, f32) {
        let mut xmin = lo.min(0.0);
        let mut xmax = hi.max(0.0);
        if self.sym {
            xmax = xmin.abs().max(xmax);
            if xmin < 0.0 {
                xmin = -xmax;
            }
        }
        if xmin == 0.0 && xmax == 0.0 {
            xmin = -1.0;
            xmax = 1.0;
        }
        let scale = match self.division {
            ScaleDivision::True => (xmax - xmin) / self.maxq,
            ScaleDivision::Reciprocal => (xmax - xmin) * (1.0 / self.maxq),
        };
        let zero = if self.sym {
            (self.maxq + 1.0) / 2.0
        } else {
            (-xmin / scale).round_ties_even()
        };
        (scale, zero)
    }

    /// Per-row scale and zero of the columns `cols` of a row-major `[rows, width]` matrix.
    pub fn find_params(
        &self,
        w: &[f32],
        width: usize,
        cols: std::ops::Range<usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        w.chunks_exact(width)
            .map(|row| self.params_of(row[cols.clone()].iter().copied()))
            .unzip()
    }
}

/// The integer code of `x`: `clamp(round_half_even(x / scale) + zero, 0, maxq)`.
#[inline]
pub fn code(x: f32, scale: f32, zero: f32, maxq: f32) -> f32 {
    ((x / scale).round_ties_even() + zero).clamp(0.0, maxq)
}

/// The value a code stands for: `scale * (q - zero)`.
#[inline]
pub fn dequant(q: f32, scale: f32, zero: f32) -> f32 {
    scale * (q - zero)
}

/// Fake-quantizes `x`: its code, dequantized (the reference's `quantize`).
#[inline]
pub fn quantize(x: f32, scale: f32, zero: f32, maxq: f32) -> f32 {
    dequant(code(x, scale, zero, maxq), scale, zero)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scale_of(range: f32, maxq: f32) -> f32 {
        range / maxq
    }

    #[test]
    fn symmetric_4bit_extremes_clip_positive_side() {
        let q = Quantizer::new(4, true);
        let (s, z) = q.params_of([-1.5, 0.3, 1.5]);
        assert_eq!(z, 8.0);
        assert_eq!(s, scale_of(3.0, 15.0));
        // +max: round(7.5) = 8 -> 16 -> clamped to 15 -> +7 s.
        assert_eq!(code(1.5, s, z, q.maxq), 15.0);
        assert_eq!(quantize(1.5, s, z, q.maxq), 7.0 * s);
        // -max -> round(-7.5) = -8 -> 0 -> -8 s.
        assert_eq!(code(-1.5, s, z, q.maxq), 0.0);
        assert_eq!(quantize(-1.5, s, z, q.maxq), -8.0 * s);
    }

    #[test]
    fn rtn_scale_is_range_times_reciprocal_gptq_divides() {
        // For xmax = 1.2 (3 bits) the two roundings of 2.4 / 7 differ in the last bit, and so does
        // the code of the row's most negative weight: the reciprocal's scale gives -3.4999998 -> -3
        // (code 1), true division gives exactly -3.5 -> -4 (code 0).
        let (rtn, gptq) = (Quantizer::rtn(3, true), Quantizer::new(3, true));
        let (s_rtn, z) = rtn.params_of([-1.2f32, 0.5]);
        let (s_gptq, _) = gptq.params_of([-1.2f32, 0.5]);
        assert_eq!(s_rtn, 2.4f32 * (1.0 / 7.0));
        assert_eq!(s_gptq, 2.4f32 / 7.0);
        assert_ne!(
            s_rtn, s_gptq,
            "the test needs a range where the two roundings differ"
        );
        assert_eq!(z, 4.0);
        assert_eq!(code(-1.2, s_rtn, z, rtn.maxq), 1.0);
        assert_eq!(code(-1.2, s_gptq, z, gptq.maxq), 0.0);
    }

    #[test]
    fn zero_point_per_bits_and_nonnegative_row_keeps_xmin_zero() {
        assert_eq!(Quantizer::new(3, true).params_of([1.0f32]).1, 4.0);
        assert_eq!(Quantizer::new(8, true).params_of([1.0f32]).1, 128.0);
        // All weights >= 0: xmin stays 0, scale = xmax / maxq, zero still 8, so only 7 positive levels.
        let q = Quantizer::new(4, true);
        let (s, z) = q.params_of([0.0, 0.5, 1.5]);
        assert_eq!((s, z), (scale_of(1.5, 15.0), 8.0));
        assert_eq!(quantize(1.5, s, z, q.maxq), 7.0 * s);
    }

    #[test]
    fn all_zero_row_gets_unit_range() {
        let (s, z) = Quantizer::new(4, true).params_of([0.0f32; 5]);
        assert_eq!((s, z), (scale_of(2.0, 15.0), 8.0));
        let (s, z) = Quantizer::new(4, false).params_of([0.0f32; 5]);
        assert_eq!(s, scale_of(2.0, 15.0));
        assert_eq!(z, (1.0f32 / s).round_ties_even());
    }

    #[test]
    fn asymmetric_zero_and_ties_to_even() {
        let q = Quantizer::new(4, false);
        let (s, z) = q.params_of([-1.0, 2.0]);
        assert_eq!(s, scale_of(3.0, 15.0));
        assert_eq!(z, (1.0f32 / s).round_ties_even());
        // 2.5 rounds to 2, 3.5 to 4 (half to even).
        assert_eq!(code(2.5, 1.0, 0.0, 15.0), 2.0);
        assert_eq!(code(3.5, 1.0, 0.0, 15.0), 4.0);
        assert_eq!(code(-20.0, 1.0, 0.0, 15.0), 0.0);
    }

    #[test]
    fn find_params_over_column_range() {
        let q = Quantizer::new(4, true);
        let w = [1.0, -4.0, 2.0, 0.0, 0.0, 3.0];
        let (s, z) = q.find_params(&w, 3, 0..1);
        assert_eq!(s, vec![scale_of(1.0, 15.0), scale_of(2.0, 15.0)]);
        assert_eq!(z, vec![8.0, 8.0]);
        let (s, _) = q.find_params(&w, 3, 1..3);
        assert_eq!(s, vec![scale_of(8.0, 15.0), scale_of(3.0, 15.0)]);
    }
}
