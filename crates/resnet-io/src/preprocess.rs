//! Image preprocessing as timm's eval transform does it: resize the shorter side to
//! `size / crop_pct`, center-crop `size`, scale to [0, 1], normalise.

use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::error::{Error, Result};

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
    /// Resize and crop at all; `false` only checks the image already has `size`
    /// (CIFAR models, which are fed their 32x32 images as they are).
    pub resize: bool,
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
            resize: true,
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
            resize: false,
        }
    }

    /// Decodes and preprocesses an image file to a `(3, H, W)` f32 tensor.
    pub fn load_image(&self, path: &Path) -> Result<Tensor> {
        let image = decode_image(path)?;
        self.apply(&image).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Preprocesses a decoded image to a `(3, H, W)` f32 tensor on the CPU.
    pub fn apply(&self, image: &DynamicImage) -> Result<Tensor> {
        let (height, width) = self.size;
        let rgb = image.to_rgb8();
        let rgb = if self.resize {
            self.resize_and_crop(rgb)
        } else if (rgb.height() as usize, rgb.width() as usize) == self.size {
            rgb
        } else {
            crate::resample::resize(&rgb, width as u32, height as u32, self.interpolation)
        };
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        for (i, pixel) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * h * w + i] = (f32::from(pixel[c]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), &Device::Cpu)?)
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

/// Largest image accepted, in pixels: a decompression bomb is refused before decoding.
pub const MAX_IMAGE_PIXELS: u64 = 100_000_000;

/// Decodes a JPEG or PNG file to RGB. JPEGs go through libjpeg-turbo's algorithms (as
/// mozjpeg), bit-exact with Pillow, so predictions match PyTorch references made with it;
/// other formats through the `image` crate.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let error = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(format!("cannot read ({e})")))?;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(&bytes).map_err(error);
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| error(e.to_string()))?;
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| error(format!("cannot decode ({e})")))?;
    check_pixels(width, height).map_err(error)?;
    image::load_from_memory(&bytes).map_err(|e| error(format!("cannot decode ({e})")))
}

fn check_pixels(width: u32, height: u32) -> std::result::Result<(), String> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 || pixels > MAX_IMAGE_PIXELS {
        return Err(format!(
            "image of {width}x{height} pixels; expected between 1 and {MAX_IMAGE_PIXELS} pixels"
        ));
    }
    Ok(())
}

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<DynamicImage, String> {
    // libjpeg reports fatal errors by unwinding (without the panic hook); catch them.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<(u32, u32, Vec<u8>)>> {
        let decompress = mozjpeg::Decompress::new_mem(bytes)?;
        let (width, height) = (decompress.width() as u32, decompress.height() as u32);
        if check_pixels(width, height).is_err() {
            return Ok(Some((width, height, Vec::new())));
        }
        let mut rgb = decompress.rgb()?;
        let pixels: Vec<[u8; 3]> = rgb.read_scanlines()?;
        rgb.finish()?;
        Ok(Some((
            width,
            height,
            pixels.into_iter().flatten().collect(),
        )))
    });
    let (width, height, data) = match decoded {
        Ok(Ok(Some(image))) => image,
        Ok(Ok(None)) => return Err("cannot decode JPEG".into()),
        Ok(Err(e)) => return Err(format!("cannot decode JPEG ({e})")),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            return Err(format!("cannot decode JPEG ({message})"));
        }
    };
    check_pixels(width, height)?;
    RgbImage::from_raw(width, height, data)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| "truncated JPEG data".to_string())
}

/// Stacks `(3, H, W)` images into a batch in `dtype` on `device`.
pub fn batch(images: &[Tensor], device: &Device, dtype: DType) -> Result<Tensor> {
    Ok(Tensor::stack(images, 0)?
        .to_dtype(dtype)?
        .to_device(device)?)
}
