//! [`CudaBackend`]: the [`Backend`] trait on one GPU, f32 throughout.
//!
//! Tensors are device buffers of f32 with their shape. Matrix products go to cuBLAS SGEMM in the
//! handle's default math mode (no TF32 tensor ops, so products are exact f32 like the CPU
//! reference); every other operation is a kernel of `runtime/kernels/forward.cu`. Attention never
//! materialises the `T × T` scores (online softmax over key tiles), and the NLL is reduced on the
//! device, so the logits never reach the host.

use std::sync::Arc;

use cudarc::cublas::{sys as cublas_sys, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::error::{drv, CudaError};
use super::kernels::FORWARD;
use crate::backend::{
    check_ids, check_nll, check_rows, check_scatter_add, AttentionShape, Backend, HostTensor,
};
use crate::error::{Error, Result};

/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;
/// Warps (query rows) per attention block; must match `ATT_WARPS` in forward.cu.
const ATT_WARPS: usize = 16;
/// Keys per shared-memory tile of the attention kernel; must match `ATT_TILE` in forward.cu.
const ATT_TILE: usize = 32;
/// Largest head width the attention kernel handles (`32 · ATT_MAX_E` in forward.cu, and the
/// tiles must fit the 48 KiB of shared memory a block gets without opting in).
pub const MAX_HEAD_DIM: usize = 128;
/// Shared memory a kernel may use without opting in.
const SMEM_LIMIT: usize = 48 * 1024;

/// A device-resident f32 tensor (cheap to clone: the buffer is shared).
#[derive(Clone)]
pub struct CudaTensor {
    buf: Arc<CudaSlice<f32>>,
    shape: Vec<usize>,
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaTensor({:?})", self.shape)
    }
}

impl CudaTensor {
    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dims2(&self, what: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(Error::Input(format!(
                "{what}: expected a 2-D tensor, got shape {:?}",
                self.shape
            ))),
        }
    }
}

/// The f32 forward pass on one CUDA device.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    name: &'static str,
}

/// `cuda:N` for the first eight ordinals, `cuda` beyond (the trait wants a static name).
fn device_name(ordinal: Option<usize>) -> &'static str {
    const NAMES: [&str; 8] = [
        "cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:4", "cuda:5", "cuda:6", "cuda:7",
    ];
    ordinal
        .and_then(|n| NAMES.get(n).copied())
        .unwrap_or("cuda")
}

fn launch_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |source| {
        Error::Cuda(CudaError::Driver {
            what: format!("launching `{what}`"),
            source,
        })
    }
}

fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ROW_THREADS as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Input(format!("{what} = {v} does not fit the kernels")))
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` (probing the driver, NVRTC and cuBLAS first; a missing library
    /// is a named error, never a panic).
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(Self {
            dev: CudaDevice::new(ordinal)?,
            name: device_name(Some(ordinal)),
        })
    }

    /// A backend on an already opened device.
    pub fn on(dev: Arc<CudaDevice>) -> Self {
        Self {
            dev,
            name: device_name(None),
        }
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn func(&self, entry: &str) -> Result<cudarc::driver::CudaFunction> {
        Ok(self.dev.function(&FORWARD, entry)?)
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.dev.zeros::<f32>(n.max(1))?)
    }

    fn wrap(buf: CudaSlice<f32>, shape: Vec<usize>) -> CudaTensor {
        CudaTensor {
            buf: Arc::new(buf),
            shape,
        }
    }

    fn upload_u32(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        if v.is_empty() {
            return Ok(self.dev.zeros::<u32>(1)?);
        }
        Ok(self.dev.upload(v)?)
    }

    fn gather(&self, src: &CudaTensor, rows: &[u32], what: &str) -> Result<CudaTensor> {
        let (n, cols) = src.dims2(what)?;
        check_rows(rows, n, what)?;
        let mut out = self.alloc(rows.len() * cols)?;
        if !rows.is_empty() && cols > 0 {
            let idx = self.upload_u32(rows)?;
            let f = self.func("gather_rows_f32")?;
            let (ni, ci) = (i32_of(rows.len(), "rows")?, i32_of(cols, "columns")?);
            let mut b = self.dev.stream().launch_builder(&f);
            b.arg(&*src.buf).arg(&idx).arg(&mut out).arg(&ni).arg(&ci);
            // SAFETY: rows checked against `n`; `out` holds rows.len() · cols values.
            unsafe { b.launch(rows_cfg(rows.len())) }.map_err(launch_err("gather_rows_f32"))?;
        }
        Ok(Self::wrap(out, vec![rows.len(), cols]))
    }

    fn elementwise(&self, a: &CudaTensor, b: &CudaTensor, entry: &str) -> Result<CudaTensor> {
        if a.shape != b.shape {
            return Err(Error::Input(format!(
                "{entry}: shapes {:?} and {:?} differ",
                a.shape, b.shape
            )));
        }
        let n: usize = a.shape.iter().product();
        let mut out = self.alloc(n)?;
        if n > 0 {
            let f = self.func(entry)?;
            let mut lb = self.dev.stream().launch_builder(&f);
            lb.arg(&*a.buf).arg(&*b.buf).arg(&mut out).arg(&n);
            // SAFETY: all three buffers hold n values.
            unsafe { lb.launch(grid_1d(n)) }.map_err(launch_err(entry))?;
        }
        Ok(Self::wrap(out, a.shape.clone()))
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;

    fn name(&self) -> &'static str {
        self.name
    }

    fn upload(&self, t: HostTensor) -> Result<CudaTensor> {
        let buf = if t.data.is_empty() {
            self.alloc(1)?
        } else {
            self.dev.upload(&t.data)?
        };
        Ok(Self::wrap(buf, t.shape))
    }

    fn shape(&self, t: &CudaTensor) -> Vec<usize> {
        t.shape.clone()
    }

    fn download(&self, t: &CudaTensor) -> Result<HostTensor> {
        let n: usize = t.shape.iter().product();
        let mut data = self.dev.download(&t.buf)?;
        data.truncate(n);
        HostTensor::new(t.shape.clone(), data)
    }

    fn embedding(&self, table: &CudaTensor, ids: &[u32]) -> Result<CudaTensor> {
        let (vocab, _) = table.dims2("embedding table")?;
        check_ids(ids, vocab, "token")?;
        self.gather(table, ids, "embedding")
    }

    fn matmul_t(&self, x: &CudaTensor, w: &CudaTensor) -> Result<CudaTensor> {
        let (m, k) = x.dims2("matmul_t input")?;
        let (n, kw) = w.dims2("matmul_t weight")?;
        if k != kw {
            return Err(Error::Input(format!(
                "matmul_t: input [{m}, {k}] against weight [{n}, {kw}]"
            )));
        }
        let mut out = self.alloc(m * n)?;
        if m > 0 && n > 0 && k > 0 {
            // Row-major Y[m, n] = X[m, k] · W[n, k]ᵀ is column-major Yᵀ[n, m] = W · Xᵀ, where the
            // column-major views of W and X are Wᵀ [k, n] and Xᵀ [k, m].
            let cfg = GemmConfig {
                transa: cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                transb: cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                m: i32_of(n, "matmul_t rows of the weight")?,
                n: i32_of(m, "matmul_t rows of the input")?,
                k: i32_of(k, "matmul_t inner dimension")?,
                alpha: 1.0f32,
                lda: k as i32,
                ldb: k as i32,
                beta: 0.0f32,
                ldc: n as i32,
            };
            // SAFETY: the buffers hold n·k, m·k and m·n values, as the leading dimensions say.
            unsafe { self.dev.blas.gemm(cfg, &*w.buf, &*x.buf, &mut out) }.map_err(|source| {
                CudaError::Cublas {
                    what: format!("SGEMM [{m}, {k}] x [{n}, {k}]^T"),
                    source,
                }
            })?;
        }
        Ok(Self::wrap(out, vec![m, n]))
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.elementwise(a, b, "add_f32")
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let (rows, cols) = x.dims2("rms_norm input")?;
        let wn: usize = weight.shape.iter().product();
        if wn != cols {
            return Err(Error::Input(format!(
                "rms_norm: weight has {wn} values, rows have {cols}"
            )));
        }
        let mut out = self.alloc(rows * cols)?;
        if rows > 0 && cols > 0 {
            let f = self.func("rms_norm_f32")?;
            let ci = i32_of(cols, "columns")?;
            let mut b = self.dev.stream().launch_builder(&f);
            b.arg(&*x.buf)
                .arg(&*weight.buf)
                .arg(&mut out)
                .arg(&ci)
                .arg(&eps);
            // SAFETY: one block per row of `cols` values; weight holds `cols` values.
            unsafe { b.launch(rows_cfg(rows)) }.map_err(launch_err("rms_norm_f32"))?;
        }
        Ok(Self::wrap(out, vec![rows, cols]))
    }

    fn rope(
        &self,
        x: &CudaTensor,
        head_dim: usize,
        positions: &[u32],
        theta: f64,
    ) -> Result<CudaTensor> {
        let (rows, cols) = x.dims2("rope input")?;
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
        // As cpu.rs (MixtralRotaryEmbedding): inv_freq = 1 / base^(2j / dim) in f32.
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let mut out = self.alloc(rows * cols)?;
        if rows > 0 && cols > 0 {
            let pos = self.upload_u32(positions)?;
            let freq = self.dev.upload(&inv_freq)?;
            let f = self.func("rope_f32")?;
            let (ci, hi) = (i32_of(cols, "columns")?, i32_of(head_dim, "head_dim")?);
            let mut b = self.dev.stream().launch_builder(&f);
            b.arg(&*x.buf)
                .arg(&pos)
                .arg(&freq)
                .arg(&mut out)
                .arg(&ci)
                .arg(&hi);
            // SAFETY: one block per row; `pos` has one value per row, `freq` head_dim / 2.
            unsafe { b.launch(rows_cfg(rows)) }.map_err(launch_err("rope_f32"))?;
        }
        Ok(Self::wrap(out, vec![rows, cols]))
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        shape: AttentionShape,
        window: Option<usize>,
    ) -> Result<CudaTensor> {
        let AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: d,
        } = shape;
        let qd = q.dims2("attention q")?;
        let kd = k.dims2("attention k")?;
        let vd = v.dims2("attention v")?;
        shape.check(qd, kd, vd)?;
        let (t, qw) = qd;
        let smem = (ATT_TILE * (d + 1) + ATT_TILE * d + ATT_WARPS * d) * 4;
        if d == 0 || d > MAX_HEAD_DIM || smem > SMEM_LIMIT {
            return Err(Error::Cuda(CudaError::Unsupported {
                field: "head_dim",
                value: d.to_string(),
                reason: "the attention kernel handles head widths 1 to 128",
            }));
        }
        let mut out = self.alloc(t * qw)?;
        if t > 0 && n_heads > 0 {
            let f = self.func("attention_f32")?;
            let win = match window {
                Some(w) => i32_of(w.max(1), "sliding window")?,
                None => 0i32,
            };
            let (ti, hi, kvi, di) = (
                i32_of(t, "tokens")?,
                i32_of(n_heads, "heads")?,
                i32_of(n_kv_heads, "kv heads")?,
                i32_of(d, "head_dim")?,
            );
            let scale = 1.0 / (d as f32).sqrt();
            let mut b = self.dev.stream().launch_builder(&f);
            b.arg(&*q.buf)
                .arg(&*k.buf)
                .arg(&*v.buf)
                .arg(&mut out)
                .arg(&ti)
                .arg(&hi)
                .arg(&kvi)
                .arg(&di)
                .arg(&win)
                .arg(&scale);
            let cfg = LaunchConfig {
                grid_dim: (t.div_ceil(ATT_WARPS) as u32, n_heads as u32, 1),
                block_dim: ((ATT_WARPS * 32) as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: shapes checked above; shared memory sized as the kernel lays it out.
            unsafe { b.launch(cfg) }.map_err(launch_err("attention_f32"))?;
        }
        Ok(Self::wrap(out, vec![t, qw]))
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        self.elementwise(gate, up, "silu_mul_f32")
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[u32]) -> Result<CudaTensor> {
        self.gather(x, rows, "gather_rows")
    }

    fn scatter_add_rows(
        &self,
        acc: &CudaTensor,
        src: &CudaTensor,
        rows: &[u32],
        weights: &[f32],
    ) -> Result<CudaTensor> {
        let (n, cols) = acc.dims2("scatter_add_rows accumulator")?;
        let src_dims = src.dims2("scatter_add_rows source")?;
        check_scatter_add((n, cols), src_dims, rows, weights)?;
        let mut out = drv("copying a tensor", self.dev.stream().clone_dtod(&*acc.buf))?;
        if !rows.is_empty() && cols > 0 {
            let mut seen = vec![false; n];
            let distinct = rows
                .iter()
                .all(|&r| !std::mem::replace(&mut seen[r as usize], true));
            let idx = self.upload_u32(rows)?;
            let wts = self.dev.upload(weights)?;
            let (ni, ci) = (i32_of(rows.len(), "rows")?, i32_of(cols, "columns")?);
            let (entry, cfg) = if distinct {
                ("scatter_add_rows_f32", rows_cfg(rows.len()))
            } else {
                ("scatter_add_rows_seq_f32", grid_1d(cols))
            };
            let f = self.func(entry)?;
            let mut b = self.dev.stream().launch_builder(&f);
            b.arg(&mut out)
                .arg(&*src.buf)
                .arg(&idx)
                .arg(&wts)
                .arg(&ni)
                .arg(&ci);
            // SAFETY: rows checked against `n`, src holds rows.len() · cols values; with repeated
            // rows, the sequential kernel keeps the additions in order.
            unsafe { b.launch(cfg) }.map_err(launch_err(entry))?;
        }
        Ok(Self::wrap(out, vec![n, cols]))
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(Self::wrap(self.alloc(rows * cols)?, vec![rows, cols]))
    }

    fn nll(&self, logits: &CudaTensor, targets: &[u32]) -> Result<Vec<f32>> {
        let (n, vocab) = logits.dims2("nll logits")?;
        check_nll((n, vocab), targets)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let tg = self.upload_u32(targets)?;
        let mut out = self.alloc(n)?;
        let f = self.func("nll_f32")?;
        let vi = i32_of(vocab, "vocabulary")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&*logits.buf).arg(&tg).arg(&mut out).arg(&vi);
        // SAFETY: one block per row of `vocab` logits; targets checked against `vocab`.
        unsafe { b.launch(rows_cfg(n)) }.map_err(launch_err("nll_f32"))?;
        let mut v = self.dev.download(&out)?;
        v.truncate(n);
        Ok(v)
    }
}
