//! The min/max quantizer of AutoGPTQ (`quantizer.py`, identical in IST-DASLab and GPTQModel), spec §1.6.
//!
//! Per output row over a range of columns: the range always contains 0; symmetric mode mirrors the
//! larger magnitude (a row with no negative weight keeps `xmin = 0`, as the reference does); an
//! all-zero row gets `(-1, +1)`; `zero = (maxq + 1) / 2` when symmetric, `round(-xmin / scale)`
//! otherwise. Rounding is half-to-even, like `torch.round`. The scale is `(xmax - xmin)` times the f32
//! reciprocal of `maxq`, as PyTorch computes `tensor / scalar` on CUDA.

/// A configured quantizer: bit width and symmetry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    /// Largest code, `2^bits - 1`, as f32 (the reference keeps it as a float).
    pub maxq: f32,
    /// Symmetric mode: the zero point is fixed at `(maxq + 1) / 2`.
    pub sym: bool,
}

impl Quantizer {
    /// A quantizer with `bits` bits per code (2..=8).
    pub fn new(bits: u32, sym: bool) -> Self {
        Quantizer {
            maxq: ((1u32 << bits) - 1) as f32,
            sym,
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
        // PyTorch on CUDA (where AutoGPTQ and the reference figures run) divides a tensor by a
        // scalar through the scalar's f32 reciprocal; true division rounds the scale differently in
        // the last bit, which decides whether the most negative weight of a row (at exactly
        // -maxq/2 scales) rounds to the lowest code or one above: worth 0.3 % of perplexity at 3 bits.
        let scale = (xmax - xmin) * (1.0 / self.maxq);
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

    /// `range * fl32(1 / maxq)`, the scale PyTorch computes on CUDA.
    fn scale_of(range: f32, maxq: f32) -> f32 {
        range * (1.0 / maxq)
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
        // -max lands on -7.5 (± one ulp, depending on the scale's last bit): code 0 or 1.
        assert!(code(-1.5, s, z, q.maxq) <= 1.0);
    }

    #[test]
    fn scale_is_range_times_reciprocal_not_true_division() {
        // For xmax = 1.2 (3 bits) the two roundings of 2.4 / 7 differ in the last bit, and so does
        // the code of the row's most negative weight: the reciprocal's scale gives -3.4999998 -> -3
        // (code 1), true division gives exactly -3.5 -> -4 (code 0).
        let q = Quantizer::new(3, true);
        let (s, z) = q.params_of([-1.2f32, 0.5]);
        let true_div = 2.4f32 / 7.0;
        assert_eq!(s, 2.4f32 * (1.0 / 7.0));
        assert_ne!(s, true_div, "the test needs a range where the two roundings differ");
        assert_eq!(z, 4.0);
        assert_eq!(code(-1.2, s, z, q.maxq), 1.0);
        assert_eq!(code(-1.2, true_div, z, q.maxq), 0.0);
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
