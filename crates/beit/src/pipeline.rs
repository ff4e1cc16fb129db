//! Images in, answers out: the model, its image processor, and the tasks transformers' pipelines offer
//! (image classification, semantic segmentation, feature extraction) plus masked-token prediction.

use std::borrow::Borrow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;

use crate::error::{BeitError, Result};
use crate::heads::AnyBeitModel;
use crate::model::{BeitModelOutput, ForwardOptions};
use crate::pretrained::{LoadOptions, Pretrained};
use crate::processor::{BeitImageProcessor, SegmentationMap};

mod slide;

pub use slide::{rescaled_size, SlideOptions};

/// One class and its score.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// The class name (`id2label`, else LABEL_i).
    pub label: String,
    /// Softmax (or sigmoid) probability.
    pub score: f32,
}

/// A model with its image processor: transformers' `pipeline(...)` for BEiT's tasks.
pub struct Pipeline {
    /// The model and its configuration.
    pub pretrained: Pretrained,
    /// The model's image processor (preprocessor_config.json).
    pub processor: BeitImageProcessor,
    /// Where the model's files are.
    pub model_dir: PathBuf,
    /// Where the model runs.
    pub device: Device,
}

/// An image through the processor, ready for the model: what loading threads hand the model's thread, so that
/// resizing and normalizing run beside the model instead of before it ([`Pipeline::preparer`]).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// CHW float32 values.
    pub pixels: Vec<f32>,
    /// `[3, height, width]` of `pixels`.
    pub shape: [usize; 3],
    /// The image's own (height, width), where segmentation maps are resized back to.
    pub original: (usize, usize),
}

fn prepare(processor: &BeitImageProcessor, image: &RgbImage) -> crate::processor::Result<Prepared> {
    let (pixels, shape) = processor.preprocess_image(image)?;
    Ok(Prepared { pixels, shape, original: (image.height() as usize, image.width() as usize) })
}

/// A masked-image-modeling prediction: which patches were masked and the visual token predicted for each.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MimPrediction {
    /// Patch grid (rows, columns).
    pub grid: (usize, usize),
    /// Masked patch indices, row-major.
    pub masked: Vec<usize>,
    /// Predicted visual token of each masked patch.
    pub tokens: Vec<u32>,
    /// Softmax probability of each prediction.
    pub scores: Vec<f32>,
}

impl Pipeline {
    /// The model `spec` names (a directory, a weights file or a Hub repo id, as
    /// [`Pretrained::from_pretrained`] takes it) with its image processor, on the CPU.
    pub fn from_pretrained(spec: &str, options: &LoadOptions) -> Result<Self> {
        let pretrained = Pretrained::from_pretrained(spec, options)?;
        let processor = processor_for(&pretrained.model_dir)?;
        Ok(Pipeline { model_dir: pretrained.model_dir.clone(), pretrained, processor, device: Device::Cpu })
    }

