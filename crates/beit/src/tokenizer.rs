//! The DALL-E dVAE encoder (OpenAI's `dall_e` package, `dall_e.encoder.Encoder`): BEiT's visual tokenizer.
//! Pixels in [0, 1] go through `map_pixels`, then the encoder gives vocabulary logits on a grid 8x coarser than
//! the image; the tokens BEiT predicts are their argmax.
//!
//! Loads the published `encoder.pkl` (`torch.save(encoder)`: the whole module pickled) with our own pickle reader,
//! which executes nothing and only accepts the `dall_e` module classes besides torch's own, or a safetensors
//! state dict with the same names (`blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w`, ...).
//! Hyper-parameters come from the tensors' shapes, so any `Encoder(n_hid, n_blk_per_group, input_channels,
//! vocab_size)` loads.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::pickle::{read_torch_checkpoint_with, PtDtype, RawTensor};
use crate::checkpoint::read_safetensors;
use crate::error::{BeitError, Result};

/// `dall_e.utils.logit_laplace_eps`.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

/// `Encoder.group_count`: a class constant in dall_e, not a constructor argument.
pub const GROUP_COUNT: usize = 4;

/// The module classes a published encoder.pkl pickles (Encoder, EncoderBlock, Conv2d); torch.nn's own
/// (Sequential, ReLU, MaxPool2d, Identity) are allowed by the reader already.
pub const DALLE_MODULE_CLASSES: &[&str] = &["dall_e.encoder.*", "dall_e.utils.*"];

/// `dall_e.utils.map_pixels`: the logit-Laplace input mapping, [0, 1] -> [eps, 1 - eps].
pub fn map_pixels(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(1.0 - 2.0 * LOGIT_LAPLACE_EPS, LOGIT_LAPLACE_EPS)?)
}

/// `dall_e.utils.Conv2d`: weight `w` (n_out, n_in, kw, kw), bias `b`, stride 1, padding (kw - 1) / 2.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// (n_out, n_in, kw, kw)
    pub w: Tensor,
    /// (n_out,)
    pub b: Tensor,
    /// Kernel width.
    pub kw: usize,
}

impl Conv2d {
    /// The convolution with `dall_e`'s padding.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.w, (self.kw - 1) / 2, 1, 1, 1)?;
        Ok(y.broadcast_add(&self.b.reshape((1, self.b.dim(0)?, 1, 1))?)?)
    }
}

/// `dall_e.encoder.EncoderBlock`: `id_path(x) + post_gain * res_path(x)`.
#[derive(Debug, Clone)]
pub struct EncoderBlock {
    /// A 1x1 conv when the channel count changes, else the identity (None).
    pub id_path: Option<Conv2d>,
    /// relu -> conv_1 (3x3) -> relu -> conv_2 (3x3) -> relu -> conv_3 (3x3) -> relu -> conv_4 (1x1).
    pub res_path: [Conv2d; 4],
    /// 1 / n_layers², n_layers = group_count * n_blk_per_group.
    pub post_gain: f64,
}

impl EncoderBlock {
    /// `id_path(x) + post_gain * res_path(x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let id = match &self.id_path {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let mut h = x.clone();
        for conv in &self.res_path {
            h = conv.forward(&h.relu()?)?;
        }
        Ok((id + h.affine(self.post_gain, 0.0)?)?)
    }
}

/// `dall_e.encoder.Encoder`, inference only.
#[derive(Debug, Clone)]
pub struct DalleEncoder {
    /// Width of the first group (`n_hid`; 256 in OpenAI's encoder).
    pub n_hid: usize,
    /// Blocks per group (2 in OpenAI's encoder).
    pub n_blk_per_group: usize,
    /// 3.
    pub input_channels: usize,
    /// Number of visual tokens (8192).
    pub vocab_size: usize,
    /// blocks.input: 7x7 conv, input_channels -> n_hid.
    pub input: Conv2d,
    /// blocks.group_1..4; a 2x2 max-pool follows each group but the last.
    pub groups: Vec<Vec<EncoderBlock>>,
    /// blocks.output: relu -> 1x1 conv, 8 * n_hid -> vocab_size.
    pub output: Conv2d,
}

/// Tensors by name, handed out once each so that leftovers can be reported (a strict load_state_dict).
struct Named {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    used: BTreeSet<String>,
}

