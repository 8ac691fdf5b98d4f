//! Every kernel compiles with NVRTC for sm_90. Needs libnvrtc (CUDA 13) and CUDA's headers, no GPU:
//! `.ci/run` installs them from PyPI into a local folder and points MIXTRAL_GPTQ_CUDA_LIB_DIR at it.
//! Without them the test prints why it was skipped.

use runtime::cuda::{kernels, probe};

/// NVRTC and CUDA's headers, or `None` after printing why `test` is skipped.
fn nvrtc_or_skip(test: &str) -> Option<probe::NvrtcSetup> {
    probe::probe_nvrtc()
        .map_err(|e| eprintln!("SKIPPED {test}: {e}"))
        .ok()
}

#[test]
fn every_kernel_compiles_for_sm_90() {
    let Some(setup) = nvrtc_or_skip("every_kernel_compiles_for_sm_90") else {
        return;
    };
    eprintln!(
        "NVRTC {:?} from {}, headers {:?}",
        kernels::nvrtc_version(),
        setup.nvrtc.location,
        setup.include_dirs
    );
    for k in kernels::all() {
        let t = std::time::Instant::now();
        let cubin = kernels::compile_uncached(k, "sm_90", &setup).unwrap_or_else(|e| panic!("{e}"));
        // An ELF cubin.
        assert_eq!(
            &cubin[..4],
            b"\x7fELF",
            "{}: NVRTC output is not a cubin",
            k.name
        );
        eprintln!(
            "{}: {} bytes of sm_90 cubin in {:.1} s",
            k.name,
            cubin.len(),
            t.elapsed().as_secs_f64()
        );
    }
}

