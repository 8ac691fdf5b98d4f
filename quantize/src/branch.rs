//! The atomic, streaming branch writer: a branch directory appears whole or not at all.
//!
//! A branch is written under `<out>/<branch>.partial` and renamed to `<out>/<branch>` only after
//! every planned tensor was written and every file was fsynced; an interrupted run leaves only the
//! `.partial` directory (removed by the next run), and an existing complete branch is replaced only
//! once the new one is complete.
//!
//! Memory stays bounded by one layer: the safetensors layout (every tensor's name, dtype, shape and
//! byte offset) is planned up front from the model config and the bit width/group size
//! ([`BranchLayout`]), the header is written first, and each tensor's bytes go to their offset as
//! the driver produces them. `finish` fails if any planned tensor was never written.
//!
//! The safetensors header is what the reference serializer (`safetensors::serialize`) writes: the
//! `__metadata__` entry `{"format":"pt"}` first, then the tensors ordered by descending dtype
//! alignment and then by name (I32 before F16), data in that order, the header padded with spaces to
//! a multiple of 8 bytes. With `max_shard_size` the tensors are split in model order into
//! `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` (spec §2.5).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::f16;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde_json::Value;

use crate::config::{self, ModelDims};
use crate::error::{Error, Result};
use crate::module::QuantizedLinear;
use crate::pack::pack;
use crate::presets::Preset;

/// The name of the single model file (TheBloke's `model_file_base_name` + `.safetensors`).
pub const MODEL_FILE: &str = "model.safetensors";
/// The shard index written when a branch is sharded.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Files copied unchanged from the source model directory when present.
pub const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];
/// Files the writer produces itself; `write_extra_file` refuses these names.
const MANAGED_FILES: [&str; 4] = [
    "config.json",
    "quantize_config.json",
    MODEL_FILE,
    INDEX_FILE,
];

/// One planned tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Full tensor name (`model.layers.0.self_attn.q_proj.qweight`).
    pub name: String,
    /// `I32` or `F16`.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Every tensor of a branch, in model order, plus which modules are quantized.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchLayout {
    /// The model's dimensions.
    pub dims: ModelDims,
    /// Bits of the quantized modules.
    pub bits: u32,
    /// Group size of the quantized modules.
    pub group_size: i32,
    /// Quantized module names relative to a layer, in AutoGPTQ order (`self_attn.k_proj`, ...).
    pub quantized_in_block: Vec<String>,
    /// All tensors in model order: embeddings, each layer, final norm, lm_head.
    pub tensors: Vec<TensorSpec>,
}

impl BranchLayout {
    /// The full Mixtral branch: all 4 attention projections and all experts' w1/w2/w3 quantized.
    ///
    /// # Errors
    /// As [`BranchLayout::plan`].
    pub fn mixtral(dims: &ModelDims, bits: u32, group_size: i32) -> Result<BranchLayout> {
        let all = config::modules_in_block(dims.num_local_experts).concat();
        BranchLayout::plan(dims, bits, group_size, &all)
    }

