//! Borrowing a tensor's data on the CPU, for every custom op of the kernel tree: the
//! storage guard's slice of a contiguous tensor, or an op's f32 input.

use candle_core::{bail, CpuStorage, Layout, Result, Storage, StorageRef, WithDType};

/// A contiguous CPU tensor's data, borrowed from its storage guard.
pub(crate) fn cpu_data<'a, T: WithDType>(
    storage: &'a StorageRef<'_>,
    layout: &Layout,
) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = &**storage else {
        bail!("CPU convolution: tensor is not on the CPU");
    };
    let data = cpu.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("CPU convolution: tensor is not contiguous"),
    }
}

/// A contiguous f32 CPU input of a custom op, or an error naming the op (`what`).
pub(crate) fn f32_input<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: only f32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{what}: input is not contiguous");
    };
    Ok(&data[start..end])
}
