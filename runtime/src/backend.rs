//! The seam between the Mixtral forward pass and a device: the dozen operations the model needs.
//!
//! [`crate::cpu::CpuBackend`] (candle-core, f32) is the reference; a CUDA backend implements the
//! same trait and is tested against it on the same inputs.

use crate::error::{Error, Result};

/// A dense f32 tensor in host memory, row-major: the exchange format between the loader and a
/// backend.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Wraps `data` with `shape`.
    ///
    /// # Errors
    /// [`Error::Input`] when the element count does not match the shape.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Input(format!(
                "host tensor of shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }
}

/// Head layout of grouped-query attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; query head `h` reads key/value head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Checks that `q [t, heads*d]`, `k`, `v [t, kv_heads*d]` (given as `(rows, cols)`) fit this layout.
    ///
    /// # Errors
    /// [`Error::Input`] naming the three shapes when they do not.
    pub fn check(&self, q: (usize, usize), k: (usize, usize), v: (usize, usize)) -> Result<()> {
        let ((t, qw), (tk, kw), (tv, vw)) = (q, k, v);
        let d = self.head_dim;
        if self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
            || qw != self.n_heads * d
            || kw != self.n_kv_heads * d
            || vw != kw
            || tk != t
            || tv != t
        {
            return Err(Error::Input(format!(
                "attention: q [{t}, {qw}], k [{tk}, {kw}], v [{tv}, {vw}] do not fit {self:?}"
            )));
        }
        Ok(())
    }
}

/// The tokens one expert receives from the router, and the weight of its output for each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertRoute {
    /// Token (row) indices routed to this expert, ascending.
    pub tokens: Vec<u32>,
    /// The renormalised router weight of this expert for each token in `tokens`.
    pub weights: Vec<f32>,
}

/// The router's decision for a block of tokens: one [`ExpertRoute`] per expert.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// Indexed by expert.
    pub experts: Vec<ExpertRoute>,
}

/// Routes each row of `logits` (`[tokens, experts]`, row-major) as Mixtral does: softmax in f32,
/// the `k` largest probabilities (lower expert index first on ties), renormalised to sum to 1.
pub fn route_rows(logits: &[f32], n_experts: usize, k: usize) -> Routing {
    let mut experts = vec![ExpertRoute::default(); n_experts];
    if n_experts == 0 {
        return Routing { experts };
    }
    let mut probs = vec![0f32; n_experts];
    let mut chosen: Vec<usize> = Vec::with_capacity(k);
    for (t, row) in logits.chunks_exact(n_experts).enumerate() {
        // modeling_mixtral.py: routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (p, &l) in probs.iter_mut().zip(row) {
            *p = (l - max).exp();
            sum += *p;
        }
        for p in probs.iter_mut() {
            *p /= sum;
        }
        // routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
        chosen.clear();
        for _ in 0..k.min(n_experts) {
            let mut best: Option<usize> = None;
            for e in 0..n_experts {
                if chosen.contains(&e) {
                    continue;
                }
                if best.is_none_or(|b| probs[e] > probs[b]) {
                    best = Some(e);
                }
            }
            if let Some(b) = best {
                chosen.push(b);
            }
        }
        // routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        let total: f32 = chosen.iter().map(|&e| probs[e]).sum();
        for &e in &chosen {
            experts[e].tokens.push(t as u32);
            experts[e].weights.push(probs[e] / total);
        }
    }
    Routing { experts }
}

/// Logit rows per chunk in the provided [`Backend::lm_head_nll`]: bounds the logits buffer to
/// `LM_HEAD_CHUNK · vocab` floats (16 MB for Mixtral's 32000).
pub const LM_HEAD_CHUNK: usize = 128;

/// Checks that every index in `rows` is below `n` (the rows of the tensor `what` reads).
///
/// # Errors
/// [`Error::Input`] naming the first row out of range.
pub(crate) fn check_rows(rows: &[u32], n: usize, what: &str) -> Result<()> {
    match rows.iter().find(|&&r| r as usize >= n) {
        Some(bad) => Err(Error::Input(format!(
            "{what}: row {bad} of a tensor with {n} rows"
        ))),
        None => Ok(()),
    }
}

