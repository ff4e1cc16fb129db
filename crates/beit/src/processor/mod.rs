//! `BeitImageProcessor`: output-identical port of Hugging Face transformers 4.57.6's slow (PIL-based)
//! `BeitImageProcessor`: resize (Pillow, uint8) -> center crop (uint8, zero padding) -> rescale
//! (float64 multiply, cast to float32) -> normalize (float32), NCHW output; segmentation-map labels;
//! and `post_process_semantic_segmentation` (torch bilinear interpolate + argmax).

mod jpeg;
pub mod resample;

use image::{DynamicImage, GrayImage, RgbImage};
use resample::Filter;
use serde_json::Value;
use std::path::Path;

/// Pillow refuses to open images above `2 * Image.MAX_IMAGE_PIXELS` (a `DecompressionBombError`).
pub const PIL_MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// transformers' `IMAGENET_STANDARD_MEAN` / `IMAGENET_STANDARD_STD`, the class defaults.
pub const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
pub const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("{path}: cannot read: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: cannot decode image: {message}")]
    Decode { path: String, message: String },
    #[error(
        "{path}: image is {width}x{height} = {pixels} pixels, expected at most {limit} (decompression-bomb limit)"
    )]
    TooManyPixels { path: String, width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: String, message: String },
    #[error("{file}: field `{field}`: expected {expected}, found {found}")]
    Config { file: String, field: String, expected: String, found: String },
    #[error("{what}: expected {expected}, found {found}")]
    Input { what: String, expected: String, found: String },
}

pub type Result<T> = std::result::Result<T, ProcessorError>;

impl ProcessorError {
    /// What the caller can do about it (see [`crate::error::ErrorKind`]).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            ProcessorError::Io { .. } => ErrorKind::Io,
            ProcessorError::Decode { .. } | ProcessorError::Json { .. } | ProcessorError::Config { .. } => ErrorKind::Format,
            ProcessorError::TooManyPixels { .. } | ProcessorError::Input { .. } => ErrorKind::InvalidInput,
        }
    }
}

fn input_err(what: impl Into<String>, expected: impl Into<String>, found: impl Into<String>) -> ProcessorError {
    ProcessorError::Input { what: what.into(), expected: expected.into(), found: found.into() }
}

/// A transformers size dict after `get_size_dict`. BEiT only uses `{height, width}`; the other key
/// sets transformers accepts at load time (`shortest_edge`, ...) fail when resize/crop runs, as there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SizeDict {
    HeightWidth { height: usize, width: usize },
    Other(Vec<String>),
}

impl SizeDict {
    fn height_width(&self, field: &str) -> Result<(usize, usize)> {
        match self {
            SizeDict::HeightWidth { height, width } => Ok((*height, *width)),
            SizeDict::Other(keys) => Err(input_err(
                format!("`{field}`"),
                "keys `height` and `width` (BEiT resizes/crops to an exact size)",
                format!("keys {keys:?}"),
            )),
        }
    }
}

/// Pixel values of a batch, NCHW float32 (`pixel_values` with `return_tensors="pt"`).
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
}

/// Segmentation labels of a batch, `[batch, height, width]` int64 (transformers' `labels`).
#[derive(Clone, Debug, PartialEq)]
pub struct Labels {
    pub data: Vec<i64>,
    pub shape: [usize; 3],
}

/// Semantic map per image: class ids row-major and `(height, width)`.
pub type SegmentationMap = (Vec<u32>, (usize, usize));

/// BEiT image processor, configured like transformers' `BeitImageProcessor`.
#[derive(Clone, Debug, PartialEq)]
pub struct BeitImageProcessor {
    pub do_resize: bool,
    pub size: SizeDict,
    /// `None` when the config says `null` (transformers then refuses to resize).
    pub resample: Option<Filter>,
    pub do_center_crop: bool,
    pub crop_size: SizeDict,
    pub do_rescale: bool,
    /// `None` when the config says `null` (transformers then refuses to rescale).
    pub rescale_factor: Option<f64>,
    pub do_normalize: bool,
    /// One value per channel, or a single value for all channels.
    pub image_mean: Vec<f64>,
    pub image_std: Vec<f64>,
    pub do_reduce_labels: bool,
}

/// transformers' name for the same processor.
pub type BeitFeatureExtractor = BeitImageProcessor;

impl Default for BeitImageProcessor {
    fn default() -> Self {
        BeitImageProcessor {
            do_resize: true,
            size: SizeDict::HeightWidth { height: 256, width: 256 },
            resample: Some(Filter::Bicubic),
            do_center_crop: true,
            crop_size: SizeDict::HeightWidth { height: 224, width: 224 },
            do_rescale: true,
            rescale_factor: Some(1.0 / 255.0),
            do_normalize: true,
            image_mean: IMAGENET_STANDARD_MEAN.to_vec(),
            image_std: IMAGENET_STANDARD_STD.to_vec(),
            do_reduce_labels: false,
        }
    }
}

