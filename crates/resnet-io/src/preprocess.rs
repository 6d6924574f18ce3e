//! Image preprocessing as timm's eval transform does it: resize the shorter side to
//! `size / crop_pct`, center-crop `size`, scale to [0, 1], normalise.

use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::error::{Error, Result};
use crate::image_read::with_decoded_image;

/// Resampling filter of the resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear (antialiased when shrinking, as Pillow).
    Bilinear,
    /// Bicubic, a = -0.5 (antialiased when shrinking, as Pillow).
    Bicubic,
}

impl FromStr for Interpolation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "nearest" => Ok(Self::Nearest),
            "bilinear" => Ok(Self::Bilinear),
            "bicubic" => Ok(Self::Bicubic),
            _ => Err(format!(
                "unknown interpolation '{s}', expected nearest, bilinear or bicubic"
            )),
        }
    }
}

/// How images become input tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Output (height, width).
    pub size: (usize, usize),
    /// Fraction of the resized image the crop keeps (timm's `crop_pct`).
    pub crop_pct: f64,
    /// Resampling filter.
    pub interpolation: Interpolation,
    /// Per-channel mean, subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// How an image of another size is brought to `size`.
    pub resize: Resize,
    /// Channels in BGR order (Keras' `'caffe'` mode), `mean` and `std` in that order too.
    pub bgr: bool,
}

/// How an image of another size than the model's input is brought to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// timm's eval transform: the shorter side to `size / crop_pct`, then a centre crop
    /// (ImageNet models; the aspect ratio is kept).
    CenterCrop,
    /// Straight to `size`, whatever the aspect ratio (CIFAR models, whose own 32x32
    /// images pass unchanged).
    Squash,
    /// Not at all: an image of another size is an error.
    Exact,
}

impl FromStr for Resize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "crop" | "center-crop" => Ok(Self::CenterCrop),
            "squash" => Ok(Self::Squash),
            "none" | "exact" => Ok(Self::Exact),
            _ => Err(format!(
                "unknown resize policy '{s}', expected crop, squash or none"
            )),
        }
    }
}