impl Named {
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match self.tensors.get(name) {
            Some(t) => Ok(t.dims().to_vec()),
            None => Err(BeitError::MissingTensor { path: self.path.clone(), name: name.to_string() }),
        }
    }

    fn get(&mut self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| BeitError::MissingTensor { path: self.path.clone(), name: name.to_string() })?;
        if t.dims() != expected {
            return Err(BeitError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        self.used.insert(name.to_string());
        // dall_e keeps float32 weights (half precision only on CUDA, converted at run time).
        Ok(t.to_dtype(DType::F32)?)
    }

    fn conv(&mut self, prefix: &str, n_in: usize, n_out: usize, kw: usize) -> Result<Conv2d> {
        let w = self.get(&format!("{prefix}.w"), &[n_out, n_in, kw, kw])?;
        let b = self.get(&format!("{prefix}.b"), &[n_out])?;
        Ok(Conv2d { w, b, kw })
    }
}

fn raw_to_tensor(path: &Path, name: &str, r: RawTensor, device: &Device) -> Result<Tensor> {
    let dtype = match r.dtype {
        PtDtype::F32 => DType::F32,
        PtDtype::F64 => DType::F64,
        PtDtype::F16 => DType::F16,
        PtDtype::BF16 => DType::BF16,
        other => {
            return Err(BeitError::checkpoint(
                path,
                format!("tensor `{name}` has dtype {other:?}, expected a floating-point type"),
            ))
        }
    };
    Tensor::from_raw_buffer(&r.data, dtype, &r.shape, device)
        .map_err(|e| BeitError::checkpoint(path, format!("tensor `{name}`: {e}")))
}

/// The tensors of an encoder file: a safetensors state dict (by extension) or a torch.save pickle.
fn read_encoder_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let is_safetensors = path.extension().and_then(|e| e.to_str()) == Some("safetensors");
    let list = if is_safetensors {
        read_safetensors(path, device)?
    } else {
        read_torch_checkpoint_with(path, DALLE_MODULE_CLASSES)?
            .into_iter()
            .map(|(name, r)| Ok((name.clone(), raw_to_tensor(path, &name, r, device)?)))
            .collect::<Result<Vec<_>>>()?
    };
    let mut out = HashMap::new();
    for (name, t) in list {
        // A state dict saved from a wrapper (e.g. {"encoder": ...}) would prefix the names; dall_e's own do not.
        out.insert(name, t);
    }
    Ok(out)
}

