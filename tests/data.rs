//! Training data: the order and augmentations are a function of the seed alone, the
//! augmentations keep the recipes' geometry, bad images are counted, not fatal.
//! Data: the 100 CIFAR-10 test images of `weights/samples`.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, Tensor};
use image::RgbImage;
use resnet_io::PreprocessConfig;
use resnet_train::{pad_crop, random_resized_crop, Augmentation, Random, TrainingSet};

fn samples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../weights/samples")
}

fn set(augmentation: Augmentation, seed: u64, shuffle: bool) -> Result<TrainingSet> {
    Ok(TrainingSet::open(
        &samples(),
        PreprocessConfig::cifar(),
        augmentation,
        seed,
        shuffle,
    )?)
}

fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
    let (a, b) = (
        a.to_dtype(candle_core::DType::F32)?,
        b.to_dtype(candle_core::DType::F32)?,
    );
    Ok(a.dims() == b.dims() && (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0)
}

#[test]
fn the_seed_alone_decides_order_and_augmentation() -> Result<()> {
    let (a, b, c) = (
        set(Augmentation::Cifar, 7, true)?,
        set(Augmentation::Cifar, 7, true)?,
        set(Augmentation::Cifar, 8, true)?,
    );
    assert_eq!(a.len(), 100);
    assert_eq!(a.order(0), b.order(0));
    assert_ne!(a.order(0), a.order(1), "a new order every epoch");
    assert_ne!(a.order(0), c.order(0), "another seed, another order");
    let mut sorted = a.order(3);
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "a permutation");
    let (x, y) = (
        a.batch(2, 1, 16, &Device::Cpu)?,
        b.batch(2, 1, 16, &Device::Cpu)?,
    );
    assert!(same(&x.images, &y.images)? && same(&x.labels, &y.labels)?);
    assert_eq!(x.images.dims(), &[16, 3, 32, 32]);
    let z = c.batch(2, 1, 16, &Device::Cpu)?;
    assert!(!same(&x.images, &z.images)?);
    Ok(())
}

#[test]
fn without_shuffling_the_order_is_image_folders_and_the_last_batch_is_kept() -> Result<()> {
    let data = set(Augmentation::None, 0, false)?;
    assert_eq!(data.order(5), (0..100).collect::<Vec<_>>());
    assert_eq!(data.batch_count(30), 4);
    let last = data.batch(0, 3, 30, &Device::Cpu)?;
    assert_eq!(last.images.dims()[0], 10, "the partial last batch");
    let first = data.batch(0, 0, 10, &Device::Cpu)?;
    assert_eq!(
        first.labels.to_vec1::<u32>()?,
        vec![0; 10],
        "airplanes first"
    );
    // No augmentation: the evaluation transform.
    let expected = PreprocessConfig::cifar().load_image(&samples().join("airplane/0000.jpg"))?;
    assert!(same(&first.images.get(0)?, &expected)?);
    Ok(())
}

#[test]
fn cifar_crops_are_windows_of_the_padded_image() {
    let image = RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8, y as u8, 200]));
    let mut random = Random::new(&[1]);
    for _ in 0..50 {
        let crop = pad_crop(&image, 4, 32, 32, &mut random);
        // Find the offset from a pixel inside the image, check the whole window.
        let inner = crop.enumerate_pixels().find(|(_, _, p)| p[2] == 200);
        let Some((cx, cy, p)) = inner else {
            panic!("no image pixel in the crop")
        };
        let (dx, dy) = (
            i64::from(p[0]) - i64::from(cx),
            i64::from(p[1]) - i64::from(cy),
        );
        assert!((-4..=4).contains(&dx) && (-4..=4).contains(&dy));
        for (x, y, pixel) in crop.enumerate_pixels() {
            let (sx, sy) = (i64::from(x) + dx, i64::from(y) + dy);
            let inside = (0..32).contains(&sx) && (0..32).contains(&sy);
            let expected = if inside {
                [sx as u8, sy as u8, 200]
            } else {
                [0, 0, 0]
            };
            assert_eq!(pixel.0, expected);
        }
    }
}

#[test]
fn random_resized_crops_have_the_size_and_survive_extreme_shapes() {
    let mut random = Random::new(&[2]);
    for (w, h) in [(64, 48), (1000, 3), (3, 1000), (1, 1)] {
        let image = RgbImage::from_pixel(w, h, image::Rgb([9, 9, 9]));
        let crop = random_resized_crop(&image, 24, 24, &mut random);
        assert_eq!(crop.dimensions(), (24, 24));
        assert!(crop.pixels().all(|p| p.0 == [9, 9, 9]), "{w}x{h}");
    }
}

#[test]
fn unreadable_images_are_counted_not_fatal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for class in ["a", "b"] {
        std::fs::create_dir(dir.path().join(class))?;
        std::fs::copy(
            samples().join("cat/0000.jpg"),
            dir.path().join(class).join("1.jpg"),
        )?;
    }
    std::fs::write(dir.path().join("b/2.jpg"), b"\xFF\xD8\xFF not a jpeg")?;
    let data = TrainingSet::open(
        dir.path(),
        PreprocessConfig::cifar(),
        Augmentation::Cifar,
        1,
        false,
    )?;
    let batch = data.batch(0, 0, 8, &Device::Cpu)?;
    assert_eq!(batch.images.dims()[0], 2);
    assert_eq!(batch.unreadable.len(), 1);
    assert!(batch.unreadable[0].0.ends_with("b/2.jpg"));
    Ok(())
}