/// ImageNet mean, as torchvision and timm use it.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl PreprocessConfig {
    /// timm's default: 224x224, crop_pct 0.875, bilinear, ImageNet mean/std.
    pub fn imagenet() -> Self {
        Self {
            size: (224, 224),
            crop_pct: 0.875,
            interpolation: Interpolation::Bilinear,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            resize: Resize::CenterCrop,
            bgr: false,
        }
    }

    /// The CIFAR ResNets: 32x32 as they are, ImageNet mean/std (as they were trained).
    pub fn cifar() -> Self {
        Self {
            size: (32, 32),
            crop_pct: 1.0,
            interpolation: Interpolation::Bilinear,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            resize: Resize::Squash,
            bgr: false,
        }
    }

    /// Keras' ResNet50/101/152 (`preprocess_input`, `'caffe'` mode): BGR, the ImageNet
    /// mean (103.939, 116.779, 123.68) subtracted from values in [0, 255]; 224x224 as
    /// `keras.utils.load_img(target_size=(224, 224))` makes it (squashed, nearest).
    pub fn keras_caffe() -> Self {
        Self {
            mean: [103.939 / 255.0, 116.779 / 255.0, 123.68 / 255.0],
            std: [1.0 / 255.0; 3],
            bgr: true,
            ..Self::keras_tf()
        }
    }

    /// Keras' ResNet50V2/101V2/152V2 (`'tf'` mode): scaled to [-1, 1]; 224x224 as
    /// `load_img` makes it.
    pub fn keras_tf() -> Self {
        Self {
            size: (224, 224),
            crop_pct: 1.0,
            interpolation: Interpolation::Nearest,
            mean: [0.5; 3],
            std: [0.5; 3],
            resize: Resize::Squash,
            bgr: false,
        }
    }

    /// The preprocessing a network's input normalisation calls for, at ImageNet's size
    /// (CIFAR's for a CIFAR stem).
    pub fn for_config(config: &resnet_core::ResNetConfig) -> Self {
        match (config.input_normalization, config.stem) {
            (resnet_core::InputNormalization::Caffe, _) => Self::keras_caffe(),
            (resnet_core::InputNormalization::Tf, _) => Self::keras_tf(),
            (_, resnet_core::StemKind::Cifar) => Self::cifar(),
            _ => Self::imagenet(),
        }
    }

    /// Decodes (see [`crate::decode_image`]) and preprocesses an image file to a
    /// `(3, H, W)` f32 tensor, the decoded image counted in the decode memory budget
    /// until it is preprocessed.
    pub fn load_image(&self, path: &Path) -> Result<Tensor> {
        self.load_image_sized(path).map(|(tensor, _)| tensor)
    }

    /// [`PreprocessConfig::load_image`], with the image's own (width, height).
    pub fn load_image_sized(&self, path: &Path) -> Result<(Tensor, (u32, u32))> {
        with_decoded_image(path, |rgb| {
            let size = rgb.dimensions();
            self.apply_rgb(rgb).map(|tensor| (tensor, size))
        })?
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            reason: match e {
                Error::Config { reason, .. } => reason,
                other => other.to_string(),
            },
        })
    }

    /// Preprocesses a decoded image to a `(3, H, W)` f32 tensor on the CPU.
    pub fn apply(&self, image: &DynamicImage) -> Result<Tensor> {
        self.apply_rgb(image.to_rgb8())
    }

    fn apply_rgb(&self, rgb: RgbImage) -> Result<Tensor> {
        let (height, width) = self.size;
        let same_size = (rgb.height() as usize, rgb.width() as usize) == self.size;
        let rgb = match self.resize {
            Resize::CenterCrop => self.resize_and_crop(rgb),
            _ if same_size => rgb,
            Resize::Squash => {
                crate::resample::resize(&rgb, width as u32, height as u32, self.interpolation)
            }
            Resize::Exact => {
                return Err(Error::Config {
                    path: Default::default(),
                    reason: format!(
                        "the image is {}x{}; the model takes {width}x{height} and resizing is off",
                        rgb.width(),
                        rgb.height()
                    ),
                })
            }
        };
        self.normalize(&rgb)
    }

    /// Scales an RGB image to [0, 1] and normalises it with `mean` and `std`, as it is:
    /// a `(3, H, W)` f32 tensor on the CPU (training's augmentations resize themselves).
    pub fn normalize(&self, rgb: &RgbImage) -> Result<Tensor> {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        for (i, pixel) in rgb.pixels().enumerate() {
            for c in 0..3 {
                let source = if self.bgr { 2 - c } else { c };
                data[c * h * w + i] =
                    (f32::from(pixel[source]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), &Device::Cpu)?)
    }

    /// A note for a user when an image of `width` x `height` is distorted or blown up
    /// on its way to the model: its aspect ratio changed by more than 10% (squashed),
    /// or enlarged more than 4 times.
    pub fn resize_note(&self, width: u32, height: u32) -> Option<String> {
        let (target_h, target_w) = (self.size.0 as f64, self.size.1 as f64);
        let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
        if (w, h) == (target_w, target_h) {
            return None;
        }
        let aspect_change = (w / h) / (target_w / target_h);
        if self.resize == Resize::Squash && !(1.0 / 1.1..=1.1).contains(&aspect_change) {
            return Some(format!(
                "{width}x{height} squashed to {}x{} (aspect ratio changed {aspect_change:.2}x; --resize crop keeps it)",
                self.size.1, self.size.0
            ));
        }
        let enlarged = (target_w / w).min(target_h / h);
        (self.resize != Resize::Exact && enlarged > 4.0).then(|| {
            format!(
                "{width}x{height} enlarged {enlarged:.1}x to {}x{}",
                self.size.1, self.size.0
            )
        })
    }

    /// timm's `Resize(int(size / crop_pct))` on the shorter side, then `CenterCrop(size)`.
    fn resize_and_crop(&self, rgb: RgbImage) -> RgbImage {
        let (height, width) = self.size;
        let crop_pct = if self.crop_pct > 0.0 {
            self.crop_pct
        } else {
            1.0
        };
        let scale_size = ((height.max(width) as f64) / crop_pct).floor() as u32;
        let (w, h) = (rgb.width().max(1), rgb.height().max(1));
        // torchvision's Resize(int): the shorter side becomes scale_size, the longer one
        // int(scale_size * long / short).
        let (new_w, new_h) = if w <= h {
            (
                scale_size,
                (f64::from(scale_size) * f64::from(h) / f64::from(w)) as u32,
            )
        } else {
            (
                (f64::from(scale_size) * f64::from(w) / f64::from(h)) as u32,
                scale_size,
            )
        };
        let resized = if (new_w, new_h) == (w, h) {
            rgb
        } else {
            crate::resample::resize(&rgb, new_w.max(1), new_h.max(1), self.interpolation)
        };
        // torchvision's CenterCrop: offsets int(round((size_in - size_out) / 2)), with
        // Python's round-half-to-even.
        let crop = |outer: u32, inner: usize| -> u32 {
            ((f64::from(outer) - inner as f64) / 2.0)
                .round_ties_even()
                .max(0.0) as u32
        };
        let (top, left) = (crop(resized.height(), height), crop(resized.width(), width));
        let mut out = RgbImage::new(width as u32, height as u32);
        for y in 0..height as u32 {
            for x in 0..width as u32 {
                let (sx, sy) = (left + x, top + y);
                if sx < resized.width() && sy < resized.height() {
                    out.put_pixel(x, y, *resized.get_pixel(sx, sy));
                }
            }
        }
        out
    }
}

/// Stacks `(3, H, W)` images into a batch in `dtype` on `device`.
pub fn batch(images: &[Tensor], device: &Device, dtype: DType) -> Result<Tensor> {
    Ok(Tensor::stack(images, 0)?
        .to_dtype(dtype)?
        .to_device(device)?)
}