    /// `images` through the processor, as the model's input tensor.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        let pv = self.processor.preprocess_rgb(images)?;
        Ok(Tensor::from_vec(pv.data, pv.shape.to_vec(), &self.device)?)
    }

    /// The processor as a function another thread can run (owning a copy of it): image to [`Prepared`].
    pub fn preparer(&self) -> impl Fn(&RgbImage) -> crate::processor::Result<Prepared> + Send + Sync + 'static {
        let processor = self.processor.clone();
        move |image| prepare(&processor, image)
    }

    fn prepare_all(&self, images: &[RgbImage]) -> Result<Vec<Prepared>> {
        let item = |i: usize, e: crate::processor::ProcessorError| e.for_item(&format!("image {i}"));
        Ok(images
            .iter()
            .enumerate()
            .map(|(i, img)| prepare(&self.processor, img).map_err(|e| item(i, e)))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Prepared images as one input tensor; they must share a shape (always true when the processor resizes).
    fn batch<P: Borrow<Prepared>>(&self, prepared: &[P]) -> Result<Tensor> {
        let Some(first) = prepared.first().map(Borrow::borrow) else {
            return Err(BeitError::invalid_input("images", "at least one image"));
        };
        let mut data = Vec::with_capacity(prepared.len() * first.pixels.len());
        for (i, p) in prepared.iter().map(Borrow::borrow).enumerate() {
            if p.shape != first.shape {
                return Err(BeitError::invalid_input(
                    format!("image {i}"),
                    format!("pixel values of shape {:?} like image 0, found {:?}", first.shape, p.shape),
                ));
            }
            data.extend_from_slice(&p.pixels);
        }
        let [c, h, w] = first.shape;
        Ok(Tensor::from_vec(data, (prepared.len(), c, h, w), &self.device)?)
    }

    /// Softmax scores of the `top_k` best classes for each image, best first (as the image-classification
    /// pipeline; sigmoid when the config says multi-label).
    pub fn classify(&self, images: &[RgbImage], top_k: usize) -> Result<Vec<Vec<Prediction>>> {
        self.classify_prepared(&self.prepare_all(images)?, top_k)
    }

    /// [`classify`](Self::classify) of images already through the processor (owned or borrowed).
    pub fn classify_prepared<P: Borrow<Prepared>>(&self, prepared: &[P], top_k: usize) -> Result<Vec<Vec<Prediction>>> {
        let AnyBeitModel::ImageClassification(m) = &self.pretrained.model else {
            return Err(self.wrong_class("image classification", "an image-classification"));
        };
        let logits = m.forward(&self.batch(prepared)?, &ForwardOptions::default(), None)?.logits;
        let probs = if self.pretrained.config.problem_type.as_deref() == Some("multi_label_classification")
            || self.pretrained.config.num_labels() == 1
        {
            candle_nn::ops::sigmoid(&logits)?
        } else {
            candle_nn::ops::softmax(&logits, D::Minus1)?
        };
        let probs = probs.to_vec2::<f32>()?;
        let labels = &self.pretrained.config.id2label;
        Ok(probs
            .into_iter()
            .map(|row| {
                let mut idx: Vec<usize> = (0..row.len()).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                idx.into_iter()
                    .take(top_k)
                    .map(|i| Prediction {
                        label: labels.get(&i).cloned().unwrap_or_else(|| format!("LABEL_{i}")),
                        score: row[i],
                    })
                    .collect()
            })
            .collect())
    }

    /// Class ids per pixel at each image's own size (post_process_semantic_segmentation with target sizes).
    pub fn segment(&self, images: &[RgbImage]) -> Result<Vec<SegmentationMap>> {
        self.segment_prepared(&self.prepare_all(images)?)
    }

    /// [`segment`](Self::segment) of images already through the processor.
    pub fn segment_prepared<P: Borrow<Prepared>>(&self, prepared: &[P]) -> Result<Vec<SegmentationMap>> {
        let AnyBeitModel::SemanticSegmentation(m) = &self.pretrained.model else {
            return Err(self.wrong_class("semantic segmentation", "a semantic-segmentation"));
        };
        let logits = m.forward(&self.batch(prepared)?, &ForwardOptions::default(), None)?.logits;
        let dims: [usize; 4] = logits.dims4()?.into();
        let data = logits.flatten_all()?.to_vec1::<f32>()?;
        let sizes: Vec<(usize, usize)> = prepared.iter().map(|p| p.borrow().original).collect();
        Ok(self.processor.post_process_semantic_segmentation(&data, dims, Some(&sizes))?)
    }

    /// The backbone's output for each image: the pooled vector (batch, hidden) or every token
    /// (batch, 1 + patches, hidden).
    pub fn embed(&self, images: &[RgbImage], tokens: bool) -> Result<Tensor> {
        self.embed_prepared(&self.prepare_all(images)?, tokens)
    }

    /// [`embed`](Self::embed) of images already through the processor.
    pub fn embed_prepared<P: Borrow<Prepared>>(&self, prepared: &[P], tokens: bool) -> Result<Tensor> {
        let x = self.batch(prepared)?;
        let o = ForwardOptions::default();
        let base: BeitModelOutput = match &self.pretrained.model {
            AnyBeitModel::Model(m) => m.forward(&x, &o)?,
            AnyBeitModel::ImageClassification(m) => m.beit.forward(&x, &o)?,
            AnyBeitModel::MaskedImageModeling(m) => m.beit.forward(&x, &o)?,
            AnyBeitModel::SemanticSegmentation(m) => m.beit.forward(&x, &o)?,
            AnyBeitModel::Backbone(_) => return Err(self.wrong_class("embedding", "a BeitModel-based")),
        };
        if tokens {
            return Ok(base.last_hidden_state);
        }
        match base.pooler_output {
            Some(p) => Ok(p),
            // No pooler (MIM and segmentation checkpoints): pool as the config says, without the pooler's norm.
            None => {
                let h = &base.last_hidden_state;
                let n = h.dim(1)?;
                if self.pretrained.config.use_mean_pooling {
                    Ok(h.narrow(1, 1, n - 1)?.mean(1)?)
                } else {
                    Ok(h.narrow(1, 0, 1)?.squeeze(1)?)
                }
            }
        }
    }

    /// Masks `mask_ratio` of the patches (seeded) and predicts the visual token of each masked one.
    pub fn mim(&self, image: &RgbImage, mask_ratio: f64, seed: u64) -> Result<MimPrediction> {
        let AnyBeitModel::MaskedImageModeling(m) = &self.pretrained.model else {
            return Err(self.wrong_class("masked image modeling", "a masked-image-modeling"));
        };
        if !(0.0..=1.0).contains(&mask_ratio) {
            return Err(BeitError::invalid_input("mask_ratio", format!("{mask_ratio} is not in [0, 1]")));
        }
        let x = self.pixel_values(std::slice::from_ref(image))?;
        let (_, _, h, w) = x.dims4()?;
        let p = self.pretrained.config.patch_size.height;
        let grid = (h / p, w / p);
        let n = grid.0 * grid.1;
        let masked = random_mask(n, (mask_ratio * n as f64).round() as usize, seed);
        let mut flags = vec![0u8; n];
        for &i in &masked {
            flags[i] = 1;
        }
        let o = ForwardOptions {
            bool_masked_pos: Some(Tensor::from_vec(flags, (1, n), &self.device)?),
            ..Default::default()
        };
        let logits = m.forward(&x, &o, None)?.logits.squeeze(0)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let tokens = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let best = probs.max(D::Minus1)?.to_vec1::<f32>()?;
        Ok(MimPrediction {
            grid,
            tokens: masked.iter().map(|&i| tokens[i]).collect(),
            scores: masked.iter().map(|&i| best[i]).collect(),
            masked,
        })
    }

    fn wrong_class(&self, task: &str, class: &str) -> BeitError {
        BeitError::unsupported(
            task,
            format!(
                "{} is a {} checkpoint, not {class} one",
                self.model_dir.display(),
                self.pretrained.model.architecture().name()
            ),
        )
    }
}

/// The model directory's preprocessor_config.json, else transformers' defaults (with a warning).
pub fn processor_for(dir: &Path) -> Result<BeitImageProcessor> {
    let p = dir.join("preprocessor_config.json");
    if p.is_file() {
        Ok(BeitImageProcessor::from_json_file(&p)?)
    } else {
        tracing::warn!("{} has no preprocessor_config.json; using BeitImageProcessor's defaults", dir.display());
        Ok(BeitImageProcessor::default())
    }
}

/// `count` distinct patch indices, sorted, from a seeded shuffle.
pub fn random_mask(n: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    crate::rng::Rng::new(seed).shuffle(&mut idx);
    let mut chosen: Vec<usize> = idx.into_iter().take(count.min(n)).collect();
    chosen.sort_unstable();
    chosen
}
