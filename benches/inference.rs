//! Inference time per batch on the CPU: resnet18 and resnet50 at batch 1 and 8, CIFAR
//! resnet20 at batch 128, in f32 and f16, on the folded inference path `resnet` runs;
//! resnet50 batch 1 unfolded (candle's own ops) for comparison; and group `kernels`:
//! resnet50 batch 1 and resnet20 batch 128 in f32 for each choice of CPU kernels.
//! `cargo bench -p resnet-benches --bench inference`
#![allow(missing_docs)] // criterion's macros generate undocumented items

use candle_core::DType;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use resnet_benches::{
    random_inference_model, random_inference_model_with, random_input, random_model,
};
use resnet_core::CpuKernels;

fn inference(c: &mut Criterion) {
    // As the `resnet` command does: passes reuse memory rather than page-fault it in.
    resnet_core::retain_freed_memory();
    let mut group = c.benchmark_group("inference");
    group.sample_size(10);
    for (arch, batch) in [
        ("resnet18", 1),
        ("resnet18", 8),
        ("resnet50", 1),
        ("resnet50", 8),
        ("resnet20", 128),
    ] {
        for dtype in [DType::F32, DType::F16] {
            let Ok(model) = random_inference_model(arch, dtype) else {
                continue;
            };
            let Ok(input) = random_input(&model, batch) else {
                continue;
            };
            group.throughput(Throughput::Elements(batch as u64));
            let id = BenchmarkId::new(format!("{arch}/{dtype:?}"), batch);
            group.bench_with_input(id, &input, |b, input| {
                b.iter(|| model.forward(input).map(|logits| logits.dims().to_vec()))
            });
        }
    }
    if let Ok((model, _varmap)) = random_model("resnet50", DType::F32) {
        if let Ok(input) = random_input(&model, 1) {
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(
                BenchmarkId::new("resnet50/F32/unfolded", 1),
                &input,
                |b, input| b.iter(|| model.forward(input).map(|logits| logits.dims().to_vec())),
            );
        }
    }
    group.finish();
}

fn kernels(c: &mut Criterion) {
    resnet_core::retain_freed_memory();
    let mut group = c.benchmark_group("kernels");
    group.sample_size(10);
    for (arch, batch) in [("resnet50", 1), ("resnet20", 128)] {
        for kernels in [
            CpuKernels::Auto,
            CpuKernels::BlockedDirect,
            CpuKernels::Gemm,
        ] {
            let Ok(model) = random_inference_model_with(arch, DType::F32, kernels) else {
                continue;
            };
            let Ok(input) = random_input(&model, batch) else {
                continue;
            };
            group.throughput(Throughput::Elements(batch as u64));
            let id = BenchmarkId::new(format!("{arch}/{kernels:?}"), batch);
            group.bench_with_input(id, &input, |b, input| {
                b.iter(|| model.forward(input).map(|logits| logits.dims().to_vec()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, inference, kernels);
criterion_main!(benches);