    /// A branch in which only `quantized_in_block` (names relative to a layer, every layer alike)
    /// are quantized; the other linears of the layer are kept dense (`.weight`, F16). The router
    /// (`block_sparse_moe.gate`), embeddings, norms and lm_head are always dense.
    ///
    /// # Errors
    /// [`Error::Layout`] if a module's dimensions do not pack at this bit width, or the bits or group
    /// size are unsupported; [`Error::BranchTensor`] for a module name that is not a quantizable
    /// Mixtral linear.
    pub fn plan(
        dims: &ModelDims,
        bits: u32,
        group_size: i32,
        quantized_in_block: &[String],
    ) -> Result<BranchLayout> {
        let all = config::modules_in_block(dims.num_local_experts).concat();
        if let Some(unknown) = quantized_in_block.iter().find(|m| !all.contains(m)) {
            return Err(Error::BranchTensor {
                dir: PathBuf::new(),
                name: unknown.clone(),
                problem: "not a quantizable Mixtral linear".to_string(),
            });
        }
        let quantized: Vec<String> = all
            .iter()
            .filter(|m| quantized_in_block.contains(m))
            .cloned()
            .collect();
        let f16 = |name: String, shape: Vec<usize>| TensorSpec {
            name,
            dtype: Dtype::F16,
            shape,
        };
        let (h, v) = (dims.hidden_size, dims.vocab_size);
        let mut tensors = vec![f16("model.embed_tokens.weight".into(), vec![v, h])];
        for layer in 0..dims.num_hidden_layers {
            let prefix = format!("model.layers.{layer}");
            tensors.push(f16(format!("{prefix}.input_layernorm.weight"), vec![h]));
            tensors.push(f16(
                format!("{prefix}.post_attention_layernorm.weight"),
                vec![h],
            ));
            tensors.push(f16(
                format!("{prefix}.block_sparse_moe.gate.weight"),
                vec![dims.num_local_experts, h],
            ));
            // Module order within the layer: q, k, v, o, then experts 0.. w1, w2, w3 (model order).
            let mut modules: Vec<&String> = all.iter().collect();
            modules.sort_by_key(|m| model_order(m));
            for module in modules {
                let (k, n) = dims
                    .linear_shape(module)
                    .ok_or_else(|| Error::BranchTensor {
                        dir: PathBuf::new(),
                        name: module.clone(),
                        problem: "no shape in the model config".to_string(),
                    })?;
                let full = format!("{prefix}.{module}");
                if quantized.contains(module) {
                    tensors.extend(quantized_tensors(&full, bits, group_size, k, n)?);
                } else {
                    tensors.push(f16(format!("{full}.weight"), vec![n, k]));
                }
            }
        }
        tensors.push(f16("model.norm.weight".into(), vec![h]));
        if !dims.tie_word_embeddings {
            tensors.push(f16("lm_head.weight".into(), vec![v, h]));
        }
        Ok(BranchLayout {
            dims: *dims,
            bits,
            group_size,
            quantized_in_block: quantized,
            tensors,
        })
    }

    /// `modules_in_block_to_quantize` for `config.json`: the quantized modules as AutoGPTQ's subsets.
    pub fn modules_in_block_to_quantize(&self) -> Vec<Vec<String>> {
        config::modules_in_block_to_quantize(self.dims.num_local_experts, &self.quantized_in_block)
    }

    /// Total bytes of tensor data.
    pub fn total_size(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len() as u64).sum()
    }
}

/// Sort key putting a layer's linears in model (state-dict) order.
fn model_order(module: &str) -> (usize, usize, usize) {
    match module {
        "self_attn.q_proj" => (0, 0, 0),
        "self_attn.k_proj" => (0, 0, 1),
        "self_attn.v_proj" => (0, 0, 2),
        "self_attn.o_proj" => (0, 0, 3),
        _ => {
            let rest = module
                .strip_prefix("block_sparse_moe.experts.")
                .unwrap_or(module);
            let (e, w) = rest.split_once('.').unwrap_or((rest, ""));
            let w = match w {
                "w1" => 0,
                "w2" => 1,
                _ => 2,
            };
            (1, e.parse().unwrap_or(usize::MAX), w)
        }
    }
}

/// The four GPTQ v1 tensors of one quantized module named `prefix` (spec §2.1/§2.2).
///
/// # Errors
/// [`Error::Layout`] if the bits, group size or dimensions are not packable.
pub fn quantized_tensors(
    prefix: &str,
    bits: u32,
    group_size: i32,
    k: usize,
    n: usize,
) -> Result<Vec<TensorSpec>> {
    let probe = runtime::qlinear::GptqWeight {
        bits,
        group_size,
        in_features: k,
        out_features: n,
        qweight: Vec::new(),
        qzeros: Vec::new(),
        scales: Vec::new(),
        g_idx: Vec::new(),
    };
    match probe.check() {
        Ok(()) | Err(runtime::qlinear::QlinearError::Length { .. }) => {}
        Err(source) => {
            return Err(Error::Layout {
                module: prefix.to_string(),
                source,
            })
        }
    }
    let s = probe.shapes();
    let spec = |suffix: &str, dtype, shape: &[usize]| TensorSpec {
        name: format!("{prefix}.{suffix}"),
        dtype,
        shape: shape.to_vec(),
    };
    Ok(vec![
        spec("qweight", Dtype::I32, &s.qweight),
        spec("qzeros", Dtype::I32, &s.qzeros),
        spec("scales", Dtype::F16, &s.scales),
        spec("g_idx", Dtype::I32, &s.g_idx),
    ])
}

