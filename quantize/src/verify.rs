//! Checks a written branch directory against the GPTQ "v1" format and TheBloke's file set
//! (spec §2 and §6 items 6–10), reporting every problem by name rather than stopping at the first.
//!
//! What is checked:
//! - files: `config.json`, `quantize_config.json`, `model.safetensors` or the shard index with every
//!   shard it names, `tokenizer_config.json`, `special_tokens_map.json`, `tokenizer.json` or
//!   `tokenizer.model`, `generation_config.json`;
//! - configs: `quantize_config.json` in TheBloke's byte form; its fields equal to `config.json`'s
//!   `quantization_config`, which must say `quant_method: "gptq"` and never a v2 checkpoint format;
//!   `modules_in_block_to_quantize` equal to the modules actually quantized, in AutoGPTQ order;
//! - safetensors: headers parse, `{"format":"pt"}` metadata, offsets cover the data exactly, the
//!   index names every tensor in the file that holds it;
//! - tensors: every tensor the layout plans is present with its dtype (I32/F16) and shape, nothing
//!   else is (in particular no quantized router or lm_head), dense tensors are finite;
//! - each quantized module: unpack then re-pack gives the stored words; `g_idx` in `0..G`, all zero for
//!   group size -1, `k / group_size` without act-order, and with act-order exactly `group_size`
//!   columns per group (the last possibly fewer); scales finite and > 0; for sym, every stored
//!   zero equal to `2^(b-1) - 1`. (Codes are in `0..=maxq` by construction: a `b`-bit field
//!   cannot hold anything else, so the round-trip is the check that matters.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::f16;
use runtime::qlinear::GptqWeight;
use safetensors::tensor::Metadata;
use safetensors::Dtype;
use serde_json::Value;

use crate::branch::{BranchLayout, INDEX_FILE, MODEL_FILE};
use crate::config::{self, ModelDims};
use crate::error::{Error, Result};
use crate::pack::{pack_cols, pack_rows};
use crate::presets::Preset;

/// Largest safetensors header accepted (the reference parser's limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One thing wrong with a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What it is about: a file name, a tensor or a module.
    pub subject: String,
    /// What is wrong, with what was expected and found.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// The outcome of [`verify_branch`].
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Every problem found, in the order found.
    pub problems: Vec<Problem>,
    /// Tensors found in the model file(s).
    pub tensors: usize,
    /// Quantized modules whose packing was checked.
    pub quantized_modules: usize,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn add(&mut self, subject: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            subject: subject.into(),
            message: message.into(),
        });
    }
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone)]
struct Located {
    file: PathBuf,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute offset of the data in the file.
    start: u64,
    len: u64,
}

/// The quantization settings read from the branch's JSON files.
#[derive(Debug, Clone, Copy)]
struct Declared {
    bits: u32,
    group_size: i32,
    desc_act: bool,
    sym: bool,
}

/// Checks the branch in `dir`; problems are collected in the report, not returned as errors.
///
/// Memory stays bounded by the largest single tensor: headers are parsed on their own and tensors
/// are read one module at a time.
///
/// # Errors
/// [`Error::Io`] only when `dir` is not a readable directory.
pub fn verify_branch(dir: &Path) -> Result<VerifyReport> {
    let meta = std::fs::metadata(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "expected a branch directory",
            ),
        });
    }
    let mut report = VerifyReport::default();
    check_files(dir, &mut report);
    let config = read_json_file(dir, "config.json", &mut report);
    let quantize_config = read_json_file(dir, "quantize_config.json", &mut report);
    let declared = check_configs(dir, config.as_ref(), quantize_config.as_ref(), &mut report);
    let tensors = locate_tensors(dir, &mut report);
    report.tensors = tensors.len();

    let dims =
        config.as_ref().and_then(
            |c| match ModelDims::from_config(c, &dir.join("config.json")) {
                Ok(d) => Some(d),
                Err(e) => {
                    report.add("config.json", e.to_string());
                    None
                }
            },
        );
    let modules = config
        .as_ref()
        .and_then(|c| declared_modules(c, &mut report));
    let (Some(dims), Some(declared), Some(modules)) = (dims, declared, modules) else {
        report.add(
            "tensors",
            "not checked against a layout: the configs above are incomplete",
        );
        return Ok(report);
    };
    check_modules_list(&dims, &modules, &tensors, &mut report);
    let flat: Vec<String> = modules.concat();
    let layout = match BranchLayout::plan(&dims, declared.bits, declared.group_size, &flat) {
        Ok(l) => l,
        Err(e) => {
            report.add(
                "tensors",
                format!("no layout for the declared quantization: {e}"),
            );
            return Ok(report);
        }
    };
    check_layout(&layout, &tensors, &mut report);
    check_dense(&layout, &tensors, &mut report);
    check_quantized(&layout, declared, &tensors, &mut report);
    Ok(report)
}