fn json_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("{n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

impl BeitImageProcessor {
    /// Reads a `preprocessor_config.json`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProcessorError::Io { path: name.clone(), source })?;
        Self::parse(&text, &name)
    }

    /// Parses the text of a `preprocessor_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse(text, "preprocessor_config.json")
    }

    fn parse(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ProcessorError::Json { path: file.to_string(), message: e.to_string() })?;
        Self::from_json_value(&v, file)
    }

    /// Builds the processor from a parsed config, as `BeitImageProcessor.from_dict` does: missing or
    /// `null` keys take the class defaults where `__init__` substitutes them, flags follow Python
    /// truthiness (`null` is false), unknown keys are ignored. The legacy key `reduce_labels` is
    /// ignored too: transformers 4.57.6 drops it with a warning.
    pub fn from_json_value(v: &Value, file: &str) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| ProcessorError::Config {
            file: file.into(),
            field: "(top level)".into(),
            expected: "a JSON object".into(),
            found: json_kind(v),
        })?;
        let err = |field: &str, expected: &str, found: &Value| ProcessorError::Config {
            file: file.into(),
            field: field.into(),
            expected: expected.into(),
            found: json_kind(found),
        };
        let mut p = BeitImageProcessor::default();
        let flag = |field: &str, default: bool| -> Result<bool> {
            match obj.get(field) {
                None => Ok(default),
                Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(Value::Number(n)) => Ok(n.as_f64().is_some_and(|x| x != 0.0)),
                Some(other) => Err(err(field, "a boolean", other)),
            }
        };
        p.do_resize = flag("do_resize", p.do_resize)?;
        p.do_center_crop = flag("do_center_crop", p.do_center_crop)?;
        p.do_rescale = flag("do_rescale", p.do_rescale)?;
        p.do_normalize = flag("do_normalize", p.do_normalize)?;
        p.do_reduce_labels = flag("do_reduce_labels", p.do_reduce_labels)?;
        for (field, slot) in [("size", &mut p.size), ("crop_size", &mut p.crop_size)] {
            match obj.get(field) {
                None | Some(Value::Null) => {}
                Some(value) => *slot = parse_size(value).map_err(|expected| err(field, &expected, value))?,
            }
        }
        match obj.get("resample") {
            None => {}
            Some(Value::Null) => p.resample = None,
            Some(value) => {
                p.resample = Some(
                    value
                        .as_i64()
                        .and_then(Filter::from_pil)
                        .ok_or_else(|| err("resample", "a PIL resampling filter 0-5", value))?,
                )
            }
        }
        match obj.get("rescale_factor") {
            None => {}
            Some(Value::Null) => p.rescale_factor = None,
            Some(value) => {
                p.rescale_factor = Some(value.as_f64().ok_or_else(|| err("rescale_factor", "a number", value))?)
            }
        }
        for (field, slot) in [("image_mean", &mut p.image_mean), ("image_std", &mut p.image_std)] {
            match obj.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) => *slot = vec![n.as_f64().unwrap_or(f64::NAN)],
                Some(value @ Value::Array(items)) => {
                    *slot = items
                        .iter()
                        .map(Value::as_f64)
                        .collect::<Option<Vec<f64>>>()
                        .ok_or_else(|| err(field, "a number or an array of numbers", value))?
                }
                Some(value) => return Err(err(field, "a number or an array of numbers", value)),
            }
        }
        Ok(p)
    }

    /// Preprocesses a batch of decoded images (converted to RGB like PIL's `convert("RGB")`).
    pub fn preprocess(&self, images: &[DynamicImage]) -> Result<PixelValues> {
        let rgb: Vec<RgbImage> = images.iter().map(to_rgb_like_pil).collect();
        self.preprocess_rgb(&rgb)
    }

    /// Preprocesses a batch of RGB images into one NCHW tensor; all results must share a shape
    /// (always true when resizing or cropping).
    pub fn preprocess_rgb(&self, images: &[RgbImage]) -> Result<PixelValues> {
        let mut data = Vec::new();
        let mut shape: Option<[usize; 3]> = None;
        for (i, image) in images.iter().enumerate() {
            let (values, s) = self.preprocess_image(image).map_err(|e| match e {
                ProcessorError::Input { what, expected, found } => {
                    input_err(format!("image {i}: {what}"), expected, found)
                }
                other => other,
            })?;
            match shape {
                Some(first) if first != s => {
                    return Err(input_err(
                        format!("image {i}"),
                        format!("shape {first:?} like image 0"),
                        format!("{s:?}"),
                    ))
                }
                _ => shape = Some(s),
            }
            data.extend(values);
        }
        let [c, h, w] = shape.unwrap_or([3, 0, 0]);
        Ok(PixelValues { data, shape: [images.len(), c, h, w] })
    }

    /// Preprocesses one RGB image: CHW float32 values and `[3, height, width]`.
    pub fn preprocess_image(&self, image: &RgbImage) -> Result<(Vec<f32>, [usize; 3])> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (pixels, h, w) = self.resize_and_crop(image.as_raw().clone(), h, w, 3)?;
        let scale = if self.do_rescale {
            Some(
                self.rescale_factor
                    .ok_or_else(|| input_err("`rescale_factor`", "a number when `do_rescale` is true", "null"))?,
            )
        } else {
            None
        };
        // normalize: `np.array(mean, dtype=float32)`, one value per channel or one for all.
        let per_channel = |v: &[f64], field: &str| -> Result<[f32; 3]> {
            match v {
                [x] => Ok([*x as f32; 3]),
                [a, b, c] => Ok([*a as f32, *b as f32, *c as f32]),
                _ => Err(input_err(
                    format!("`{field}`"),
                    "1 or 3 values (one per RGB channel)",
                    format!("{} values", v.len()),
                )),
            }
        };
        let norm = if self.do_normalize {
            Some((per_channel(&self.image_mean, "image_mean")?, per_channel(&self.image_std, "image_std")?))
        } else {
            None
        };
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in pixels.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                // rescale: `image.astype(float64) * scale` then `.astype(float32)`.
                let mut x = match scale {
                    Some(s) => (v as f64 * s) as f32,
                    None => v as f32,
                };
                // normalize: `(image - mean) / std` in float32.
                if let Some((mean, std)) = &norm {
                    x = (x - mean[c]) / std[c];
                }
                out[c * h * w + i] = x;
            }
        }
        Ok((out, [3, h, w]))
    }

    /// Resize (Pillow, uint8) then center crop, as `_preprocess` does before rescaling.
    /// `pixels` is HWC with `ch` channels; returns the new buffer, height and width.
    fn resize_and_crop(&self, pixels: Vec<u8>, h: usize, w: usize, ch: usize) -> Result<(Vec<u8>, usize, usize)> {
        let (mut pixels, mut h, mut w) = (pixels, h, w);
        if self.do_resize {
            let (oh, ow) = self.size.height_width("size")?;
            let filter =
                self.resample.ok_or_else(|| input_err("`resample`", "a filter when `do_resize` is true", "null"))?;
            if h == 0 || w == 0 {
                return Err(input_err("resize", "a non-empty image", format!("{w}x{h}")));
            }
            check_area("size", oh, ow)?;
            pixels = resample::resize(&pixels, w, h, ch, ow, oh, filter)
                .map_err(|e| input_err("resize", "a consistent image buffer", e.to_string()))?;
            (h, w) = (oh, ow);
        }
        if self.do_center_crop {
            let (ch_h, ch_w) = self.crop_size.height_width("crop_size")?;
            check_area("crop_size", ch_h, ch_w)?;
            pixels = center_crop(&pixels, h, w, ch, ch_h, ch_w);
            (h, w) = (ch_h, ch_w);
        }
        Ok((pixels, h, w))
    }

    /// transformers' `reduce_label` on uint8: 0 -> 255, k -> k - 1, and 255 stays 255.
    pub fn reduce_labels(labels: &mut [u8]) {
        for l in labels {
            *l = match *l {
                0 | 255 => 255,
                k => k - 1,
            };
        }
    }

    /// Preprocesses segmentation maps (`labels` of `preprocess(images, segmentation_maps)`):
    /// optional label reduction, then resize with the *configured* `resample` (transformers 4.57.6
    /// passes the image filter, not NEAREST) and center crop, as int64.
    pub fn preprocess_segmentation_maps(&self, maps: &[GrayImage]) -> Result<Labels> {
        let mut data = Vec::new();
        let mut shape: Option<[usize; 2]> = None;
        for (i, map) in maps.iter().enumerate() {
            let mut px = map.as_raw().clone();
            if self.do_reduce_labels {
                Self::reduce_labels(&mut px);
            }
            let (px, h, w) =
                self.resize_and_crop(px, map.height() as usize, map.width() as usize, 1).map_err(|e| match e {
                    ProcessorError::Input { what, expected, found } => {
                        input_err(format!("segmentation map {i}: {what}"), expected, found)
                    }
                    other => other,
                })?;
            match shape {
                Some(first) if first != [h, w] => {
                    return Err(input_err(
                        format!("segmentation map {i}"),
                        format!("shape {first:?} like map 0"),
                        format!("{:?}", [h, w]),
                    ))
                }
                _ => shape = Some([h, w]),
            }
            data.extend(px.iter().map(|&v| v as i64));
        }
        let [h, w] = shape.unwrap_or([0, 0]);
        Ok(Labels { data, shape: [maps.len(), h, w] })
    }

    /// `post_process_semantic_segmentation`: logits `[batch, classes, h, w]` (row-major) to class
    /// maps, upsampled per image to `target_sizes[i] = (height, width)` with torch's bilinear
    /// `interpolate(align_corners=False)` before the argmax (first maximum wins, as `torch.argmax`).
    pub fn post_process_semantic_segmentation(
        &self,
        logits: &[f32],
        shape: [usize; 4],
        target_sizes: Option<&[(usize, usize)]>,
    ) -> Result<Vec<SegmentationMap>> {
        let [b, c, h, w] = shape;
        let per = c.checked_mul(h).and_then(|x| x.checked_mul(w));
        if per.and_then(|p| p.checked_mul(b)) != Some(logits.len()) {
            return Err(input_err(
                "logits",
                format!("{b}*{c}*{h}*{w} values for shape {shape:?}"),
                format!("{} values", logits.len()),
            ));
        }
        if c == 0 {
            return Err(input_err("logits", "at least one class", "0 classes"));
        }
        if let Some(t) = target_sizes {
            if t.len() != b {
                return Err(input_err(
                    "target_sizes",
                    format!("{b} sizes (one per image in the batch)"),
                    format!("{}", t.len()),
                ));
            }
        }
        let per = c * h * w;
        let mut out = Vec::with_capacity(b);
        for i in 0..b {
            let image = &logits[i * per..(i + 1) * per];
            match target_sizes {
                // Upsample and argmax pixel by pixel: same arithmetic as `interpolate_bilinear`,
                // without materializing `classes x height x width` values.
                Some(t) => {
                    let (oh, ow) = t[i];
                    check_interpolate(image.len(), c, h, w, oh, ow)?;
                    if oh.checked_mul(ow).is_none_or(|n| n > PIL_MAX_IMAGE_PIXELS as usize) {
                        return Err(input_err(
                            format!("target_sizes[{i}]"),
                            format!("at most {PIL_MAX_IMAGE_PIXELS} pixels"),
                            format!("{oh}x{ow}"),
                        ));
                    }
                    let (ys, xs) = (bilinear_taps(h, oh, false), bilinear_taps(w, ow, false));
                    let mut ids = Vec::with_capacity(oh * ow);
                    let mut vals = vec![0f32; c];
                    for &yt in &ys {
                        for &xt in &xs {
                            for (k, v) in vals.iter_mut().enumerate() {
                                *v = bilinear_at(&image[k * h * w..][..h * w], w, yt, xt);
                            }
                            ids.push(argmax_at(&vals, c, 1, 0));
                        }
                    }
                    out.push((ids, (oh, ow)));
                }
                None => out.push((argmax_channels(image, c, h * w), (h, w))),
            }
        }
        Ok(out)
    }
}

