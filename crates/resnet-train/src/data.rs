//! Training data: an ImageFolder tree, a seeded order per epoch, and the augmentations of
//! the paper's CIFAR recipe and torchvision's ImageNet one, decoded in parallel on a
//! worker thread ahead of the step that needs them.
//!
//! Every random choice (the epoch's order, each image's crop and flip) is a pure
//! function of `(seed, epoch, image index)`, so a run is the same for a given seed
//! whatever the thread count, and a run resumed at an epoch sees exactly what the
//! uninterrupted run saw.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use resnet_io::{ImageFolder, Interpolation, PreprocessConfig};

/// How a training image is varied before it is normalised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Augmentation {
    /// None: the evaluation transform of the model (`resnet eval`'s).
    None,
    /// The CIFAR recipe (paper section 4.2): zero-pad 4 pixels on each side, a random
    /// crop of the model's input size, a horizontal flip with probability 1/2.
    Cifar,
    /// torchvision's `RandomResizedCrop(size)` (scale 0.08-1, aspect ratio 3/4-4/3, ten
    /// tries then a centre crop; bilinear, as Pillow) and a horizontal flip.
    RandomResizedCrop,
}

impl Augmentation {
    /// The recipe for a model's input: CIFAR's for 32x32 inputs, else ImageNet's.
    pub fn for_input(size: (usize, usize)) -> Self {
        if size == (32, 32) {
            Self::Cifar
        } else {
            Self::RandomResizedCrop
        }
    }
}

/// A counter-based random stream: SplitMix64 over a key, one number per draw.
#[derive(Debug, Clone)]
pub struct Random {
    state: u64,
}

