//! GPTQ's `fasterquant` (spec §1.5, AutoGPTQ 0.6 step for step) and plain round-to-nearest.
//!
//! Weights are row-major `[rows = out, cols = in]` f32. Everything is f32 and deterministic: rows are
//! processed in parallel, but every row's arithmetic is independent of how rows are split, and the
//! block-tail products run over fixed row chunks.

use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::hessian::{dead_columns, fix_dead_diagonal};
use crate::linalg::{hessian_inverse, Conditioning};
use crate::module::QuantizedLinear;
use crate::quantizer::{code, Quantizer, ScaleDivision};
use crate::Preset;

/// The reference's block size for lazy batch updates.
pub const BLOCKSIZE: usize = 128;

/// Rows per chunk of the block-tail product (fixed, so results do not depend on the thread count).
const ROW_CHUNK: usize = 64;

/// Settings of one `fasterquant` call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Columns per group, or -1 for one group per row.
    pub group_size: i32,
    /// Act-order: process columns by descending `diag(H)` (a stable sort).
    pub act_order: bool,
    /// Static groups: group parameters from the unpermuted weight before the solve.
    pub static_groups: bool,
    /// Symmetric quantizer.
    pub sym: bool,
    /// Damping as a fraction of the mean Hessian diagonal.
    pub percdamp: f32,
    /// Columns per lazy-update block (128 in the reference).
    pub blocksize: usize,
}

impl GptqConfig {
    /// The solver settings of a branch preset.
    pub fn from_preset(p: &Preset) -> Self {
        GptqConfig {
            bits: p.bits,
            group_size: p.group_size,
            act_order: p.desc_act,
            static_groups: p.static_groups,
            sym: p.sym,
            percdamp: p.damp_percent as f32,
            blocksize: BLOCKSIZE,
        }
    }

    fn check(&self) -> Result<()> {
        if ![2, 3, 4, 8].contains(&self.bits) {
            return Err(Error::Setting {
                what: "bits".into(),
                expected: "2, 3, 4 or 8".into(),
                got: self.bits.to_string(),
            });
        }
        if self.group_size != -1 && self.group_size <= 0 {
            return Err(Error::Setting {
                what: "group size".into(),
                expected: "-1 or a positive number of columns".into(),
                got: self.group_size.to_string(),
            });
        }
        if !(self.percdamp >= 0.0 && self.percdamp < 1.0) || self.blocksize == 0 {
            return Err(Error::Setting {
                what: "damp / block size".into(),
                expected: "0 <= damp < 1 and block size > 0".into(),
                got: format!("{} / {}", self.percdamp, self.blocksize),
            });
        }
        Ok(())
    }

    /// Columns per group for a width of `cols` (`cols` itself when the group size is -1).
    fn group_width(&self, cols: usize) -> usize {
        if self.group_size == -1 {
            cols.max(1)
        } else {
            self.group_size as usize
        }
    }
}

/// What one solve did, for the logs and `quant_report.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SolveStats {
    /// GPTQ's loss: `Σ (w - q)² / d²` over all weights.
    pub loss: f64,
    /// How the Hessian was made invertible (damp used, retries, floor, or none).
    pub conditioning: Conditioning,
    /// Input columns with zero Hessian diagonal (their weights were zeroed, as the reference does).
    pub dead_columns: usize,
    /// Wall time of the solve.
    pub seconds: f64,
}

/// A solved linear: the codes and parameters, and the stats.
#[derive(Debug, Clone)]
pub struct Solved {
    /// Codes, scales, zeros and g_idx in the packer's layout.
    pub quantized: QuantizedLinear,
    /// What the solve did.
    pub stats: SolveStats,
}

fn check_weight(w: &[f32], rows: usize, cols: usize) -> Result<()> {
    if w.len() != rows * cols || rows == 0 || cols == 0 {
        return Err(Error::Shape {
            what: "weight".into(),
            expected: format!("{rows} x {cols} = {} values (non-empty)", rows * cols),
            got: format!("{} values", w.len()),
        });
    }
    Ok(())
}

