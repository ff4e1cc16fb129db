//! BeitForImageClassification: the pooled output through a linear classifier; the loss follows problem_type.

use candle_core::{DType, Tensor};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::loss::{bce_with_logits, cross_entropy, mse};
use crate::model::{BeitModel, BeitModelOutput, ForwardOptions};
use crate::nn::Linear;
use crate::weights::Weights;

/// transformers' BeitForImageClassification.
#[derive(Debug, Clone)]
pub struct BeitForImageClassification {
    /// The encoder, with its pooler.
    pub beit: BeitModel,
    /// Identity when num_labels is 0.
    pub classifier: Option<Linear>,
    problem_type: Option<String>,
    num_labels: usize,
}

/// ImageClassifierOutput.
#[derive(Debug, Clone)]
pub struct ImageClassificationOutput {
    /// The loss when labels were given (cross entropy, BCE or MSE by `problem_type`).
    pub loss: Option<Tensor>,
    /// (batch, num_labels)
    pub logits: Tensor,
    /// The encoder's output (hidden states, attentions when asked for).
    pub base: BeitModelOutput,
}

impl BeitForImageClassification {
    /// Builds the model from `w`; a missing classifier is initialized as transformers does (and reported).
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        let n = c.num_labels();
        Ok(BeitForImageClassification {
            beit: BeitModel::load(&w.pp("beit"), c, true)?,
            classifier: if n > 0 {
                Some(Linear::load_head(&w.pp("classifier"), c.hidden_size, n, c.initializer_range)?)
            } else {
                None
            },
            problem_type: c.problem_type.clone(),
            num_labels: n,
        })
    }

    /// Logits of `pixel_values`, and the loss against `labels` when given.
    pub fn forward(&self, pixel_values: &Tensor, o: &ForwardOptions, labels: Option<&Tensor>) -> Result<ImageClassificationOutput> {
        let base = self.beit.forward(pixel_values, o)?;
        let pooled = base
            .pooler_output
            .as_ref()
            .ok_or_else(|| BeitError::internal("classifier", "the backbone was built without its pooler"))?;
        let logits = match &self.classifier {
            Some(c) => c.forward(pooled)?,
            None => pooled.clone(),
        };
        let loss = match labels {
            Some(l) => Some(self.loss(&logits, l)?),
            None => None,
        };
        Ok(ImageClassificationOutput { loss, logits, base })
    }

    /// transformers' ForSequenceClassificationLoss: the problem type comes from the config, else from the
    /// number of labels and the labels' dtype.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let integer = matches!(labels.dtype(), DType::I64 | DType::U32 | DType::U8 | DType::I32 | DType::I16);
        let problem = match self.problem_type.as_deref() {
            Some(p) => p,
            None if self.num_labels == 1 => "regression",
            None if self.num_labels > 1 && integer => "single_label_classification",
            None => "multi_label_classification",
        };
        match problem {
            "regression" => mse(logits, labels),
            "single_label_classification" => {
                cross_entropy(&logits.reshape(((), self.num_labels.max(1)))?, labels, -100)
            }
            _ => bce_with_logits(logits, labels),
        }
    }
}
