//! `beit tokenize`: BEiT's visual tokens from the DALL-E dVAE encoder (OpenAI's encoder.pkl or a safetensors
//! state dict), for images or float32 NCHW pixels in [0, 1].

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use beit::npy::{read_npy, write_npy_f32, write_npy_i64};
use beit::processor::load_image;
use beit::processor::resample::{resize, Filter};
use beit::tokenizer::DalleEncoder;
use candle_core::{Device, Tensor};
use clap::Args;

#[derive(Args)]
pub struct TokenizeArgs {
    /// The DALL-E encoder: encoder.pkl (torch.save of dall_e.encoder.Encoder; read without executing it) or a
    /// .safetensors state dict with the same names.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Images, resized to --image-size (Pillow bicubic) and scaled to [0, 1].
    images: Vec<PathBuf>,
    /// Instead of images: float32 NCHW pixels in [0, 1] (.npy).
    #[arg(long, conflicts_with = "images")]
    pixels: Option<PathBuf>,
    /// Tokens: int64 (b, h/8, w/8) .npy.
    #[arg(long)]
    out: PathBuf,
    /// Also write the vocabulary logits: float32 (b, vocab, h/8, w/8) .npy.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Side of the square images are resized to (BEiT feeds the tokenizer 112x112).
    #[arg(long, default_value_t = 112)]
    image_size: usize,
}

/// An image as CHW float32 in [0, 1] at size x size.
fn image_pixels(path: &PathBuf, size: usize) -> Result<Vec<f32>> {
    let img = load_image(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hwc = resize(img.as_raw(), w, h, 3, size, size, Filter::Bicubic)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut chw = vec![0f32; 3 * size * size];
    for i in 0..size * size {
        for c in 0..3 {
            chw[c * size * size + i] = hwc[i * 3 + c] as f32 / 255.0;
        }
    }
    Ok(chw)
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let encoder = DalleEncoder::load(&a.tokenizer)?;
    let device = Device::Cpu;
    let pixels = match &a.pixels {
        Some(p) => read_npy(p)?.to_f32_tensor(p, &device)?,
        None => {
            if a.images.is_empty() {
                bail!("give images or --pixels X.npy");
            }
            if a.image_size < 8 {
                bail!("--image-size {} is smaller than one 8x8 token", a.image_size);
            }
            let mut data = Vec::with_capacity(a.images.len() * 3 * a.image_size * a.image_size);
            for path in &a.images {
                data.extend(image_pixels(path, a.image_size)?);
            }
            Tensor::from_vec(data, (a.images.len(), 3, a.image_size, a.image_size), &device)?
        }
    };
    let logits = encoder.logits(&pixels)?;
    let tokens = logits.argmax(1)?;
    let tokens_v: Vec<i64> = tokens.flatten_all()?.to_vec1::<u32>()?.into_iter().map(i64::from).collect();
    write_npy_i64(&a.out, tokens.dims(), &tokens_v).with_context(|| format!("writing {}", a.out.display()))?;
    if let Some(out) = &a.logits_out {
        let v: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        write_npy_f32(out, logits.dims(), &v)?;
    }
    eprintln!(
        "{} image(s) -> tokens {:?} (vocabulary {}) in {}",
        tokens.dim(0)?,
        tokens.dims(),
        encoder.vocab_size,
        a.out.display()
    );
    Ok(())
}