/// Runs GPTQ on a row-major `[rows, cols]` weight with the accumulated Hessian `h` (`[cols, cols]`).
pub fn fasterquant(
    w: &[f32],
    rows: usize,
    cols: usize,
    mut h: Mat<f32>,
    cfg: &GptqConfig,
) -> Result<Solved> {
    let start = Instant::now();
    cfg.check()?;
    check_weight(w, rows, cols)?;
    if h.nrows() != cols || h.ncols() != cols {
        return Err(Error::Shape {
            what: "Hessian".into(),
            expected: format!("{cols} x {cols}"),
            got: format!("{} x {}", h.nrows(), h.ncols()),
        });
    }
    let quant = Quantizer::new(cfg.bits, cfg.sym);
    let gw = cfg.group_width(cols);

    // 1. Initial per-row parameters on the original W.
    let initial = quant.find_params(w, cols, 0..cols);

    // 2. Dead columns: H[d,d] = 1, W[:, d] = 0.
    let dead = dead_columns(h.as_ref());
    fix_dead_diagonal(&mut h, &dead);
    let mut w = w.to_vec();
    if dead.iter().any(|&d| d) {
        for row in w.chunks_exact_mut(cols) {
            for (v, &d) in row.iter_mut().zip(&dead) {
                if d {
                    *v = 0.0;
                }
            }
        }
    }

    // 3. Static groups, on the unpermuted, dead-zeroed W.
    let static_params: Vec<(Vec<f32>, Vec<f32>)> = if cfg.static_groups && cfg.group_size != -1 {
        (0..cols)
            .step_by(gw)
            .map(|g| quant.find_params(&w, cols, g..(g + gw).min(cols)))
            .collect()
    } else {
        Vec::new()
    };

    // 4. Act-order: stable descending sort of diag(H).
    let perm: Vec<usize> = if cfg.act_order {
        let mut p: Vec<usize> = (0..cols).collect();
        p.sort_by(|&a, &b| h[(b, b)].total_cmp(&h[(a, a)]));
        p
    } else {
        (0..cols).collect()
    };
    if cfg.act_order {
        let mut pw = vec![0.0f32; w.len()];
        for (dst, src) in pw.chunks_exact_mut(cols).zip(w.chunks_exact(cols)) {
            for (c, &p) in perm.iter().enumerate() {
                dst[c] = src[p];
            }
        }
        w = pw;
        h = Mat::from_fn(cols, cols, |i, j| h[(perm[i], perm[j])]);
    }

    // 5.-6. Damping and the upper factor of H⁻¹ (with recovery, spec §1.7).
    let inv = hessian_inverse(&h, cfg.percdamp);
    drop(h);
    let u = inv.u;

    // 7. Blocked loop.
    let maxq = quant.maxq;
    let mut codes_perm = vec![0u8; rows * cols];
    let mut group_params: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    let mut row_scale = vec![0.0f32; rows];
    let mut row_zero = vec![0.0f32; rows];
    if cfg.group_size == -1 {
        row_scale.clone_from(&initial.0);
        row_zero.clone_from(&initial.1);
    }
    let mut loss = 0.0f64;
    let bs = cfg.blocksize;
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + bs).min(cols);
        let count = i2 - i1;
        // Hinv1 = U[i1:i2, i1:i2], row-major for contiguous row access.
        let ublock: Vec<f32> = match &u {
            Some(u) => (0..count)
                .flat_map(|i| (0..count).map(move |j| u[(i1 + i, i1 + j)]))
                .collect(),
            None => Vec::new(),
        };
        // Group starts inside this block: refresh per-row params from W (not the in-block copy).
        let mut starts: Vec<(usize, usize)> = Vec::new(); // (block-local column, index into group_params)
        if cfg.group_size != -1 && !cfg.static_groups {
            for c in i1..i2 {
                if c % gw == 0 {
                    starts.push((c - i1, group_params.len()));
                    group_params.push(quant.find_params(&w, cols, c..(c + gw).min(cols)));
                }
            }
        }
        let mut err1 = vec![0.0f32; rows * count];
        let block_loss: f64 = w
            .par_chunks_mut(cols)
            .zip(codes_perm.par_chunks_mut(cols))
            .zip(err1.par_chunks_mut(count))
            .enumerate()
            .map(|(r, ((row, crow), erow))| {
                let mut w1 = row[i1..i2].to_vec();
                let (mut s, mut z) = (row_scale[r], row_zero[r]);
                let mut next_start = 0;
                let mut row_loss = 0.0f64;
                for i in 0..count {
                    let c = i1 + i;
                    if next_start < starts.len() && starts[next_start].0 == i {
                        let g = &group_params[starts[next_start].1];
                        (s, z) = (g.0[r], g.1[r]);
                        next_start += 1;
                    }
                    if !static_params.is_empty() {
                        let g = &static_params[perm[c] / gw];
                        (s, z) = (g.0[r], g.1[r]);
                    }
                    let x = w1[i];
                    let q = code(x, s, z, maxq);
                    crow[c] = q as u8;
                    let deq = s * (q - z);
                    match &u {
                        Some(_) => {
                            let d = ublock[i * count + i];
                            let e = (x - deq) / d;
                            row_loss += ((x - deq) * (x - deq) / (d * d)) as f64;
                            erow[i] = e;
                            let urow = &ublock[i * count..(i + 1) * count];
                            for (wj, &uj) in w1[i + 1..].iter_mut().zip(&urow[i + 1..]) {
                                *wj -= e * uj;
                            }
                        }
                        None => row_loss += ((x - deq) * (x - deq)) as f64,
                    }
                }
                row_loss
            })
            .sum();
        loss += block_loss;
        // W[:, i2:] -= Err1 · U[i1:i2, i2:]
        if let (Some(u), true) = (&u, i2 < cols) {
            let utail = u.as_ref().submatrix(i1, i2, count, cols - i2);
            w.par_chunks_mut(ROW_CHUNK * cols)
                .zip(err1.par_chunks(ROW_CHUNK * count))
                .for_each(|(wc, ec)| {
                    let n = ec.len() / count;
                    let e = MatRef::from_row_major_slice(ec, n, count);
                    let wm = MatMut::from_row_major_slice_mut(wc, n, cols);
                    let tail = wm.submatrix_mut(0, i2, n, cols - i2);
                    matmul(tail, Accum::Add, e, utail, -1.0f32, Par::Seq);
                });
        }
        i1 = i2;
    }

    // 8. g_idx and the inverse permutation.
    let mut codes = vec![0u8; rows * cols];
    let mut g_idx = vec![0i32; cols];
    for (c, &p) in perm.iter().enumerate() {
        g_idx[p] = if cfg.static_groups && cfg.act_order {
            (p / gw) as i32
        } else {
            (c / gw) as i32
        };
    }
    for (dst, src) in codes
        .chunks_exact_mut(cols)
        .zip(codes_perm.chunks_exact(cols))
    {
        for (c, &p) in perm.iter().enumerate() {
            dst[p] = src[c];
        }
    }
    // 9. Parameters in group-index order.
    let groups: Vec<(Vec<f32>, Vec<f32>)> = if cfg.group_size == -1 {
        vec![initial]
    } else if cfg.static_groups {
        static_params
    } else {
        group_params
    };
    let quantized = quantized_linear(cfg, rows, cols, codes, &groups, g_idx);
    let stats = SolveStats {
        loss,
        conditioning: inv.conditioning,
        dead_columns: dead.iter().filter(|&&d| d).count(),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok(Solved { quantized, stats })
}

