//! Semantic segmentation metrics as `evaluate`'s `mean_iou` (the metric of transformers' task guide) and mmseg
//! compute them: per class the intersection, union, predicted area and label area summed over the whole dataset (not
//! averaged per image), then IoU and accuracy per class, their NaN-skipping means, and the overall pixel accuracy.

use crate::error::{BeitError, Result};

/// The label value that marks pixels to skip (ADE20K's, transformers' and mmseg's).
pub const IGNORE_INDEX: u32 = 255;

/// Per-class areas summed over the images seen so far; [`MeanIou::compute`] turns them into [`SegMetrics`].
#[derive(Debug, Clone, PartialEq)]
pub struct MeanIou {
    num_labels: usize,
    ignore_index: u32,
    reduce_labels: bool,
    area_intersect: Vec<u64>,
    area_pred_label: Vec<u64>,
    area_label: Vec<u64>,
}

/// What [`MeanIou::compute`] returns; the fields are named as `evaluate`'s `mean_iou` names them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SegMetrics {
    /// Mean over classes of the IoU, skipping NaN (classes absent from both predictions and labels).
    pub mean_iou: f64,
    /// Mean over classes of the accuracy, skipping NaN (classes absent from the labels).
    pub mean_accuracy: f64,
    /// Correctly predicted pixels over all labelled (not ignored) pixels.
    pub overall_accuracy: f64,
    /// Intersection over union per class; NaN where the union is empty.
    pub per_category_iou: Vec<f64>,
    /// Intersection over label area per class; NaN where the class has no labelled pixel.
    pub per_category_accuracy: Vec<f64>,
}

impl MeanIou {
    /// An empty accumulator over `num_labels` classes. `reduce_labels` does to each label map what `evaluate` and
    /// BeitImageProcessor's `do_reduce_labels` do: 0 becomes 255 (ignored), every other id goes down by one.
    pub fn new(num_labels: usize, ignore_index: u32, reduce_labels: bool) -> Result<Self> {
        if num_labels == 0 {
            return Err(BeitError::invalid_input("num_labels", "expected at least one class, found 0"));
        }
        Ok(Self {
            num_labels,
            ignore_index,
            reduce_labels,
            area_intersect: vec![0; num_labels],
            area_pred_label: vec![0; num_labels],
            area_label: vec![0; num_labels],
        })
    }

    /// The number of classes.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Adds one image: its predicted class ids and its label map, both row-major and of the same size. Ids outside
    /// `0..num_labels` are counted in no class (as `evaluate`'s histograms drop them); pixels whose label is the
    /// ignore index are skipped entirely.
    pub fn update(&mut self, pred: &[u32], label: &[u32]) -> Result<()> {
        if pred.len() != label.len() {
            return Err(BeitError::invalid_input(
                "segmentation map",
                format!("prediction has {} pixels, label has {}", pred.len(), label.len()),
            ));
        }
        let n = self.num_labels;
        for (&p, &l) in pred.iter().zip(label) {
            let l = if self.reduce_labels { reduce_label(l) } else { l };
            if l == self.ignore_index {
                continue;
            }
            let (p, l) = (p as usize, l as usize);
            if p < n {
                self.area_pred_label[p] += 1;
            }
            if l < n {
                self.area_label[l] += 1;
                if p == l {
                    self.area_intersect[l] += 1;
                }
            }
        }
        Ok(())
    }

