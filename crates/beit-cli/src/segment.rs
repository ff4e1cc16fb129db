//! `beit segment`: per image, a PNG of class ids at the image's size, a colour overlay with a legend, and a
//! JSON summary of each class's share of the pixels.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use beit::pipeline::SlideOptions;
use clap::Args;
use image::{ImageBuffer, Luma, RgbImage};
use plotters::prelude::*;

use crate::common::{collect_images, finish, for_each_batch, output_stem, ImageArgs, ModelArgs};

#[derive(Args)]
pub struct SegmentArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    limits: ImageArgs,
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Output directory: <name>.png (class ids), <name>_overlay.png, <name>.json.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// whole: resize each image to the model's input as the image processor does (transformers' pipeline);
    /// slide: mmseg's sliding window over the image at its own size (overlapping crops, logits averaged).
    #[arg(long, value_enum, default_value_t = Mode::Whole)]
    mode: Mode,
    /// Window size in pixels, HEIGHT WIDTH (slide; default: the model's image_size).
    #[arg(long, num_args = 2, value_names = ["HEIGHT", "WIDTH"])]
    crop: Option<Vec<usize>>,
    /// Step between windows in pixels, HEIGHT WIDTH (slide; default: two thirds of the crop, as mmseg's
    /// 512/341 and 640/426).
    #[arg(long, num_args = 2, value_names = ["HEIGHT", "WIDTH"])]
    stride: Option<Vec<usize>>,
    /// Rescale each image before sliding, keeping its aspect ratio, to fit LONG and SHORT edge bounds (mmseg's
    /// keep-ratio Resize; BEiT's ADE20K test scale is 2048 512); the mask still comes back at the image's size.
    #[arg(long, num_args = 2, value_names = ["LONG", "SHORT"])]
    scale: Option<Vec<usize>>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Whole,
    Slide,
}

/// A fixed, well-spread colour per class (golden-ratio hues).
pub fn class_color(class: u32) -> [u8; 3] {
    let h = (class as f64 * 0.618_033_988_75).fract() * 6.0;
    let (s, v) = (0.65 + 0.35 * ((class / 7) % 2) as f64, 0.95 - 0.3 * ((class / 3) % 2) as f64);
    let (i, f) = (h.floor() as u32, h.fract());
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8]
}

const LEGEND_WIDTH: u32 = 260;
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

pub fn register_font() {
    // ok to ignore: a second registration of the same font is refused and changes nothing.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
}

fn write_overlay(path: &Path, image: &RgbImage, ids: &[u32], shares: &[(u32, String, f64)]) -> Result<()> {
    let (w, h) = image.dimensions();
    let (tw, th) = (w + LEGEND_WIDTH, h.max(24 * shares.len() as u32 + 16));
    let mut buf = vec![255u8; (tw * th * 3) as usize];
    for y in 0..h {
        for x in 0..w {
            let c = class_color(ids[(y * w + x) as usize]);
            let p = image.get_pixel(x, y).0;
            let o = ((y * tw + x) * 3) as usize;
            for k in 0..3 {
                buf[o + k] = ((p[k] as u16 + c[k] as u16) / 2) as u8;
            }
        }
    }
    {
        let root = BitMapBackend::with_buffer(&mut buf, (tw, th)).into_drawing_area();
        let style = ("sans-serif", 14).into_font().color(&BLACK);
        for (row, (class, name, share)) in shares.iter().enumerate() {
            let y = 8 + 24 * row as i32;
            let [r, g, b] = class_color(*class);
            let x0 = w as i32 + 10;
            root.draw(&Rectangle::new([(x0, y), (x0 + 16, y + 16)], RGBColor(r, g, b).filled()))
                .map_err(|e| anyhow::anyhow!("drawing the legend: {e}"))?;
            root.draw(&Text::new(format!("{name} {:.1}%", share * 100.0), (x0 + 24, y + 1), style.clone()))
                .map_err(|e| anyhow::anyhow!("drawing the legend: {e}"))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("drawing the legend: {e}"))?;
    }
    let img = RgbImage::from_raw(tw, th, buf).context("overlay buffer")?;
    img.save(path).with_context(|| format!("writing {}", path.display()))
}

pub fn run(a: SegmentArgs) -> Result<()> {
    register_font();
    let pipe = a.model.pipeline()?;
    let labels = pipe.pretrained.config.id2label.clone();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let sources = collect_images(&a.images)?;
    let total = sources.len();
    let size = pipe.pretrained.config.image_size;
    let pair = |v: &Option<Vec<usize>>, default: (usize, usize)| v.as_ref().map_or(default, |v| (v[0], v[1]));
    let crop = pair(&a.crop, (size.height, size.width));
    let stride = pair(&a.stride, (crop.0 * 2 / 3, crop.1 * 2 / 3));
    let slide = SlideOptions { crop, stride, scale: a.scale.as_ref().map(|v| (v[0], v[1])) };
    if a.mode == Mode::Whole && (a.crop.is_some() || a.stride.is_some() || a.scale.is_some()) {
        anyhow::bail!("--crop, --stride and --scale are for --mode slide");
    }
    // The overlay needs each image; whole images are also prepared on the loading threads.
    let prepare = pipe.preparer();
    let whole = a.mode == Mode::Whole;
    let load = move |i: RgbImage| Ok(((whole).then(|| prepare(&i)).transpose()?, i));
    let failed = for_each_batch(sources, a.batch_size, a.limits.max_image_pixels, load, |batch_paths, loaded| {
        let maps = match a.mode {
            Mode::Whole => pipe.segment_prepared(&loaded.iter().filter_map(|(p, _)| p.as_ref()).collect::<Vec<_>>())?,
            Mode::Slide => loaded.iter().map(|(_, i)| pipe.segment_slide(i, &slide)).collect::<beit::Result<_>>()?,
        };
        for ((p, (_, image)), (ids, (h, w))) in batch_paths.iter().zip(loaded).zip(maps) {
            let stem = output_stem(p);
            let (w32, h32) = (w as u32, h as u32);
            let ids_path = a.out.join(format!("{stem}.png"));
            if labels.len() > 256 {
                let data: Vec<u16> = ids.iter().map(|&i| i as u16).collect();
                ImageBuffer::<Luma<u16>, _>::from_raw(w32, h32, data).context("label map")?.save(&ids_path)?;
            } else {
                let data: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
                ImageBuffer::<Luma<u8>, _>::from_raw(w32, h32, data).context("label map")?.save(&ids_path)?;
            }
            let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
            for &i in &ids {
                *counts.entry(i).or_default() += 1;
            }
            let mut shares: Vec<(u32, String, f64)> = counts
                .iter()
                .map(|(&c, &n)| {
                    let name = labels.get(&(c as usize)).cloned().unwrap_or_else(|| format!("LABEL_{c}"));
                    (c, name, n as f64 / ids.len() as f64)
                })
                .collect();
            shares.sort_by(|x, y| y.2.total_cmp(&x.2));
            write_overlay(&a.out.join(format!("{stem}_overlay.png")), image, &ids, &shares)?;
            let summary = serde_json::json!({
                "image": p,
                "height": h,
                "width": w,
                "classes": shares.iter().map(|(c, name, s)| serde_json::json!({"id": c, "label": name, "share": s})).collect::<Vec<_>>(),
            });
            std::fs::write(a.out.join(format!("{stem}.json")), serde_json::to_string_pretty(&summary)? + "\n")?;
            println!(
                "{p}: {}",
                shares.iter().take(3).map(|(_, n, s)| format!("{n} {:.1}%", s * 100.0)).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(())
    });
    finish(failed, total)
}
