//! Mixtral's quantized modules as typed data: the true-sequential subsets of AutoGPTQ 0.6's
//! `mixtral.py` (spec §1.2) and the Hugging Face names built from them.
//!
//! Order within a layer: k, v, q / o / every expert's w1 then every expert's w3 / every expert's
//! w2. The router gate, embeddings, norms and `lm_head` are never quantized.

use runtime::mixtral::{LayerWeights, LinearSite};

/// A kind of quantized linear inside a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `block_sparse_moe.experts.E.w1` (gate projection).
    W1,
    /// `block_sparse_moe.experts.E.w3` (up projection).
    W3,
    /// `block_sparse_moe.experts.E.w2` (down projection).
    W2,
}

impl Kind {
    /// Whether there is one module of this kind per expert.
    pub const fn per_expert(self) -> bool {
        matches!(self, Kind::W1 | Kind::W2 | Kind::W3)
    }
}

/// The true-sequential subsets, in order; a per-expert kind expands to every expert in turn.
pub const SUBSETS: [&[Kind]; 4] = [
    &[Kind::KProj, Kind::VProj, Kind::QProj],
    &[Kind::OProj],
    &[Kind::W1, Kind::W3],
    &[Kind::W2],
];

/// Names (relative to `model.layers.N.`) of the linear layers that stay dense.
pub const DENSE_IN_LAYER: [&str; 1] = ["block_sparse_moe.gate"];

/// One quantized linear of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Module {
    /// What it is.
    pub kind: Kind,
    /// Its expert, for per-expert kinds.
    pub expert: Option<usize>,
}

impl Module {
    /// The name relative to the layer, e.g. `self_attn.k_proj`, `block_sparse_moe.experts.3.w1`.
    pub fn suffix(&self) -> String {
        let e = self.expert.unwrap_or(0);
        match self.kind {
            Kind::KProj => "self_attn.k_proj".into(),
            Kind::VProj => "self_attn.v_proj".into(),
            Kind::QProj => "self_attn.q_proj".into(),
            Kind::OProj => "self_attn.o_proj".into(),
            Kind::W1 => format!("block_sparse_moe.experts.{e}.w1"),
            Kind::W3 => format!("block_sparse_moe.experts.{e}.w3"),
            Kind::W2 => format!("block_sparse_moe.experts.{e}.w2"),
        }
    }

    /// The full Hugging Face module name in layer `layer` (no `.weight`).
    pub fn hf_name(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.suffix())
    }

    /// Where the runtime reports this module's input (q, k and v share one; w1 and w3 share one).
    pub fn site(&self) -> LinearSite {
        let e = self.expert.unwrap_or(0);
        match self.kind {
            Kind::KProj | Kind::VProj | Kind::QProj => LinearSite::Attention,
            Kind::OProj => LinearSite::AttentionOut,
            Kind::W1 | Kind::W3 => LinearSite::ExpertUp(e),
            Kind::W2 => LinearSite::ExpertDown(e),
        }
    }

    /// The weight slot of this module in a layer.
    pub fn slot<'a, T>(&self, layer: &'a mut LayerWeights<T>) -> Option<&'a mut T> {
        Some(match self.kind {
            Kind::KProj => &mut layer.k_proj,
            Kind::VProj => &mut layer.v_proj,
            Kind::QProj => &mut layer.q_proj,
            Kind::OProj => &mut layer.o_proj,
            Kind::W1 => &mut layer.experts.get_mut(self.expert?)?.w1,
            Kind::W3 => &mut layer.experts.get_mut(self.expert?)?.w3,
            Kind::W2 => &mut layer.experts.get_mut(self.expert?)?.w2,
        })
    }
}

/// The modules of subset `subset` (index into [`SUBSETS`]) for a model with `experts` experts, in
/// the reference's `fasterquant` order.
pub fn subset_modules(subset: usize, experts: usize) -> Vec<Module> {
    SUBSETS[subset]
        .iter()
        .flat_map(|&kind| {
            let range = if kind.per_expert() { 0..experts } else { 0..1 };
            range.map(move |e| Module {
                kind,
                expert: kind.per_expert().then_some(e),
            })
        })
        .collect()
}

/// Every quantized module of a layer, subset after subset.
pub fn layer_modules(experts: usize) -> Vec<Module> {
    (0..SUBSETS.len())
        .flat_map(|s| subset_modules(s, experts))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_order_for_eight_experts() {
        let names: Vec<String> = layer_modules(8).iter().map(|m| m.suffix()).collect();
        assert_eq!(names.len(), 4 + 24);
        assert_eq!(
            &names[..4],
            [
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.q_proj",
                "self_attn.o_proj"
            ]
        );
        assert_eq!(names[4], "block_sparse_moe.experts.0.w1");
        assert_eq!(names[11], "block_sparse_moe.experts.7.w1");
        assert_eq!(names[12], "block_sparse_moe.experts.0.w3");
        assert_eq!(names[20], "block_sparse_moe.experts.0.w2");
        assert_eq!(names[27], "block_sparse_moe.experts.7.w2");
        assert!(!names.iter().any(|n| n.contains("gate")));
        let m = subset_modules(2, 8)[9];
        assert_eq!(m.hf_name(3), "model.layers.3.block_sparse_moe.experts.1.w3");
        assert_eq!(m.site(), LinearSite::ExpertUp(1));
        assert_eq!(subset_modules(3, 8)[5].site(), LinearSite::ExpertDown(5));
    }
}
