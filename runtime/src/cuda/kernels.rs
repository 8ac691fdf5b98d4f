//! Kernel sources (embedded `.cu` files) and their compilation by NVRTC to a cubin for the device's
//! architecture, cached on disk by a hash of the source, the options and the architecture.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use super::error::{CudaError, Result};
use super::probe::NvrtcSetup;

/// One `.cu` file of `runtime/kernels/`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Short name, used in errors and cache file names.
    pub name: &'static str,
    /// The CUDA C++ source.
    pub src: &'static str,
}

/// GPTQ matrix products (GEMV, fused MoE GEMV, dequantize for the cuBLAS path).
pub const GPTQ: KernelSource = KernelSource {
    name: "gptq",
    src: include_str!("../../kernels/gptq.cu"),
};

/// kernels/gptq.cu compiled with `GPTQ_MODULE` set to `$id`, under the name `$name`.
macro_rules! gptq_module {
    ($name:literal, $id:literal) => {
        KernelSource {
            name: $name,
            src: concat!(
                "#define GPTQ_MODULE ",
                $id,
                "\n#line 1 \"gptq.cu\"\n",
                include_str!("../../kernels/gptq.cu")
            ),
        }
    };
}

/// The 4-bit act-order GEMV entries that copy the permutation's slice first (`_gather_slice`):
/// kernels/gptq.cu compiled with `GPTQ_MODULE 1`, holding only them, so that their depth and launch
/// bound do not change how ptxas schedules the other entries (kernels/gptq.cu,
/// `MMAD_MAX_WARPS_SLICE`). [`gptq_source`] says which module holds an entry.
pub const GPTQ_SLICE4: KernelSource = gptq_module!("gptq_slice4", "1");

/// The GEMV's entries for narrow layers (`_narrow`, kernels/gptq.cu `MMAD_DEPTH_NARROW`):
/// kernels/gptq.cu compiled with `GPTQ_MODULE 2`, for the same reason.
pub const GPTQ_NARROW: KernelSource = gptq_module!("gptq_narrow", "2");

/// The 4-bit GEMV's entries for tall layers (`_tall`, kernels/gptq.cu `MMAD_MAX_WARPS_TALL`):
/// kernels/gptq.cu compiled with `GPTQ_MODULE 3`, for the same reason.
pub const GPTQ_TALL: KernelSource = gptq_module!("gptq_tall", "3");

/// The 8-bit GEMV's entries for launches of several rows (`_rows`, kernels/gptq.cu
/// `MMAD_ROWS_ENTRY`): kernels/gptq.cu compiled with `GPTQ_MODULE 4`, for the same reason.
pub const GPTQ_ROWS: KernelSource = gptq_module!("gptq_rows", "4");

/// The 3-bit entries a layer with tile-major words runs (`qw_tile_major` in kernels/gptq.cu: the
/// scalar GEMV's, the register-pipelined GEMV's without its `_narrow` ones, the dequantization),
/// under the names they have in [`GPTQ`]: kernels/gptq.cu compiled with `GPTQ_MODULE 5`.
/// [`gptq_tile_source`] says which entries it holds.
pub const GPTQ_TILE3: KernelSource = gptq_module!("gptq_tile3", "5");

/// The modules compiled from kernels/gptq.cu.
pub static GPTQ_MODULES: [KernelSource; 6] = [
    GPTQ,
    GPTQ_SLICE4,
    GPTQ_NARROW,
    GPTQ_TALL,
    GPTQ_ROWS,
    GPTQ_TILE3,
];

/// The module that holds the tile-major build of entry `entry` of kernels/gptq.cu ([`GPTQ_TILE3`]),
/// or None where there is none: the 3-bit scalar GEMV (`gptq_gemv_3b_*`), register-pipelined GEMV
/// (`gptq_mmad_gemv_3b_*`, but its `_narrow` entries) and dequantization (`gptq_dequant_3b_f16`).
pub fn gptq_tile_source(entry: &str) -> Option<&'static KernelSource> {
    let tile = (entry.starts_with("gptq_gemv_3b_") || entry.starts_with("gptq_mmad_gemv_3b_"))
        && !entry.ends_with("_narrow")
        || entry == "gptq_dequant_3b_f16";
    tile.then_some(&GPTQ_TILE3)
}

/// The module that holds the (strip-major or row-major) entry `entry` of kernels/gptq.cu:
/// [`GPTQ_NARROW`] for the `_narrow` entries, [`GPTQ_TALL`] for the `_tall` ones, [`GPTQ_ROWS`] for
/// the `_rows` ones, [`GPTQ_SLICE4`] for the 4-bit `_gather_slice` ones, [`GPTQ`] for every other
/// one. (Layers with tile-major words: [`gptq_tile_source`].)
pub fn gptq_source(entry: &str) -> &'static KernelSource {
    if entry.ends_with("_narrow") {
        &GPTQ_NARROW
    } else if entry.ends_with("_tall") {
        &GPTQ_TALL
    } else if entry.ends_with("_rows") {
        &GPTQ_ROWS
    } else if entry.starts_with("gptq_mmad_gemv_4b_") && entry.ends_with("_gather_slice") {
        &GPTQ_SLICE4
    } else {
        &GPTQ
    }
}

