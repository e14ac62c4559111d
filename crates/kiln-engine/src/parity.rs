//! Comparing tensors with a reference implementation's: cosine distance and
//! max/mean absolute difference, checked against a stated tolerance. Parity tests
//! use it, and `kiln verify` will expose the same comparison to users.

use candle_core::{DType, Device, Tensor};

/// The device parity tests run Kiln's side on: `KILN_TEST_DEVICE` (`cpu` when
/// unset; `cuda` on a GPU machine with a `--features cuda` build), so the same
/// fixtures check every backend. An unusable name panics: it is a test setting.
pub fn device_under_test() -> Device {
    let name = std::env::var("KILN_TEST_DEVICE").unwrap_or_default();
    crate::device::select_device(&name).unwrap_or_else(|e| panic!("KILN_TEST_DEVICE={name:?}: {e}"))
}

/// How close two tensors must be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub cosine_distance: f64,
    pub max_abs: f64,
}

impl Tolerance {
    /// The bound for intermediate tensors in Kiln's parity tests.
    pub const INTERMEDIATE: Tolerance = Tolerance {
        cosine_distance: 1e-5,
        max_abs: 1e-4,
    };
}

/// How two tensors differ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub cosine_distance: f64,
    pub max_abs: f64,
    pub mean_abs: f64,
}

/// Compare `ours` with `reference` (same shape; any float dtype).
pub fn compare(ours: &Tensor, reference: &Tensor) -> Result<Comparison, String> {
    if ours.dims() != reference.dims() {
        return Err(format!(
            "shape {:?} vs reference {:?}",
            ours.dims(),
            reference.dims()
        ));
    }
    let flat = |t: &Tensor| -> Result<Vec<f64>, String> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| e.to_string())
    };
    let (a, b) = (flat(ours)?, flat(reference)?);
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norms =
        a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cosine_distance = if norms == 0.0 { 0.0 } else { 1.0 - dot / norms };
    let differences: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).collect();
    let max_abs = differences.iter().copied().fold(0.0, f64::max);
    let mean_abs = differences.iter().sum::<f64>() / differences.len().max(1) as f64;
    Ok(Comparison {
        cosine_distance,
        max_abs,
        mean_abs,
    })
}

/// Compare and check against `tolerance`; the error says by how much it failed.
pub fn check(
    name: &str,
    ours: &Tensor,
    reference: &Tensor,
    tolerance: Tolerance,
) -> Result<Comparison, String> {
    let c = compare(ours, reference).map_err(|e| format!("{name}: {e}"))?;
    if c.cosine_distance <= tolerance.cosine_distance && c.max_abs <= tolerance.max_abs {
        Ok(c)
    } else {
        Err(format!(
            "{name}: cosine distance {:e} (limit {:e}), max abs diff {:e} (limit {:e})",
            c.cosine_distance, tolerance.cosine_distance, c.max_abs, tolerance.max_abs
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn identical_tensors_pass_and_different_ones_fail_with_numbers() {
        let a = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 2.0, 3.5], &Device::Cpu).unwrap();
        assert_eq!(
            check("same", &a, &a, Tolerance::INTERMEDIATE)
                .unwrap()
                .max_abs,
            0.0
        );
        let err = check("off", &a, &b, Tolerance::INTERMEDIATE).unwrap_err();
        assert!(err.contains("max abs diff 5e-1"), "{err}");
        assert!(compare(&a, &Tensor::new(&[1f32], &Device::Cpu).unwrap()).is_err());
    }
}