/// Resize/crop targets come from untrusted configs: refuse ones above Pillow's pixel limit rather
/// than trying to allocate them.
fn check_area(field: &str, h: usize, w: usize) -> Result<()> {
    match h.checked_mul(w) {
        Some(n) if n > 0 && n as u64 <= PIL_MAX_IMAGE_PIXELS => Ok(()),
        _ => Err(input_err(format!("`{field}`"), format!("1 to {PIL_MAX_IMAGE_PIXELS} pixels"), format!("{h}x{w}"))),
    }
}

/// `get_size_dict(size, default_to_square=True)`: int -> square, `[h, w, ...]` -> height/width,
/// dict -> one of transformers' valid key sets. The error string is what was expected.
fn parse_size(v: &Value) -> std::result::Result<SizeDict, String> {
    let dim = |v: &Value| v.as_u64().filter(|&x| x > 0).map(|x| x as usize);
    const EXPECTED: &str = "a positive integer, [height, width], or a dict with keys {height, width}";
    match v {
        Value::Number(_) => {
            dim(v).map(|s| SizeDict::HeightWidth { height: s, width: s }).ok_or_else(|| EXPECTED.into())
        }
        Value::Array(a) if a.len() >= 2 => match (dim(&a[0]), dim(&a[1])) {
            (Some(height), Some(width)) => Ok(SizeDict::HeightWidth { height, width }),
            _ => Err(EXPECTED.into()),
        },
        Value::Object(o) => {
            let mut keys: Vec<String> = o.keys().cloned().collect();
            keys.sort();
            let k: Vec<&str> = keys.iter().map(String::as_str).collect();
            match k.as_slice() {
                ["height", "width"] => match (o.get("height").and_then(dim), o.get("width").and_then(dim)) {
                    (Some(height), Some(width)) => Ok(SizeDict::HeightWidth { height, width }),
                    _ => Err("positive integer `height` and `width`".into()),
                },
                ["shortest_edge"]
                | ["longest_edge", "shortest_edge"]
                | ["longest_edge"]
                | ["max_height", "max_width"] => Ok(SizeDict::Other(keys)),
                _ => Err(EXPECTED.into()),
            }
        }
        _ => Err(EXPECTED.into()),
    }
}

