//! `FlowMatchEulerDiscreteScheduler` as FLUX pipelines drive it: sigmas
//! `linspace(1, 1/N, N)`, dynamic (resolution-dependent) or static shift, a final 0,
//! Euler steps `x += (σ_next − σ)·v`, and img2img's `strength` cut.
//!
//! diffusers computes the shifted sigmas in float32 NumPy arithmetic; this module
//! does the same operations in f32 so the schedule matches bit for bit.

use serde::{Deserialize, Serialize};

fn default_train_timesteps() -> u32 {
    1000
}
fn default_shift() -> f64 {
    1.0
}
fn default_base_shift() -> f64 {
    0.5
}
fn default_max_shift() -> f64 {
    1.15
}
fn default_base_seq() -> f64 {
    256.0
}
fn default_max_seq() -> f64 {
    4096.0
}

/// The fields of diffusers' `scheduler_config.json` this scheduler reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowMatchEulerConfig {
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: u32,
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "default_base_shift")]
    pub base_shift: f64,
    #[serde(default = "default_max_shift")]
    pub max_shift: f64,
    #[serde(default = "default_base_seq")]
    pub base_image_seq_len: f64,
    #[serde(default = "default_max_seq")]
    pub max_image_seq_len: f64,
    /// `shift_terminal`: stretch the schedule so it ends at this sigma.
    #[serde(default)]
    pub shift_terminal: Option<f64>,
}

impl Default for FlowMatchEulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

/// The sigmas (with a trailing 0) and timesteps of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchSchedule {
    /// N + 1 values, decreasing from about 1 to 0.
    pub sigmas: Vec<f32>,
    /// `sigma * num_train_timesteps` for the N steps.
    pub timesteps: Vec<f32>,
}

impl FlowMatchEulerConfig {
    /// FluxPipeline's `calculate_shift`: mu grows linearly with the image token count.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m =
            (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len);
        let b = self.base_shift - m * self.base_image_seq_len;
        image_seq_len as f64 * m + b
    }

    /// The schedule FluxPipeline builds for `steps` steps over `image_seq_len` tokens.
    pub fn schedule(&self, steps: usize, image_seq_len: usize) -> FlowMatchSchedule {
        self.schedule_with_mu(steps, self.mu(image_seq_len))
    }

    /// The schedule for `steps` steps with the dynamic shift `mu` given (FLUX.2
    /// computes it with [`empirical_mu`]; FLUX.1 with [`FlowMatchEulerConfig::mu`]).
    pub fn schedule_with_mu(&self, steps: usize, mu: f64) -> FlowMatchSchedule {
        let steps = steps.max(1);
        // np.linspace(1.0, 1/N, N) in float64, then .astype(np.float32)
        let end = 1.0 / steps as f64;
        let base: Vec<f32> = (0..steps)
            .map(|i| {
                if steps == 1 {
                    1.0
                } else if i == steps - 1 {
                    end as f32
                } else {
                    (1.0 + i as f64 * ((end - 1.0) / (steps - 1) as f64)) as f32
                }
            })
            .collect();
        let mut sigmas: Vec<f32> = if self.use_dynamic_shifting {
            let e = mu.exp() as f32;
            base.iter()
                .map(|&t| e / (e + (1.0f32 / t - 1.0f32)))
                .collect()
        } else {
            let shift = self.shift as f32;
            base.iter()
                .map(|&s| shift * s / (1.0f32 + (shift - 1.0f32) * s))
                .collect()
        };
        if let Some(terminal) = self.shift_terminal {
            let terminal = terminal as f32;
            let last = sigmas[sigmas.len() - 1];
            let scale = (1.0f32 - last) / (1.0f32 - terminal);
            for s in sigmas.iter_mut() {
                *s = 1.0f32 - (1.0f32 - *s) / scale;
            }
        }
        let train = self.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|s| s * train).collect();
        sigmas.push(0.0);
        FlowMatchSchedule { sigmas, timesteps }
    }
}

/// FLUX.2's `compute_empirical_mu`: the dynamic shift from the image token
/// count and the step count (linear in the steps between fits at 10 and 200
/// steps, and in the tokens alone past 4300 tokens).
pub fn empirical_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let tokens = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * tokens + b2;
    }
    let m_200 = a2 * tokens + b2;
    let m_10 = a1 * tokens + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * steps as f64 + b
}

impl FlowMatchSchedule {
    /// img2img's cut (FluxImg2ImgPipeline.get_timesteps): keep the last
    /// `min(N·strength, N)` steps. Returns the index of the first step kept.
    pub fn start_for_strength(&self, strength: f64) -> usize {
        let n = self.timesteps.len() as f64;
        let init = (n * strength).min(n);
        (n - init).max(0.0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_shift_one_is_the_plain_linspace_ending_in_zero() {
        let config = FlowMatchEulerConfig::default();
        let schedule = config.schedule(4, 16);
        assert_eq!(schedule.sigmas, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(schedule.timesteps, vec![1000.0, 750.0, 500.0, 250.0]);
    }

    #[test]
    fn dynamic_shift_pushes_sigmas_up_for_large_images() {
        let config = FlowMatchEulerConfig {
            use_dynamic_shifting: true,
            ..FlowMatchEulerConfig::default()
        };
        assert!((config.mu(256) - 0.5).abs() < 1e-12);
        assert!((config.mu(4096) - 1.15).abs() < 1e-12);
        let small = config.schedule(10, 256).sigmas;
        let large = config.schedule(10, 4096).sigmas;
        assert_eq!(small[0], 1.0);
        assert!(large[5] > small[5]);
    }

    #[test]
    fn strength_keeps_the_tail_of_the_schedule() {
        let schedule = FlowMatchEulerConfig::default().schedule(10, 16);
        assert_eq!(schedule.start_for_strength(0.6), 4);
        assert_eq!(schedule.start_for_strength(1.0), 0);
        assert_eq!(schedule.start_for_strength(0.0), 10);
    }
}