/// Checks that every id is below `vocab`; `what` names the ids in the error ("token", "target").
///
/// # Errors
/// [`Error::Input`] naming the first id outside the vocabulary.
pub(crate) fn check_ids(ids: &[u32], vocab: usize, what: &str) -> Result<()> {
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => Err(Error::Input(format!(
            "{what} id {bad} is outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// Checks the arguments of [`Backend::nll`] from the logits' `[rows, vocab]`: one target per row,
/// each inside the vocabulary.
///
/// # Errors
/// [`Error::Input`] saying which of these fails.
pub(crate) fn check_nll(logits: (usize, usize), targets: &[u32]) -> Result<()> {
    let (n, vocab) = logits;
    if n != targets.len() {
        return Err(Error::Input(format!(
            "nll: {n} rows of logits, {} targets",
            targets.len()
        )));
    }
    check_ids(targets, vocab, "target")
}

/// Checks the arguments of [`Backend::scatter_add_rows`] from the accumulator's and the source's
/// `[rows, cols]`: one weight per row, one source row per index, equal widths, indices in range.
///
/// # Errors
/// [`Error::Input`] saying which of these fails.
pub(crate) fn check_scatter_add(
    acc: (usize, usize),
    src: (usize, usize),
    rows: &[u32],
    weights: &[f32],
) -> Result<()> {
    if weights.len() != rows.len() {
        return Err(Error::Input(format!(
            "scatter_add_rows: {} rows but {} weights",
            rows.len(),
            weights.len()
        )));
    }
    let ((n, cols), (n_src, src_cols)) = (acc, src);
    if n_src != rows.len() || src_cols != cols {
        return Err(Error::Input(format!(
            "scatter_add_rows: source [{n_src}, {src_cols}] for {} rows of width {cols}",
            rows.len()
        )));
    }
    check_rows(rows, n, "scatter_add_rows")
}

/// The operations the Mixtral forward pass needs from a device.
///
/// Shapes are given as `[rows, columns]`; every tensor the forward pass handles is 2-D
/// (`[tokens, features]`), heads being laid side by side in the feature dimension. Provided
/// methods are correct on any backend; override them only to go faster.
pub trait Backend {
    /// A device-resident f32 tensor; cheap to clone.
    type Tensor: Clone + std::fmt::Debug;

    /// Short name for logs and reports (`"cpu"`, `"cuda:0"`).
    fn name(&self) -> &'static str;
    /// Moves a host tensor to the device.
    fn upload(&self, t: HostTensor) -> Result<Self::Tensor>;
    /// Dimensions of a tensor, outermost first.
    fn shape(&self, t: &Self::Tensor) -> Vec<usize>;
    /// Copies a device tensor back to the host.
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;
    /// Rows `ids` of `table` (`[vocab, hidden]`), giving `[ids.len(), hidden]`.
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x · wᵀ` for `x: [tokens, in]`, `w: [out, in]`, giving `[tokens, out]`.
    fn matmul_t(&self, x: &Self::Tensor, w: &Self::Tensor) -> Result<Self::Tensor>;
    /// Element-wise `a + b` (same shapes).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// RMSNorm of each row: `weight · x / sqrt(mean(x²) + eps)`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// Rotary embedding (HF `rotate_half` convention) of `x: [tokens, heads·head_dim]`, token `i`
    /// at position `positions[i]`, frequencies `theta^(-2j/head_dim)`.
    fn rope(
        &self,
        x: &Self::Tensor,
        head_dim: usize,
        positions: &[u32],
        theta: f64,
    ) -> Result<Self::Tensor>;
    /// Causal grouped-query attention `softmax(q·kᵀ/√d + mask)·v` per head, for
    /// `q: [T, n_heads·d]`, `k, v: [T, n_kv_heads·d]`, giving `[T, n_heads·d]`. With a
    /// `window`, token `t` sees only keys `j` with `t − j < window`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        shape: AttentionShape,
        window: Option<usize>,
    ) -> Result<Self::Tensor>;
    /// `silu(gate) · up`, element-wise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// Rows `rows` of `x`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor>;
    /// `acc` with `weights[i] · src[i]` added to row `rows[i]`, for each `i` in order.
    fn scatter_add_rows(
        &self,
        acc: &Self::Tensor,
        src: &Self::Tensor,
        rows: &[u32],
        weights: &[f32],
    ) -> Result<Self::Tensor>;
    /// A zero tensor `[rows, cols]`.
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// For `logits: [n, vocab]`, the negative log-likelihood `−log_softmax(logits[i])[targets[i]]`
    /// of each row, in f32.
    fn nll(&self, logits: &Self::Tensor, targets: &[u32]) -> Result<Vec<f32>>;

    /// [`nll`](Self::nll) of the logits `hidden · lm_headᵀ` (`hidden: [n, h]`, `lm_head:
    /// [vocab, h]`) for the first `targets.len()` rows of `hidden` (the others are ignored).
    ///
    /// The provided method computes the logits [`LM_HEAD_CHUNK`] rows at a time; a backend may
    /// fuse the product with the reduction so that the logits never exist whole.
    fn lm_head_nll(
        &self,
        hidden: &Self::Tensor,
        lm_head: &Self::Tensor,
        targets: &[u32],
    ) -> Result<Vec<f32>> {
        let rows = self.shape(hidden).first().copied().unwrap_or(0);
        if targets.len() > rows {
            return Err(Error::Input(format!(
                "lm_head_nll: {} targets for {rows} hidden rows",
                targets.len()
            )));
        }
        let mut out = Vec::with_capacity(targets.len());
        for (c, chunk) in targets.chunks(LM_HEAD_CHUNK).enumerate() {
            let start = (c * LM_HEAD_CHUNK) as u32;
            let ids: Vec<u32> = (start..start + chunk.len() as u32).collect();
            let logits = self.matmul_t(&self.gather_rows(hidden, &ids)?, lm_head)?;
            out.extend(self.nll(&logits, chunk)?);
        }
        Ok(out)
    }

    /// The Mixtral router's decision for `logits: [tokens, experts]` (see [`route_rows`]).
    fn route_top_k(&self, logits: &Self::Tensor, k: usize) -> Result<Routing> {
        let host = self.download(logits)?;
        let n_experts = host.shape.last().copied().unwrap_or(0);
        Ok(route_rows(&host.data, n_experts, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_renormalises_top_two() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, /* row 2 */ 3.0, 3.0, 0.0, 0.0];
        let r = route_rows(&logits, 4, 2);
        assert_eq!(r.experts[2].tokens, vec![0]);
        assert_eq!(r.experts[1].tokens, vec![0, 1]);
        assert_eq!(r.experts[0].tokens, vec![1]);
        assert_eq!(r.experts[1].weights[1], 0.5);
        // Softmax of the two chosen logits: e^2/(e^2+e^1).
        let w = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((r.experts[2].weights[0] - w).abs() < 1e-6);
        assert!((r.experts[1].weights[0] - (1.0 - w)).abs() < 1e-6);
        assert!((r.experts[0].weights[0] - 0.5).abs() < 1e-7);
        assert!(r.experts[3].tokens.is_empty());
    }
}
