//! Layer-major perplexity evaluation on one GPU: the hidden states of every window stay resident
//! (f32), and the model goes through them one layer at a time, so that only one layer's weights
//! are on the device and each expert's GEMMs see every token routed to it (M ≈ tokens · k / E).
//!
//! This is GPTQ's own `llama_eval` order (IST-DASLab/gptq `llama.py`), with the products on tensor
//! cores: per layer, GPTQ tensors are uploaded packed and dequantized on the device (f16, straight
//! from `g_idx`, so act-order needs no sorting), dense weights are uploaded as bf16, and cuBLAS
//! `GemmEx` runs f16/bf16 × f16/bf16 with f32 accumulation and f32 output. Everything between the
//! products (RMSNorm, router, RoPE, attention, SwiGLU, scatter-add, NLL) is a kernel of
//! `runtime/kernels/eval.cu`; residual adds happen in f32 (`o_proj` with β = 1, experts by a
//! weighted scatter-add into the hidden states).
//!
//! Numerics against the f32 CPU reference (`crate::mixtral`): GEMM operands are rounded to
//! 16 bits, attention runs on f16 tensor cores with f32 accumulation; the router, RoPE, norms and
//! softmaxes are f32 as on the CPU.

use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{result as cublas_result, sys as cublas_sys};
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};
use rayon::prelude::*;

use super::device::CudaDevice;
use super::error::{drv, CudaError, Result as CudaResult};
use super::kernels::KernelSource;
use crate::backend::check_ids;
use crate::config::MixtralConfig;
use crate::error::{Error, Result};
use crate::load::Checkpoint;
use crate::qlinear::GptqWeight;

/// The kernels of this module.
pub const EVAL: KernelSource = KernelSource {
    name: "eval",
    src: concat!(
        include_str!("../../kernels/rows.cuh"),
        "#line 1 \"eval.cu\"\n",
        include_str!("../../kernels/eval.cu")
    ),
};

/// Threads per block of the row kernels (the RMSNorm kernel's shared arrays assume 256).
const ROW_THREADS: u32 = 256;
/// Query rows per block of the reference attention kernel (`ATT_WARPS` in eval.cu).
const ATT_WARPS: usize = 16;
/// Keys per tile of the reference attention kernel (`ATT_TILE` in eval.cu).
const ATT_TILE: usize = 32;
/// Queries per block of the tensor-core attention kernel (`TC_Q` in eval.cu).
const TC_Q: usize = 64;
/// Head widths the tensor-core attention kernel is instantiated for.
const TC_HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Most experts the router kernel handles (its per-thread probability array).
const MAX_EXPERTS: usize = 64;
/// Most experts per token the router kernel handles.
const MAX_TOP_K: usize = 8;

/// The 16-bit type of a GEMM's operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// IEEE half: dequantized GPTQ weights (their f16 scales times small integers stay exact to
    /// rounding).
    F16,
    /// bfloat16: dense checkpoint weights (bf16 on disk).
    Bf16,
}

impl Half {
    fn suffix(self) -> &'static str {
        match self {
            Half::F16 => "f16",
            Half::Bf16 => "bf16",
        }
    }
    fn cublas(self) -> cublas_sys::cudaDataType {
        match self {
            Half::F16 => cublas_sys::cudaDataType::CUDA_R_16F,
            Half::Bf16 => cublas_sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

/// A device buffer of 16-bit values of one [`Half`] type.
#[derive(Debug)]
pub struct HalfBuf {
    /// The values' bits.
    pub buf: CudaSlice<u16>,
    /// Their type.
    pub dtype: Half,
}

/// GPTQ v1 tensors of one linear layer on the device, exactly as stored in the checkpoint.
#[derive(Debug)]
pub struct PackedGptq {
    /// Bits per code (2, 3, 4 or 8).
    pub bits: u32,
    /// K.
    pub in_features: usize,
    /// N.
    pub out_features: usize,
    qweight: CudaSlice<i32>,
    qzeros: CudaSlice<i32>,
    scales: CudaSlice<f16>,
    g_idx: CudaSlice<i32>,
}

/// One linear layer of a [`DeviceLayer`].
#[derive(Debug, Clone)]
pub enum DeviceLinear {
    /// Dense `[out, in]` weight (bf16).
    Dense {
        /// The weight.
        w: Arc<HalfBuf>,
        /// N.
        out_features: usize,
        /// K.
        in_features: usize,
    },
    /// Packed GPTQ tensors, dequantized per layer.
    Gptq(Arc<PackedGptq>),
}

impl DeviceLinear {
    fn shape(&self) -> (usize, usize) {
        match self {
            DeviceLinear::Dense {
                out_features,
                in_features,
                ..
            } => (*out_features, *in_features),
            DeviceLinear::Gptq(p) => (p.out_features, p.in_features),
        }
    }
}

/// The weights of one decoder layer on the device, before dequantization.
#[derive(Debug, Clone)]
pub struct DeviceLayer {
    /// `[hidden]`.
    pub input_layernorm: Arc<CudaSlice<f32>>,
    /// `[hidden]`.
    pub post_attention_layernorm: Arc<CudaSlice<f32>>,
    /// Router `[experts, hidden]`, f32.
    pub gate: Arc<CudaSlice<f32>>,
    /// q, k, v, o projections.
    pub attn: [DeviceLinear; 4],
    /// `[w1, w2, w3]` per expert.
    pub experts: Vec<[DeviceLinear; 3]>,
}

/// Embedding, final norm and `lm_head` on the device.
#[derive(Debug)]
pub struct DeviceHead {
    /// `[vocab, hidden]` f32 (dropped after the embedding lookup).
    pub embed: CudaSlice<f32>,
    /// `[hidden]`.
    pub norm: CudaSlice<f32>,
    /// `[vocab, hidden]`.
    pub lm_head: HalfBuf,
}

/// A linear layer read from a checkpoint on the host (a helper thread reads the next layer
/// while the GPU works on the current one).
#[derive(Debug)]
pub enum HostLinear {
    /// `[out, in]` as bf16 bits.
    Dense {
        /// N.
        out_features: usize,
        /// K.
        in_features: usize,
        /// Row-major bf16 bits.
        w: Vec<u16>,
    },
    /// GPTQ tensors as stored.
    Gptq(GptqWeight),
}

/// One decoder layer read from a checkpoint on the host.
#[derive(Debug)]
pub struct HostLayer {
    input_layernorm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    gate: Vec<f32>,
    attn: Vec<HostLinear>,
    experts: Vec<Vec<HostLinear>>,
}

/// Which attention kernel to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Tensor cores (WMMA, f16) when the head width is 32, 64 or 128, else the reference.
    Auto,
    /// The f32 CUDA-core kernel (online softmax, one query row per warp).
    Reference,
}

/// Knobs of [`evaluate_windows`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Tokens per chunk (whole windows; a longer window is a chunk of its own): bounds the
    /// activation buffers (q/k/v, router) and the rows per routing round trip.
    pub chunk_tokens: usize,
    /// Rows per expert GEMM call (bounds the `[rows, 2·intermediate]` f32 buffer).
    pub moe_rows: usize,
    /// Rows per `lm_head` GEMM (bounds the `[rows, vocab]` f32 logits).
    pub head_rows: usize,
    /// Attention kernel.
    pub attention: AttentionKernel,
    /// Record CUDA events between phases (adds a few µs per phase).
    pub phase_timing: bool,
    /// Download the logits of this window (for comparisons with the CPU).
    pub keep_logits_of: Option<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            chunk_tokens: 65_536,
            moe_rows: 32_768,
            head_rows: 4096,
            attention: AttentionKernel::Auto,
            phase_timing: false,
            keep_logits_of: None,
        }
    }
}

