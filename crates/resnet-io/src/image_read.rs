//! Reading images from files that are not trusted: one policy for every command and for
//! training.
//!
//! - Only regular files are opened (never a FIFO or a device, and opening never blocks),
//!   and at most [`MAX_IMAGE_FILE_BYTES`] of them are read.
//! - Dimensions come from the header before any pixel buffer exists: at most
//!   [`MAX_IMAGE_PIXELS`], and a JPEG whose entropy-coded data is too short for the size
//!   it claims is refused before decoding.
//! - Decoding draws from one memory budget shared by every thread
//!   ([`set_decode_memory_budget`]): eight threads on eight large images wait for each
//!   other instead of holding eight images' worth of memory.
//! - Decoded as Pillow decodes, then converted to RGB as Pillow's `convert("RGB")` does:
//!   JPEG through a pure-Rust port of libjpeg-turbo (Pillow's decoder: the same integer
//!   IDCT, fancy upsampling and colour conversion, so the same pixels, CMYK included);
//!   16-bit PNGs keep their high byte (16-bit greyscale is clipped to 255, as Pillow's
//!   `I;16` conversion does); alpha is dropped, palettes looked up; a GIF's first frame.
//!   Truncated data is an error, as Pillow's "image file is truncated".

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use image::{DynamicImage, RgbImage};

use crate::checkpoint::open_regular_file;
use crate::error::{Error, Result};

/// Largest image file read, in bytes.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
/// Largest image accepted, in pixels: a decompression bomb is refused before decoding.
pub const MAX_IMAGE_PIXELS: u64 = 100_000_000;
/// Memory all decoding threads together may hold, unless [`set_decode_memory_budget`]
/// says otherwise.
pub const DEFAULT_DECODE_MEMORY_BUDGET: u64 = 2 << 30;
/// Bytes per pixel reserved while an image is decoded and converted: the decoder's
/// output (up to 8 bytes a pixel for 16-bit RGBA), the RGB copy, and slack.
const RESERVED_BYTES_PER_PIXEL: u64 = 12;
/// File extensions read as images: torchvision's `IMG_EXTENSIONS` and GIF.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "ppm", "pgm", "bmp", "tif", "tiff", "webp", "gif",
];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

static BUDGET_LIMIT: AtomicU64 = AtomicU64::new(DEFAULT_DECODE_MEMORY_BUDGET);
static BUDGET_USED: Mutex<u64> = Mutex::new(0);
static BUDGET_FREED: Condvar = Condvar::new();

/// Sets the memory that all decoding threads of this process may hold together.
pub fn set_decode_memory_budget(bytes: u64) {
    BUDGET_LIMIT.store(bytes.max(1), Ordering::Relaxed);
    BUDGET_FREED.notify_all();
}

/// The memory all decoding threads may hold together.
pub fn decode_memory_budget() -> u64 {
    BUDGET_LIMIT.load(Ordering::Relaxed)
}

/// A share of the decode budget, given back when dropped.
struct Reservation(u64);

impl Reservation {
    /// Waits until `bytes` fit in the budget beside what other threads hold.
    fn take(bytes: u64) -> std::result::Result<Self, String> {
        let limit = decode_memory_budget();
        if bytes > limit {
            return Err(format!(
                "decoding it needs about {} MB, more than the whole decode memory budget of {} MB",
                bytes >> 20,
                limit >> 20
            ));
        }
        let mut used = BUDGET_USED.lock().unwrap_or_else(|e| e.into_inner());
        while *used + bytes > decode_memory_budget() {
            used = BUDGET_FREED.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += bytes;
        Ok(Self(bytes))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = BUDGET_USED.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(self.0);
        BUDGET_FREED.notify_all();
    }
}

/// Reads an image file's bytes: a regular file, at most [`MAX_IMAGE_FILE_BYTES`].
pub fn read_image_bytes(path: &Path) -> Result<Vec<u8>> {
    let error = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let file = open_regular_file(path)?;
    let length = file
        .metadata()
        .map_err(|e| error(format!("cannot read ({e})")))?
        .len();
    if length > MAX_IMAGE_FILE_BYTES {
        return Err(error(format!(
            "the file is {length} bytes; images are read up to {MAX_IMAGE_FILE_BYTES} bytes"
        )));
    }
    let mut bytes = Vec::with_capacity(length as usize);
    // The file may grow while it is read: never more than the limit.
    file.take(MAX_IMAGE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| error(format!("cannot read ({e})")))?;
    if bytes.len() as u64 > MAX_IMAGE_FILE_BYTES {
        return Err(error(format!(
            "the file grew past {MAX_IMAGE_FILE_BYTES} bytes while it was read"
        )));
    }
    Ok(bytes)
}

/// Decodes an image file to RGB as Pillow's `Image.open(path).convert("RGB")` does.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    with_decoded_image(path, DynamicImage::ImageRgb8)
}

