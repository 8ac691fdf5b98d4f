//! GPTQ v1 matrix products on the GPU: `Y[M, N] (f32) = X[M, K] · dequant(W)` with X in f16 or bf16.
//!
//! At load ([`prepare`]) the rows of `qweight` are sorted by `g_idx` when a checkpoint uses act-order,
//! so that each group is a contiguous run of rows, and `perm` is kept; X columns are gathered through
//! `perm` inside the GEMV kernel, and the GEMM path scatters dequantized rows back through it. Paths:
//! * GEMV (M ≤ [`GEMV_MAX_ROWS`], or [`GEMV_MAX_ROWS_TENSOR_CORES`] on the tensor cores,
//!   [`CudaDevice::qmatmul_uses_gemv`]): fp32 accumulation, one launch per 8 rows (fewer at 3 bits,
//!   [`gemv_launch_rows`]); act-order X gathered inside the kernel, or first put in sorted-row order
//!   by one small launch ([`prepermutes`]);
//! * GEMM (larger M): dequantize the layer into an f16 buffer, then cuBLAS (fp32 accumulation);
//! * fused MoE GEMV: one launch computes every (token, expert slot) pair, expert ids read on the device.

use std::sync::Arc;

use cudarc::cublas::{result as cublas_result, sys as cublas_sys};
use cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use half::{bf16, f16};
use rayon::prelude::*;

use super::device::{ensure, CudaDevice, Workspace};
use super::error::{drv, CudaError, Result};
use super::kernels::{gptq_source, gptq_tile_source};
use super::launch::ExLaunch;
use crate::qlinear::GptqWeight;

/// Above this many rows of X, dequantize + cuBLAS replaces the GEMV kernel: on an H100 at 4096 x 14336
/// the GEMV takes ~44 us at M = 4, ~77 us per launch of 8 rows, while dequantize (~50 us) + cuBLAS
/// (~50 us) stays near 100 us up to M = 16 (BENCHMARKS.md "CUDA kernels", 2026-11-28).
pub const GEMV_MAX_ROWS: usize = 8;
/// The same for layers on the tensor-core GEMV with at least [`GEMV_MIN_WEIGHTS_TENSOR_CORES`]
/// weights, act-order ones with X put in sorted-row order first ([`prepermutes`];
/// [`CudaDevice::qmatmul_uses_gemv`]). Measured on an H200 at M = 16 (BENCHMARKS.md): two launches
/// of 8 rows against dequantize + cuBLAS, 4096 x 14336 4-bit g128 40.1 against 79.2 us (act-order
/// 42.8 against 77.6), 14336 x 4096 66.3 against 78.3, 4096 x 4096 18.1 against 24.6; but
/// 4096 x 1024 17.1 against 13.5 (a launch's fixed cost dominates there).
pub const GEMV_MAX_ROWS_TENSOR_CORES: usize = 16;
/// See [`GEMV_MAX_ROWS_TENSOR_CORES`]: K x N of 4096 x 4096.
pub const GEMV_MIN_WEIGHTS_TENSOR_CORES: usize = 4096 * 4096;
/// Rows of X one GEMV launch handles.
const GEMV_ROWS_PER_LAUNCH: usize = 8;
/// Output columns per GEMV block (32 lanes × 4 columns).
const GEMV_COLS: usize = 128;
const GEMV_THREADS: u32 = 256;
const GEMV_WARPS: usize = 8;

/// Activation element types the kernels accept.
pub trait ActDtype: DeviceRepr + Copy + Send + Sync + 'static {
    /// Suffix of the kernel entry names.
    const NAME: &'static str;
    /// Converts from f32 (round to nearest even).
    fn from_f32(v: f32) -> Self;
    /// Converts to f32 (exact).
    fn to_f32(self) -> f32;
    /// Whether this is bf16 (the GEMM path converts it to f16 first).
    const IS_BF16: bool;
}
impl ActDtype for f16 {
    const NAME: &'static str = "f16";
    const IS_BF16: bool = false;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl ActDtype for bf16 {
    const NAME: &'static str = "bf16";
    const IS_BF16: bool = true;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Rows of K held by one "unit" (one packed word, or three at 3 bits): groups must hold whole units.
pub fn unit_rows(bits: u32) -> usize {
    match bits {
        3 => 32,
        4 => 8,
        _ => 4,
    }
}

/// A GPTQ layer laid out for the kernels, on the host.
#[derive(Debug, Clone)]
pub struct PreparedGptq {
    /// Bits per code (3, 4 or 8).
    pub bits: u32,
    /// K.
    pub in_features: usize,
    /// N.
    pub out_features: usize,
    /// G.
    pub groups: usize,
    /// `[K·b/32, N]` codes, rows sorted by group when `perm` is set.
    pub qweight: Vec<u32>,
    /// `[G, N]` scales.
    pub scales: Vec<f16>,
    /// Stored zeros: the packed `qzeros` bytes at 4/8 bits, unpacked bytes `[G, N]` at 3 bits.
    pub zeros: Vec<u8>,
    /// Group of each unit of rows.
    pub ugroup: Vec<i32>,
    /// Sorted row i holds input row `perm[i]`; `None` when no sorting was needed.
    pub perm: Option<Vec<i32>>,
}

/// `3-bit 4096x14336 layer`, for errors.
fn layer_name(bits: u32, k: usize, n: usize) -> String {
    format!("{bits}-bit {k}x{n} layer")
}

fn unsupported(field: &'static str, value: impl ToString, reason: &'static str) -> CudaError {
    CudaError::Unsupported {
        field,
        value: value.to_string(),
        reason,
    }
}

/// Packs `[rows, cols]` codes along rows into `[rows·b/32, cols]` words (LSB first, 3-bit cross-word).
pub fn pack_rows(codes: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<u32> {
    let b = bits as usize;
    let mut out = vec![0u32; rows * b / 32 * cols];
    // 32 rows fill exactly b words per column.
    out.par_chunks_mut(b * cols)
        .enumerate()
        .for_each(|(t, dst)| {
            for rr in 0..32 {
                let r = t * 32 + rr;
                if r >= rows {
                    break;
                }
                let bit = rr * b;
                let (w, s) = (bit / 32, (bit % 32) as u32);
                let src = &codes[r * cols..(r + 1) * cols];
                for (c, &v) in src.iter().enumerate() {
                    let v = v as u32;
                    dst[w * cols + c] |= v << s;
                    if s as usize + b > 32 {
                        dst[(w + 1) * cols + c] |= v >> (32 - s);
                    }
                }
            }
        });
    out
}

/// Checks `w` and lays it out for the kernels (sorting rows by `g_idx` for act-order).
pub fn prepare(w: &GptqWeight) -> Result<PreparedGptq> {
    w.check()
        .map_err(|e| unsupported("weight", e, "not a consistent GPTQ v1 layer"))?;
    if ![3, 4, 8].contains(&w.bits) {
        return Err(unsupported(
            "bits",
            w.bits,
            "the CUDA kernels handle 3, 4 and 8 bits",
        ));
    }
    let (k, n, bits) = (w.in_features, w.out_features, w.bits);
    if k == 0 || n == 0 {
        return Err(unsupported("shape", format!("{k}x{n}"), "empty layer"));
    }
    let uk = unit_rows(bits);
    if k % uk != 0 {
        return Err(unsupported(
            "in_features",
            k,
            "must be a multiple of the rows per packed unit",
        ));
    }
    let units = k / uk;
    let constant_units =
        |g: &dyn Fn(usize) -> i32| (0..units).all(|u| (1..uk).all(|j| g(u * uk + j) == g(u * uk)));
    let (qweight, ugroup, perm) = if constant_units(&|i| w.g_idx[i]) {
        let q: Vec<u32> = w.qweight.iter().map(|&v| v as u32).collect();
        let ug = (0..units).map(|u| w.g_idx[u * uk]).collect();
        (q, ug, None)
    } else {
        let mut perm: Vec<i32> = (0..k as i32).collect();
        perm.sort_by_key(|&i| w.g_idx[i as usize]); // stable
        let sorted_g = |i: usize| w.g_idx[perm[i] as usize];
        if !constant_units(&sorted_g) {
            return Err(unsupported(
                "g_idx",
                format!("group_size {}", w.group_size),
                "after sorting by g_idx, each group must hold whole units of 32/bits rows (32 at 3 bits)",
            ));
        }
        let codes = w.unpack_codes();
        let mut sorted = vec![0u8; k * n];
        sorted.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let src = perm[i] as usize;
            row.copy_from_slice(&codes[src * n..(src + 1) * n]);
        });
        let q = pack_rows(&sorted, k, n, bits);
        let ug = (0..units).map(|u| sorted_g(u * uk)).collect();
        (q, ug, Some(perm))
    };
    let zeros = if bits == 3 {
        w.unpack_zeros()
    } else {
        w.qzeros
            .iter()
            .flat_map(|&v| (v as u32).to_le_bytes())
            .collect()
    };
    Ok(PreparedGptq {
        bits,
        in_features: k,
        out_features: n,
        groups: w.groups(),
        qweight,
        scales: w.scales.clone(),
        zeros,
        ugroup,
        perm,
    })
}

/// A GPTQ layer on the GPU, ready for [`CudaDevice::qmatmul`].
#[derive(Debug)]
pub struct DeviceGptq {
    /// Bits per code.
    pub bits: u32,
    /// K.
    pub in_features: usize,
    /// N.
    pub out_features: usize,
    /// G.
    pub groups: usize,
    qweight: CudaSlice<u32>,
    scales: CudaSlice<f16>,
    zeros: CudaSlice<u8>,
    ugroup: CudaSlice<i32>,
    perm: Option<CudaSlice<i32>>,
    /// How `qweight` lies for the tensor-core GEMV where it applies ([`mma_eligible`]); None: the
    /// scalar kernel's row-major words. A tile-major layer's entries come from
    /// [`kernels::GPTQ_TILE3`](crate::cuda::kernels::GPTQ_TILE3).
    layout: Option<WordLayout>,
    /// Rows per group when the groups are uniform ([`uniform_group_rows`]), else 0.
    group_rows: i32,
}

impl DeviceGptq {
    /// Whether the layer was uploaded for the tensor cores (its words in [`Self::word_layout`]).
    fn mma(&self) -> bool {
        self.layout.is_some()
    }
    /// Whether its words are tile-major ([`WordLayout::TileMajor`]).
    fn tile_major(&self) -> bool {
        self.layout == Some(WordLayout::TileMajor)
    }
    /// The kernels' `strip_rows` argument: the packed rows R when `qweight` is strip-major, else 0.
    fn strip_rows(&self) -> i32 {
        if self.mma() {
            (self.in_features * self.bits as usize / 32) as i32
        } else {
            0
        }
    }
    /// Whether rows were sorted for act-order (X is gathered through `perm`).
    pub fn act_order(&self) -> bool {
        self.perm.is_some()
    }
    /// How the packed words of a layer uploaded for the tensor cores lie, or None for the scalar
    /// kernel's row-major words.
    pub fn word_layout(&self) -> Option<WordLayout> {
        self.layout
    }
    /// Bytes of the layer as stored in the checkpoint (qweight + scales + qzeros + g_idx).
    pub fn checkpoint_bytes(&self) -> usize {
        let (k, n, b) = (self.in_features, self.out_features, self.bits as usize);
        k * b / 8 * n + self.groups * n * 2 + self.groups * n * b / 8 + k * 4
    }
}

/// A GPTQ layer dequantized once into f16 `[K, N]` on the device ([`CudaDevice::prepare_dense`]).
#[derive(Debug)]
pub struct DenseLayer {
    /// K.
    pub in_features: usize,
    /// N.
    pub out_features: usize,
    w: CudaSlice<f16>,
}

/// Experts of one projection (same bits, K and N), with the device table of their pointers.
#[derive(Debug)]
pub struct DeviceExperts {
    /// The experts, in expert-id order.
    pub experts: Vec<DeviceGptq>,
    table: CudaSlice<u64>,
}

/// Split-K targets: blocks per SM to aim for (default 4) and the fewest units per block (default
/// 16); `MIXTRAL_GPTQ_GEMV_TUNING=blocks,units` overrides them (used by the benchmark sweeps).
fn gemv_tuning() -> (usize, usize) {
    static T: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("MIXTRAL_GPTQ_GEMV_TUNING")
            .ok()
            .and_then(|v| {
                let (a, b) = v.split_once(',')?;
                Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
            })
            .filter(|&(a, b): &(usize, usize)| a > 0 && b > 0)
            .unwrap_or((4, 16))
    })
}

/// uint4 slots per thread of the GEMV's cp.async ring: `GEMV_RING_SLOTS` of the kernel source,
/// which `MIXTRAL_GPTQ_NVRTC_DEFINES` may override (benchmark sweeps); 0 selects the register pipeline.
fn ring_slots() -> usize {
    static S: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *S.get_or_init(|| nvrtc_define("GEMV_RING_SLOTS").unwrap_or(0))
}

/// Bytes of the cp.async ring for a GEMV launch (0 when the kernel uses the register pipeline).
fn ring_bytes(bits: u32, mt: usize) -> usize {
    let words = if bits == 3 { 3 } else { 1 };
    let units = ring_slots() / words;
    if mt <= 2 && units >= 2 {
        units * words * GEMV_THREADS as usize * 16
    } else {
        0
    }
}

/// Whether the tensor-core GEMV (`gptq_mma_gemv_*`, `gptq_mmad_gemv_*` in kernels/gptq.cu) can run
/// this layer: N a multiple of 32, and at 4 or 8 bits K a multiple of 32 with every 32-row tile of
/// the (sorted) rows inside one group, which real GPTQ checkpoints (groups of 32, 64, 128, ... or
/// one per row) always meet; at 3 bits ([`MMA3_ROWS`]-row super-tiles) K and uniform groups
/// ([`uniform_group_rows`]) multiples of 128 rows: groups of 128 and per-channel, the 3-bit
/// branches Mixtral is published with, but not groups of 32.
pub fn mma_eligible(p: &PreparedGptq) -> bool {
    if !p.out_features.is_multiple_of(32) || (p.perm.is_some() && p.in_features > PERM16_MAX_K) {
        return false;
    }
    if p.bits == 3 {
        let rows = uniform_group_rows(p);
        return p.in_features.is_multiple_of(MMA3_ROWS)
            && rows > 0
            && rows.is_multiple_of(MMA3_ROWS);
    }
    if !(p.bits == 4 || p.bits == 8) || !p.in_features.is_multiple_of(32) {
        return false;
    }
    let per_tile = 32 / unit_rows(p.bits);
    p.ugroup
        .chunks(per_tile)
        .all(|t| t.iter().all(|&g| g == t[0]))
}

/// Which GEMV kernel runs a layer's products with M ≤ [`GEMV_MAX_ROWS`]. Fixed at upload, since the
/// tensor-core kernel reads `qweight` strip-major and the scalar one row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// The faster of the two where it was measured (BENCHMARKS.md, "CUDA kernels", H200):
    /// tensor-core for every layer [`mma_eligible`] takes (act-order X put in sorted-row order
    /// first where [`prepermutes`]), except the launches [`gemv_on_tensor_cores`] sends to the
    /// scalar kernel; scalar for the rest (3 bits in groups of 32).
    Auto,
    /// The tensor-core kernel (an error where [`mma_eligible`] is false).
    TensorCore,
    /// The scalar kernel (fp32 FFMA per weight, row-major words).
    Scalar,
}

