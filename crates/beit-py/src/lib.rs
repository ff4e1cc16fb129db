//! `beit_rs._native`: the Rust half of the `beit_rs` Python package. It loads models and processors through the
//! library's `from_pretrained`, runs them with the GIL released, and moves arrays in and out as numpy arrays. The
//! Python half (python/beit_rs) gives them transformers' class names, signatures and output objects.
//!
//! Concurrency: a model or processor is immutable once loaded (`frozen`), so any number of Python threads may call
//! the same object at once; each call releases the GIL for its whole Rust part and runs on the model's own rayon
//! pool when it was loaded with `num_threads`, otherwise on the process-wide pool.

use std::path::{Path, PathBuf};

use beit::hub::{resolve_model, HubOptions};
use beit::pipeline::Pipeline;
use beit::processor::{
    load_image, load_image_bytes, load_segmentation_map, load_segmentation_map_bytes, ProcessorError,
    PIL_MAX_IMAGE_PIXELS,
};
use beit::{
    Architecture, BeitConfig, BeitError, BeitImageProcessor, ErrorKind, ForwardOptions, InferenceDtype, LoadOptions,
    ModelInputs, Pretrained,
};
use candle_core::{DType, Device, Tensor, WithDType};
use image::{GrayImage, RgbImage};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{Element, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The library's error as the Python exception a transformers user expects: a missing file is
/// `FileNotFoundError`, any other file or Hub failure (and a file that is not what it claims to be, as
/// transformers reports an invalid config.json) `OSError`, a wrong argument or an unsupported request
/// `ValueError`, a bug `RuntimeError`. The message is the library's.
fn py_err(e: BeitError) -> PyErr {
    let msg = e.to_string();
    let io = match &e {
        BeitError::Io { source, .. } | BeitError::Processor(ProcessorError::Io { source, .. }) => Some(source.kind()),
        _ => None,
    };
    match (e.kind(), io) {
        (_, Some(std::io::ErrorKind::NotFound)) => PyFileNotFoundError::new_err(msg),
        (_, Some(std::io::ErrorKind::PermissionDenied)) => PyPermissionError::new_err(msg),
        (ErrorKind::Io | ErrorKind::Format, _) => PyOSError::new_err(msg),
        (ErrorKind::InvalidInput | ErrorKind::Unsupported, _) => PyValueError::new_err(msg),
        (ErrorKind::Diverged | ErrorKind::Internal, _) => PyRuntimeError::new_err(msg),
    }
}

fn candle_err(e: candle_core::Error) -> PyErr {
    py_err(e.into())
}

/// A path that names no file is `FileNotFoundError`, as `open` would say, rather than "not a Hub repo id".
fn load_err(spec: &str, e: BeitError) -> PyErr {
    let p = Path::new(spec);
    let path_like = p.is_absolute() || spec.starts_with('.') || spec.matches('/').count() > 1;
    if e.kind() == ErrorKind::InvalidInput && path_like && !p.exists() {
        return PyFileNotFoundError::new_err(format!("{spec}: no such file or directory ({e})"));
    }
    py_err(e)
}

fn hub(revision: Option<String>) -> HubOptions {
    let mut h = HubOptions::from_env();
    h.progress = false;
    if let Some(r) = revision {
        h.revision = r;
    }
    h
}

/// `name_or_path` to the model's directory: a directory as is, a weights file's folder, or a Hub repo id's snapshot
/// in huggingface_hub's cache (downloaded when missing and online).
#[pyfunction]
#[pyo3(signature = (name_or_path, revision=None))]
fn resolve(py: Python<'_>, name_or_path: String, revision: Option<String>) -> PyResult<PathBuf> {
    let h = hub(revision);
    py.detach(|| resolve_model(&name_or_path, &h)).map(|l| l.dir).map_err(|e| load_err(&name_or_path, e))
}

/// config.json of a model directory (or Hub repo id), read and completed with transformers' defaults, as JSON.
#[pyfunction]
#[pyo3(signature = (name_or_path, revision=None))]
fn config_from_pretrained(py: Python<'_>, name_or_path: String, revision: Option<String>) -> PyResult<String> {
    let dir = resolve(py, name_or_path, revision)?;
    BeitConfig::from_file(&dir.join("config.json")).map(|c| c.to_json_string()).map_err(py_err)
}

/// A config given as JSON (transformers' keyword arguments), validated and completed with the defaults.
#[pyfunction]
fn config_from_json(text: &str) -> PyResult<String> {
    let c = BeitConfig::from_json_str(text).map_err(py_err)?;
    c.validate().map_err(py_err)?;
    Ok(c.to_json_string())
}

/// An image or map as Python handed it over: a file, encoded bytes, or pixels (an RGB image, or a label map's
/// class ids), already in the layout the library takes (the Python half converts PIL images and arrays).
enum Source<I> {
    Path(PathBuf),
    Bytes(Vec<u8>),
    Pixels(I),
}

impl<I> Source<I> {
    /// Decodes without the GIL: files and bytes by `load_path` / `load_bytes` (given `name` for bytes).
    fn load(
        self,
        name: String,
        load_path: impl Fn(&Path) -> beit::processor::Result<I>,
        load_bytes: impl Fn(&[u8], &str) -> beit::processor::Result<I>,
    ) -> beit::processor::Result<I> {
        match self {
            Source::Path(p) => load_path(&p),
            Source::Bytes(b) => load_bytes(&b, &format!("{name} (bytes)")),
            Source::Pixels(img) => Ok(img),
        }
    }
}

/// Reads a list of `name` items while holding the GIL (decoding happens later without it): bytes, a path, or a
/// uint8 array of `channels` channels (`None`: a 2-D map) turned into pixels by `from_raw(width, height, values)`.
fn sources<I>(
    items: &[Bound<'_, PyAny>],
    name: &str,
    channels: Option<usize>,
    from_raw: impl Fn(u32, u32, Vec<u8>) -> Option<I>,
) -> PyResult<Vec<Source<I>>> {
    let layout = match channels {
        Some(c) => format!("an (height, width, {c}) uint8 array"),
        None => "a (height, width) uint8 array".to_string(),
    };
    let source = |i: usize, item: &Bound<'_, PyAny>| {
        if let Ok(b) = item.cast::<PyBytes>() {
            return Ok(Source::Bytes(b.as_bytes().to_vec()));
        }
        if let Ok(a) = item.extract::<PyReadonlyArrayDyn<'_, u8>>() {
            let (h, w) = match (a.shape(), channels) {
                (&[h, w, c], Some(want)) if c == want => (h, w),
                (&[h, w], None) => (h, w),
                (s, _) => return Err(PyValueError::new_err(format!("{name}[{i}]: expected {layout}, found shape {s:?}"))),
            };
            return from_raw(w as u32, h as u32, contiguous(&a))
                .map(Source::Pixels)
                .ok_or_else(|| PyValueError::new_err(format!("{name}[{i}]: {h}x{w} pixels do not fit")));
        }
        if let Ok(p) = item.extract::<PathBuf>() {
            return Ok(Source::Path(p));
        }
        let found = item.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        Err(PyValueError::new_err(format!("{name}[{i}]: expected a path, bytes, a PIL image or {layout}, found {found}")))
    };
    items.iter().enumerate().map(|(i, item)| source(i, item)).collect()
}

