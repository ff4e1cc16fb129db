//! BeitEmbeddings and BeitPatchEmbeddings: patches, CLS token, mask token, absolute positions.

use candle_core::{DType, Tensor};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::nn::{dropout, Conv2d, Mode};
use crate::ops::interpolate_bicubic;
use crate::weights::{Init, Weights};

/// BeitPatchEmbeddings: a strided convolution from pixels to one vector per patch.
#[derive(Debug, Clone)]
pub struct BeitPatchEmbeddings {
    /// `projection`
    pub projection: Conv2d,
    /// Input channels.
    pub num_channels: usize,
    /// Patch size in pixels.
    pub patch_size: (usize, usize),
}

impl BeitPatchEmbeddings {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        let (ph, pw) = (c.patch_size.height, c.patch_size.width);
        let p = w.pp("projection");
        let weight = p.get((c.hidden_size, c.num_channels, ph, pw), "weight", Init::Normal(c.initializer_range))?;
        let bias = p.get(c.hidden_size, "bias", Init::Zeros)?;
        if ph != pw {
            // candle's conv2d takes one stride for both axes.
            return Err(BeitError::config("patch_size", format!("non-square patches {ph}x{pw} are not supported")));
        }
        Ok(BeitPatchEmbeddings {
            projection: Conv2d::new(weight, Some(bias), ph, 0, 1),
            num_channels: c.num_channels,
            patch_size: (ph, pw),
        })
    }

    /// (batch, patches, hidden) and the patch grid (height, width).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (_, ch, h, w) = pixel_values.dims4()?;
        if ch != self.num_channels {
            return Err(BeitError::invalid_input(
                "pixel_values",
                format!("{ch} channels, but the model's config has num_channels = {}", self.num_channels),
            ));
        }
        if h < self.patch_size.0 || w < self.patch_size.1 {
            return Err(BeitError::invalid_input(
                "pixel_values",
                format!("image {h}x{w} is smaller than one {}x{} patch", self.patch_size.0, self.patch_size.1),
            ));
        }
        let x = self.projection.forward(pixel_values)?;
        let (_, _, gh, gw) = x.dims4()?;
        Ok((x.flatten_from(2)?.transpose(1, 2)?, (gh, gw)))
    }
}

/// A (1, side² + 1, hidden) absolute position table for a `grid` of (rows, columns) patches: the patch part
/// resized bicubically (align_corners=False), the CLS entry kept, as transformers' interpolate_pos_encoding. The
/// model calls it per input size; training calls it once to load a checkpoint at a new size.
pub(crate) fn resize_position_embeddings(table: &Tensor, grid: (usize, usize)) -> Result<Tensor> {
    let (_, positions, dim) = table.dims3()?;
    let num_positions = positions - 1;
    let side = (num_positions as f64).sqrt() as usize;
    if side * side != num_positions {
        return Err(BeitError::invalid_input(
            "position_embeddings",
            format!("{num_positions} positions do not form a square grid, so they cannot be interpolated"),
        ));
    }
    let class_pos = table.narrow(1, 0, 1)?;
    let patch_pos = table.narrow(1, 1, num_positions)?.reshape((1, side, side, dim))?.permute((0, 3, 1, 2))?;
    let (nh, nw) = grid;
    let patch_pos = interpolate_bicubic(&patch_pos, nh, nw)?.permute((0, 2, 3, 1))?.reshape((1, nh * nw, dim))?;
    Ok(Tensor::cat(&[&class_pos, &patch_pos], 1)?)
}

/// BeitEmbeddings: CLS token, patch embeddings, mask token and position embeddings.
#[derive(Debug, Clone)]
pub struct BeitEmbeddings {
    /// (1, 1, hidden)
    pub cls_token: Tensor,
    /// (1, 1, hidden), when the model is built for masked image modeling.
    pub mask_token: Option<Tensor>,
    /// `patch_embeddings`
    pub patch_embeddings: BeitPatchEmbeddings,
    /// (1, patches + 1, hidden), when `use_absolute_position_embeddings`.
    pub position_embeddings: Option<Tensor>,
    /// Patch size in pixels.
    pub patch_size: usize,
    hidden_dropout_prob: f64,
}

impl BeitEmbeddings {
    /// Builds the module from `w`, the checkpoint's tensors under this module's prefix.
    pub fn load(w: &Weights, c: &BeitConfig) -> Result<Self> {
        let d = c.hidden_size;
        let (gh, gw) = c.patch_grid();
        Ok(BeitEmbeddings {
            cls_token: w.get((1, 1, d), "cls_token", Init::Zeros)?,
            mask_token: if c.use_mask_token { Some(w.get((1, 1, d), "mask_token", Init::Zeros)?) } else { None },
            patch_embeddings: BeitPatchEmbeddings::load(&w.pp("patch_embeddings"), c)?,
            position_embeddings: if c.use_absolute_position_embeddings {
                Some(w.get((1, gh * gw + 1, d), "position_embeddings", Init::Zeros)?)
            } else {
                None
            },
            patch_size: c.patch_size.height,
            hidden_dropout_prob: c.hidden_dropout_prob,
        })
    }

    /// The absolute position table for an input of `height` x `width` pixels: transformers interpolates it
    /// (bicubic) whenever the patch count or the aspect differs from the table's, whatever the caller asked.
    fn interpolate_pos_encoding(&self, table: &Tensor, num_patches: usize, height: usize, width: usize) -> Result<Tensor> {
        let num_positions = table.dim(1)? - 1;
        if num_patches == num_positions && height == width {
            return Ok(table.clone());
        }
        resize_position_embeddings(table, (height / self.patch_size, width / self.patch_size))
    }

    /// Embeds `pixel_values`, replacing masked patches by the mask token.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, (usize, usize))> {
        let (_, _, height, width) = pixel_values.dims4()?;
        let (mut x, grid) = self.patch_embeddings.forward(pixel_values)?;
        let (b, n, d) = x.dims3()?;
        if let Some(m) = bool_masked_pos {
            let mask_token = self.mask_token.as_ref().ok_or_else(|| {
                BeitError::unsupported("bool_masked_pos", "given, but the model has no mask token (use_mask_token is false)")
            })?;
            if m.dims() != [b, n] {
                return Err(BeitError::invalid_input(
                    "bool_masked_pos",
                    format!("shape {:?}, expected [batch, patches] = [{b}, {n}]", m.dims()),
                ));
            }
            // embeddings * (1 - w) + mask_token * w, as transformers mixes them.
            let wgt = m.to_dtype(DType::F32)?.unsqueeze(2)?;
            let keep = wgt.affine(-1.0, 1.0)?;
            x = (x.broadcast_mul(&keep)? + mask_token.broadcast_mul(&wgt)?)?;
        }
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?;
        if let Some(table) = &self.position_embeddings {
            x = x.broadcast_add(&self.interpolate_pos_encoding(table, n, height, width)?)?;
        }
        Ok((dropout(&x, self.hidden_dropout_prob, mode)?, grid))
    }
}