/// Where the time of an evaluation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Host-to-device copies of weights (and waiting for the reader thread).
    Load,
    /// Dequantizing GPTQ tensors.
    Dequant,
    /// Embedding lookup.
    Embed,
    /// RMSNorms (with the router logits after attention).
    Norm,
    /// q/k/v and o projections.
    AttnGemm,
    /// RoPE and the f16 copy of q/k/v.
    Rope,
    /// Attention.
    Attention,
    /// Top-k routing, the host round trip that groups tokens per expert.
    Route,
    /// Expert GEMMs (w1, w3, w2).
    MoeGemm,
    /// Gathers, SwiGLU, weighted scatter-add.
    MoeOther,
    /// Final norm, `lm_head`, NLL.
    Head,
}

impl Phase {
    /// Every phase, in report order.
    pub const ALL: [Phase; 11] = [
        Phase::Load,
        Phase::Dequant,
        Phase::Embed,
        Phase::Norm,
        Phase::AttnGemm,
        Phase::Rope,
        Phase::Attention,
        Phase::Route,
        Phase::MoeGemm,
        Phase::MoeOther,
        Phase::Head,
    ];
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Load => "load",
            Phase::Dequant => "dequant",
            Phase::Embed => "embed",
            Phase::Norm => "norm+router",
            Phase::AttnGemm => "qkv/o GEMMs",
            Phase::Rope => "rope",
            Phase::Attention => "attention",
            Phase::Route => "routing",
            Phase::MoeGemm => "expert GEMMs",
            Phase::MoeOther => "gather/SwiGLU/scatter",
            Phase::Head => "head+NLL",
        }
    }
}

/// The result of [`evaluate_windows`].
#[derive(Debug, Clone)]
pub struct EvalOutput {
    /// Per window, the `len − 1` NLLs of `window[t+1]` given `window[..=t]`.
    pub nll: Vec<Vec<f32>>,
    /// Milliseconds per [`Phase`] (GPU time between events; all zero without `phase_timing`).
    pub phase_ms: Vec<(Phase, f64)>,
    /// Milliseconds of each decoder layer (GPU events, dequantization included).
    pub layer_ms: Vec<f64>,
    /// Wall-clock milliseconds of the whole evaluation (embedding to NLLs on the host).
    pub total_ms: f64,
    /// Logits `[len, vocab]` of the window asked for in [`EvalOptions::keep_logits_of`].
    pub logits: Option<Vec<f32>>,
}

/// Phase timing with a pool of events: each lap attributes the GPU time since the previous
/// lap to a phase.
struct Clock {
    on: bool,
    events: Vec<CudaEvent>,
    marks: Vec<(Phase, usize)>,
    totals: [f64; 11],
}

impl Clock {
    fn new(dev: &CudaDevice, on: bool) -> Result<Self> {
        let mut c = Clock {
            on,
            events: Vec::new(),
            marks: Vec::new(),
            totals: [0.0; 11],
        };
        if on {
            c.events.push(dev.timing_event()?);
            drv("recording an event", c.events[0].record(dev.stream()))?;
            c.marks.push((Phase::Load, 0));
        }
        Ok(c)
    }
    fn lap(&mut self, dev: &CudaDevice, phase: Phase) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        let i = self.marks.len();
        if i == self.events.len() {
            self.events.push(dev.timing_event()?);
        }
        drv("recording an event", self.events[i].record(dev.stream()))?;
        self.marks.push((phase, i));
        Ok(())
    }
    /// After a synchronization: adds the finished laps to the totals.
    fn collect(&mut self) -> Result<()> {
        if !self.on || self.marks.len() < 2 {
            return Ok(());
        }
        for w in self.marks.windows(2) {
            let (a, (phase, b)) = (w[0].1, w[1]);
            let ms = drv(
                "reading an event",
                self.events[a].elapsed_ms(&self.events[b]),
            )?;
            self.totals[Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0)] += ms as f64;
        }
        let last = self.marks.len() - 1;
        self.events.swap(0, self.marks[last].1);
        self.marks.clear();
        self.marks.push((Phase::Load, 0));
        Ok(())
    }
}

fn launch_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |source| {
        Error::Cuda(CudaError::Driver {
            what: format!("launching `{what}`"),
            source,
        })
    }
}

fn unsupported(field: &'static str, value: impl ToString, reason: &'static str) -> Error {
    Error::Cuda(CudaError::Unsupported {
        field,
        value: value.to_string(),
        reason,
    })
}

fn ptr<T>(dev: &CudaDevice, s: &CudaSlice<T>) -> u64 {
    s.device_ptr(dev.stream()).0
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(ROW_THREADS as usize).clamp(1, 65_535 * 16) as u32,
            1,
            1,
        ),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An uninitialised device buffer (every use writes it before reading).
fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the callers write every element they later read.
    Ok(drv(format!("allocating {n} elements"), unsafe {
        dev.stream().alloc::<T>(n.max(1))
    })?)
}

fn upload<T: DeviceRepr>(dev: &CudaDevice, v: &[T]) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        return alloc(dev, 1);
    }
    Ok(dev.upload(v)?)
}

/// Copies `v` to a new buffer on `stream` (the upload stream of [`evaluate_checkpoint`]).
fn upload_to<T: DeviceRepr>(stream: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        // SAFETY: a one-element placeholder nobody reads.
        return Ok(drv("allocating", unsafe { stream.alloc::<T>(1) })?);
    }
    Ok(drv("copying to the device", stream.clone_htod(v))?)
}

fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.par_iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// Reading and uploading checkpoint layers

fn host_linear(ck: &Checkpoint, prefix: &str) -> Result<HostLinear> {
    if ck.is_quantized(prefix) {
        Ok(HostLinear::Gptq(ck.gptq_weight(prefix)?))
    } else {
        let t = ck.read(&format!("{prefix}.weight"))?;
        let (n, k) = match t.shape[..] {
            [n, k] => (n, k),
            _ => return Err(Error::Input(format!("{prefix}.weight is not 2-D"))),
        };
        Ok(HostLinear::Dense {
            out_features: n,
            in_features: k,
            w: to_bf16_bits(&t.data),
        })
    }
}

/// Reads decoder layer `layer` of `ck` into host memory (bf16 dense weights, packed GPTQ).
///
/// # Errors
/// Loader errors.
pub fn read_layer(ck: &Checkpoint, layer: usize) -> Result<HostLayer> {
    let c = ck.config();
    if layer >= c.num_hidden_layers {
        return Err(Error::Input(format!(
            "layer {layer} does not exist ({} layers)",
            c.num_hidden_layers
        )));
    }
    let p = format!("model.layers.{layer}");
    // All linears of the layer in parallel (copying and checking the packed tensors).
    let mut names: Vec<String> = ["q_proj", "k_proj", "v_proj", "o_proj"]
        .iter()
        .map(|m| format!("{p}.self_attn.{m}"))
        .collect();
    for e in 0..c.num_local_experts {
        for w in ["w1", "w2", "w3"] {
            names.push(format!("{p}.block_sparse_moe.experts.{e}.{w}"));
        }
    }
    let mut linears = names
        .par_iter()
        .map(|n| host_linear(ck, n))
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    let attn: Vec<HostLinear> = linears.by_ref().take(4).collect();
    let experts = (0..c.num_local_experts)
        .map(|_| linears.by_ref().take(3).collect())
        .collect();
    Ok(HostLayer {
        input_layernorm: ck.read(&format!("{p}.input_layernorm.weight"))?.data,
        post_attention_layernorm: ck
            .read(&format!("{p}.post_attention_layernorm.weight"))?
            .data,
        gate: ck.read(&format!("{p}.block_sparse_moe.gate.weight"))?.data,
        attn,
        experts,
    })
}