    /// Adds the areas another accumulator (over the same classes) has collected, e.g. from another worker.
    pub fn merge(&mut self, other: &MeanIou) -> Result<()> {
        if other.num_labels != self.num_labels {
            return Err(BeitError::invalid_input(
                "segmentation metrics",
                format!("cannot merge {} classes into {}", other.num_labels, self.num_labels),
            ));
        }
        for (a, b) in [
            (&mut self.area_intersect, &other.area_intersect),
            (&mut self.area_pred_label, &other.area_pred_label),
            (&mut self.area_label, &other.area_label),
        ] {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// Summed intersection per class.
    pub fn area_intersect(&self) -> &[u64] {
        &self.area_intersect
    }

    /// Summed union per class (predicted + labelled - intersection).
    pub fn area_union(&self) -> Vec<u64> {
        (0..self.num_labels).map(|c| self.area_pred_label[c] + self.area_label[c] - self.area_intersect[c]).collect()
    }

    /// Summed predicted area per class.
    pub fn area_pred_label(&self) -> &[u64] {
        &self.area_pred_label
    }

    /// Summed labelled area per class.
    pub fn area_label(&self) -> &[u64] {
        &self.area_label
    }

    /// The metrics over everything added so far, as `evaluate`'s `mean_iou` computes them in float64.
    pub fn compute(&self) -> SegMetrics {
        let union = self.area_union();
        let iou: Vec<f64> = self.area_intersect.iter().zip(&union).map(|(&i, &u)| i as f64 / u as f64).collect();
        let acc: Vec<f64> =
            self.area_intersect.iter().zip(&self.area_label).map(|(&i, &l)| i as f64 / l as f64).collect();
        let total_intersect: u64 = self.area_intersect.iter().sum();
        let total_label: u64 = self.area_label.iter().sum();
        SegMetrics {
            mean_iou: nanmean(&iou),
            mean_accuracy: nanmean(&acc),
            overall_accuracy: total_intersect as f64 / total_label as f64,
            per_category_iou: iou,
            per_category_accuracy: acc,
        }
    }
}

/// BeitImageProcessor's `do_reduce_labels` on one id: 0 (background) becomes 255, 255 stays, the rest go down by one.
pub fn reduce_label(id: u32) -> u32 {
    match id {
        0 | IGNORE_INDEX => IGNORE_INDEX,
        v => v - 1,
    }
}

/// numpy's nanmean: the mean of the non-NaN values, NaN when there are none.
fn nanmean(values: &[f64]) -> f64 {
    let kept: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if kept.is_empty() {
        return f64::NAN;
    }
    kept.iter().sum::<f64>() / kept.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/seg_metrics/mean_iou.json");

    fn flat(maps: &serde_json::Value) -> Vec<Vec<u32>> {
        // ok: test fixture of known shape.
        maps.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                m.as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32))
                    .collect()
            })
            .collect()
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        // ok: test fixture; null stands for NaN (JSON has none).
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()
    }

    fn same(a: f64, b: f64, what: &str) {
        // The areas match exactly and each per-class value is one float64 division of them; 1 ulp is allowed because
        // serde_json's default float parsing (no float_roundtrip feature) can be off by one ulp, and the means may
        // differ from numpy's pairwise summation by a rounding step.
        assert!((a.is_nan() && b.is_nan()) || (a - b).abs() <= 2.3e-16 * b.abs().max(1.0), "{what}: {a} vs {b}");
    }

    #[test]
    fn matches_evaluate_mean_iou() {
        // ok: test fixture.
        let text = std::fs::read_to_string(FIXTURE).unwrap();
        let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
        for case in cases.as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let num_labels = case["num_labels"].as_u64().unwrap() as usize;
            let ignore = case["ignore_index"].as_u64().unwrap() as u32;
            let reduce = case["reduce_labels"].as_bool().unwrap();
            let mut m = MeanIou::new(num_labels, ignore, reduce).unwrap();
            for (p, l) in flat(&case["predictions"]).iter().zip(flat(&case["labels"])) {
                m.update(p, &l).unwrap();
            }
            let e = &case["expected"];
            let as_f = |v: &[u64]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            assert_eq!(as_f(m.area_intersect()), floats(&e["area_intersect"]), "{name}");
            assert_eq!(as_f(&m.area_union()), floats(&e["area_union"]), "{name}");
            assert_eq!(as_f(m.area_pred_label()), floats(&e["area_pred_label"]), "{name}");
            assert_eq!(as_f(m.area_label()), floats(&e["area_label"]), "{name}");
            let r = m.compute();
            for (c, (a, b)) in r.per_category_iou.iter().zip(floats(&e["per_category_iou"])).enumerate() {
                same(*a, b, &format!("{name} iou[{c}]"));
            }
            for (c, (a, b)) in r.per_category_accuracy.iter().zip(floats(&e["per_category_accuracy"])).enumerate() {
                same(*a, b, &format!("{name} acc[{c}]"));
            }
            same(r.mean_iou, e["mean_iou"].as_f64().unwrap(), name);
            same(r.mean_accuracy, e["mean_accuracy"].as_f64().unwrap(), name);
            same(r.overall_accuracy, e["overall_accuracy"].as_f64().unwrap(), name);
        }
    }

    #[test]
    fn summed_over_the_dataset_not_averaged_per_image() {
        // ok: test values.
        let mut m = MeanIou::new(2, IGNORE_INDEX, false).unwrap();
        m.update(&[0, 0, 0, 0], &[0, 0, 0, 1]).unwrap(); // class 0: 3/4
        m.update(&[0], &[0]).unwrap(); // class 0: 1/1
        let r = m.compute();
        assert_eq!(r.per_category_iou[0], 4.0 / 5.0);
        assert_eq!(r.per_category_iou[1], 0.0);
        assert_eq!(r.overall_accuracy, 4.0 / 5.0);
    }

    #[test]
    fn ignores_255_and_reduces_labels() {
        // ok: test values.
        let mut m = MeanIou::new(3, IGNORE_INDEX, true).unwrap();
        // Labels 0 and 255 are ignored; 1..=3 become 0..=2.
        m.update(&[2, 2, 0, 1, 2], &[0, 255, 1, 2, 4]).unwrap();
        assert_eq!(m.area_label(), &[1, 1, 0]);
        assert_eq!(m.area_intersect(), &[1, 1, 0]);
        let r = m.compute();
        assert!(r.per_category_accuracy[2].is_nan());
        assert_eq!(r.per_category_iou[2], 0.0);
        assert_eq!(r.mean_accuracy, 1.0);
    }

    #[test]
    fn rejects_mismatched_sizes_and_zero_classes() {
        assert!(MeanIou::new(0, IGNORE_INDEX, false).is_err());
        // ok: test value.
        let mut m = MeanIou::new(2, IGNORE_INDEX, false).unwrap();
        let err = m.update(&[0, 1], &[0]).unwrap_err().to_string();
        assert!(err.contains("2 pixels") && err.contains("has 1"), "{err}");
    }

    #[test]
    fn merge_adds_areas() {
        // ok: test values.
        let mut a = MeanIou::new(2, IGNORE_INDEX, false).unwrap();
        let mut b = a.clone();
        a.update(&[0, 1], &[0, 0]).unwrap();
        b.update(&[1], &[1]).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.area_intersect(), &[1, 1]);
        assert!(a.merge(&MeanIou::new(3, IGNORE_INDEX, false).unwrap()).is_err());
    }
}