/// The f32 operations of the forward pass (`CudaBackend`): gathers, RMSNorm, RoPE, attention,
/// SiLU, scatter-add and the per-row NLL.
pub const FORWARD: KernelSource = KernelSource {
    name: "forward",
    src: concat!(
        include_str!("../../kernels/rows.cuh"),
        "#line 1 \"forward.cu\"\n",
        include_str!("../../kernels/forward.cu")
    ),
};

/// Every kernel module, for the compile-everything test: [`GPTQ_MODULES`], [`FORWARD`] and the
/// evaluation's.
pub fn all() -> impl Iterator<Item = &'static KernelSource> {
    GPTQ_MODULES.iter().chain([&FORWARD, &super::eval::EVAL])
}

/// Options passed to NVRTC besides the architecture and include folders.
const OPTIONS: &[&str] = &["-std=c++17", "--fmad=true", "-default-device"];

/// Environment variable naming the kernel cache folder (default `$XDG_CACHE_HOME/mixtral-gptq/kernels`).
pub const CACHE_DIR_ENV: &str = "MIXTRAL_GPTQ_KERNEL_CACHE";

fn cache_dir() -> Option<PathBuf> {
    if let Ok(v) = std::env::var(CACHE_DIR_ENV) {
        return Some(v.into());
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("mixtral-gptq").join("kernels"))
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `-D` options from `MIXTRAL_GPTQ_NVRTC_DEFINES` (space-separated `NAME=VALUE`), for tuning sweeps.
fn extra_defines() -> Vec<String> {
    std::env::var("MIXTRAL_GPTQ_NVRTC_DEFINES")
        .map(|v| {
            v.split_whitespace()
                .map(|d| format!("-D{}", d.trim_start_matches("-D")))
                .collect()
        })
        .unwrap_or_default()
}

/// NVRTC's version as (major, minor).
pub fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    // SAFETY: plain out-parameters; the library was opened by the probe.
    unsafe { nvrtc_sys::nvrtcVersion(&mut a, &mut b) };
    (a, b)
}

/// Compiles `k` to a cubin for `arch` (`sm_90`), or returns the cached cubin.
/// The probe must have succeeded first (it opens libnvrtc).
pub fn compile(k: &KernelSource, arch: &str, setup: &NvrtcSetup) -> Result<Vec<u8>> {
    let (maj, min) = nvrtc_version();
    let ver = format!("{maj}.{min}");
    let opts = format!("{} {}", OPTIONS.join(" "), extra_defines().join(" "));
    let key = fnv1a(&[
        k.src.as_bytes(),
        arch.as_bytes(),
        opts.as_bytes(),
        ver.as_bytes(),
    ]);
    let cached = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.cubin", k.name)));
    if let Some(path) = &cached {
        if let Ok(bytes) = std::fs::read(path) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let cubin = compile_uncached(k, arch, setup)?;
    if let Some(path) = &cached {
        // A cache that cannot be written is not an error: the next run compiles again.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &cubin).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
    Ok(cubin)
}

/// Compiles without looking at the cache.
pub fn compile_uncached(k: &KernelSource, arch: &str, setup: &NvrtcSetup) -> Result<Vec<u8>> {
    let fail = |log: String| CudaError::KernelCompile {
        kernel: k.name,
        arch: arch.to_string(),
        log,
    };
    let src = CString::new(k.src).map_err(|_| fail("source holds a NUL byte".into()))?;
    let name = CString::new(format!("{}.cu", k.name)).map_err(|_| fail("bad name".into()))?;
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.extend(extra_defines());
    options.push(format!("--gpu-architecture={arch}"));
    for d in &setup.include_dirs {
        options.push(format!("--include-path={}", d.display()));
    }
    let verbose = std::env::var_os("MIXTRAL_GPTQ_NVRTC_VERBOSE").is_some();
    if verbose {
        options.push("--ptxas-options=--verbose".into());
    }
    // SAFETY: `prog` was just created and is destroyed once below.
    let compiled = unsafe { nvrtc::compile_program(prog, &options) };
    let result = match compiled {
        Err(e) => {
            // SAFETY: as above.
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| {
                    unsafe { CStr::from_ptr(l.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            Err(fail(format!(
                "{e:?}\n{log}\noptions: {}",
                options.join(" ")
            )))
        }
        Ok(()) => {
            if verbose {
                // SAFETY: compiled program.
                if let Ok(l) = unsafe { nvrtc::get_program_log(prog) } {
                    eprintln!(
                        "{}",
                        unsafe { CStr::from_ptr(l.as_ptr()) }.to_string_lossy()
                    );
                }
            }
            let mut size = 0usize;
            // SAFETY: compiled program, out-parameter.
            let r = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) };
            if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                Err(fail(format!(
                    "nvrtcGetCUBINSize returned {r:?} (is `{arch}` a real architecture?)"
                )))
            } else {
                let mut buf = vec![0u8; size];
                // SAFETY: `buf` holds `size` bytes as NVRTC asked.
                let r = unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _) };
                if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(fail(format!("nvrtcGetCUBIN returned {r:?}")))
                } else {
                    Ok(buf)
                }
            }
        }
    };
    // SAFETY: created above, not destroyed before.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}