/// transformers' `center_crop` on an HWC buffer: `top = (h - crop_h) // 2` (floor), and when the
/// crop is larger than the image, zero padding of `ceil((new - old) / 2)` before cropping.
fn center_crop(src: &[u8], h: usize, w: usize, ch: usize, crop_h: usize, crop_w: usize) -> Vec<u8> {
    let offsets = |size: usize, crop: usize| -> (i64, i64) {
        let start = (size as i64 - crop as i64).div_euclid(2);
        let pad = (crop.max(size) - size).div_ceil(2) as i64;
        (start + pad, pad) // start in padded coordinates, and where the image begins there
    };
    let ((top, top_pad), (left, left_pad)) = (offsets(h, crop_h), offsets(w, crop_w));
    let mut out = vec![0u8; crop_h * crop_w * ch];
    for y in 0..crop_h {
        let sy = top + y as i64 - top_pad;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..crop_w {
            let sx = left + x as i64 - left_pad;
            if sx < 0 || sx >= w as i64 {
                continue;
            }
            let s = (sy as usize * w + sx as usize) * ch;
            out[(y * crop_w + x) * ch..][..ch].copy_from_slice(&src[s..s + ch]);
        }
    }
    out
}

/// Argmax over `c` planes of `plane` values each, at position `p`: the first maximum wins and NaN
/// counts as the maximum, as in `torch.argmax`.
fn argmax_at(data: &[f32], c: usize, plane: usize, p: usize) -> u32 {
    let mut best = 0usize;
    for k in 1..c {
        let (v, b) = (data[k * plane + p], data[best * plane + p]);
        if !b.is_nan() && (v.is_nan() || v > b) {
            best = k;
        }
    }
    best as u32
}

fn argmax_channels(data: &[f32], c: usize, plane: usize) -> Vec<u32> {
    (0..plane).map(|p| argmax_at(data, c, plane, p)).collect()
}

/// Per output index `(i0, i1, lambda0, lambda1)` as ATen's CPU `compute_source_index_and_lambda`:
/// the scale is `in / out` (or `(in - 1) / (out - 1)` with `align_corners`) in float32, the source
/// index `scale * (dst + 0.5) - 0.5` clamped at 0; equal sizes copy.
fn bilinear_taps(input: usize, output: usize, align_corners: bool) -> Vec<(usize, usize, f32, f32)> {
    let scale: f32 = match (align_corners, output > 1) {
        (true, true) => (input - 1) as f32 / (output - 1) as f32,
        (true, false) => 0.0,
        (false, _) => input as f32 / output as f32,
    };
    (0..output)
        .map(|i| {
            if input == output {
                return (i, i, 1.0, 0.0);
            }
            let real = if align_corners { scale * i as f32 } else { (scale * (i as f32 + 0.5) - 0.5).max(0.0) };
            let i0 = (real.floor() as usize).min(input - 1);
            let l1 = (real - i0 as f32).clamp(0.0, 1.0);
            (i0, if i0 < input - 1 { i0 + 1 } else { i0 }, 1.0 - l1, l1)
        })
        .collect()
}

