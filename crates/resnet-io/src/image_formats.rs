//! The formats other than JPEG, decoded to RGB as Pillow decodes and converts them.

use std::io::Cursor;

use image::{DynamicImage, ImageReader, RgbImage};

use crate::image_read::ReservationToken;

/// Header-first: the dimensions are checked (and the memory reserved) by `reserve`
/// before the pixels are decoded, within image's allocation limits.
pub(crate) fn decode_other(
    bytes: &[u8],
    reserve: impl FnOnce(u64, u64) -> Result<ReservationToken, String>,
) -> Result<(DynamicImage, ReservationToken), String> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read ({e})"))?;
    let Some(format) = reader.format() else {
        return Err(
            "not an image this crate reads (expected JPEG, PNG, WebP, TIFF, BMP, GIF, PPM/PGM)"
                .into(),
        );
    };
    if format == image::ImageFormat::Png {
        check_png_text(bytes)?;
    }
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| format!("cannot decode ({e})"))?;
    let token = reserve(u64::from(width), u64::from(height))?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // 16-bit RGBA plus the decoders' own buffers (ancillary PNG chunks included).
    limits.max_alloc = Some(u64::from(width) * u64::from(height) * 8 + (64 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(limit) => format!("cannot decode ({limit})"),
        other => format!("cannot decode ({other}): image file is truncated or corrupt"),
    })?;
    Ok((image, token))
}

/// Pillow's `convert("RGB")` of the mode Pillow opens each layout in: 16-bit colour
/// (`RGB;16B`, `RGBA;16B`, `LA;16B`) keeps the high byte, 16-bit greyscale (`I;16`) is
/// clipped to 255, alpha is dropped.
pub(crate) fn to_rgb_as_pillow(image: DynamicImage) -> RgbImage {
    let high_byte = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgb16(rgb) => RgbImage::from_fn(rgb.width(), rgb.height(), |x, y| {
            image::Rgb(rgb.get_pixel(x, y).0.map(high_byte))
        }),
        DynamicImage::ImageRgba16(rgba) => {
            RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                let [r, g, b, _] = rgba.get_pixel(x, y).0;
                image::Rgb([r, g, b].map(high_byte))
            })
        }
        DynamicImage::ImageLumaA16(la) => RgbImage::from_fn(la.width(), la.height(), |x, y| {
            image::Rgb([high_byte(la.get_pixel(x, y).0[0]); 3])
        }),
        DynamicImage::ImageLuma16(l) => RgbImage::from_fn(l.width(), l.height(), |x, y| {
            image::Rgb([l.get_pixel(x, y).0[0].min(255) as u8; 3])
        }),
        other => other.to_rgb8(),
    }
}

/// A GIF's first frame as Pillow shows it: the logical screen, filled with the
/// transparent index (else index 0), the frame's indices placed on it, every index
/// looked up in the frame's palette (else the global one; missing entries black).
pub(crate) fn decode_gif(
    bytes: &[u8],
    reserve: impl FnOnce(u64, u64) -> Result<ReservationToken, String>,
) -> Result<RgbImage, String> {
    let error = |e: gif::DecodingError| {
        format!("cannot decode GIF ({e}): image file is truncated or corrupt")
    };
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(error)?;
    let (width, height) = (u32::from(decoder.width()), u32::from(decoder.height()));
    let _token = reserve(u64::from(width), u64::from(height))?;
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder
        .read_next_frame()
        .map_err(error)?
        .ok_or_else(|| "cannot decode GIF (no frame)".to_string())?;
    let palette = frame.palette.clone().or(global).unwrap_or_default();
    let fill = frame.transparent.unwrap_or(0);
    let mut indices = vec![fill; width as usize * height as usize];
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    let frame_width = usize::from(frame.width);
    for (row, line) in frame.buffer.chunks(frame_width.max(1)).enumerate() {
        let y = top + row;
        if y >= height as usize {
            break;
        }
        for (column, &index) in line.iter().enumerate() {
            let x = left + column;
            if x < width as usize {
                indices[y * width as usize + x] = index;
            }
        }
    }
    let colour = |index: u8| -> [u8; 3] {
        let at = usize::from(index) * 3;
        palette
            .get(at..at + 3)
            .map_or([0; 3], |c| [c[0], c[1], c[2]])
    };
    let rgb: Vec<u8> = indices.into_iter().flat_map(colour).collect();
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| "cannot decode GIF".to_string())
}

/// Pillow's `MAX_TEXT_CHUNK`: a compressed text or ICC chunk that inflates past it is
/// refused (`_safe_zlib_decompress`).
const MAX_TEXT_CHUNK: usize = 1 << 20;
/// Pillow's `MAX_TEXT_MEMORY`: all text chunks together.
const MAX_TEXT_MEMORY: usize = 64 * MAX_TEXT_CHUNK;

/// Pillow's verdicts on the ancillary chunks it reads before the image data: a zTXt,
/// compressed iTXt or iCCP chunk that inflates past 1 MiB, or text chunks past 64 MiB in
/// all, make it refuse the file ("Decompressed data too large"); zlib errors in them it
/// ignores. Each chunk is inflated at most 1 MiB + 1 byte: bounded work.
fn check_png_text(bytes: &[u8]) -> Result<(), String> {
    let mut at = 8;
    let mut text_memory = 0usize;
    while let Some(header) = bytes.get(at..at + 8) {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        let Some(data) = bytes.get(at + 8..(at + 8).saturating_add(length)) else {
            return Ok(()); // truncated: the decoder says so
        };
        if kind == b"IDAT" || kind == b"IEND" {
            return Ok(());
        }
        // The compressed payload after the keyword (and, for iTXt, its flags and tags).
        let after_keyword = |data: &[u8]| data.iter().position(|&b| b == 0).map(|i| i + 1);
        let text = match kind {
            b"tEXt" => {
                text_memory += data.len();
                None
            }
            b"zTXt" | b"iCCP" => after_keyword(data)
                .and_then(|i| data.get(i..))
                .filter(|rest| rest.first() == Some(&0))
                .map(|rest| &rest[1..]),
            b"iTXt" => after_keyword(data).and_then(|i| {
                let (flag, method) = (*data.get(i)?, *data.get(i + 1)?);
                let rest = data.get(i + 2..)?;
                // Language tag, then translated keyword, each NUL-terminated.
                let tag_end = rest.iter().position(|&b| b == 0)? + 1;
                let keyword_end = rest[tag_end..].iter().position(|&b| b == 0)? + tag_end + 1;
                let value = &rest[keyword_end..];
                if flag == 0 {
                    text_memory += value.len();
                    None
                } else {
                    (method == 0).then_some(value)
                }
            }),
            _ => None,
        };
        if let Some(compressed) = text {
            match miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(
                compressed,
                MAX_TEXT_CHUNK,
            ) {
                Ok(inflated) if kind != b"iCCP" => text_memory += inflated.len(),
                Ok(_) => {}
                Err(e) if e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput => {
                    return Err(format!(
                        "a compressed {} chunk inflates past {MAX_TEXT_CHUNK} bytes (Pillow refuses it: \
                         \"Decompressed data too large\")",
                        String::from_utf8_lossy(kind)
                    ));
                }
                Err(_) => {} // corrupt: ignored, as Pillow ignores zlib errors there
            }
        }
        if text_memory > MAX_TEXT_MEMORY {
            return Err(format!(
                "text chunks of more than {MAX_TEXT_MEMORY} bytes (Pillow refuses them: \
                 \"Too much memory used in text chunks\")"
            ));
        }
        at = at.saturating_add(12).saturating_add(length);
    }
    Ok(())
}
