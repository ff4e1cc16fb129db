//! BEiT's blockwise masking: unilm's `beit/masking_generator.py` `MaskingGenerator`, the same algorithm drawn
//! from our seeded [`Rng`] instead of Python's `random`. Blocks of random area (at least `min_num_patches`) and
//! log-uniform aspect ratio are added until `num_masking_patches` patches are masked or ten tries in a row add
//! nothing. BEiT pre-training uses 14x14 patches, 75 masked, min 16, aspect 0.3 .. 1/0.3.

use crate::error::{BeitError, Result};
use crate::rng::Rng;

/// unilm's MaskingGenerator over a `height` x `width` patch grid.
#[derive(Debug, Clone)]
pub struct MaskingGenerator {
    /// Patch rows.
    pub height: usize,
    /// Patch columns.
    pub width: usize,
    /// How many patches to mask (at most).
    pub num_masking_patches: usize,
    /// Smallest block, in patches.
    pub min_num_patches: usize,
    /// Largest block, in patches.
    pub max_num_patches: usize,
    /// (ln min_aspect, ln max_aspect)
    pub log_aspect_ratio: (f64, f64),
}

impl MaskingGenerator {
    /// As unilm's constructor: `max_num_patches` None means `num_masking_patches`, `max_aspect` None means
    /// `1 / min_aspect`.
    pub fn new(
        height: usize,
        width: usize,
        num_masking_patches: usize,
        min_num_patches: usize,
        max_num_patches: Option<usize>,
        min_aspect: f64,
        max_aspect: Option<f64>,
    ) -> Result<Self> {
        if height == 0 || width == 0 {
            return Err(BeitError::invalid_input("MaskingGenerator", format!("grid {height}x{width} is empty")));
        }
        if num_masking_patches > height * width {
            return Err(BeitError::invalid_input(
                "MaskingGenerator",
                format!("num_masking_patches {num_masking_patches} exceeds the {height}x{width} grid"),
            ));
        }
        // Python's `max_aspect or 1 / min_aspect` also replaces 0.
        let max_aspect = max_aspect.filter(|&a| a != 0.0).unwrap_or(1.0 / min_aspect);
        if !(min_aspect > 0.0 && max_aspect.is_finite() && max_aspect > 0.0) {
            return Err(BeitError::invalid_input(
                "MaskingGenerator",
                format!("aspect ratios must be positive and finite, found min {min_aspect}, max {max_aspect}"),
            ));
        }
        Ok(MaskingGenerator {
            height,
            width,
            num_masking_patches,
            min_num_patches,
            max_num_patches: max_num_patches.unwrap_or(num_masking_patches),
            log_aspect_ratio: (min_aspect.ln(), max_aspect.ln()),
        })
    }

    /// BEiT's pre-training setting: 14x14 patches, 75 masked, blocks of at least 16, aspect 0.3 .. 1/0.3.
    pub fn beit_default() -> Self {
        let ln = 0.3f64.ln();
        MaskingGenerator {
            height: 14,
            width: 14,
            num_masking_patches: 75,
            min_num_patches: 16,
            max_num_patches: 75,
            log_aspect_ratio: (ln, -ln),
        }
    }

    /// Python's `random.uniform(a, b)`: `a + (b - a) * random()`, also for a > b.
    fn uniform(rng: &mut Rng, a: f64, b: f64) -> f64 {
        a + (b - a) * rng.uniform()
    }

