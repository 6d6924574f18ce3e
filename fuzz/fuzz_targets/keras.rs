//! The Keras reader on arbitrary bytes: zip archives (`.keras`) and HDF5 files, the
//! conversion to a checkpoint, then the whole loader as `load` runs it. Any panic, hang
//! or runaway allocation is a bug.
//!
//!     cargo fuzz run keras fuzz/corpus/keras -- -max_total_time=600 -rss_limit_mb=2048
//!
//! (seed fuzz/corpus/keras with tests/fixtures/keras/*)
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use resnet_io::WeightFiles;

fuzz_target!(|data: &[u8]| {
    let Ok(checkpoint) = resnet_io::keras_checkpoint("fuzz.h5", data.to_vec()) else {
        return;
    };
    let Ok(files) = WeightFiles::from_checkpoints(vec![checkpoint]) else {
        return;
    };
    let _ = resnet_io::inspect(&files, None);
    let _ = resnet_io::load_resnet(&files, None, &Device::Cpu, DType::F32);
});
