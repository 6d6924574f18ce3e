//! Image resizing bit-exact with Pillow's `Image.resize` (libImaging/Resample.c), which
//! torchvision's `Resize` and so timm's eval transform call on PIL images.
//!
//! Pillow resamples separably — horizontal pass, rounded to 8 bits, then vertical — with
//! a filter widened by the scale when shrinking (antialiasing), truncated at the borders
//! and renormalised, and coefficients in 22-bit fixed point. The `image` crate differs at
//! the borders and in the intermediate rounding, by up to several grey levels.

use image::RgbImage;

use crate::preprocess::Interpolation;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input pixel and the fixed-point weights from there.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc`.
fn coefficients(
    in_size: usize,
    out_size: usize,
    filter: fn(f64) -> f64,
    support: f64,
) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = support * filter_scale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for out in 0..out_size {
        let center = (out as f64 + 0.5) * scale;
        let inverse = 1.0 / filter_scale;
        // C's (int) cast truncates toward zero.
        let min = ((center - support + 0.5) as i64).max(0) as usize;
        let max = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = max.saturating_sub(min);
        let raw: Vec<f64> = (0..count)
            .map(|x| filter((x as f64 + min as f64 - center + 0.5) * inverse))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                }
            })
            .collect();
        bounds.push((min, count));
        weights.push(fixed);
    }
    Coefficients { bounds, weights }
}

fn clip8(value: i64) -> u8 {
    (value >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `input` to `width` x `height` exactly as Pillow does.
pub fn resize(input: &RgbImage, width: u32, height: u32, interpolation: Interpolation) -> RgbImage {
    let (in_w, in_h) = (input.width() as usize, input.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return input.clone();
    }
    let (filter, support): (fn(f64) -> f64, f64) = match interpolation {
        Interpolation::Nearest => return nearest(input, width, height),
        Interpolation::Bilinear => (bilinear, 1.0),
        Interpolation::Bicubic => (bicubic, 2.0),
    };
    let src = input.as_raw();
    let horizontal = coefficients(in_w, out_w, filter, support);
    let vertical = coefficients(in_h, out_h, filter, support);

    // Horizontal pass over the rows the vertical pass will read.
    let first_row = vertical.bounds.first().map_or(0, |b| b.0);
    let last_row = vertical.bounds.last().map_or(0, |b| b.0 + b.1);
    let (mid, mid_w, mid_first) = if out_w != in_w {
        let rows = last_row - first_row;
        let mut mid = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let row = &src[(y + first_row) * in_w * 3..][..in_w * 3];
            for (x, (&(min, count), weights)) in horizontal
                .bounds
                .iter()
                .zip(&horizontal.weights)
                .enumerate()
            {
                for c in 0..3 {
                    let mut sum = 1i64 << (PRECISION_BITS - 1);
                    for (k, &w) in weights.iter().take(count).enumerate() {
                        sum += i64::from(row[(min + k) * 3 + c]) * i64::from(w);
                    }
                    mid[(y * out_w + x) * 3 + c] = clip8(sum);
                }
            }
        }
        (mid, out_w, first_row)
    } else {
        (src.to_vec(), in_w, 0)
    };
    if out_h == in_h {
        return RgbImage::from_raw(width, height, mid)
            .unwrap_or_else(|| RgbImage::new(width, height));
    }
    let mut out = vec![0u8; out_h * mid_w * 3];
    for (y, (&(min, count), weights)) in vertical.bounds.iter().zip(&vertical.weights).enumerate() {
        let min = min - mid_first;
        for x in 0..mid_w {
            for c in 0..3 {
                let mut sum = 1i64 << (PRECISION_BITS - 1);
                for (k, &w) in weights.iter().take(count).enumerate() {
                    sum += i64::from(mid[((min + k) * mid_w + x) * 3 + c]) * i64::from(w);
                }
                out[(y * mid_w + x) * 3 + c] = clip8(sum);
            }
        }
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Pillow's nearest-neighbour resize: the input pixel under each output pixel's centre.
fn nearest(input: &RgbImage, width: u32, height: u32) -> RgbImage {
    let scale_x = f64::from(input.width()) / f64::from(width);
    let scale_y = f64::from(input.height()) / f64::from(height);
    RgbImage::from_fn(width, height, |x, y| {
        let sx = ((f64::from(x) + 0.5) * scale_x) as u32;
        let sy = ((f64::from(y) + 0.5) * scale_y) as u32;
        *input.get_pixel(sx.min(input.width() - 1), sy.min(input.height() - 1))
    })
}
