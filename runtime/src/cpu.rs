//! The reference backend: f32 on the CPU over candle-core.
//!
//! Matrix products go to candle's `matmul` (the multi-threaded `gemm` crate); the row-wise kernels
//! (RMSNorm, RoPE, the causal softmax, the NLL) are plain Rust over contiguous slices, parallel
//! over rows with rayon.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::backend::{AttentionShape, Backend, HostTensor};
use crate::error::{Error, Result};

/// Queries per attention block: a block only multiplies against the keys it can see, which halves
/// the causal work, and bounds the score buffer to `n_heads · ATTENTION_BLOCK · T` floats.
const ATTENTION_BLOCK: usize = 256;

/// The f32 CPU backend (the reference every other backend is tested against).
#[derive(Debug, Clone, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// A CPU backend; threads follow rayon's pool (`RAYON_NUM_THREADS`).
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Runs `f` on the contiguous f32 values of `t`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)?
    };
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(Error::Input("tensor is not contiguous".into()));
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f(&v[start..end])),
        _ => Err(Error::Input(format!(
            "CPU backend expects f32 CPU tensors, got {:?} on {:?}",
            t.dtype(),
            t.device()
        ))),
    }
}

fn dims2(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    t.dims2().map_err(|_| {
        Error::Input(format!(
            "{what}: expected a 2-D tensor, got shape {:?}",
            t.dims()
        ))
    })
}

fn index_tensor(rows: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(rows, rows.len(), &Device::Cpu)?)
}

/// `e^x` for `x <= 0` (inputs below −87 give ~0), within 2 ulp of `f32::exp`.
///
/// Branch-free so that loops over slices vectorise: the libm call was 6 % of an evaluation
/// (BENCHMARKS.md, runtime CPU section). Cephes-style: `x = n·ln2 + r`, `|r| <= ln2/2`, a degree-7
/// Taylor polynomial for `e^r` (truncation error < 6e-9), and `2^n` built from the exponent bits.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Lanes of the row reductions below: independent accumulators let LLVM vectorise loops that f32
/// non-associativity would otherwise keep scalar.
const LANES: usize = 16;

/// Largest value of `xs` (−∞ for an empty slice).
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let m = tail
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    acc.iter().fold(m, |m, &v| if v > m { v } else { m })
}

/// `Σ e^(x − shift)` over `xs`, where no `x` exceeds `shift`; each `x` is replaced by its term.
fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp_nonpositive(*v - shift);
            *a += *v;
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_nonpositive(*v - shift);
        sum += *v;
    }
    acc.iter().sum::<f32>() + sum
}

/// `Σ e^(x − shift)` over `xs`, leaving `xs` unchanged.
fn exp_sum_ro(xs: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp_nonpositive(v - shift);
        }
    }
    acc.iter().sum::<f32>()
        + tail
            .iter()
            .map(|&v| exp_nonpositive(v - shift))
            .sum::<f32>()
}

/// Softmax over `row[..n_valid]` (after scaling by `scale`), zeros after; `row` holds raw scores.
fn softmax_prefix(row: &mut [f32], lo: usize, hi: usize, scale: f32) {
    let valid = &mut row[lo..hi];
    for v in valid.iter_mut() {
        *v *= scale;
    }
    let max = max_of(valid);
    let sum = exp_sum(valid, max);
    let inv = 1.0 / sum;
    for v in valid.iter_mut() {
        *v *= inv;
    }
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}

