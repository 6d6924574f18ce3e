//! Choosing a device from a user's string: `auto`, `cpu`, `cuda`, `cuda:N`, `metal`.

use candle_core::{bail, Device, Result};

/// The device `spec` names. `auto` picks CUDA, then Metal, then the CPU, whichever this
/// build and machine have. Asking for a GPU this build lacks is an error that says which
/// cargo feature to enable.
pub fn device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            // A GPU build may run where there is no GPU: fall through to the CPU then.
            if candle_core::utils::cuda_is_available() {
                if let Ok(device) = Device::new_cuda(0) {
                    return Ok(device);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(device) = Device::new_metal(0) {
                    return Ok(device);
                }
            }
            Ok(Device::Cpu)
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!("device 'metal' asked for, but this build has no Metal support (build with --features metal on macOS)");
            }
            Device::new_metal(0)
        }
        _ => {
            let ordinal = match spec.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse().ok()) {
                    Some(n) => n,
                    None => {
                        bail!("invalid device '{spec}', expected cuda or cuda:N with N a GPU index")
                    }
                },
                None => bail!("unknown device '{spec}', expected auto, cpu, cuda, cuda:N or metal"),
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("device '{spec}' asked for, but this build has no CUDA support (build with --features cuda)");
            }
            Device::new_cuda(ordinal)
        }
    }
}

/// A short name for a device: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_always_work() {
        assert!(device("cpu").unwrap().is_cpu());
        assert_eq!(device_name(&device("CPU").unwrap()), "cpu");
        device("auto").unwrap();
    }

    #[test]
    fn bad_specs_say_what_is_accepted() {
        let err = device("tpu").unwrap_err().to_string();
        assert!(
            err.contains("expected auto, cpu, cuda, cuda:N or metal"),
            "{err}"
        );
        let err = device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("cuda:N"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_feature() {
        let err = device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
