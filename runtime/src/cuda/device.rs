//! One GPU: context, stream, cuBLAS handle, the compiled kernel module and the workspaces the
//! kernels share (split-K partial sums, tile counters, the dense buffer of the cuBLAS path).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::error::{drv, CudaError, Result};
use super::kernels::{self, KernelSource};
use super::probe::{self, CudaLibs};

/// A CUDA device ready to run the GPTQ kernels.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    libs: CudaLibs,
    name: String,
    arch: String,
    cc_major: i32,
    sm_count: usize,
    smem_optin: usize,
    modules: RwLock<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded entries by module name, then entry name: modules may share entry names
    /// (`kernels::GPTQ_TILE3`). (Nested, so that a lookup, made on every launch, needs no key of
    /// its own.)
    funcs: RwLock<HashMap<&'static str, HashMap<String, CudaFunction>>>,
    pub(crate) ws: Mutex<Workspace>,
    pub(crate) busy: Mutex<Option<(CudaSlice<u8>, CudaSlice<u8>)>>,
    /// Resident blocks per SM by (function handle, block size, dynamic shared bytes), as the
    /// driver's occupancy query answered (asked while planning GEMV launches).
    pub(crate) occupancy: Mutex<HashMap<(usize, u32, usize), usize>>,
    /// Tensor-core GEMV launch choices by layer shape and M (`CudaDevice::mma_choice`).
    pub(crate) plans: Mutex<HashMap<super::gptq::MmaKey, super::gptq::MmaChoice>>,
    /// Whether the kernels written for it run as programmatic dependent launches
    /// ([`CudaDevice::set_dependent_launch`]).
    dependent_launch: AtomicBool,
}

/// Scratch buffers, grown on demand, reused across calls (one stream: calls are ordered).
pub(crate) struct Workspace {
    pub(crate) partial: Option<CudaSlice<f32>>,
    pub(crate) counters: Option<CudaSlice<u32>>,
    pub(crate) dense: Option<CudaSlice<half::f16>>,
    pub(crate) xconv: Option<CudaSlice<half::f16>>,
    /// Act-order X in sorted-row order (f16 or bf16 bits) for the tensor-core GEMV.
    pub(crate) xperm: Option<CudaSlice<u16>>,
}

impl Workspace {
    /// The split-K partial sums and counters, after `CudaDevice::split_k_workspace` grew them.
    pub(crate) fn split_k(&mut self) -> (&mut CudaSlice<f32>, &mut CudaSlice<u32>) {
        match (self.partial.as_mut(), self.counters.as_mut()) {
            (Some(p), Some(c)) => (p, c),
            // `ensure` just filled both slots; reaching this is a bug, not a user error.
            _ => panic!("split-K workspace empty right after ensure()"),
        }
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({}, {}, {} SMs)",
            self.name, self.arch, self.sm_count
        )
    }
}