impl Backend for CpuBackend {
    type Tensor = Tensor;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, t: HostTensor) -> Result<Tensor> {
        Ok(Tensor::from_vec(t.data, t.shape, &Device::Cpu)?)
    }

    fn shape(&self, t: &Tensor) -> Vec<usize> {
        t.dims().to_vec()
    }

    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        let shape = t.dims().to_vec();
        let data = with_f32(t, |s| s.to_vec())?;
        Ok(HostTensor { shape, data })
    }

    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let (vocab, _) = dims2(table, "embedding table")?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(table.index_select(&index_tensor(ids)?, 0)?)
    }

    fn matmul_t(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&w.t()?)?)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.add(b)?)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let (rows, cols) = dims2(x, "rms_norm input")?;
        let w = with_f32(weight, |s| s.to_vec())?;
        if w.len() != cols {
            return Err(Error::Input(format!(
                "rms_norm: weight has {} values, rows have {cols}",
                w.len()
            )));
        }
        let out = with_f32(x, |xs| {
            let mut out = vec![0f32; rows * cols];
            out.par_chunks_mut(cols.max(1))
                .zip(xs.par_chunks(cols.max(1)))
                .for_each(|(o, r)| {
                    // modeling_mixtral.py MixtralRMSNorm: variance = x.pow(2).mean(-1); x * rsqrt(var + eps)
                    let ss: f64 = r.iter().map(|&v| (v as f64) * (v as f64)).sum();
                    let inv = 1.0 / ((ss / cols as f64) as f32 + eps).sqrt();
                    for ((o, &v), &g) in o.iter_mut().zip(r).zip(&w) {
                        *o = g * (v * inv);
                    }
                });
            out
        })?;
        Ok(Tensor::from_vec(out, (rows, cols), &Device::Cpu)?)
    }

    fn rope(&self, x: &Tensor, head_dim: usize, positions: &[u32], theta: f64) -> Result<Tensor> {
        let (rows, cols) = dims2(x, "rope input")?;
        if rows != positions.len() || head_dim == 0 || head_dim % 2 != 0 || cols % head_dim != 0 {
            return Err(Error::Input(format!(
                "rope: {rows} rows, {} positions, width {cols}, head_dim {head_dim}",
                positions.len()
            )));
        }
        let half = head_dim / 2;
        // MixtralRotaryEmbedding: inv_freq = 1 / base^(arange(0, dim, 2) / dim), in f32;
        // freqs = position * inv_freq in f32; cos/sin of cat(freqs, freqs).
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let out = with_f32(x, |xs| {
            let mut out = vec![0f32; rows * cols];
            out.par_chunks_mut(cols)
                .zip(xs.par_chunks(cols))
                .zip(positions.par_iter())
                .for_each(|((o, r), &p)| {
                    let (sin, cos): (Vec<f32>, Vec<f32>) =
                        inv_freq.iter().map(|&f| (p as f32 * f).sin_cos()).unzip();
                    for (oh, xh) in o.chunks_exact_mut(head_dim).zip(r.chunks_exact(head_dim)) {
                        let (x1, x2) = xh.split_at(half);
                        let (o1, o2) = oh.split_at_mut(half);
                        // q * cos + rotate_half(q) * sin, rotate_half(x) = cat(-x2, x1)
                        for j in 0..half {
                            o1[j] = x1[j] * cos[j] - x2[j] * sin[j];
                            o2[j] = x2[j] * cos[j] + x1[j] * sin[j];
                        }
                    }
                });
            out
        })?;
        Ok(Tensor::from_vec(out, (rows, cols), &Device::Cpu)?)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shape: AttentionShape,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: d,
        } = shape;
        let (t, qw) = dims2(q, "attention q")?;
        let (tk, kw) = dims2(k, "attention k")?;
        let (tv, vw) = dims2(v, "attention v")?;
        if n_kv_heads == 0
            || n_heads % n_kv_heads != 0
            || qw != n_heads * d
            || kw != n_kv_heads * d
            || vw != kw
            || tk != t
            || tv != t
        {
            return Err(Error::Input(format!(
                "attention: q [{t}, {qw}], k [{tk}, {kw}], v [{tv}, {vw}] do not fit {shape:?}"
            )));
        }
        let rep = n_heads / n_kv_heads;
        // Query head h uses kv head h / rep (repeat_kv). Lay q out as [kv, T·rep, d] so that the
        // queries of a block of tokens are contiguous rows, row r being token r / rep.
        let q = q
            .reshape((t, n_kv_heads, rep * d))?
            .transpose(0, 1)?
            .contiguous()?;
        let q = q.reshape((n_kv_heads, t * rep, d))?;
        let k = k
            .reshape((t, n_kv_heads, d))?
            .transpose(0, 1)?
            .contiguous()?; // [kv, T, d]
        let v = v
            .reshape((t, n_kv_heads, d))?
            .transpose(0, 1)?
            .contiguous()?; // [kv, T, d]
        let scale = 1.0 / (d as f32).sqrt();
        let mut outs = Vec::new();
        let mut t0 = 0;
        while t0 < t {
            let t1 = (t0 + ATTENTION_BLOCK).min(t);
            let k_lo = window.map_or(0, |w| (t0 + 1).saturating_sub(w));
            let nk = t1 - k_lo;
            let qb = q.narrow(1, t0 * rep, (t1 - t0) * rep)?;
            let kb = k.narrow(1, k_lo, nk)?;
            let vb = v.narrow(1, k_lo, nk)?;
            let scores = qb.matmul(&kb.t()?)?; // [kv, (t1-t0)·rep, nk]
            let rows_per_head = (t1 - t0) * rep;
            let probs = with_f32(&scores, |s| {
                let mut p = s.to_vec();
                p.par_chunks_mut(nk).enumerate().for_each(|(r, row)| {
                    let tok = t0 + (r % rows_per_head) / rep;
                    // keys j in [max(0, tok+1-w), tok], relative to k_lo
                    let lo = window.map_or(0, |w| (tok + 1).saturating_sub(w)) - k_lo;
                    let hi = tok + 1 - k_lo;
                    softmax_prefix(row, lo, hi, scale);
                });
                p
            })?;
            let probs = Tensor::from_vec(probs, (n_kv_heads, rows_per_head, nk), &Device::Cpu)?;
            outs.push(probs.matmul(&vb)?); // [kv, (t1-t0)·rep, d]
            t0 = t1;
        }
        let out = Tensor::cat(&outs, 1)?; // [kv, T·rep, d]
        let out = out
            .reshape((n_kv_heads, t, rep * d))?
            .transpose(0, 1)?
            .contiguous()?;
        Ok(out.reshape((t, n_heads * d))?)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok(gate.silu()?.mul(up)?)
    }

    fn gather_rows(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        Ok(x.index_select(&index_tensor(rows)?, 0)?)
    }

    fn scatter_add_rows(
        &self,
        acc: &Tensor,
        src: &Tensor,
        rows: &[u32],
        weights: &[f32],
    ) -> Result<Tensor> {
        if weights.len() != rows.len() {
            return Err(Error::Input(format!(
                "scatter_add_rows: {} rows but {} weights",
                rows.len(),
                weights.len()
            )));
        }
        let w = Tensor::from_slice(weights, (weights.len(), 1), &Device::Cpu)?;
        let scaled = src.broadcast_mul(&w)?;
        Ok(acc.index_add(&index_tensor(rows)?, &scaled, 0)?)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Tensor> {
        Ok(Tensor::zeros((rows, cols), DType::F32, &Device::Cpu)?)
    }

    fn nll(&self, logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
        let (n, vocab) = dims2(logits, "nll logits")?;
        if n != targets.len() {
            return Err(Error::Input(format!(
                "nll: {n} rows of logits, {} targets",
                targets.len()
            )));
        }
        if let Some(&bad) = targets.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Input(format!(
                "target id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        with_f32(logits, |s| {
            s.par_chunks(vocab)
                .zip(targets.par_iter())
                .map(|(row, &target)| {
                    let max = max_of(row);
                    let sum = exp_sum_ro(row, max);
                    max + sum.ln() - row[target as usize]
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (a, b) = (exp_nonpositive(x), x.exp());
            if b > 1e-30 {
                worst = worst.max((a - b).abs() / b);
            }
            x += 0.000_37;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin()).collect();
        assert_eq!(max_of(&xs), xs.iter().copied().fold(f32::MIN, f32::max));
        let want: f32 = xs.iter().map(|v| (v - 1.0).exp()).sum();
        assert!((exp_sum_ro(&xs, 1.0) - want).abs() < 1e-5 * want);
        // 2 ulp of f32 (2 · 2^-24 relative)
        assert!(worst < 1.2e-7, "max relative error {worst:e}");
    }
}