/// Every tensor-core entry the launches can ask for (`runtime::cuda::gptq::tensor_core_entries`) is
/// in the module the host loads it from (`kernels::gptq_source`), and, where a tile-major layer
/// may run it (`kernels::gptq_tile_source`), in that module too, and in no other: its name,
/// NUL-terminated, is in that cubin's string table. A name the host builds without a kernel behind it
/// would otherwise fail only on a GPU, at its first launch. The tile-major module holds every 3-bit
/// entry a tile-major layer runs: the scalar GEMV's, the dequantization and the register-pipelined
/// GEMV's but `_narrow`.
#[test]
fn every_tensor_core_entry_the_launches_ask_for_exists() {
    let Some(setup) = nvrtc_or_skip("every_tensor_core_entry_the_launches_ask_for_exists") else {
        return;
    };
    let modules = kernels::GPTQ_MODULES.map(|k| {
        let cubin = kernels::compile(&k, "sm_90", &setup).unwrap_or_else(|e| panic!("{e}"));
        (k.name, cubin)
    });
    let names = runtime::cuda::gptq::tensor_core_entries();
    assert!(names.len() >= 40, "only {} entries listed", names.len());
    // The 3-bit entries of the scalar GEMV and the dequantization, which tile-major layers run too.
    let scalar3 = ["f16", "bf16"]
        .into_iter()
        .flat_map(|t| [1, 2, 4, 8].map(|m| format!("gptq_gemv_3b_{t}_m{m}")))
        .chain(["gptq_dequant_3b_f16".to_string()]);
    let mut wrong = Vec::new();
    for name in names.iter().cloned().chain(scalar3) {
        let name = &name;
        let needle = format!("{name}\0");
        let holders: Vec<&str> = modules
            .iter()
            .filter(|(_, cubin)| cubin.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .map(|(module, _)| *module)
            .collect();
        let want: Vec<&str> = std::iter::once(kernels::gptq_source(name))
            .chain(kernels::gptq_tile_source(name))
            .map(|k| k.name)
            .collect();
        if holders != want {
            wrong.push(format!(
                "{name}: loaded from {want:?}, found in {holders:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "entries the launches ask for that are not (only) in their module:\n{}",
        wrong.join("\n")
    );
    let held = |module: &str| {
        names
            .iter()
            .filter(|n| kernels::gptq_source(n).name == module)
            .count()
    };
    assert_eq!(
        held(kernels::GPTQ_SLICE4.name),
        2,
        "the 4-bit `_gather_slice` entries, f16 and bf16"
    );
    assert_eq!(
        held(kernels::GPTQ_NARROW.name),
        12,
        "the `_narrow` entries: plain and `_gather_slice` at 3, 4 and 8 bits; f16 and bf16"
    );
    assert_eq!(
        held(kernels::GPTQ_TALL.name),
        2,
        "the `_tall` entries: plain at 4 bits, f16 and bf16"
    );
    assert_eq!(
        held(kernels::GPTQ_ROWS.name),
        2,
        "the `_rows` entries: plain at 8 bits, f16 and bf16"
    );
    let tile3: Vec<&String> = names
        .iter()
        .filter(|n| kernels::gptq_tile_source(n).is_some())
        .collect();
    assert_eq!(
        tile3.len(),
        6,
        "the 3-bit register-pipelined GEMV's plain, `_gather` and `_gather_slice` entries, f16 and bf16: {tile3:?}"
    );
    eprintln!("{} tensor-core entries present", names.len());
}

/// Fills the kernel cache (MIXTRAL_GPTQ_KERNEL_CACHE) with sm_90 cubins, so that a GPU machine can
/// skip NVRTC's first-use compile: `cargo test -p runtime --test cuda_nvrtc -- --ignored`.
#[test]
#[ignore = "writes the kernel cache; run by hand"]
fn precompile_cache_for_sm_90() {
    let setup = probe::probe_nvrtc().unwrap_or_else(|e| panic!("{e}"));
    for k in kernels::all() {
        kernels::compile(k, "sm_90", &setup).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A tensor-core GEMV entry's name and its instructions without their addresses and encodings,
/// spaces collapsed (`@P0 LDG.E.64 R4, desc[UR8][R2.64]`).
type GemvSass = (String, Vec<String>);

/// The `gptq_mmad_gemv_*` and `gptq_mmadg_gemv_*` functions of the GPTQ modules
/// (`kernels::GPTQ_MODULES`) compiled for sm_90 (`cuobjdump -sass`), made once for all the tests
/// that read them, or `None` after printing why `test` is skipped. Needs NVRTC and CUDA's `cuobjdump` and
/// `nvdisasm` (`.ci/run` installs them from PyPI; MIXTRAL_GPTQ_CUDA_BIN_DIR names their folder).
fn gemv_sass_or_skip(test: &str) -> Option<&'static [GemvSass]> {
    static SASS: std::sync::OnceLock<Result<Vec<GemvSass>, String>> = std::sync::OnceLock::new();
    let sass = SASS.get_or_init(|| {
        let setup = probe::probe_nvrtc().map_err(|e| e.to_string())?;
        let bin = std::env::var_os("MIXTRAL_GPTQ_CUDA_BIN_DIR")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("MIXTRAL_GPTQ_CUDA_LIB_DIR")
                    .map(|l| std::path::PathBuf::from(l).join("../bin"))
            })
            .filter(|b| b.join("cuobjdump").is_file() && b.join("nvdisasm").is_file())
            .ok_or("no cuobjdump and nvdisasm (set MIXTRAL_GPTQ_CUDA_BIN_DIR)")?;
        let mut functions = Vec::new();
        for k in kernels::GPTQ_MODULES {
            let cubin = kernels::compile(&k, "sm_90", &setup).unwrap_or_else(|e| panic!("{e}"));
            let path =
                std::env::temp_dir().join(format!("{}-sm_90-{}.cubin", k.name, std::process::id()));
            std::fs::write(&path, &cubin).unwrap();
            let path_var = std::env::var_os("PATH").unwrap_or_default();
            let paths = std::iter::once(bin.clone()).chain(std::env::split_paths(&path_var));
            let out = std::process::Command::new(bin.join("cuobjdump"))
                .arg("-sass")
                .arg(&path)
                .env("PATH", std::env::join_paths(paths).unwrap())
                .output()
                .unwrap();
            let _ = std::fs::remove_file(&path);
            assert!(
                out.status.success(),
                "cuobjdump ({}): {}",
                k.name,
                String::from_utf8_lossy(&out.stderr)
            );
            functions.extend(gemv_functions(&String::from_utf8(out.stdout).unwrap()));
        }
        Ok(functions)
    });
    sass.as_deref()
        .map_err(|why| eprintln!("SKIPPED {test}: {why}"))
        .ok()
}

/// The tensor-core GEMV entries of a SASS listing ([`GemvSass`]).
fn gemv_functions(sass: &str) -> Vec<GemvSass> {
    let mut functions = Vec::new();
    for function in sass.split("Function : ").skip(1) {
        let name = function.split_whitespace().next().unwrap_or_default();
        if !(name.starts_with("gptq_mmad_gemv_") || name.starts_with("gptq_mmadg_gemv_")) {
            continue;
        }
        let code = function
            .lines()
            .filter_map(|l| l.trim().strip_prefix("/*")?.split_once("*/"))
            .filter_map(|(_, rest)| rest.split_once(';'))
            .map(|(i, _)| i.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|i| !i.is_empty())
            .collect();
        functions.push((name.to_string(), code));
    }
    functions
}

/// An instruction's opcode (`LDG.E.64`), past its predicate.
fn opcode(instruction: &str) -> &str {
    instruction
        .split_whitespace()
        .find(|t| !t.starts_with('@'))
        .unwrap_or_default()
}

/// The register-pipelined GEMV entries issue their first weight loads before they wait for the
/// previous kernel (`pdl_wait_after_loads` in kernels/gptq.cu): in the SASS of every
/// `gptq_mmad_gemv_*` and `gptq_mmadg_gemv_*` function, each `griddepcontrol.wait` (ACQBULK) comes
/// after a weight load (LDG.E.NA.128) of its own code path. Without the guard ptxas hoisted the wait
/// to the top of every entry, which took away the loads' head start (BENCHMARKS.md). Without
/// cuobjdump the test prints why it was skipped.
#[test]
fn gemv_entries_load_weights_before_the_dependent_launch_wait() {
    let test = "gemv_entries_load_weights_before_the_dependent_launch_wait";
    let Some(functions) = gemv_sass_or_skip(test) else {
        return;
    };
    for (name, code) in functions {
        let (mut waits, mut loaded) = (0, false);
        for line in code {
            if line.contains("LDG.E.NA.128") {
                loaded = true;
            } else if line.contains("ACQBULK") {
                assert!(
                    loaded,
                    "{name}: griddepcontrol.wait {} comes before any weight load of its path",
                    waits + 1
                );
                waits += 1;
                loaded = false;
            }
        }
        assert!(waits > 0, "{name}: no griddepcontrol.wait found");
        eprintln!("{name}: {waits} waits, each after weight loads");
    }
    assert_eq!(
        functions.len(),
        48,
        "expected 18 gptq_mmad_gemv entries (plain, _gather, _gather_slice), 12 `_narrow` ones, 2 \
         `_tall` ones, 2 `_rows` ones, 8 gptq_mmadg_gemv (plain, _gather) and the 6 3-bit \
         gptq_mmad_gemv entries again for tile-major words"
    );
}

/// The registers an instruction writes (its first operand, with the width of 64- and 128-bit
/// results), or none for stores, branches, barriers and the like.
fn written_registers(instruction: &str) -> Vec<u32> {
    let op = opcode(instruction);
    let Some((_, operands)) = instruction.split_once(&format!("{op} ")) else {
        return Vec::new();
    };
    const NO_DESTINATION: [&str; 16] = [
        "ST",
        "STL",
        "STS",
        "STG",
        "RED",
        "BRA",
        "BSSY",
        "BSYNC",
        "BAR",
        "EXIT",
        "WARPSYNC",
        "DEPBAR",
        "LDGDEPBAR",
        "LDGSTS",
        "CCTL",
        "MEMBAR",
    ];
    if NO_DESTINATION.contains(&op.split('.').next().unwrap_or_default()) {
        return Vec::new();
    }
    let Some(first) = operands
        .split(',')
        .next()
        .and_then(|r| r.trim().strip_prefix('R'))
    else {
        return Vec::new();
    };
    let Ok(r) = first.parse::<u32>() else {
        return Vec::new();
    };
    let width = if op.contains(".128") {
        4
    } else if op.contains(".64") || op.contains(".WIDE") {
        2
    } else {
        1
    };
    (r..r + width).collect()
}

/// The GEMV entries spill no register that a global load wrote before the dependent-launch wait:
/// storing it to local memory makes the warp wait for that load before it can reach the wait, so
/// the load's round trip and the copy of X run one after the other. The 4-bit `_gather_slice`
/// entries did this at 32 warps (the group's zero word, 0.45 us of 6.56 at 4096 x 4096;
/// BENCHMARKS.md, "4-bit act-order slices in 24 warps"). The 8-bit `_gather` entries still do; they
/// are listed here until a sweep of their launch bound is measured. Without cuobjdump the test
/// prints why it was skipped.
#[test]
fn gemv_entries_spill_no_load_before_the_dependent_launch_wait() {
    let test = "gemv_entries_spill_no_load_before_the_dependent_launch_wait";
    let Some(functions) = gemv_sass_or_skip(test) else {
        return;
    };
    const KNOWN: [&str; 3] = [
        "gptq_mmad_gemv_8b_f16_gather",
        "gptq_mmad_gemv_8b_bf16_gather",
        "gptq_mmadg_gemv_8b_f16_gather",
    ];
    let mut offenders = Vec::new();
    for (name, code) in functions {
        // (an entry holds one prologue per code path, each ending at its own ACQBULK)
        let mut loaded = std::collections::HashSet::new();
        let mut pending = Vec::new();
        let mut spills = Vec::new();
        for line in code {
            if line.contains("ACQBULK") {
                spills.append(&mut pending);
                loaded.clear();
                continue;
            }
            let op = opcode(line);
            if op.starts_with("STL") {
                let data = line.rsplit(',').next().unwrap_or_default().trim();
                if let Some(r) = data.strip_prefix('R').and_then(|r| r.parse::<u32>().ok()) {
                    if loaded.contains(&r) {
                        pending.push(line.clone());
                    }
                }
                continue;
            }
            let written = written_registers(line);
            if op.starts_with("LDG") {
                loaded.extend(written);
            } else {
                for r in written {
                    loaded.remove(&r);
                }
            }
        }
        if !spills.is_empty() && !KNOWN.contains(&name.as_str()) {
            offenders.push(format!("{name}: {spills:?}"));
        }
        eprintln!(
            "{name}: {} spills of loaded registers before a wait",
            spills.len()
        );
    }
    assert!(
        offenders.is_empty(),
        "GEMV entries that spill a register loaded from global memory before griddepcontrol.wait:\n{}",
        offenders.join("\n")
    );
}
