//! The Mixtral forward pass, written once over a [`Backend`].
//!
//! Follows transformers' `modeling_mixtral.py` (`MixtralForCausalLM`): embedding; per layer
//! `x + attn(rms_norm(x))` then `x + moe(rms_norm(x))`; final norm; `lm_head`. The router takes a
//! softmax in f32 over the gate logits, keeps the top `num_experts_per_tok` experts and
//! renormalises their weights to sum to 1; each expert computes `w2(silu(w1 x) · w3 x)` on its
//! routed tokens only, and its output is weighted after `w2`.
//!
//! The GPTQ driver uses the pieces separately ([`Mixtral::embed`], [`Mixtral::layer_forward`] with
//! an observer that sees each linear's input, [`Mixtral::head`]) so that only one layer is in
//! memory at a time; [`Model`] holds everything for evaluation.

use std::path::Path;

use crate::backend::{AttentionShape, Backend};
use crate::config::MixtralConfig;
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::load::Checkpoint;

/// The three linear weights of one expert, each `[out, in]`.
#[derive(Debug, Clone)]
pub struct ExpertWeights<T> {
    /// Gate projection `[intermediate, hidden]` (the `silu` branch).
    pub w1: T,
    /// Down projection `[hidden, intermediate]`.
    pub w2: T,
    /// Up projection `[intermediate, hidden]`.
    pub w3: T,
}

/// The weights of one decoder layer. Linear weights are dense `[out, in]`; the GPTQ driver
/// replaces them with fake-quantized ones in place.
#[derive(Debug, Clone)]
pub struct LayerWeights<T> {
    /// RMSNorm weight before attention, `[hidden]`.
    pub input_layernorm: T,
    /// `[heads·head_dim, hidden]`.
    pub q_proj: T,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: T,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: T,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: T,
    /// RMSNorm weight before the MoE block, `[hidden]`.
    pub post_attention_layernorm: T,
    /// Router `[experts, hidden]` (never quantized).
    pub gate: T,
    /// One entry per expert.
    pub experts: Vec<ExpertWeights<T>>,
}

/// The final norm and output projection.
#[derive(Debug, Clone)]
pub struct HeadWeights<T> {
    /// Final RMSNorm weight, `[hidden]`.
    pub norm: T,
    /// `[vocab, hidden]`.
    pub lm_head: T,
}

/// A linear layer whose input an observer can see (for collecting GPTQ Hessians).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearSite {
    /// The input shared by `q_proj`, `k_proj` and `v_proj`: `[T, hidden]`.
    Attention,
    /// The input of `o_proj`: `[T, heads·head_dim]`.
    AttentionOut,
    /// The input of expert `e`'s `w1` and `w3`: only the tokens routed to it, `[n_e, hidden]`.
    /// Not reported when no token is routed to the expert.
    ExpertUp(usize),
    /// The input of expert `e`'s `w2`: `[n_e, intermediate]`.
    ExpertDown(usize),
}

/// A callback that sees the 2-D input of each linear layer during [`Mixtral::layer_forward`].
pub type Observer<'a, T> = Option<&'a mut dyn FnMut(LinearSite, &T)>;

/// The architecture (config + backend) that runs the forward pass on weights held elsewhere.
#[derive(Debug, Clone)]
pub struct Mixtral<B: Backend = CpuBackend> {
    /// The device.
    pub backend: B,
    /// Hyper-parameters.
    pub config: MixtralConfig,
}

impl<B: Backend> Mixtral<B> {
    /// Runs `config`'s architecture on `backend`.
    pub fn new(backend: B, config: MixtralConfig) -> Self {
        Mixtral { backend, config }
    }

    /// Token embeddings `[ids.len(), hidden]`.
    ///
    /// # Errors
    /// [`Error::Input`] for an id outside the vocabulary.
    pub fn embed(&self, table: &B::Tensor, ids: &[u32]) -> Result<B::Tensor> {
        if ids.is_empty() {
            return Err(Error::Input("no tokens to embed".into()));
        }
        self.backend.embedding(table, ids)
    }

    /// One decoder layer on one sequence `x: [T, hidden]` (token `i` at position `i`), giving the
    /// layer's output `[T, hidden]`. `observer`, if given, sees the input of every linear layer.
    ///
    /// # Errors
    /// [`Error::Input`] for shapes that do not fit the config; backend errors.
    pub fn layer_forward(
        &self,
        layer: &LayerWeights<B::Tensor>,
        x: &B::Tensor,
        mut observer: Observer<'_, B::Tensor>,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let t = match b.shape(x)[..] {
            [t, h] if h == c.hidden_size => t,
            ref got => {
                return Err(Error::Input(format!(
                    "layer input has shape {got:?}, expected [tokens, {}]",
                    c.hidden_size
                )))
            }
        };
        let positions: Vec<u32> = (0..t as u32).collect();
        let mut observe = |site: LinearSite, x: &B::Tensor| {
            if let Some(f) = observer.as_mut() {
                f(site, x);
            }
        };

