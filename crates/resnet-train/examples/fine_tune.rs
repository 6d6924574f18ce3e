//! Fine-tune a pretrained ResNet on an ImageFolder tree of your own classes, as a program
//! rather than the `resnet train` command: the classifier is replaced where the class
//! count differs, the loop is the library's `Trainer`, and the output is a model
//! directory with a training state that `resnet train --resume` continues. Copy it into
//! your crate (dependencies: resnet-core, resnet-io, resnet-train, anyhow).
//!
//!     cargo run --release -p resnet-train --example fine_tune -- \
//!         weights/resnet20.safetensors weights/samples 2 fine-tuned

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use resnet_core::prelude::*;
use resnet_train::{
    optimizer, parameters, with_new_head, Augmentation, Checkpointer, Event, Observer,
    OptimizerKind, OptimizerSettings, Trainer, TrainerConfig, TrainingSet,
};

/// Activations and gradients of 256 KiB or more reused from step to step instead of
/// mapped and zeroed afresh by the kernel (see `RetainingAllocator`).
#[global_allocator]
static ALLOCATOR: resnet_core::RetainingAllocator = resnet_core::RetainingAllocator::new(4 << 30);

/// Prints one line per epoch.
struct EpochLines;

impl Observer for EpochLines {
    fn observe(&mut self, event: &Event<'_>) -> candle_core::Result<()> {
        if let Event::EpochDone(record) = event {
            println!(
                "epoch {}: mean loss {:.4}, {:.1} s",
                record.epoch, record.train_loss, record.seconds
            );
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [checkpoint, data, epochs, output] = args.as_slice() else {
        bail!("usage: fine_tune CHECKPOINT DATA_DIR EPOCHS OUTPUT_DIR");
    };
    let epochs: u64 = epochs.parse().context("EPOCHS must be a number")?;

    // Any checkpoint the loader reads; the data's preprocessing follows the model.
    let loaded = resnet_io::load_file(checkpoint, None, &Device::Cpu, DType::F32)?;
    let preprocess = match loaded.config.stem {
        StemKind::Cifar => resnet_io::PreprocessConfig::cifar(),
        _ => resnet_io::PreprocessConfig::imagenet(),
    };
    let augmentation = Augmentation::for_input(preprocess.size);
    let data = Arc::new(TrainingSet::open(
        data.as_ref(),
        preprocess.clone(),
        augmentation,
        0,
        true,
    )?);

    // A new classifier for the data's classes (kept where the count is the same).
    let (model, varmap) = with_new_head(&loaded.model, data.classes().len())?;
    let settings = OptimizerSettings {
        lr: 0.01,
        ..OptimizerSettings::default()
    };
    let sgd = optimizer(OptimizerKind::Sgd, parameters(&varmap, true), &settings)?;
    let config = TrainerConfig {
        epochs,
        batch_size: 32.min(data.len()),
        warmup_epochs: 1.min(epochs),
        ..TrainerConfig::default()
    };
    let checkpoints =
        Checkpointer::new(output, loaded.scheme, data.classes().to_vec(), preprocess)?;
    let mut trainer = Trainer::new(model, varmap, sgd, data, config)?.checkpoint_to(checkpoints);
    trainer.run(&AtomicBool::new(false), &mut EpochLines)?;
    println!("wrote {output}");
    Ok(())
}
