//! Comparing tensors with a reference implementation's: cosine distance and
//! max/mean absolute difference, checked against a stated tolerance; for LLM
//! logits also KL(reference‖ours) and MAX's abs/rel rule. Parity tests use it,
//! and `kiln verify` exposes the same comparison to users.

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

/// How one vector of logits differs from the reference's, as MAX's logit
/// verification measures it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitComparison {
    /// `1 − cos(ours, reference)`.
    pub cosine_distance: f64,
    /// KL(reference ‖ ours) over ε-smoothed softmaxes (ε = 1e-10).
    pub kl: f64,
    pub max_abs: f64,
    /// Entries breaking `|a − b| ≤ max(atol, rtol · max(|a|, |b|))`.
    pub violations: usize,
    /// Whether both pick the same most likely entry.
    pub same_argmax: bool,
}

fn softmax_smoothed(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum + 1e-10).collect()
}

fn argmax(values: &[f32]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
}

/// Compare `ours` with `reference` logits of the same vocabulary.
pub fn compare_logits(
    ours: &[f32],
    reference: &[f32],
    atol: f64,
    rtol: f64,
) -> Result<LogitComparison, String> {
    if ours.len() != reference.len() {
        return Err(format!(
            "{} logits vs {} in the reference",
            ours.len(),
            reference.len()
        ));
    }
    let (a, b): (Vec<f64>, Vec<f64>) = ours
        .iter()
        .zip(reference)
        .map(|(x, y)| (f64::from(*x), f64::from(*y)))
        .unzip();
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norms =
        a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (p, q) = (softmax_smoothed(reference), softmax_smoothed(ours));
    let kl = p
        .iter()
        .zip(&q)
        .map(|(p, q)| p * (p / q).ln())
        .sum::<f64>()
        .max(0.0);
    let violations = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| (*x - *y).abs() > atol.max(rtol * x.abs().max(y.abs())))
        .count();
    Ok(LogitComparison {
        cosine_distance: if norms == 0.0 { 0.0 } else { 1.0 - dot / norms },
        kl,
        max_abs: a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max),
        violations,
        same_argmax: argmax(ours) == argmax(reference),
    })
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

    #[test]
    fn logit_comparison_measures_kl_and_the_abs_rel_rule() {
        let reference = [1.0f32, 2.0, 3.0, -1.0];
        let same = compare_logits(&reference, &reference, 1e-4, 1e-3).unwrap();
        assert_eq!((same.violations, same.same_argmax), (0, true));
        assert!(same.kl.abs() < 1e-12 && same.cosine_distance.abs() < 1e-12);
        let shifted = [1.0f32, 2.0, 3.01, -1.0];
        let c = compare_logits(&shifted, &reference, 1e-4, 1e-3).unwrap();
        // 0.01 > max(1e-4, 1e-3 * 3.01): one violation; a small but positive KL.
        assert_eq!(c.violations, 1);
        assert!(c.kl > 0.0 && c.kl < 1e-3);
        let flipped = [3.0f32, 2.0, 1.0, -1.0];
        assert!(
            !compare_logits(&flipped, &reference, 1e-4, 1e-3)
                .unwrap()
                .same_argmax
        );
        assert!(compare_logits(&shifted[..2], &reference, 1e-4, 1e-3).is_err());
    }
}