fn image_sources(items: &[Bound<'_, PyAny>]) -> PyResult<Vec<Source<RgbImage>>> {
    sources(items, "images", Some(3), RgbImage::from_raw)
}

fn decode_images(sources: Vec<Source<RgbImage>>) -> beit::Result<Vec<RgbImage>> {
    let bytes = |b: &[u8], name: &str| load_image_bytes(b, Some(PIL_MAX_IMAGE_PIXELS), name);
    let images = sources.into_iter().enumerate().map(|(i, s)| s.load(format!("images[{i}]"), |p: &Path| load_image(p), bytes));
    Ok(images.collect::<beit::processor::Result<Vec<_>>>()?)
}

/// The array's values in row-major order: borrowed and copied once when contiguous, gathered otherwise.
fn contiguous<T: Element + Copy>(a: &PyReadonlyArrayDyn<'_, T>) -> Vec<T> {
    match c_order(a) {
        Some(s) => s.to_vec(),
        None => a.as_array().iter().copied().collect(),
    }
}

/// The array's buffer when it is row-major (`as_slice` also accepts column-major buffers, in their own order).
fn c_order<'a, T: Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> Option<&'a [T]> {
    if a.is_c_contiguous() {
        a.as_slice().ok()
    } else {
        None
    }
}

fn tensor<T: Element + WithDType>(a: &PyReadonlyArrayDyn<'_, T>) -> PyResult<Tensor> {
    let shape = a.shape().to_vec();
    // Tensor::from_slice copies straight out of numpy's buffer: the one copy candle's owned storage needs.
    let t = match c_order(a) {
        Some(s) => Tensor::from_slice(s, shape, &Device::Cpu),
        None => Tensor::from_vec(a.as_array().iter().copied().collect::<Vec<T>>(), shape, &Device::Cpu),
    };
    t.map_err(candle_err)
}

/// A numpy array that takes ownership of `data` (no copy).
fn ndarray<T: Element>(py: Python<'_>, shape: Vec<usize>, data: Vec<T>) -> PyResult<Bound<'_, PyArrayDyn<T>>> {
    let a = ArrayD::from_shape_vec(IxDyn(&shape), data)
        .map_err(|e| PyRuntimeError::new_err(format!("internal error: array of shape {shape:?}: {e}")))?;
    Ok(PyArrayDyn::from_owned_array(py, a))
}

/// Values and shape of an f32 tensor, read out without the GIL.
fn host(t: &Tensor) -> beit::Result<(Vec<usize>, Vec<f32>)> {
    Ok((t.dims().to_vec(), t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
}

fn class_map(py: Python<'_>, (ids, (h, w)): (Vec<u32>, (usize, usize))) -> PyResult<Bound<'_, PyArrayDyn<i64>>> {
    ndarray(py, vec![h, w], ids.into_iter().map(i64::from).collect())
}

fn inference_dtype(dtype: &str) -> PyResult<InferenceDtype> {
    match dtype {
        "float32" | "fp32" | "f32" => Ok(InferenceDtype::F32),
        "int8" => Ok(InferenceDtype::Int8),
        "bfloat16" | "bf16" => Ok(InferenceDtype::Bf16),
        other => Err(PyValueError::new_err(format!(
            "dtype: {other:?} is not supported; expected \"float32\", \"int8\" (dynamic int8 quantization) or \
             \"bfloat16\" (bf16 weights and activations, f32 accumulation)"
        ))),
    }
}

/// A loaded model of any class with its image processor: what every Python model class and pipeline wraps.
#[pyclass(frozen, module = "beit_rs._native", name = "Model")]
struct Model {
    pipe: Pipeline,
    /// The threads of this model's forward passes (`num_threads`); `None`: rayon's global pool.
    pool: Option<rayon::ThreadPool>,
    spec: String,
    options: LoadOptions,
}

impl Model {
    /// Runs `f` without the GIL, on this model's threads.
    fn run<T: Send>(&self, py: Python<'_>, f: impl FnOnce() -> beit::Result<T> + Send) -> PyResult<T> {
        py.detach(|| match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        })
        .map_err(py_err)
    }
}

#[pymethods]
impl Model {
    /// Loads `name_or_path` (a model directory, a weights file beside its config.json, or a Hub repo id) as the
    /// transformers class `architecture` (default: config.json's `architectures`).
    #[staticmethod]
    #[pyo3(signature = (name_or_path, architecture=None, revision=None, dtype="float32", num_threads=None))]
    fn load(
        py: Python<'_>,
        name_or_path: String,
        architecture: Option<&str>,
        revision: Option<String>,
        dtype: &str,
        num_threads: Option<usize>,
    ) -> PyResult<Self> {
        let architecture = architecture.map(Architecture::from_name).transpose().map_err(py_err)?;
        let options = LoadOptions {
            architecture,
            inference: Some(inference_dtype(dtype)?),
            hub: Some(hub(revision)),
            ..Default::default()
        };
        let pool = match num_threads {
            None => None,
            Some(0) => return Err(PyValueError::new_err("num_threads: expected at least 1, found 0")),
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("beit-rs-{i}"))
                    .build()
                    .map_err(|e| PyOSError::new_err(format!("num_threads: cannot start {n} threads: {e}")))?,
            ),
        };
        let load = || Pipeline::from_pretrained(&name_or_path, &options);
        let pipe = py.detach(|| match &pool {
            Some(p) => p.install(load),
            None => load(),
        });
        let pipe = pipe.map_err(|e| load_err(&name_or_path, e))?;
        Ok(Model { pipe, pool, spec: name_or_path, options })
    }

    /// The transformers class this model is (e.g. "BeitForImageClassification").
    #[getter]
    fn architecture(&self) -> &'static str {
        self.pipe.pretrained.model.architecture().name()
    }

    /// Tensors the class needs that the checkpoint lacks (newly initialized, as transformers warns).
    #[getter]
    fn newly_initialized(&self) -> Vec<String> {
        self.pipe.pretrained.report.newly_initialized.clone()
    }

    /// The model's config.json, as transformers would write it.
    fn config_json(&self) -> String {
        self.pipe.pretrained.config.to_json_string()
    }

    /// The model directory (a Hub snapshot for repo ids).
    #[getter]
    fn model_dir(&self) -> PathBuf {
        self.pipe.model_dir.clone()
    }

    /// The image processor of the model directory (transformers' defaults when it has no preprocessor_config.json).
    fn processor(&self) -> Processor {
        Processor { inner: self.pipe.processor.clone(), source: None }
    }

    /// Every output under transformers' names (`loss`, `logits`, `last_hidden_state`, `pooler_output`,
    /// `feature_maps.N`, `hidden_states.N`, `attentions.N`), in that order.
    #[pyo3(signature = (pixel_values, bool_masked_pos=None, labels=None, head_mask=None,
                        output_hidden_states=false, output_attentions=false, interpolate_pos_encoding=false))]
    #[allow(clippy::too_many_arguments)] // transformers' signature
    fn forward<'py>(
        &self,
        py: Python<'py>,
        pixel_values: PyReadonlyArrayDyn<'py, f32>,
        bool_masked_pos: Option<PyReadonlyArrayDyn<'py, u8>>,
        labels: Option<Bound<'py, PyAny>>,
        head_mask: Option<PyReadonlyArrayDyn<'py, f32>>,
        output_hidden_states: bool,
        output_attentions: bool,
        interpolate_pos_encoding: bool,
    ) -> PyResult<Vec<(String, Bound<'py, PyArrayDyn<f32>>)>> {
        let x = tensor(&pixel_values)?;
        let labels = match labels {
            None => None,
            Some(l) => Some(match l.extract::<PyReadonlyArrayDyn<'py, i64>>() {
                Ok(a) => tensor(&a)?,
                Err(_) => tensor(&l.extract::<PyReadonlyArrayDyn<'py, f32>>()?)?,
            }),
        };
        let inputs = ModelInputs {
            options: ForwardOptions {
                bool_masked_pos: bool_masked_pos.as_ref().map(tensor).transpose()?,
                head_mask: head_mask.as_ref().map(tensor).transpose()?,
                output_hidden_states,
                output_attentions,
                interpolate_pos_encoding,
                ..Default::default()
            },
            labels,
        };
        let out = self.run(py, || {
            let named = self.pipe.pretrained.model.forward_named(&x, &inputs)?;
            named.into_iter().map(|(name, t)| Ok((name, host(&t)?))).collect::<beit::Result<Vec<_>>>()
        })?;
        out.into_iter().map(|(name, (shape, data))| Ok((name, ndarray(py, shape, data)?))).collect()
    }

    /// The image-classification pipeline: the `top_k` best `(label, score)` of each image, best first.
    fn classify(&self, py: Python<'_>, images: Vec<Bound<'_, PyAny>>, top_k: usize) -> PyResult<Vec<Vec<(String, f32)>>> {
        let sources = image_sources(&images)?;
        let preds = self.run(py, || self.pipe.classify(&decode_images(sources)?, top_k))?;
        Ok(preds.into_iter().map(|p| p.into_iter().map(|p| (p.label, p.score)).collect()).collect())
    }

    /// The semantic map of each image at its own size: class ids, (height, width) int64.
    fn segment<'py>(&self, py: Python<'py>, images: Vec<Bound<'py, PyAny>>) -> PyResult<Vec<Bound<'py, PyArrayDyn<i64>>>> {
        let sources = image_sources(&images)?;
        let maps = self.run(py, || self.pipe.segment(&decode_images(sources)?))?;
        maps.into_iter().map(|m| class_map(py, m)).collect()
    }

    /// What `beit embed` writes: the pooled vector of each image (batch, hidden), or every token
    /// (batch, 1 + patches, hidden) with `tokens`.
    #[pyo3(signature = (images, tokens=false))]
    fn embed<'py>(&self, py: Python<'py>, images: Vec<Bound<'py, PyAny>>, tokens: bool) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let sources = image_sources(&images)?;
        let (shape, data) = self.run(py, || host(&self.pipe.embed(&decode_images(sources)?, tokens)?))?;
        ndarray(py, shape, data)
    }

    /// Writes config.json and model.safetensors as transformers' `save_pretrained` does. A model loaded for
    /// inference holds its weights packed or quantized, so the checkpoint's dense weights are read again from
    /// where they came from (the Python API never changes a model's weights).
    fn save_pretrained(&self, py: Python<'_>, save_directory: PathBuf) -> PyResult<()> {
        let dense = LoadOptions { inference: None, ..self.options.clone() };
        py.detach(|| Pretrained::from_pretrained(&self.spec, &dense)?.save(&save_directory)).map_err(py_err)
    }
}