/// Where a planned tensor goes.
#[derive(Debug)]
struct Slot {
    shard: usize,
    /// Absolute byte offset in the shard file.
    offset: u64,
    spec: TensorSpec,
    written: bool,
}

/// One output file of the branch.
#[derive(Debug)]
struct Shard {
    file_name: String,
    file: File,
}

/// Writes one branch directory atomically, tensor by tensor.
///
/// ```text
/// let mut w = BranchWriter::create(out, &preset, &source_config, source_dir, None)?;
/// w.write_dense("model.embed_tokens.weight", &[32000, 4096], &embed)?;
/// w.write_quantized("model.layers.0.self_attn.q_proj", &q)?;   // ... every module, every layer
/// let dir = w.finish()?;                                      // <out>/<branch>
/// ```
#[derive(Debug)]
pub struct BranchWriter {
    final_dir: PathBuf,
    partial_dir: PathBuf,
    /// `None`: a dense model (no `quantize_config.json`, `config.json` as given).
    preset: Option<Preset>,
    source_config: Value,
    layout: BranchLayout,
    shards: Vec<Shard>,
    slots: HashMap<String, Slot>,
}

impl BranchWriter {
    /// Starts `<out_dir>/<preset.name>` as a full Mixtral branch of `preset` (see
    /// [`BranchWriter::create_with_layout`]). `source_config` is the source model's parsed
    /// `config.json`; `source_dir` holds its tokenizer and generation config files.
    ///
    /// # Errors
    /// [`Error::ConfigField`] if the config lacks a dimension, and as `create_with_layout`.
    pub fn create(
        out_dir: &Path,
        preset: &Preset,
        source_config: &Value,
        source_dir: &Path,
        max_shard_size: Option<u64>,
    ) -> Result<BranchWriter> {
        let dims = ModelDims::from_config(source_config, &source_dir.join("config.json"))?;
        let layout = BranchLayout::mixtral(&dims, preset.bits, preset.group_size)?;
        BranchWriter::create_with_layout(
            out_dir,
            preset,
            source_config,
            source_dir,
            layout,
            max_shard_size,
        )
    }

    /// Starts a branch with an explicit tensor layout: removes a stale `<branch>.partial`, creates
    /// it, copies the tokenizer/generation files present in `source_dir` ([`COPIED_FILES`]), plans
    /// the shards and writes every safetensors header (files sized to their final length).
    ///
    /// # Errors
    /// [`Error::Io`] naming the path on any file-system failure.
    pub fn create_with_layout(
        out_dir: &Path,
        preset: &Preset,
        source_config: &Value,
        source_dir: &Path,
        layout: BranchLayout,
        max_shard_size: Option<u64>,
    ) -> Result<BranchWriter> {
        BranchWriter::create_at(
            &out_dir.join(preset.name),
            Some(preset),
            source_config,
            Some(source_dir),
            layout,
            max_shard_size,
        )
    }

