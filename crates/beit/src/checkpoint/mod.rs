//! Checkpoint files in the Hugging Face layout: finding them in a directory and reading their tensors.
//! safetensors (single or sharded) is memory-mapped; pytorch_model.bin is read by our own pickle interpreter,
//! which executes nothing.

pub mod msgpack;
pub mod pickle;
pub mod timm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{BeitError, Result};

/// A checkpoint's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// model.safetensors (or sharded).
    Safetensors,
    /// pytorch_model.bin (or sharded).
    PytorchBin,
    /// flax_model.msgpack.
    FlaxMsgpack,
}

impl WeightsFormat {
    /// "safetensors", "bin"/"pytorch" or "msgpack"/"flax".
    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "safetensors" => Ok(WeightsFormat::Safetensors),
            "bin" | "pytorch" => Ok(WeightsFormat::PytorchBin),
            "msgpack" | "flax" => Ok(WeightsFormat::FlaxMsgpack),
            other => Err(BeitError::invalid_input(
                "weights format",
                format!("unknown format {other:?}; expected safetensors, bin or msgpack"),
            )),
        }
    }
}

/// The weight files of a model directory, in transformers' order of preference: model.safetensors, its sharded
/// index, pytorch_model.bin, its sharded index, flax_model.msgpack. `force` picks one format.
pub fn find_weight_files(dir: &Path, force: Option<WeightsFormat>) -> Result<(WeightsFormat, Vec<PathBuf>)> {
    let candidates = [
        (WeightsFormat::Safetensors, "model.safetensors", "model.safetensors.index.json"),
        (WeightsFormat::PytorchBin, "pytorch_model.bin", "pytorch_model.bin.index.json"),
        (WeightsFormat::FlaxMsgpack, "flax_model.msgpack", "flax_model.msgpack.index.json"),
    ];
    for (format, single, index) in candidates {
        if force.is_some_and(|f| f != format) {
            continue;
        }
        let path = dir.join(single);
        if path.is_file() {
            return Ok((format, vec![path]));
        }
        let index = dir.join(index);
        if index.is_file() {
            return Ok((format, shard_files(&index)?));
        }
    }
    let looked: Vec<&str> = candidates
        .iter()
        .filter(|(f, _, _)| force.is_none_or(|g| g == *f))
        .flat_map(|(_, a, b)| [*a, *b])
        .collect();
    Err(BeitError::checkpoint(dir, format!("no weights found: looked for {}", looked.join(", "))))
}

/// The shard file names a sharded checkpoint's index names (its `weight_map` values), each once, in order.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| BeitError::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| BeitError::Json { path: index.to_path_buf(), message: e.to_string() })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        BeitError::checkpoint(index, "expected an object `weight_map` mapping tensor names to shard files")
    })?;
    let mut files: Vec<String> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| BeitError::checkpoint(index, format!("weight_map[{name:?}] is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file.starts_with("..") {
            return Err(BeitError::checkpoint(index, format!("shard name {file:?} leaves the model directory")));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    if files.is_empty() {
        return Err(BeitError::checkpoint(index, "weight_map is empty"));
    }
    Ok(files)
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(shard_names(index)?.into_iter().map(|f| dir.join(f)).collect())
}

/// The format of a single weights file the user named, from its name.
pub fn weights_file(path: &Path) -> Result<(WeightsFormat, Vec<PathBuf>)> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with(".index.json") {
        let format = if name.contains("safetensors") { WeightsFormat::Safetensors } else { WeightsFormat::PytorchBin };
        return Ok((format, shard_files(path)?));
    }
    let format = if name.ends_with(".safetensors") {
        WeightsFormat::Safetensors
    } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
        WeightsFormat::PytorchBin
    } else if name.ends_with(".msgpack") {
        WeightsFormat::FlaxMsgpack
    } else {
        return Err(BeitError::checkpoint(
            path,
            "unknown weights format: expected .safetensors, .bin, .msgpack or an .index.json",
        ));
    };
    Ok((format, vec![path.to_path_buf()]))
}

/// Every tensor of the given files, by name.
pub fn load_tensors(format: WeightsFormat, files: &[PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in files {
        let tensors = match format {
            WeightsFormat::Safetensors => read_safetensors(f, device)?,
            WeightsFormat::PytorchBin => raw_to_tensors(f, pickle::read_torch_checkpoint(f)?, device)?,
            WeightsFormat::FlaxMsgpack => raw_to_tensors(f, msgpack::read_flax_as_pytorch(f)?, device)?,
        };
        for (name, t) in tensors {
            if all.insert(name.clone(), t).is_some() {
                return Err(BeitError::checkpoint(f, format!("tensor `{name}` appears in more than one shard")));
            }
        }
    }
    Ok(all)
}

/// Every tensor of one safetensors file, memory-mapped while read.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path).map_err(|e| BeitError::io(path, e))?;
    // SAFETY: the map is read-only and dropped before returning; a file changed underneath us while loading
    // can only yield wrong numbers, which the format's own checks then catch or not, as for any reader.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| BeitError::io(path, e))?;
    // Each tensor is copied out of the map; handing its pages back right after keeps the peak resident memory
    // near one copy of the weights instead of two (the file's pages stay in the page cache).
    parse_safetensors_with(&mmap, path, device, |data| {
        let offset = data.as_ptr() as usize - mmap.as_ptr() as usize;
        // SAFETY: DONTNEED on a read-only file mapping only drops this process's copies of the pages; any later
        // read of them (the next tensor sharing a page) faults them back in from the file.
        #[cfg(unix)]
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len()) };
        let _ = offset;
    })
}