fn upload_linear(st: &Arc<CudaStream>, l: &HostLinear) -> Result<DeviceLinear> {
    Ok(match l {
        HostLinear::Dense {
            out_features,
            in_features,
            w,
        } => DeviceLinear::Dense {
            w: Arc::new(HalfBuf {
                buf: upload_to(st, w)?,
                dtype: Half::Bf16,
            }),
            out_features: *out_features,
            in_features: *in_features,
        },
        HostLinear::Gptq(g) => DeviceLinear::Gptq(Arc::new(PackedGptq {
            bits: g.bits,
            in_features: g.in_features,
            out_features: g.out_features,
            qweight: upload_to(st, &g.qweight)?,
            qzeros: upload_to(st, &g.qzeros)?,
            scales: upload_to(st, &g.scales)?,
            g_idx: upload_to(st, &g.g_idx)?,
        })),
    })
}

fn linear3(v: Vec<DeviceLinear>) -> Result<[DeviceLinear; 3]> {
    v.try_into()
        .map_err(|_| Error::Input("an expert needs exactly w1, w2, w3".into()))
}

/// Copies a layer read by [`read_layer`] to the device.
///
/// # Errors
/// Driver errors (out of memory).
pub fn upload_layer(dev: &CudaDevice, h: &HostLayer) -> Result<DeviceLayer> {
    upload_layer_on(dev.stream(), h)
}