fn check_files(dir: &Path, report: &mut VerifyReport) {
    for name in [
        "config.json",
        "quantize_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        if !dir.join(name).is_file() {
            report.add(name, "missing");
        }
    }
    if !dir.join("tokenizer.json").is_file() && !dir.join("tokenizer.model").is_file() {
        report.add("tokenizer.json", "missing (and no tokenizer.model either)");
    }
    let single = dir.join(MODEL_FILE).is_file();
    let index = dir.join(INDEX_FILE).is_file();
    match (single, index) {
        (false, false) => report.add(MODEL_FILE, format!("missing (and no {INDEX_FILE} either)")),
        (true, true) => report.add(
            INDEX_FILE,
            format!("present next to {MODEL_FILE}: loaders may pick either"),
        ),
        _ => {}
    }
}

fn read_json_file(dir: &Path, name: &str, report: &mut VerifyReport) -> Option<Value> {
    let path = dir.join(name);
    if !path.is_file() {
        return None;
    }
    match config::read_json(&path) {
        Ok(v) => Some(v),
        Err(e) => {
            report.add(name, e.to_string());
            None
        }
    }
}

/// Checks both JSON files and their agreement; returns the declared settings when readable.
fn check_configs(
    dir: &Path,
    config: Option<&Value>,
    quantize_config: Option<&Value>,
    report: &mut VerifyReport,
) -> Option<Declared> {
    let qc_from_file =
        quantize_config.and_then(|qc| declared_from(qc, "quantize_config.json", report));
    if let Some(preset) = quantize_config.and_then(preset_from) {
        let text = std::fs::read_to_string(dir.join("quantize_config.json")).unwrap_or_default();
        let expected = config::quantize_config_json(&preset);
        if text != expected {
            report.add(
                "quantize_config.json",
                format!("not in TheBloke's byte form ({} bytes, expected {}: 8 keys in order, indent 2, no trailing newline)", text.len(), expected.len()),
            );
        }
    }
    let block = config.and_then(|c| match c.get("quantization_config") {
        Some(b) if b.is_object() => Some(b),
        _ => {
            report.add("config.json", "no `quantization_config` object");
            None
        }
    });
    let from_block =
        block.and_then(|b| declared_from(b, "config.json quantization_config", report));
    if let Some(b) = block {
        if b.get("quant_method").and_then(Value::as_str) != Some("gptq") {
            report.add(
                "config.json quantization_config",
                format!(
                    "`quant_method` is {}, expected \"gptq\"",
                    show(b.get("quant_method"))
                ),
            );
        }
        for key in ["checkpoint_format", "format"] {
            match b.get(key) {
                None => {}
                Some(Value::String(s)) if s == "gptq" => {}
                Some(v) => report.add(
                    "config.json quantization_config",
                    format!("`{key}` is {v}, expected absent or \"gptq\" (this is a v1 branch)"),
                ),
            }
        }
        if let Some(qc) = quantize_config.and_then(Value::as_object) {
            for (key, value) in qc {
                if b.get(key) != Some(value) {
                    report.add(
                        "config.json quantization_config",
                        format!(
                            "`{key}` is {}, quantize_config.json says {value}",
                            show(b.get(key))
                        ),
                    );
                }
            }
        }
    }
    qc_from_file.or(from_block)
}