/// Decodes `path` to RGB and hands it to `use_image` while its memory is still counted
/// in the decode budget.
pub(crate) fn with_decoded_image<R>(
    path: &Path,
    use_image: impl FnOnce(RgbImage) -> R,
) -> Result<R> {
    let bytes = read_image_bytes(path)?;
    decode_bytes(&bytes, use_image).map_err(|reason| Error::Image {
        path: path.to_path_buf(),
        reason,
    })
}

/// Decodes an in-memory image file (any supported format) to RGB, within the budget.
pub fn decode_image_bytes(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    decode_bytes(bytes, |image| image)
}

fn decode_bytes<R>(
    bytes: &[u8],
    use_image: impl FnOnce(RgbImage) -> R,
) -> std::result::Result<R, String> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        let (decoder, reservation) = jpeg_decoder(bytes)?;
        let image = decode_jpeg(&decoder)?;
        let result = use_image(image);
        drop(reservation);
        return Ok(result);
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return crate::image_formats::decode_gif(bytes, check_and_reserve).map(use_image);
    }
    let (image, reservation) = crate::image_formats::decode_other(bytes, check_and_reserve)?;
    let result = use_image(crate::image_formats::to_rgb_as_pillow(image));
    drop(reservation);
    Ok(result)
}

fn check_pixels(width: u64, height: u64) -> std::result::Result<u64, String> {
    let pixels = width.saturating_mul(height);
    if pixels == 0 || pixels > MAX_IMAGE_PIXELS {
        return Err(format!(
            "image of {width}x{height} pixels; expected between 1 and {MAX_IMAGE_PIXELS} pixels"
        ));
    }
    Ok(pixels)
}

/// The pixel-count check and the budget share for a `width` x `height` image.
fn check_and_reserve(width: u64, height: u64) -> std::result::Result<ReservationToken, String> {
    let pixels = check_pixels(width, height)?;
    Reservation::take(pixels * RESERVED_BYTES_PER_PIXEL).map(ReservationToken)
}

/// A held share of the decode budget (opaque to the format modules).
pub(crate) struct ReservationToken(#[allow(dead_code)] Reservation);

fn jpeg_decoder(
    bytes: &[u8],
) -> std::result::Result<(libjpeg_turbo_rs::Decoder<'_>, ReservationToken), String> {
    let mut decoder =
        libjpeg_turbo_rs::Decoder::new(bytes).map_err(|e| format!("cannot decode JPEG ({e})"))?;
    let header = decoder.header();
    let (width, height) = (header.width as u64, header.height as u64);
    check_pixels(width, height)?;
    if !is_arithmetic_coded(bytes) {
        // Huffman coding spends at least one bit on every 8x8 block of the first scan:
        // a file too short for its claimed size cannot be whole.
        let blocks = width.div_ceil(8) * height.div_ceil(8);
        let at_least = blocks / 8;
        if (bytes.len() as u64) < at_least {
            return Err(format!(
                "image file is truncated: a {width}x{height} JPEG needs at least {at_least} \
                 bytes of data, the file has {}",
                bytes.len()
            ));
        }
    }
    let reservation = check_and_reserve(width, height)?;
    decoder.set_max_pixels(MAX_IMAGE_PIXELS as usize);
    decoder.set_output_format(libjpeg_turbo_rs::PixelFormat::Rgb);
    Ok((decoder, reservation))
}

fn decode_jpeg(decoder: &libjpeg_turbo_rs::Decoder<'_>) -> std::result::Result<RgbImage, String> {
    let image = decoder.decode_image().map_err(|e| match e.to_string() {
        m if m.contains("unexpected end") => format!("image file is truncated ({m})"),
        m => format!("cannot decode JPEG ({m})"),
    })?;
    if image.pixel_format != libjpeg_turbo_rs::PixelFormat::Rgb {
        return Err(format!(
            "cannot decode JPEG (decoder gave {:?}, expected RGB)",
            image.pixel_format
        ));
    }
    let (width, height) = (image.width as u32, image.height as u32);
    RgbImage::from_raw(width, height, image.data)
        .ok_or_else(|| "cannot decode JPEG (short pixel buffer)".to_string())
}

/// Whether the frame is arithmetic-coded (SOF9-SOF15 but DAC), found by walking the
/// markers before the first scan.
fn is_arithmetic_coded(bytes: &[u8]) -> bool {
    let mut at = 2;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            return false;
        }
        let marker = bytes[at + 1];
        if marker == 0xFF {
            at += 1;
            continue;
        }
        if matches!(marker, 0xC9..=0xCB | 0xCD..=0xCF) {
            return true;
        }
        if marker == 0xDA {
            return false;
        }
        let length = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        at += 2 + length;
    }
    false
}
