//! Fine-tune a pretrained ResNet on an ImageFolder tree of your own classes, as a program
//! rather than the `resnet train` command. Copy it into your crate (dependencies:
//! resnet-core, resnet-io, resnet-train, anyhow).
//!
//!     cargo run --release -p resnet-train --example fine_tune -- \
//!         weights/resnet20.safetensors weights/samples 2 fine-tuned.safetensors

use anyhow::{bail, Context, Result};
use resnet_core::prelude::*;
use resnet_train::{
    cross_entropy, parameters, trainable, Augmentation, Schedule, ScheduleKind, Sgd, SgdConfig,
    TrainingSet,
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [checkpoint, data, epochs, output] = args.as_slice() else {
        bail!("usage: fine_tune CHECKPOINT DATA_DIR EPOCHS OUTPUT.safetensors");
    };
    let epochs: u64 = epochs.parse().context("EPOCHS must be a number")?;
    let device = Device::Cpu;

    // Any checkpoint the loader reads; its tensors become variables of a VarMap.
    let loaded = resnet_io::load_file(checkpoint, None, &device, DType::F32)?;
    let (model, varmap) = trainable(&loaded.model)?;
    let preprocess = match loaded.config.stem {
        StemKind::Cifar => resnet_io::PreprocessConfig::cifar(),
        _ => resnet_io::PreprocessConfig::imagenet(),
    };

    // The data: seeded order and augmentation (CIFAR's pad-crop-flip for 32x32 inputs).
    let augmentation = Augmentation::for_input(preprocess.size);
    let data = TrainingSet::open(data.as_ref(), preprocess, augmentation, 0, true)?;
    if data.classes().len() != loaded.config.num_classes {
        bail!(
            "{} classes in the data, {} in the model (`resnet train` replaces the head for you)",
            data.classes().len(),
            loaded.config.num_classes
        );
    }
    let batch_size = 32;
    let steps = data.batch_count(batch_size) as u64;

    // SGD with momentum, a cosine schedule with one epoch of warm-up.
    let mut sgd = Sgd::new(
        parameters(&varmap, true),
        SgdConfig {
            lr: 0.01,
            ..SgdConfig::default()
        },
    )?;
    let schedule = Schedule::new(
        0.01,
        epochs * steps,
        steps.min(epochs * steps),
        ScheduleKind::Cosine,
    )?;
    for epoch in 0..epochs {
        let mut total = 0.0;
        for step in 0..steps {
            sgd.set_lr(schedule.lr(epoch * steps + step));
            let batch = data.batch(epoch, step as usize, batch_size, &device)?;
            let loss = cross_entropy(&model.forward_t(&batch.images, true)?, &batch.labels, 0.0)?;
            sgd.step(&loss.backward()?)?;
            total += loss.to_scalar::<f32>()?;
        }
        println!("epoch {}: mean loss {:.4}", epoch + 1, total / steps as f32);
    }
    // Saved in the checkpoint's own naming, atomically.
    resnet_io::save(&model, output, loaded.scheme, DType::F32)?;
    println!("wrote {output}");
    Ok(())
}