fn show(v: Option<&Value>) -> String {
    v.map(Value::to_string)
        .unwrap_or_else(|| "absent".to_string())
}

fn declared_from(v: &Value, subject: &str, report: &mut VerifyReport) -> Option<Declared> {
    let bits = v.get("bits").and_then(Value::as_u64).map(|b| b as u32);
    let group_size = v
        .get("group_size")
        .and_then(Value::as_i64)
        .map(|g| g as i32);
    let desc_act = v.get("desc_act").and_then(Value::as_bool);
    let sym = v.get("sym").and_then(Value::as_bool);
    let mut ok = true;
    match bits {
        Some(b) if runtime::qlinear::SUPPORTED_BITS.contains(&b) => {}
        _ => {
            report.add(
                subject,
                format!("`bits` is {}, expected 2, 3, 4 or 8", show(v.get("bits"))),
            );
            ok = false;
        }
    }
    match group_size {
        Some(g) if g == -1 || g > 0 => {}
        _ => {
            report.add(
                subject,
                format!(
                    "`group_size` is {}, expected -1 or positive",
                    show(v.get("group_size"))
                ),
            );
            ok = false;
        }
    }
    for (key, val) in [("desc_act", desc_act), ("sym", sym)] {
        if val.is_none() {
            report.add(
                subject,
                format!("`{key}` is {}, expected true or false", show(v.get(key))),
            );
            ok = false;
        }
    }
    ok.then(|| Declared {
        bits: bits.unwrap_or(4),
        group_size: group_size.unwrap_or(-1),
        desc_act: desc_act.unwrap_or(false),
        sym: sym.unwrap_or(true),
    })
}

/// The preset a `quantize_config.json` describes (name left empty), when all fields are readable.
fn preset_from(v: &Value) -> Option<Preset> {
    Some(Preset {
        name: "",
        bits: v.get("bits")?.as_u64()? as u32,
        group_size: v.get("group_size")?.as_i64()? as i32,
        desc_act: v.get("desc_act")?.as_bool()?,
        damp_percent: v.get("damp_percent")?.as_f64()?,
        sym: v.get("sym")?.as_bool()?,
        static_groups: v
            .get("static_groups")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        true_sequential: v.get("true_sequential")?.as_bool()?,
    })
}

fn declared_modules(config: &Value, report: &mut VerifyReport) -> Option<Vec<Vec<String>>> {
    let list = config
        .get("quantization_config")?
        .get("modules_in_block_to_quantize");
    let parsed = list.and_then(Value::as_array).and_then(|subsets| {
        subsets
            .iter()
            .map(|s| {
                s.as_array()?
                    .iter()
                    .map(|m| m.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
            })
            .collect::<Option<Vec<_>>>()
    });
    if parsed.is_none() {
        report.add(
            "config.json quantization_config",
            format!(
                "`modules_in_block_to_quantize` is {}, expected a list of lists of module names",
                show(list)
            ),
        );
    }
    parsed
}

/// `modules_in_block_to_quantize` must list exactly the modules quantized in every layer, in
/// AutoGPTQ order, and nothing that may not be quantized.
fn check_modules_list(
    dims: &ModelDims,
    modules: &[Vec<String>],
    tensors: &BTreeMap<String, Located>,
    report: &mut VerifyReport,
) {
    let subject = "config.json modules_in_block_to_quantize";
    let flat: Vec<String> = modules.concat();
    let all = config::modules_in_block(dims.num_local_experts).concat();
    for m in &flat {
        if !all.contains(m) {
            report.add(subject, format!("`{m}` is not a quantizable Mixtral linear (the router, lm_head and embeddings stay dense)"));
        }
    }
    let known: Vec<String> = flat.iter().filter(|m| all.contains(m)).cloned().collect();
    let canonical = config::modules_in_block_to_quantize(dims.num_local_experts, &known);
    if canonical != modules && known.len() == flat.len() {
        report.add(
            subject,
            "not in AutoGPTQ order ([k, v, q], [o], [experts w1 then w3], [experts w2])",
        );
    }
    let mut per_layer: BTreeMap<usize, BTreeSet<String>> = (0..dims.num_hidden_layers)
        .map(|l| (l, BTreeSet::new()))
        .collect();
    for name in tensors.keys() {
        let Some(module) = name.strip_suffix(".qweight") else {
            continue;
        };
        match split_layer(module) {
            Some((layer, rel)) if per_layer.contains_key(&layer) => {
                per_layer.entry(layer).or_default().insert(rel.to_string());
            }
            _ => report.add(module, "quantized, but only linears inside model.layers may be (lm_head and embeddings stay dense)"),
        }
    }
    let listed: BTreeSet<String> = flat.iter().cloned().collect();
    for (layer, present) in per_layer {
        let extra: Vec<&String> = present.difference(&listed).collect();
        let missing: Vec<&String> = listed.difference(&present).collect();
        if !extra.is_empty() {
            report.add(
                format!("model.layers.{layer}"),
                format!("quantized but not in modules_in_block_to_quantize: {extra:?}"),
            );
        }
        if !missing.is_empty() && missing.len() < listed.len() {
            report.add(
                format!("model.layers.{layer}"),
                format!("in modules_in_block_to_quantize but not quantized: {missing:?}"),
            );
        } else if !missing.is_empty() {
            report.add(
                format!("model.layers.{layer}"),
                "no quantized module at all",
            );
        }
    }
}

/// `model.layers.7.self_attn.q_proj` -> `(7, "self_attn.q_proj")`.
fn split_layer(module: &str) -> Option<(usize, &str)> {
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, rel) = rest.split_once('.')?;
    Some((layer.parse().ok()?, rel))
}

