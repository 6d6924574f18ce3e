//! Metrics shared by training's validation and `resnet eval`: top-k accuracy, per-class
//! accuracy, a running mean of the loss.

use candle_core::{DType, Device, ModuleT, Result, Tensor};
use rayon::prelude::*;
use resnet_core::ResNet;
use resnet_io::{ImageFolder, PreprocessConfig};

/// The `k` most probable classes of each row of `logits` `(N, K)`, as (class,
/// probability) pairs, most probable first (ties to the lower class index).
pub fn top_k(logits: &Tensor, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
    let probabilities = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    let rows: Vec<Vec<f32>> = probabilities.to_device(&Device::Cpu)?.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mut indexed: Vec<(usize, f32)> = row.into_iter().enumerate().collect();
            indexed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            indexed.truncate(k);
            indexed
        })
        .collect())
}

/// Top-1, top-5 and per-class accuracy, counted one prediction at a time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Accuracy {
    top1_hits: usize,
    top5_hits: usize,
    /// Per class: (top-1 hits, images).
    per_class: Vec<(usize, usize)>,
}

impl Accuracy {
    /// Counts for `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        Self {
            per_class: vec![(0, 0); num_classes],
            ..Self::default()
        }
    }

    /// Counts one image of class `label` whose classes, most probable first, are
    /// `ranked` (at least the first five, where there are five).
    pub fn record(&mut self, ranked: &[usize], label: usize) {
        let top1 = ranked.first() == Some(&label);
        self.top1_hits += usize::from(top1);
        self.top5_hits += usize::from(ranked.iter().take(5).any(|&c| c == label));
        if label >= self.per_class.len() {
            self.per_class.resize(label + 1, (0, 0));
        }
        self.per_class[label].0 += usize::from(top1);
        self.per_class[label].1 += 1;
    }

    /// Counts a batch: `logits` `(N, K)` against `labels` (N of them).
    pub fn update(&mut self, logits: &Tensor, labels: &[usize]) -> Result<()> {
        let ranked = top_k(logits, 5)?;
        if ranked.len() != labels.len() {
            candle_core::bail!(
                "{} rows of logits for {} labels",
                ranked.len(),
                labels.len()
            );
        }
        for (top, &label) in ranked.iter().zip(labels) {
            let classes: Vec<usize> = top.iter().map(|&(c, _)| c).collect();
            self.record(&classes, label);
        }
        Ok(())
    }

    /// Images counted.
    pub fn total(&self) -> usize {
        self.per_class.iter().map(|c| c.1).sum()
    }

    /// The share of images whose most probable class is theirs (0 when none counted).
    pub fn top1(&self) -> f64 {
        ratio(self.top1_hits, self.total())
    }

    /// The share of images whose class is among the five most probable.
    pub fn top5(&self) -> f64 {
        ratio(self.top5_hits, self.total())
    }

    /// Per class: (top-1 hits, images).
    pub fn per_class(&self) -> &[(usize, usize)] {
        &self.per_class
    }

    /// Per class: the share of its images classified right (0 for a class with none).
    pub fn per_class_top1(&self) -> Vec<f64> {
        self.per_class.iter().map(|&(h, t)| ratio(h, t)).collect()
    }
}

fn ratio(hits: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

/// The mean of per-batch losses, weighted by the batch's size.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RunningLoss {
    sum: f64,
    count: usize,
}

impl RunningLoss {
    /// Adds a batch of `count` images whose mean loss is `loss`.
    pub fn add(&mut self, loss: f64, count: usize) {
        self.sum += loss * count as f64;
        self.count += count;
    }

    /// The mean so far (0 before the first batch).
    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }

    /// Images counted.
    pub fn count(&self) -> usize {
        self.count
    }
}

/// Accuracy of `model` (BatchNorm in eval mode) on an ImageFolder tree with the
/// evaluation transform, `batch_size` images per pass; unreadable images are skipped.
pub fn evaluate(
    model: &ResNet,
    folder: &ImageFolder,
    preprocess: &PreprocessConfig,
    batch_size: usize,
) -> Result<Accuracy> {
    let mut accuracy = Accuracy::new(folder.classes.len());
    for chunk in folder.images.chunks(batch_size.max(1)) {
        let loaded: Vec<(Tensor, usize)> = chunk
            .par_iter()
            .filter_map(|(path, label)| preprocess.load_image(path).ok().map(|t| (t, *label)))
            .collect();
        if loaded.is_empty() {
            continue;
        }
        let (images, labels): (Vec<Tensor>, Vec<usize>) = loaded.into_iter().unzip();
        let input = resnet_io::batch(&images, model.device(), DType::F32)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let logits = model.forward_t(&input, false)?;
        accuracy.update(&logits, &labels)?;
    }
    Ok(accuracy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_top1_top5_and_per_class() -> Result<()> {
        // Row 0: class 2 first; row 1: class 0 first, class 1 second.
        let logits = Tensor::new(
            &[
                [0.0f32, 1.0, 3.0, 0.5, 0.2, 0.1],
                [5.0, 4.0, 0.0, 0.0, 0.0, -1.0],
            ],
            &Device::Cpu,
        )?;
        let mut accuracy = Accuracy::new(3);
        accuracy.update(&logits, &[2, 1])?;
        assert_eq!(accuracy.total(), 2);
        assert_eq!(accuracy.top1(), 0.5);
        assert_eq!(accuracy.top5(), 1.0);
        assert_eq!(accuracy.per_class(), &[(0, 0), (0, 1), (1, 1)]);
        assert_eq!(accuracy.per_class_top1(), vec![0.0, 0.0, 1.0]);
        assert!(accuracy.update(&logits, &[0]).is_err());

        let mut loss = RunningLoss::default();
        loss.add(1.0, 3);
        loss.add(3.0, 1);
        assert_eq!(loss.mean(), 1.5);
        Ok(())
    }
}