impl CudaDevice {
    /// Opens device `ordinal` after checking that the driver, NVRTC (with headers) and cuBLAS load.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        let libs = probe::probe_all()?;
        let count = drv("counting devices", CudaContext::device_count())? as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = drv("creating a context", CudaContext::new(ordinal))?;
        // One stream only: cudarc's cross-stream event tracking is not needed.
        // SAFETY: every buffer of this device is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|source| CudaError::Cublas {
            what: "creating a handle".into(),
            source,
        })?;
        let name = drv("reading the device name", ctx.name())?;
        let (maj, min) = drv("reading the compute capability", ctx.compute_capability())?;
        let sm_count = drv(
            "reading the multiprocessor count",
            ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            ),
        )? as usize;
        let smem_optin = drv(
            "reading the shared memory per block",
            ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            ),
        )? as usize;
        Ok(Arc::new(Self {
            ctx,
            stream,
            blas,
            libs,
            name,
            arch: format!("sm_{maj}{min}"),
            cc_major: maj,
            sm_count,
            smem_optin,
            modules: RwLock::new(HashMap::new()),
            funcs: RwLock::new(HashMap::new()),
            ws: Mutex::new(Workspace {
                partial: None,
                counters: None,
                dense: None,
                xconv: None,
                xperm: None,
            }),
            busy: Mutex::new(None),
            occupancy: Mutex::new(HashMap::new()),
            plans: Mutex::new(HashMap::new()),
            // (sm_90 and later; MIXTRAL_GPTQ_DEPENDENT_LAUNCH=0 turns it off)
            dependent_launch: AtomicBool::new(
                maj >= 9 && std::env::var("MIXTRAL_GPTQ_DEPENDENT_LAUNCH").as_deref() != Ok("0"),
            ),
        }))
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// `sm_XY`.
    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
    /// The most dynamic shared memory one block may ask for (bytes).
    pub fn smem_optin(&self) -> usize {
        self.smem_optin
    }

    /// The libraries in use.
    pub fn libs(&self) -> &CudaLibs {
        &self.libs
    }
    /// The stream every operation of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Whether the register-pipelined tensor-core GEMV, the tensor-core fused MoE and the act-order
    /// permutation of X launch as programmatic dependent launches: each launch's blocks start as the
    /// previous kernel's leave the SMs and load their first weights (or `perm`) while it finishes,
    /// then wait for it before reading X. On by default
    /// from sm_90 (off with MIXTRAL_GPTQ_DEPENDENT_LAUNCH=0); it changes timing only, never results.
    pub fn dependent_launch(&self) -> bool {
        self.dependent_launch.load(Ordering::Relaxed)
    }
    /// Turns [`CudaDevice::dependent_launch`] on or off (ignored before sm_90); `bench kernels`
    /// times both.
    pub fn set_dependent_launch(&self, on: bool) {
        self.dependent_launch
            .store(on && self.cc_major >= 9, Ordering::Relaxed);
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        drv("synchronizing", self.stream.synchronize())
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        drv("copying to the device", self.stream.clone_htod(data))
    }

    /// Copies a device buffer back to the host.
    pub fn download<T: DeviceRepr>(&self, data: &CudaSlice<T>) -> Result<Vec<T>> {
        drv("copying to the host", self.stream.clone_dtoh(data))
    }

    /// A zeroed device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        drv(
            format!("allocating {n} elements"),
            self.stream.alloc_zeros::<T>(n),
        )
    }

    /// An event that records timing, for benchmarks.
    pub fn timing_event(&self) -> Result<CudaEvent> {
        drv(
            "creating an event",
            self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)),
        )
    }

    /// The entry point `entry` of kernel file `k`, compiling and loading the module on first use.
    pub fn function(&self, k: &KernelSource, entry: &str) -> Result<CudaFunction> {
        if let Some(f) = self
            .funcs
            .read()
            .ok()
            .and_then(|m| m.get(k.name)?.get(entry).cloned())
        {
            return Ok(f);
        }
        let module = self.module(k)?;
        let f = module
            .load_function(entry)
            .map_err(|source| CudaError::MissingEntry {
                kernel: k.name,
                entry: entry.to_string(),
                source,
            })?;
        if let Ok(mut m) = self.funcs.write() {
            m.entry(k.name)
                .or_default()
                .insert(entry.to_string(), f.clone());
        }
        Ok(f)
    }

    fn module(&self, k: &KernelSource) -> Result<Arc<CudaModule>> {
        if let Some(m) = self
            .modules
            .read()
            .ok()
            .and_then(|m| m.get(k.name).cloned())
        {
            return Ok(m);
        }
        let cubin = kernels::compile(k, &self.arch, &self.libs.nvrtc)?;
        let module = drv(
            format!("loading the `{}` kernels", k.name),
            self.ctx.load_module(Ptx::from_binary(cubin)),
        )?;
        if let Ok(mut m) = self.modules.write() {
            m.insert(k.name, module.clone());
        }
        Ok(module)
    }
}

/// Grows `slot` to at least `n` elements (zeroed when new).
pub(crate) fn ensure<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<()> {
    if slot.as_ref().map(|s| s.len() >= n).unwrap_or(false) {
        return Ok(());
    }
    *slot = Some(drv(
        format!("allocating a workspace of {n} elements"),
        stream.alloc_zeros::<T>(n.max(1)),
    )?);
    Ok(())
}