/// [`upload_layer`] on `st` (asynchronous with respect to other streams; the caller
/// synchronizes `st` before the main stream uses the layer).
fn upload_layer_on(st: &Arc<CudaStream>, h: &HostLayer) -> Result<DeviceLayer> {
    let attn: Vec<DeviceLinear> = h
        .attn
        .iter()
        .map(|l| upload_linear(st, l))
        .collect::<Result<_>>()?;
    let attn: [DeviceLinear; 4] = attn
        .try_into()
        .map_err(|_| Error::Input("attention needs exactly q, k, v, o".into()))?;
    let experts = h
        .experts
        .iter()
        .map(|e| {
            linear3(
                e.iter()
                    .map(|l| upload_linear(st, l))
                    .collect::<Result<_>>()?,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DeviceLayer {
        input_layernorm: Arc::new(upload_to(st, &h.input_layernorm)?),
        post_attention_layernorm: Arc::new(upload_to(st, &h.post_attention_layernorm)?),
        gate: Arc::new(upload_to(st, &h.gate)?),
        attn,
        experts,
    })
}

/// Embedding, final norm and `lm_head` of `ck` on the device.
///
/// # Errors
/// Loader and driver errors.
pub fn upload_head(dev: &CudaDevice, ck: &Checkpoint) -> Result<DeviceHead> {
    let lm = if ck.tensor_names().contains(&"lm_head.weight") {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    };
    Ok(DeviceHead {
        embed: upload(dev, &ck.read("model.embed_tokens.weight")?.data)?,
        norm: upload(dev, &ck.read("model.norm.weight")?.data)?,
        lm_head: HalfBuf {
            buf: upload(dev, &to_bf16_bits(&ck.read(lm)?.data))?,
            dtype: Half::Bf16,
        },
    })
}

/// Evaluates `windows` on `ck` layer by layer: a helper thread reads layer `l + 1` from the
/// memory-mapped files and copies it to the device on its own stream while the GPU runs layer `l`.
///
/// # Errors
/// Loader, driver and shape errors.
pub fn evaluate_checkpoint(
    dev: &Arc<CudaDevice>,
    ck: &Checkpoint,
    windows: &[Vec<u32>],
    opts: &EvalOptions,
) -> Result<EvalOutput> {
    let head = upload_head(dev, ck)?;
    let layers = ck.config().num_hidden_layers;
    let up = drv("creating an upload stream", dev.context().new_stream())?;
    std::thread::scope(|s| {
        // One layer in the channel, one being read: the copy engine works while the GPU computes.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<DeviceLayer>>(1);
        s.spawn(move || {
            for l in 0..layers {
                let r = read_layer(ck, l).and_then(|h| {
                    let d = upload_layer_on(&up, &h)?;
                    drv("waiting for a layer upload", up.synchronize())?;
                    Ok(d)
                });
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let mut feed = |_l: usize| -> Result<DeviceLayer> {
            rx.recv()
                .map_err(|_| Error::Input("the layer reader stopped early".into()))?
        };
        evaluate_windows(dev, ck.config(), windows, head, &mut feed, opts)
    })
}

// ---------------------------------------------------------------------------------------------
// The engine

/// A linear layer ready for cuBLAS: either the dense `[N, K]` upload or a dequantized `[K, N]`.
struct Ready {
    ptr: u64,
    dtype: Half,
    /// `[K, N]` row-major (dequantized) rather than `[N, K]`.
    kn: bool,
    k: usize,
    n: usize,
}

/// Per-layer dequantization buffers, reused from layer to layer (same shapes).
#[derive(Default)]
struct DequantPool {
    bufs: Vec<CudaSlice<u16>>,
    used: usize,
}

impl DequantPool {
    fn take(&mut self, dev: &CudaDevice, n: usize) -> Result<u64> {
        if self.used == self.bufs.len() || self.bufs[self.used].len() < n {
            let b = alloc::<u16>(dev, n)?;
            if self.used == self.bufs.len() {
                self.bufs.push(b);
            } else {
                self.bufs[self.used] = b;
            }
        }
        let p = ptr(dev, &self.bufs[self.used]);
        self.used += 1;
        Ok(p)
    }
}

struct Engine<'a> {
    dev: &'a Arc<CudaDevice>,
    c: &'a MixtralConfig,
}

impl Engine<'_> {
    /// Makes `l` ready for cuBLAS in `dtype` (dequantizing GPTQ tensors into `pool`).
    fn ready(&self, l: &DeviceLinear, dtype: Half, pool: &mut DequantPool) -> Result<Ready> {
        ready(self.dev, l, dtype, pool)
    }
}

/// Makes `l` ready for cuBLAS in `dtype` (dequantizing GPTQ tensors into `pool`).
fn ready(dev: &CudaDevice, l: &DeviceLinear, dtype: Half, pool: &mut DequantPool) -> Result<Ready> {
    {
        match l {
            DeviceLinear::Dense {
                w,
                out_features,
                in_features,
            } => {
                if w.dtype != dtype {
                    return Err(unsupported(
                        "dense weight",
                        format!("{:?}", w.dtype),
                        "dense weights sharing an input must have one dtype",
                    ));
                }
                Ok(Ready {
                    ptr: ptr(dev, &w.buf),
                    dtype,
                    kn: false,
                    k: *in_features,
                    n: *out_features,
                })
            }
            DeviceLinear::Gptq(p) => {
                let (k, n, bits) = (p.in_features, p.out_features, p.bits);
                if n % 2 != 0 || !(2..=8).contains(&bits) {
                    return Err(unsupported(
                        "GPTQ layer",
                        format!("{bits}-bit, {n} outputs"),
                        "dequantization needs 2..8 bits and an even output count",
                    ));
                }
                let out = pool.take(dev, k * n)?;
                let entry = format!("eval_dequant_{}", dtype.suffix());
                let f = func(dev, &entry)?;
                let (bi, ki, ni) = (bits as i32, k as i32, n as i32);
                let (qw, qz, sc, gi) = (
                    ptr(dev, &p.qweight),
                    ptr(dev, &p.qzeros),
                    ptr(dev, &p.scales),
                    ptr(dev, &p.g_idx),
                );
                let mut b = dev.stream().launch_builder(&f);
                b.arg(&qw)
                    .arg(&qz)
                    .arg(&sc)
                    .arg(&gi)
                    .arg(&bi)
                    .arg(&ki)
                    .arg(&ni)
                    .arg(&out);
                let cfg = LaunchConfig {
                    grid_dim: ((n / 2).div_ceil(256) as u32, k as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the packed tensors have the shapes GptqWeight::check verified (or the
                // synthetic generator made); `out` holds K·N values.
                unsafe { b.launch(cfg) }.map_err(launch_err("eval_dequant"))?;
                Ok(Ready {
                    ptr: out,
                    dtype,
                    kn: true,
                    k,
                    n,
                })
            }
        }
    }
}

impl Engine<'_> {
    /// RMSNorm of `rows` rows at `x` into 16-bit `out`, with router logits when `gate` is set.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        x: u64,
        rows: usize,
        w: u64,
        dtype: Half,
        out: u64,
        gate: Option<(u64, usize, u64)>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let entry = format!("eval_rms_norm_{}", dtype.suffix());
        let f = func(self.dev, &entry)?;
        let cols = self.c.hidden_size as i32;
        let eps = self.c.rms_norm_eps as f32;
        let (g, ne, lg) = gate.map_or((0u64, 0i32, 0u64), |(g, n, l)| (g, n as i32, l));
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&x)
            .arg(&w)
            .arg(&out)
            .arg(&cols)
            .arg(&eps)
            .arg(&g)
            .arg(&ne)
            .arg(&lg);
        // SAFETY: x and out hold rows·hidden values, w hidden, gate experts·hidden, logits rows·experts.
        unsafe { b.launch(rows_cfg(rows)) }.map_err(launch_err("eval_rms_norm"))?;
        Ok(())
    }
}

fn func(dev: &CudaDevice, entry: &str) -> CudaResult<cudarc::driver::CudaFunction> {
    dev.function(&EVAL, entry)
}

/// `Y[m, n] (f32, row stride ldy) = X[m, k] · Wᵀ + beta · Y`, X row-major with stride k.
fn gemm(
    dev: &CudaDevice,
    x: u64,
    m: usize,
    w: &Ready,
    y: u64,
    ldy: usize,
    beta: f32,
) -> CudaResult<()> {
    gemm_to(dev, x, m, w, y, ldy, beta, false)
}

/// [`gemm`] with an f16 output when `f16_out` (f16 operands only).
#[allow(clippy::too_many_arguments)]
fn gemm_to(
    dev: &CudaDevice,
    x: u64,
    m: usize,
    w: &Ready,
    y: u64,
    ldy: usize,
    beta: f32,
    f16_out: bool,
) -> CudaResult<()> {
    if m == 0 {
        return Ok(());
    }
    let alpha = 1.0f32;
    // Row-major Y = X·Wᵀ is column-major Yᵀ[n, m] = W[n, k] · Xᵀ[k, m]. A dense [N, K] weight
    // is column-major [K, N] (transpose it); a dequantized [K, N] one is column-major [N, K].
    let (op_a, lda) = if w.kn {
        (cublas_sys::cublasOperation_t::CUBLAS_OP_N, w.n)
    } else {
        (cublas_sys::cublasOperation_t::CUBLAS_OP_T, w.k)
    };
    // SAFETY: x holds m·k values, w k·n, y m rows of stride ldy ≥ n, all on this stream.
    unsafe {
        cublas_result::gemm_ex(
            *dev.blas.handle(),
            op_a,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            w.n as i32,
            m as i32,
            w.k as i32,
            &alpha as *const f32 as *const _,
            w.ptr as *const _,
            w.dtype.cublas(),
            lda as i32,
            x as *const _,
            w.dtype.cublas(),
            w.k as i32,
            &beta as *const f32 as *const _,
            y as *mut _,
            if f16_out {
                cublas_sys::cudaDataType::CUDA_R_16F
            } else {
                cublas_sys::cudaDataType::CUDA_R_32F
            },
            ldy as i32,
            cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|source| CudaError::Cublas {
        what: format!("GemmEx {m}x{}x{}", w.k, w.n),
        source,
    })
}

/// The dtype of GEMM operands for a group of linears sharing one input: f16 when they are all
/// GPTQ, else the dense weights' bf16 (GPTQ members are then dequantized to bf16).
fn group_dtype(ls: &[&DeviceLinear]) -> Half {
    ls.iter()
        .find_map(|l| match l {
            DeviceLinear::Dense { w, .. } => Some(w.dtype),
            DeviceLinear::Gptq(_) => None,
        })
        .unwrap_or(Half::F16)
}

/// A run of whole windows processed together.
struct Chunk {
    /// First token (global).
    t0: usize,
    /// Tokens.
    len: usize,
    /// Position of each token inside its window.
    pos: CudaSlice<u32>,
    /// Attention blocks of the tensor-core kernel: (window start, length, first query).
    blocks_tc: CudaSlice<i32>,
    n_tc: usize,
    /// Attention blocks of the reference kernel.
    blocks_ref: CudaSlice<i32>,
    n_ref: usize,
    /// Next-token target of each token (−1 for the last token of a window).
    targets: CudaSlice<i32>,
}

fn attention_blocks(windows: &[(usize, usize)], per_block: usize) -> Vec<i32> {
    let mut v: Vec<[i32; 4]> = Vec::new();
    for &(start, len) in windows {
        for q0 in (0..len).step_by(per_block) {
            v.push([start as i32, len as i32, q0 as i32, 0]);
        }
    }
    // Longest (latest) query blocks first: they see the most keys.
    v.sort_by_key(|b| std::cmp::Reverse(b[2]));
    v.into_iter().flatten().collect()
}

/// Runs every window through the model layer by layer and returns the per-token NLLs.
///
/// `feed(l)` gives layer `l`'s weights on the device (it is called once per layer, in order);
/// `head` holds the embedding, final norm and `lm_head`. Windows may differ in length; each is
/// an independent sequence (positions from 0, causal attention inside the window).
///
/// # Errors
/// [`Error::Input`] for empty windows or ids outside the vocabulary, unsupported shapes, driver
/// and cuBLAS errors.
pub fn evaluate_windows(
    dev: &Arc<CudaDevice>,
    c: &MixtralConfig,
    windows: &[Vec<u32>],
    head: DeviceHead,
    feed: &mut dyn FnMut(usize) -> Result<DeviceLayer>,
    opts: &EvalOptions,
) -> Result<EvalOutput> {
    let start = Instant::now();
    let e = Engine { dev, c };
    let (h, inter, ne, topk) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_local_experts,
        c.num_experts_per_tok,
    );
    let d = c.head_dim();
    let (qw, kw) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let ld = qw + 2 * kw;
    if ne == 0 || ne > MAX_EXPERTS || topk == 0 || topk > MAX_TOP_K || topk > ne {
        return Err(unsupported(
            "experts",
            format!("{ne} experts, top-{topk}"),
            "the router kernel handles up to 64 experts and top-8",
        ));
    }
    if c.num_key_value_heads == 0 || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
        return Err(unsupported(
            "heads",
            format!("{}/{}", c.num_attention_heads, c.num_key_value_heads),
            "query heads must be a multiple of key/value heads",
        ));
    }
    if let Some((i, w)) = windows.iter().enumerate().find(|(_, w)| w.len() < 2) {
        return Err(Error::Input(format!(
            "window {i} has {} tokens; at least 2 are needed",
            w.len()
        )));
    }
    for w in windows {
        check_ids(w, c.vocab_size, "token")?;
    }
    let tensor_cores = opts.attention == AttentionKernel::Auto && TC_HEAD_DIMS.contains(&d);
    let ref_smem = (ATT_TILE * (d + 1) + ATT_TILE * d + ATT_WARPS * d) * 4;
    if !tensor_cores && (d > 256 || ref_smem > 48 * 1024) {
        return Err(unsupported(
            "head_dim",
            d,
            "the attention kernels handle head widths up to 128",
        ));
    }
    // A Q tile and two buffers of K and V tiles, 64 rows of d + 8 halves each (eval.cu, attention_tc).
    let tc_smem = 5 * TC_Q * (d + 8) * 2;
    let mut clock = Clock::new(dev, opts.phase_timing)?;

    // Windows -> chunks.
    let total: usize = windows.iter().map(Vec::len).sum();
    let mut offsets = Vec::with_capacity(windows.len());
    let mut acc = 0usize;
    for w in windows {
        offsets.push(acc);
        acc += w.len();
    }
    let mut chunk_windows: Vec<std::ops::Range<usize>> = Vec::new();
    let mut i = 0;
    while i < windows.len() {
        let mut j = i + 1;
        let mut n = windows[i].len();
        while j < windows.len() && n + windows[j].len() <= opts.chunk_tokens.max(1) {
            n += windows[j].len();
            j += 1;
        }
        chunk_windows.push(i..j);
        i = j;
    }
    let mut chunks = Vec::with_capacity(chunk_windows.len());
    for r in &chunk_windows {
        let t0 = offsets[r.start];
        let local: Vec<(usize, usize)> = r
            .clone()
            .map(|w| (offsets[w] - t0, windows[w].len()))
            .collect();
        let len: usize = local.iter().map(|x| x.1).sum();
        let pos: Vec<u32> = local.iter().flat_map(|&(_, l)| 0..l as u32).collect();
        let targets: Vec<i32> = r
            .clone()
            .flat_map(|w| {
                let win = &windows[w];
                (0..win.len()).map(move |t| win.get(t + 1).map_or(-1, |&v| v as i32))
            })
            .collect();
        let btc = attention_blocks(&local, TC_Q);
        let bref = attention_blocks(&local, ATT_WARPS);
        chunks.push(Chunk {
            t0,
            len,
            pos: upload(dev, &pos)?,
            n_tc: btc.len() / 4,
            blocks_tc: upload(dev, &btc)?,
            n_ref: bref.len() / 4,
            blocks_ref: upload(dev, &bref)?,
            targets: upload(dev, &targets)?,
        });
    }
    let max_chunk = chunks.iter().map(|c| c.len).max().unwrap_or(1);

    // Workspaces.
    let mut x = alloc::<f32>(dev, total * h)?;
    let xn = alloc::<u16>(dev, max_chunk * h.max(qw))?;
    let router = alloc::<f32>(dev, max_chunk * ne)?;
    let ids = alloc::<i32>(dev, max_chunk * topk)?;
    let wts = alloc::<f32>(dev, max_chunk * topk)?;
    let qkv = alloc::<f32>(dev, max_chunk * ld)?;
    let qkv16 = alloc::<u16>(dev, max_chunk * ld)?;
    let ao = alloc::<u16>(dev, max_chunk * qw)?;
    // At most 65,535 rows: the SwiGLU kernel puts rows on the grid's y axis.
    let moe_rows = opts.moe_rows.clamp(1, 65_535).min(max_chunk * topk);
    let xe = alloc::<u16>(dev, moe_rows * h)?;
    let h13 = alloc::<f32>(dev, moe_rows * 2 * inter)?;
    let g = alloc::<u16>(dev, moe_rows * inter)?;
    let y = alloc::<f32>(dev, moe_rows * h)?;
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|j| 1.0 / (c.rope_theta as f32).powf((2 * j) as f32 / d as f32))
        .collect();
    let inv_freq = upload(dev, &inv_freq)?;
    let (xp, xnp, rp, idp, wtp, qkvp, q16p, aop, xep, h13p, gp, yp, ifp) = (
        ptr(dev, &x),
        ptr(dev, &xn),
        ptr(dev, &router),
        ptr(dev, &ids),
        ptr(dev, &wts),
        ptr(dev, &qkv),
        ptr(dev, &qkv16),
        ptr(dev, &ao),
        ptr(dev, &xe),
        ptr(dev, &h13),
        ptr(dev, &g),
        ptr(dev, &y),
        ptr(dev, &inv_freq),
    );
    let _ = &mut x;

    // Embedding.
    {
        let all: Vec<u32> = windows.iter().flatten().copied().collect();
        let ids_dev = upload(dev, &all)?;
        let f = func(dev, "eval_embed_f32")?;
        let (tp, idsp) = (ptr(dev, &head.embed), ptr(dev, &ids_dev));
        let hi = h as i32;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&tp).arg(&idsp).arg(&xp).arg(&hi);
        // SAFETY: ids checked against the vocabulary; x holds total·hidden values.
        unsafe { b.launch(rows_cfg(total)) }.map_err(launch_err("eval_embed_f32"))?;
        clock.lap(dev, Phase::Embed)?;
    }
    let DeviceHead {
        embed,
        norm,
        lm_head,
    } = head;
    drop(embed);

    let mut pool = DequantPool::default();
    let mut layer_ms = Vec::with_capacity(c.num_hidden_layers);
    let layer_ev = (dev.timing_event()?, dev.timing_event()?);
    let f32b = 4u64;
    let u16b = 2u64;
    for l in 0..c.num_hidden_layers {
        drv("recording an event", layer_ev.0.record(dev.stream()))?;
        let layer = feed(l)?;
        clock.lap(dev, Phase::Load)?;
        // Shapes.
        let [q, k, v, o] = &layer.attn;
        for (name, lin, want) in [
            ("q_proj", q, (qw, h)),
            ("k_proj", k, (kw, h)),
            ("v_proj", v, (kw, h)),
            ("o_proj", o, (h, qw)),
        ] {
            if lin.shape() != want {
                return Err(Error::Input(format!(
                    "layer {l} {name}: [out, in] = {:?}, expected {want:?}",
                    lin.shape()
                )));
            }
        }
        if layer.experts.len() != ne {
            return Err(Error::Input(format!(
                "layer {l}: {} experts, expected {ne}",
                layer.experts.len()
            )));
        }
        pool.used = 0;
        let attn_dt = group_dtype(&[q, k, v]);
        let o_dt = group_dtype(&[o]);
        let rq = e.ready(q, attn_dt, &mut pool)?;
        let rk = e.ready(k, attn_dt, &mut pool)?;
        let rv = e.ready(v, attn_dt, &mut pool)?;
        let ro = e.ready(o, o_dt, &mut pool)?;
        let mut rexp = Vec::with_capacity(ne);
        let mut up_dt = Vec::with_capacity(ne);
        for (ei, [w1, w2, w3]) in layer.experts.iter().enumerate() {
            if w1.shape() != (inter, h) || w3.shape() != (inter, h) || w2.shape() != (h, inter) {
                return Err(Error::Input(format!(
                    "layer {l} expert {ei}: w1 {:?}, w2 {:?}, w3 {:?} do not fit hidden {h}, intermediate {inter}",
                    w1.shape(),
                    w2.shape(),
                    w3.shape()
                )));
            }
            let dt13 = group_dtype(&[w1, w3]);
            let dt2 = group_dtype(&[w2]);
            rexp.push((
                e.ready(w1, dt13, &mut pool)?,
                e.ready(w2, dt2, &mut pool)?,
                e.ready(w3, dt13, &mut pool)?,
            ));
            up_dt.push(dt13);
        }
        clock.lap(dev, Phase::Dequant)?;

        for ch in &chunks {
            let tc = ch.len;
            let xc = xp + (ch.t0 * h) as u64 * f32b;
            // Attention block.
            e.rms_norm(xc, tc, ptr(dev, &layer.input_layernorm), attn_dt, xnp, None)?;
            clock.lap(dev, Phase::Norm)?;
            gemm(dev, xnp, tc, &rq, qkvp, ld, 0.0)?;
            gemm(dev, xnp, tc, &rk, qkvp + qw as u64 * f32b, ld, 0.0)?;
            gemm(dev, xnp, tc, &rv, qkvp + (qw + kw) as u64 * f32b, ld, 0.0)?;
            clock.lap(dev, Phase::AttnGemm)?;
            {
                let f = func(dev, "eval_rope_qkv")?;
                let (ldi, qwi, kwi, di) = (ld as i32, qw as i32, kw as i32, d as i32);
                let posp = ptr(dev, &ch.pos);
                let h16 = if tensor_cores { q16p } else { 0u64 };
                let mut b = dev.stream().launch_builder(&f);
                b.arg(&qkvp)
                    .arg(&ldi)
                    .arg(&posp)
                    .arg(&ifp)
                    .arg(&qwi)
                    .arg(&kwi)
                    .arg(&di)
                    .arg(&h16);
                // SAFETY: qkv (and qkv16) hold tc rows of `ld` values; pos tc values; inv_freq d/2.
                unsafe { b.launch(rows_cfg(tc)) }.map_err(launch_err("eval_rope_qkv"))?;
            }
            clock.lap(dev, Phase::Rope)?;
            {
                let win = c.sliding_window.map_or(0i32, |w| w.max(1) as i32);
                let scale = 1.0 / (d as f32).sqrt();
                let (hi, kvi, qwi) = (
                    c.num_attention_heads as i32,
                    c.num_key_value_heads as i32,
                    qw as i32,
                );
                let (q_off, k_off, v_off, ldi) = (0i32, qw as i32, (qw + kw) as i32, ld as i32);
                if tensor_cores {
                    let entry = format!("eval_attention_tc_d{d}_{}", o_dt.suffix());
                    let f = func(dev, &entry)?;
                    if tc_smem > 48 * 1024 {
                        drv(
                            format!("allowing {tc_smem} bytes of shared memory for {entry}"),
                            f.set_attribute(
                                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                tc_smem as i32,
                            ),
                        )?;
                    }
                    let bp = ptr(dev, &ch.blocks_tc);
                    let mut b = dev.stream().launch_builder(&f);
                    b.arg(&q16p)
                        .arg(&ldi)
                        .arg(&q_off)
                        .arg(&k_off)
                        .arg(&v_off)
                        .arg(&bp)
                        .arg(&hi)
                        .arg(&kvi)
                        .arg(&win)
                        .arg(&scale)
                        .arg(&aop)
                        .arg(&qwi);
                    let cfg = LaunchConfig {
                        grid_dim: (ch.n_tc as u32, c.num_attention_heads as u32, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: tc_smem as u32,
                    };
                    // SAFETY: blocks lie inside the chunk; qkv16 holds tc rows of `ld` halves
                    // (16-byte aligned rows since ld and the offsets are multiples of 8); ao tc·qw.
                    unsafe { b.launch(cfg) }.map_err(launch_err("eval_attention_tc"))?;
                } else {
                    let entry = format!("eval_attention_f32_{}", o_dt.suffix());
                    let f = func(dev, &entry)?;
                    let bp = ptr(dev, &ch.blocks_ref);
                    let di = d as i32;
                    let mut b = dev.stream().launch_builder(&f);
                    b.arg(&qkvp)
                        .arg(&ldi)
                        .arg(&q_off)
                        .arg(&k_off)
                        .arg(&v_off)
                        .arg(&bp)
                        .arg(&hi)
                        .arg(&kvi)
                        .arg(&di)
                        .arg(&win)
                        .arg(&scale)
                        .arg(&aop)
                        .arg(&qwi);
                    let cfg = LaunchConfig {
                        grid_dim: (ch.n_ref as u32, c.num_attention_heads as u32, 1),
                        block_dim: ((ATT_WARPS * 32) as u32, 1, 1),
                        shared_mem_bytes: ref_smem as u32,
                    };
                    // SAFETY: as above, with the f32 qkv rows.
                    unsafe { b.launch(cfg) }.map_err(launch_err("eval_attention_f32"))?;
                }
            }
            clock.lap(dev, Phase::Attention)?;
            gemm(dev, aop, tc, &ro, xc, h, 1.0)?;
            clock.lap(dev, Phase::AttnGemm)?;

            // MoE block: norm + router logits, top-k on the device, grouping on the host.
            let moe_dt = up_dt[0];
            if up_dt.iter().any(|&t| t != moe_dt) {
                return Err(unsupported(
                    "experts",
                    "mixed dtypes",
                    "all experts' w1/w3 must be stored the same way",
                ));
            }
            e.rms_norm(
                xc,
                tc,
                ptr(dev, &layer.post_attention_layernorm),
                moe_dt,
                xnp,
                Some((ptr(dev, &layer.gate), ne, rp)),
            )?;
            clock.lap(dev, Phase::Norm)?;
            {
                let f = func(dev, "eval_route")?;
                let (ti, nei, ki) = (tc as i32, ne as i32, topk as i32);
                let mut b = dev.stream().launch_builder(&f);
                b.arg(&rp).arg(&ti).arg(&nei).arg(&ki).arg(&idp).arg(&wtp);
                // SAFETY: router holds tc·ne logits; ids/wts tc·topk.
                unsafe { b.launch(grid_1d(tc)) }.map_err(launch_err("eval_route"))?;
            }
            let ids_h = drv(
                "copying routing to the host",
                dev.stream().clone_dtoh(&ids.slice(0..tc * topk)),
            )?;
            let wts_h = drv(
                "copying routing to the host",
                dev.stream().clone_dtoh(&wts.slice(0..tc * topk)),
            )?;
            let mut counts = vec![0usize; ne + 1];
            for &id in &ids_h {
                counts[id as usize + 1] += 1;
            }
            for i in 0..ne {
                counts[i + 1] += counts[i];
            }
            let mut fill = counts.clone();
            let mut order = vec![0i32; tc * topk];
            let mut pw = vec![0f32; tc * topk];
            for (p, (&id, &w)) in ids_h.iter().zip(&wts_h).enumerate() {
                let slot = &mut fill[id as usize];
                order[*slot] = (p / topk) as i32;
                pw[*slot] = w;
                *slot += 1;
            }
            let order_d = upload(dev, &order)?;
            let pw_d = upload(dev, &pw)?;
            let (orp, pwp) = (ptr(dev, &order_d), ptr(dev, &pw_d));
            clock.lap(dev, Phase::Route)?;
            for (ei, (r1, r2, r3)) in rexp.iter().enumerate() {
                let (lo, hi_) = (counts[ei], counts[ei + 1]);
                let mut s0 = lo;
                while s0 < hi_ {
                    let rows = (hi_ - s0).min(moe_rows);
                    let op = orp + (s0 as u64) * 4;
                    let wp = pwp + (s0 as u64) * 4;
                    {
                        let f = func(dev, "eval_gather_u16")?;
                        let hi32 = h as i32;
                        let mut b = dev.stream().launch_builder(&f);
                        b.arg(&xnp).arg(&op).arg(&xep).arg(&hi32);
                        // SAFETY: order entries are token indices < tc; xe holds moe_rows·hidden.
                        unsafe { b.launch(rows_cfg(rows)) }
                            .map_err(launch_err("eval_gather_u16"))?;
                    }
                    clock.lap(dev, Phase::MoeOther)?;
                    // f16 experts write w1|w3 in f16 (half the traffic of the widest tensor).
                    let h16 = r1.dtype == Half::F16;
                    let hb = if h16 { u16b } else { f32b };
                    gemm_to(dev, xep, rows, r1, h13p, 2 * inter, 0.0, h16)?;
                    let h3 = h13p + inter as u64 * hb;
                    gemm_to(dev, xep, rows, r3, h3, 2 * inter, 0.0, h16)?;
                    clock.lap(dev, Phase::MoeGemm)?;
                    {
                        let entry = format!(
                            "eval_silu_mul_{}{}",
                            if h16 { "h16_" } else { "" },
                            r2.dtype.suffix()
                        );
                        let f = func(dev, &entry)?;
                        let ii = inter as i32;
                        let mut b = dev.stream().launch_builder(&f);
                        b.arg(&h13p).arg(&ii).arg(&gp);
                        let cfg = LaunchConfig {
                            grid_dim: ((inter.div_ceil(2)).div_ceil(256) as u32, rows as u32, 1),
                            block_dim: (256, 1, 1),
                            shared_mem_bytes: 0,
                        };
                        // SAFETY: h13 holds rows·2·inter values, g rows·inter; rows ≤ 65,535.
                        unsafe { b.launch(cfg) }.map_err(launch_err("eval_silu_mul"))?;
                    }
                    clock.lap(dev, Phase::MoeOther)?;
                    gemm(dev, gp, rows, r2, yp, h, 0.0)?;
                    clock.lap(dev, Phase::MoeGemm)?;
                    {
                        let f = func(dev, "eval_scatter_add")?;
                        let hi32 = h as i32;
                        let mut b = dev.stream().launch_builder(&f);
                        b.arg(&xc).arg(&yp).arg(&op).arg(&wp).arg(&hi32);
                        // SAFETY: rows are distinct tokens of this chunk; y holds rows·hidden.
                        unsafe { b.launch(rows_cfg(rows)) }
                            .map_err(launch_err("eval_scatter_add"))?;
                    }
                    clock.lap(dev, Phase::MoeOther)?;
                    s0 += rows;
                }
            }
            // order_d / pw_d are freed in stream order.
            drop((order_d, pw_d));
            clock.collect()?;
        }
        drop(layer);
        drv("recording an event", layer_ev.1.record(dev.stream()))?;
        dev.synchronize()?;
        clock.collect()?;
        layer_ms.push(drv("reading an event", layer_ev.0.elapsed_ms(&layer_ev.1))? as f64);
    }

    // Head: final norm, lm_head in row blocks, NLL on the device.
    let vocab = c.vocab_size;
    let head_rows = opts.head_rows.max(1).min(max_chunk);
    let logits = alloc::<f32>(dev, head_rows * vocab)?;
    let nll_d = alloc::<f32>(dev, max_chunk)?;
    let (lgp, nlp) = (ptr(dev, &logits), ptr(dev, &nll_d));
    let lm = Ready {
        ptr: ptr(dev, &lm_head.buf),
        dtype: lm_head.dtype,
        kn: false,
        k: h,
        n: vocab,
    };
    let mut nll: Vec<Vec<f32>> = windows.iter().map(|w| vec![0f32; w.len() - 1]).collect();
    let keep = opts
        .keep_logits_of
        .filter(|&w| w < windows.len())
        .map(|w| (offsets[w], windows[w].len()));
    let mut kept: Option<Vec<f32>> = keep.map(|(_, len)| vec![0f32; len * vocab]);
    for (ch, wr) in chunks.iter().zip(&chunk_windows) {
        let xc = xp + (ch.t0 * h) as u64 * f32b;
        e.rms_norm(xc, ch.len, ptr(dev, &norm), lm.dtype, xnp, None)?;
        let mut r0 = 0;
        while r0 < ch.len {
            let rows = (ch.len - r0).min(head_rows);
            gemm(
                dev,
                xnp + (r0 * h) as u64 * u16b,
                rows,
                &lm,
                lgp,
                vocab,
                0.0,
            )?;
            let f = func(dev, "eval_nll")?;
            let tp = ptr(dev, &ch.targets) + r0 as u64 * 4;
            let op = nlp + r0 as u64 * 4;
            let vi = vocab as i32;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&lgp).arg(&tp).arg(&op).arg(&vi);
            // SAFETY: logits hold rows·vocab values, targets/out rows values; targets < vocab.
            unsafe { b.launch(rows_cfg(rows)) }.map_err(launch_err("eval_nll"))?;
            if let (Some((ks, klen)), Some(buf)) = (keep, kept.as_mut()) {
                let (a, b_) = (ch.t0 + r0, ch.t0 + r0 + rows);
                let (lo, hi_) = (a.max(ks), b_.min(ks + klen));
                if lo < hi_ {
                    let part = drv(
                        "copying logits to the host",
                        dev.stream()
                            .clone_dtoh(&logits.slice((lo - a) * vocab..(hi_ - a) * vocab)),
                    )?;
                    buf[(lo - ks) * vocab..(hi_ - ks) * vocab].copy_from_slice(&part);
                }
            }
            r0 += rows;
        }
        let host = drv(
            "copying NLLs to the host",
            dev.stream().clone_dtoh(&nll_d.slice(0..ch.len)),
        )?;
        for w in wr.clone() {
            let s = offsets[w] - ch.t0;
            let n = windows[w].len() - 1;
            nll[w].copy_from_slice(&host[s..s + n]);
        }
    }
    clock.lap(dev, Phase::Head)?;
    dev.synchronize()?;
    clock.collect()?;
    Ok(EvalOutput {
        nll,
        phase_ms: Phase::ALL
            .iter()
            .zip(clock.totals)
            .map(|(p, ms)| (*p, ms))
            .collect(),
        layer_ms,
        total_ms: start.elapsed().as_secs_f64() * 1e3,
        logits: kept,
    })
}

