//! Bounds-checked f32 matrix products over strided views, on the `gemm` crate (the kernels candle
//! itself calls): the CPU backend uses them to multiply sub-blocks of its buffers in place (one
//! attention head, one block of queries, one tile of the vocabulary) without copies or
//! transposes, and to choose the threading itself.

use gemm::Parallelism;

/// A read-only view of a matrix: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    /// The values; the view starts at `data[0]`.
    pub data: &'a [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub rs: usize,
    /// Distance between consecutive columns.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// `rows × cols` values stored row by row, `row_stride` apart, starting at `data[0]`.
    pub fn rows_of(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: 1,
        }
    }

    /// A dense row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::rows_of(data, rows, cols, cols)
    }

    /// The transpose (no data moves).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element of the view lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// The threading for one product issued outside any parallel loop: all of rayon's threads.
pub(crate) fn outer_parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst = scale · a · b`, where `dst` holds `a.rows × b.cols` values row by row, `dst_rs` apart
/// (its other values are left alone).
///
/// # Panics
/// When the inner dimensions differ or a view reaches outside its slice: the callers build the
/// views from shapes they have already validated, so this is an internal invariant.
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    scale: f32,
    parallelism: Parallelism,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions {k} and {}", b.rows);
    assert!(
        a.in_bounds() && b.in_bounds(),
        "matmul: operand view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_rs >= n && (m - 1) * dst_rs + n <= dst.len(),
        "matmul: destination of {} values cannot hold {m} rows of {n}, {dst_rs} apart",
        dst.len()
    );
    if k == 0 {
        for row in dst.chunks_mut(dst_rs).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    // SAFETY: every element gemm reads (a, b) or writes (dst: rows m of n unit-stride columns,
    // dst_rs apart) was checked to lie inside its slice above; `dst` is borrowed mutably, so it
    // aliases neither operand. With read_dst = false gemm overwrites dst without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f64> {
        let mut out = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|p| {
                        a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_views_match_naive() {
        let x: Vec<f32> = (0..40 * 30)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let w: Vec<f32> = (0..25 * 30)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        // Columns 6..18 of rows 3..40 of x (row stride 30) times rows 0..25 of w transposed,
        // restricted to the same 12 columns.
        let a = MatRef::rows_of(&x[3 * 30 + 6..], 37, 12, 30);
        let b = MatRef::rows_of(&w[6..], 25, 12, 30).t();
        let mut dst = vec![7f32; 37 * 40];
        matmul(&mut dst[5..], 40, a, b, 0.5, Parallelism::None);
        let want = naive(a, b);
        for i in 0..37 {
            for j in 0..25 {
                let got = dst[5 + i * 40 + j] as f64;
                assert!((got - 0.5 * want[i * 25 + j]).abs() < 1e-5, "({i}, {j})");
            }
            // Columns outside the product are untouched.
            assert_eq!(dst[5 + i * 40 + 30], 7.0);
        }
        assert_eq!(dst[0], 7.0);
    }
}
