//! Training: fine-tuning an image classifier ([`finetune`]), BEiT's masked-image-modeling pre-training
//! ([`pretrain`]) and fine-tuning semantic segmentation ([`segmentation`]), all on the loop, checkpoints and
//! --resume of [`run`].

pub mod data;
pub mod finetune;
pub mod optim;
pub mod parquet;
pub mod pretrain;
pub mod pretrain_data;
pub mod run;
pub mod seg_data;
pub mod seg_metrics;
pub mod segmentation;

pub use finetune::{
    accuracy, evaluate, ClassificationMetrics, EpochMetrics, Evaluation, FineTuning, ModelSource, TrainOptions, Trainer,
};
pub use run::{eval_processor, scheduled_lr, EpochRecord, Run, RunOptions, Schedule, Task, TrainObserver};
pub use crate::kernels::conv::Precision;
pub use seg_metrics::{MeanIou, SegMetrics};
pub use segmentation::{SegEpochMetrics, SegEvaluation, SegFineTuning, SegOptions, SegTrainer, SegmentationMetrics};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};

/// The architecture presets: DeiT/BEiT sizes.
pub fn preset(name: &str) -> Result<BeitConfig> {
    let (hidden, layers, heads) = match name {
        "tiny" => (192, 12, 3),
        "small" => (384, 12, 6),
        "base" => (768, 12, 12),
        "large" => (1024, 24, 16),
        other => {
            return Err(BeitError::invalid_input(
                "preset",
                format!("unknown preset {other:?}; expected tiny, small, base or large"),
            ))
        }
    };
    Ok(BeitConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 4 * hidden,
        use_relative_position_bias: true,
        layer_scale_init_value: if name == "large" { 1e-5 } else { 0.1 },
        ..BeitConfig::default()
    })
}
