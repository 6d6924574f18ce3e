//! Every image decoder the loader uses (JPEG through libjpeg-turbo-rs, PNG, WebP, TIFF,
//! BMP, GIF, PNM through image and gif), with the header checks and the decode-memory
//! budget, then the preprocessing of both model kinds. Any panic, hang or runaway
//! allocation is a bug.
//!
//!     cargo fuzz run image fuzz/corpus/image -- -max_total_time=600 -rss_limit_mb=2048
//!
//! (seed fuzz/corpus/image with tests/fixtures/images/corpus/*)
#![no_main]

use libfuzzer_sys::fuzz_target;
use resnet_io::PreprocessConfig;

fuzz_target!(|data: &[u8]| {
    // One budget of 256 MB: a crafted header must be refused, not decoded into 2 GB.
    resnet_io::set_decode_memory_budget(256 << 20);
    let Ok(rgb) = resnet_io::decode_image_bytes(data) else {
        return;
    };
    let image = image::DynamicImage::ImageRgb8(rgb);
    let _ = PreprocessConfig::cifar().apply(&image);
    let _ = PreprocessConfig::imagenet().apply(&image);
});