    /// Starts a model directory at an explicit path `final_dir` (written as `<final_dir>.partial`
    /// and renamed by `finish`). With `preset` it is a GPTQ branch as in
    /// [`BranchWriter::create_with_layout`]; with `None` it is a dense model: `finish` writes
    /// `source_config` unchanged as `config.json` and no `quantize_config.json`, and the layout may
    /// hold any dtype (BF16 for `synth`). `source_dir: None` copies no files.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path on any file-system failure, including a `final_dir` without a
    /// final component.
    pub fn create_at(
        final_dir: &Path,
        preset: Option<&Preset>,
        source_config: &Value,
        source_dir: Option<&Path>,
        layout: BranchLayout,
        max_shard_size: Option<u64>,
    ) -> Result<BranchWriter> {
        let final_dir = final_dir.to_path_buf();
        let Some(name) = final_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            return Err(Error::Io {
                path: final_dir.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "expected a directory path ending in a name",
                ),
            });
        };
        let partial_dir = final_dir.with_file_name(format!("{name}.partial"));
        if partial_dir.exists() {
            std::fs::remove_dir_all(&partial_dir).map_err(io(&partial_dir))?;
        }
        std::fs::create_dir_all(&partial_dir).map_err(io(&partial_dir))?;
        if let Some(source_dir) = source_dir {
            for name in COPIED_FILES {
                let src = source_dir.join(name);
                if src.is_file() {
                    let dst = partial_dir.join(name);
                    std::fs::copy(&src, &dst).map_err(io(&dst))?;
                }
            }
        }
        let groups = split_shards(&layout.tensors, max_shard_size);
        let n = groups.len();
        let mut shards = Vec::with_capacity(n);
        let mut slots = HashMap::with_capacity(layout.tensors.len());
        for (i, group) in groups.into_iter().enumerate() {
            let file_name = if n == 1 {
                MODEL_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            };
            let path = partial_dir.join(&file_name);
            let (header, order) = header_for(&group).map_err(|message| Error::Safetensors {
                path: path.clone(),
                message,
            })?;
            let data_start = 8 + header.len() as u64;
            let mut file = File::create(&path).map_err(io(&path))?;
            let total: u64 = data_start + group.iter().map(|t| t.byte_len() as u64).sum::<u64>();
            file.set_len(total).map_err(io(&path))?;
            file.write_all(&(header.len() as u64).to_le_bytes())
                .map_err(io(&path))?;
            file.write_all(&header).map_err(io(&path))?;
            let mut offset = data_start;
            for spec in order {
                let len = spec.byte_len() as u64;
                slots.insert(
                    spec.name.clone(),
                    Slot {
                        shard: i,
                        offset,
                        spec,
                        written: false,
                    },
                );
                offset += len;
            }
            shards.push(Shard { file_name, file });
        }
        Ok(BranchWriter {
            final_dir,
            partial_dir,
            preset: preset.copied(),
            source_config: source_config.clone(),
            layout,
            shards,
            slots,
        })
    }

    /// The planned layout.
    pub fn layout(&self) -> &BranchLayout {
        &self.layout
    }

    /// The directory being written (`<out>/<branch>.partial`).
    pub fn partial_dir(&self) -> &Path {
        &self.partial_dir
    }

    /// Packs and writes the four tensors of quantized module `module` (full prefix, e.g.
    /// `model.layers.3.block_sparse_moe.experts.5.w2`).
    ///
    /// # Errors
    /// [`Error::BranchTensor`] if the module is not planned as quantized, was written already, or
    /// packs to other shapes than planned (bits/group size/dims differ); pack errors; I/O errors.
    pub fn write_quantized(&mut self, module: &str, q: &QuantizedLinear) -> Result<()> {
        let w = pack(q).map_err(|e| match e {
            Error::Layout { source, .. } => Error::Layout {
                module: module.to_string(),
                source,
            },
            other => self.tensor_error(module, other.to_string()),
        })?;
        if q.bits != self.layout.bits || q.group_size != self.layout.group_size {
            return Err(self.tensor_error(
                module,
                format!(
                    "quantized with bits {} group_size {}, the branch has bits {} group_size {}",
                    q.bits, q.group_size, self.layout.bits, self.layout.group_size
                ),
            ));
        }
        let shapes = w.shapes();
        let parts: [(&str, Dtype, Vec<usize>, Vec<u8>); 4] = [
            (
                "qweight",
                Dtype::I32,
                shapes.qweight.to_vec(),
                i32_bytes(&w.qweight),
            ),
            (
                "qzeros",
                Dtype::I32,
                shapes.qzeros.to_vec(),
                i32_bytes(&w.qzeros),
            ),
            (
                "scales",
                Dtype::F16,
                shapes.scales.to_vec(),
                f16_bytes(&w.scales),
            ),
            (
                "g_idx",
                Dtype::I32,
                shapes.g_idx.to_vec(),
                i32_bytes(&w.g_idx),
            ),
        ];
        // Check all four before writing any, so a mismatch leaves nothing half-written.
        for (suffix, dtype, shape, _) in &parts {
            self.check_slot(&format!("{module}.{suffix}"), *dtype, shape)?;
        }
        for (suffix, dtype, shape, bytes) in parts {
            self.write_raw(&format!("{module}.{suffix}"), dtype, &shape, &bytes)?;
        }
        Ok(())
    }

    /// Writes a dense tensor given in f32, stored as F16 (round-to-nearest-even).
    ///
    /// # Errors
    /// As [`BranchWriter::write_raw`].
    pub fn write_dense(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        self.write_raw(name, Dtype::F16, shape, &bytes)
    }

    /// Writes a dense tensor already in f16.
    ///
    /// # Errors
    /// As [`BranchWriter::write_raw`].
    pub fn write_dense_f16(&mut self, name: &str, shape: &[usize], values: &[f16]) -> Result<()> {
        self.write_raw(name, Dtype::F16, shape, &f16_bytes(values))
    }

    /// Writes the little-endian bytes of planned tensor `name` at its offset.
    ///
    /// # Errors
    /// [`Error::BranchTensor`] if `name` is not planned, was already written, or `dtype`, `shape` or
    /// the byte count differ from the plan; [`Error::Io`] on a write failure.
    pub fn write_raw(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<()> {
        self.check_slot(name, dtype, shape)?;
        let slot = &self.slots[name];
        if bytes.len() != slot.spec.byte_len() {
            return Err(self.tensor_error(
                name,
                format!(
                    "{} bytes given, expected {}",
                    bytes.len(),
                    slot.spec.byte_len()
                ),
            ));
        }
        let (shard, offset) = (slot.shard, slot.offset);
        let path = self.partial_dir.join(&self.shards[shard].file_name);
        let file = &mut self.shards[shard].file;
        file.seek(SeekFrom::Start(offset)).map_err(io(&path))?;
        file.write_all(bytes).map_err(io(&path))?;
        if let Some(slot) = self.slots.get_mut(name) {
            slot.written = true;
        }
        Ok(())
    }

    /// Writes an additional file into the branch (e.g. `quant_report.json`, calibration metadata).
    ///
    /// # Errors
    /// [`Error::BranchTensor`] for a name with a path separator or one the writer manages itself;
    /// [`Error::Io`] on failure.
    pub fn write_extra_file(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let bad = name.is_empty()
            || name.contains(['/', '\\'])
            || name == "."
            || name == ".."
            || MANAGED_FILES.contains(&name)
            || self.shards.iter().any(|s| s.file_name == name);
        if bad {
            return Err(self.tensor_error(
                name,
                "not a plain file name the writer leaves to the caller".to_string(),
            ));
        }
        write_synced(&self.partial_dir.join(name), bytes)
    }

    /// Names of planned tensors not written yet, sorted.
    pub fn missing(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .slots
            .values()
            .filter(|s| !s.written)
            .map(|s| s.spec.name.clone())
            .collect();
        m.sort();
        m
    }

    /// Completes the branch: checks every tensor was written, writes `quantize_config.json`,
    /// `config.json` (and the shard index), fsyncs every file and the directory, then renames
    /// `<branch>.partial` to `<branch>`, replacing an existing branch only now. Returns the final path.
    ///
    /// # Errors
    /// [`Error::BranchIncomplete`] if a planned tensor was never written (the `.partial` directory
    /// is left as it is); [`Error::Io`] on failure.
    pub fn finish(self) -> Result<PathBuf> {
        let missing = self.missing();
        if let Some(first) = missing.first() {
            return Err(Error::BranchIncomplete {
                dir: self.partial_dir.clone(),
                count: missing.len(),
                first: first.clone(),
            });
        }
        for shard in &self.shards {
            let path = self.partial_dir.join(&shard.file_name);
            shard.file.sync_all().map_err(io(&path))?;
        }
        if self.shards.len() > 1 {
            write_synced(
                &self.partial_dir.join(INDEX_FILE),
                self.index_json().as_bytes(),
            )?;
        }
        let config_json = match &self.preset {
            Some(preset) => {
                write_synced(
                    &self.partial_dir.join("quantize_config.json"),
                    config::quantize_config_json(preset).as_bytes(),
                )?;
                config::branch_config_json(
                    &self.source_config,
                    preset,
                    &self.layout.modules_in_block_to_quantize(),
                )?
            }
            None => config::to_python_json(&self.source_config) + "\n",
        };
        write_synced(
            &self.partial_dir.join("config.json"),
            config_json.as_bytes(),
        )?;
        for name in COPIED_FILES {
            let path = self.partial_dir.join(name);
            if path.is_file() {
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io(&path))?;
            }
        }
        sync_dir(&self.partial_dir)?;
        drop(self.shards);
        let parent = self
            .final_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if self.final_dir.exists() {
            let old = parent.join(format!(
                "{}.replaced-{}",
                self.final_dir
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::process::id()
            ));
            std::fs::rename(&self.final_dir, &old).map_err(io(&self.final_dir))?;
            std::fs::rename(&self.partial_dir, &self.final_dir).map_err(io(&self.final_dir))?;
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        } else {
            std::fs::rename(&self.partial_dir, &self.final_dir).map_err(io(&self.final_dir))?;
        }
        sync_dir(&parent)?;
        Ok(self.final_dir)
    }

    /// `model.safetensors.index.json`: `{"metadata": {"total_size": N}, "weight_map": {...}}`,
    /// indent 2, sorted keys, trailing newline (GPTQModel's `writer.py`, transformers).
    fn index_json(&self) -> String {
        let mut map: BTreeMap<&str, &str> = BTreeMap::new();
        for slot in self.slots.values() {
            map.insert(&slot.spec.name, &self.shards[slot.shard].file_name);
        }
        let mut weight_map = serde_json::Map::new();
        for (k, v) in map {
            weight_map.insert(k.to_string(), Value::from(v));
        }
        let index = serde_json::json!({
            "metadata": { "total_size": self.layout.total_size() },
            "weight_map": Value::Object(weight_map),
        });
        config::to_python_json(&index) + "\n"
    }

    fn check_slot(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
        let Some(slot) = self.slots.get(name) else {
            return Err(self.tensor_error(name, "not in the planned layout".to_string()));
        };
        if slot.written {
            return Err(self.tensor_error(name, "written twice".to_string()));
        }
        if slot.spec.dtype != dtype || slot.spec.shape != shape {
            return Err(self.tensor_error(
                name,
                format!(
                    "got {dtype:?} {shape:?}, the layout plans {:?} {:?}",
                    slot.spec.dtype, slot.spec.shape
                ),
            ));
        }
        Ok(())
    }

    fn tensor_error(&self, name: &str, problem: String) -> Error {
        Error::BranchTensor {
            dir: self.partial_dir.clone(),
            name: name.to_string(),
            problem,
        }
    }
}

