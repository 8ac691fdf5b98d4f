//! GFLOP/s of the `gemm` crate on the matrix shapes of the moe-s forward pass.
//!
//! `cargo run --release -p runtime --example gemm_speed`

use std::time::Instant;

use gemm::{gemm, Parallelism};

/// `dst[m,n] = lhs[m,k] · rhs` with rhs element (k, j) at `rhs[k·rs + j·cs]`.
fn run(m: usize, n: usize, k: usize, rhs_t: bool, par: Parallelism) -> f64 {
    let lhs: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let rhs: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut dst = vec![0f32; m * n];
    let (rs, cs) = if rhs_t {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let mut best = f64::INFINITY;
    let reps = (2e9 / (2.0 * (m * n * k) as f64)).ceil().max(3.0) as usize;
    for _ in 0..reps {
        let t = Instant::now();
        unsafe {
            gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                cs,
                rs,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

fn main() {
    let shapes = [
        ("lm_head chunk", 128, 32000, 256),
        ("lm_head chunk 64", 64, 32000, 256),
        ("lm_head 2048", 2048, 32000, 256),
        ("lm_head tile", 128, 4000, 256),
        ("lm_head tile", 256, 2000, 256),
        ("lm_head tile", 64, 4000, 256),
        ("lm_head tile", 256, 1000, 256),
        ("lm_head tile", 512, 1000, 256),
        ("q_proj", 2048, 256, 256),
        ("expert w1", 512, 512, 256),
        ("expert w2", 512, 256, 512),
        ("scores", 256, 2048, 32),
        ("p·v", 256, 32, 2048),
    ];
    for (name, m, n, k) in shapes {
        for rhs_t in [true, false] {
            let one = run(m, n, k, rhs_t, Parallelism::None);
            let two = run(m, n, k, rhs_t, Parallelism::Rayon(2));
            println!("{name:18} m{m:5} n{n:6} k{k:5} rhsT {rhs_t:5}: 1 thread {one:6.1}  2 threads {two:6.1} GFLOP/s");
        }
    }
}