/// How the packed words of a layer uploaded for the tensor cores lie on the device (kernels/gptq.cu,
/// `qw_tile_major`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordLayout {
    /// `[N/32][R][32]`: each 32-column strip's words in one run ([`to_strip_major`]). Every entry
    /// reads it.
    StripMajor,
    /// `[R/SR][N/32][SR][32]`: slot j of every strip side by side ([`to_tile_major`]), so that the
    /// warps of the grid at the same step read one region. 3 bits only, whose entries for it are
    /// in [`kernels::GPTQ_TILE3`](crate::cuda::kernels::GPTQ_TILE3); not for the `_narrow` entries
    /// nor the fused MoE.
    TileMajor,
}

/// The layout [`CudaDevice::upload_prepared`] gives a layer it uploads for the tensor cores
/// (`mma`): tile-major at 3 bits on layers that never run the entries for narrow layers (more than
/// 64 strips, that is 2048 columns, or K above 4096: `mmad_narrow`), strip-major otherwise;
/// experts of the fused MoE are uploaded strip-major ([`CudaDevice::upload_expert_as`]). Measured
/// on an H100 (BENCHMARKS.md, "tile-major words for 3-bit layers that never run the narrow
/// entries"), M = 1, g128, us, strip-major against tile-major: 4096 x 14336 11.93-11.97 /
/// 11.74-11.77, 14336 x 4096 11.72-11.77 / 11.59-11.62, 4096 x 4096 5.61-5.62 / 5.56-5.59,
/// act-order 13.04-13.08 / 12.89-12.92 at 4096 x 14336; earlier, with every 3-bit layer tile-major
/// ("tile-major words at 3 bits only"), 4096 x 1024 (narrow) 4.12 / 4.17 and the fused MoE 1-3 %
/// slower.
/// `MIXTRAL_GPTQ_TILE_MAJOR=0` keeps every layer strip-major (benchmark comparisons).
pub fn auto_word_layout(p: &PreparedGptq, mma: bool) -> WordLayout {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| env_usize("MIXTRAL_GPTQ_TILE_MAJOR") == Some(0));
    let never_narrow = p.out_features / 32 > narrow_max_strips() || p.in_features > NARROW_MAX_K;
    if mma && p.bits == 3 && never_narrow && !off {
        WordLayout::TileMajor
    } else {
        WordLayout::StripMajor
    }
}

/// Rows per group when group g holds exactly the (sorted) rows `g * rows .. (g + 1) * rows`, as
/// GPTQ writes them with or without act-order; 0 for any other grouping. The tensor-core GEMV then
/// finds a tile's group by division instead of a load from `ugroup` before its first copy.
pub fn uniform_group_rows(p: &PreparedGptq) -> usize {
    let (k, groups) = (p.in_features, p.groups);
    if groups == 0 || !k.is_multiple_of(groups) {
        return 0;
    }
    let rows = k / groups;
    let uk = unit_rows(p.bits);
    let uniform = p
        .ugroup
        .iter()
        .enumerate()
        .all(|(u, &g)| usize::try_from(g).is_ok_and(|g| g == u * uk / rows));
    if uniform {
        rows
    } else {
        0
    }
}

/// What [`GemvKernel::Auto`] picks: whether this layer is uploaded for the tensor-core GEMV
/// (strip-major words, which the scalar kernel reads too; [`gemv_on_tensor_cores`] decides per
/// launch).
pub fn auto_uses_mma(p: &PreparedGptq) -> bool {
    mma_eligible(p)
}

/// Whether a GEMV launch of `rows` rows on a layer uploaded for the tensor cores (`mma`), with X
/// gathered inside the kernel (not [`prepermutes`], which covers every such case of Mixtral's
/// shapes), runs there: always, except act-order layers with K above 8192 at more than 4 rows,
/// which run the scalar kernel on the same strip-major words. There every block of the
/// register-pipelined kernel would hold all of X (M x K) in shared memory, too much for enough
/// warps per strip, and the ring kernel's per-warp gathers of X from global memory were 1.7x slower
/// than the scalar kernel at M = 8 (BENCHMARKS.md, H200: 14336 x 4096 4-bit, 155 against 93 us; at
/// M = 1 and 4 the tensor-core kernel took 17.3 and 25.9 us against 23.1 and 61.7).
/// At 3 bits, only the register-pipelined variant exists, whose blocks hold all of X: launches with
/// rows x K above [`MMA3_MAX_X`] run the scalar kernel (with [`gemv_launch_rows`], only K above it).
pub fn gemv_on_tensor_cores(mma: bool, bits: u32, act_order: bool, k: usize, rows: usize) -> bool {
    mma && !(act_order && k > 8192 && rows > 4) && !(bits == 3 && rows * k > MMA3_MAX_X)
}

/// Whether the tensor-core GEMV of `m` rows on `w` first puts act-order X in sorted-row order (one
/// small `permute_x16` launch over M x K) and then runs as without act-order, instead of gathering X
/// inside every block.
/// * With programmatic dependent launch (`dependent`, [`CudaDevice::dependent_launch`]): at every M
///   but M = 1 with N at most [`GATHER_MAX_N`]. The GEMV then starts while the permutation runs.
///   Measured on an H200 back to back (BENCHMARKS.md, 2026-12-04), g128, prepermuted against
///   gathered, us: M = 1 at 4096 x 14336 4-bit 13.43 against 14.10 (8-bit 18.93 / 19.42, 3-bit
///   12.14 / 13.58); but at 14336 x 4096 13.86 against 13.51 (8-bit 19.45 / 18.81, 3-bit 12.53 /
///   12.40) and 4096 x 4096 7.03 against 6.89 (8-bit 8.55 / 8.11); at M = 2 and 4 the permutation
///   wins by up to 1.6x.
/// * Otherwise at M >= 8, or at M >= 2 where M x K x N (what the blocks' gathers grow with) is above
///   [`PREPERMUTE_MIN_PRODUCT`]. Measured on an H200 (BENCHMARKS.md), 4-bit g128, prepermuted
///   against gathered: 4096 x 14336 M = 2, 4, 8 17.9 / 19.1 / 23.6 us against 20.2 / 26.1 / 41.3;
///   14336 x 4096 M = 4 18.7 against 26.0, M = 8 37.5 against the scalar kernel's 92.9; but 4096 x
///   4096 M = 2 and 4 11.2 / 11.7 against 10.2 / 11.2 (the extra launch costs more than the gathers
///   there), M = 8 12.7 against 13.7.
///
/// `MIXTRAL_GPTQ_PREPERMUTE=0` or `1` turns it off or on everywhere (benchmark sweeps).
pub fn prepermutes(w: &DeviceGptq, m: usize, dependent: bool) -> bool {
    static FORCE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let force = *FORCE.get_or_init(
        || match std::env::var("MIXTRAL_GPTQ_PREPERMUTE").as_deref() {
            Ok("0") => Some(false),
            Ok("1") => Some(true),
            _ => None,
        },
    );
    let wanted = (dependent && (m > 1 || w.out_features > GATHER_MAX_N))
        || m >= 8
        || (m >= 2 && m * w.in_features * w.out_features > PREPERMUTE_MIN_PRODUCT);
    // (3 bits: only where a launch of one row runs on the tensor cores)
    let fits = gemv_on_tensor_cores(w.mma(), w.bits, false, w.in_features, 1);
    w.mma() && w.act_order() && fits && force.unwrap_or(wanted)
}

/// See [`prepermutes`]: with dependent launch, one row of act-order X is gathered inside the GEMV
/// on layers of at most this many columns (Mixtral's attention and w2), permuted first on wider ones.
pub const GATHER_MAX_N: usize = 4096;

/// See [`prepermutes`]: M x K x N of 4 rows at 4096 x 4096.
pub const PREPERMUTE_MIN_PRODUCT: usize = 4 * 4096 * 4096;

/// Rows of the 3-bit tensor-core GEMV's super-tile (`mma_tile3` in kernels/gptq.cu): lane c of a
/// warp holds the whole 32-row packed unit c, so K and the groups must be multiples of it.
pub const MMA3_ROWS: usize = 128;

/// The most elements of X (rows x K) a 3-bit tensor-core GEMV launch takes ([`gemv_launch_rows`],
/// [`gemv_on_tensor_cores`]): M = 4 at K = 14336, M = 8 at K = 4096. Measured on an H200
/// (BENCHMARKS.md), 3-bit 14336 x 4096 g128 at M = 8: two launches of 4 rows take 2 x 16.2 us (act-order
/// 2 x 27.2) against the scalar kernel's 93 (103) us; at K = 4096 one launch of 8 rows beats two of 4.
pub const MMA3_MAX_X: usize = 4 * 14336;

/// Rows per GEMV launch on a layer (`mma`: uploaded for the tensor cores): `GEMV_ROWS_PER_LAUNCH` (8),
/// fewer at 3 bits where that many rows would take more of X than [`MMA3_MAX_X`].
pub fn gemv_launch_rows(mma: bool, bits: u32, k: usize) -> usize {
    if mma && bits == 3 {
        (MMA3_MAX_X / k.max(1)).clamp(1, GEMV_ROWS_PER_LAUNCH)
    } else {
        GEMV_ROWS_PER_LAUNCH
    }
}

/// Whether the GEMM path's bf16 -> f16 copy of X is a dependent launch (with
/// [`CudaDevice::dependent_launch`]); `MIXTRAL_GPTQ_CONVERT_PDL=0` turns it off (benchmark sweeps).
/// On an H100 it takes 1.1-1.9 us off the 4096 x 1024 product at M = 2048 (35.3-35.7 against 36.7-37.6
/// us), and changes nothing measurable at the larger shapes (BENCHMARKS.md).
fn convert_dependent() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_usize("MIXTRAL_GPTQ_CONVERT_PDL") != Some(0))
}

/// Whether the dequantization of the GEMM path is a dependent launch (with
/// [`CudaDevice::dependent_launch`]); `MIXTRAL_GPTQ_DEQUANT_PDL=0` turns it off (benchmark sweeps).
/// On an H100 it takes about 1.1-1.4 us off each dequantization (BENCHMARKS.md).
fn dequant_dependent() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_usize("MIXTRAL_GPTQ_DEQUANT_PDL") != Some(0))
}

/// A whole number from the environment variable `name` (the benchmark sweeps' overrides of the
/// plans' limits), or None where it is unset or not a number.
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// A `MIXTRAL_GPTQ_NVRTC_DEFINES` value (benchmark sweeps override the kernels' tuning defines).
fn nvrtc_define(name: &str) -> Option<usize> {
    let v = std::env::var("MIXTRAL_GPTQ_NVRTC_DEFINES").ok()?;
    let prefix = format!("{name}=");
    v.split_whitespace()
        .filter_map(|d| d.trim_start_matches("-D").strip_prefix(prefix.as_str()))
        .next_back()
        .and_then(|n| n.parse().ok())
}

/// Tensor-core GEMV launch shape: warps per block and ring slots (`MMA_WARPS`, `MMA_STAGES` in
/// kernels/gptq.cu, which `MIXTRAL_GPTQ_NVRTC_DEFINES` may override, as it may `MMA_MIN_BLOCKS`,
/// which the plan sees through the driver's occupancy query), and the fixed cost of a warp's run in
/// the plan's cost model (`MIXTRAL_GPTQ_MMA_RUN_COST`, default [`MMA_RUN_COST_TILES`]). Read once:
/// every launch plans with them.
fn mma_tuning() -> (usize, usize, usize) {
    static T: std::sync::OnceLock<(usize, usize, usize)> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        let warps = nvrtc_define("MMA_WARPS").filter(|&w| w > 0).unwrap_or(4);
        let run_cost = env_usize("MIXTRAL_GPTQ_MMA_RUN_COST").unwrap_or(MMA_RUN_COST_TILES);
        let stages = nvrtc_define("MMA_STAGES").filter(|&s| s >= 2).unwrap_or(4);
        (warps, run_cost, stages)
    })
}

/// Act-order layers whose X (M x K f16/bf16) takes at most this many bytes have each block of the
/// tensor-core GEMV copy X to shared memory and gather from there: M = 1 at K = 4096. Measured on an
/// H200 (BENCHMARKS.md): 4096 x 14336, M = 1: 19.9 us against 20.6 us gathering from global memory;
/// with 32 KiB (M = 4) the copies and the shared memory they take made that shape 23 % slower,
/// though 4096 x 4096 was 19 % faster.
const MMA_XBLOCK_MAX_BYTES: usize = 8 * 1024;

/// The larger limit of the register-pipelined variant (`MIXTRAL_GPTQ_MMAD_XBLOCK`, bytes, overrides
/// it for benchmark sweeps): above [`MMA_XBLOCK_MAX_BYTES`] it copies X only where its plan without
/// the copy has at least [`MMAD_XBLOCK_MIN_WARPS`] warps per block, so that one copy serves many
/// warps. Measured on an H200 (BENCHMARKS.md): 14336 x 4096 (28 warps) M = 1, 4-bit: 16.1 us
/// against 17.4 gathering from global memory; 4096 x 4096 (22 warps) M = 8: 13.8 against 15.7;
/// but 4096 x 14336 (7 warps) M = 4, 4-bit: 29.9 against 26.2, and M = 8 (64 KiB): 74.7 against
/// 41.3. At M = 1 there (8 KiB) the copy gained 3 % (17.1 against 17.6 us).
fn mmad_xblock_max_bytes() -> usize {
    static B: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *B.get_or_init(|| env_usize("MIXTRAL_GPTQ_MMAD_XBLOCK").unwrap_or(64 * 1024))
}

/// See [`mmad_xblock_max_bytes`].
const MMAD_XBLOCK_MIN_WARPS: usize = 16;

/// A launch plan of the tensor-core GEMV ([`CudaDevice::mma_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MmaPlan {
    /// k-splits per 32-column strip (one warp each).
    nsplit: usize,
    /// 32-row tiles per warp's run.
    tiles_per_warp: usize,
    /// Warps per block: `MMA_WARPS` for the ring variant, `nsplit` for the register-pipelined one.
    warps: usize,
    /// Blocks.
    blocks: usize,
    /// Dynamic shared memory per block, bytes.
    smem: u32,
    /// The cost model's figure: waves × (tiles per warp + the fixed run cost).
    cost: usize,
}

/// A tensor-core GEMV launch as [`CudaDevice::gemv_launch_shape`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GemvLaunchShape {
    /// The kernel's entry point in kernels/gptq.cu.
    pub entry: String,
    /// The register-pipelined variant (one block per 32-column strip, one warp per k-split), else
    /// the cp.async-ring one (independent warps, `MMA_WARPS` per block).
    pub register_pipelined: bool,
    /// k-splits per strip.
    pub splits: usize,
    /// 32-row tiles per warp's run (the last split of a strip may have fewer).
    pub tiles_per_warp: usize,
    /// Warps per block.
    pub warps_per_block: usize,
    /// Blocks of the grid.
    pub blocks: usize,
    /// Blocks the driver keeps resident per SM with this launch's registers and shared memory.
    pub resident_blocks_per_sm: usize,
    /// 32-row tiles whose packed words each warp has in flight.
    pub tiles_in_flight: usize,
}

/// What a tensor-core GEMV launch runs ([`CudaDevice::mma_choice`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MmaChoice {
    /// The register-pipelined variant (`gptq_mmad_gemv_*`), else the ring one (`gptq_mma_gemv_*`).
    direct: bool,
    /// Act-order X is gathered inside (through the permutation, not put in order first): the
    /// register-pipelined variant runs its `_gather` entries ([`mmad_suffix`]).
    gather: bool,
    /// Each block copies act-order X to shared memory first.
    xblock: bool,
    /// The register-pipelined variant's warps copy their run's act-order indices to shared memory
    /// before the dependent-launch wait ([`perm_slice`]).
    perm_slice: bool,
    /// The layers the register-pipelined entry it runs is built for ([`LayerClass`]).
    class: LayerClass,
    plan: MmaPlan,
}

