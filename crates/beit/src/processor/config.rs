//! The processor's configuration: `BeitImageProcessor`'s fields, its class defaults, and
//! `preprocessor_config.json` parsed as `BeitImageProcessor.from_dict` reads it.

use std::path::Path;

use serde_json::Value;

use super::resample::Filter;
use super::{input_err, ProcessorError, Result};

/// transformers' `IMAGENET_STANDARD_MEAN`, the class default `image_mean`.
pub const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
/// transformers' `IMAGENET_STANDARD_STD`, the class default `image_std`.
pub const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// A transformers size dict after `get_size_dict`. BEiT only uses `{height, width}`; the other key
/// sets transformers accepts at load time (`shortest_edge`, ...) fail when resize/crop runs, as there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SizeDict {
    /// `{"height": h, "width": w}` (also what an int or a `[h, w]` list becomes).
    HeightWidth {
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
    },
    /// Another key set transformers accepts (sorted key names); refused when used.
    Other(Vec<String>),
}

impl SizeDict {
    pub(super) fn height_width(&self, field: &str) -> Result<(usize, usize)> {
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

/// BEiT image processor, configured like transformers' `BeitImageProcessor`.
#[derive(Clone, Debug, PartialEq)]
pub struct BeitImageProcessor {
    /// Resize to `size` first.
    pub do_resize: bool,
    /// The resize target.
    pub size: SizeDict,
    /// `None` when the config says `null` (transformers then refuses to resize).
    pub resample: Option<Filter>,
    /// Center-crop to `crop_size` after resizing (zero padding where the crop is larger).
    pub do_center_crop: bool,
    /// The crop.
    pub crop_size: SizeDict,
    /// Multiply the uint8 values by `rescale_factor`.
    pub do_rescale: bool,
    /// `None` when the config says `null` (transformers then refuses to rescale).
    pub rescale_factor: Option<f64>,
    /// Subtract `image_mean` and divide by `image_std`, per channel.
    pub do_normalize: bool,
    /// One value per channel, or a single value for all channels.
    pub image_mean: Vec<f64>,
    /// One value per channel, or a single value for all channels.
    pub image_std: Vec<f64>,
    /// Segmentation maps: class 0 (background) becomes 255 (ignored) and the others shift down by one.
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

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
}
