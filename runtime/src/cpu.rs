//! The reference backend: f32 on the CPU over candle-core.
//!
//! Matrix products go to candle's `matmul` (the multi-threaded `gemm` crate); the row-wise kernels
//! (RMSNorm, RoPE, the causal softmax, the NLL) are plain Rust over contiguous slices, parallel
//! over rows with rayon.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::backend::{
    check_ids, check_nll, check_rows, check_scatter_add, AttentionShape, Backend, HostTensor,
};
use crate::error::{Error, Result};
use crate::sgemm::{self, MatRef};

/// Runs the body `$e` compiled for AVX2 (wider vectors; the same operations in the same order, so
/// the same results) when the CPU has it, else for the baseline target.
macro_rules! with_avx2 {
    ($e:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe {
                    avx2(
                        #[inline(always)]
                        || $e,
                    )
                };
            }
        }
        $e
    }};
}

/// Queries per attention block: a block only multiplies against the keys it can see, which halves
/// the causal work, and its score buffer (`ATTENTION_BLOCK · T` floats for one head) stays in
/// the L2 cache between the product, the softmax and the product with the values.
const ATTENTION_BLOCK: usize = 64;

/// Logit rows per task of the fused `lm_head` + NLL (each task reads the whole `lm_head` once).
const NLL_ROWS: usize = 512;

/// Vocabulary entries per tile of the fused `lm_head` + NLL: a `NLL_ROWS × NLL_VOCAB_TILE` block of
/// logits (1 MB) is reduced while it is still in cache, so the `[T, vocab]` logits never reach
/// memory (measured with the `gemm_speed` example: about 105 GFLOP/s per core for such tiles
/// against 50 to 60 for whole 128-row chunks, which write 16 MB; 512 × 512 beat 256 × 1024 and
/// 128 × 1024 in the `op_profile` example).
const NLL_VOCAB_TILE: usize = 512;

