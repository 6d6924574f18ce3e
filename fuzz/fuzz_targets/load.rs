//! The whole loader on arbitrary bytes: header validation, naming-scheme detection,
//! architecture inference, the validation report, reading every tensor and building the
//! network. Any panic, hang or runaway allocation is a bug.
//!
//!     cargo fuzz run load -- -max_total_time=600 -rss_limit_mb=2048
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use resnet_io::{Checkpoint, WeightFiles};

fuzz_target!(|data: &[u8]| {
    let Ok(checkpoint) = Checkpoint::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let Ok(files) = WeightFiles::from_checkpoints(vec![checkpoint]) else {
        return;
    };
    let _ = resnet_io::inspect(&files, None);
    let _ = resnet_io::load_resnet(&files, None, &Device::Cpu, DType::F32);
});
