//! A reproduction of torch's CPU generator (`torch.Generator("cpu").manual_seed(s)`):
//! the mt19937 engine, `torch.rand` (uniform) and `torch.randn` (normal) for float32
//! tensors, element for element.
//!
//! torch draws normals two ways. Tensors of 16 or more float32 elements are first
//! filled with uniforms, then every block of 16 is Box–Muller transformed in place
//! (`normal_fill_16`: u1 = 1 − x[j], u2 = x[j+8], all in f32 but the angle's product); a
//! tail shorter than 16 re-draws and transforms the last 16 elements. Smaller tensors
//! use the scalar double-precision sampler, which caches the second (sine) value of
//! each Box–Muller pair in the generator.
//!
//! torch has two kernels for the 16-element transform, chosen by the CPU capability
//! it detects: the vectorised kernel evaluates log/sin/cos with the Cephes
//! polynomials of `avx_mathfun.h`, the portable one (capability "DEFAULT": CPUs
//! without AVX2, or `ATEN_CPU_CAPABILITY=default`) calls libm. Both are reproduced
//! here ([`NormalKernel`]); the vectorised one is the default because torch uses it
//! on every AVX2 and AVX-512 x86 machine: torch 2.15 at capability "AVX512" draws
//! the same bits as at "AVX2" (a (1, 16, 64, 64) `randn` with seed 1234 hashed
//! identically on a Zen 4, 2026-12-07; "DEFAULT" differs).

const STATE_SIZE: usize = 624;
const SHIFT_SIZE: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// Which of torch's float32 normal kernels to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormalKernel {
    /// `normal_fill_16_AVX2` (torch's CPU capabilities "AVX2" and "AVX512").
    #[default]
    Avx2,
    /// `normal_fill_16` with libm log/cos/sin (capability "DEFAULT").
    Portable,
}