        // Self-attention block.
        let h = b.rms_norm(x, &layer.input_layernorm, eps)?;
        observe(LinearSite::Attention, &h);
        let q = b.rope(
            &b.matmul_t(&h, &layer.q_proj)?,
            c.head_dim(),
            &positions,
            c.rope_theta,
        )?;
        let k = b.rope(
            &b.matmul_t(&h, &layer.k_proj)?,
            c.head_dim(),
            &positions,
            c.rope_theta,
        )?;
        let v = b.matmul_t(&h, &layer.v_proj)?;
        let shape = AttentionShape {
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
        };
        let a = b.attention(&q, &k, &v, shape, c.sliding_window)?;
        observe(LinearSite::AttentionOut, &a);
        let x = b.add(x, &b.matmul_t(&a, &layer.o_proj)?)?;

        // Sparse MoE block.
        let h = b.rms_norm(&x, &layer.post_attention_layernorm, eps)?;
        let routing = b.route_top_k(&b.matmul_t(&h, &layer.gate)?, c.num_experts_per_tok)?;
        let mut acc = b.zeros(t, c.hidden_size)?;
        for (e, (route, w)) in routing.experts.iter().zip(&layer.experts).enumerate() {
            if route.tokens.is_empty() {
                continue;
            }
            let xe = b.gather_rows(&h, &route.tokens)?;
            observe(LinearSite::ExpertUp(e), &xe);
            let g = b.silu_mul(&b.matmul_t(&xe, &w.w1)?, &b.matmul_t(&xe, &w.w3)?)?;
            observe(LinearSite::ExpertDown(e), &g);
            let y = b.matmul_t(&g, &w.w2)?;
            acc = b.scatter_add_rows(&acc, &y, &route.tokens, &route.weights)?;
        }
        b.add(&x, &acc)
    }

    /// Final norm and `lm_head`: logits `[T, vocab]` for hidden states `x: [T, hidden]`.
    ///
    /// # Errors
    /// Backend errors.
    pub fn head(&self, head: &HeadWeights<B::Tensor>, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self
            .backend
            .rms_norm(x, &head.norm, self.config.rms_norm_eps as f32)?;
        self.backend.matmul_t(&h, &head.lm_head)
    }
}

/// A whole Mixtral model in memory, for evaluation.
#[derive(Debug)]
pub struct Model<B: Backend = CpuBackend> {
    /// Architecture and device.
    pub arch: Mixtral<B>,
    /// `[vocab, hidden]`.
    pub embed_tokens: B::Tensor,
    /// Decoder layers.
    pub layers: Vec<LayerWeights<B::Tensor>>,
    /// Final norm and `lm_head`.
    pub head: HeadWeights<B::Tensor>,
}

impl Model<CpuBackend> {
    /// Loads the checkpoint in `dir` (dense or GPTQ branch, dequantized) on the CPU.
    ///
    /// # Errors
    /// Loader errors (see [`Checkpoint::open`]).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_checkpoint(CpuBackend::new(), &Checkpoint::open(dir)?)
    }
}

impl<B: Backend> Model<B> {
    /// Loads every weight of `checkpoint` onto `backend`.
    ///
    /// # Errors
    /// Loader errors (see [`Checkpoint::read`]).
    pub fn from_checkpoint(backend: B, checkpoint: &Checkpoint) -> Result<Self> {
        let layers = (0..checkpoint.config().num_hidden_layers)
            .map(|l| checkpoint.load_layer_on(&backend, l))
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            embed_tokens: checkpoint.load_embedding_on(&backend)?,
            head: checkpoint.load_head_on(&backend)?,
            layers,
            arch: Mixtral::new(backend, checkpoint.config().clone()),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &MixtralConfig {
        &self.arch.config
    }

    /// Hidden states after the last decoder layer, `[T, hidden]`.
    ///
    /// # Errors
    /// [`Error::Input`] for empty input or ids outside the vocabulary.
    pub fn hidden(&self, ids: &[u32]) -> Result<B::Tensor> {
        let mut x = self.arch.embed(&self.embed_tokens, ids)?;
        for layer in &self.layers {
            x = self.arch.layer_forward(layer, &x, None)?;
        }
        Ok(x)
    }

    /// Logits `[T, vocab]` for one sequence.
    ///
    /// # Errors
    /// As [`hidden`](Self::hidden).
    pub fn logits(&self, ids: &[u32]) -> Result<B::Tensor> {
        self.arch.head(&self.head, &self.hidden(ids)?)
    }

    /// For a window of T tokens, the T−1 negative log-likelihoods (natural log, f32) of
    /// `ids[t+1]` given `ids[..=t]`.
    ///
    /// # Errors
    /// [`Error::Input`] for fewer than two tokens or ids outside the vocabulary.
    pub fn nll(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.len() < 2 {
            return Err(Error::Input(format!(
                "nll needs at least 2 tokens, got {}",
                ids.len()
            )));
        }
        let b = &self.arch.backend;
        let x = self.hidden(ids)?;
        let h = b.rms_norm(&x, &self.head.norm, self.config().rms_norm_eps as f32)?;
        b.lm_head_nll(&h, &self.head.lm_head, &ids[1..])
    }
}