    /// unilm's `_mask`: up to ten tries at one block; returns how many patches it newly masked.
    fn mask_block(&self, mask: &mut [bool], max_mask_patches: usize, rng: &mut Rng) -> usize {
        let mut delta = 0;
        for _attempt in 0..10 {
            let target_area = Self::uniform(rng, self.min_num_patches as f64, max_mask_patches as f64);
            let aspect_ratio = Self::uniform(rng, self.log_aspect_ratio.0, self.log_aspect_ratio.1).exp();
            // Python 3's round() rounds halves to even.
            let h = (target_area * aspect_ratio).sqrt().round_ties_even() as usize;
            let w = (target_area / aspect_ratio).sqrt().round_ties_even() as usize;
            if w < self.width && h < self.height {
                // random.randint is inclusive at both ends.
                let top = rng.below(self.height - h + 1);
                let left = rng.below(self.width - w + 1);
                let num_masked = (top..top + h)
                    .map(|i| mask[i * self.width + left..i * self.width + left + w].iter().filter(|&&m| m).count())
                    .sum::<usize>();
                // Only blocks that add something and do not overshoot the budget (overlap is allowed).
                let new = h * w - num_masked;
                if 0 < new && new <= max_mask_patches {
                    for i in top..top + h {
                        for j in left..left + w {
                            if !mask[i * self.width + j] {
                                mask[i * self.width + j] = true;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }

    /// One mask, row-major (height * width), true = masked.
    pub fn generate(&self, rng: &mut Rng) -> Vec<bool> {
        let mut mask = vec![false; self.height * self.width];
        let mut mask_count = 0;
        while mask_count < self.num_masking_patches {
            let max_mask_patches = (self.num_masking_patches - mask_count).min(self.max_num_patches);
            let delta = self.mask_block(&mut mask, max_mask_patches, rng);
            if delta == 0 {
                break;
            }
            mask_count += delta;
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4-connected components of a mask: (size, bbox height, bbox width). Same definition as
    /// scripts/gen_masking_stats.py.
    fn components(mask: &[bool], h: usize, w: usize) -> Vec<(usize, usize, usize)> {
        let mut seen = vec![false; h * w];
        let mut out = Vec::new();
        for start in 0..h * w {
            if !mask[start] || seen[start] {
                continue;
            }
            seen[start] = true;
            let mut stack = vec![start];
            let (mut size, mut r0, mut r1, mut c0, mut c1) = (0, start / w, start / w, start % w, start % w);
            while let Some(p) = stack.pop() {
                size += 1;
                let (y, x) = (p / w, p % w);
                (r0, r1, c0, c1) = (r0.min(y), r1.max(y), c0.min(x), c1.max(x));
                let mut push = |q: usize| {
                    if mask[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                };
                if y + 1 < h {
                    push(p + w);
                }
                if y > 0 {
                    push(p - w);
                }
                if x + 1 < w {
                    push(p + 1);
                }
                if x > 0 {
                    push(p - 1);
                }
            }
            out.push((size, r1 - r0 + 1, c1 - c0 + 1));
        }
        out
    }

    const SIZE_BINS: [(usize, usize); 5] = [(1, 4), (4, 16), (16, 32), (32, 48), (48, 76)];

    fn per_mask(mask: &[bool]) -> Vec<(String, f64)> {
        let comps = components(mask, 14, 14);
        let n = comps.len().max(1) as f64;
        let mut v = vec![
            ("masked".to_string(), mask.iter().filter(|&&m| m).count() as f64),
            ("blocks".to_string(), comps.len() as f64),
            ("bbox_aspect".to_string(), comps.iter().map(|&(_, bh, bw)| bh as f64 / bw as f64).sum::<f64>() / n),
            (
                "bbox_abs_log_aspect".to_string(),
                comps.iter().map(|&(_, bh, bw)| (bh as f64 / bw as f64).ln().abs()).sum::<f64>() / n,
            ),
            ("largest_block".to_string(), comps.iter().map(|c| c.0).max().unwrap_or(0) as f64),
        ];
        for (lo, hi) in SIZE_BINS {
            let count = comps.iter().filter(|c| lo <= c.0 && c.0 < hi).count();
            v.push((format!("blocks_size_{lo}_{}", hi - 1), count as f64));
        }
        v
    }

    #[test]
    fn statistics_match_unilm() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/masking_stats.json");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let n_ref = doc["num_masks"].as_f64().unwrap();
        let gen = MaskingGenerator::new(14, 14, 75, 16, None, 0.3, None).unwrap();
        let n = 20_000;
        let mut rng = Rng::new(0);
        let rows: Vec<Vec<(String, f64)>> = (0..n).map(|_| per_mask(&gen.generate(&mut rng))).collect();
        let mut failures = Vec::new();
        eprintln!("{:22} {:>9} {:>9} {:>9} {:>9}", "statistic", "unilm", "ours", "|diff|", "tol");
        for (k, (key, _)) in rows[0].iter().enumerate() {
            let vals: Vec<f64> = rows.iter().map(|r| r[k].1).collect();
            let mean = vals.iter().sum::<f64>() / n as f64;
            let std = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
            let r = &doc["stats"][key];
            let (ref_mean, ref_std) = (r["mean"].as_f64().unwrap(), r["std"].as_f64().unwrap());
            // Both means are averages of independent per-mask values, so their difference has standard error
            // sqrt(s1²/n1 + s2²/n2); five of those leave a false alarm rate of ~6e-7 per statistic while still
            // catching any systematic change in the algorithm (e.g. rounding, inclusive bounds) of a few %.
            let tol = 5.0 * (ref_std.powi(2) / n_ref + std.powi(2) / n as f64).sqrt();
            let diff = (mean - ref_mean).abs();
            eprintln!("{key:22} {ref_mean:9.4} {mean:9.4} {diff:9.4} {tol:9.4}");
            if diff > tol {
                failures.push(format!("{key}: unilm {ref_mean:.4}, ours {mean:.4}, tolerance {tol:.4}"));
            }
            // The spread must match too (a generator stuck near its mean would pass the mean test).
            assert!((std - ref_std).abs() <= 0.1 * ref_std + 1e-9, "{key}: std unilm {ref_std:.4}, ours {std:.4}");
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn never_exceeds_the_budget_and_is_reproducible() {
        let gen = MaskingGenerator::beit_default();
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..500 {
            let m = gen.generate(&mut a);
            assert_eq!(m.len(), 196);
            let count = m.iter().filter(|&&x| x).count();
            assert!((1..=75).contains(&count), "{count}");
            assert_eq!(m, gen.generate(&mut b));
        }
        let same = MaskingGenerator::new(14, 14, 75, 16, None, 0.3, None).unwrap();
        assert_eq!(same.log_aspect_ratio, gen.log_aspect_ratio);
        assert_eq!(same.max_num_patches, 75);
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(MaskingGenerator::new(0, 14, 0, 16, None, 0.3, None).is_err());
        assert!(MaskingGenerator::new(4, 4, 17, 4, None, 0.3, None).is_err());
        assert!(MaskingGenerator::new(14, 14, 75, 16, None, -1.0, None).is_err());
    }
}