/// torch's CPU generator state: mt19937 plus the cached normal sample.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; STATE_SIZE],
    next: usize,
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`: only the low 32 bits seed mt19937.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; STATE_SIZE];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..STATE_SIZE {
            let previous = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(previous ^ (previous >> 30))
                .wrapping_add(j as u32);
        }
        TorchGenerator {
            state,
            next: STATE_SIZE,
            next_double_normal: None,
            kernel: NormalKernel::default(),
        }
    }

    /// Reproduce a specific torch kernel for float32 normals.
    pub fn with_kernel(mut self, kernel: NormalKernel) -> Self {
        self.kernel = kernel;
        self
    }

    fn twist(&mut self) {
        for i in 0..STATE_SIZE {
            let y = (self.state[i] & UPPER_MASK) | (self.state[(i + 1) % STATE_SIZE] & LOWER_MASK);
            let mut value = self.state[(i + SHIFT_SIZE) % STATE_SIZE] ^ (y >> 1);
            if y & 1 != 0 {
                value ^= MATRIX_A;
            }
            self.state[i] = value;
        }
        self.next = 0;
    }

    /// The next 32 raw bits (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= STATE_SIZE {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// 64 bits from two draws, the first as the high word (`random64()`).
    pub fn next_u64(&mut self) -> u64 {
        let high = u64::from(self.next_u32());
        let low = u64::from(self.next_u32());
        (high << 32) | low
    }

    /// A float32 uniform in [0, 1): 24 random bits.
    pub fn uniform_f32(&mut self) -> f32 {
        ((self.next_u32() & ((1 << 24) - 1)) as f32) * (1.0 / (1u32 << 24) as f32)
    }

    /// A float64 uniform in [0, 1): 53 random bits.
    pub fn uniform_f64(&mut self) -> f64 {
        ((self.next_u64() & ((1u64 << 53) - 1)) as f64) * (1.0 / (1u64 << 53) as f64)
    }

    /// `torch.rand(n, generator=g)` for float32.
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// One standard normal from torch's scalar double sampler (with its cache).
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// `torch.randn(n, generator=g, dtype=torch.float32)` (any shape with n elements,
    /// row-major).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let transform = match self.kernel {
            NormalKernel::Avx2 => box_muller_16_avx2,
            NormalKernel::Portable => box_muller_16,
        };
        let mut data = self.rand(n);
        for start in (0..=n - 16).step_by(16) {
            transform(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = n - 16;
            for value in &mut data[tail..] {
                *value = self.uniform_f32();
            }
            transform(&mut data[tail..]);
        }
        data
    }
}

/// torch's `normal_fill_16` with mean 0 and std 1.
fn box_muller_16(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        // `const float theta = 2.0f * c10::pi<double> * u2;`: a double product, stored as float.
        let theta = (2.0f64 * std::f64::consts::PI * f64::from(u2)) as f32;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}

/// torch's `normal_fill_16_AVX2`: `radius = sqrt(-2·log(1 − x[j]))`,
/// `theta = f32(2π)·x[j+8]`, with avx_mathfun's `log256_ps` and `sincos256_ps`.
fn box_muller_16_avx2(data: &mut [f32]) {
    const TWO_PI: f32 = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * cephes_log(u1)).sqrt();
        let (sin, cos) = cephes_sincos(TWO_PI * u2);
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

// avx_mathfun.h's constants, written exactly as its C source does (double literals
// narrowed to float) so the rounding is the same; hence the lint allowances.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
mod cephes {
    pub const SQRT_HALF: f32 = 0.707106781186547524_f64 as f32;
    pub const LOG_P: [f32; 9] = [
        7.0376836292E-2_f64 as f32,
        -1.1514610310E-1_f64 as f32,
        1.1676998740E-1_f64 as f32,
        -1.2420140846E-1_f64 as f32,
        1.4249322787E-1_f64 as f32,
        -1.6668057665E-1_f64 as f32,
        2.0000714765E-1_f64 as f32,
        -2.4999993993E-1_f64 as f32,
        3.3333331174E-1_f64 as f32,
    ];
    pub const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
    pub const LOG_Q2: f32 = 0.693359375_f64 as f32;
    pub const MINUS_DP: [f32; 3] = [
        -0.78515625_f64 as f32,
        -2.4187564849853515625e-4_f64 as f32,
        -3.77489497744594108e-8_f64 as f32,
    ];
    pub const SIN_P: [f32; 3] = [
        -1.9515295891E-4_f64 as f32,
        8.3321608736E-3_f64 as f32,
        -1.6666654611E-1_f64 as f32,
    ];
    pub const COS_P: [f32; 3] = [
        2.443315711809948E-005_f64 as f32,
        -1.388731625493765E-003_f64 as f32,
        4.166664568298827E-002_f64 as f32,
    ];
    pub const FOUR_OVER_PI: f32 = 1.27323954473516_f64 as f32;
}
use cephes::*;

/// avx_mathfun's `log256_ps` (Cephes `logf`) for one lane, operation for operation.
fn cephes_log(x: f32) -> f32 {
    if x <= 0.0 || x.is_nan() {
        return f32::NAN;
    }
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0x3f00_0000);
    let below = x < SQRT_HALF;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    if below {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = LOG_P[0];
    for p in &LOG_P[1..] {
        y = y * x + p;
    }
    y *= x;
    y *= z;
    y += e * LOG_Q1;
    y -= z * 0.5;
    x += y;
    x + e * LOG_Q2
}

/// avx_mathfun's `sincos256_ps` (Cephes `sinf`/`cosf`) for one lane.
fn cephes_sincos(x: f32) -> (f32, f32) {
    let mut sign_sin = x.is_sign_negative();
    let mut x = x.abs();
    let quadrant = (((x * FOUR_OVER_PI) as i32) + 1) & !1;
    let y = quadrant as f32;
    if quadrant & 4 != 0 {
        sign_sin = !sign_sin;
    }
    let sin_poly_first = quadrant & 2 == 0;
    let sign_cos = (!(quadrant - 2)) & 4 != 0;
    for dp in MINUS_DP {
        x += y * dp;
    }
    let z = x * x;
    let mut cos_poly = COS_P[0];
    cos_poly = cos_poly * z + COS_P[1];
    cos_poly = cos_poly * z + COS_P[2];
    cos_poly *= z;
    // torch's build fuses these two operations into FMAs (found by matching recorded
    // streams bit for bit; every other step is a separate multiply and add).
    cos_poly = cos_poly.mul_add(z, -(z * 0.5));
    cos_poly += 1.0;
    let mut sin_poly = SIN_P[0];
    sin_poly = sin_poly * z + SIN_P[1];
    sin_poly = sin_poly * z + SIN_P[2];
    sin_poly *= z;
    sin_poly = sin_poly.mul_add(x, x);
    let (sin, cos) = if sin_poly_first {
        (sin_poly, cos_poly)
    } else {
        (cos_poly, sin_poly)
    };
    (
        if sign_sin { -sin } else { sin },
        if sign_cos { -cos } else { cos },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard requires the 10000th output of mt19937 seeded with 5489.
        let mut generator = TorchGenerator::new(5489);
        let mut value = 0;
        for _ in 0..10_000 {
            value = generator.next_u32();
        }
        assert_eq!(value, 4_123_659_995);
    }

    #[test]
    fn seeds_use_only_their_low_32_bits() {
        let a = TorchGenerator::new(5).randn(20);
        let b = TorchGenerator::new((1 << 32) + 5).randn(20);
        assert_eq!(a, b);
    }
}