/// Reads the tensor table of the single file or of every shard of the index.
fn locate_tensors(dir: &Path, report: &mut VerifyReport) -> BTreeMap<String, Located> {
    let mut out = BTreeMap::new();
    if dir.join(MODEL_FILE).is_file() {
        read_header(&dir.join(MODEL_FILE), MODEL_FILE, &mut out, report);
        return out;
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        return out;
    }
    let index = match config::read_json(&index_path) {
        Ok(v) => v,
        Err(e) => {
            report.add(INDEX_FILE, e.to_string());
            return out;
        }
    };
    let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
        report.add(INDEX_FILE, "no `weight_map` object");
        return out;
    };
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in map {
        match file.as_str() {
            Some(f) => files.entry(f.to_string()).or_default().push(tensor.clone()),
            None => report.add(
                INDEX_FILE,
                format!("`{tensor}` maps to {file}, expected a file name"),
            ),
        }
    }
    for (file, names) in &files {
        if file.contains(['/', '\\']) || !dir.join(file).is_file() {
            report.add(
                file.as_str(),
                format!(
                    "named by {INDEX_FILE} for {} tensor(s) but missing",
                    names.len()
                ),
            );
            continue;
        }
        let mut found = BTreeMap::new();
        read_header(&dir.join(file), file, &mut found, report);
        for name in names {
            if !found.contains_key(name) {
                report.add(
                    name.as_str(),
                    format!("{INDEX_FILE} says it is in {file}, but it is not"),
                );
            }
        }
        for (name, loc) in found {
            if map.get(&name).and_then(Value::as_str) != Some(file.as_str()) {
                report.add(
                    name.as_str(),
                    format!("in {file} but {INDEX_FILE} says {}", show(map.get(&name))),
                );
            }
            if out.insert(name.clone(), loc).is_some() {
                report.add(name.as_str(), "stored in more than one shard");
            }
        }
    }
    let total: u64 = out.values().map(|t| t.len).sum();
    let declared = index
        .get("metadata")
        .and_then(|m| m.get("total_size"))
        .and_then(Value::as_u64);
    if declared != Some(total) {
        report.add(
            INDEX_FILE,
            format!(
                "metadata.total_size is {declared:?}, the shards hold {total} bytes of tensors"
            ),
        );
    }
    out
}