/// Splits tensors (in model order) into shards of at most `max` bytes of data each; a tensor larger
/// than `max` gets a shard of its own. `None` keeps one file.
fn split_shards(tensors: &[TensorSpec], max: Option<u64>) -> Vec<Vec<TensorSpec>> {
    let Some(max) = max else {
        return vec![tensors.to_vec()];
    };
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        let len = t.byte_len() as u64;
        if size > 0 && size + len > max {
            shards.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(last) = shards.last_mut() {
            last.push(t.clone());
        }
    }
    shards
}

/// The reference serializer's header for these tensors and their data order (dtype alignment
/// descending, then name), padded with spaces to a multiple of 8.
fn header_for(tensors: &[TensorSpec]) -> std::result::Result<(Vec<u8>, Vec<TensorSpec>), String> {
    let mut order = tensors.to_vec();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let mut offset = 0usize;
    let infos: Vec<(String, TensorInfo)> = order
        .iter()
        .map(|t| {
            let info = TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (offset, offset + t.byte_len()),
            };
            offset += t.byte_len();
            (t.name.clone(), info)
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(meta), infos).map_err(|e| e.to_string())?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| e.to_string())?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok((header, order))
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a whole file and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// fsyncs a directory so renames and new entries are durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> Result<()> {
    match File::open(dir) {
        Ok(f) => match f.sync_all() {
            Ok(()) => Ok(()),
            // Some platforms/filesystems refuse fsync on directories; the data files are synced.
            Err(e)
                if e.kind() == std::io::ErrorKind::InvalidInput
                    || e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Ok(())
            }
            Err(source) => Err(Error::Io {
                path: dir.to_path_buf(),
                source,
            }),
        },
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::synthetic_layer;
    use safetensors::SafeTensors;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/moe-s")
    }

    fn source_config() -> Value {
        config::read_json(&fixture_dir().join("config.json")).unwrap()
    }

    /// Writes every tensor of `w` from synthetic data; returns the layers' QuantizedLinears by name.
    fn fill(w: &mut BranchWriter, seed: u64) -> HashMap<String, QuantizedLinear> {
        let layout = w.layout().clone();
        let mut quantized = HashMap::new();
        for (i, t) in layout.tensors.iter().enumerate() {
            if let Some(module) = t.name.strip_suffix(".qweight") {
                let rel = module.splitn(4, '.').nth(3).unwrap();
                let (k, n) = layout.dims.linear_shape(rel).unwrap();
                let q = synthetic_layer(
                    layout.bits,
                    layout.group_size,
                    k,
                    n,
                    true,
                    true,
                    seed + i as u64,
                );
                w.write_quantized(module, &q).unwrap();
                quantized.insert(module.to_string(), q);
            } else if t.dtype == Dtype::F16 && !t.name.ends_with(".scales") {
                let n: usize = t.shape.iter().product();
                let v: Vec<f32> = (0..n).map(|j| ((j % 97) as f32 - 48.0) / 64.0).collect();
                w.write_dense(&t.name, &t.shape, &v).unwrap();
            }
        }
        quantized
    }

    #[test]
    fn single_file_branch_reads_back_with_the_safetensors_crate() {
        let out = tempfile::tempdir().unwrap();
        let preset = Preset::by_name("gptq-3bit-128g-actorder_True").unwrap();
        let mut w =
            BranchWriter::create(out.path(), &preset, &source_config(), &fixture_dir(), None)
                .unwrap();
        assert!(out
            .path()
            .join("gptq-3bit-128g-actorder_True.partial")
            .is_dir());
        // 4 layers × (28 modules × 4 + 3 dense) + embed, norm, lm_head.
        assert_eq!(w.layout().tensors.len(), 4 * (28 * 4 + 3) + 3);
        let quantized = fill(&mut w, 10);
        let dir = w.finish().unwrap();
        assert_eq!(dir, out.path().join(preset.name));
        assert!(!out
            .path()
            .join("gptq-3bit-128g-actorder_True.partial")
            .exists());
        for f in [
            "config.json",
            "quantize_config.json",
            MODEL_FILE,
            "tokenizer.json",
            "tokenizer.model",
            "generation_config.json",
        ] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        assert_eq!(
            std::fs::read(dir.join("tokenizer.json")).unwrap(),
            std::fs::read(fixture_dir().join("tokenizer.json")).unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("quantize_config.json"))
                .unwrap()
                .len(),
            186
        );

        let bytes = std::fs::read(dir.join(MODEL_FILE)).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 4 * (28 * 4 + 3) + 3);
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
        // The header is byte-identical to what the reference serializer writes for the same tensors.
        let views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
        let reference = safetensors::serialize(
            views,
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        )
        .unwrap();
        assert_eq!(reference, bytes);

        // Tensors unpack to what was written.
        let module = "model.layers.2.block_sparse_moe.experts.5.w2";
        let q = &quantized[module];
        let words = |name: &str| -> Vec<i32> {
            st.tensor(&format!("{module}.{name}"))
                .unwrap()
                .data()
                .chunks(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert_eq!(
            st.tensor(&format!("{module}.qweight")).unwrap().shape(),
            &[512 * 3 / 32, 256]
        );
        assert_eq!(
            st.tensor(&format!("{module}.scales")).unwrap().dtype(),
            Dtype::F16
        );
        let gw = runtime::qlinear::GptqWeight {
            bits: 3,
            group_size: 128,
            in_features: 512,
            out_features: 256,
            qweight: words("qweight"),
            qzeros: words("qzeros"),
            scales: st
                .tensor(&format!("{module}.scales"))
                .unwrap()
                .data()
                .chunks(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect(),
            g_idx: words("g_idx"),
        };
        gw.check().unwrap();
        assert_eq!(gw, pack(q).unwrap());
        let embed = st.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!(
            (embed.dtype(), embed.shape()),
            (Dtype::F16, &[32000usize, 256][..])
        );
    }

    #[test]
    fn sharded_branch_has_an_index_and_replaces_the_old_one_only_when_complete() {
        let out = tempfile::tempdir().unwrap();
        let preset = Preset::by_name("main").unwrap();
        // First, a complete branch.
        let mut w =
            BranchWriter::create(out.path(), &preset, &source_config(), &fixture_dir(), None)
                .unwrap();
        fill(&mut w, 1);
        let dir = w.finish().unwrap();
        // A second run is interrupted: the old branch stays, a .partial is left.
        let mut w = BranchWriter::create(
            out.path(),
            &preset,
            &source_config(),
            &fixture_dir(),
            Some(8 << 20),
        )
        .unwrap();
        w.write_dense("model.norm.weight", &[256], &[1.0; 256])
            .unwrap();
        let missing = w.missing().len();
        let err = w.finish().unwrap_err();
        assert!(
            matches!(err, Error::BranchIncomplete { count, .. } if count == missing),
            "{err}"
        );
        assert!(dir.join(MODEL_FILE).is_file() && out.path().join("main.partial").is_dir());
        // A third, complete, sharded run replaces it.
        let mut w = BranchWriter::create(
            out.path(),
            &preset,
            &source_config(),
            &fixture_dir(),
            Some(8 << 20),
        )
        .unwrap();
        fill(&mut w, 2);
        assert!(w
            .write_dense("model.norm.weight", &[256], &[0.0; 256])
            .unwrap_err()
            .to_string()
            .contains("written twice"));
        w.write_extra_file("quant_report.json", b"{}").unwrap();
        assert!(w.write_extra_file("config.json", b"{}").is_err());
        assert!(w.write_extra_file("../x", b"{}").is_err());
        let total = w.layout().total_size();
        let dir = w.finish().unwrap();
        assert!(!dir.join(MODEL_FILE).exists());
        assert!(dir.join("quant_report.json").is_file());
        let entries: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, vec!["main".to_string()]);
        let index_text = std::fs::read_to_string(dir.join(INDEX_FILE)).unwrap();
        assert!(
            index_text.starts_with("{\n  \"metadata\": {\n    \"total_size\": ")
                && index_text.ends_with("}\n")
        );
        let index: Value = serde_json::from_str(&index_text).unwrap();
        assert_eq!(index["metadata"]["total_size"], total);
        let map = index["weight_map"].as_object().unwrap();
        let keys: Vec<&String> = map.keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        let files: std::collections::BTreeSet<&str> =
            map.values().map(|v| v.as_str().unwrap()).collect();
        assert!(files.len() >= 3, "{files:?}");
        let mut seen = 0;
        for f in &files {
            assert!(
                f.starts_with("model-0000")
                    && f.ends_with(&format!("-of-{:05}.safetensors", files.len())),
                "{f}"
            );
            let bytes = std::fs::read(dir.join(f)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for name in st.names() {
                assert_eq!(map[name], *f);
                seen += 1;
            }
        }
        assert_eq!(seen, map.len());
    }

    #[test]
    fn wrong_shapes_and_unknown_names_are_refused() {
        let out = tempfile::tempdir().unwrap();
        let preset = Preset::by_name("gptq-4bit-32g-actorder_True").unwrap();
        let mut w =
            BranchWriter::create(out.path(), &preset, &source_config(), &fixture_dir(), None)
                .unwrap();
        let q = synthetic_layer(4, 32, 256, 64, true, true, 1);
        let e = w
            .write_quantized("model.layers.0.self_attn.q_proj", &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("q_proj") && e.contains("[32, 256]"), "{e}");
        let q = synthetic_layer(4, 128, 256, 64, true, true, 1);
        let e = w
            .write_quantized("model.layers.0.self_attn.k_proj", &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_size 128"), "{e}");
        let q = synthetic_layer(4, 32, 256, 8, false, true, 1);
        let e = w
            .write_quantized("model.layers.0.block_sparse_moe.gate", &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in the planned layout"), "{e}");
        let e = w
            .write_dense("lm_head.weight", &[32000, 255], &vec![0.0; 32000 * 255])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lm_head.weight"), "{e}");
        drop(w);
        assert!(out
            .path()
            .join("gptq-4bit-32g-actorder_True.partial")
            .is_dir());
        assert!(!out.path().join("gptq-4bit-32g-actorder_True").exists());
    }
}
