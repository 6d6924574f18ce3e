//! Inference time per batch on the CPU: resnet18 and resnet50 at batch 1 and 8, CIFAR
//! resnet20 at batch 128, in f32 and f16, on the folded inference path `resnet` runs;
//! resnet50 batch 1 unfolded (candle's own ops) for comparison; and group `kernels`:
//! resnet50 batch 1 and resnet20 batch 128 in f32 for each choice of CPU kernels.
//! `cargo bench -p resnet-benches --bench inference`
#![allow(missing_docs)] // criterion's macros generate undocumented items

use candle_core::DType;
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use resnet_benches::{
    random_inference_model, random_inference_model_with, random_input, random_model,
};
use resnet_core::{CpuKernels, ResNet};

/// Times `model.forward` on a random batch as benchmark `name`/`batch`; a model that
/// cannot be built is reported and skipped.
fn bench_forward(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: String,
    model: candle_core::Result<ResNet>,
    batch: usize,
) {
    let built = model.and_then(|model| Ok((random_input(&model, batch)?, model)));
    let (input, model) = match built {
        Ok(built) => built,
        Err(error) => {
            eprintln!("skipped {name}/{batch}: {error}");
            return;
        }
    };
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_with_input(BenchmarkId::new(name, batch), &input, |b, input| {
        b.iter(|| model.forward(input).map(|logits| logits.dims().to_vec()))
    });
}

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
            let model = random_inference_model(arch, dtype);
            bench_forward(&mut group, format!("{arch}/{dtype:?}"), model, batch);
        }
    }
    let unfolded = random_model("resnet50", DType::F32).map(|(model, _varmap)| model);
    bench_forward(&mut group, "resnet50/F32/unfolded".into(), unfolded, 1);
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
            let model = random_inference_model_with(arch, DType::F32, kernels);
            bench_forward(&mut group, format!("{arch}/{kernels:?}"), model, batch);
        }
    }
    group.finish();
}

criterion_group!(benches, inference, kernels);
criterion_main!(benches);
