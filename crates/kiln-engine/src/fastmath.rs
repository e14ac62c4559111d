//! Branch-free f32 math that vectorises when inlined into a loop compiled for
//! AVX-512 or AVX2+FMA (the activation kernels and the graph runtime's element-wise
//! programs share it).
//!
//! Accuracy: `exp` is Cephes' `expf` (range reduction by ln 2 in two parts and a
//! degree-7 polynomial, ≤ 2 ulp on the clamped range [-87, 88]); `erfc` is the
//! Chebyshev fit from Numerical Recipes (fractional error < 1.2e-7 everywhere);
//! `tanh`, `sigmoid` and `erf` are built from them (absolute error < 2e-7).

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// 1.5 · 2²³: adding it rounds to the nearest integer, which lands in the low mantissa bits.
const ROUNDING_MAGIC: f32 = 12_582_912.0;
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;

/// e^x for x in [-87, 88] (clamped outside it), to about 2 ulp.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUNDING_MAGIC;
    let n = shifted - ROUNDING_MAGIC;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    let exponent = (shifted.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    p * f32::from_bits(exponent as u32)
}

/// erfc(z) for z ≥ 0 (Numerical Recipes' `erfcc`).
#[inline(always)]
pub fn erfc_non_negative(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(-z * z + poly)
}

/// e^x with IEEE results outside `exp`'s range: +inf above ln(f32::MAX), 0
/// below the smallest subnormal's log (the selects vectorise).
#[inline(always)]
pub fn exp_ieee(x: f32) -> f32 {
    let y = exp(x);
    let y = if x > 88.722_84 { f32::INFINITY } else { y };
    if x < -103.972_08 { 0.0 } else { y }
}

/// tanh(x) as sign(x)·(1 − e)/(1 + e), e = exp(−2|x|): no cancellation for large |x|.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp_ieee(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// 1 / (1 + exp(−x)).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_ieee(-x))
}

/// erf(x) = sign(x)·(1 − erfc(|x|)).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    (1.0 - erfc_non_negative(x.abs())).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_match_f64_references() {
        let mut worst = [0f64; 4];
        for i in -4000..=4000 {
            let x = i as f32 * 0.005;
            let xd = f64::from(x);
            let errors = [
                (f64::from(exp(x)) - xd.exp()).abs() / xd.exp(),
                (f64::from(tanh(x)) - xd.tanh()).abs(),
                (f64::from(sigmoid(x)) - 1.0 / (1.0 + (-xd).exp())).abs(),
                (f64::from(erf(x)) - libm_erf(xd)).abs(),
            ];
            for (w, e) in worst.iter_mut().zip(errors) {
                *w = w.max(e);
            }
        }
        assert!(worst[0] < 3e-7, "exp relative error {}", worst[0]);
        assert!(
            worst[1] < 3e-7 && worst[2] < 3e-7 && worst[3] < 3e-7,
            "{worst:?}"
        );
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_ieee(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_ieee(f32::NEG_INFINITY), 0.0);
    }

    /// erf in f64 by its Taylor series (|x| ≤ 3) or asymptotic 1 beyond.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut sum: f64 = 0.0;
        let mut term: f64 = x;
        let mut n: f64 = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
