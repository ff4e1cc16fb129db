//! `Weights`: named access to a checkpoint's tensors while a model is built, in the spirit of candle's VarBuilder,
//! but keeping what a loader must report: which tensors were used, which were missing and initialized fresh,
//! and errors that name the file, the tensor and both shapes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};

use crate::error::{BeitError, Result};
use crate::kernels::conv::Precision;
use crate::rng::Rng;

/// How a parameter is initialized when the checkpoint lacks it (transformers' `_init_weights`).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Normal with this standard deviation (mean 0).
    Normal(f64),
    /// All zeros.
    Zeros,
    /// Every element this value.
    Const(f64),
}

/// Where a missing tensor may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A checkpoint: backbone tensors must be there; heads and the pooler may be initialized (and are reported).
    Checkpoint,
    /// No checkpoint: every parameter is initialized (training from scratch).
    Fresh,
}

struct Inner {
    /// Emptied by [`Weights::release`].
    tensors: Mutex<HashMap<String, Tensor>>,
    /// Set by [`Weights::release`]: the model's dense weights are no longer all here.
    released: std::sync::atomic::AtomicBool,
    path: PathBuf,
    source: Source,
    device: Device,
    used: Mutex<BTreeSet<String>>,
    initialized: Mutex<Vec<String>>,
    /// Set when building a model to train: every parameter becomes a Var, in creation order.
    vars: Option<Mutex<Vec<(String, Var)>>>,
    /// Every tensor handed to the model, by checkpoint name: what save_pretrained writes. A Var's tensor shares
    /// its storage, so this stays current while training updates it.
    params: Mutex<Vec<(String, Tensor)>>,
    rng: Mutex<Rng>,
}

/// A checkpoint's tensors by name while a model is built (as candle's VarBuilder), recording what was used and what was initialized.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
    prefix: String,
    /// The precision of the products of the Linear layers built from these weights when training (autocast).
    precision: Precision,
}

/// What loading did beyond the expected: transformers prints the same two lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors the checkpoint lacked, initialized as transformers does.
    pub newly_initialized: Vec<String>,
    /// Checkpoint tensors no module asked for.
    pub unused: Vec<String>,
}

impl Weights {
    /// Named tensors read from `path` (named in errors), onto `device`.
    pub fn new(tensors: HashMap<String, Tensor>, path: impl Into<PathBuf>, device: &Device) -> Self {
        Self::build(tensors, path.into(), Source::Checkpoint, device, false, 0)
    }

    /// Every parameter freshly initialized from a seeded generator.
    pub fn fresh(device: &Device, seed: u64) -> Self {
        Self::build(HashMap::new(), PathBuf::from("<fresh>"), Source::Fresh, device, false, seed)
    }

    /// Builds a model with `build`, then reports what was missing (initialized) and unused.
    pub fn build(
        tensors: HashMap<String, Tensor>,
        path: PathBuf,
        source: Source,
        device: &Device,
        trainable: bool,
        seed: u64,
    ) -> Self {
        Weights {
            inner: Arc::new(Inner {
                tensors: Mutex::new(tensors),
                released: std::sync::atomic::AtomicBool::new(false),
                path,
                source,
                device: device.clone(),
                used: Mutex::new(BTreeSet::new()),
                initialized: Mutex::new(Vec::new()),
                vars: trainable.then(|| Mutex::new(Vec::new())),
                params: Mutex::new(Vec::new()),
                rng: Mutex::new(Rng::new(seed)),
            }),
            prefix: String::new(),
            precision: Precision::F32,
        }
    }