impl MmaChoice {
    /// The GEMV entry point this choice runs on `w` ([`mma_entry`]).
    fn gemv_entry<T: ActDtype>(&self, w: &DeviceGptq) -> String {
        mma_entry::<T>(
            self.direct,
            w.bits,
            (w.in_features, w.group_rows as usize),
            (self.gather, self.perm_slice),
            self.class,
        )
    }
}

/// Whether the register-pipelined GEMV's warps copy their run's act-order indices to shared memory
/// before the dependent-launch wait (with cp.async, the `_gather_slice` entries of kernels/gptq.cu)
/// instead of reading them from global memory while they stage X after it (`_gather`): on a plain
/// GEMV (not the fused MoE, whose blocks wait first, nor the entry for groups of one tile,
/// [`mmad_tile_groups`]) with K at most [`PERM_SLICE_MAX_K`], where the copies are small.
/// Measured on an H200 back to back (BENCHMARKS.md, 2026-12-04), M = 1, g128 act-order, us, with
/// the copy against without: 4096 x 1024 4-bit 5.18 / 5.46, 8-bit 5.70 / 5.83, 3-bit 5.17 / 5.47;
/// 4096 x 4096 4-bit 6.66 / 6.86; but 14336 x 4096 4-bit 14.39 / 13.59 (each block's indices are
/// 56 KiB there) and the fused MoE's w1/w3 at 1 token 23.5 / 22.3. With u16 indices (28 KiB) the
/// copy still lost at 14336 x 4096 (2026-12-05, `MIXTRAL_GPTQ_PERM_SLICE_MAX_K=14336`): 4-bit
/// 13.91 / 13.05.
fn perm_slice(
    direct: bool,
    act_order: bool,
    (k, bits, group_rows): (usize, u32, usize),
    moe_pairs: Option<usize>,
) -> bool {
    direct
        && act_order
        && k <= perm_slice_max_k()
        && moe_pairs.is_none()
        && !mmad_tile_groups(k, bits, group_rows)
}

/// See [`perm_slice`].
const PERM_SLICE_MAX_K: usize = 4096;

/// [`PERM_SLICE_MAX_K`], or `MIXTRAL_GPTQ_PERM_SLICE_MAX_K` (benchmark sweeps: with `MMAD_PERM16`
/// a run's indices take half the shared memory).
fn perm_slice_max_k() -> usize {
    static K: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *K.get_or_init(|| env_usize("MIXTRAL_GPTQ_PERM_SLICE_MAX_K").unwrap_or(PERM_SLICE_MAX_K))
}

/// Whether the register-pipelined GEMV of `m` rows on a `k` x `n` layer runs its entries for narrow
/// layers (`_narrow` in kernels/gptq.cu, `MMAD_DEPTH_NARROW` there: deeper pipelines in fewer
/// warps): on a plain GEMV (not the fused MoE, nor the entry for groups of one tile,
/// [`mmad_tile_groups`]) with at most [`NARROW_MAX_STRIPS`] 32-column strips and K at most
/// [`NARROW_MAX_K`], at one row (3 bits: up to 4), without act-order gathered inside or with the
/// indices copied first ([`perm_slice`]). One block runs per strip, so such a layer
/// keeps only a few SMs busy, and the bytes each has in flight set the speed. Measured on an H100
/// (BENCHMARKS.md, "entries for narrow layers"), g128, us, narrow against not: 4096 x 1024 M = 1
/// 3-bit 4.22 / 4.60 (act-order 4.71 / 5.05), 4-bit 4.31 / 4.54, 8-bit 4.93 / 5.28 (act-order
/// 5.30 / 5.53); 4096 x 2048 M = 1 3-bit 4.65 / 4.77, 4-bit 4.66 / 4.78; 4096 x 1024 M = 4 3-bit
/// 5.27 / 5.62 but 4-bit 5.36 / 5.00; at 96 strips (4096 x 3072) no faster, at 128 (4096 x 4096)
/// and at 14336 x 1024 slower. The 4-bit act-order slice's narrow entry is the other layers' code
/// with every weight slot before the dependent-launch wait (`MMAD_SLICE4_PRE_PIECES` in
/// kernels/gptq.cu: 4.68-4.69 us at 4096 x 1024 against 4.76-4.77 with theirs).
fn mmad_narrow(
    direct: bool,
    (k, n, m, bits, group_rows): (usize, usize, usize, u32, usize),
    (gather, slice): (bool, bool),
    moe_pairs: Option<usize>,
) -> bool {
    direct
        && moe_pairs.is_none()
        && !mmad_tile_groups(k, bits, group_rows)
        && (!gather || slice)
        && (m == 1 || (bits == 3 && m <= 4))
        && n / 32 <= narrow_max_strips()
        && k <= NARROW_MAX_K
}

/// Whether the register-pipelined GEMV of `m` rows on a `k` x `n` layer runs its 4-bit entries for
/// tall layers (`_tall` in kernels/gptq.cu, `MMAD_MAX_WARPS_TALL` there: 28 warps of 72 registers
/// instead of 32 of 64, and each block of tiles reloaded before it is computed): on a plain GEMV
/// (not the fused MoE, nor act-order gathered inside, nor the entry for groups of one tile,
/// [`mmad_tile_groups`]) of at most 4 rows with K above [`TALL_K_ABOVE`] and at most one strip per
/// SM (`sms`), where one block of many warps runs per SM. Measured on an H100 (BENCHMARKS.md,
/// "entries for tall layers"), g128, us, tall against not: 14336 x 4096 M = 1 13.57 / 13.90, M = 4
/// 15.50 / 15.76, per channel 12.96 / 13.23, act-order put in order first (M = 4) 16.96 / 17.35;
/// 14336 x 1024 0.3-0.5 % faster; but 8192 x 4096 9.34 / 9.02 (M = 4 10.39 / 10.02), and with
/// 448 strips (4096 x 14336, 4 blocks per SM) 14.32 / 14.07.
fn mmad_tall(
    direct: bool,
    (k, n, m, bits, group_rows): (usize, usize, usize, u32, usize),
    gather: bool,
    moe_pairs: Option<usize>,
    sms: usize,
) -> bool {
    direct
        && moe_pairs.is_none()
        && bits == 4
        && !gather
        && !mmad_tile_groups(k, bits, group_rows)
        && m <= 4
        && k > TALL_K_ABOVE
        && n / 32 <= sms
        && tall_entries_on()
}

/// See [`mmad_tall`].
const TALL_K_ABOVE: usize = 8192;

/// Whether the entries for tall layers run ([`mmad_tall`]): `MIXTRAL_GPTQ_TALL=0` turns them off
/// (benchmark sweeps).
fn tall_entries_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| env_usize("MIXTRAL_GPTQ_TALL") != Some(0))
}

/// Whether the register-pipelined GEMV of `m` rows on a `k` x `n` layer runs its 8-bit entries for
/// launches of several rows (`_rows` in kernels/gptq.cu, `MMAD_ROWS_ENTRY` there: each warp stages
/// its X with `cp.async` in one round trip, where the other entries take one round trip per 16-byte
/// chunk a lane copies, 2-3 at M = 1 but 8-16 at M = 4-8): on a plain 8-bit GEMV (not the fused MoE,
/// nor act-order gathered inside, nor the entry for groups of one tile, [`mmad_tile_groups`]) of
/// more than one row. Measured on an H100 (BENCHMARKS.md, "X staged with cp.async"), g128, us, that
/// staging against the register rounds: M = 4 4096 x 14336 23.79 / 24.65, 4096 x 4096 8.64 / 8.98,
/// 4096 x 1024 5.74 / 6.00; M = 8 25.93 / 27.63, 9.36 / 10.12, 6.55 / 7.29; but M = 1 no faster
/// (4096 x 4096 8.13 / 8.02), so one-row launches keep the other entries.
fn mmad_rows(
    direct: bool,
    (k, _, m, bits, group_rows): (usize, usize, usize, u32, usize),
    gather: bool,
    moe_pairs: Option<usize>,
) -> bool {
    direct
        && moe_pairs.is_none()
        && bits == 8
        && !gather
        && !mmad_tile_groups(k, bits, group_rows)
        && m > 1
}

/// The layers and launches a register-pipelined GEMV entry is built for: any, narrow layers
/// ([`mmad_narrow`], `_narrow`), tall ones ([`mmad_tall`], `_tall`) or launches of several rows
/// ([`mmad_rows`], `_rows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerClass {
    Any,
    Narrow,
    Tall,
    Rows,
}

impl LayerClass {
    /// The class of the register-pipelined GEMV's entry on a layer (the arguments of
    /// [`mmad_narrow`], [`mmad_tall`] and [`mmad_rows`]); the ring variant's entries are of
    /// [`LayerClass::Any`].
    fn of(
        direct: bool,
        layer: (usize, usize, usize, u32, usize),
        (gather, slice): (bool, bool),
        moe_pairs: Option<usize>,
        sms: usize,
    ) -> Self {
        if mmad_narrow(direct, layer, (gather, slice), moe_pairs) {
            LayerClass::Narrow
        } else if mmad_tall(direct, layer, gather, moe_pairs, sms) {
            LayerClass::Tall
        } else if mmad_rows(direct, layer, gather, moe_pairs) {
            LayerClass::Rows
        } else {
            LayerClass::Any
        }
    }

    /// The entry name's suffix.
    fn suffix(self) -> &'static str {
        match self {
            LayerClass::Any => "",
            LayerClass::Narrow => "_narrow",
            LayerClass::Tall => "_tall",
            LayerClass::Rows => "_rows",
        }
    }
}

/// See [`mmad_narrow`].
const NARROW_MAX_STRIPS: usize = 64;

/// See [`mmad_narrow`].
const NARROW_MAX_K: usize = 4096;

/// [`NARROW_MAX_STRIPS`], or `MIXTRAL_GPTQ_NARROW_MAX_STRIPS` (benchmark sweeps; 0 turns the narrow
/// entries off).
fn narrow_max_strips() -> usize {
    static S: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *S.get_or_init(|| env_usize("MIXTRAL_GPTQ_NARROW_MAX_STRIPS").unwrap_or(NARROW_MAX_STRIPS))
}

/// The [`CudaDevice::mma_choice`] cache key: bits, X dtype, K, N, M, group rows, act-order, the
/// fused MoE's pairs (None for a plain GEMV), and whether the words are tile-major.
pub(crate) type MmaKey = (
    u32,
    &'static str,
    usize,
    usize,
    usize,
    i32,
    bool,
    Option<usize>,
    bool,
);

/// The entry point of a tensor-core GEMV variant in kernels/gptq.cu for a layer of `k` rows and
/// `group_rows` ([`uniform_group_rows`]): the ring (`mma`), the register pipeline (`mmad`), or the
/// register pipeline for groups of one 32-row tile (`mmadg`, [`mmad_tile_groups`]); of the kind
/// [`mmad_suffix`] names, for the layers of `class`.
fn mma_entry<T: ActDtype>(
    direct: bool,
    bits: u32,
    (k, group_rows): (usize, usize),
    (gather, slice): (bool, bool),
    class: LayerClass,
) -> String {
    let variant = match direct {
        false => "mma",
        true if mmad_tile_groups(k, bits, group_rows) => "mmadg",
        true => "mmad",
    };
    format!(
        "gptq_{variant}_gemv_{bits}b_{}{}{}",
        T::NAME,
        mmad_suffix(direct, gather, slice),
        class.suffix()
    )
}

