//! Finds the CUDA libraries and headers before cudarc touches them.
//!
//! cudarc's run-time loading panics when a library is missing, so every library is opened here first
//! with `dlopen` (libloading) and kept open: cudarc's own `dlopen` of the same soname then finds the
//! already-loaded copy, also when it lives outside the loader's search path (a pip wheel, say).
//! Search order for each library: `MIXTRAL_GPTQ_CUDA_LIB_DIR` (a `:`-separated list of folders), the
//! system loader (LD_LIBRARY_PATH, ldconfig), `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda`, then the
//! pip-wheel layouts (`nvidia/cu13/lib`, `nvidia/cuda_nvrtc/lib`, `nvidia/cublas/lib`) under the
//! usual Python package folders.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::error::{CudaError, Result};

/// Environment variable naming extra folders (`:`-separated) that hold the CUDA libraries.
pub const LIB_DIR_ENV: &str = "MIXTRAL_GPTQ_CUDA_LIB_DIR";
/// Environment variable naming CUDA's `include/` folder for NVRTC.
pub const INCLUDE_DIR_ENV: &str = "MIXTRAL_GPTQ_CUDA_INCLUDE_DIR";

/// Where a library was found: a full path, or a bare soname resolved by the system loader.
#[derive(Debug, Clone)]
pub struct Found {
    /// Path or soname that was opened.
    pub location: String,
}

/// What NVRTC needs: the library and the include folders (with `cccl/` where present).
#[derive(Debug, Clone)]
pub struct NvrtcSetup {
    /// libnvrtc as opened.
    pub nvrtc: Found,
    /// Folders passed to NVRTC as `--include-path`.
    pub include_dirs: Vec<PathBuf>,
}

/// Every library the CUDA backend needs, opened.
#[derive(Debug, Clone)]
pub struct CudaLibs {
    /// libcuda (the driver).
    pub driver: Found,
    /// NVRTC and its headers.
    pub nvrtc: NvrtcSetup,
    /// libcublas (libcublasLt opened before it).
    pub cublas: Found,
}

fn kept() -> &'static Mutex<Vec<libloading::Library>> {
    static KEPT: OnceLock<Mutex<Vec<libloading::Library>>> = OnceLock::new();
    KEPT.get_or_init(|| Mutex::new(Vec::new()))
}

fn python_package_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let mut bases = vec![
        PathBuf::from("/usr/local/lib"),
        PathBuf::from("/usr/lib"),
        PathBuf::from("/opt/conda/lib"),
    ];
    if let Ok(home) = std::env::var("HOME") {
        bases.push(Path::new(&home).join(".local/lib"));
    }
    if let Ok(venv) = std::env::var("VIRTUAL_ENV") {
        bases.push(Path::new(&venv).join("lib"));
    }
    for base in bases {
        let Ok(rd) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("python3") {
                roots.push(e.path().join("site-packages"));
                roots.push(e.path().join("dist-packages"));
            }
        }
    }
    roots.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    roots
}

