//! The layer-input Hessian `H = 2/N · Σ x xᵀ` of one linear, accumulated in f32 (spec §1.4).
//!
//! N counts **calls** (`add_batch` invocations, each a batch of 1), as AutoGPTQ 0.6 does: one per
//! calibration window for attention, one per window that routed at least one token for an expert.
//! GPTQModel counts tokens instead; the two differ by a positive scalar, which GPTQ's result does not
//! depend on (damp is relative to the mean diagonal). The running rescale `H *= n/(n+b)` keeps the
//! magnitudes bounded exactly as the reference does. Tokens are counted separately, for the starved-
//! module rule and the logs.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use crate::error::{Error, Result};

/// A running Hessian for one linear input of width `cols`.
#[derive(Debug, Clone)]
pub struct Hessian {
    h: Mat<f32>,
    calls: usize,
    tokens: usize,
}

impl Hessian {
    /// An empty accumulator for inputs of width `cols`.
    pub fn new(cols: usize) -> Self {
        Hessian {
            h: Mat::zeros(cols, cols),
            calls: 0,
            tokens: 0,
        }
    }

    /// Width of the inputs (the linear's `in_features`).
    pub fn cols(&self) -> usize {
        self.h.nrows()
    }

    /// Adds one forward call's input, row-major `[tokens, cols]`. An empty batch is ignored (the
    /// reference's hook never fires for an expert that got no token).
    pub fn add_batch(&mut self, x: &[f32]) -> Result<()> {
        let cols = self.cols();
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(Error::Shape {
                what: "Hessian batch".into(),
                expected: format!("a multiple of {cols} values ([tokens, {cols}])"),
                got: format!("{} values", x.len()),
            });
        }
        let tokens = x.len() / cols;
        if tokens == 0 {
            return Ok(());
        }
        let b = 1usize;
        let keep = self.calls as f32 / (self.calls + b) as f32;
        self.calls += b;
        self.tokens += tokens;
        if keep != 1.0 {
            for j in 0..cols {
                for v in self.h.col_mut(j).iter_mut() {
                    *v *= keep;
                }
            }
        }
        // Column-major [cols, tokens] view of the row-major batch is Xᵀ.
        let xt = MatRef::from_column_major_slice(x, cols, tokens);
        let s = (2.0f32 / self.calls as f32).sqrt();
        let scaled = Mat::from_fn(cols, tokens, |i, t| s * xt[(i, t)]);
        matmul(
            self.h.as_mut(),
            Accum::Add,
            scaled.as_ref(),
            scaled.transpose(),
            1.0f32,
            Par::Seq,
        );
        Ok(())
    }

    /// Calls counted so far (N of the formula).
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Input rows (tokens) seen so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The accumulated matrix `[cols, cols]`.
    pub fn matrix(&self) -> MatRef<'_, f32> {
        self.h.as_ref()
    }

    /// Takes the accumulated matrix.
    pub fn into_matrix(self) -> Mat<f32> {
        self.h
    }

    /// Builds from an existing matrix (tests, or Hessians computed elsewhere).
    pub fn from_matrix(h: Mat<f32>, calls: usize, tokens: usize) -> Self {
        Hessian { h, calls, tokens }
    }
}

/// Columns whose input is identically zero: `diag(H) == 0`.
pub fn dead_columns(h: MatRef<'_, f32>) -> Vec<bool> {
    (0..h.nrows()).map(|i| h[(i, i)] == 0.0).collect()
}

/// The reference's dead-column fix: `H[d, d] = 1` for each dead column `d` (diagonal only).
pub fn fix_dead_diagonal(h: &mut Mat<f32>, dead: &[bool]) {
    for (i, &d) in dead.iter().enumerate() {
        if d {
            h[(i, i)] = 1.0;
        }
    }
}

/// `percdamp · mean(diag H)`, the damping the reference adds to every diagonal entry.
pub fn damp_of(h: MatRef<'_, f32>, percdamp: f32) -> f32 {
    let n = h.nrows();
    // torch.mean of a float tensor accumulates in higher precision before dividing; f64 is closest.
    let mean = (0..n).map(|i| h[(i, i)] as f64).sum::<f64>() / n.max(1) as f64;
    percdamp * mean as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_mean_equals_two_over_calls_sum() {
        let cols = 3;
        let a = [1.0f32, 2.0, 0.0, -1.0, 0.5, 0.0];
        let b = [0.5f32, 0.0, 0.0];
        let mut h = Hessian::new(cols);
        h.add_batch(&a).unwrap();
        h.add_batch(&[]).unwrap();
        h.add_batch(&b).unwrap();
        assert_eq!((h.calls(), h.tokens()), (2, 3));
        let rows: Vec<&[f32]> = a.chunks(3).chain(b.chunks(3)).collect();
        for i in 0..cols {
            for j in 0..cols {
                let want: f32 = rows.iter().map(|r| r[i] * r[j]).sum::<f32>() * 2.0 / 2.0;
                assert!((h.matrix()[(i, j)] - want).abs() < 1e-6, "H[{i},{j}]");
            }
        }
        let dead = dead_columns(h.matrix());
        assert_eq!(dead, vec![false, false, true]);
        let mut m = h.into_matrix();
        fix_dead_diagonal(&mut m, &dead);
        assert_eq!(m[(2, 2)], 1.0);
        assert!(
            (damp_of(m.as_ref(), 0.1) - 0.1 * (m[(0, 0)] + m[(1, 1)] + 1.0) / 3.0).abs() < 1e-7
        );
    }

    #[test]
    fn wrong_width_is_an_error() {
        let err = Hessian::new(4)
            .add_batch(&[1.0; 6])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Hessian batch") && err.contains("6 values"),
            "{err}"
        );
    }
}