impl Random {
    /// The stream for `keys` (seed, epoch, index...).
    pub fn new(keys: &[u64]) -> Self {
        let mut state = 0x243F_6A88_85A3_08D3u64;
        for &key in keys {
            state = splitmix(state ^ key);
        }
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [0, n] (inclusive, as Python's `random.randint(0, n)`).
    pub fn up_to(&mut self, n: u64) -> u64 {
        self.next_u64() % (n + 1)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One batch: images `(N, 3, H, W)` on the device, labels `(N,)`, and the images that
/// could not be read (skipped, with their error).
#[derive(Debug)]
pub struct Batch {
    /// The images, normalised.
    pub images: Tensor,
    /// Their class indices.
    pub labels: Tensor,
    /// Unreadable images of this batch: path and reason.
    pub unreadable: Vec<(std::path::PathBuf, String)>,
}

/// Batches decoded ahead of training by [`TrainingSet::batches_ahead`]: an iterator that
/// yields them in order and ends after the last. Dropping it stops the worker.
#[derive(Debug)]
pub struct BatchesAhead {
    receiver: std::sync::mpsc::Receiver<candle_core::Result<Batch>>,
    spawn_error: Option<String>,
}

impl Iterator for BatchesAhead {
    type Item = candle_core::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(error) = self.spawn_error.take() {
            return Some(Err(candle_core::Error::Msg(format!(
                "could not start the data loading thread: {error}"
            ))));
        }
        self.receiver.recv().ok()
    }
}

/// An ImageFolder tree read for training.
#[derive(Debug)]
pub struct TrainingSet {
    root: std::path::PathBuf,
    folder: ImageFolder,
    preprocess: PreprocessConfig,
    augmentation: Augmentation,
    seed: u64,
    shuffle: bool,
}

impl TrainingSet {
    /// Lists `root` (see [`ImageFolder::open`]); images become inputs as `preprocess`
    /// says (size, mean, std), varied by `augmentation`.
    pub fn open(
        root: &Path,
        preprocess: PreprocessConfig,
        augmentation: Augmentation,
        seed: u64,
        shuffle: bool,
    ) -> resnet_io::Result<Self> {
        Ok(Self {
            root: root.to_path_buf(),
            folder: ImageFolder::open(root)?,
            preprocess,
            augmentation,
            seed,
            shuffle,
        })
    }

    /// What decides the data a run sees, for a resumed run to compare with its state:
    /// the image count, a fingerprint of every image's path (below the root), class and
    /// size in bytes (SHA-256, hex), the augmentation, the shuffle and the input size.
    pub fn description(&self) -> Vec<(String, String)> {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for (path, class) in &self.folder.images {
            let relative = path.strip_prefix(&self.root).unwrap_or(path);
            hash.update(relative.to_string_lossy().as_bytes());
            hash.update([0]);
            hash.update((*class as u64).to_le_bytes());
            let size = std::fs::metadata(path).map_or(u64::MAX, |m| m.len());
            hash.update(size.to_le_bytes());
        }
        let fingerprint: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let (height, width) = self.preprocess.size;
        vec![
            (
                "data images".to_string(),
                self.folder.images.len().to_string(),
            ),
            ("data fingerprint".to_string(), fingerprint),
            (
                "augmentation".to_string(),
                format!("{:?}", self.augmentation),
            ),
            ("shuffle".to_string(), self.shuffle.to_string()),
            ("input size".to_string(), format!("{height}x{width}")),
        ]
    }

    /// The class names, sorted.
    pub fn classes(&self) -> &[String] {
        &self.folder.classes
    }

    /// The seed of the order and the augmentation.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The preprocessing (input size, normalisation) the images get.
    pub fn preprocess(&self) -> &PreprocessConfig {
        &self.preprocess
    }

    /// How many images.
    pub fn len(&self) -> usize {
        self.folder.images.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.folder.images.is_empty()
    }

    /// Entries of the class folders that are not images, with why.
    pub fn skipped(&self) -> &[(std::path::PathBuf, String)] {
        &self.folder.skipped
    }

    /// The image indices in `epoch`'s order: sorted (ImageFolder's order) without
    /// shuffling, else a seeded Fisher-Yates permutation.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if self.shuffle {
            let mut random = Random::new(&[self.seed, epoch, u64::MAX]);
            for i in (1..order.len()).rev() {
                let j = random.up_to(i as u64) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// The batches of `epoch`, `batch_size` images each (the last one may be smaller,
    /// as PyTorch's DataLoader keeps it).
    pub fn batch_count(&self, batch_size: usize) -> usize {
        self.len().div_ceil(batch_size.max(1))
    }

    /// Batch `number` of `epoch`, decoded and augmented in parallel, on `device`.
    pub fn batch(
        &self,
        epoch: u64,
        number: usize,
        batch_size: usize,
        device: &Device,
    ) -> candle_core::Result<Batch> {
        self.batch_of(&self.order(epoch), epoch, number, batch_size, device)
    }

    /// The batches of training iterations `iterations` (iteration `i` is batch
    /// `i % batches_per_epoch` of epoch `i / batches_per_epoch`), in order, each decoded
    /// and augmented on a worker thread while the model trains on the ones before it,
    /// at most `ahead` of them waiting. The same batches as [`TrainingSet::batch`]:
    /// their content depends on the seed, epoch and index only, not on timing.
    pub fn batches_ahead(
        self: &Arc<Self>,
        iterations: Range<u64>,
        batch_size: usize,
        device: &Device,
        ahead: usize,
    ) -> BatchesAhead {
        let (sender, receiver) = std::sync::mpsc::sync_channel(ahead.max(1));
        let (data, device) = (Arc::clone(self), device.clone());
        let per_epoch = self.batch_count(batch_size).max(1) as u64;
        let worker = std::thread::Builder::new()
            .name("resnet-data".into())
            .spawn(move || {
                let mut order: Option<(u64, Vec<usize>)> = None;
                for iteration in iterations {
                    let (epoch, number) = (iteration / per_epoch, (iteration % per_epoch) as usize);
                    if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                        order = Some((epoch, data.order(epoch)));
                    }
                    let order = order.as_ref().map_or(&[][..], |(_, order)| order);
                    let batch = data.batch_of(order, epoch, number, batch_size, &device);
                    // The receiver is gone: training stopped, so does this thread.
                    if sender.send(batch).is_err() {
                        return;
                    }
                }
            });
        BatchesAhead {
            receiver,
            spawn_error: worker.err().map(|e| e.to_string()),
        }
    }

    fn batch_of(
        &self,
        order: &[usize],
        epoch: u64,
        number: usize,
        batch_size: usize,
        device: &Device,
    ) -> candle_core::Result<Batch> {
        let start = number * batch_size;
        let indices = order
            .get(start..(start + batch_size).min(order.len()))
            .unwrap_or(&[]);
        let loaded: Vec<_> = indices
            .par_iter()
            .map(|&index| (index, self.load(epoch, index)))
            .collect();
        let mut images = Vec::new();
        let mut labels = Vec::new();
        let mut unreadable = Vec::new();
        for (index, result) in loaded {
            let (path, label) = &self.folder.images[index];
            match result {
                Ok(image) => {
                    images.push(image);
                    labels.push(*label as u32);
                }
                Err(error) => unreadable.push((path.clone(), error.to_string())),
            }
        }
        if images.is_empty() {
            candle_core::bail!(
                "batch {} of epoch {}: no readable image",
                number + 1,
                epoch + 1
            );
        }
        let count = labels.len();
        Ok(Batch {
            images: Tensor::stack(&images, 0)?.to_device(device)?,
            labels: Tensor::from_vec(labels, count, device)?,
            unreadable,
        })
    }

    /// Image `index` as epoch `epoch` sees it: `(3, H, W)` on the CPU.
    pub fn load(&self, epoch: u64, index: usize) -> resnet_io::Result<Tensor> {
        let (path, _) = &self.folder.images[index];
        if self.augmentation == Augmentation::None {
            return self.preprocess.load_image(path);
        }
        let rgb = resnet_io::decode_image(path)?.to_rgb8();
        let mut random = Random::new(&[self.seed, epoch, index as u64]);
        let (height, width) = self.preprocess.size;
        let augmented = match self.augmentation {
            Augmentation::Cifar => pad_crop(&rgb, 4, width as u32, height as u32, &mut random),
            _ => random_resized_crop(&rgb, width as u32, height as u32, &mut random),
        };
        let flipped = if random.uniform() < 0.5 {
            image::imageops::flip_horizontal(&augmented)
        } else {
            augmented
        };
        self.preprocess.normalize(&flipped)
    }
}

/// Zero padding of `pad` on every side, then a random `width` x `height` crop.
pub fn pad_crop(
    rgb: &RgbImage,
    pad: u32,
    width: u32,
    height: u32,
    random: &mut Random,
) -> RgbImage {
    let (padded_w, padded_h) = (rgb.width() + 2 * pad, rgb.height() + 2 * pad);
    let top = random.up_to(u64::from(padded_h.saturating_sub(height))) as u32;
    let left = random.up_to(u64::from(padded_w.saturating_sub(width))) as u32;
    RgbImage::from_fn(width, height, |x, y| {
        let (sx, sy) = ((left + x).checked_sub(pad), (top + y).checked_sub(pad));
        match (sx, sy) {
            (Some(sx), Some(sy)) if sx < rgb.width() && sy < rgb.height() => *rgb.get_pixel(sx, sy),
            _ => image::Rgb([0, 0, 0]),
        }
    })
}

/// torchvision's `RandomResizedCrop.get_params` (scale 0.08-1, log-uniform ratio 3/4-4/3,
/// ten tries, then the centre crop of the clamped ratio), resized to `width` x `height`
/// with Pillow's bilinear filter.
pub fn random_resized_crop(
    rgb: &RgbImage,
    width: u32,
    height: u32,
    random: &mut Random,
) -> RgbImage {
    let (w, h) = (f64::from(rgb.width()), f64::from(rgb.height()));
    let area = w * h;
    let (log_low, log_high) = ((3f64 / 4.0).ln(), (4f64 / 3.0).ln());
    let mut crop = None;
    for _ in 0..10 {
        let target = area * (0.08 + (1.0 - 0.08) * random.uniform());
        let ratio = (log_low + (log_high - log_low) * random.uniform()).exp();
        let (cw, ch) = (
            (target * ratio).sqrt().round(),
            (target / ratio).sqrt().round(),
        );
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            let top = random.up_to((h - ch) as u64) as u32;
            let left = random.up_to((w - cw) as u64) as u32;
            crop = Some((left, top, cw as u32, ch as u32));
            break;
        }
    }
    let (left, top, cw, ch) = crop.unwrap_or_else(|| {
        let ratio = w / h;
        let (cw, ch) = if ratio < 3.0 / 4.0 {
            (w, (w / (3.0 / 4.0)).round())
        } else if ratio > 4.0 / 3.0 {
            ((h * (4.0 / 3.0)).round(), h)
        } else {
            (w, h)
        };
        (
            ((w - cw) / 2.0) as u32,
            ((h - ch) / 2.0) as u32,
            cw as u32,
            ch as u32,
        )
    });
    let cropped = image::imageops::crop_imm(rgb, left, top, cw.max(1), ch.max(1)).to_image();
    resnet_io::resize_like_pillow(&cropped, width, height, Interpolation::Bilinear)
}