// ---------------------------------------------------------------------------------------------
// Synthetic weights for `mixtral-gptq bench eval`

fn fill(
    dev: &CudaDevice,
    entry: &str,
    p: u64,
    n: usize,
    seed: u64,
    range: Option<(f32, f32)>,
) -> Result<()> {
    let f = func(dev, entry)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&p).arg(&n).arg(&seed);
    let (lo, hi) = range.unwrap_or((0.0, 0.0));
    if range.is_some() {
        b.arg(&lo).arg(&hi);
    }
    // SAFETY: p holds n elements of the entry's type.
    unsafe { b.launch(grid_1d(n)) }.map_err(launch_err("eval_fill"))?;
    Ok(())
}

/// Random GPTQ tensors of a `[out, in]` layer, drawn on the device: uniform codes and zeros,
/// scales uniform in `[0.5, 1.5)·scale`, and with `act_order` a random row order of the groups.
///
/// # Errors
/// Driver errors; [`Error::Input`] when the shape does not pack into whole words.
#[allow(clippy::too_many_arguments)]
pub fn synthetic_gptq(
    dev: &Arc<CudaDevice>,
    bits: u32,
    group_size: i32,
    in_features: usize,
    out_features: usize,
    act_order: bool,
    scale: f32,
    seed: u64,
) -> Result<PackedGptq> {
    let (k, n, b) = (in_features, out_features, bits as usize);
    if (k * b) % 32 != 0 || (n * b) % 32 != 0 {
        return Err(Error::Input(format!(
            "synthetic GPTQ layer {k}x{n} at {bits} bits does not pack into 32-bit words"
        )));
    }
    let groups = crate::qlinear::group_count(group_size, k);
    let gs = if group_size <= 0 {
        k
    } else {
        group_size as usize
    };
    let mut g_idx: Vec<i32> = (0..k).map(|i| (i / gs) as i32).collect();
    if act_order {
        let mut rng = super::random::Rng::new(seed);
        for i in (1..k).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            g_idx.swap(i, j);
        }
    }
    let qweight = alloc::<i32>(dev, k * b / 32 * n)?;
    let qzeros = alloc::<i32>(dev, groups * n * b / 32)?;
    let scales = alloc::<f16>(dev, groups * n)?;
    fill(
        dev,
        "eval_fill_u32",
        ptr(dev, &qweight),
        k * b / 32 * n,
        seed * 3 + 1,
        None,
    )?;
    fill(
        dev,
        "eval_fill_u32",
        ptr(dev, &qzeros),
        groups * n * b / 32,
        seed * 3 + 2,
        None,
    )?;
    fill(
        dev,
        "eval_fill_f16",
        ptr(dev, &scales),
        groups * n,
        seed * 3 + 3,
        Some((0.5 * scale, 1.5 * scale)),
    )?;
    Ok(PackedGptq {
        bits,
        in_features: k,
        out_features: n,
        qweight,
        qzeros,
        scales,
        g_idx: upload(dev, &g_idx)?,
    })
}