/// Folders searched for libraries, in order, after the environment override and the system loader.
pub fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var(LIB_DIR_ENV) {
        dirs.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            dirs.push(Path::new(&v).join("lib64"));
            dirs.push(Path::new(&v).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    dirs.push("/usr/lib/x86_64-linux-gnu".into());
    dirs.push("/usr/local/nvidia/lib64".into());
    for root in python_package_dirs() {
        for sub in [
            "nvidia/cu13/lib",
            "nvidia/cuda_nvrtc/lib",
            "nvidia/cublas/lib",
        ] {
            dirs.push(root.join(sub));
        }
    }
    dirs
}

/// Opens `names` (first match wins), first in the override folders, then through the system
/// loader, then in the other folders; also opens `companions` found beside it (same folder).
fn open(
    library: &'static str,
    purpose: &'static str,
    names: &[&str],
    companions: &[&str],
) -> Result<Found> {
    let dirs = library_dirs();
    let n_override = std::env::var(LIB_DIR_ENV)
        .map(|v| v.split(':').filter(|s| !s.is_empty()).count())
        .unwrap_or(0);
    let mut searched: Vec<String> = Vec::new();
    let try_path = |p: &Path, searched: &mut Vec<String>| -> Option<Found> {
        searched.push(p.display().to_string());
        if !p.exists() {
            return None;
        }
        if let Some(dir) = p.parent() {
            for c in companions {
                let cp = dir.join(c);
                if cp.exists() {
                    // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions.
                    if let Ok(lib) = unsafe { libloading::Library::new(&cp) } {
                        kept().lock().map(|mut k| k.push(lib)).ok();
                    }
                }
            }
        }
        // SAFETY: as above.
        let lib = unsafe { libloading::Library::new(p) }.ok()?;
        kept().lock().map(|mut k| k.push(lib)).ok();
        Some(Found {
            location: p.display().to_string(),
        })
    };
    for dir in &dirs[..n_override] {
        for name in names {
            if let Some(f) = try_path(&dir.join(name), &mut searched) {
                return Ok(f);
            }
        }
    }
    for name in names {
        searched.push(format!("{name} (system loader)"));
        // SAFETY: as above.
        if let Ok(lib) = unsafe { libloading::Library::new(name) } {
            kept().lock().map(|mut k| k.push(lib)).ok();
            return Ok(Found {
                location: name.to_string(),
            });
        }
    }
    for dir in &dirs[n_override..] {
        for name in names {
            if let Some(f) = try_path(&dir.join(name), &mut searched) {
                return Ok(f);
            }
        }
    }
    Err(CudaError::MissingLibrary {
        library,
        purpose,
        searched: searched.join(", "),
    })
}

/// Opens libnvrtc (CUDA 13) and finds the include folders; needs no GPU.
pub fn probe_nvrtc() -> Result<NvrtcSetup> {
    static CACHE: OnceLock<std::result::Result<NvrtcSetup, String>> = OnceLock::new();
    let r = CACHE.get_or_init(|| probe_nvrtc_uncached().map_err(|e| e.to_string()));
    match r {
        Ok(s) => Ok(s.clone()),
        Err(_) => probe_nvrtc_uncached(),
    }
}

fn probe_nvrtc_uncached() -> Result<NvrtcSetup> {
    let nvrtc = open(
        "libnvrtc (CUDA 13)",
        "compiling the kernels",
        &["libnvrtc.so.13"],
        &["libnvrtc-builtins.so.13.0"],
    )?;
    let include_dirs = find_include_dirs(&nvrtc)?;
    Ok(NvrtcSetup {
        nvrtc,
        include_dirs,
    })
}

fn find_include_dirs(nvrtc: &Found) -> Result<Vec<PathBuf>> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var(INCLUDE_DIR_ENV) {
        cands.push(v.into());
    }
    // The folder beside the library that was found (pip wheel: nvidia/cu13/{lib,include}).
    let lib = Path::new(&nvrtc.location);
    if let Some(dir) = lib.parent().filter(|d| !d.as_os_str().is_empty()) {
        cands.push(dir.join("../include"));
    }
    if let Ok(v) = std::env::var(LIB_DIR_ENV) {
        cands.extend(
            v.split(':')
                .filter(|s| !s.is_empty())
                .map(|d| Path::new(d).join("../include")),
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            cands.push(Path::new(&v).join("include"));
        }
    }
    cands.push("/usr/local/cuda/include".into());
    cands.push("/usr/local/cuda/targets/x86_64-linux/include".into());
    for root in python_package_dirs() {
        cands.push(root.join("nvidia/cu13/include"));
        cands.push(root.join("nvidia/cuda_runtime/include"));
    }
    for c in &cands {
        if c.join("cuda_fp16.h").exists() {
            let mut dirs = vec![c.clone()];
            if c.join("cccl").is_dir() {
                dirs.push(c.join("cccl"));
            }
            return Ok(dirs);
        }
    }
    Err(CudaError::MissingIncludeDir {
        searched: cands
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Opens the driver, NVRTC (with headers) and cuBLAS, or names the first one missing.
pub fn probe_all() -> Result<CudaLibs> {
    let driver = open(
        "libcuda (the NVIDIA driver)",
        "running anything on the GPU",
        &["libcuda.so.1", "libcuda.so"],
        &[],
    )?;
    let nvrtc = probe_nvrtc()?;
    open(
        "libcublasLt (CUDA 13)",
        "matrix products (cuBLAS)",
        &["libcublasLt.so.13"],
        &[],
    )?;
    let cublas = open(
        "libcublas (CUDA 13)",
        "matrix products",
        &["libcublas.so.13"],
        &[],
    )?;
    Ok(CudaLibs {
        driver,
        nvrtc,
        cublas,
    })
}
