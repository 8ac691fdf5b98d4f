//! Kernel launches through `cuLaunchKernelEx`, which (unlike cudarc's launch builder) takes launch
//! attributes: here programmatic dependent launch, which lets a kernel's blocks start while the
//! previous kernel in the stream finishes.

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
};

/// A kernel's arguments by value, in order, then one launch.
pub(crate) struct ExLaunch<'s> {
    stream: &'s CudaStream,
    /// One slot per parameter: a device pointer, or a 4-byte value in the low bytes.
    vals: Vec<u64>,
}

impl<'s> ExLaunch<'s> {
    pub(crate) fn new(stream: &'s CudaStream) -> Self {
        Self {
            stream,
            vals: Vec::with_capacity(24),
        }
    }

    /// A buffer the kernel reads.
    pub(crate) fn buf<T>(&mut self, b: &impl DevicePtr<T>) -> &mut Self {
        let p = b.device_ptr(self.stream).0;
        self.ptr(p)
    }

    /// A buffer the kernel writes.
    pub(crate) fn buf_mut<T>(&mut self, b: &mut impl DevicePtrMut<T>) -> &mut Self {
        let p = b.device_ptr_mut(self.stream).0;
        self.ptr(p)
    }

    /// A raw device pointer (0 for a null pointer).
    pub(crate) fn ptr(&mut self, p: u64) -> &mut Self {
        self.vals.push(p);
        self
    }

    /// A `size_t` parameter.
    pub(crate) fn size_t(&mut self, v: usize) -> &mut Self {
        self.vals.push(v as u64);
        self
    }

    /// An `int` parameter.
    pub(crate) fn int(&mut self, v: i32) -> &mut Self {
        self.vals.push(u64::from(v as u32));
        self
    }

    /// Queues `f` on the stream. With `dependent`, as a programmatic dependent launch: its blocks may
    /// start before the previous kernel in the stream has finished.
    ///
    /// # Safety
    /// The arguments pushed match `f`'s parameters in number, order and type (`int` as 4 bytes,
    /// pointers and `size_t` as 8); the buffers hold everything the kernel reads and writes at this
    /// configuration; with `dependent`, the kernel executes `griddepcontrol.wait` before it reads
    /// anything an earlier kernel may write and before it writes anything an earlier kernel may
    /// access.
    pub(crate) unsafe fn launch(
        &mut self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        dependent: bool,
    ) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        // (little-endian: a 4-byte parameter reads the low bytes of its slot)
        let mut params: Vec<*mut c_void> = self
            .vals
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: an all-zero attribute is a valid value of this plain C struct.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(dependent),
        };
        // SAFETY: `params` points at one live slot per parameter (the caller's contract); `config`
        // and `attr` outlive the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}
