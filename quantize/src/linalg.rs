//! The inverse-Hessian factor GPTQ needs (spec §1.5 step 6), with GPTQModel HEAD's recovery when the
//! damped Hessian is not positive definite (spec §1.7).
//!
//! `U = chol(chol_inverse(chol(H)))ᵀ`: upper triangular with `H⁻¹ = Uᵀ U`, all in f32 through faer.

use faer::{Mat, MatRef, Side};

/// Lower Cholesky factor `L` of a symmetric matrix (`A = L Lᵀ`), or `None` if it is not positive
/// definite.
pub fn cholesky_lower(a: MatRef<'_, f32>) -> Option<Mat<f32>> {
    let llt = a.llt(Side::Lower).ok()?;
    let l = llt.L().to_owned();
    let finite = l.col_iter().all(|c| c.iter().all(|v| v.is_finite()));
    finite.then_some(l)
}

/// `A⁻¹` from the lower Cholesky factor of `A` (torch's `cholesky_inverse`): `L⁻ᵀ L⁻¹`.
pub fn cholesky_inverse(l: MatRef<'_, f32>) -> Mat<f32> {
    let n = l.nrows();
    let mut linv = Mat::<f32>::identity(n, n);
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(
        l,
        linv.as_mut(),
        faer::Par::Seq,
    );
    let mut out = Mat::<f32>::zeros(n, n);
    faer::linalg::matmul::matmul(
        out.as_mut(),
        faer::Accum::Replace,
        linv.transpose(),
        linv.as_ref(),
        1.0f32,
        faer::Par::Seq,
    );
    // Symmetrise exactly (the product is symmetric up to rounding).
    for j in 0..n {
        for i in j + 1..n {
            let v = out[(i, j)];
            out[(j, i)] = v;
        }
    }
    out
}

/// Upper factor `U` of `H⁻¹ = Uᵀ U`, or `None` if `H` (or its inverse, numerically) is not positive
/// definite.
pub fn inverse_upper_factor(h: MatRef<'_, f32>) -> Option<Mat<f32>> {
    let l = cholesky_lower(h)?;
    let hinv = cholesky_inverse(l.as_ref());
    let l2 = cholesky_lower(hinv.as_ref())?;
    Some(l2.transpose().to_owned())
}

/// How the damped Hessian was made invertible.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Conditioning {
    /// Plain damping: `percdamp · mean(diag H)` added to the diagonal (the reference; the usual case).
    Damped {
        /// The damping fraction used (the configured one, or a larger one after retries).
        percdamp: f32,
        /// The absolute amount added to each diagonal entry.
        damp: f32,
        /// How many larger dampings were tried after the configured one failed.
        retries: u32,
    },
    /// Every damping below 1 failed; a diagonal floor on top of the configured damping worked.
    Floored {
        /// The floor applied to each diagonal entry.
        floor: f32,
        /// The configured damping fraction.
        percdamp: f32,
    },
    /// Nothing worked: no error feedback (round-to-nearest with the group parameters).
    Unfactorizable,
}

/// Result of [`hessian_inverse`]: the factor (if any) and what was done to get it.
#[derive(Debug, Clone)]
pub struct InverseFactor {
    /// `U` with `H⁻¹ = Uᵀ U`; `None` only for [`Conditioning::Unfactorizable`].
    pub u: Option<Mat<f32>>,
    /// What was done.
    pub conditioning: Conditioning,
}

/// Damping fraction added per retry (GPTQModel's `damp_auto_increment` default).
pub const DAMP_INCREMENT: f32 = 0.0015;

