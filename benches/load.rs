//! Checkpoint load time: a resnet50 checkpoint (about 100 MB, f32) from safetensors to a
//! ready network, through the full validation. `cargo bench -p resnet-benches --bench load`
#![allow(missing_docs)] // criterion's macros generate undocumented items

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion};
use resnet_benches::random_model;
use resnet_io::NamingScheme;

fn load(c: &mut Criterion) {
    let (Ok(dir), Ok((model, _varmap))) =
        (tempfile::tempdir(), random_model("resnet50", DType::F32))
    else {
        return;
    };
    let path = dir.path().join("resnet50.safetensors");
    if resnet_io::save(&model, &path, NamingScheme::Torchvision, DType::F32).is_err() {
        return;
    }
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    group.bench_function("resnet50_f32_auto", |b| {
        b.iter(|| resnet_io::load_file(&path, None, &Device::Cpu, DType::F32).map(|m| m.config))
    });
    group.finish();
}

criterion_group!(benches, load);
criterion_main!(benches);
