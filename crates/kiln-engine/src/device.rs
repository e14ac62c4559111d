//! Device and dtype choice: `cpu`, `cuda`/`cuda:N` (when built with the `cuda`
//! feature) or `auto`, and `f32`/`f16`/`bf16`, from names users type.

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};

/// Pick a device by name: `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when this build
/// has it and a GPU answers, else CPU).
pub fn select_device(name: &str) -> Result<Device> {
    match name.trim().to_ascii_lowercase().as_str() {
        "" | "cpu" => Ok(Device::Cpu),
        "auto" => Ok(cuda(0).unwrap_or(Device::Cpu)),
        "cuda" | "gpu" => cuda(0),
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(ordinal) => cuda(ordinal),
            None => Err(EngineError::Device(format!(
                "unknown device {name:?}; use cpu, cuda, cuda:N or auto"
            ))),
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| EngineError::Device(format!("cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    Err(EngineError::Device(format!(
        "cuda:{ordinal} requested, but this kiln was built without the `cuda` feature"
    )))
}

/// Parse a dtype name: `f32`, `f16`/`fp16`/`half`, `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(EngineError::Device(format!(
            "unknown dtype {other:?}; use f32, f16 or bf16"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_devices_and_dtypes() {
        assert!(select_device("cpu").unwrap().is_cpu());
        assert!(select_device("auto").is_ok());
        assert!(
            select_device("tpu")
                .unwrap_err()
                .to_string()
                .contains("unknown device")
        );
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f8").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(
            select_device("cuda:1")
                .unwrap_err()
                .to_string()
                .contains("without the `cuda` feature")
        );
    }
}