/// A random f32 device vector uniform in `[lo, hi)`.
///
/// # Errors
/// Driver errors.
pub fn synthetic_f32(
    dev: &Arc<CudaDevice>,
    n: usize,
    lo: f32,
    hi: f32,
    seed: u64,
) -> Result<CudaSlice<f32>> {
    let out = alloc::<f32>(dev, n)?;
    fill(
        dev,
        "eval_fill_f32",
        ptr(dev, &out),
        n,
        seed,
        Some((lo, hi)),
    )?;
    Ok(out)
}

/// A random bf16 device buffer uniform in `[lo, hi)`.
///
/// # Errors
/// Driver errors.
pub fn synthetic_bf16(
    dev: &Arc<CudaDevice>,
    n: usize,
    lo: f32,
    hi: f32,
    seed: u64,
) -> Result<HalfBuf> {
    let out = alloc::<u16>(dev, n)?;
    fill(
        dev,
        "eval_fill_bf16",
        ptr(dev, &out),
        n,
        seed,
        Some((lo, hi)),
    )?;
    Ok(HalfBuf {
        buf: out,
        dtype: Half::Bf16,
    })
}

/// Milliseconds of one `[m, k] · [k, n]` GEMM in `dtype` (f32 output), median of `iters` runs
/// after 3 warm-up runs: the dense rate the evaluation is measured against.
///
/// # Errors
/// Driver and cuBLAS errors.
pub fn time_dense_gemm(
    dev: &Arc<CudaDevice>,
    m: usize,
    k: usize,
    n: usize,
    iters: usize,
) -> Result<f64> {
    let x = synthetic_bf16(dev, m * k, -1.0, 1.0, 1)?;
    let w = synthetic_bf16(dev, n * k, -0.02, 0.02, 2)?;
    let y = alloc::<f32>(dev, m * n)?;
    let r = Ready {
        ptr: ptr(dev, &w.buf),
        dtype: Half::Bf16,
        kn: false,
        k,
        n,
    };
    let (xp, yp) = (ptr(dev, &x.buf), ptr(dev, &y));
    let t = super::timing::Timing::one_by_one(3, iters);
    Ok(dev.median_ms(t, |_| gemm(dev, xp, m, &r, yp, n, 0.0))?)
}

