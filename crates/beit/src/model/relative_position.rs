//! BeitRelativePositionBias: T5-style bias per head, at any input resolution (the MiDaS v3.1 extension that
//! transformers implements). The gathered bias depends only on the window size, so inference computes it once
//! per resolution and keeps it, unless it is large: at 640×640 (1601 tokens) it is 123 MB a layer, 1.5 GB for
//! BEiT-base's twelve, so from [`MAX_CACHED_VALUES`] on it is gathered again each pass (a few ms a layer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::config::BeitConfig;
use crate::error::Result;
use crate::nn::Mode;
use crate::ops::interpolate_bilinear;
use crate::weights::{Init, Weights};

/// Largest bias (heads × tokens², f32) inference keeps per resolution: 16 MB, BEiT-base up to 384×384 inputs.
pub const MAX_CACHED_VALUES: usize = 1 << 22;

/// BeitRelativePositionBias: a learned bias per head for every relative offset of two patches (and the CLS token).
#[derive(Debug, Clone)]
pub struct BeitRelativePositionBias {
    /// ((2h - 1)(2w - 1) + 3, heads)
    pub relative_position_bias_table: Tensor,
    /// The patch grid the table was trained for.
    pub window_size: (usize, usize),
    num_heads: usize,
    /// (window, interpolated dim) -> (1, heads, N+1, N+1), inference only.
    cache: Arc<Mutex<HashMap<(usize, usize, usize), Tensor>>>,
}

/// transformers' generate_relative_position_index: (Wh*Ww+1)^2 indices into the table.
pub fn relative_position_index(window: (usize, usize)) -> Vec<u32> {
    let (wh, ww) = window;
    let area = wh * ww;
    let num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3;
    let n = area + 1;
    let mut index = vec![0u32; n * n];
    for i in 0..area {
        let (yi, xi) = ((i / ww) as i64, (i % ww) as i64);
        for j in 0..area {
            let (yj, xj) = ((j / ww) as i64, (j % ww) as i64);
            let dy = yi - yj + wh as i64 - 1;
            let dx = xi - xj + ww as i64 - 1;
            index[(i + 1) * n + (j + 1)] = (dy * (2 * ww as i64 - 1) + dx) as u32;
        }
    }
    for j in 0..n {
        index[j] = (num_relative_distance - 3) as u32; // cls to token
    }
    for i in 0..n {
        index[i * n] = (num_relative_distance - 2) as u32; // token to cls
    }
    index[0] = (num_relative_distance - 1) as u32; // cls to cls
    index
}

/// A ((2h - 1)(2w - 1) + 3, heads) bias table trained for window `from`, for window `to`: the (2Wh-1)x(2Ww-1)
/// part resized bilinearly (align_corners=False), the three CLS entries kept, as transformers' forward does on
/// every pass. The model calls it per input size; training calls it once to load a checkpoint at a new size.
pub(crate) fn resize_relative_position_table(
    table: &Tensor,
    from: (usize, usize),
    to: (usize, usize),
) -> Result<Tensor> {
    if from == to {
        return Ok(table.clone());
    }
    let heads = table.dim(1)?;
    let (old_h, old_w) = (2 * from.0 - 1, 2 * from.1 - 1);
    let (new_h, new_w) = (2 * to.0 - 1, 2 * to.1 - 1);
    let old_n = old_h * old_w;
    // transformers reshapes the table as (old_width, old_height): the same for square windows.
    let sub = table.narrow(0, 0, old_n)?.reshape((1, old_w, old_h, heads))?.permute((0, 3, 1, 2))?;
    let sub = interpolate_bilinear(&sub, new_h, new_w, false)?;
    let sub = sub.permute((0, 2, 3, 1))?.reshape((new_h * new_w, heads))?;
    Ok(Tensor::cat(&[&sub, &table.narrow(0, old_n, 3)?], 0)?)
}

