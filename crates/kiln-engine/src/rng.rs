//! A reproduction of torch's CPU generator (`torch.Generator("cpu").manual_seed(s)`):
//! the mt19937 engine, `torch.rand` (uniform) and `torch.randn` (normal) for float32
//! tensors, element for element.
//!
//! torch draws normals two ways. Tensors of 16 or more float32 elements are first
//! filled with uniforms, then every block of 16 is Box–Muller transformed in place
//! (`normal_fill_16`: u1 = 1 − x[j], u2 = x[j+8], all in f32 but the angle's product); a
//! tail shorter than 16 re-draws and transforms the last 16 elements. Smaller tensors
//! use the scalar double-precision sampler, which caches the second (sine) value of
//! each Box–Muller pair in the generator. This reproduces torch's portable kernel
//! (what torch runs on AVX-512 machines); torch's AVX2-only kernel evaluates
//! log/sin/cos with polynomial approximations and differs in the last bits.

const STATE_SIZE: usize = 624;
const SHIFT_SIZE: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// torch's CPU generator state: mt19937 plus the cached normal sample.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; STATE_SIZE],
    next: usize,
    next_double_normal: Option<f64>,
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
        }
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
        let mut data = self.rand(n);
        for start in (0..=n - 16).step_by(16) {
            box_muller_16(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = n - 16;
            for value in &mut data[tail..] {
                *value = self.uniform_f32();
            }
            box_muller_16(&mut data[tail..]);
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