/// transformers' BeitImageProcessor (the slow, PIL-exact one).
#[pyclass(frozen, module = "beit_rs._native", name = "Processor")]
struct Processor {
    inner: BeitImageProcessor,
    /// The preprocessor_config.json it was read from.
    source: Option<PathBuf>,
}

#[pymethods]
impl Processor {
    /// preprocessor_config.json of a model directory, a weights file's directory or a Hub repo id.
    #[staticmethod]
    #[pyo3(signature = (name_or_path, revision=None))]
    fn from_pretrained(py: Python<'_>, name_or_path: String, revision: Option<String>) -> PyResult<Self> {
        let dir = resolve(py, name_or_path.clone(), revision.clone())?;
        let h = hub(revision);
        let inner = BeitImageProcessor::from_pretrained(&dir.display().to_string(), Some(&h))
            .map_err(|e| load_err(&name_or_path, e))?;
        Ok(Processor { inner, source: Some(dir.join("preprocessor_config.json")) })
    }

    /// A processor from the JSON of a preprocessor_config.json (missing keys take transformers' defaults).
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        let inner = BeitImageProcessor::from_json_str(text).map_err(|e| py_err(e.into()))?;
        Ok(Processor { inner, source: None })
    }

    /// The preprocessor_config.json this processor was read from, if any.
    #[getter]
    fn source(&self) -> Option<PathBuf> {
        self.source.clone()
    }

    /// pixel_values (batch, 3, height, width) float32 of images given as paths, bytes or HWC uint8 RGB arrays.
    fn preprocess<'py>(&self, py: Python<'py>, images: Vec<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let sources = image_sources(&images)?;
        let pv = py.detach(|| -> beit::Result<_> { Ok(self.inner.preprocess_rgb(&decode_images(sources)?)?) });
        let pv = pv.map_err(py_err)?;
        ndarray(py, pv.shape.to_vec(), pv.data)
    }

    /// labels (batch, height, width) int64 of segmentation maps given as paths, bytes or (height, width) uint8
    /// arrays.
    fn preprocess_segmentation_maps<'py>(&self, py: Python<'py>, maps: Vec<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
        let sources = sources(&maps, "segmentation_maps", None, GrayImage::from_raw)?;
        let labels = py.detach(|| -> beit::Result<_> {
            let maps = sources
                .into_iter()
                .enumerate()
                .map(|(i, s)| s.load(format!("segmentation_maps[{i}]"), |p: &Path| load_segmentation_map(p), load_segmentation_map_bytes))
                .collect::<beit::processor::Result<Vec<_>>>()?;
            Ok(self.inner.preprocess_segmentation_maps(&maps)?)
        });
        let labels = labels.map_err(py_err)?;
        ndarray(py, labels.shape.to_vec(), labels.data)
    }

    /// Class maps (height, width) int64 from segmentation logits (batch, classes, h, w), upsampled to
    /// `target_sizes[i] = (height, width)` first when given.
    #[pyo3(signature = (logits, target_sizes=None))]
    fn post_process_semantic_segmentation<'py>(
        &self,
        py: Python<'py>,
        logits: PyReadonlyArrayDyn<'py, f32>,
        target_sizes: Option<Vec<(usize, usize)>>,
    ) -> PyResult<Vec<Bound<'py, PyArrayDyn<i64>>>> {
        let shape: [usize; 4] = logits.shape().try_into().map_err(|_| {
            PyValueError::new_err(format!("logits: expected 4 dimensions (batch, classes, height, width), found shape {:?}", logits.shape()))
        })?;
        let data = contiguous(&logits);
        let maps = py.detach(|| self.inner.post_process_semantic_segmentation(&data, shape, target_sizes.as_deref()));
        maps.map_err(|e| py_err(e.into()))?.into_iter().map(|m| class_map(py, m)).collect()
    }
}

/// The threads rayon's global pool runs (set RAYON_NUM_THREADS before the first model call to change it).
#[pyfunction]
fn global_num_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Processor>()?;
    m.add_function(wrap_pyfunction!(resolve, m)?)?;
    m.add_function(wrap_pyfunction!(config_from_pretrained, m)?)?;
    m.add_function(wrap_pyfunction!(config_from_json, m)?)?;
    m.add_function(wrap_pyfunction!(global_num_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