/// [`read_safetensors`] on bytes already in memory; `origin` only names them in errors.
pub fn parse_safetensors(bytes: &[u8], origin: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    parse_safetensors_with(bytes, origin, device, |_| {})
}

/// [`parse_safetensors`], calling `copied` with each tensor's bytes once they are copied out.
fn parse_safetensors_with(bytes: &[u8], origin: &Path, device: &Device, mut copied: impl FnMut(&[u8])) -> Result<Vec<(String, Tensor)>> {
    let path = origin;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| BeitError::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::I32 => DType::I32,
            safetensors::Dtype::U8 | safetensors::Dtype::BOOL => DType::U8,
            safetensors::Dtype::U32 => DType::U32,
            other => {
                return Err(BeitError::checkpoint(path, format!("tensor `{name}` has unsupported dtype {other:?}")))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
            .map_err(|e| BeitError::checkpoint(path, format!("tensor `{name}`: {e}")))?;
        copied(view.data());
        out.push((name, t));
    }
    Ok(out)
}

/// Tensors from the pickle or msgpack readers (raw little-endian bytes) as candle tensors.
fn raw_to_tensors(path: &Path, raw: Vec<(String, pickle::RawTensor)>, device: &Device) -> Result<Vec<(String, Tensor)>> {
    use pickle::PtDtype;
    raw.into_iter()
        .map(|(name, r)| {
            let dtype = match r.dtype {
                PtDtype::F64 => DType::F64,
                PtDtype::F32 => DType::F32,
                PtDtype::F16 => DType::F16,
                PtDtype::BF16 => DType::BF16,
                PtDtype::I64 => DType::I64,
                PtDtype::I32 => DType::I32,
                PtDtype::U8 | PtDtype::Bool => DType::U8,
                PtDtype::I16 | PtDtype::I8 => {
                    return Err(BeitError::checkpoint(path, format!("tensor `{name}` has unsupported dtype {:?}", r.dtype)))
                }
            };
            let t = Tensor::from_raw_buffer(&r.data, dtype, &r.shape, device)
                .map_err(|e| BeitError::checkpoint(path, format!("tensor `{name}`: {e}")))?;
            Ok((name, t))
        })
        .collect()
}

/// Makes a checkpoint's names fit the class being built, as transformers does with `base_model_prefix`:
/// a bare backbone checkpoint loads into a head class under `beit.`, and a head checkpoint into BeitModel with
/// `beit.` stripped (its head tensors are then reported unused).
pub fn align_prefix(tensors: HashMap<String, Tensor>, prefix: &str, model_has_prefix: bool) -> HashMap<String, Tensor> {
    let dotted = format!("{prefix}.");
    let checkpoint_has_prefix = tensors.keys().any(|k| k.starts_with(&dotted));
    match (model_has_prefix, checkpoint_has_prefix) {
        (true, false) => tensors.into_iter().map(|(k, v)| (format!("{dotted}{k}"), v)).collect(),
        (false, true) => {
            let (base, heads): (Vec<_>, Vec<_>) = tensors.into_iter().partition(|(k, _)| k.starts_with(&dotted));
            let mut out: HashMap<String, Tensor> =
                base.into_iter().map(|(k, v)| (k[dotted.len()..].to_string(), v)).collect();
            // A head's own tensors stay (reported unused) but never shadow the backbone's: BeitForMaskedImageModeling
            // has a top-level `layernorm` beside `beit.layernorm`, and transformers loads the latter into BeitModel.
            for (k, v) in heads {
                out.entry(k).or_insert(v);
            }
            out
        }
        _ => tensors,
    }
}

#[cfg(test)]
mod align_prefix_tests {
    use super::*;

    #[test]
    fn the_backbone_wins_over_a_head_tensor_of_the_same_name() {
        let t = |x: f32| Tensor::new(&[x], &candle_core::Device::Cpu).unwrap();
        for _ in 0..8 {
            // HashMap order varies between maps: the answer must not.
            let ckpt: HashMap<String, Tensor> =
                [("beit.layernorm.weight", 1.0), ("layernorm.weight", 2.0), ("lm_head.weight", 3.0)]
                    .into_iter()
                    .map(|(k, x)| (k.to_string(), t(x)))
                    .collect();
            let out = align_prefix(ckpt, "beit", false);
            assert_eq!(out["layernorm.weight"].to_vec1::<f32>().unwrap(), [1.0]);
            assert!(out.contains_key("lm_head.weight"));
        }
    }
}

/// Renames `from.`-prefixed tensors to `to.`: Data2VecVision checkpoints keep the backbone under
/// `data2vec_vision.` where the BEiT modules read `beit.`. Other names are left alone.
pub fn rename_prefix(tensors: HashMap<String, Tensor>, from: &str, to: &str) -> HashMap<String, Tensor> {
    let from = format!("{from}.");
    tensors
        .into_iter()
        .map(|(k, v)| match k.strip_prefix(&from) {
            Some(rest) => (format!("{to}.{rest}"), v),
            None => (k, v),
        })
        .collect()
}