/// Parses one safetensors header without reading the data, recording problems under `subject`.
fn read_header(
    path: &Path,
    subject: &str,
    out: &mut BTreeMap<String, Located>,
    report: &mut VerifyReport,
) {
    let parse = || -> std::result::Result<(Metadata, u64, u64), String> {
        let mut f = File::open(path).map_err(|e| e.to_string())?;
        let file_len = f.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|e| format!("no header length: {e}"))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || 8 + n > file_len {
            return Err(format!(
                "header length {n} does not fit the file ({file_len} bytes)"
            ));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| e.to_string())?;
        let meta: Metadata = serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
        Ok((meta, n, file_len))
    };
    let (meta, n, file_len) = match parse() {
        Ok(x) => x,
        Err(message) => {
            report.add(subject, format!("invalid safetensors: {message}"));
            return;
        }
    };
    if n % 8 != 0 {
        report.add(subject, format!("header length {n} is not a multiple of 8"));
    }
    let format = meta.metadata().as_ref().and_then(|m| m.get("format"));
    if format.map(String::as_str) != Some("pt") {
        report.add(
            subject,
            format!("metadata format is {format:?}, expected \"pt\""),
        );
    }
    let data_start = 8 + n;
    if data_start + meta.data_len() as u64 != file_len {
        report.add(
            subject,
            format!(
                "file is {file_len} bytes, header + data need {}",
                data_start + meta.data_len() as u64
            ),
        );
    }
    for (name, info) in meta.tensors() {
        let (a, b) = info.data_offsets;
        out.insert(
            name,
            Located {
                file: path.to_path_buf(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + a as u64,
                len: (b - a) as u64,
            },
        );
    }
}

/// Every planned tensor present with its dtype and shape, and nothing else.
fn check_layout(
    layout: &BranchLayout,
    tensors: &BTreeMap<String, Located>,
    report: &mut VerifyReport,
) {
    let planned: HashMap<&str, _> = layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for t in &layout.tensors {
        match tensors.get(&t.name) {
            None => report.add(
                t.name.as_str(),
                format!("missing (expected {:?} {:?})", t.dtype, t.shape),
            ),
            Some(found) if found.dtype != t.dtype || found.shape != t.shape => report.add(
                t.name.as_str(),
                format!(
                    "is {:?} {:?}, expected {:?} {:?}",
                    found.dtype, found.shape, t.dtype, t.shape
                ),
            ),
            Some(_) => {}
        }
    }
    for name in tensors.keys() {
        if !planned.contains_key(name.as_str()) {
            let why = if name.ends_with(".bias") {
                "unexpected (GPTQ bias tensors are not written by this tool)"
            } else if name.contains("block_sparse_moe.gate.") || name.starts_with("lm_head.") {
                "unexpected: the router and lm_head must stay dense F16 `.weight`"
            } else {
                "unexpected tensor"
            };
            report.add(name.as_str(), why);
        }
    }
}

fn read_bytes(t: &Located) -> std::result::Result<Vec<u8>, String> {
    let mut f = File::open(&t.file).map_err(|e| format!("{}: {e}", t.file.display()))?;
    f.seek(SeekFrom::Start(t.start))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; t.len as usize];
    f.read_exact(&mut buf)
        .map_err(|e| format!("{}: {e}", t.file.display()))?;
    Ok(buf)
}

