//! The hand-off between the GPTQ solver and the packer: one linear layer's result before packing.

/// One linear layer's quantization in the solver's natural layout, before packing into GPTQ "v1".
///
/// Shapes follow `nn.Linear`: the weight is `[out_features, in_features]` = `[N, K]`.
/// Dequantized weight: `w[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Columns per group, or -1 for one group spanning all of K.
    pub group_size: i32,
    /// N: output features (rows of the dense weight).
    pub out_features: usize,
    /// K: input features (columns of the dense weight).
    pub in_features: usize,
    /// `[N, K]` row-major integer codes in `0..=2^bits-1`, in the original (unpermuted) column order.
    pub codes: Vec<u8>,
    /// `[G, N]` scales in group-index order (`g_idx` indexes the rows), f32 as the solver found them.
    pub scales: Vec<f32>,
    /// `[G, N]` exact zero points (8.0 for 4-bit sym); the file stores `zero - 1`.
    pub zeros: Vec<f32>,
    /// `[K]` group of each input column.
    pub g_idx: Vec<i32>,
}

impl QuantizedLinear {
    /// Number of groups G (rows of `scales`).
    pub fn groups(&self) -> usize {
        self.scales.len() / self.out_features.max(1)
    }

    /// Largest code, `2^bits - 1`.
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
}