/// Every tensor-core entry name the launches can ask for (the GEMV's `gptq_mma_gemv_*`,
/// `gptq_mmad_gemv_*`, `gptq_mmadg_gemv_*`, the fused MoE's `gptq_mmad_moe_*`): both X dtypes, bits
/// 3, 4 and 8, with and without act-order gathered inside, over the K, N, M and grouping cases that
/// pick a different entry (K at most and above 4096, where the act-order indices are copied first or
/// not; narrow, tall or other layers; one row or several; groups of one tile). The NVRTC test checks
/// that the compiled modules have each one, so that a name the host builds without a kernel behind it
/// fails without a GPU.
pub fn tensor_core_entries() -> Vec<String> {
    fn for_dtype<T: ActDtype>(out: &mut Vec<String>) {
        for bits in [3u32, 4, 8] {
            for (k, group_rows) in [(4096, 128), (4096, 32), (14336, 128)] {
                for act_order in [false, true] {
                    for direct in [true, false].into_iter().filter(|&d| d || has_ring(bits)) {
                        let slice = perm_slice(direct, act_order, (k, bits, group_rows), None);
                        for (n, m) in [32, 14336].into_iter().flat_map(|n| [(n, 1), (n, 4)]) {
                            // (an H100's 132 SMs)
                            let class = LayerClass::of(
                                direct,
                                (k, n, m, bits, group_rows),
                                (act_order, slice),
                                None,
                                132,
                            );
                            out.push(mma_entry::<T>(
                                direct,
                                bits,
                                (k, group_rows),
                                (act_order, slice),
                                class,
                            ));
                        }
                    }
                    let slice = perm_slice(true, act_order, (k, bits, group_rows), Some(2));
                    out.push(mmad_moe_entry::<T>(
                        bits,
                        (k, group_rows),
                        (act_order, slice),
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    for_dtype::<f16>(&mut out);
    for_dtype::<bf16>(&mut out);
    out.sort();
    out.dedup();
    out
}

/// The fused MoE's entry point in kernels/gptq.cu (`gptq_mmad_moe_*`, or `gptq_mmadg_moe_*` for
/// groups of one tile, [`mmad_tile_groups`]), with or without act-order gathered inside
/// ([`mmad_suffix`]).
fn mmad_moe_entry<T: ActDtype>(
    bits: u32,
    (k, group_rows): (usize, usize),
    (gather, slice): (bool, bool),
) -> String {
    let variant = if mmad_tile_groups(k, bits, group_rows) {
        "mmadg"
    } else {
        "mmad"
    };
    format!(
        "gptq_{variant}_moe_{bits}b_{}{}",
        T::NAME,
        mmad_suffix(true, gather, slice)
    )
}

/// The register-pipelined entries come in kinds (kernels/gptq.cu, `MMAD_ENTRIES`): one without
/// act-order (or with X put in sorted-row order first), and ones that gather act-order X through the
/// permutation, its indices read from global memory (`_gather`) or first copied to shared memory
/// ([`perm_slice`], `_gather_slice`, plain GEMV only), so that the gathers' registers do not weigh
/// on the other kinds' code.
fn mmad_suffix(direct: bool, gather: bool, slice: bool) -> &'static str {
    match (direct && gather, slice) {
        (false, _) => "",
        (true, false) => "_gather",
        (true, true) => "_gather_slice",
    }
}

/// Whether the ring variant of the tensor-core GEMV (`gptq_mma_gemv_*`) exists at `bits`: at 4 and
/// 8 bits; 3 bits run the register-pipelined variant only.
fn has_ring(bits: u32) -> bool {
    bits != 3
}

/// Whether the register-pipelined GEMV runs its entry for groups of one tile (`gptq_mmadg_gemv_*`,
/// `mmad_tile_groups` in kernels/gptq.cu: g32 at 4 or 8 bits with K's tiles whole blocks of its
/// depth), whose scales and zeros travel through the pipeline with the tiles. A separate entry, so
/// that the other layers' kernel stays as it was (with the third path in one entry, their times
/// grew by 1-2 % on the small shapes, H200).
fn mmad_tile_groups(k: usize, bits: u32, group_rows: usize) -> bool {
    bits != 3
        && group_rows == 32
        && (k / 32).is_multiple_of(mmad_depth(bits, false, LayerClass::Any))
}

/// The fewest warps per block of a fused MoE plan ([`CudaDevice::mma_plan`]), where the shape allows,
/// as a fraction of the entry's launch bound: a quarter (8 warps at 4 bits, 7 at 8 and 3). The plan
/// counts every pair's blocks in its waves, and would otherwise pick blocks of 3-4 warps with long
/// runs at 4096 x 14336, whose per-block costs (act-order X copied to shared memory, the split sum)
/// made them slower than two waves of wider blocks. Measured on an H200 (BENCHMARKS.md, 2026-12-04),
/// 8 experts 4-bit g128 act-order, 1 token: 4096 x 14336 4 warps x 32 tiles 24.07 us against 8 x 16
/// 22.47; 14336 x 4096 16 x 28 21.22 against 32 x 14 (two waves) 25.30.
const MOE_MIN_WARPS_DIV: usize = 4;

/// The fixed cost of one warp's run in the tensor-core GEMV, in tiles' worth of streaming (staging
/// X, the first copies in flight, the split-K fence and sum), for [`CudaDevice::mma_plan`]'s cost
/// model. Measured on an H200 (BENCHMARKS.md): 24 and 12 give the same 4-bit times, 24 is up to
/// 19 % faster at 8 bits, M = 4; 4 is slower at M = 8.
const MMA_RUN_COST_TILES: usize = 24;

/// The same for the register-pipelined variant, whose splits meet in shared memory instead of a
/// fence, an atomic and a read of every split's partial: fitted to the H200 times of both variants
/// (BENCHMARKS.md: 4096 x 14336 at M = 1 with 20 tiles per warp took 15.4 us against the ring's
/// 17.0 us with 16, and 14336 x 4096 at M = 8, where only 4 warps per strip fit with all of X in
/// shared memory, 61 us against 34 us), so that the plans of the two variants compare.
const MMAD_RUN_COST_TILES: usize = 16;

/// Halves between rows of a warp's X area (`mma_xstride` in kernels/gptq.cu).
fn mma_xstride(tiles_per_warp: usize) -> usize {
    tiles_per_warp * 32 + if tiles_per_warp % 2 == 1 { 64 } else { 32 }
}

/// Environment variable that, when set, makes every new tensor-core GEMV plan print itself to stderr:
/// the key (bits, X dtype, K, N, M, group rows, act-order) and the choice (variant, X copy, splits,
/// tiles per warp, warps, blocks, shared bytes, cost).
pub const PLAN_TRACE_ENV: &str = "MIXTRAL_GPTQ_PLAN_TRACE";

/// Environment variable that, set to `1`, makes uniform-group layers run the ring variant of the
/// tensor-core GEMV too (`gptq_mma_gemv_*`), for side-by-side benchmarks against the register
/// pipeline (`gptq_mmad_gemv_*`).
pub const MMA_RING_ENV: &str = "MIXTRAL_GPTQ_MMA_RING";

/// Whether the tensor-core GEMV of a layer with `group_rows` ([`uniform_group_rows`]) runs the
/// register-pipelined variant (`mmad_gemv` in kernels/gptq.cu): uniform groups of a multiple of 32
/// rows, whose tiles' groups follow by counting; other layers stream through the cp.async ring
/// (`mma_gemv`), which reads each tile's group from `ugroup`.
fn mma_direct(group_rows: usize) -> bool {
    static RING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ring = *RING.get_or_init(|| std::env::var(MMA_RING_ENV).is_ok_and(|v| v.trim() == "1"));
    !ring && group_rows > 0 && group_rows.is_multiple_of(32)
}

/// The register-pipelined GEMV's depths in kernels/gptq.cu and their defaults ([`mmad_depth`]).
const MMAD_DEPTH_DEFAULTS: [(&str, usize); 8] = [
    ("MMAD_DEPTH", 2),
    ("MMAD_DEPTH_SLICE", 4),
    ("MMAD_DEPTH8", 2),
    ("MMAD_DEPTH3", 1),
    ("MMAD_DEPTH_NARROW", 4),
    ("MMAD_DEPTH8_NARROW", 4),
    ("MMAD_DEPTH3_NARROW", 2),
    ("MMAD_DEPTH_TALL", 2),
];

/// 32-row tiles in flight per warp of the register-pipelined GEMV (`mmad_depth` in
/// kernels/gptq.cu): `MMAD_DEPTH` at 4 bits (`MMAD_DEPTH_SLICE` in the `_gather_slice` entries,
/// [`perm_slice`]) and `MMAD_DEPTH8` at 8 bits, and at 3 bits `MMAD_DEPTH3` [`MMA3_ROWS`]-row
/// super-tiles of 4 tiles each; in the entries for narrow layers ([`mmad_narrow`])
/// `MMAD_DEPTH_NARROW`, `MMAD_DEPTH8_NARROW` and `MMAD_DEPTH3_NARROW`, and in those for tall layers
/// ([`mmad_tall`], 4 bits) `MMAD_DEPTH_TALL` ([`MMAD_DEPTH_DEFAULTS`], which
/// `MIXTRAL_GPTQ_NVRTC_DEFINES` may override).
fn mmad_depth(bits: u32, slice: bool, class: LayerClass) -> usize {
    static D: std::sync::OnceLock<[usize; 8]> = std::sync::OnceLock::new();
    let [d4, d4_slice, d8, d3, d4_narrow, d8_narrow, d3_narrow, d4_tall] = *D.get_or_init(|| {
        MMAD_DEPTH_DEFAULTS
            .map(|(name, default)| nvrtc_define(name).filter(|&d| d > 0).unwrap_or(default))
    });
    match (bits, class) {
        (3, LayerClass::Narrow) => d3_narrow * MMA3_ROWS / 32,
        (3, _) => d3 * MMA3_ROWS / 32,
        (4, LayerClass::Narrow) => d4_narrow,
        (4, LayerClass::Tall) => d4_tall,
        (4, _) if slice => d4_slice,
        (4, _) => d4,
        (_, LayerClass::Narrow) => d8_narrow,
        _ => d8,
    }
}

/// `MMAD_PERM16`'s default in kernels/gptq.cu: every kind of act-order entry of the
/// register-pipelined kernels reads the u16 copy of the permutation ([`perm_words`]).
const MMAD_PERM16_DEFAULT: usize = 7;

/// Bytes per act-order index the register-pipelined GEMV copies to shared memory with
/// [`perm_slice`] (the `_gather_slice` entries): 2 where bit 2 of `MMAD_PERM16` (kernels/gptq.cu,
/// default [`MMAD_PERM16_DEFAULT`], which `MIXTRAL_GPTQ_NVRTC_DEFINES` may override) has them read
/// the u16 copy ([`perm_words`]), else 4.
fn perm_index_bytes() -> usize {
    static B: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *B.get_or_init(|| {
        if nvrtc_define("MMAD_PERM16").unwrap_or(MMAD_PERM16_DEFAULT) & 2 != 0 {
            2
        } else {
            4
        }
    })
}

/// The split sizes (tiles per warp) the register-pipelined GEMV's plan may choose: multiples of
/// its depth where K's tiles and the groups allow whole blocks of it (`mmad_blocked` in
/// kernels/gptq.cu: the group and bounds checks then run once per block), else any.
fn mmad_tile_step(
    k: usize,
    bits: u32,
    group_rows: usize,
    (slice, class): (bool, LayerClass),
) -> usize {
    if bits == 3 {
        return MMA3_ROWS / 32; // whole super-tiles (mma_eligible)
    }
    let (d, tiles) = (mmad_depth(bits, slice, class), k / 32);
    let tpg = group_rows / 32;
    // (`mmad_tile_groups`: groups of one tile take whole blocks too)
    if tiles.is_multiple_of(d) && (tpg.is_multiple_of(d) || tpg == tiles || tpg == 1) {
        d
    } else {
        1
    }
}

/// Shared bytes per warp of the tensor-core GEMV: for the register-pipelined variant X (`M *
/// xstride * 2`) and, with [`perm_slice`] (`slice`), its run's indices (4 bytes a row, `mmad_gemv`
/// in kernels/gptq.cu); for the ring variant (`mma_warp_smem` there) X, the tiles' groups, their
/// scales and zeros, and the cp.async ring of `MMA_STAGES` slots.
fn mma_warp_smem(
    m: usize,
    tiles_per_warp: usize,
    bits: u32,
    group_rows: usize,
    (direct, slice): (bool, bool),
) -> usize {
    if direct {
        let indices = if slice {
            tiles_per_warp * 32 * perm_index_bytes()
        } else {
            0
        };
        return m * mma_xstride(tiles_per_warp) * 2 + indices;
    }
    let stages = mma_tuning().2;
    // Ring slot: the tile's 4 (8) packed rows at a pitch of 160 (144) bytes (`mma_slot_bytes`); 96
    // bytes of scales and zeros per group the run meets (`MMA_GROUP_BYTES`).
    let slot = if bits == 4 { 4 * 160 } else { 8 * 144 };
    m * mma_xstride(tiles_per_warp) * 2
        + (tiles_per_warp * 4).next_multiple_of(16)
        + mma_groups_cap(tiles_per_warp, group_rows) * 96
        + stages * slot
}

/// Groups a warp's run of tiles can meet (`mma_groups_cap` in kernels/gptq.cu): one per tile at
/// most, and with uniform groups of `group_rows` rows at most (32 tiles - 1) / group_rows + 2.
fn mma_groups_cap(tiles_per_warp: usize, group_rows: usize) -> usize {
    match (32 * tiles_per_warp - 1).checked_div(group_rows) {
        Some(q) => tiles_per_warp.min(q + 2),
        None => tiles_per_warp,
    }
}

/// The most rows an act-order layer on the tensor cores may have: its permutation's u16 copy
/// ([`perm_words`]) holds indices below it.
pub const PERM16_MAX_K: usize = 1 << 16;

/// The device words of a layer's act-order permutation: the K i32 indices, and for a layer on the
/// tensor cores (`mma`, K at most [`PERM16_MAX_K`]) the same indices as u16 after them, two a word
/// (the lower half first, as the kernels read them little-endian): with `MMAD_PERM16` the
/// register-pipelined GEMV and fused MoE gather through that copy, `q.perm + K` in kernels/gptq.cu,
/// moving half the bytes (every block reads the layer's whole permutation).
pub fn perm_words(perm: &[i32], mma: bool) -> Vec<i32> {
    let mut words = perm.to_vec();
    if mma {
        words.extend(
            perm.chunks(2)
                .map(|p| (p[0] as u32 | (p.get(1).map_or(0, |&v| v as u32) << 16)) as i32),
        );
    }
    words
}

/// Packed rows of one slot of the tensor-core layout (`qw_slot_rows` in kernels/gptq.cu): what one
/// warp-wide step of the GEMV reads, a 32-row tile at 4 and 8 bits, a [`MMA3_ROWS`]-row super-tile
/// at 3, each `bits` words of 32 codes per 32 rows.
fn slot_rows(bits: u32) -> usize {
    let rows = if bits == 3 { MMA3_ROWS } else { 32 };
    rows * bits as usize / 32
}

/// Row-major `[R, N]` packed words of `bits`-bit codes in the tensor-core layout `layout`.
fn to_mma_layout(q: &[u32], n: usize, bits: u32, layout: WordLayout) -> Vec<u32> {
    match layout {
        WordLayout::StripMajor => to_strip_major(q, n),
        WordLayout::TileMajor => to_tile_major(q, n, slot_rows(bits)),
    }
}

/// Row-major `[R, N]` packed words to tile-major `[R/SR][N/32][SR][32]` (N a multiple of 32, R of
/// `sr` = SR): slot j (packed rows j SR .. j SR + SR - 1) of every 32-column strip side by side.
pub fn to_tile_major(q: &[u32], n: usize, sr: usize) -> Vec<u32> {
    let mut out = vec![0u32; q.len()];
    out.par_chunks_mut(sr * n).enumerate().for_each(|(j, dst)| {
        for (s, d) in dst.chunks_mut(sr * 32).enumerate() {
            for (r, row) in d.chunks_mut(32).enumerate() {
                let src = (j * sr + r) * n + s * 32;
                row.copy_from_slice(&q[src..src + 32]);
            }
        }
    });
    out
}

/// Row-major `[R, N]` packed words to strip-major `[N/32][R][32]` (N a multiple of 32): the layout
/// of the tensor-core GEMV, where each warp's 32 columns are one contiguous stream.
pub fn to_strip_major(q: &[u32], n: usize) -> Vec<u32> {
    let rows = q.len() / n;
    let mut out = vec![0u32; q.len()];
    out.par_chunks_mut(rows * 32)
        .enumerate()
        .for_each(|(s, dst)| {
            for (r, d) in dst.chunks_mut(32).enumerate() {
                d.copy_from_slice(&q[r * n + s * 32..r * n + s * 32 + 32]);
            }
        });
    out
}

/// Pushes a layer's kernel arguments in the order every GPTQ kernel takes them: qweight,
/// strip_rows, scales, zeros, ugroup, then perm, or a null pointer where the layer has none or X
/// already is in sorted-row order (`x_sorted`, [`CudaDevice::gemv_rows`]).
fn layer_args(b: &mut ExLaunch, w: &DeviceGptq, x_sorted: bool) {
    b.buf(&w.qweight)
        .int(w.strip_rows())
        .buf(&w.scales)
        .buf(&w.zeros)
        .buf(&w.ugroup);
    match &w.perm {
        Some(p) if !x_sorted => b.buf(p),
        _ => b.ptr(0),
    };
}

/// The layer's arguments ([`layer_args`]), then X and (M, K, N): how every GEMV entry starts.
fn layer_x_args<T>(b: &mut ExLaunch, w: &DeviceGptq, x_sorted: bool, x: &CudaView<T>, m: usize) {
    layer_args(b, w, x_sorted);
    b.buf(x)
        .int(m as i32)
        .int(w.in_features as i32)
        .int(w.out_features as i32);
}

/// The scalar GEMV's trailing arguments (units per split, the split-K workspace, Y) and its launch
/// shape: grid (column tiles, splits, `z`: 1, or the pairs of the fused MoE), `GEMV_THREADS` threads.
fn scalar_gemv_tail(
    b: &mut ExLaunch,
    (tiles, nsplit, z): (usize, usize, usize),
    smem: u32,
    ups: usize,
    ws: &mut Workspace,
    y: &mut impl DevicePtrMut<f32>,
) -> LaunchConfig {
    let (partial, counters) = ws.split_k();
    b.int(ups as i32)
        .buf_mut(partial)
        .buf_mut(counters)
        .buf_mut(y);
    LaunchConfig {
        grid_dim: (tiles as u32, nsplit as u32, z as u32),
        block_dim: (GEMV_THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The leading arguments both fused MoE kernels take (`gptq_moe_gemv_*`, `gptq_mmad_moe_*`): the
/// expert table, strip_rows, the expert ids, the pair scales or a null pointer, X, then the
/// (x_div, K, N) scalars.
struct MoeArgs<'a, T> {
    experts: &'a DeviceExperts,
    strip_rows: i32,
    expert_ids: &'a CudaSlice<i32>,
    pair_scale: Option<&'a CudaSlice<f32>>,
    x: &'a CudaSlice<T>,
    dims: [i32; 3],
}

impl<'a, T: ActDtype> MoeArgs<'a, T> {
    fn new(
        experts: &'a DeviceExperts,
        expert_ids: &'a CudaSlice<i32>,
        pair_scale: Option<&'a CudaSlice<f32>>,
        x: &'a CudaSlice<T>,
        x_div: usize,
    ) -> Self {
        let first = &experts.experts[0];
        Self {
            experts,
            strip_rows: first.strip_rows(),
            expert_ids,
            pair_scale,
            x,
            dims: [
                x_div as i32,
                first.in_features as i32,
                first.out_features as i32,
            ],
        }
    }

    fn push(&self, b: &mut ExLaunch) {
        b.buf(&self.experts.table)
            .int(self.strip_rows)
            .buf(self.expert_ids);
        match self.pair_scale {
            Some(p) => b.buf(p),
            None => b.ptr(0),
        };
        b.buf(self.x)
            .int(self.dims[0])
            .int(self.dims[1])
            .int(self.dims[2]);
    }
}

/// Runs `launch` on consecutive chunks of at most `per_launch` rows of X (m x K) and Y (m x N).
fn for_row_chunks<T>(
    x: &CudaView<T>,
    (m, k, n): (usize, usize, usize),
    per_launch: usize,
    y: &mut CudaSlice<f32>,
    mut launch: impl FnMut(&CudaView<T>, usize, &mut CudaViewMut<f32>) -> Result<()>,
) -> Result<()> {
    let mut r0 = 0;
    while r0 < m {
        let rows = (m - r0).min(per_launch);
        let xv = x.slice(r0 * k..(r0 + rows) * k);
        let mut yv = y.slice_mut(r0 * n..(r0 + rows) * n);
        launch(&xv, rows, &mut yv)?;
        r0 += rows;
    }
    Ok(())
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

impl CudaDevice {
    /// Entry point `entry` of kernels/gptq.cu, from the module that holds it ([`gptq_source`]).
    pub(crate) fn gptq_function(&self, entry: &str) -> Result<cudarc::driver::CudaFunction> {
        self.function(gptq_source(entry), entry)
    }

    /// Entry point `entry` of kernels/gptq.cu for layer `w`: from the module of its tile-major
    /// entries ([`gptq_tile_source`]) where its words are tile-major, else [`Self::gptq_function`].
    fn layer_function(&self, w: &DeviceGptq, entry: &str) -> Result<cudarc::driver::CudaFunction> {
        if !w.tile_major() {
            return self.gptq_function(entry);
        }
        let source = gptq_tile_source(entry).ok_or_else(|| {
            unsupported(
                "kernel entry",
                entry,
                "has no build for tile-major words (a 3-bit layer's scalar GEMV, register-pipelined GEMV and dequantization have)",
            )
        })?;
        self.function(source, entry)
    }

    /// Copies a prepared layer to the device.
    pub fn upload_prepared(&self, p: &PreparedGptq) -> Result<DeviceGptq> {
        self.upload_prepared_as(p, GemvKernel::Auto)
    }

    /// Copies a prepared layer to the device for the given GEMV kernel (tests and `bench kernels`
    /// time both kernels on the same layer), in the layout [`auto_word_layout`] picks.
    pub fn upload_prepared_as(&self, p: &PreparedGptq, kernel: GemvKernel) -> Result<DeviceGptq> {
        self.upload_prepared_in(p, kernel, None)
    }

    /// Copies a prepared layer to the device as an expert of the fused MoE
    /// ([`CudaDevice::upload_experts`]), whose entries read strip-major words only.
    pub fn upload_expert_as(&self, p: &PreparedGptq, kernel: GemvKernel) -> Result<DeviceGptq> {
        self.upload_prepared_in(p, kernel, Some(WordLayout::StripMajor))
    }

    /// Copies a prepared layer to the device for the given GEMV kernel, with its words in `layout`
    /// where it is uploaded for the tensor cores (None: [`auto_word_layout`]'s choice; tile-major
    /// is an error at 4 and 8 bits, which have no entries for it).
    pub fn upload_prepared_in(
        &self,
        p: &PreparedGptq,
        kernel: GemvKernel,
        layout: Option<WordLayout>,
    ) -> Result<DeviceGptq> {
        let mma = match kernel {
            GemvKernel::Auto => auto_uses_mma(p),
            GemvKernel::Scalar => false,
            GemvKernel::TensorCore if mma_eligible(p) => true,
            GemvKernel::TensorCore => {
                let layer = layer_name(p.bits, p.in_features, p.out_features);
                return Err(unsupported(
                    "GEMV kernel",
                    format!("tensor-core for a {layer}"),
                    "needs N a multiple of 32, K at most 65536 with act-order, and, at 4 or 8 bits, K a multiple of 32 and one group per 32-row tile, or at 3 bits K and the groups multiples of 128 rows",
                ));
            }
        };
        let layout = layout.unwrap_or_else(|| auto_word_layout(p, mma));
        if layout == WordLayout::TileMajor && !(mma && p.bits == 3) {
            let layer = layer_name(p.bits, p.in_features, p.out_features);
            let kernel = if mma { "tensor-core" } else { "scalar GEMV" };
            return Err(unsupported(
                "word layout",
                format!("tile-major for a {layer} ({kernel})"),
                "only 3-bit layers uploaded for the tensor cores have entries for tile-major words",
            ));
        }
        Ok(DeviceGptq {
            bits: p.bits,
            in_features: p.in_features,
            out_features: p.out_features,
            groups: p.groups,
            qweight: if mma {
                self.upload(&to_mma_layout(&p.qweight, p.out_features, p.bits, layout))?
            } else {
                self.upload(&p.qweight)?
            },
            scales: self.upload(&p.scales)?,
            zeros: self.upload(&p.zeros)?,
            ugroup: self.upload(&p.ugroup)?,
            perm: p
                .perm
                .as_ref()
                .map(|v| self.upload(&perm_words(v, mma)))
                .transpose()?,
            layout: mma.then_some(layout),
            group_rows: uniform_group_rows(p) as i32,
        })
    }

    /// Checks, lays out and uploads one GPTQ layer.
    pub fn upload_gptq(&self, w: &GptqWeight) -> Result<DeviceGptq> {
        self.upload_prepared(&prepare(w)?)
    }

    /// Uploads the experts of one projection and their pointer table.
    pub fn upload_experts(&self, ws: Vec<DeviceGptq>) -> Result<DeviceExperts> {
        let first = ws
            .first()
            .ok_or_else(|| unsupported("experts", 0, "need at least one expert"))?;
        let (b, k, n) = (first.bits, first.in_features, first.out_features);
        let mut ptrs: Vec<u64> = Vec::with_capacity(ws.len() * 5);
        for e in &ws {
            if e.tile_major() {
                let layer = layer_name(e.bits, e.in_features, e.out_features);
                return Err(unsupported(
                    "experts",
                    format!("a {layer} with tile-major words"),
                    "the fused MoE reads strip-major words: upload experts with `upload_expert_as`",
                ));
            }
            if (e.bits, e.in_features, e.out_features, e.mma()) != (b, k, n, first.mma()) {
                return Err(unsupported(
                    "experts",
                    format!(
                        "{}-bit {}x{} (layout {}) beside {b}-bit {k}x{n} (layout {})",
                        e.bits,
                        e.in_features,
                        e.out_features,
                        e.strip_rows(),
                        first.strip_rows()
                    ),
                    "all experts of a projection must share bits, shape and packed layout (the same g_idx grouping)",
                ));
            }
            let s = self.stream();
            ptrs.push(e.qweight.device_ptr(s).0);
            ptrs.push(e.scales.device_ptr(s).0);
            ptrs.push(e.zeros.device_ptr(s).0);
            ptrs.push(e.ugroup.device_ptr(s).0);
            ptrs.push(e.perm.as_ref().map(|p| p.device_ptr(s).0).unwrap_or(0));
        }
        let table = self.upload(&ptrs)?;
        Ok(DeviceExperts { experts: ws, table })
    }

    /// The workspace, locked, with its split-K partial sums grown to `partial` floats and its
    /// counters to `counters` words (the GEMV and fused MoE launches; `Workspace::split_k` lends
    /// both).
    /// The device's shared workspace, locked (an error, not a panic, if an earlier call panicked
    /// while holding it).
    fn lock_workspace(&self) -> Result<std::sync::MutexGuard<'_, crate::cuda::device::Workspace>> {
        self.ws
            .lock()
            .map_err(|_| unsupported("workspace", "poisoned", "an earlier call panicked"))
    }

    fn split_k_workspace(
        &self,
        partial: usize,
        counters: usize,
    ) -> Result<std::sync::MutexGuard<'_, crate::cuda::device::Workspace>> {
        let mut ws = self.lock_workspace()?;
        ensure(self.stream(), &mut ws.partial, partial)?;
        ensure(self.stream(), &mut ws.counters, counters)?;
        Ok(ws)
    }

    /// Split-K plan of the scalar GEMV: (units per block, number of splits, dynamic shared memory
    /// bytes). The shared memory holds the staged X (or the warp reduction buffer, whichever is
    /// larger) and, for M ≤ 2, the cp.async ring of packed words (kernels/gptq.cu,
    /// `gemv_ring_offset_floats`). The grid aims at `blocks_per_sm` (default 4) blocks per SM, or
    /// fewer where the driver keeps fewer resident, rounding the split down so that it fits one wave.
    fn plan(
        &self,
        f: &cudarc::driver::CudaFunction,
        entry: &str,
        (units, tiles, mt, bits): (usize, usize, usize, u32),
    ) -> Result<(usize, usize, u32)> {
        let uk = unit_rows(bits);
        let (blocks_per_sm, min_units) = gemv_tuning();
        let split = |target: usize| {
            let want_split = (target / tiles).max(1);
            let mut ups = ceil_div(units, want_split).max(min_units.min(units));
            ups = ups.min((48 * 1024 / (mt * 4 * uk)).max(1));
            let nsplit = ceil_div(units, ups);
            let floats = (mt * ups * uk).max(GEMV_WARPS * mt * GEMV_COLS);
            let smem = floats.next_multiple_of(4) * 4 + ring_bytes(bits, mt);
            (ups, nsplit, smem as u32)
        };
        let first = split(self.sm_count() * blocks_per_sm);
        let resident = self.resident_blocks(f, entry, GEMV_THREADS, first.2 as usize)?;
        Ok(if resident > 0 && resident < blocks_per_sm {
            split(self.sm_count() * resident)
        } else {
            first
        })
    }

    /// Blocks of `threads` threads and `smem` dynamic shared bytes the driver keeps resident per SM
    /// (0 when `smem` is over the device's limit); cached per (function, threads, smem): entries of
    /// one name in two modules are two functions.
    pub(crate) fn resident_blocks(
        &self,
        f: &cudarc::driver::CudaFunction,
        entry: &str,
        threads: u32,
        smem: usize,
    ) -> Result<usize> {
        if smem > self.smem_optin() {
            return Ok(0);
        }
        let key = (f.cu_function() as usize, threads, smem);
        if let Some(r) = self
            .occupancy
            .lock()
            .ok()
            .and_then(|c| c.get(&key).copied())
        {
            return Ok(r);
        }
        Self::allow_smem(f, smem as u32, entry)?;
        let r = drv(
            format!("occupancy of {entry}"),
            f.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None),
        )? as usize;
        if let Ok(mut c) = self.occupancy.lock() {
            c.insert(key, r);
        }
        Ok(r)
    }

    /// Lets `f` use `smem` bytes of dynamic shared memory. Without the attribute, static and dynamic
    /// shared memory together are limited to 48 KiB, and the kernels declare about 1 KiB of static
    /// shared memory, so the attribute is set from 40 KiB on.
    pub(crate) fn allow_smem(
        f: &cudarc::driver::CudaFunction,
        smem: u32,
        entry: &str,
    ) -> Result<()> {
        if smem as usize > 40 * 1024 {
            drv(
                format!("allowing {smem} bytes of shared memory for {entry}"),
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                ),
            )?;
        }
        Ok(())
    }

    fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
        if got < expected {
            return Err(CudaError::BadInput {
                what,
                expected,
                got,
            });
        }
        Ok(())
    }

    /// Whether [`CudaDevice::qmatmul`] of `m` rows runs the GEMV (else dequantize + cuBLAS): up to
    /// [`GEMV_MAX_ROWS`] rows, and up to [`GEMV_MAX_ROWS_TENSOR_CORES`] on layers uploaded for the
    /// tensor cores with at least [`GEMV_MIN_WEIGHTS_TENSOR_CORES`] weights (act-order ones where
    /// X is put in sorted-row order first, [`prepermutes`]).
    pub fn qmatmul_uses_gemv(&self, w: &DeviceGptq, m: usize) -> bool {
        m <= GEMV_MAX_ROWS
            || (m <= GEMV_MAX_ROWS_TENSOR_CORES
                && w.mma()
                && (!w.act_order() || prepermutes(w, m, self.dependent_launch()))
                && w.in_features * w.out_features >= GEMV_MIN_WEIGHTS_TENSOR_CORES)
    }

    /// `y[M, N] = x[M, K] · dequant(w)`, picking the GEMV kernel for few rows
    /// ([`CudaDevice::qmatmul_uses_gemv`]) and dequantize + cuBLAS above.
    pub fn qmatmul<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w: &DeviceGptq,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if self.qmatmul_uses_gemv(w, m) {
            self.qmatmul_gemv(x, m, w, y)
        } else {
            self.qmatmul_gemm(x, m, w, y)
        }
    }

    /// The GEMV path for any M (one launch per 8 rows).
    pub fn qmatmul_gemv<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w: &DeviceGptq,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.gemv_rows(x, m, w, y, None)
    }

    /// The tensor-core GEMV for every launch, where [`CudaDevice::qmatmul_gemv`] would take the
    /// scalar kernel ([`gemv_on_tensor_cores`]): for tests. An error on a layer not uploaded for it.
    pub fn qmatmul_gemv_tensor_cores<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w: &DeviceGptq,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if !w.mma() {
            return Err(unsupported(
                "GEMV kernel",
                "tensor-core",
                "the layer was uploaded for the scalar kernel (row-major words)",
            ));
        }
        self.gemv_rows(x, m, w, y, Some(true))
    }

    /// The scalar GEMV (fp32 FFMA per weight) even where the tensor-core GEMV applies: the baseline
    /// `bench kernels` compares against.
    pub fn qmatmul_gemv_scalar<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w: &DeviceGptq,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.gemv_rows(x, m, w, y, Some(false))
    }

    /// One GEMV launch per [`gemv_launch_rows`] rows (`GEMV_ROWS_PER_LAUNCH` on the scalar
    /// kernel), on the tensor cores or the scalar kernel: `tensor_cores` forces one, None lets
    /// [`gemv_on_tensor_cores`] choose per launch. Act-order X is put in sorted-row order first
    /// where [`prepermutes`] says so, and the tensor-core launches then read it as is.
    fn gemv_rows<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w: &DeviceGptq,
        y: &mut CudaSlice<f32>,
        tensor_cores: Option<bool>,
    ) -> Result<()> {
        let (k, n) = (w.in_features, w.out_features);
        Self::check_len("qmatmul: x", m * k, x.len())?;
        Self::check_len("qmatmul: y", m * n, y.len())?;
        if tensor_cores != Some(false) && prepermutes(w, m, self.dependent_launch()) {
            let sorted = self.sorted_x(x, m, w)?;
            // SAFETY: f16 and bf16 are 2-byte values like u16, and `sorted` holds >= m·K of them.
            let xt = unsafe { sorted.transmute::<T>(m * k) }.ok_or_else(|| {
                unsupported(
                    "X permutation",
                    m * k,
                    "the workspace is smaller than M x K",
                )
            })?;
            let per_launch = gemv_launch_rows(w.mma(), w.bits, k);
            for_row_chunks(&xt, (m, k, n), per_launch, y, |xv, rows, yv| {
                self.mma_gemv_launch(xv, rows, w, yv, true)
            })?;
            // The buffer goes back to the workspace; the stream orders its next use after these
            // launches.
            if let Ok(mut ws) = self.ws.lock() {
                if ws.xperm.as_ref().is_none_or(|b| b.len() < sorted.len()) {
                    ws.xperm = Some(sorted);
                }
            }
            return Ok(());
        }
        let per_launch = if tensor_cores == Some(false) {
            GEMV_ROWS_PER_LAUNCH
        } else {
            gemv_launch_rows(w.mma(), w.bits, k)
        };
        for_row_chunks(&x.as_view(), (m, k, n), per_launch, y, |xv, rows, yv| {
            let tc = tensor_cores
                .unwrap_or_else(|| gemv_on_tensor_cores(w.mma(), w.bits, w.act_order(), k, rows));
            if tc {
                self.mma_gemv_launch(xv, rows, w, yv, false)
            } else {
                self.gemv_launch(xv, rows, w, yv)
            }
        })
    }

    /// Act-order X (m x K) in sorted-row order, by one `permute_x16` launch into the workspace's
    /// buffer, which leaves the workspace until the caller gives it back (the launches that read
    /// it lock the workspace themselves).
    fn sorted_x<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w: &DeviceGptq,
    ) -> Result<CudaSlice<u16>> {
        let k = w.in_features;
        let perm = w
            .perm
            .as_ref()
            .ok_or_else(|| unsupported("X permutation", "none", "the layer has no act-order"))?;
        let mut slot = self.lock_workspace()?.xperm.take();
        ensure(self.stream(), &mut slot, m * k)?;
        let mut xs = slot.unwrap_or_else(unreachable_ws);
        let f = self.gptq_function("permute_x16")?;
        let ki = k as i32;
        let cfg = LaunchConfig {
            grid_dim: (ceil_div(k, 256) as u32, m as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = ExLaunch::new(self.stream());
        b.buf(x).buf(perm).int(ki).buf_mut(&mut xs);
        // SAFETY: matches `permute_x16(const u16*, const int*, int, u16*)`; x holds m·K 2-byte
        // elements (checked by the caller), perm K indices below K (`prepare`), xs >= m·K; the
        // kernel reads only perm before `pdl_wait`.
        drv("launching permute_x16", unsafe {
            b.launch(&f, cfg, self.dependent_launch())
        })?;
        Ok(xs)
    }

    /// Whether this layer was uploaded for the tensor-core GEMV (strip-major words).
    pub fn uses_mma_gemv(&self, w: &DeviceGptq) -> bool {
        w.mma()
    }

    /// Whether [`CudaDevice::qmatmul`] runs the GEMV of `m` rows (m ≤ [`GEMV_MAX_ROWS`]) on the
    /// tensor cores ([`gemv_on_tensor_cores`]).
    pub fn gemv_uses_tensor_cores(&self, w: &DeviceGptq, m: usize) -> bool {
        prepermutes(w, m, self.dependent_launch())
            || gemv_on_tensor_cores(
                w.mma(),
                w.bits,
                w.act_order(),
                w.in_features,
                m.min(gemv_launch_rows(w.mma(), w.bits, w.in_features)),
            )
    }

    /// How [`CudaDevice::qmatmul`] launches the tensor-core GEMV of `m` rows of `T` on `w` (X as
    /// given, not put in order first), or None where that GEMV does not run on the tensor cores:
    /// what `mixtral-gptq bench reads` imitates with read-only launches.
    pub fn gemv_launch_shape<T: ActDtype>(
        &self,
        w: &DeviceGptq,
        m: usize,
    ) -> Result<Option<GemvLaunchShape>> {
        if m == 0 || !self.qmatmul_uses_gemv(w, m) || !self.gemv_uses_tensor_cores(w, m) {
            return Ok(None);
        }
        let c = self.mma_choice::<T>(w, m, false, None)?;
        let entry = c.gemv_entry::<T>(w);
        let f = self.layer_function(w, &entry)?;
        let threads = (c.plan.warps * 32) as u32;
        let resident = self.resident_blocks(&f, &entry, threads, c.plan.smem as usize)?;
        let tiles_in_flight = if c.direct {
            mmad_depth(w.bits, c.perm_slice, c.class)
        } else {
            mma_tuning().2 - 1
        };
        Ok(Some(GemvLaunchShape {
            entry,
            register_pipelined: c.direct,
            splits: c.plan.nsplit,
            tiles_per_warp: c.plan.tiles_per_warp,
            warps_per_block: c.plan.warps,
            blocks: c.plan.blocks,
            resident_blocks_per_sm: resident,
            tiles_in_flight,
        }))
    }

    /// Plan of one variant of the tensor-core GEMV (`direct`: the register-pipelined one), or None
    /// where no split fits in shared memory.
    /// The ring variant packs `MMA_WARPS` independent warps per block, each on its own (32-column
    /// strip, k-split); the register-pipelined one runs one block per strip with one warp per split
    /// (at most the entry's launch bound), its tiles per warp a multiple of its depth where whole
    /// blocks fit ([`mmad_tile_step`]). Each candidate split is costed as waves × (tiles per warp +
    /// a fixed cost per warp run, [`mma_tuning`]'s tiles' worth: staging X, the first loads, the
    /// split sum), the waves counted with the blocks the driver keeps resident with that plan's
    /// block size, registers and shared memory (X grows with tiles per warp and M); the cheapest
    /// wins, the larger split on ties. `moe_pairs` plans the fused MoE, whose grid repeats the strips for every pair
    /// (its y dimension): the waves count all pairs' blocks, and blocks have at least a
    /// [`MOE_MIN_WARPS_DIV`]th of the launch bound's warps where such a split exists.
    /// [`CudaDevice::mma_choice`] caches the outcome.
    fn mma_plan(
        &self,
        f: &cudarc::driver::CudaFunction,
        entry: &str,
        (k, n, m, bits, moe_pairs): (usize, usize, usize, u32, Option<usize>),
        (xblock_bytes, group_rows, direct, slice, class): (usize, usize, bool, bool, LayerClass),
    ) -> Result<Option<MmaPlan>> {
        let (ring_warps, run_cost, _) = mma_tuning();
        let (tiles, strips, sms) = (k / 32, n / 32, self.sm_count());
        // Candidates (splits, tiles per warp, warps per block, blocks). The register-pipelined
        // variant runs one block per strip with one warp per split; the ring variant packs
        // `MMA_WARPS` independent warps per block.
        let candidates: Vec<(usize, usize, usize, usize)> = if direct {
            let step = mmad_tile_step(k, bits, group_rows, (slice, class));
            // One warp per split, up to the entry's launch bound (`MMAD_MAX_WARPS*` in
            // kernels/gptq.cu, per bit width).
            let max_warps = drv(
                format!("launch bound of {entry}"),
                f.max_threads_per_block(),
            )? as usize
                / 32;
            let mut all: Vec<_> = (1..=max_warps.min(tiles))
                .filter_map(|ns| {
                    let tpw = ceil_div(tiles, ns).next_multiple_of(step);
                    // A split count whose last warps would get no tile is another count's plan.
                    (ceil_div(tiles, tpw) == ns).then_some((ns, tpw, ns, strips))
                })
                .collect();
            if moe_pairs.is_some() {
                let fewest = ceil_div(max_warps, MOE_MIN_WARPS_DIV);
                if all.iter().any(|c| c.2 >= fewest) {
                    all.retain(|c| c.2 >= fewest);
                }
            }
            all
        } else {
            let mut v = Vec::new();
            let mut last_ns = 0;
            for tpw in 1..=tiles {
                let ns = ceil_div(tiles, tpw);
                if ns != last_ns {
                    v.push((ns, tpw, ring_warps, ceil_div(strips * ns, ring_warps)));
                    last_ns = ns;
                }
            }
            v
        };
        let mut best: Option<((usize, usize), MmaPlan)> = None;
        for (ns, tpw, warps, blocks) in candidates {
            let smem =
                xblock_bytes + warps * mma_warp_smem(m, tpw, bits, group_rows, (direct, slice));
            let resident = self.resident_blocks(f, entry, (warps * 32) as u32, smem)?;
            if resident == 0 {
                continue;
            }
            let waves = ceil_div(blocks * moe_pairs.unwrap_or(1), resident * sms);
            let fixed = if direct {
                MMAD_RUN_COST_TILES
            } else {
                run_cost
            };
            let cost = (waves * (tpw + fixed), usize::MAX - ns);
            if best.is_none_or(|(c, _)| cost < c) {
                let plan = MmaPlan {
                    nsplit: ns,
                    tiles_per_warp: tpw,
                    warps,
                    blocks,
                    smem: smem as u32,
                    cost: cost.0,
                };
                best = Some((cost, plan));
            }
        }
        Ok(best.map(|(_, p)| p))
    }

    /// What a tensor-core GEMV launch of `m` rows on `w` runs: the register-pipelined variant where
    /// it applies, unless the ring variant's plan costs less (each with its own fixed run cost; the
    /// register-pipelined blocks hold all of X, M x K, so with large M x K few warps fit per strip),
    /// and whether each block copies act-order X to shared memory. `moe_pairs` plans the fused MoE's
    /// grid of that many pairs instead ([`CudaDevice::mma_plan`]), which only the
    /// register-pipelined variant runs. Cached per layer shape, M and pairs, so that a launch plans
    /// once.
    fn mma_choice<T: ActDtype>(
        &self,
        w: &DeviceGptq,
        m: usize,
        x_sorted: bool,
        moe_pairs: Option<usize>,
    ) -> Result<MmaChoice> {
        let (k, n, bits) = (w.in_features, w.out_features, w.bits);
        // (act-order X already in sorted-row order is planned as without act-order)
        let act_order = w.act_order() && !x_sorted;
        let key = (
            bits,
            T::NAME,
            k,
            n,
            m,
            w.group_rows,
            act_order,
            moe_pairs,
            w.tile_major(),
        );
        if let Some(c) = self.plans.lock().ok().and_then(|c| c.get(&key).copied()) {
            return Ok(c);
        }
        let group_rows = w.group_rows as usize;
        let planned = |direct: bool| -> Result<Option<MmaChoice>> {
            let slice = perm_slice(direct, act_order, (k, bits, group_rows), moe_pairs);
            let class = match LayerClass::of(
                direct,
                (k, n, m, bits, group_rows),
                (act_order, slice),
                moe_pairs,
                self.sm_count(),
            ) {
                // (the `_narrow` entries read strip-major words only: [`auto_word_layout`] keeps
                // such layers strip-major, but a caller may ask for tile-major)
                LayerClass::Narrow if w.tile_major() => LayerClass::Any,
                class => class,
            };
            // The plan reads the launch bound and residency of the entry that will run: the fused
            // MoE's own (its bound and registers can differ from the GEMV's at the same bits).
            let entry = match moe_pairs {
                Some(_) if direct => mmad_moe_entry::<T>(bits, (k, group_rows), (act_order, slice)),
                _ => mma_entry::<T>(direct, bits, (k, group_rows), (act_order, slice), class),
            };
            let f = self.layer_function(w, &entry)?;
            // Act-order with X small enough: each block copies X to shared memory for its gathers
            // (MMA_XBLOCK_MAX_BYTES, mmad_xblock_max_bytes).
            let x_bytes = (m * k * 2).next_multiple_of(16);
            let plan_with = |xblock_bytes: usize| {
                self.mma_plan(
                    &f,
                    &entry,
                    (k, n, m, bits, moe_pairs),
                    (xblock_bytes, group_rows, direct, slice, class),
                )
            };
            let (plan, xblock) = if !act_order {
                (plan_with(0)?, false)
            } else if !direct {
                let xblock = x_bytes <= MMA_XBLOCK_MAX_BYTES;
                (plan_with(if xblock { x_bytes } else { 0 })?, xblock)
            } else {
                let without = plan_with(0)?;
                let copied = match without {
                    Some(p)
                        if x_bytes <= MMA_XBLOCK_MAX_BYTES
                            || (p.warps >= MMAD_XBLOCK_MIN_WARPS
                                && x_bytes <= mmad_xblock_max_bytes()) =>
                    {
                        plan_with(x_bytes)?
                    }
                    _ => None,
                };
                match copied {
                    Some(p) => (Some(p), true),
                    None => (without, false),
                }
            };
            Ok(plan.map(|plan| MmaChoice {
                direct,
                gather: act_order,
                xblock,
                perm_slice: slice,
                class,
                plan,
            }))
        };
        // (3 bits: the register-pipelined variant only)
        let mut choice = if bits == 3 || mma_direct(group_rows) {
            planned(true)?
        } else {
            None
        };
        let ring = if !has_ring(bits) || moe_pairs.is_some() {
            None
        } else {
            planned(false)?
        };
        if let Some(ring) = ring {
            // (on a tie the register-pipelined variant stays)
            if choice.is_none_or(|c| ring.plan.cost < c.plan.cost) {
                choice = Some(ring);
            }
        }
        let choice = choice.ok_or_else(|| {
            unsupported(
                "tensor-core GEMV",
                format!("{k}x{n} at M = {m}"),
                "no split fits in the device's shared memory",
            )
        })?;
        if std::env::var_os(PLAN_TRACE_ENV).is_some() {
            eprintln!("tensor-core GEMV plan for {key:?}: {choice:?}");
        }
        if let Ok(mut c) = self.plans.lock() {
            c.insert(key, choice);
        }
        Ok(choice)
    }

    fn mma_gemv_launch<T: ActDtype>(
        &self,
        x: &CudaView<T>,
        m: usize,
        w: &DeviceGptq,
        y: &mut CudaViewMut<f32>,
        x_sorted: bool,
    ) -> Result<()> {
        let n = w.out_features;
        let strips = n / 32;
        let choice = self.mma_choice::<T>(w, m, x_sorted, None)?;
        let entry = choice.gemv_entry::<T>(w);
        let MmaChoice {
            direct,
            xblock,
            plan:
                MmaPlan {
                    nsplit,
                    tiles_per_warp: tpw,
                    warps,
                    blocks,
                    smem,
                    ..
                },
            ..
        } = choice;
        let f = self.layer_function(w, &entry)?;
        Self::allow_smem(&f, smem, &entry)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: ((warps * 32) as u32, 1, 1),
            shared_mem_bytes: smem,
        };
        // The ring variant's split partials meet in the split-K workspace; the register-pipelined
        // one adds its splits inside the block and takes null pointers there.
        let mut ws = if direct {
            None
        } else {
            Some(self.split_k_workspace(nsplit * 8 * n, strips)?)
        };
        let mut b = ExLaunch::new(self.stream());
        layer_x_args(&mut b, w, x_sorted, x, m);
        b.int(w.group_rows)
            .int(nsplit as i32)
            .int(tpw as i32)
            .int(xblock as i32);
        match ws.as_mut() {
            Some(ws) => {
                let (partial, counters) = ws.split_k();
                b.buf_mut(partial).buf_mut(counters)
            }
            None => b.ptr(0).ptr(0),
        };
        b.buf_mut(y);
        // SAFETY: argument types and order match `gptq_mma_gemv_*` and `gptq_mmad_gemv_*` in
        // kernels/gptq.cu; `w.mma()` guarantees (K, N multiples of 32, one group per 32-row tile); x holds
        // m·K and y m·N elements (checked by the caller); for the ring variant the workspaces were
        // grown to nsplit·8·N floats and N/32 counters; the register-pipelined variant has one block
        // of nsplit warps per strip and never reads the null workspace pointers. Only it is written
        // for dependent launch (`pdl_wait` before X, Y and the workspaces).
        let dependent = direct && self.dependent_launch();
        drv(format!("launching {entry}"), unsafe {
            b.launch(&f, cfg, dependent)
        })
    }

    fn gemv_launch<T: ActDtype>(
        &self,
        x: &CudaView<T>,
        m: usize,
        w: &DeviceGptq,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let mt = match m {
            1 => 1,
            2 => 2,
            3..=4 => 4,
            _ => 8,
        };
        let (k, n, bits) = (w.in_features, w.out_features, w.bits);
        let uk = unit_rows(bits);
        let units = k / uk;
        let tiles = ceil_div(n, GEMV_COLS);
        let entry = format!("gptq_gemv_{bits}b_{}_m{mt}", T::NAME);
        let f = self.layer_function(w, &entry)?;
        let (ups, nsplit, smem) = self.plan(&f, &entry, (units, tiles, mt, bits))?;
        Self::allow_smem(&f, smem, &entry)?;
        let mut ws = self.split_k_workspace(nsplit * mt * n, tiles)?;
        let mut b = ExLaunch::new(self.stream());
        layer_x_args(&mut b, w, false, x, m);
        let cfg = scalar_gemv_tail(&mut b, (tiles, nsplit, 1), smem, ups, &mut ws, y);
        // SAFETY: argument types and order match `gptq_gemv_*` in kernels/gptq.cu; buffer lengths were
        // checked above (x: m·K, y: m·N, workspaces grown to nsplit·MT·N and tiles); an ordinary
        // launch.
        drv(format!("launching {entry}"), unsafe {
            b.launch(&f, cfg, false)
        })
    }

    /// The GEMM path: dequantize into an f16 buffer (input-row order), convert bf16 X to f16, cuBLAS.
    /// For many calls on the same layer (layer-major evaluation), [`CudaDevice::prepare_dense`] +
    /// [`CudaDevice::dense_matmul`] do the dequantization once.
    pub fn qmatmul_gemm<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w: &DeviceGptq,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (k, n) = (w.in_features, w.out_features);
        Self::check_len("qmatmul: x", m * k, x.len())?;
        Self::check_len("qmatmul: y", m * n, y.len())?;
        let mut ws = self.lock_workspace()?;
        ensure(self.stream(), &mut ws.dense, k * n)?;
        let crate::cuda::device::Workspace { dense, xconv, .. } = &mut *ws;
        let dense = dense.as_mut().unwrap_or_else(unreachable_ws);
        self.dequant_into(w, dense)?;
        let w_ptr = dense.device_ptr(self.stream()).0;
        self.f16_weight_gemm(x, m, w_ptr, k, n, xconv, y)
    }

    /// Dequantizes `w` once into its own f16 `[K, N]` buffer (input-row order) for
    /// [`CudaDevice::dense_matmul`]: the cost of one `dequant` launch, paid once per layer.
    pub fn prepare_dense(&self, w: &DeviceGptq) -> Result<DenseLayer> {
        let (k, n) = (w.in_features, w.out_features);
        let mut out = self.zeros::<f16>(k * n)?;
        self.dequant_into(w, &mut out)?;
        Ok(DenseLayer {
            in_features: k,
            out_features: n,
            w: out,
        })
    }

    /// Dequantizes `w` again into an existing [`DenseLayer`] of the same shape (e.g. to time it).
    pub fn dequant_into_dense(&self, w: &DeviceGptq, d: &mut DenseLayer) -> Result<()> {
        if (d.in_features, d.out_features) != (w.in_features, w.out_features) {
            return Err(unsupported(
                "dense layer",
                format!("{}x{}", d.in_features, d.out_features),
                "must have the shape of the GPTQ layer",
            ));
        }
        self.dequant_into(w, &mut d.w)
    }

    /// `y[M, N] (f32) = x[M, K] · W` with W dequantized beforehand ([`CudaDevice::prepare_dense`]):
    /// cuBLAS f16 with fp32 accumulation, bf16 X converted to f16 first.
    pub fn dense_matmul<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        d: &DenseLayer,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (k, n) = (d.in_features, d.out_features);
        Self::check_len("dense_matmul: x", m * k, x.len())?;
        Self::check_len("dense_matmul: y", m * n, y.len())?;
        let mut ws = self.lock_workspace()?;
        let w_ptr = d.w.device_ptr(self.stream()).0;
        self.f16_weight_gemm(x, m, w_ptr, k, n, &mut ws.xconv, y)
    }

    /// cuBLAS on f16 weights at `w_ptr` (`[K, N]`), converting bf16 X to f16 in `xconv` first.
    #[allow(clippy::too_many_arguments)]
    fn f16_weight_gemm<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w_ptr: u64,
        k: usize,
        n: usize,
        xconv: &mut Option<CudaSlice<f16>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = self.stream();
        let x_ptr = if T::IS_BF16 {
            ensure(s, xconv, m * k)?;
            let xc = xconv.as_mut().unwrap_or_else(unreachable_ws);
            let f = self.gptq_function("convert_bf16_f16")?;
            let mut b = ExLaunch::new(s);
            b.buf(x).buf_mut(&mut *xc).size_t(m * k);
            let cfg = LaunchConfig {
                grid_dim: (
                    ceil_div(ceil_div(m * k, 8), 256).clamp(1, 65535 * 4) as u32,
                    1,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `convert_bf16_f16(const bf16*, half*, size_t)`; xc holds ≥ m·K elements;
            // both are starts of device allocations (16-byte aligned for the vector loads); the
            // kernel waits (`pdl_wait`) before it reads or writes anything.
            drv("launching convert_bf16_f16", unsafe {
                b.launch(&f, cfg, self.dependent_launch() && convert_dependent())
            })?;
            let p = xc.device_ptr(s).0;
            p
        } else {
            let p = x.device_ptr(s).0;
            p
        };
        self.gemm_f32_out(
            cublas_sys::cudaDataType::CUDA_R_16F,
            w_ptr,
            x_ptr,
            m,
            k,
            n,
            y,
        )
    }

    /// Dequantizes `w` into `out` (f16 `[K, N]`, input-row order).
    pub fn dequant_into(&self, w: &DeviceGptq, out: &mut CudaSlice<f16>) -> Result<()> {
        let (k, n, bits) = (w.in_features, w.out_features, w.bits);
        Self::check_len("dequantize: output", k * n, out.len())?;
        let entry = format!("gptq_dequant_{bits}b_f16");
        let f = self.layer_function(w, &entry)?;
        let mut b = ExLaunch::new(self.stream());
        layer_args(&mut b, w, false);
        b.int(k as i32).int(n as i32).buf_mut(out);
        let cfg = LaunchConfig {
            grid_dim: (ceil_div(n / 4, 256) as u32, (k / unit_rows(bits)) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `gptq_dequant_*`; out holds K·N elements; under dependent launch the
        // kernel reads only the layer's buffers (written by uploads) before `pdl_wait`.
        drv(format!("launching {entry}"), unsafe {
            b.launch(&f, cfg, self.dependent_launch() && dequant_dependent())
        })
    }

    /// `y[M, N] (f32) = x[M, K] · w[K, N]` through cuBLAS GemmEx, both operands of type `dtype`
    /// (row-major), fp32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm_f32_out(
        &self,
        dtype: cublas_sys::cudaDataType,
        w_ptr: u64,
        x_ptr: u64,
        m: usize,
        k: usize,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let alpha: f32 = 1.0;
        let beta: f32 = 0.0;
        let s = self.stream();
        let (y_ptr, _g) = y.device_ptr_mut(s);
        // Row-major Y = X·W is column-major Yᵀ[N, M] = Wᵀ[N, K] · Xᵀ[K, M].
        // SAFETY: pointers come from live buffers of at least K·N, M·K and M·N elements on this stream.
        unsafe {
            cublas_result::gemm_ex(
                *self.blas.handle(),
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w_ptr as *const _,
                dtype,
                n as i32,
                x_ptr as *const _,
                dtype,
                k as i32,
                &beta as *const f32 as *const _,
                y_ptr as *mut _,
                cublas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|source| CudaError::Cublas {
            what: format!("GemmEx {m}x{k}x{n}"),
            source,
        })
    }

    /// Dense reference product through cuBLAS: `y[M, N] (f32) = x[M, K] · w[K, N]` (row-major, same dtype).
    pub fn dense_gemm<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        m: usize,
        w: &CudaSlice<T>,
        k: usize,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        Self::check_len("dense_gemm: x", m * k, x.len())?;
        Self::check_len("dense_gemm: w", k * n, w.len())?;
        Self::check_len("dense_gemm: y", m * n, y.len())?;
        let dtype = if T::IS_BF16 {
            cublas_sys::cudaDataType::CUDA_R_16BF
        } else {
            cublas_sys::cudaDataType::CUDA_R_16F
        };
        let s = self.stream();
        let (wp, xp) = (w.device_ptr(s).0, x.device_ptr(s).0);
        self.gemm_f32_out(dtype, wp, xp, m, k, n, y)
    }

    /// Whether [`CudaDevice::moe_gemv`] on `experts` runs on the tensor cores (else the scalar fused
    /// kernel): see `moe_mma_choice`.
    pub fn moe_uses_tensor_cores<T: ActDtype>(&self, experts: &DeviceExperts) -> bool {
        self.moe_mma_choice::<T>(experts, 1).is_some()
    }

    /// The tensor-core plan of a fused MoE launch of `pairs` pairs: the register-pipelined plan for
    /// one row of the first expert, with the launch bound and residency of the `gptq_mmad_moe_*`
    /// entry that runs it and the waves of all pairs' blocks counted, used for every pair. None,
    /// and the scalar fused kernel, unless every expert was uploaded for the tensor cores with the
    /// same grouping and act-order, one row runs there ([`gemv_on_tensor_cores`]) and a
    /// register-pipelined plan fits. Groups of one tile (g32 at 4 and 8 bits) run their own entry,
    /// `gptq_mmadg_moe_*`.
    fn moe_mma_choice<T: ActDtype>(
        &self,
        experts: &DeviceExperts,
        pairs: usize,
    ) -> Option<MmaChoice> {
        let first = experts.experts.first()?;
        let (k, bits, rows) = (first.in_features, first.bits, first.group_rows);
        let uniform = experts
            .experts
            .iter()
            .all(|e| e.mma() && e.group_rows == rows && e.act_order() == first.act_order());
        if !uniform || !gemv_on_tensor_cores(true, bits, first.act_order(), k, 1) {
            return None;
        }
        // (a layer no plan fits keeps the scalar fused kernel, which reports any real fault itself)
        match self.mma_choice::<T>(first, 1, false, Some(pairs)) {
            Ok(c) if c.direct => Some(c),
            _ => None,
        }
    }

    /// One `gptq_mmad_moe_*` launch: block (strip, pair) of the register-pipelined GEMV, planned as
    /// one row of one expert over all pairs ([`CudaDevice::moe_mma_choice`]).
    fn mmad_moe_launch<T: ActDtype>(
        &self,
        args: &MoeArgs<'_, T>,
        pairs: usize,
        y: &mut CudaSlice<f32>,
        choice: MmaChoice,
    ) -> Result<()> {
        let first = &args.experts.experts[0];
        let bits = first.bits;
        let plan = choice.plan;
        let smem = plan.smem;
        let entry = mmad_moe_entry::<T>(
            bits,
            (first.in_features, first.group_rows as usize),
            (choice.gather, choice.perm_slice),
        );
        let f = self.gptq_function(&entry)?;
        Self::allow_smem(&f, smem, &entry)?;
        let cfg = LaunchConfig {
            grid_dim: (plan.blocks as u32, pairs as u32, 1),
            block_dim: ((plan.warps * 32) as u32, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut b = ExLaunch::new(self.stream());
        args.push(&mut b);
        b.int(first.group_rows)
            .int(plan.nsplit as i32)
            .int(plan.tiles_per_warp as i32)
            .int(choice.xblock as i32)
            .buf_mut(y);
        // SAFETY: matches `gptq_mmad_moe_*` and `gptq_mmadg_moe_*` in kernels/gptq.cu; the plan is
        // the register-pipelined one for one row of an expert of this shape, grouping and act-order
        // (one block per strip, nsplit warps, within this entry's launch bound), which every
        // expert shares (`moe_mma_choice`); every expert id must be < experts.len() (the caller's
        // routing guarantees it); lengths checked by `moe_gemv`. The kernel waits (`pdl_wait`)
        // before it reads the ids, scales or X and before it writes Y.
        drv(format!("launching {entry}"), unsafe {
            b.launch(&f, cfg, self.dependent_launch())
        })
    }

    /// Fused MoE GEMV: for each pair p < `pairs`, `y[p, :] = scale[p] · x[p / x_div, :] · W[ids[p]]`.
    /// With `x` the tokens `[T, K]` and `x_div` = top-k this runs the gate/up projections of every
    /// (token, expert slot); with `x` the per-pair intermediate and `x_div` = 1 (and the routing
    /// weights as `scale`) it runs the down projection. One launch; expert ids stay on the device.
    /// Experts uploaded for the tensor cores run the register-pipelined tensor-core GEMV, one block
    /// per (strip, pair) ([`CudaDevice::moe_uses_tensor_cores`]); others the scalar fused kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gemv<T: ActDtype>(
        &self,
        x: &CudaSlice<T>,
        x_div: usize,
        experts: &DeviceExperts,
        expert_ids: &CudaSlice<i32>,
        pair_scale: Option<&CudaSlice<f32>>,
        pairs: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let first = &experts.experts[0];
        let (k, n, bits) = (first.in_features, first.out_features, first.bits);
        let x_div = x_div.max(1);
        Self::check_len("moe_gemv: x", ceil_div(pairs, x_div) * k, x.len())?;
        Self::check_len("moe_gemv: expert_ids", pairs, expert_ids.len())?;
        Self::check_len("moe_gemv: y", pairs * n, y.len())?;
        if let Some(s) = pair_scale {
            Self::check_len("moe_gemv: pair_scale", pairs, s.len())?;
        }
        if pairs == 0 {
            return Ok(());
        }
        let args = MoeArgs::new(experts, expert_ids, pair_scale, x, x_div);
        if let Some(choice) = self.moe_mma_choice::<T>(experts, pairs) {
            return self.mmad_moe_launch(&args, pairs, y, choice);
        }
        let uk = unit_rows(bits);
        let units = k / uk;
        let tiles = ceil_div(n, GEMV_COLS);
        let entry = format!("gptq_moe_gemv_{bits}b_{}", T::NAME);
        let f = self.gptq_function(&entry)?;
        let (ups, nsplit, smem) = self.plan(&f, &entry, (units, tiles * pairs, 1, bits))?;
        Self::allow_smem(&f, smem, &entry)?;
        let mut ws = self.split_k_workspace(pairs * nsplit * n, pairs * tiles)?;
        let mut b = ExLaunch::new(self.stream());
        args.push(&mut b);
        let cfg = scalar_gemv_tail(&mut b, (tiles, nsplit, pairs), smem, ups, &mut ws, y);
        // SAFETY: matches `gptq_moe_gemv_*`; every expert id must be < experts.len() (the caller's
        // routing guarantees it); lengths checked above; an ordinary launch.
        drv(format!("launching {entry}"), unsafe {
            b.launch(&f, cfg, false)
        })
    }

    /// `y[t, :] = Σ_s yp[t·topk + s, :]` for `tokens` tokens (f32).
    pub fn moe_combine(
        &self,
        yp: &CudaSlice<f32>,
        topk: usize,
        tokens: usize,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        Self::check_len("moe_combine: yp", tokens * topk * n, yp.len())?;
        Self::check_len("moe_combine: y", tokens * n, y.len())?;
        let f = self.gptq_function("moe_combine_f32")?;
        let (tk, tt, nn) = (topk as i32, tokens as i32, n as i32);
        let mut b = self.stream().launch_builder(&f);
        b.arg(yp).arg(&tk).arg(&tt).arg(&nn).arg(y);
        let cfg = LaunchConfig {
            grid_dim: (ceil_div(tokens * n, 256).clamp(1, 65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `moe_combine_f32`; lengths checked above.
        drv(
            "launching moe_combine_f32",
            unsafe { b.launch(cfg) }.map(|_| ()),
        )
    }
}

#[cold]
fn unreachable_ws<T>() -> T {
    // `ensure` just filled the slot; reaching this is a bug, not a user error.
    panic!("workspace slot empty right after ensure()")
}

/// Shared handle type for callers that keep the device in several places.
pub type SharedDevice = Arc<CudaDevice>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::GPTQ;
    use crate::cuda::random::random_gptq;
    use crate::qlinear::unpack_rows;

    /// The host plans and lays out for the kernels' defaults of the defines it reads (the
    /// `_gather_slice` entries' shared memory from `MMAD_PERM16`, the splits from the depths, the
    /// tile-major words), so they must be the kernel source's.
    #[test]
    fn host_defaults_are_the_kernel_sources() {
        let defaults = MMAD_DEPTH_DEFAULTS
            .iter()
            .copied()
            .chain([("MMAD_PERM16", MMAD_PERM16_DEFAULT)]);
        for (name, host) in defaults {
            let prefix = format!("#define {name} ");
            let line = GPTQ
                .src
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("kernels/gptq.cu defines {name}"));
            let value: usize = line.split_whitespace().next().unwrap().parse().unwrap();
            assert_eq!(value, host, "{name}");
        }
    }

    /// The entries for narrow and for tall layers, and for several rows, run where they were
    /// measured faster. Narrow: plain GEMVs of one row (3 bits: up to 4) on at most 64 strips with K
    /// at most 4096, and act-order slices. Tall: plain 4-bit GEMVs of up to 4 rows
    /// with K above 8192 and at most one strip per SM. Rows: plain 8-bit GEMVs of more than one row.
    /// None for the fused MoE, groups of one tile or the ring variant; no tall or rows one for
    /// act-order gathered inside.
    #[test]
    fn layer_classes_where_measured_faster() {
        use LayerClass::{Any as A, Narrow as N, Rows as R, Tall as T};
        let sms = 132;
        let class = |bits: u32, (k, n, m): (usize, usize, usize), group_rows: usize, act: bool| {
            let slice = perm_slice(true, act, (k, bits, group_rows), None);
            LayerClass::of(true, (k, n, m, bits, group_rows), (act, slice), None, sms)
        };
        // (K, N, M), group rows, act-order, and the class at 3, 4 and 8 bits.
        let cases = [
            ((4096, 1024, 1), 128, false, [N; 3]),
            ((4096, 2048, 1), 128, false, [N; 3]),
            ((4096, 1024, 1), 4096, false, [N; 3]),
            ((4096, 3072, 1), 128, false, [A; 3]),
            ((4096, 4096, 1), 128, false, [A; 3]),
            ((4096, 1024, 4), 128, false, [N, A, R]),
            ((4096, 1024, 8), 128, false, [A, A, R]),
            ((4096, 1024, 4), 32, false, [N, A, A]),
            ((4096, 14336, 2), 128, false, [A, A, R]),
            ((4096, 14336, 4), 128, true, [A; 3]),
            ((4096, 1024, 1), 128, true, [N; 3]),
            ((4096, 1024, 1), 32, false, [N, A, A]),
            ((14336, 4096, 1), 128, false, [A, T, A]),
            ((14336, 4096, 4), 128, false, [A, T, R]),
            ((14336, 4096, 1), 14336, false, [A, T, A]),
            ((14336, 1024, 1), 128, false, [A, T, A]),
            ((16384, 4224, 1), 128, false, [A, T, A]),
            ((8192, 4096, 1), 128, false, [A; 3]),
            ((14336, 4096, 8), 128, false, [A, A, R]),
            ((14336, 4096, 1), 128, true, [A; 3]),
            ((14336, 4096, 1), 32, false, [A; 3]),
            ((14336, 4256, 1), 128, false, [A; 3]),
            ((4096, 14336, 1), 128, false, [A; 3]),
        ];
        for (shape, group_rows, act, want) in cases {
            for (bits, want) in [3, 4, 8].into_iter().zip(want) {
                let got = class(bits, shape, group_rows, act);
                assert_eq!(got, want, "{bits}-bit {shape:?} g{group_rows} act {act}");
            }
        }
        for (bits, layer, m) in [
            (3, (4096, 1024), 1),
            (4, (4096, 1024), 1),
            (8, (4096, 1024), 1),
            (8, (4096, 1024), 4),
            (4, (14336, 4096), 1),
        ] {
            let layer = (layer.0, layer.1, m, bits, 128);
            for (direct, moe) in [(true, Some(2)), (false, None)] {
                let got = LayerClass::of(direct, layer, (false, false), moe, sms);
                assert_eq!(
                    got, A,
                    "{bits}-bit {layer:?}, register-pipelined {direct}, MoE {moe:?}"
                );
            }
        }
        let entry = |bits, k, act, class| {
            let slice = perm_slice(true, act, (k, bits, 128), None);
            mma_entry::<f16>(true, bits, (k, 128), (act, slice), class)
        };
        assert_eq!(
            entry(3, 4096, true, N),
            "gptq_mmad_gemv_3b_f16_gather_slice_narrow"
        );
        assert_eq!(
            entry(8, 4096, true, A),
            "gptq_mmad_gemv_8b_f16_gather_slice"
        );
        assert_eq!(entry(4, 14336, false, T), "gptq_mmad_gemv_4b_f16_tall");
        assert_eq!(entry(8, 4096, false, R), "gptq_mmad_gemv_8b_f16_rows");
    }

    /// The permutation's device words: the i32 indices, then on the tensor cores the same indices
    /// as u16, two a word with the lower half first (what `Idx8<unsigned short>` in
    /// kernels/gptq.cu reads), for K even or odd; the scalar kernels get the i32 indices only.
    #[test]
    fn perm_words_append_the_u16_copy() {
        for k in [1usize, 7, 96, 4096, 14336, PERM16_MAX_K] {
            let perm: Vec<i32> = (0..k as i32).rev().map(|i| (i * 7919) % k as i32).collect();
            assert_eq!(perm_words(&perm, false), perm, "k {k}");
            let words = perm_words(&perm, true);
            assert_eq!(words.len(), k + k.div_ceil(2), "k {k}");
            assert_eq!(&words[..k], &perm[..], "k {k}");
            let halves: Vec<u32> = words[k..]
                .iter()
                .flat_map(|&w| [w as u32 & 0xffff, w as u32 >> 16])
                .collect();
            for (i, &p) in perm.iter().enumerate() {
                assert_eq!(halves[i] as i32, p, "k {k}, index {i}");
            }
        }
    }

    /// Act-order layers whose indices do not fit the u16 copy stay on the scalar kernel.
    #[test]
    fn act_order_past_the_u16_indices_is_not_on_tensor_cores() {
        let w = random_gptq(4, 128, 256, 32, true, 3);
        let mut p = prepare(&w).unwrap();
        assert!(mma_eligible(&p));
        p.in_features = PERM16_MAX_K + 128;
        assert!(!mma_eligible(&p));
        p.perm = None;
        p.ugroup = vec![0; p.in_features / unit_rows(4)];
        assert!(mma_eligible(&p));
    }

    /// The sorted layout holds the same codes: sorted row i is input row perm[i], and every unit
    /// lies in one group, for act-order and plain layers at every bit width.
    #[test]
    fn prepare_sorts_rows_by_group_and_keeps_codes() {
        for (bits, gs, k, n, act) in [
            (4, 32, 256, 24, true),
            (3, 64, 256, 64, true),
            (8, 16, 96, 12, true),
            (4, 128, 256, 16, false),
            (3, -1, 96, 32, false),
        ] {
            let w = random_gptq(bits, gs, k, n, act, 7);
            w.check().unwrap();
            let p = prepare(&w).unwrap();
            assert_eq!(p.perm.is_some(), act, "bits {bits} gs {gs}");
            let words: Vec<i32> = p.qweight.iter().map(|&v| v as i32).collect();
            let sorted = unpack_rows(&words, k, n, bits);
            let orig = w.unpack_codes();
            let uk = unit_rows(bits);
            for i in 0..k {
                let src = p.perm.as_ref().map(|v| v[i] as usize).unwrap_or(i);
                assert_eq!(
                    &sorted[i * n..(i + 1) * n],
                    &orig[src * n..(src + 1) * n],
                    "row {i}"
                );
                assert_eq!(p.ugroup[i / uk], w.g_idx[src], "group of sorted row {i}");
            }
        }
    }

    /// The tensor-core GEMV takes 4- and 8-bit layers whose 32-row tiles each lie in one group
    /// (after the act-order sort) with K and N multiples of 32, and 3-bit layers with K and uniform
    /// groups multiples of 128 rows; everything else keeps the scalar one.
    #[test]
    fn mma_eligibility() {
        for (bits, gs, k, n, act, want) in [
            (4, 128, 256, 64, true, true),
            (4, 32, 256, 64, true, true),
            (4, -1, 96, 32, false, true),
            (8, 64, 256, 96, true, true),
            (8, 32, 128, 32, false, true),
            (4, 16, 256, 64, true, false),   // two groups per tile
            (8, 24, 96, 32, false, false),   // a group boundary inside a tile
            (4, 128, 256, 40, false, false), // N not a multiple of 32
            (4, -1, 72, 32, false, false),   // K not a multiple of 32
            (3, 128, 256, 64, false, true),
            (3, -1, 384, 32, true, true),
            (3, 256, 512, 32, true, true),
            (3, 32, 256, 64, false, false), // 3 bits: groups smaller than a super-tile
            (3, 128, 160, 64, false, false), // 3 bits: K not a multiple of 128
            (3, -1, 96, 64, false, false),
        ] {
            let w = random_gptq(bits, gs, k, n, act, 3);
            assert_eq!(
                mma_eligible(&prepare(&w).unwrap()),
                want,
                "{bits}-bit g{gs} {k}x{n} act={act}"
            );
        }
        // The automatic choice: every bit width at Mixtral's K, groups of 128.
        for (bits, k, act, want) in [
            (4, 4096, true, true),
            (4, 14336, false, true),
            (4, 14336, true, true),
            (8, 4096, false, true),
            (8, 14336, true, true),
            (3, 4096, false, true),
            (3, 14336, true, true),
        ] {
            let w = random_gptq(bits, 128, k, 64, act, 4);
            assert_eq!(
                auto_uses_mma(&prepare(&w).unwrap()),
                want,
                "{bits}-bit K={k} act={act}"
            );
        }
        // Per launch: act-order with K above 8192 leaves the tensor cores above 4 rows, and 3 bits
        // above M x K = 4 x 14336.
        for (mma, bits, act, k, rows, want) in [
            (true, 4, true, 14336, 1, true),
            (true, 4, true, 14336, 4, true),
            (true, 4, true, 14336, 5, false),
            (true, 8, true, 14336, 8, false),
            (true, 4, true, 4096, 8, true),
            (true, 8, false, 14336, 8, true),
            (false, 4, false, 4096, 1, false),
            (true, 3, false, 14336, 4, true),
            (true, 3, false, 14336, 5, false),
            (true, 3, false, 4096, 8, true),
            (true, 3, true, 4096, 8, true),
        ] {
            assert_eq!(
                gemv_on_tensor_cores(mma, bits, act, k, rows),
                want,
                "mma={mma} {bits}-bit act={act} K={k} rows={rows}"
            );
        }
        // Rows per launch: 8, but at 3 bits on the tensor cores at most M x K = 4 x 14336.
        for (mma, bits, k, want) in [
            (true, 4, 14336, 8),
            (true, 3, 14336, 4),
            (true, 3, 4096, 8),
            (false, 3, 14336, 8),
            (true, 3, 1 << 20, 1),
        ] {
            assert_eq!(
                gemv_launch_rows(mma, bits, k),
                want,
                "mma={mma} {bits}-bit K={k}"
            );
        }
    }

    /// Strip-major words: strip s, row r, column j is row-major (r, 32 s + j).
    #[test]
    fn uniform_groups() {
        for (bits, gs, k, act, want) in [
            (4, 128, 512, false, 128),
            (4, 128, 512, true, 128),
            (8, 32, 256, true, 32),
            (4, -1, 96, false, 96),
            (3, 128, 256, false, 128),
        ] {
            let w = random_gptq(bits, gs, k, 32, act, 11);
            assert_eq!(
                uniform_group_rows(&prepare(&w).unwrap()),
                want,
                "{bits}-bit g{gs} act={act}"
            );
        }
        // Groups of 64 and 32 rows, or ids that skip a group: not uniform.
        let mut w = random_gptq(4, 32, 128, 32, false, 12);
        w.g_idx = (0..128).map(|i| if i < 64 { 0 } else { i / 32 }).collect();
        assert_eq!(uniform_group_rows(&prepare(&w).unwrap()), 0);
        w.g_idx = (0..128).map(|i| if i < 96 { i / 32 } else { 3 }).collect();
        assert_eq!(uniform_group_rows(&prepare(&w).unwrap()), 32);
        w.g_idx = (0..128).map(|i| i / 32 * 2 % 4).collect();
        assert_eq!(uniform_group_rows(&prepare(&w).unwrap()), 0);
    }

    /// The slots the host lays out are the kernels' (`qw_slot_rows`): 4, 8 and 12 packed rows.
    #[test]
    fn slot_rows_are_the_kernels() {
        assert_eq!([3, 4, 8].map(slot_rows), [12, 4, 8]);
    }

    /// Tile-major words where measured faster: 3-bit tensor-core layers that never run the
    /// `_narrow` entries (more than 64 strips, or K above 4096); strip-major for narrow-capable
    /// 3-bit layers, other widths and scalar-kernel layers.
    #[test]
    fn tile_major_where_never_narrow() {
        let layout = |bits, gs, k, n| {
            let p = prepare(&random_gptq(bits, gs, k, n, false, 3)).unwrap();
            auto_word_layout(&p, mma_eligible(&p))
        };
        let (tile, strip) = (WordLayout::TileMajor, WordLayout::StripMajor);
        assert_eq!(layout(3, 128, 128, 2080), tile, "65 strips");
        assert_eq!(layout(3, -1, 4224, 32), tile, "K above 4096");
        assert_eq!(
            layout(3, 128, 128, 2048),
            strip,
            "64 strips, K = 128: narrow at M = 1"
        );
        assert_eq!(layout(3, 128, 4096, 1024), strip, "k and v");
        assert_eq!(layout(3, 32, 128, 2080), strip, "3-bit g32: scalar kernel");
        assert_eq!(layout(4, 128, 128, 2080), strip, "4 bits");
        assert_eq!(layout(8, 128, 128, 2080), strip, "8 bits");
    }

    #[test]
    fn tile_major_layout() {
        let (rows, n, sr) = (24, 96, 12);
        let q: Vec<u32> = (0..rows * n).map(|i| i as u32 * 7 + 1).collect();
        let t = to_tile_major(&q, n, sr);
        for r in 0..rows {
            for c in 0..n {
                let at = ((r / sr) * (n / 32) + c / 32) * sr * 32 + (r % sr) * 32 + c % 32;
                assert_eq!(t[at], q[r * n + c], "row {r} column {c}");
            }
        }
    }

    #[test]
    fn strip_major_layout() {
        let (rows, n) = (5, 96);
        let q: Vec<u32> = (0..rows * n).map(|i| i as u32 * 7 + 1).collect();
        let t = to_strip_major(&q, n);
        for s in 0..n / 32 {
            for r in 0..rows {
                for j in 0..32 {
                    assert_eq!(t[(s * rows + r) * 32 + j], q[r * n + s * 32 + j]);
                }
            }
        }
    }

    /// A group that splits a packed unit cannot be sorted into whole units: a named error.
    #[test]
    fn groups_smaller_than_a_unit_are_rejected() {
        let w = random_gptq(4, 4, 64, 8, true, 1);
        let e = prepare(&w).unwrap_err().to_string();
        assert!(e.contains("g_idx"), "{e}");
    }
}