/// One output value: columns blended in each row, then the two rows (ATen's `Interpolate` order).
#[inline]
fn bilinear_at(
    plane: &[f32],
    w: usize,
    (y0, y1, ly0, ly1): (usize, usize, f32, f32),
    (x0, x1, lx0, lx1): (usize, usize, f32, f32),
) -> f32 {
    let t0 = plane[y0 * w + x0] * lx0 + plane[y0 * w + x1] * lx1;
    let t1 = plane[y1 * w + x0] * lx0 + plane[y1 * w + x1] * lx1;
    t0 * ly0 + t1 * ly1
}

/// Largest output `interpolate_bilinear` builds (values); larger requests are refused, not allocated.
pub const MAX_INTERPOLATE_VALUES: usize = 1 << 32;

/// `torch.nn.functional.interpolate(x[None], size=(out_h, out_w), mode="bilinear",
/// align_corners=...)[0]` for a contiguous float32 `[c, h, w]` tensor, following ATen's CPU kernel
/// (float32 scale, indices and weights). Returns `[c, out_h, out_w]`.
pub fn interpolate_bilinear(
    src: &[f32],
    c: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> Result<Vec<f32>> {
    check_interpolate(src.len(), c, h, w, out_h, out_w)?;
    if c.checked_mul(out_h).and_then(|x| x.checked_mul(out_w)).is_none_or(|n| n > MAX_INTERPOLATE_VALUES) {
        return Err(input_err(
            "interpolate_bilinear output",
            format!("at most {MAX_INTERPOLATE_VALUES} values"),
            format!("{c}x{out_h}x{out_w}"),
        ));
    }
    let (ys, xs) = (bilinear_taps(h, out_h, align_corners), bilinear_taps(w, out_w, align_corners));
    let mut out = Vec::with_capacity(c * out_h * out_w);
    for plane in src.chunks_exact(h * w) {
        for &yt in &ys {
            out.extend(xs.iter().map(|&xt| bilinear_at(plane, w, yt, xt)));
        }
    }
    Ok(out)
}

fn check_interpolate(len: usize, c: usize, h: usize, w: usize, out_h: usize, out_w: usize) -> Result<()> {
    if c.checked_mul(h).and_then(|x| x.checked_mul(w)) != Some(len) {
        return Err(input_err("interpolate_bilinear input", format!("{c}*{h}*{w} values"), format!("{len}")));
    }
    if c == 0 || h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(input_err(
            "interpolate_bilinear sizes",
            "non-empty input and output",
            format!("{c}x{h}x{w} -> {out_h}x{out_w}"),
        ));
    }
    Ok(())
}

/// RGB conversion with the results PIL's `Image.open(...).convert("RGB")` gives for the modes its
/// decoders produce: gray is replicated, alpha is dropped (not composited), 16-bit grayscale
/// (PIL mode `I;16`) is clipped to 255, 16-bit RGB(A) and gray+alpha keep the high byte.
pub fn to_rgb_like_pil(img: &DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let gray = |v: Vec<u8>| {
        RgbImage::from_fn(w, h, |x, y| {
            let g = v[y as usize * w as usize + x as usize];
            image::Rgb([g, g, g])
        })
    };
    match img {
        DynamicImage::ImageRgb8(i) => i.clone(),
        DynamicImage::ImageLuma8(i) => gray(i.as_raw().clone()),
        DynamicImage::ImageLumaA8(i) => gray(i.pixels().map(|p| p.0[0]).collect()),
        DynamicImage::ImageLuma16(i) => gray(i.pixels().map(|p| p.0[0].min(255) as u8).collect()),
        DynamicImage::ImageLumaA16(i) => gray(i.pixels().map(|p| (p.0[0] >> 8) as u8).collect()),
        DynamicImage::ImageRgba8(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([p[0], p[1], p[2]])
        }),
        DynamicImage::ImageRgb16(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
        }),
        DynamicImage::ImageRgba16(i) => RgbImage::from_fn(w, h, |x, y| {
            let p = i.get_pixel(x, y).0;
            image::Rgb([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
        }),
        other => other.to_rgb8(), // float images: the image crate's conversion
    }
}

