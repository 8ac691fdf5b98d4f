//! Matrix products through cuBLASLt with the algorithm chosen by timing (the GEMM path's cuBLAS call).
//!
//! cuBLAS's `GemmEx` runs the first algorithm of its heuristic. cuBLASLt returns several candidates
//! (tile shapes, cluster shapes, split-K, stages) for the same product; on the first call of a shape
//! [`LtGemm`] runs each candidate a few times on the call's own buffers, timed with CUDA events, and
//! keeps the fastest for every later call of that shape (one search per shape and process). Only
//! products with `beta = 0` are tuned, since the trial runs overwrite the output.
//!
//! Off by default until an H100 has measured it (BENCHMARKS.md): `MIXTRAL_GPTQ_GEMM_TUNE=1` turns the
//! search on, `MIXTRAL_GPTQ_GEMM_TUNE=verbose` also prints each search's candidates and times on
//! stderr; unset or `0`, every product goes through `GemmEx` as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::device::timing_event_on;
use super::error::{drv, CudaError, Result};

/// Environment variable: `1` turns the search on, `verbose` also prints it (default off).
pub const TUNE_ENV: &str = "MIXTRAL_GPTQ_GEMM_TUNE";

/// Candidates asked of the heuristic.
const CANDIDATES: usize = 16;
/// Timed runs per candidate (after one untimed run).
const TRIALS: usize = 4;
/// Alignment of A, B and D that the heuristic assumes (its default minimum, 256 bytes): a choice
/// is kept per shape and reused on other buffers, so less aligned pointers go to `GemmEx` instead.
pub const ALIGN: u64 = 256;

/// Whether products are tuned, read once from [`TUNE_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TuneMode {
    /// Every product through `GemmEx`.
    Off,
    /// The fastest candidate by timing.
    On,
    /// As `On`, printing each search.
    Verbose,
}

impl TuneMode {
    /// The mode [`TUNE_ENV`] asks for (default `Off`).
    pub fn from_env() -> Self {
        Self::parse(std::env::var(TUNE_ENV).ok().as_deref())
    }

    fn parse(v: Option<&str>) -> Self {
        match v.map(str::trim) {
            Some("1") | Some("on") => Self::On,
            Some("verbose") => Self::Verbose,
            _ => Self::Off,
        }
    }
}

/// One product, column-major in cuBLAS's terms: `D[m, n] = op(A)[m, k] · B[k, n]`, A stored
/// `[m, k]` (`trans_a` false) or `[k, m]` (true), with leading dimensions `lda`, `ldb`, `ldd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LtShape {
    /// Type of A and B (`CUDA_R_16F` or `CUDA_R_16BF`).
    pub ab: sys::cudaDataType,
    /// Type of D (`CUDA_R_32F` or the inputs' type).
    pub d: sys::cudaDataType,
    /// Whether A is read transposed.
    pub trans_a: bool,
    /// Rows of D.
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Leading dimension of A.
    pub lda: usize,
    /// Leading dimension of B.
    pub ldb: usize,
    /// Leading dimension of D.
    pub ldd: usize,
}

/// What a search found for a shape: its descriptors and the algorithm to run them with, kept so
/// that later calls of the shape create nothing.
struct Chosen {
    descs: Descs,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A search's result per shape: None where no candidate ran (the caller uses `GemmEx`).
type Choices = HashMap<LtShape, Option<Arc<Chosen>>>;

/// A cuBLASLt handle, its workspace and the algorithm chosen for each shape.
pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    mode: TuneMode,
    chosen: Mutex<Choices>,
}

// SAFETY: the handle is used only under the device's one stream, and cuBLASLt handles may be shared
// between threads (NVIDIA's documentation); the map is behind a mutex.
unsafe impl Send for LtGemm {}
unsafe impl Sync for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `new` and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Descriptors of one product, destroyed on drop.
struct Descs {
    op: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
}

// SAFETY: the descriptors are plain host objects, only read by cuBLASLt calls after creation.
unsafe impl Send for Descs {}
unsafe impl Sync for Descs {}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each was created once by `Descs::new` and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.op);
        }
    }
}

fn lt_err(what: impl Into<String>) -> impl FnOnce(lt::CublasError) -> CudaError {
    let what = what.into();
    move |source| CudaError::CublasLt { what, source }
}