/// Damps `h` (dead columns already fixed, already permuted) and factors its inverse. On failure it
/// retries with larger damping (restoring the diagonal each time), then with a diagonal floor
/// `1e-6·max|diag|·10^(k-1)`, k = 1..6, and only then gives up (GPTQModel HEAD, spec §1.7).
pub fn hessian_inverse(h: &Mat<f32>, percdamp: f32) -> InverseFactor {
    let n = h.nrows();
    let diag: Vec<f32> = (0..n).map(|i| h[(i, i)]).collect();
    let mut work = h.clone();
    let with_diag = |work: &mut Mat<f32>, f: &dyn Fn(usize) -> f32| {
        for i in 0..n {
            work[(i, i)] = f(i);
        }
    };
    let mut p = percdamp;
    let mut retries = 0;
    while p < 1.0 {
        let damp = crate::hessian::damp_of(h.as_ref(), p);
        with_diag(&mut work, &|i| diag[i] + damp);
        if let Some(u) = inverse_upper_factor(work.as_ref()) {
            return InverseFactor {
                u: Some(u),
                conditioning: Conditioning::Damped {
                    percdamp: p,
                    damp,
                    retries,
                },
            };
        }
        if p.is_nan() || p <= 0.0 {
            break;
        }
        p += DAMP_INCREMENT;
        retries += 1;
    }
    let damp = crate::hessian::damp_of(h.as_ref(), percdamp);
    let max_abs = diag
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    for k in 1..=6 {
        let floor = 1e-6 * max_abs * 10f32.powi(k - 1);
        with_diag(&mut work, &|i| (diag[i] + damp).max(floor));
        if let Some(u) = inverse_upper_factor(work.as_ref()) {
            return InverseFactor {
                u: Some(u),
                conditioning: Conditioning::Floored { floor, percdamp },
            };
        }
    }
    InverseFactor {
        u: None,
        conditioning: Conditioning::Unfactorizable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Mat<f32> {
        // A = B Bᵀ + n I with a fixed B.
        let b = Mat::from_fn(n, n, |i, j| ((i * 7 + j * 3) % 11) as f32 / 11.0 - 0.5);
        let mut a = &b * b.transpose();
        for i in 0..n {
            a[(i, i)] += n as f32;
        }
        a
    }

    #[test]
    fn upper_factor_reconstructs_the_inverse() {
        let a = spd(9);
        let u = inverse_upper_factor(a.as_ref()).unwrap();
        for i in 0..9 {
            for j in 0..i {
                assert_eq!(u[(i, j)], 0.0, "U must be upper triangular");
            }
        }
        // Uᵀ U A = I
        let prod = u.transpose() * &u * &a;
        for i in 0..9 {
            for j in 0..9 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (prod[(i, j)] - want).abs() < 1e-5,
                    "({i},{j}) = {}",
                    prod[(i, j)]
                );
            }
        }
    }

    #[test]
    fn hopeless_matrix_gives_up_and_singular_one_is_damped() {
        // Indefinite: eigenvalues 3 and -1, mean diagonal 1.
        let h = Mat::from_fn(2, 2, |i, j| if i == j { 1.0 } else { 2.0 });
        assert!(cholesky_lower(h.as_ref()).is_none());
        // Damping below 1 (× mean diagonal 1) cannot lift eigenvalue -1, nor can a small floor.
        let f = hessian_inverse(&h, 0.1);
        assert_eq!(f.conditioning, Conditioning::Unfactorizable);
        assert!(f.u.is_none());
        // A merely singular matrix is fixed by the first damping.
        let s = Mat::from_fn(2, 2, |_, _| 1.0f32);
        let f = hessian_inverse(&s, 0.1);
        assert_eq!(
            f.conditioning,
            Conditioning::Damped {
                percdamp: 0.1,
                damp: 0.1,
                retries: 0
            }
        );
        assert!(f.u.is_some());
    }

    #[test]
    fn slightly_indefinite_needs_retries() {
        // Eigenvalues 2.2 and -0.2 → mean diag 1; needs damp > 0.2, i.e. percdamp > 0.2.
        let h = Mat::from_fn(2, 2, |i, j| if i == j { 1.0 } else { 1.2 });
        let f = hessian_inverse(&h, 0.1);
        match f.conditioning {
            Conditioning::Damped {
                percdamp, retries, ..
            } => {
                assert!(percdamp > 0.2 && percdamp < 0.21, "{percdamp}");
                assert!(retries >= 67, "{retries}");
            }
            other => panic!("expected damping to suffice, got {other:?}"),
        }
    }
}
