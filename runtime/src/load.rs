//! A Mixtral checkpoint on disk: `config.json` plus one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped so that one tensor (or one layer) is read without
//! touching the rest of the file.
//!
//! [`Checkpoint::open`] reads only the headers and checks every tensor's presence, shape and dtype
//! against the config; values are converted to f32 (from bf16, f16 or f32) and checked for NaN/Inf
//! when a tensor is read. GPTQ branches (a `quantization_config` in `config.json`) store the
//! quantized modules as `qweight`/`qzeros`/`scales`/`g_idx` (spec §2); on the CPU they are
//! dequantized to dense f32 when read.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;

use crate::backend::{Backend, HostTensor};
use crate::config::MixtralConfig;
use crate::error::{Error, Result};
use crate::mixtral::{ExpertWeights, HeadWeights, LayerWeights};
use crate::qlinear::{gptq_shapes, GptqWeight};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// What a tensor's dtype may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A float weight: BF16, F16 or F32.
    Float,
    /// Packed GPTQ integers (`qweight`, `qzeros`, `g_idx`): I32.
    Int,
}

/// One tensor a checkpoint of this config must (or may) hold.
#[derive(Debug, Clone)]
struct Expected {
    shape: Vec<usize>,
    kind: Kind,
    optional: bool,
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

/// Where a tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    info: TensorInfo,
}

/// An opened, validated checkpoint whose tensors are read lazily from memory-mapped files.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: MixtralConfig,
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

/// The block-relative names of the linear modules of a layer, e.g. `self_attn.q_proj`.
fn linear_suffixes(config: &MixtralConfig) -> Vec<(String, usize, usize)> {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let q = config.num_attention_heads * config.head_dim();
    let kv = config.num_key_value_heads * config.head_dim();
    let mut out = vec![
        ("self_attn.q_proj".to_string(), q, h),
        ("self_attn.k_proj".to_string(), kv, h),
        ("self_attn.v_proj".to_string(), kv, h),
        ("self_attn.o_proj".to_string(), h, q),
    ];
    for e in 0..config.num_local_experts {
        let p = format!("block_sparse_moe.experts.{e}");
        out.push((format!("{p}.w1"), i, h));
        out.push((format!("{p}.w2"), h, i));
        out.push((format!("{p}.w3"), i, h));
    }
    out
}

/// Every tensor name a checkpoint of `config` holds, with its shape and dtype class.
fn expected_tensors(config: &MixtralConfig) -> BTreeMap<String, Expected> {
    let (h, v) = (config.hidden_size, config.vocab_size);
    let mut out = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>, kind: Kind, optional: bool| {
        out.insert(
            name,
            Expected {
                shape,
                kind,
                optional,
            },
        );
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        Kind::Float,
        false,
    );
    add("model.norm.weight".into(), vec![h], Kind::Float, false);
    add(
        "lm_head.weight".into(),
        vec![v, h],
        Kind::Float,
        config.tie_word_embeddings,
    );
    let q = config.quantization_config.as_ref();
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            Kind::Float,
            false,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Kind::Float,
            false,
        );
        add(
            format!("{p}.block_sparse_moe.gate.weight"),
            vec![config.num_local_experts, h],
            Kind::Float,
            false,
        );
        for (suffix, out_f, in_f) in linear_suffixes(config) {
            let m = format!("{p}.{suffix}");
            match q {
                Some(q) if q.quantizes(&suffix) => {
                    let s = gptq_shapes(q.bits, q.group_size, in_f, out_f);
                    add(format!("{m}.qweight"), s.qweight.to_vec(), Kind::Int, false);
                    add(format!("{m}.qzeros"), s.qzeros.to_vec(), Kind::Int, false);
                    add(format!("{m}.scales"), s.scales.to_vec(), Kind::Float, false);
                    add(format!("{m}.g_idx"), s.g_idx.to_vec(), Kind::Int, false);
                    add(format!("{m}.bias"), vec![out_f], Kind::Float, true);
                }
                _ => add(format!("{m}.weight"), vec![out_f, in_f], Kind::Float, false),
            }
        }
    }
    out
}

fn dtype_ok(kind: Kind, dtype: Dtype) -> bool {
    match kind {
        Kind::Float => matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32),
        Kind::Int => dtype == Dtype::I32,
    }
}

fn io_err(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    let what = what.to_owned();
    move |source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile { path, what },
        _ => Error::Io { path, source },
    }
}