/// Decodes an image file (format sniffed from the content, first frame, no EXIF rotation),
/// refusing images above `max_pixels` from the header, before any pixel is decoded. Baseline JPEGs
/// go through a decoder that is bit-exact with PIL's libjpeg-turbo; other formats (and JPEG
/// features it does not cover, e.g. progressive) through the `image` crate.
pub fn decode_image(path: impl AsRef<Path>, max_pixels: Option<u64>) -> Result<DynamicImage> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ProcessorError::Io { path: name.clone(), source })?;
    let too_many = |width: u32, height: u32, limit: u64| ProcessorError::TooManyPixels {
        path: name.clone(),
        width,
        height,
        pixels: width as u64 * height as u64,
        limit,
    };
    if bytes.starts_with(&[0xFF, 0xD8]) {
        match jpeg::decode(&bytes, max_pixels) {
            Ok(Some(d)) => {
                let img = match d.channels {
                    1 => GrayImage::from_raw(d.width, d.height, d.pixels).map(DynamicImage::ImageLuma8),
                    _ => RgbImage::from_raw(d.width, d.height, d.pixels).map(DynamicImage::ImageRgb8),
                };
                return img.ok_or_else(|| ProcessorError::Decode {
                    path: name.clone(),
                    message: "inconsistent JPEG buffer".into(),
                });
            }
            Ok(None) => {} // a JPEG feature left to the `image` crate
            Err(jpeg::JpegError::TooManyPixels { width, height }) => {
                return Err(too_many(width, height, max_pixels.unwrap_or(0)))
            }
            Err(jpeg::JpegError::Corrupt(message)) => return Err(ProcessorError::Decode { path: name, message }),
        }
    }
    let dec_err = |e: image::ImageError| ProcessorError::Decode { path: name.clone(), message: e.to_string() };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|source| ProcessorError::Io { path: name.clone(), source })?;
    let mut limits = image::Limits::default();
    // Room for the largest allowed image in 16-bit RGBA; the pixel check below is the real limit.
    limits.max_alloc = max_pixels.map(|m| m.saturating_mul(8).max(512 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(dec_err)?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    if let Some(limit) = max_pixels {
        if width as u64 * height as u64 > limit {
            return Err(too_many(width, height, limit));
        }
    }
    DynamicImage::from_decoder(decoder).map_err(dec_err)
}

/// Loads an image as RGB like transformers' pipelines (`PIL.Image.open(path).convert("RGB")`),
/// with Pillow's decompression-bomb limit.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    load_image_with_limit(path, Some(PIL_MAX_IMAGE_PIXELS))
}

/// `load_image` with a configurable pixel limit (`None`: no limit).
pub fn load_image_with_limit(path: impl AsRef<Path>, max_pixels: Option<u64>) -> Result<RgbImage> {
    Ok(to_rgb_like_pil(&decode_image(path, max_pixels)?))
}