impl DalleEncoder {
    /// Loads `encoder.pkl` (torch.save of the module) or a `.safetensors` state dict onto the CPU.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_on(path, &Device::Cpu)
    }

    /// As [`load`](Self::load), onto `device`.
    pub fn load_on(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let tensors = read_encoder_tensors(path, device)?;
        Self::from_tensors(path, tensors)
    }

    /// Builds the encoder from named tensors; `path` only names the source in errors. Every tensor must be
    /// used, as torch's strict load_state_dict requires.
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let mut t = Named { path: path.to_path_buf(), tensors, used: BTreeSet::new() };
        // Hyper-parameters from shapes: blocks.input.w is (n_hid, input_channels, 7, 7), blocks.output.conv.w is
        // (vocab_size, 8 * n_hid, 1, 1), and group_1 holds block_1..block_{n_blk_per_group}.
        let input_shape = t.shape("blocks.input.w")?;
        let [n_hid, input_channels, _, _] = input_shape[..] else {
            return Err(BeitError::checkpoint(
                path,
                format!(
                    "tensor `blocks.input.w` has shape {input_shape:?}, expected 4 dimensions (n_hid, channels, 7, 7)"
                ),
            ));
        };
        let output_shape = t.shape("blocks.output.conv.w")?;
        let vocab_size = output_shape.first().copied().unwrap_or(0);
        let mut n_blk_per_group = 0;
        while t.tensors.contains_key(&format!("blocks.group_1.block_{}.res_path.conv_1.w", n_blk_per_group + 1)) {
            n_blk_per_group += 1;
        }
        if n_blk_per_group == 0 {
            return Err(BeitError::MissingTensor {
                path: path.to_path_buf(),
                name: "blocks.group_1.block_1.res_path.conv_1.w".into(),
            });
        }
        if n_hid == 0 || vocab_size == 0 {
            return Err(BeitError::checkpoint(path, "blocks.input.w or blocks.output.conv.w has a zero dimension"));
        }

        let input = t.conv("blocks.input", input_channels, n_hid, 7)?;
        let n_layers = GROUP_COUNT * n_blk_per_group;
        let post_gain = 1.0 / (n_layers * n_layers) as f64;
        let mut groups = Vec::with_capacity(GROUP_COUNT);
        for g in 0..GROUP_COUNT {
            // Group g (0-based) widens to 2^g * n_hid channels in its first block.
            let (n_prev, n_out) = (if g == 0 { n_hid } else { n_hid << (g - 1) }, n_hid << g);
            let mut blocks = Vec::with_capacity(n_blk_per_group);
            for i in 0..n_blk_per_group {
                let prefix = format!("blocks.group_{}.block_{}", g + 1, i + 1);
                let n_in = if i == 0 { n_prev } else { n_out };
                let n_blk_hid = n_out / 4;
                let id_path =
                    if n_in != n_out { Some(t.conv(&format!("{prefix}.id_path"), n_in, n_out, 1)?) } else { None };
                let res_path = [
                    t.conv(&format!("{prefix}.res_path.conv_1"), n_in, n_blk_hid, 3)?,
                    t.conv(&format!("{prefix}.res_path.conv_2"), n_blk_hid, n_blk_hid, 3)?,
                    t.conv(&format!("{prefix}.res_path.conv_3"), n_blk_hid, n_blk_hid, 3)?,
                    t.conv(&format!("{prefix}.res_path.conv_4"), n_blk_hid, n_out, 1)?,
                ];
                blocks.push(EncoderBlock { id_path, res_path, post_gain });
            }
            groups.push(blocks);
        }
        let output = t.conv("blocks.output.conv", 8 * n_hid, vocab_size, 1)?;

        let mut unused: Vec<&String> = t.tensors.keys().filter(|k| !t.used.contains(*k)).collect();
        if !unused.is_empty() {
            unused.sort();
            return Err(BeitError::checkpoint(
                path,
                format!(
                    "unexpected tensors for a DALL-E Encoder(n_hid={n_hid}, n_blk_per_group={n_blk_per_group}): {}",
                    unused.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(DalleEncoder { n_hid, n_blk_per_group, input_channels, vocab_size, input, groups, output })
    }

    /// Vocabulary logits (b, vocab_size, h/8, w/8) for pixels (b, channels, h, w) in [0, 1]; `map_pixels` is
    /// applied here. Like torch's MaxPool2d, odd sizes are floored at each pool.
    pub fn logits(&self, pixels01: &Tensor) -> Result<Tensor> {
        let dims = pixels01.dims();
        let [_, c, h, w] = dims[..] else {
            let msg = format!("expected 4 dimensions (b, c, h, w), found {dims:?}");
            return Err(BeitError::invalid_input("tokenizer input", msg));
        };
        if c != self.input_channels {
            return Err(BeitError::invalid_input(
                "tokenizer input",
                format!("has {c} channels but the encoder was built for {}", self.input_channels),
            ));
        }
        if h < 8 || w < 8 {
            return Err(BeitError::invalid_input("tokenizer input", format!("{h}x{w} is smaller than one 8x8 token")));
        }
        let x = map_pixels(&pixels01.to_dtype(DType::F32)?)?;
        let mut x = self.input.forward(&x)?;
        for (g, blocks) in self.groups.iter().enumerate() {
            for block in blocks {
                x = block.forward(&x)?;
            }
            if g + 1 < self.groups.len() {
                x = x.max_pool2d(2)?;
            }
        }
        self.output.forward(&x.relu()?)
    }

    /// The visual tokens: argmax of the logits over the vocabulary, u32 (b, h/8, w/8).
    pub fn tokens(&self, pixels01: &Tensor) -> Result<Tensor> {
        Ok(self.logits(pixels01)?.argmax(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::npy::{read_npy, NpyData};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer").join(name)
    }

    fn check(file: &str) -> (f32, usize, usize) {
        let enc = DalleEncoder::load(fixture(file)).expect("encoder loads");
        assert_eq!((enc.n_hid, enc.n_blk_per_group, enc.input_channels, enc.vocab_size), (4, 2, 3, 64));
        let x_path = fixture("encoder.inputs.npy");
        let x = read_npy(&x_path).unwrap().to_f32_tensor(&x_path, &Device::Cpu).unwrap();
        let want = read_npy(&fixture("encoder.logits.npy")).unwrap();
        let NpyData::F32(want_logits) = want.data else { panic!("logits are float32") };
        let got = enc.logits(&x).unwrap();
        assert_eq!(got.dims(), &want.shape[..]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let max_err = got.iter().zip(&want_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);

        let want_tokens = read_npy(&fixture("encoder.tokens.npy")).unwrap();
        let NpyData::I64(want_tokens_v) = want_tokens.data else { panic!("tokens are int64") };
        let tokens = enc.tokens(&x).unwrap();
        assert_eq!(tokens.dims(), &want_tokens.shape[..]);
        assert_eq!(tokens.dtype(), DType::U32);
        let tokens: Vec<u32> = tokens.flatten_all().unwrap().to_vec1().unwrap();
        let agree = tokens.iter().zip(&want_tokens_v).filter(|(a, b)| **a as i64 == **b).count();
        eprintln!("{file}: max |logit error| {max_err:.3e}, tokens {agree}/{}", tokens.len());
        (max_err, agree, tokens.len())
    }

    #[test]
    fn pickled_module_matches_dall_e() {
        let (err, agree, n) = check("encoder.pkl");
        assert!(err < 1e-4, "max logit error {err}");
        assert_eq!(agree, n);
    }

    #[test]
    fn safetensors_state_dict_matches_dall_e() {
        let (err, agree, n) = check("encoder.safetensors");
        assert!(err < 1e-4, "max logit error {err}");
        assert_eq!(agree, n);
    }

    #[test]
    fn pickle_names_are_state_dict_names() {
        let raw = read_torch_checkpoint_with(&fixture("encoder.pkl"), DALLE_MODULE_CLASSES).unwrap();
        let pkl: BTreeSet<String> = raw.into_iter().map(|(n, _)| n).collect();
        let st = read_safetensors(&fixture("encoder.safetensors"), &Device::Cpu).unwrap();
        let st: BTreeSet<String> = st.into_iter().map(|(n, _)| n).collect();
        assert_eq!(pkl, st);
        assert!(pkl.contains("blocks.input.w"));
        assert!(pkl.contains("blocks.group_1.block_1.res_path.conv_1.w"));
        assert!(pkl.contains("blocks.group_2.block_1.id_path.w"));
    }

    #[test]
    fn pickle_needs_the_dall_e_allow_list() {
        let e = read_torch_checkpoint_with(&fixture("encoder.pkl"), &[]).unwrap_err().to_string();
        assert!(e.contains("dall_e."), "{e}");
    }

    #[test]
    fn errors_name_the_tensor_and_shapes() {
        let path = fixture("encoder.safetensors");
        let mut tensors: HashMap<String, Tensor> = read_safetensors(&path, &Device::Cpu).unwrap().into_iter().collect();
        let name = "blocks.group_2.block_1.res_path.conv_2.b";
        tensors.insert(name.into(), Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap());
        let e = DalleEncoder::from_tensors(&path, tensors.clone()).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("[5]") && e.contains("[2]"), "{e}");

        tensors.remove("blocks.group_2.block_1.res_path.conv_2.b");
        let e = DalleEncoder::from_tensors(&path, tensors.clone()).unwrap_err().to_string();
        assert!(e.contains("blocks.group_2.block_1.res_path.conv_2.b") && e.contains("missing"), "{e}");

        let mut extra: HashMap<String, Tensor> = read_safetensors(&path, &Device::Cpu).unwrap().into_iter().collect();
        extra.insert("blocks.extra.w".into(), Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap());
        let e = DalleEncoder::from_tensors(&path, extra).unwrap_err().to_string();
        assert!(e.contains("blocks.extra.w"), "{e}");
    }

    #[test]
    fn input_errors() {
        let enc = DalleEncoder::load(fixture("encoder.safetensors")).unwrap();
        let x = Tensor::zeros((1, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(enc.logits(&x).unwrap_err().to_string().contains("1 channels"));
        let x = Tensor::zeros((3, 16, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(enc.logits(&x).is_err());
    }

    #[test]
    fn map_pixels_is_dall_e_s() {
        // torch (float32): map_pixels([0, 0.5, 1, 0.3]) = [0.10000000149, 0.5, 0.90000003576, 0.34000000357]
        let x = Tensor::new(&[0f32, 0.5, 1.0, 0.3], &Device::Cpu).unwrap();
        let y: Vec<f32> = map_pixels(&x).unwrap().to_vec1().unwrap();
        assert_eq!(y, vec![0.1, 0.5, 0.900_000_04, 0.34]);
    }
}