/// Round-to-nearest with the same quantizer per row (and per group of `group_size` consecutive
/// columns), no error feedback; `g_idx[k] = k / group_size`. Used for starved experts (with
/// GPTQ's quantizer, [`ScaleDivision::True`]) and for `--rtn` (with the reference's round-to-nearest
/// scales, [`ScaleDivision::Reciprocal`]).
pub fn rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    cfg: &GptqConfig,
    division: ScaleDivision,
) -> Result<QuantizedLinear> {
    cfg.check()?;
    check_weight(w, rows, cols)?;
    let quant = Quantizer {
        division,
        ..Quantizer::new(cfg.bits, cfg.sym)
    };
    let gw = cfg.group_width(cols);
    let groups: Vec<(Vec<f32>, Vec<f32>)> = (0..cols)
        .step_by(gw)
        .map(|g| quant.find_params(w, cols, g..(g + gw).min(cols)))
        .collect();
    let g_idx: Vec<i32> = (0..cols).map(|k| (k / gw) as i32).collect();
    let codes = w
        .chunks_exact(cols)
        .enumerate()
        .flat_map(|(r, row)| {
            let (groups, g_idx) = (&groups, &g_idx);
            row.iter().enumerate().map(move |(k, &x)| {
                let g = &groups[g_idx[k] as usize];
                code(x, g.0[r], g.1[r], quant.maxq) as u8
            })
        })
        .collect();
    Ok(quantized_linear(cfg, rows, cols, codes, &groups, g_idx))
}

/// The layer from its `[N, K]` codes and per-group (scales, zeros) over the N rows, groups in
/// `g_idx` order.
fn quantized_linear(
    cfg: &GptqConfig,
    rows: usize,
    cols: usize,
    codes: Vec<u8>,
    groups: &[(Vec<f32>, Vec<f32>)],
    g_idx: Vec<i32>,
) -> QuantizedLinear {
    QuantizedLinear {
        bits: cfg.bits,
        group_size: cfg.group_size,
        out_features: rows,
        in_features: cols,
        codes,
        scales: groups.iter().flat_map(|g| g.0.iter().copied()).collect(),
        zeros: groups.iter().flat_map(|g| g.1.iter().copied()).collect(),
        g_idx,
    }
}

/// The dense weight a result stands for, row-major `[N, K]`, with the f32 scales
/// (`scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])`).
pub fn dequantize(q: &QuantizedLinear) -> Vec<f32> {
    let (n, k) = (q.out_features, q.in_features);
    let mut out = vec![0.0f32; n * k];
    for (r, row) in out.chunks_exact_mut(k).enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            let g = q.g_idx[c] as usize * n + r;
            *v = q.scales[g] * (q.codes[r * k + c] as f32 - q.zeros[g]);
        }
    }
    out
}

#[cfg(test)]
mod tests;