/// Loads a label map as `np.array(PIL.Image.open(path))` sees it: 8-bit grayscale, or 16-bit
/// grayscale with values up to 255. Palette PNGs are refused: the decoder expands them to RGB.
pub fn load_segmentation_map(path: impl AsRef<Path>) -> Result<GrayImage> {
    let path = path.as_ref();
    let img = decode_image(path, Some(PIL_MAX_IMAGE_PIXELS))?;
    let what = format!("{}: segmentation map", path.display());
    match img {
        DynamicImage::ImageLuma8(i) => Ok(i),
        DynamicImage::ImageLuma16(i) => {
            let (w, h) = i.dimensions();
            let max = i.pixels().map(|p| p.0[0]).max().unwrap_or(0);
            if max > 255 {
                return Err(input_err(what, "label values up to 255", format!("a 16-bit value of {max}")));
            }
            let data = i.pixels().map(|p| p.0[0] as u8).collect();
            GrayImage::from_raw(w, h, data).ok_or_else(|| input_err(what, "a consistent buffer", "a short one"))
        }
        other => {
            Err(input_err(what, "a single-channel (L or 16-bit grayscale) label image", format!("{:?}", other.color())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/processor/");

    fn manifest() -> Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}manifest.json")).unwrap()).unwrap()
    }

    /// A little-endian, C-order .npy file: dtype string, shape and raw data.
    fn read_npy(rel: &str) -> (String, Vec<usize>, Vec<u8>) {
        let bytes = std::fs::read(format!("{FIXTURES}{rel}")).unwrap();
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        let (len, start) = if bytes[6] == 1 {
            (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
        } else {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        };
        let header = std::str::from_utf8(&bytes[start..start + len]).unwrap();
        assert!(header.contains("'fortran_order': False"), "{header}");
        let descr = header.split("'descr': '").nth(1).unwrap().split('\'').next().unwrap().to_string();
        let shape = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
        let shape = shape.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
        (descr, shape, bytes[start + len..].to_vec())
    }

    fn npy_f32(rel: &str) -> (Vec<usize>, Vec<f32>) {
        let (d, s, b) = read_npy(rel);
        assert_eq!(d, "<f4");
        (s, b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }

    fn npy_i64(rel: &str) -> (Vec<usize>, Vec<i64>) {
        let (d, s, b) = read_npy(rel);
        assert_eq!(d, "<i8");
        (s, b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    }

    fn strs(v: &Value) -> Vec<String> {
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    }

    /// transformers' pixel_values for every fixture case: identical for PNG inputs, within one
    /// uint8 level (>= 99% of values) for JPEG inputs, whose decoders differ slightly.
    #[test]
    fn pixel_values_match_transformers() {
        for case in manifest()["processor_cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let proc =
                BeitImageProcessor::from_json_file(format!("{FIXTURES}{}", case["config"].as_str().unwrap())).unwrap();
            let images: Vec<RgbImage> =
                strs(&case["images"]).iter().map(|p| load_image(format!("{FIXTURES}{p}")).unwrap()).collect();
            let ours = proc.preprocess_rgb(&images).unwrap();
            let (shape, theirs) = if let Some(npy) = case["pixel_values"].as_str() {
                npy_f32(npy)
            } else {
                // uint8 levels before rescale/normalize; the generator checked that this formula
                // (transformers': float64 multiply, float32 cast, float32 normalize) reproduces its output.
                let lv = image::open(format!("{FIXTURES}{}", case["levels"].as_str().unwrap())).unwrap().to_rgb8();
                let (w, h) = (lv.width() as usize, lv.height() as usize);
                let mut v = vec![0f32; 3 * h * w];
                for (i, p) in lv.pixels().enumerate() {
                    for c in 0..3 {
                        let x = (p.0[c] as f64 * proc.rescale_factor.unwrap()) as f32;
                        v[c * h * w + i] = (x - proc.image_mean[c] as f32) / proc.image_std[c] as f32;
                    }
                }
                (vec![1, 3, h, w], v)
            };
            assert_eq!(ours.shape.to_vec(), shape, "{name}");
            // |ours - theirs| in uint8 levels: one level is rescale_factor / std.
            let scale = case["rescale_factor"].as_f64().unwrap_or(1.0);
            let std: Vec<f64> =
                case["std"].as_array().map_or(vec![1.0; 3], |a| a.iter().map(|v| v.as_f64().unwrap()).collect());
            let plane = shape[2] * shape[3];
            let (mut same, mut within1, mut max_lv) = (0usize, 0usize, 0f64);
            for (i, (a, b)) in ours.data.iter().zip(&theirs).enumerate() {
                let lv = ((a - b).abs() as f64) * std[(i / plane) % 3] / scale;
                same += (a.to_bits() == b.to_bits()) as usize;
                within1 += (lv <= 1.0 + 1e-3) as usize;
                max_lv = max_lv.max(lv);
            }
            let n = theirs.len() as f64;
            println!(
                "{name}: {:.4}% identical, {:.4}% within 1 level, max {max_lv:.3} levels ({} values)",
                100.0 * same as f64 / n,
                100.0 * within1 as f64 / n,
                theirs.len()
            );
            // Targets: PNG identical; JPEG >= 99% within one level. The JPEG decoder is bit-exact
            // with PIL's libjpeg-turbo, so JPEG inputs are held to identity too.
            if case["jpeg"].as_bool().unwrap() {
                assert!(within1 as f64 >= 0.99 * n, "{name}: only {within1} of {n} within one level");
            }
            assert_eq!(same, theirs.len(), "{name}: max {max_lv} levels");
        }
    }

    /// JPEG decoding against PIL's `convert("RGB")`: baseline/progressive, restarts, subsamplings
    /// 4:4:4 to 4:1:1 and mixed, separate scans, Adobe RGB, gray.
    #[test]
    fn jpeg_decoding_matches_pil() {
        for case in manifest()["jpeg_cases"].as_array().unwrap() {
            let ours = load_image(format!("{FIXTURES}{}", case["jpeg"].as_str().unwrap())).unwrap();
            let theirs = image::open(format!("{FIXTURES}{}", case["expected"].as_str().unwrap())).unwrap().to_rgb8();
            assert_eq!(ours.dimensions(), theirs.dimensions(), "{case}");
            let d = ours.as_raw().iter().zip(theirs.as_raw()).filter(|(a, b)| a != b).count();
            println!("jpeg {}: {d} of {} values differ", case["jpeg"], theirs.as_raw().len());
            assert_eq!(d, 0, "{case}");
        }
    }

    #[test]
    fn labels_match_transformers() {
        for case in manifest()["label_cases"].as_array().unwrap() {
            let proc =
                BeitImageProcessor::from_json_file(format!("{FIXTURES}{}", case["config"].as_str().unwrap())).unwrap();
            let map = load_segmentation_map(format!("{FIXTURES}{}", case["map"].as_str().unwrap())).unwrap();
            let ours = proc.preprocess_segmentation_maps(&[map]).unwrap();
            let (shape, theirs) = npy_i64(case["labels"].as_str().unwrap());
            assert_eq!(ours.shape.to_vec(), shape, "{case}");
            let same = ours.data.iter().zip(&theirs).filter(|(a, b)| a == b).count();
            println!("labels {}: {same} of {} identical", case["config"], theirs.len());
            assert_eq!(ours.data, theirs, "{case}");
        }
    }

    #[test]
    fn post_process_and_interpolate_match_torch() {
        let m = manifest();
        let t = &m["torch"];
        let proc = BeitImageProcessor::default();
        let (s, logits) = npy_f32(t["logits"].as_str().unwrap());
        let shape = [s[0], s[1], s[2], s[3]];
        let sizes: Vec<(usize, usize)> = t["target_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize))
            .collect();
        let ours = proc.post_process_semantic_segmentation(&logits, shape, Some(&sizes)).unwrap();
        for (i, want) in strs(&t["seg_target"]).iter().enumerate() {
            let (ws, want) = npy_i64(want);
            assert_eq!((ours[i].1 .0, ours[i].1 .1), (ws[0], ws[1]));
            assert!(ours[i].0.iter().zip(&want).all(|(a, b)| *a as i64 == *b), "image {i}");
        }
        let none = proc.post_process_semantic_segmentation(&logits, shape, None).unwrap();
        let (_, want) = npy_i64(t["seg_none"].as_str().unwrap());
        assert_eq!(none.iter().flat_map(|m| m.0.iter().map(|&v| v as i64)).collect::<Vec<_>>(), want);
        let (s, ties) = npy_f32(t["logits_ties"].as_str().unwrap());
        let got = proc.post_process_semantic_segmentation(&ties, [s[0], s[1], s[2], s[3]], None).unwrap();
        let (_, want) = npy_i64(t["seg_ties"].as_str().unwrap());
        assert_eq!(got[0].0.iter().map(|&v| v as i64).collect::<Vec<_>>(), want);
        assert!(proc.post_process_semantic_segmentation(&logits, shape, Some(&sizes[..1])).is_err());
        assert!(proc.post_process_semantic_segmentation(&logits[1..], shape, None).is_err());

        let (s, src) = npy_f32(t["interp_src"].as_str().unwrap());
        let mut worst = 0f32;
        for case in t["interp"].as_array().unwrap() {
            let (oh, ow) = (case["size"][0].as_u64().unwrap() as usize, case["size"][1].as_u64().unwrap() as usize);
            let ac = case["align_corners"].as_bool().unwrap();
            let got = interpolate_bilinear(&src, s[0], s[1], s[2], oh, ow, ac).unwrap();
            let (_, want) = npy_f32(case["expected"].as_str().unwrap());
            assert_eq!(got.len(), want.len());
            let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-5, "{case}: max diff {d}");
            worst = worst.max(d);
        }
        println!("interpolate_bilinear: max |ours - torch| = {worst:e}");
    }

    #[test]
    fn config_parsing_follows_transformers() {
        let p = BeitImageProcessor::from_json_str("{}").unwrap();
        assert_eq!(p, BeitImageProcessor::default());
        let p = BeitImageProcessor::from_json_str(
            r#"{"size": [200, 300], "crop_size": 100, "do_resize": null, "reduce_labels": true, "resample": 0,
                "image_mean": 0.25, "image_processor_type": "BeitImageProcessor", "x": {"y": 1}}"#,
        )
        .unwrap();
        assert_eq!(p.size, SizeDict::HeightWidth { height: 200, width: 300 });
        assert_eq!(p.crop_size, SizeDict::HeightWidth { height: 100, width: 100 });
        assert!(!p.do_resize && !p.do_reduce_labels); // null is falsy; `reduce_labels` is ignored
        assert_eq!((p.resample, p.image_mean.clone()), (Some(Filter::Nearest), vec![0.25]));
        let p = BeitImageProcessor::from_json_str(r#"{"size": {"shortest_edge": 224}, "size_divisor": 32}"#).unwrap();
        let err = p.preprocess_rgb(&[RgbImage::new(4, 4)]).unwrap_err().to_string();
        assert!(err.contains("image 0") && err.contains("shortest_edge"), "{err}");
        for bad in [
            r#"{"size": {"height": 2}}"#,
            r#"{"size": 224.5}"#,
            r#"{"size": [3]}"#,
            r#"{"crop_size": {"height": 0, "width": 3}}"#,
            r#"{"resample": 9}"#,
            r#"{"do_resize": "yes"}"#,
            r#"{"image_std": ["a"]}"#,
            r#"{"rescale_factor": "x"}"#,
            "[]",
            "{",
        ] {
            let e = BeitImageProcessor::from_json_str(bad).unwrap_err().to_string();
            assert!(e.contains("preprocessor_config.json"), "{bad}: {e}");
        }
        let huge = BeitImageProcessor::from_json_str(r#"{"size": 1000000}"#).unwrap();
        assert!(huge.preprocess_rgb(&[RgbImage::new(2, 2)]).is_err());
        let p = BeitImageProcessor::from_json_str(r#"{"image_mean": [0.5, 0.5]}"#).unwrap();
        assert!(p.preprocess_rgb(&[RgbImage::new(2, 2)]).is_err());
        let p = BeitImageProcessor::from_json_str(r#"{"rescale_factor": null}"#).unwrap();
        assert!(p.preprocess_rgb(&[RgbImage::new(2, 2)]).is_err());
        let p = BeitImageProcessor::from_json_str(r#"{"do_resize": false, "do_center_crop": false}"#).unwrap();
        assert!(p.preprocess_rgb(&[RgbImage::new(2, 2), RgbImage::new(3, 2)]).is_err());
        assert_eq!(p.preprocess_rgb(&[]).unwrap().shape, [0, 3, 0, 0]);
    }

    #[test]
    fn center_crop_pads_like_transformers() {
        // 1x3 image, crop 2x4: top = (1-2)//2 = -1, pad ceil(1/2) = 1 -> rows [pad, image]
        let src = [1u8, 2, 3];
        assert_eq!(center_crop(&src, 1, 3, 1, 2, 4), vec![0, 0, 0, 0, 0, 1, 2, 3]);
        assert_eq!(center_crop(&[1, 2, 3, 4, 5], 1, 5, 1, 1, 2), vec![2, 3]);
        let mut l = [0u8, 1, 2, 254, 255];
        BeitImageProcessor::reduce_labels(&mut l);
        assert_eq!(l, [255, 0, 1, 253, 255]);
    }

    #[test]
    fn loading_refuses_bad_files_without_panicking() {
        let dir = std::env::temp_dir().join(format!("beit-processor-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = std::fs::read(format!("{FIXTURES}images/astronaut.png")).unwrap();
        for (name, bytes) in
            [("truncated.png", &png[..png.len() / 2]), ("garbage.png", b"not an image".as_slice()), ("empty.jpg", b"")]
        {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = load_image(&p).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        let e = load_image(dir.join("missing.png")).unwrap_err();
        assert!(matches!(e, ProcessorError::Io { .. }), "{e}");
        let e = load_image_with_limit(format!("{FIXTURES}images/astronaut.png"), Some(256 * 256 - 1)).unwrap_err();
        assert!(matches!(e, ProcessorError::TooManyPixels { pixels: 65536, .. }), "{e}");
        assert!(load_image_with_limit(format!("{FIXTURES}images/astronaut.png"), Some(256 * 256)).is_ok());
        assert!(load_segmentation_map(format!("{FIXTURES}images/astronaut.png")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