impl BeitRelativePositionBias {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig, window_size: (usize, usize)) -> Result<Self> {
        let num_relative_distance = (2 * window_size.0 - 1) * (2 * window_size.1 - 1) + 3;
        Ok(BeitRelativePositionBias {
            relative_position_bias_table: w.get(
                (num_relative_distance, c.num_attention_heads),
                "relative_position_bias_table",
                Init::Zeros,
            )?,
            window_size,
            num_heads: c.num_attention_heads,
            cache: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The bias table for another window (see [`resize_relative_position_table`]).
    fn table_for(&self, window: (usize, usize)) -> Result<Tensor> {
        resize_relative_position_table(&self.relative_position_bias_table, self.window_size, window)
    }

    /// (1, heads, N+1, N+1) for a `window` of patches; `dim_size` is the sequence length the caller sees, to
    /// which the bias is resized when `interpolate_pos_encoding` is set (identity unless they differ).
    pub fn forward(
        &self,
        window: (usize, usize),
        interpolate_pos_encoding: bool,
        dim_size: usize,
        mode: Mode,
    ) -> Result<Tensor> {
        let target = if interpolate_pos_encoding { dim_size } else { 0 };
        let key = (window.0, window.1, target);
        let n = window.0 * window.1 + 1;
        let cacheable = !mode.train && !mode.uncached && self.num_heads * n * n <= MAX_CACHED_VALUES;
        if cacheable {
            if let Some(t) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
                return Ok(t.clone());
            }
        }
        let table = self.table_for(window)?;
        let table_dtype = table.dtype();
        let bias = if mode.train || !table.device().is_cpu() {
            let index =
                Tensor::from_vec(relative_position_index(window), n * n, &Device::Cpu)?.to_device(table.device())?;
            table.index_select(&index, 0)?.reshape((n, n, self.num_heads))?.permute((2, 0, 1))?.contiguous()?
        } else {
            // The same gather without autograd, straight into (heads, n, n) on all cores.
            let heads = self.num_heads;
            let (table, index) = (
                table.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                relative_position_index(window),
            );
            let mut out = vec![0f32; heads * n * n];
            out.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
                let (h, i) = (row / n, row % n);
                for (d, &k) in dst.iter_mut().zip(&index[i * n..(i + 1) * n]) {
                    *d = table[k as usize * heads + h];
                }
            });
            Tensor::from_vec(out, (heads, n, n), &Device::Cpu)?.to_dtype(table_dtype)?
        };
        let bias = if interpolate_pos_encoding && dim_size != n {
            interpolate_bilinear(&bias.unsqueeze(1)?, dim_size, dim_size, false)?.squeeze(1)?
        } else {
            bias
        };
        let bias = bias.unsqueeze(0)?;
        if cacheable {
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, bias.clone());
        }
        Ok(bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inference's gather equals training's index_select bit for bit; a bias past MAX_CACHED_VALUES is not kept.
    #[test]
    fn inference_gather_matches_and_large_biases_are_not_cached() {
        let (heads, trained) = (16, (4, 4));
        let rows = (2 * trained.0 - 1) * (2 * trained.1 - 1) + 3;
        let table: Vec<f32> = (0..rows * heads).map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5).collect();
        let rpb = BeitRelativePositionBias {
            relative_position_bias_table: Tensor::from_vec(table, (rows, heads), &Device::Cpu).unwrap(),
            window_size: trained,
            num_heads: heads,
            cache: Arc::new(Mutex::new(HashMap::new())),
        };
        let (train, infer) = (Mode { train: true, uncached: true, ..Mode::default() }, Mode { train: false, uncached: false, ..Mode::default() });
        // 4x4: 16 x 17^2 values, kept; 23x23: 16 x 530^2 = 4.5M > MAX_CACHED_VALUES, gathered each time.
        for (window, kept) in [((4, 4), 1), ((23, 23), 1)] {
            let n = window.0 * window.1 + 1;
            let want = rpb.forward(window, false, n, train).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = rpb.forward(window, false, n, infer).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(want, got, "window {window:?}");
            assert_eq!(rpb.cache.lock().unwrap().len(), kept, "window {window:?}");
        }
    }

    #[test]
    fn index_matches_transformers_for_2x2() {
        // torch: BeitRelativePositionBias.generate_relative_position_index((2, 2)) flattened.
        let expected: Vec<u32> = vec![11, 9, 9, 9, 9, 10, 4, 3, 1, 0, 10, 5, 4, 2, 1, 10, 7, 6, 4, 3, 10, 8, 7, 5, 4];
        assert_eq!(relative_position_index((2, 2)), expected);
        let expected_2x3: Vec<u32> = vec![
            17, 15, 15, 15, 15, 15, 15, 16, 7, 6, 5, 2, 1, 0, 16, 8, 7, 6, 3, 2, 1, 16, 9, 8, 7, 4, 3, 2, 16, 12, 11,
            10, 7, 6, 5, 16, 13, 12, 11, 8, 7, 6, 16, 14, 13, 12, 9, 8, 7,
        ];
        assert_eq!(relative_position_index((2, 3)), expected_2x3);
    }
}