impl Descs {
    fn new(s: &LtShape) -> Result<Self> {
        let what = || format!("describing a {}x{}x{} product", s.m, s.n, s.k);
        let op = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(lt_err(what()))?;
        // Owned from here: a failure below drops what exists so far.
        let mut made = Descs {
            op,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
        };
        // cublasOperation_t as an int32 (CUBLAS_OP_N = 0, CUBLAS_OP_T = 1).
        let trans: i32 = s.trans_a.into();
        // SAFETY: `trans` outlives the call, which copies it; the size is the attribute's.
        unsafe {
            lt::set_matmul_desc_attribute(
                op,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const _ as *const _,
                std::mem::size_of::<i32>(),
            )
        }
        .map_err(lt_err(what()))?;
        let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
        made.a = lt::create_matrix_layout(s.ab, ar as u64, ac as u64, s.lda as i64)
            .map_err(lt_err(what()))?;
        made.b = lt::create_matrix_layout(s.ab, s.k as u64, s.n as u64, s.ldb as i64)
            .map_err(lt_err(what()))?;
        made.d = lt::create_matrix_layout(s.d, s.m as u64, s.n as u64, s.ldd as i64)
            .map_err(lt_err(what()))?;
        Ok(made)
    }
}

impl LtGemm {
    /// A handle and a 32 MiB workspace (what NVIDIA advises for Hopper) on `stream`'s device.
    pub fn new(stream: &std::sync::Arc<CudaStream>, mode: TuneMode) -> Result<Self> {
        let handle = lt::create_handle().map_err(lt_err("creating a handle"))?;
        let workspace = match stream.alloc_zeros::<u8>(32 << 20) {
            Ok(w) => w,
            Err(source) => {
                // SAFETY: created just above, not used.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(CudaError::Driver {
                    what: "allocating the cuBLASLt workspace".into(),
                    source,
                });
            }
        };
        Ok(Self {
            handle,
            workspace,
            mode,
            chosen: Mutex::new(HashMap::new()),
        })
    }

    fn choices(&self) -> Result<MutexGuard<'_, Choices>> {
        self.chosen.lock().map_err(|_| CudaError::Poisoned {
            what: "the cuBLASLt choices",
        })
    }

    /// Shapes searched so far, and how many of them found a candidate that ran.
    pub fn searched(&self) -> Result<(usize, usize)> {
        let m = self.choices()?;
        Ok((m.len(), m.values().filter(|c| c.is_some()).count()))
    }

    /// Runs `D = op(A) · B` (alpha 1, beta 0) with the algorithm chosen for `s`, searching on the
    /// first call of the shape. Returns false, having run nothing, where no candidate ran or a
    /// pointer is not aligned to [`ALIGN`] bytes (the caller then uses `GemmEx`).
    ///
    /// # Safety
    /// `a`, `b` and `d` are device pointers of this stream's context holding the elements `s`
    /// describes, and `d` does not overlap `a` or `b`.
    pub unsafe fn matmul(
        &self,
        stream: &std::sync::Arc<CudaStream>,
        s: &LtShape,
        a: u64,
        b: u64,
        d: u64,
    ) -> Result<bool> {
        if self.mode == TuneMode::Off || [a, b, d].iter().any(|p| p % ALIGN != 0) {
            return Ok(false);
        }
        let known = self.choices()?.get(s).cloned();
        let chosen = match known {
            Some(c) => c,
            None => {
                let descs = Descs::new(s)?;
                let c = self
                    .search(stream, s, &descs, a, b, d)?
                    .map(|algo| Arc::new(Chosen { descs, algo }));
                self.choices()?.insert(*s, c.clone());
                c
            }
        };
        match chosen {
            Some(c) => {
                self.run(stream, &c.descs, &c.algo, a, b, d)
                    .map_err(lt_err(format!("multiplying {}x{}x{}", s.m, s.n, s.k)))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    unsafe fn run(
        &self,
        stream: &std::sync::Arc<CudaStream>,
        descs: &Descs,
        algo: &sys::cublasLtMatmulAlgo_t,
        a: u64,
        b: u64,
        d: u64,
    ) -> std::result::Result<(), lt::CublasError> {
        let alpha: f32 = 1.0;
        let beta: f32 = 0.0;
        let ws_len = self.workspace.len();
        // (The workspace is used on `stream` alone; this device keeps no per-buffer events.)
        let ws = self.workspace.device_ptr(stream).0;
        lt::matmul(
            self.handle,
            descs.op,
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
            a as *const _,
            descs.a,
            b as *const _,
            descs.b,
            d as *const _,
            descs.d,
            d as *mut _,
            descs.d,
            algo as *const _,
            ws as *mut _,
            ws_len,
            stream.cu_stream() as sys::cudaStream_t,
        )
    }

    /// Times every candidate of the heuristic on the call's buffers; returns the fastest, if any ran.
    unsafe fn search(
        &self,
        stream: &std::sync::Arc<CudaStream>,
        s: &LtShape,
        descs: &Descs,
        a: u64,
        b: u64,
        d: u64,
    ) -> Result<Option<sys::cublasLtMatmulAlgo_t>> {
        let what = || format!("choosing an algorithm for {}x{}x{}", s.m, s.n, s.k);
        let pref = lt::create_matmul_pref().map_err(lt_err(what()))?;
        let ws_len = self.workspace.len();
        let set = lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws_len as *const usize as *const _,
            std::mem::size_of::<usize>(),
        );
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            vec![std::mem::zeroed(); CANDIDATES];
        let mut count: i32 = 0;
        let asked = set.and_then(|_| {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                descs.op,
                descs.a,
                descs.b,
                descs.d,
                descs.d,
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut count,
            )
            .result()
        });
        let _ = lt::destroy_matmul_pref(pref);
        asked.map_err(lt_err(what()))?;
        results.truncate(count.clamp(0, CANDIDATES as i32) as usize);

        let ctx = stream.context();
        let mut best: Option<(f32, usize)> = None;
        let mut lines = Vec::new();
        for (i, r) in results.iter().enumerate() {
            if r.state != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || r.workspaceSize > ws_len {
                continue;
            }
            // One untimed run (also the check that it runs), then TRIALS timed back to back.
            if self.run(stream, descs, &r.algo, a, b, d).is_err() {
                lines.push(format!("  candidate {i}: did not run"));
                continue;
            }
            let (e0, e1) = (timing_event_on(ctx)?, timing_event_on(ctx)?);
            drv("recording an event", e0.record(stream))?;
            let mut ok = true;
            for _ in 0..TRIALS {
                ok &= self.run(stream, descs, &r.algo, a, b, d).is_ok();
            }
            drv("recording an event", e1.record(stream))?;
            drv("waiting for the trial runs", e1.synchronize())?;
            if !ok {
                lines.push(format!("  candidate {i}: failed"));
                continue;
            }
            let ms = drv("reading an event", e0.elapsed_ms(&e1))? / TRIALS as f32;
            lines.push(format!(
                "  candidate {i}: {:.2} us ({:.2} waves)",
                ms * 1e3,
                r.wavesCount
            ));
            if best.is_none_or(|(t, _)| ms < t) {
                best = Some((ms, i));
            }
        }
        if self.mode == TuneMode::Verbose {
            eprintln!(
                "cuBLASLt search for D[{}, {}] = op(A)[{}, {}] B ({:?} -> {:?}{}): {} candidates, chose {}",
                s.m,
                s.n,
                s.m,
                s.k,
                s.ab,
                s.d,
                if s.trans_a { ", A transposed" } else { "" },
                results.len(),
                best.map_or("none (GemmEx)".to_string(), |(_, i)| format!("candidate {i}"))
            );
            for l in &lines {
                eprintln!("{l}");
            }
        }
        Ok(best.map(|(_, i)| results[i].algo))
    }
}

#[cfg(test)]
mod tests {
    use super::TuneMode;

    #[test]
    fn tune_mode_reads_the_variable() {
        assert_eq!(TuneMode::parse(None), TuneMode::Off);
        assert_eq!(TuneMode::parse(Some("0")), TuneMode::Off);
        assert_eq!(TuneMode::parse(Some("1")), TuneMode::On);
        assert_eq!(TuneMode::parse(Some(" on ")), TuneMode::On);
        assert_eq!(TuneMode::parse(Some("verbose")), TuneMode::Verbose);
    }
}