impl Shard {
    fn open(path: &Path) -> Result<(Self, HashMap<String, TensorInfo>)> {
        let file = File::open(path).map_err(io_err(path, "a checkpoint shard"))?;
        // SAFETY: the file is opened read-only; like every safetensors loader we assume it is not
        // modified while mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path, "a checkpoint shard"))?;
        let (n, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::SafetensorsHeader {
                path: path.to_owned(),
                problem: e.to_string(),
            })?;
        let infos = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok((
            Shard {
                path: path.to_owned(),
                mmap,
                data_start: 8 + n,
            },
            infos,
        ))
    }
}

/// Converts little-endian bf16/f16/f32 bytes to f32.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    match dtype {
        Dtype::BF16 => {
            let mut out = vec![0f32; bytes.len() / 2];
            out.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(2 * CHUNK))
                .for_each(|(o, b)| {
                    for (o, b) in o.iter_mut().zip(b.chunks_exact(2)) {
                        *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                    }
                });
            out
        }
        Dtype::F16 => {
            let mut out = vec![0f32; bytes.len() / 2];
            out.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(2 * CHUNK))
                .for_each(|(o, b)| {
                    for (o, b) in o.iter_mut().zip(b.chunks_exact(2)) {
                        *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                    }
                });
            out
        }
        _ => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: reads `config.json`, maps the safetensors file(s) and checks
    /// the tensor set, shapes and dtypes against the config (headers only; no weight is read).
    ///
    /// # Errors
    /// [`Error::MissingFile`], [`Error::SafetensorsHeader`], [`Error::MissingTensor`],
    /// [`Error::ExtraTensor`], [`Error::TensorShape`], [`Error::TensorDtype`],
    /// [`Error::ShardIndex`], config errors from [`MixtralConfig::from_file`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir,
                what: "the model directory".into(),
            });
        }
        let config = MixtralConfig::from_file(&dir.join("config.json"))?;
        let index_path = dir.join(INDEX_FILE);
        let (shards, tensors, listing) = if index_path.is_file() {
            Self::open_sharded(&dir, &index_path)?
        } else {
            let path = dir.join(SINGLE_FILE);
            if !path.is_file() {
                return Err(Error::MissingFile {
                    path,
                    what: format!("the weights (no {INDEX_FILE} either)"),
                });
            }
            let (shard, infos) = Shard::open(&path)?;
            let tensors = infos
                .into_iter()
                .map(|(name, info)| (name, Entry { shard: 0, info }))
                .collect();
            (vec![shard], tensors, path)
        };
        let checkpoint = Checkpoint {
            dir,
            config,
            shards,
            tensors,
        };
        checkpoint.validate(&listing)?;
        Ok(checkpoint)
    }

    fn open_sharded(
        dir: &Path,
        index_path: &Path,
    ) -> Result<(Vec<Shard>, HashMap<String, Entry>, PathBuf)> {
        let text =
            std::fs::read_to_string(index_path).map_err(io_err(index_path, "the shard index"))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index_path.to_owned(),
                source,
            })?;
        let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(Error::ShardIndex {
                path: index_path.to_owned(),
                problem: "no `weight_map` object".into(),
            });
        };
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let Some(file) = file.as_str() else {
                return Err(Error::ShardIndex {
                    path: index_path.to_owned(),
                    problem: format!("`weight_map` entry for `{name}` is not a file name"),
                });
            };
            if file.contains("..") || Path::new(file).is_absolute() {
                return Err(Error::ShardIndex {
                    path: index_path.to_owned(),
                    problem: format!("shard name `{file}` leaves the model directory"),
                });
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_owned());
            }
        }
        files.sort();
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(Error::MissingFile {
                    path,
                    what: format!("a shard listed in {}", index_path.display()),
                });
            }
            let (shard, infos) = Shard::open(&path)?;
            for (name, info) in infos {
                if map.get(&name).and_then(|f| f.as_str()) != Some(file.as_str()) {
                    return Err(Error::ExtraTensor {
                        path: path.clone(),
                        name,
                    });
                }
                tensors.insert(name, Entry { shard: i, info });
            }
            shards.push(shard);
        }
        if let Some((name, file)) = map.iter().find(|(name, _)| !tensors.contains_key(*name)) {
            return Err(Error::ShardIndex {
                path: index_path.to_owned(),
                problem: format!("`{name}` is listed in {file} but that shard does not hold it"),
            });
        }
        Ok((shards, tensors, index_path.to_owned()))
    }

    fn validate(&self, listing: &Path) -> Result<()> {
        let expected = expected_tensors(&self.config);
        for (name, exp) in &expected {
            let Some(entry) = self.tensors.get(name) else {
                if exp.optional {
                    continue;
                }
                return Err(Error::MissingTensor {
                    path: listing.to_owned(),
                    name: name.clone(),
                });
            };
            let path = &self.shards[entry.shard].path;
            if entry.info.shape != exp.shape {
                return Err(Error::TensorShape {
                    path: path.clone(),
                    name: name.clone(),
                    expected: exp.shape.clone(),
                    got: entry.info.shape.clone(),
                });
            }
            if !dtype_ok(exp.kind, entry.info.dtype) {
                return Err(Error::TensorDtype {
                    path: path.clone(),
                    name: name.clone(),
                    expected: match exp.kind {
                        Kind::Float => "BF16, F16 or F32".into(),
                        Kind::Int => "I32".into(),
                    },
                    got: format!("{:?}", entry.info.dtype),
                });
            }
        }
        let mut extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|n| !expected.contains_key(*n))
            .collect();
        extra.sort();
        if let Some(name) = extra.first() {
            let path = self.shards[self.tensors[*name].shard].path.clone();
            return Err(Error::ExtraTensor {
                path,
                name: (*name).clone(),
            });
        }
        Ok(())
    }

    /// The directory the checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &MixtralConfig {
        &self.config
    }

    /// Names of all tensors in the checkpoint, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort();
        names
    }

    fn entry(&self, name: &str) -> Result<(&Entry, &Shard)> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            name: name.to_owned(),
        })?;
        Ok((entry, &self.shards[entry.shard]))
    }

    fn bytes(&self, name: &str) -> Result<(&Entry, &Shard, &[u8])> {
        let (entry, shard) = self.entry(name)?;
        let (a, b) = entry.info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + a..shard.data_start + b)
            .ok_or_else(|| Error::SafetensorsHeader {
                path: shard.path.clone(),
                problem: format!("data of `{name}` lies outside the file"),
            })?;
        Ok((entry, shard, bytes))
    }

    /// Reads a float tensor as f32 (from bf16, f16 or f32), checking that every value is finite.
    ///
    /// # Errors
    /// [`Error::MissingTensor`], [`Error::TensorDtype`] for integer tensors, [`Error::NonFinite`].
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let (entry, shard, bytes) = self.bytes(name)?;
        let dtype = entry.info.dtype;
        if !dtype_ok(Kind::Float, dtype) {
            return Err(Error::TensorDtype {
                path: shard.path.clone(),
                name: name.to_owned(),
                expected: "BF16, F16 or F32".into(),
                got: format!("{dtype:?}"),
            });
        }
        let data = to_f32(dtype, bytes);
        if let Some((index, &value)) = data
            .par_iter()
            .enumerate()
            .find_first(|(_, v)| !v.is_finite())
        {
            return Err(Error::NonFinite {
                path: shard.path.clone(),
                name: name.to_owned(),
                index,
                value,
            });
        }
        Ok(HostTensor {
            shape: entry.info.shape.clone(),
            data,
        })
    }

    fn read_i32(&self, name: &str) -> Result<Vec<i32>> {
        let (entry, shard, bytes) = self.bytes(name)?;
        if entry.info.dtype != Dtype::I32 {
            return Err(Error::TensorDtype {
                path: shard.path.clone(),
                name: name.to_owned(),
                expected: "I32".into(),
                got: format!("{:?}", entry.info.dtype),
            });
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Whether the linear module `prefix` (e.g. `model.layers.0.self_attn.q_proj`) is stored
    /// GPTQ-quantized.
    pub fn is_quantized(&self, prefix: &str) -> bool {
        self.tensors.contains_key(&format!("{prefix}.qweight"))
    }

    /// The GPTQ tensors of the quantized linear module `prefix`, checked for consistency.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] if the module is not quantized, [`Error::Quantized`] if its tensors
    /// are inconsistent, [`Error::NonFinite`] for a bad scale.
    pub fn gptq_weight(&self, prefix: &str) -> Result<GptqWeight> {
        let q = self.config.quantization_config.as_ref();
        let scales_name = format!("{prefix}.scales");
        let scales = self.read(&scales_name)?;
        let (g, n) = match scales.shape[..] {
            [g, n] => (g, n),
            _ => (0, 0),
        };
        let g_idx = self.read_i32(&format!("{prefix}.g_idx"))?;
        let w = GptqWeight {
            bits: q.map_or(4, |q| q.bits),
            group_size: q.map_or(-1, |q| q.group_size),
            in_features: g_idx.len(),
            out_features: n,
            qweight: self.read_i32(&format!("{prefix}.qweight"))?,
            qzeros: self.read_i32(&format!("{prefix}.qzeros"))?,
            scales: scales
                .data
                .iter()
                .map(|&s| half::f16::from_f32(s))
                .collect(),
            g_idx,
        };
        let _ = g;
        w.check().map_err(|source| Error::Quantized {
            path: self
                .entry(&scales_name)
                .map(|(_, s)| s.path.clone())
                .unwrap_or_default(),
            module: prefix.to_owned(),
            source,
        })?;
        Ok(w)
    }

    /// The dense `[out, in]` f32 weight of the linear module `prefix`: `prefix.weight` as stored,
    /// or the dequantized GPTQ tensors (the optional GPTQ bias, zeros in AutoGPTQ 0.6, is ignored).
    ///
    /// # Errors
    /// As [`read`](Self::read) and [`gptq_weight`](Self::gptq_weight).
    pub fn linear(&self, prefix: &str) -> Result<HostTensor> {
        if self.is_quantized(prefix) {
            let w = self.gptq_weight(prefix)?;
            let shape = vec![w.out_features, w.in_features];
            Ok(HostTensor {
                shape,
                data: w.dequantize(),
            })
        } else {
            self.read(&format!("{prefix}.weight"))
        }
    }

    /// The weights of decoder layer `layer` on `backend`.
    ///
    /// # Errors
    /// [`Error::Input`] for a layer index out of range, and as [`linear`](Self::linear).
    pub fn load_layer_on<B: Backend>(
        &self,
        backend: &B,
        layer: usize,
    ) -> Result<LayerWeights<B::Tensor>> {
        if layer >= self.config.num_hidden_layers {
            return Err(Error::Input(format!(
                "layer {layer} does not exist ({} layers)",
                self.config.num_hidden_layers
            )));
        }
        let p = format!("model.layers.{layer}");
        let up = |t: HostTensor| backend.upload(t);
        let experts = (0..self.config.num_local_experts)
            .map(|e| {
                let m = format!("{p}.block_sparse_moe.experts.{e}");
                Ok(ExpertWeights {
                    w1: up(self.linear(&format!("{m}.w1"))?)?,
                    w2: up(self.linear(&format!("{m}.w2"))?)?,
                    w3: up(self.linear(&format!("{m}.w3"))?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LayerWeights {
            input_layernorm: up(self.read(&format!("{p}.input_layernorm.weight"))?)?,
            q_proj: up(self.linear(&format!("{p}.self_attn.q_proj"))?)?,
            k_proj: up(self.linear(&format!("{p}.self_attn.k_proj"))?)?,
            v_proj: up(self.linear(&format!("{p}.self_attn.v_proj"))?)?,
            o_proj: up(self.linear(&format!("{p}.self_attn.o_proj"))?)?,
            post_attention_layernorm: up(
                self.read(&format!("{p}.post_attention_layernorm.weight"))?
            )?,
            gate: up(self.read(&format!("{p}.block_sparse_moe.gate.weight"))?)?,
            experts,
        })
    }

    /// The weights of decoder layer `layer` as CPU candle tensors (what the GPTQ driver edits).
    ///
    /// # Errors
    /// As [`load_layer_on`](Self::load_layer_on).
    pub fn load_layer(&self, layer: usize) -> Result<LayerWeights<candle_core::Tensor>> {
        self.load_layer_on(&crate::cpu::CpuBackend, layer)
    }

    /// The token embedding table `[vocab, hidden]` on `backend`.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn load_embedding_on<B: Backend>(&self, backend: &B) -> Result<B::Tensor> {
        backend.upload(self.read("model.embed_tokens.weight")?)
    }

    /// The token embedding table `[vocab, hidden]` as a CPU candle tensor.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn load_embedding(&self) -> Result<candle_core::Tensor> {
        self.load_embedding_on(&crate::cpu::CpuBackend)
    }

    /// The final norm and `lm_head` (the embedding when `tie_word_embeddings`) on `backend`.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn load_head_on<B: Backend>(&self, backend: &B) -> Result<HeadWeights<B::Tensor>> {
        let lm_head = if self.tensors.contains_key("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        Ok(HeadWeights {
            norm: backend.upload(self.read("model.norm.weight")?)?,
            lm_head: backend.upload(self.read(lm_head)?)?,
        })
    }

    /// The final norm and `lm_head` as CPU candle tensors.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn load_head(&self) -> Result<HeadWeights<candle_core::Tensor>> {
        self.load_head_on(&crate::cpu::CpuBackend)
    }
}
