//! `beit forward`: the parity interface. Pixel values in, every output under transformers' names out.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use beit::npy::{read_npy, NpyData};
use beit::{Architecture, Pretrained, ForwardOptions, LoadOptions, ModelInputs};
use candle_core::{Device, Tensor};
use clap::Args;

use crate::common::ModelArgs;

#[derive(Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// float32 (or float64) array of shape (batch, channels, height, width).
    #[arg(long)]
    pixel_values: PathBuf,
    /// bool or 0/1 integer array of shape (batch, patches): patches replaced by the mask token.
    #[arg(long)]
    bool_masked_pos: Option<PathBuf>,
    /// float array [heads] or [layers, heads]: 1 keeps a head, 0 masks it.
    #[arg(long)]
    head_mask: Option<PathBuf>,
    /// Labels for the head's loss (integer class ids, float targets, or visual tokens of masked patches).
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long)]
    interpolate_pos_encoding: bool,
    #[arg(long)]
    output_hidden_states: bool,
    #[arg(long)]
    output_attentions: bool,
    /// Class to run instead of config.json's `architectures` (e.g. BeitModel).
    #[arg(long)]
    head: Option<String>,
    /// Where to write the outputs (safetensors).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: ForwardArgs) -> Result<()> {
    let device = Device::Cpu;
    let opts = LoadOptions {
        architecture: a.head.as_deref().map(Architecture::from_name).transpose()?,
        ..a.model.load_options()?
    };
    let loaded = Pretrained::from_pretrained(&a.model.model, &opts)?;
    let config = &loaded.config;

    let pv = read_npy(&a.pixel_values)?;
    if pv.shape.len() != 4 {
        bail!("{}: shape {:?}, expected 4 dimensions (batch, channels, height, width)", a.pixel_values.display(), pv.shape);
    }
    if pv.shape.contains(&0) {
        bail!("{}: shape {:?} has an empty dimension", a.pixel_values.display(), pv.shape);
    }
    if pv.shape[1] != config.num_channels {
        bail!(
            "{}: {} channels, but the model's config has num_channels = {}",
            a.pixel_values.display(),
            pv.shape[1],
            config.num_channels
        );
    }
    let pixel_values = pv.to_f32_tensor(&a.pixel_values, &device)?;
    let (batch, patches) = (pv.shape[0], (pv.shape[2] / config.patch_size.height) * (pv.shape[3] / config.patch_size.width));

    let bool_masked_pos = match &a.bool_masked_pos {
        None => None,
        Some(p) => {
            let m = read_npy(p)?;
            if m.shape != [batch, patches] {
                bail!("{}: shape {:?}, expected (batch, patches) = ({batch}, {patches})", p.display(), m.shape);
            }
            Some(m.to_mask_tensor(p, &device)?)
        }
    };
    let head_mask = match &a.head_mask {
        None => None,
        Some(p) => Some(read_npy(p)?.to_f32_tensor(p, &device)?),
    };
    let labels = match &a.labels {
        None => None,
        Some(p) => {
            let l = read_npy(p)?;
            Some(match &l.data {
                NpyData::I64(v) => Tensor::from_vec(v.clone(), l.shape.clone(), &device)?,
                NpyData::I32(v) => Tensor::from_vec(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), l.shape.clone(), &device)?,
                NpyData::F32(_) | NpyData::F64(_) => l.to_f32_tensor(p, &device)?,
                _ => bail!("{}: labels must be integers or floats", p.display()),
            })
        }
    };
    let inputs = ModelInputs {
        options: ForwardOptions {
            bool_masked_pos,
            head_mask,
            output_hidden_states: a.output_hidden_states,
            output_attentions: a.output_attentions,
            interpolate_pos_encoding: a.interpolate_pos_encoding,
            ..Default::default()
        },
        labels,
    };
    let start = std::time::Instant::now();
    let outputs = loaded.model.forward_named(&pixel_values, &inputs).with_context(|| a.model.model.clone())?;
    tracing::info!("forward pass: {:.3} s", start.elapsed().as_secs_f64());
    let map: HashMap<String, Tensor> = outputs.into_iter().collect();
    candle_core::safetensors::save(&map, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    Ok(())
}