/// Values per task of the element-wise kernels.
const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// The common shape of two 2-D tensors.
fn same_dims(a: &Tensor, b: &Tensor, what: &str) -> Result<(usize, usize)> {
    let da = dims2(a, what)?;
    let db = dims2(b, what)?;
    if da != db {
        return Err(Error::Input(format!(
            "{what}: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        )));
    }
    Ok(da)
}

/// Causal grouped-query attention on row-major `q: [t, n_heads·d]`, `k, v: [t, n_kv_heads·d]`
/// (shapes already checked), giving `[t, n_heads·d]`.
///
/// Parallel over blocks of [`ATTENTION_BLOCK`] queries; for each head, the block's queries are
/// multiplied against the keys up to the block's last token only (and from the window's start),
/// softmaxed in place, and multiplied by the values straight into the output columns of the head.
fn attention_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    shape: AttentionShape,
    window: Option<usize>,
) -> Vec<f32> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = shape;
    let (qw, kw) = (n_heads * d, n_kv_heads * d);
    let rep = n_heads / n_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; t * qw];
    out.par_chunks_mut(ATTENTION_BLOCK * qw)
        .enumerate()
        .for_each(|(b, out_block)| {
            let t0 = b * ATTENTION_BLOCK;
            let rows = out_block.len() / qw;
            let t1 = t0 + rows;
            let k_lo = window.map_or(0, |w| (t0 + 1).saturating_sub(w));
            let nk = t1 - k_lo;
            let mut scores = vec![0f32; rows * nk];
            for h in 0..n_heads {
                // repeat_kv: query head h reads key/value head h / rep.
                let g = h / rep;
                let qh = MatRef::rows_of(&q[t0 * qw + h * d..], rows, d, qw);
                let kh = MatRef::rows_of(&k[k_lo * kw + g * d..], nk, d, kw);
                let vh = MatRef::rows_of(&v[k_lo * kw + g * d..], nk, d, kw);
                sgemm::matmul(&mut scores, nk, qh, kh.t(), 1.0, gemm::Parallelism::None);
                for (r, row) in scores.chunks_exact_mut(nk).enumerate() {
                    let tok = t0 + r;
                    // keys j in [max(0, tok+1-w), tok], relative to k_lo
                    let lo = window.map_or(0, |w| (tok + 1).saturating_sub(w)) - k_lo;
                    softmax_prefix(row, lo, tok + 1 - k_lo, scale);
                }
                sgemm::matmul(
                    &mut out_block[h * d..],
                    qw,
                    MatRef::row_major(&scores, rows, nk),
                    vh,
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        });
    out
}

/// `−log_softmax(x · wᵀ)[i][targets[i]]` for the first `targets.len()` rows of `x: [_, hidden]`
/// and `w: [vocab, hidden]` (shapes and ids already checked), without materialising the logits:
/// each task takes [`NLL_ROWS`] rows through the vocabulary in tiles, keeping a running maximum
/// and a running sum of exponentials per row (rescaled when the maximum grows).
fn lm_head_nll_f32(x: &[f32], w: &[f32], hidden: usize, vocab: usize, targets: &[u32]) -> Vec<f32> {
    let mut out = vec![0f32; targets.len()];
    out.par_chunks_mut(NLL_ROWS)
        .zip(targets.par_chunks(NLL_ROWS))
        .enumerate()
        .for_each(|(b, (out, targets))| {
            let m = out.len();
            let r0 = b * NLL_ROWS;
            let xb = MatRef::row_major(&x[r0 * hidden..(r0 + m) * hidden], m, hidden);
            let mut logits = vec![0f32; m * NLL_VOCAB_TILE.min(vocab)];
            let mut max = vec![f32::NEG_INFINITY; m];
            let mut sum = vec![0f32; m];
            let mut target_logit = vec![0f32; m];
            let mut v0 = 0;
            while v0 < vocab {
                let nv = NLL_VOCAB_TILE.min(vocab - v0);
                let wt = MatRef::row_major(&w[v0 * hidden..(v0 + nv) * hidden], nv, hidden);
                let tile = &mut logits[..m * nv];
                sgemm::matmul(tile, nv, xb, wt.t(), 1.0, gemm::Parallelism::None);
                reduce_logit_tile(tile, nv, v0, targets, &mut max, &mut sum, &mut target_logit);
                v0 += nv;
            }
            for (i, o) in out.iter_mut().enumerate() {
                *o = max[i] + sum[i].ln() - target_logit[i];
            }
        });
    out
}

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
    // The low mantissa bits of `shifted` hold n = round(x·log2 e) in two's complement.
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n from the exponent bits; integer arithmetic (no float-to-int cast) keeps it vectorisable.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Lanes of the row reductions below: independent accumulators let LLVM vectorise loops that f32
/// non-associativity would otherwise keep scalar.
const LANES: usize = 16;

/// Largest value of `xs` (−∞ for an empty slice).
#[inline(always)]
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
#[inline(always)]
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
#[inline(always)]
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

/// Folds a tile of logits (rows of `nv` values for vocabulary entries `v0..v0 + nv`) into each
/// row's running maximum and sum of exponentials, and picks out the target logits it holds.
fn reduce_logit_tile(
    tile: &[f32],
    nv: usize,
    v0: usize,
    targets: &[u32],
    max: &mut [f32],
    sum: &mut [f32],
    target_logit: &mut [f32],
) {
    with_avx2!({
        for (i, row) in tile.chunks_exact(nv).enumerate() {
            let target = targets[i] as usize;
            if (v0..v0 + nv).contains(&target) {
                target_logit[i] = row[target - v0];
            }
            let tile_max = max_of(row);
            if tile_max > max[i] {
                sum[i] *= exp_nonpositive(max[i] - tile_max);
                max[i] = tile_max;
            }
            sum[i] += exp_sum_ro(row, max[i]);
        }
    })
}

/// `o = silu(g) · u`: `g / (1 + e^(−g))` for `g >= 0` and the same quantity written as
/// `g · e^g / (1 + e^g)` for `g < 0`, so that the exponential's argument is never positive.
fn silu_mul_slice(o: &mut [f32], g: &[f32], u: &[f32]) {
    with_avx2!({
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            let e = exp_nonpositive(-g.abs());
            let num = if g >= 0.0 { g } else { g * e };
            *o = num / (1.0 + e) * u;
        }
    })
}

/// Softmax over `row[lo..hi]` (after scaling by `scale`), zeros elsewhere; `row` holds raw scores.
fn softmax_prefix(row: &mut [f32], lo: usize, hi: usize, scale: f32) {
    with_avx2!(softmax_prefix_body(row, lo, hi, scale))
}

#[inline(always)]
fn softmax_prefix_body(row: &mut [f32], lo: usize, hi: usize, scale: f32) {
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
        check_ids(ids, vocab, "token")?;
        Ok(table.index_select(&index_tensor(ids)?, 0)?)
    }

    fn matmul_t(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (m, k) = dims2(x, "matmul_t input")?;
        let (n, kw) = dims2(w, "matmul_t weight")?;
        if k != kw {
            return Err(Error::Input(format!(
                "matmul_t: input [{m}, {k}] against weight [{n}, {kw}]"
            )));
        }
        let out = with_f32(x, |xs| {
            with_f32(w, |ws| {
                let mut out = vec![0f32; m * n];
                sgemm::matmul(
                    &mut out,
                    n,
                    MatRef::row_major(xs, m, k),
                    MatRef::row_major(ws, n, k).t(),
                    1.0,
                    sgemm::outer_parallelism(),
                );
                out
            })
        })??;
        Ok(Tensor::from_vec(out, (m, n), &Device::Cpu)?)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (rows, cols) = same_dims(a, b, "add")?;
        let out = with_f32(a, |a| {
            with_f32(b, |b| {
                let mut out = a.to_vec();
                out.par_chunks_mut(ELEMENTWISE_CHUNK)
                    .zip(b.par_chunks(ELEMENTWISE_CHUNK))
                    .for_each(|(o, b)| {
                        for (o, &b) in o.iter_mut().zip(b) {
                            *o += b;
                        }
                    });
                out
            })
        })??;
        Ok(Tensor::from_vec(out, (rows, cols), &Device::Cpu)?)
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
        if rows != positions.len()
            || head_dim == 0
            || !head_dim.is_multiple_of(2)
            || !cols.is_multiple_of(head_dim)
        {
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
            head_dim: d,
            ..
        } = shape;
        let qd = dims2(q, "attention q")?;
        let kd = dims2(k, "attention k")?;
        let vd = dims2(v, "attention v")?;
        shape.check(qd, kd, vd)?;
        let t = qd.0;
        let out = with_f32(q, |qs| {
            with_f32(k, |ks| {
                with_f32(v, |vs| attention_f32(qs, ks, vs, t, shape, window))
            })
        })???;
        Ok(Tensor::from_vec(out, (t, n_heads * d), &Device::Cpu)?)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (rows, cols) = same_dims(gate, up, "silu_mul")?;
        let out = with_f32(gate, |g| {
            with_f32(up, |u| {
                let mut out = vec![0f32; g.len()];
                out.par_chunks_mut(ELEMENTWISE_CHUNK)
                    .zip(g.par_chunks(ELEMENTWISE_CHUNK))
                    .zip(u.par_chunks(ELEMENTWISE_CHUNK))
                    .for_each(|((o, g), u)| silu_mul_slice(o, g, u));
                out
            })
        })??;
        Ok(Tensor::from_vec(out, (rows, cols), &Device::Cpu)?)
    }

    fn gather_rows(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let (n, cols) = dims2(x, "gather_rows input")?;
        check_rows(rows, n, "gather_rows")?;
        let out = with_f32(x, |xs| {
            let mut out = Vec::with_capacity(rows.len() * cols);
            for &r in rows {
                out.extend_from_slice(&xs[r as usize * cols..(r as usize + 1) * cols]);
            }
            out
        })?;
        Ok(Tensor::from_vec(out, (rows.len(), cols), &Device::Cpu)?)
    }

    fn scatter_add_rows(
        &self,
        acc: &Tensor,
        src: &Tensor,
        rows: &[u32],
        weights: &[f32],
    ) -> Result<Tensor> {
        let (n, cols) = dims2(acc, "scatter_add_rows accumulator")?;
        let src_dims = dims2(src, "scatter_add_rows source")?;
        check_scatter_add((n, cols), src_dims, rows, weights)?;
        let out = with_f32(acc, |a| {
            with_f32(src, |s| {
                let mut out = a.to_vec();
                for ((&r, &w), s) in rows.iter().zip(weights).zip(s.chunks_exact(cols)) {
                    let o = &mut out[r as usize * cols..(r as usize + 1) * cols];
                    for (o, &v) in o.iter_mut().zip(s) {
                        *o += v * w;
                    }
                }
                out
            })
        })??;
        Ok(Tensor::from_vec(out, (n, cols), &Device::Cpu)?)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Tensor> {
        Ok(Tensor::zeros((rows, cols), DType::F32, &Device::Cpu)?)
    }

    fn lm_head_nll(&self, hidden: &Tensor, lm_head: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
        let (rows, h) = dims2(hidden, "lm_head_nll hidden states")?;
        let (vocab, hw) = dims2(lm_head, "lm_head_nll lm_head")?;
        if hw != h || targets.len() > rows {
            return Err(Error::Input(format!(
                "lm_head_nll: hidden [{rows}, {h}], lm_head [{vocab}, {hw}], {} targets",
                targets.len()
            )));
        }
        check_ids(targets, vocab, "target")?;
        with_f32(hidden, |x| {
            with_f32(lm_head, |w| lm_head_nll_f32(x, w, h, vocab, targets))
        })?
    }

    fn nll(&self, logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
        let (n, vocab) = dims2(logits, "nll logits")?;
        check_nll((n, vocab), targets)?;
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
        // silu · up against the libm formula.
        let g: Vec<f32> = (0..200).map(|i| (i as f32 - 100.0) * 0.37).collect();
        let u: Vec<f32> = g.iter().map(|v| 1.0 + v.cos()).collect();
        let mut o = vec![0f32; g.len()];
        silu_mul_slice(&mut o, &g, &u);
        for ((&o, &g), &u) in o.iter().zip(&g).zip(&u) {
            let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (o as f64 - want).abs() <= 1e-6 * want.abs().max(1e-30),
                "silu({g})"
            );
        }
        // 2 ulp of f32 (2 · 2^-24 relative)
        assert!(worst < 1.2e-7, "max relative error {worst:e}");
    }

    #[test]
    fn fused_lm_head_nll_matches_logits_then_nll() {
        // Several row tasks and vocabulary tiles, the last of each partial.
        let (rows, hidden, vocab) = (NLL_ROWS + 37, 24, 2 * NLL_VOCAB_TILE + 77);
        let x: Vec<f32> = (0..rows * hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0)
            .collect();
        let w: Vec<f32> = (0..vocab * hidden)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
            .collect();
        let targets: Vec<u32> = (0..rows - 1).map(|i| (i * 7919 % vocab) as u32).collect();
        let b = CpuBackend::new();
        let xt = b
            .upload(HostTensor::new(vec![rows, hidden], x).unwrap())
            .unwrap();
        let wt = b
            .upload(HostTensor::new(vec![vocab, hidden], w).unwrap())
            .unwrap();
        let fused = b.lm_head_nll(&xt, &wt, &targets).unwrap();
        let logits = b.matmul_t(&xt, &wt).unwrap();
        let head = logits.narrow(0, 0, rows - 1).unwrap();
        let plain = b.nll(&head, &targets).unwrap();
        assert_eq!(fused.len(), plain.len());
        for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
            assert!(
                (f - p).abs() <= 1e-5 * p.abs().max(1.0),
                "row {i}: {f} vs {p}"
            );
        }
        assert!(b.lm_head_nll(&xt, &wt, &[vocab as u32]).is_err());
    }
}