    /// These weights with the Linear layers built from them multiplying in `precision` when training (bf16: as
    /// torch's autocast, with f32 master weights and accumulation).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// The precision the Linear layers built from these weights train in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// A view under `prefix.` (like VarBuilder::pp).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        Weights { inner: self.inner.clone(), prefix, precision: self.precision }
    }

    /// The checkpoint file, for error messages.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Where the tensors go.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether the checkpoint has `name` under the current prefix.
    pub fn contains(&self, name: &str) -> bool {
        lock(&self.inner.tensors).contains_key(&self.full_name(name))
    }

    /// Any tensor under this prefix?
    pub fn contains_prefix(&self) -> bool {
        let p = format!("{}.", self.prefix);
        lock(&self.inner.tensors).keys().any(|k| k.starts_with(&p))
    }

    /// A buffer the model does not compute with but a checkpoint carries (BatchNorm's num_batches_tracked):
    /// kept as it is, or a 0 scalar of int64 when absent, so that saved checkpoints load in transformers
    /// without warnings. A Var, so that training can count in place what is saved; never a trainable one.
    pub fn passthrough_counter(&self, name: &str) -> Result<Var> {
        let full = self.full_name(name);
        let found = lock(&self.inner.tensors).get(&full).cloned();
        let t = match found {
            Some(t) => {
                lock(&self.inner.used).insert(full.clone());
                t.clone()
            }
            None => Tensor::zeros((), DType::I64, &self.inner.device)?,
        };
        let var = Var::from_tensor(&t)?;
        lock(&self.inner.params).push((full, var.as_tensor().clone()));
        Ok(var)
    }

    /// A buffer that training updates in place (BatchNorm's running statistics), initialized (and reported)
    /// when the checkpoint lacks it. A Var so that the saved tensor follows the updates, but not among
    /// [`vars`](Self::vars): the optimizer never sees it.
    pub fn buffer(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Var> {
        let t = self.get_impl(shape.into(), name, init, true, false)?;
        let var = Var::from_tensor(&t)?;
        lock(&self.inner.params).push((self.full_name(name), var.as_tensor().clone()));
        Ok(var)
    }

    /// A backbone parameter: missing from a checkpoint is an error.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        self.get_impl(shape.into(), name, init, self.inner.source == Source::Fresh, true)
    }

    /// A head or pooler parameter: initialized (and reported) when the checkpoint lacks it, as transformers does.
    pub fn get_or_init(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        self.get_impl(shape.into(), name, init, true, true)
    }

    /// `param`: a parameter, made a Var when training and listed in what is saved; otherwise the tensor alone
    /// (the caller keeps and lists it).
    fn get_impl(&self, shape: Shape, name: &str, init: Init, may_init: bool, param: bool) -> Result<Tensor> {
        let full = self.full_name(name);
        let found = lock(&self.inner.tensors).get(&full).cloned();
        let tensor = match found {
            Some(t) => {
                if t.dims() != shape.dims() {
                    return Err(BeitError::ShapeMismatch {
                        path: self.inner.path.clone(),
                        name: full,
                        expected: shape.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                lock(&self.inner.used).insert(full.clone());
                t.to_dtype(DType::F32)?
            }
            None if may_init => {
                lock(&self.inner.initialized).push(full.clone());
                self.initialize(&shape, init)?
            }
            None => return Err(BeitError::MissingTensor { path: self.inner.path.clone(), name: full }),
        };
        if !param {
            return Ok(tensor);
        }
        let tensor = match &self.inner.vars {
            Some(vars) => {
                let var = Var::from_tensor(&tensor)?;
                let t = var.as_tensor().clone();
                lock(vars).push((full.clone(), var));
                t
            }
            None => tensor,
        };
        lock(&self.inner.params).push((full, tensor.clone()));
        Ok(tensor)
    }

    fn initialize(&self, shape: &Shape, init: Init) -> Result<Tensor> {
        let n = shape.elem_count();
        let data: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Const(v) => vec![v as f32; n],
            Init::Normal(std) => {
                let mut rng = lock(&self.inner.rng);
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            }
        };
        Ok(Tensor::from_vec(data, shape.clone(), &self.inner.device)?)
    }

    /// Tensors the model never asked for (old `relative_position_index` buffers are expected and ignored, as in
    /// transformers' `_keys_to_ignore_on_load_unexpected`).
    pub fn report(&self) -> LoadReport {
        let used = lock(&self.inner.used);
        let mut unused: Vec<String> = lock(&self.inner.tensors)
            .keys()
            .filter(|k| !used.contains(*k) && !k.contains("relative_position_index"))
            .cloned()
            .collect();
        unused.sort();
        LoadReport { newly_initialized: lock(&self.inner.initialized).clone(), unused }
    }

    /// Every parameter the model was built from, by checkpoint name (a name asked for twice is listed once).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut seen = std::collections::HashSet::new();
        lock(&self.inner.params).iter().filter(|(n, _)| seen.insert(n.clone())).cloned().collect()
    }

    /// Drops this object's references to the checkpoint's tensors and the model's parameters, so that a model
    /// prepared for inference (packed or quantized copies of its weights) holds its weights once. Call after
    /// [`report`](Self::report): the model can no longer be saved from here.
    pub fn release(&self) {
        lock(&self.inner.tensors).clear();
        lock(&self.inner.params).clear();
        self.inner.released.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`release`](Self::release) was called.
    pub fn is_released(&self) -> bool {
        self.inner.released.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The trainable parameters, by checkpoint name, when built with `trainable`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.inner.vars.as_ref().map(|v| lock(v).clone()).unwrap_or_default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-insert; the sets stay usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_missing_unused_and_shape() {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert("a.w".to_string(), Tensor::zeros((2, 3), DType::F32, &dev).unwrap());
        t.insert("b".to_string(), Tensor::zeros(4, DType::F32, &dev).unwrap());
        t.insert("enc.relative_position_index".to_string(), Tensor::zeros(4, DType::F32, &dev).unwrap());
        let w = Weights::new(t, "x.safetensors", &dev);
        assert!(w.pp("a").get((2, 3), "w", Init::Zeros).is_ok());
        let e = w.pp("a").get((3, 2), "w", Init::Zeros).unwrap_err().to_string();
        assert!(e.contains("a.w") && e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");
        let e = w.get(3, "c", Init::Zeros).unwrap_err().to_string();
        assert!(e.contains("`c`") && e.contains("x.safetensors"), "{e}");
        assert!(w.get_or_init(3, "head", Init::Const(1.0)).is_ok());
        let r = w.report();
        assert_eq!(r.unused, vec!["b".to_string()]);
        assert_eq!(r.newly_initialized, vec!["head".to_string()]);
    }

    #[test]
    fn fresh_weights_are_seeded() {
        let a = Weights::fresh(&Device::Cpu, 7).get(5, "x", Init::Normal(1.0)).unwrap().to_vec1::<f32>().unwrap();
        let b = Weights::fresh(&Device::Cpu, 7).get(5, "x", Init::Normal(1.0)).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
    }
}