/// Dequantizes `w` on the device with the evaluation's kernel and returns `[K, N]` (input-row
/// major) as f32: the f16 values the GEMMs see. For tests against [`GptqWeight::dequantize`].
///
/// # Errors
/// Driver errors; [`Error::Cuda`] for layers the kernel does not handle.
pub fn dequantize_on_device(dev: &Arc<CudaDevice>, w: &GptqWeight) -> Result<Vec<f32>> {
    let lin = upload_linear(dev.stream(), &HostLinear::Gptq(w.clone()))?;
    let mut pool = DequantPool::default();
    let r = ready(dev, &lin, Half::F16, &mut pool)?;
    let bits = drv(
        "copying to the host",
        dev.stream().clone_dtoh(&pool.bufs[0].slice(0..r.k * r.n)),
    )?;
    Ok(bits
        .into_iter()
        .map(|b| f16::from_bits(b).to_f32())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every query of every window is covered by exactly one block, the latest blocks first.
    #[test]
    fn attention_blocks_cover_each_window_once() {
        let windows = [(0usize, 130usize), (130, 64), (194, 1)];
        let flat = attention_blocks(&windows, 64);
        let blocks: Vec<&[i32]> = flat.chunks(4).collect();
        assert_eq!(blocks.len(), 3 + 1 + 1);
        let mut seen = vec![0u32; 195];
        for b in &blocks {
            let (start, len, q0) = (b[0] as usize, b[1] as usize, b[2] as usize);
            for q in q0..(q0 + 64).min(len) {
                seen[start + q] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        let q0s: Vec<i32> = blocks.iter().map(|b| b[2]).collect();
        assert!(q0s.windows(2).all(|w| w[0] >= w[1]), "{q0s:?}");
    }
}