fn as_i32(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn as_f16(bytes: &[u8]) -> Vec<f16> {
    bytes
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Dense tensors of the layout that are present as planned: all values finite.
fn check_dense(
    layout: &BranchLayout,
    tensors: &BTreeMap<String, Located>,
    report: &mut VerifyReport,
) {
    for t in layout
        .tensors
        .iter()
        .filter(|t| t.name.ends_with(".weight"))
    {
        let Some(found) = tensors
            .get(&t.name)
            .filter(|f| f.dtype == t.dtype && f.shape == t.shape)
        else {
            continue;
        };
        match read_bytes(found) {
            Ok(bytes) => {
                let bad = as_f16(&bytes).iter().filter(|x| !x.is_finite()).count();
                if bad > 0 {
                    report.add(
                        t.name.as_str(),
                        format!("{bad} non-finite value(s) (f16 overflow?)"),
                    );
                }
            }
            Err(e) => report.add(t.name.as_str(), e),
        }
    }
}

/// Unpacks every quantized module that is present as planned and checks it.
fn check_quantized(
    layout: &BranchLayout,
    declared: Declared,
    tensors: &BTreeMap<String, Located>,
    report: &mut VerifyReport,
) {
    for qweight in layout
        .tensors
        .iter()
        .filter(|t| t.name.ends_with(".qweight"))
    {
        let module = qweight.name.trim_end_matches(".qweight");
        let parts: Vec<Option<&Located>> = ["qweight", "qzeros", "scales", "g_idx"]
            .iter()
            .map(|s| {
                let name = format!("{module}.{s}");
                let planned = layout.tensors.iter().find(|t| t.name == name);
                tensors
                    .get(&name)
                    .filter(|f| planned.is_some_and(|p| p.dtype == f.dtype && p.shape == f.shape))
            })
            .collect();
        let [Some(qw), Some(qz), Some(sc), Some(gi)] = parts[..] else {
            continue;
        };
        let read = || -> std::result::Result<GptqWeight, String> {
            let (k, n) = (
                qweight.shape[0] * 32 / layout.bits as usize,
                qweight.shape[1],
            );
            Ok(GptqWeight {
                bits: layout.bits,
                group_size: layout.group_size,
                in_features: k,
                out_features: n,
                qweight: as_i32(&read_bytes(qw)?),
                qzeros: as_i32(&read_bytes(qz)?),
                scales: as_f16(&read_bytes(sc)?),
                g_idx: as_i32(&read_bytes(gi)?),
            })
        };
        match read() {
            Ok(w) => {
                report.quantized_modules += 1;
                for message in check_module(&w, declared) {
                    report.add(module, message);
                }
            }
            Err(e) => report.add(module, e),
        }
    }
}

/// The per-module checks; returns one message per failed check.
fn check_module(w: &GptqWeight, declared: Declared) -> Vec<String> {
    let mut problems = Vec::new();
    let (k, n, bits) = (w.in_features, w.out_features, w.bits);
    let groups = w.groups();
    // g_idx range, reported with a count and the first offender.
    let out_of_range: Vec<(usize, i32)> = w
        .g_idx
        .iter()
        .enumerate()
        .filter(|(_, &g)| g < 0 || g as usize >= groups)
        .map(|(i, &g)| (i, g))
        .collect();
    if let Some(&(i, g)) = out_of_range.first() {
        problems.push(format!(
            "g_idx: {} value(s) outside 0..{groups}, first g_idx[{i}] = {g}",
            out_of_range.len()
        ));
        return problems;
    }
    if let Err(e) = w.check() {
        problems.push(e.to_string());
        return problems;
    }
    let codes = w.unpack_codes();
    if pack_rows(&codes, k, n, bits) != w.qweight {
        problems.push("qweight: unpack then re-pack differs from the stored words".to_string());
    }
    let zeros = w.unpack_zeros();
    if pack_cols(&zeros, groups, n, bits) != w.qzeros {
        problems.push("qzeros: unpack then re-pack differs from the stored words".to_string());
    }
    if w.group_size < 0 {
        if let Some(i) = w.g_idx.iter().position(|&g| g != 0) {
            problems.push(format!(
                "g_idx: group size -1 needs all zeros, g_idx[{i}] = {}",
                w.g_idx[i]
            ));
        }
    } else {
        let gs = w.group_size as usize;
        if declared.desc_act {
            let mut counts = vec![0usize; groups];
            w.g_idx.iter().for_each(|&g| counts[g as usize] += 1);
            for (g, &c) in counts.iter().enumerate() {
                let expected = if g + 1 == groups {
                    k - gs * (groups - 1)
                } else {
                    gs
                };
                if c != expected {
                    problems.push(format!(
                        "g_idx: group {g} holds {c} columns, expected {expected} (act-order)"
                    ));
                    break;
                }
            }
        } else if let Some(i) = (0..k).find(|&i| w.g_idx[i] as usize != i / gs) {
            problems.push(format!(
                "g_idx[{i}] = {}, expected {} without act-order",
                w.g_idx[i],
                i / gs
            ));
        }
    }
    let bad_scales = w
        .scales
        .iter()
        .filter(|s| !(s.is_finite() && s.to_f32() > 0.0))
        .count();
    if bad_scales > 0 {
        let first = w
            .scales
            .iter()
            .position(|s| !(s.is_finite() && s.to_f32() > 0.0))
            .unwrap_or(0);
        problems.push(format!(
            "scales: {bad_scales} value(s) not finite and > 0, first [{}, {}] = {}",
            first / n.max(1),
            first % n.max(1),
            w.scales[first]
        ));
    }
    if declared.sym {
        let expected = (1u8 << (bits - 1)) - 1;
        if let Some(i) = zeros.iter().position(|&z| z != expected) {
            problems.push(format!(
                "qzeros: sym needs every stored zero = {expected}, [{}, {}] = {}",
                i / n.max(1),
                i % n.max(1),
                zeros[i]
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::branch::BranchWriter;
    use crate::pack::synthetic_layer;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s")
    }

    /// A complete moe-s branch of `preset` from synthetic layers, written with the real writer.
    fn write_branch(out: &Path, preset: &Preset, shard: Option<u64>) -> PathBuf {
        let source = config::read_json(&fixture_dir().join("config.json")).unwrap();
        let mut w = BranchWriter::create(out, preset, &source, &fixture_dir(), shard).unwrap();
        let layout = w.layout().clone();
        for (i, t) in layout.tensors.iter().enumerate() {
            if let Some(module) = t.name.strip_suffix(".qweight") {
                let (_, rel) = split_layer(module).unwrap();
                let (k, n) = layout.dims.linear_shape(rel).unwrap();
                let q = synthetic_layer(
                    preset.bits,
                    preset.group_size,
                    k,
                    n,
                    preset.desc_act,
                    preset.sym,
                    i as u64,
                );
                w.write_quantized(module, &q).unwrap();
            } else if t.name.ends_with(".weight") {
                let n: usize = t.shape.iter().product();
                w.write_dense(&t.name, &t.shape, &vec![0.5; n]).unwrap();
            }
        }
        w.finish().unwrap()
    }

    fn messages(r: &VerifyReport) -> String {
        r.problems.iter().map(|p| format!("{p}\n")).collect()
    }

    #[test]
    fn written_branches_verify_clean() {
        let out = tempfile::tempdir().unwrap();
        for (name, shard) in [
            ("gptq-3bit-128g-actorder_True", None),
            ("gptq-8bit--1g-actorder_True", Some(4 << 20)),
        ] {
            let preset = Preset::by_name(name).unwrap();
            let dir = write_branch(out.path(), &preset, shard);
            let r = verify_branch(&dir).unwrap();
            assert!(r.is_clean(), "{name}:\n{}", messages(&r));
            assert_eq!(r.quantized_modules, 4 * 28);
            assert_eq!(r.tensors, 4 * (28 * 4 + 3) + 3);
        }
    }

    #[test]
    fn module_checks_catch_g_idx_scales_and_zeros() {
        let declared = Declared {
            bits: 4,
            group_size: 32,
            desc_act: true,
            sym: true,
        };
        let good = crate::pack::pack(&synthetic_layer(4, 32, 96, 16, true, true, 1)).unwrap();
        assert!(check_module(&good, declared).is_empty());
        let mut w = good.clone();
        w.g_idx[3] = 3;
        assert!(check_module(&w, declared)[0].contains("g_idx[3] = 3"));
        let mut w = good.clone();
        let j = w.g_idx.iter().position(|&g| g == 1).unwrap();
        w.g_idx[j] = 0;
        assert!(check_module(&w, declared)[0].contains("group 0 holds 33 columns"));
        let mut w = good.clone();
        w.scales[5] = f16::ZERO;
        w.qzeros[0] ^= 1;
        let p = check_module(&w, declared);
        assert!(
            p.iter()
                .any(|m| m.contains("scales") && m.contains("[0, 5]")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.contains("sym needs every stored zero = 7")),
            "{p:?}"
        );
        let no_act = Declared {
            desc_act: false,
            ..declared
        };
        assert!(check_module(&good, no_act)[0].contains("without act-order"));
    }
}
