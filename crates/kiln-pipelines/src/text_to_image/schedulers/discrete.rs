//! What the discrete-time (DDPM-trained, e.g. SDXL) samplers share, with
//! diffusers' exact arithmetic: the scheduler config as `scheduler_config.json`
//! writes it, betas (torch's f32 `linspace`), `alphas_cumprod` (torch's
//! cumprod: f32 values, double accumulation), timestep spacing
//! (leading/trailing/linspace + `steps_offset`), sigma interpolation, Karras
//! sigmas and sigma→timestep inversion, zero-terminal-SNR rescaling (the
//! v-prediction fine-tunes' `rescale_betas_zero_snr`), and the [`Sampler`]
//! interface.

use candle_core::{Result, Tensor};
use serde::Deserialize;

/// `scheduler_config.json` keys the discrete samplers read (others ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub prediction_type: String,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    pub use_karras_sigmas: bool,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// Rescale the betas so the last timestep has zero SNR (Lin et al. 2023),
    /// as zero-terminal-SNR v-prediction models are trained.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DiscreteConfig {
    /// SDXL's `scheduler_config.json`.
    fn default() -> Self {
        DiscreteConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            steps_offset: 1,
            use_karras_sigmas: false,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// Why a sampler cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("unsupported {key} {value:?} (supported: {supported})")]
    Unsupported {
        key: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error("num_inference_steps must be between 1 and {max}, got {got}")]
    Steps { got: usize, max: usize },
}

impl DiscreteConfig {
    pub fn prediction(&self) -> std::result::Result<Prediction, ScheduleError> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" => Ok(Prediction::Sample),
            other => Err(ScheduleError::Unsupported {
                key: "prediction_type",
                value: other.into(),
                supported: "epsilon, v_prediction, sample",
            }),
        }
    }

    /// Betas as torch makes them (float32), zero-SNR rescaled when configured.
    pub fn betas(&self) -> std::result::Result<Vec<f32>, ScheduleError> {
        let betas = self.schedule_betas()?;
        Ok(if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        })
    }

    fn schedule_betas(&self) -> std::result::Result<Vec<f32>, ScheduleError> {
        let n = self.num_train_timesteps;
        match self.beta_schedule.as_str() {
            "linear" => Ok(torch_linspace_f32(
                self.beta_start as f32,
                self.beta_end as f32,
                n,
            )),
            "scaled_linear" => Ok(torch_linspace_f32(
                self.beta_start.sqrt() as f32,
                self.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect()),
            other => Err(ScheduleError::Unsupported {
                key: "beta_schedule",
                value: other.into(),
                supported: "linear, scaled_linear",
            }),
        }
    }

    /// `alphas_cumprod` as torch computes it (f32 results of a double-precision
    /// running product); with zero-SNR rescaling the last one is exactly 0.
    pub fn alphas_cumprod(&self) -> std::result::Result<Vec<f32>, ScheduleError> {
        Ok(cumprod(self.betas()?.into_iter().map(|beta| 1.0 - beta)))
    }

    /// Inference timesteps, descending, as diffusers' set_timesteps computes
    /// them (`extra` = 1 gives DPM-Solver's N+1-point spacing, last dropped;
    /// `round_linspace`: DDIM, PNDM and DPM-Solver round "linspace" points,
    /// the Euler family does not).
    pub fn spaced_timesteps(
        &self,
        steps: usize,
        extra: usize,
        round_linspace: bool,
    ) -> std::result::Result<Vec<f64>, ScheduleError> {
        let train = self.num_train_timesteps;
        if steps == 0 || steps > train {
            return Err(ScheduleError::Steps {
                got: steps,
                max: train,
            });
        }
        let points = steps + extra;
        let mut timesteps: Vec<f64> = match self.timestep_spacing.as_str() {
            "leading" => {
                let ratio = train / points;
                (0..points)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as f64)
                    .collect()
            }
            "trailing" => {
                let ratio = train as f64 / steps as f64;
                let mut out = Vec::new();
                let mut t = train as f64;
                while t > 0.0 {
                    out.push(t.round_ties_even() - 1.0);
                    t -= ratio;
                }
                out
            }
            "linspace" => {
                let step = (train - 1) as f64 / (points - 1).max(1) as f64;
                (0..points)
                    .rev()
                    .map(|i| {
                        let t = i as f64 * step;
                        if round_linspace {
                            t.round_ties_even()
                        } else {
                            f64::from(t as f32)
                        }
                    })
                    .collect()
            }
            other => {
                return Err(ScheduleError::Unsupported {
                    key: "timestep_spacing",
                    value: other.into(),
                    supported: "leading, trailing, linspace",
                });
            }
        };
        timesteps.truncate(steps);
        Ok(timesteps)
    }

    /// The training sigmas `sqrt((1 - ᾱ) / ᾱ)` (f32, ascending in t). With
    /// zero-SNR rescaling the last ᾱ becomes 2⁻²⁴ first, as diffusers' sigma
    /// samplers (Euler, Euler ancestral, DPM-Solver) do, so σ_max is finite (4096).
    pub fn train_sigmas(&self) -> std::result::Result<Vec<f32>, ScheduleError> {
        let mut alphas_cumprod = self.alphas_cumprod()?;
        if self.rescale_betas_zero_snr
            && let Some(last) = alphas_cumprod.last_mut()
        {
            *last = 2f32.powi(-24);
        }
        Ok(alphas_cumprod
            .into_iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect())
    }

    /// Refuse zero-SNR rescaling for a sampler diffusers does not rescale
    /// (it ignores the key there, which would silently change the model's schedule).
    pub fn refuse_zero_snr(&self, sampler: &str) -> std::result::Result<(), ScheduleError> {
        if self.rescale_betas_zero_snr {
            return Err(ScheduleError::Unsupported {
                key: "rescale_betas_zero_snr",
                value: format!("true with {sampler}"),
                supported: "zero-SNR models: K_EULER, K_EULER_ANCESTRAL, DPMSolverMultistep, KarrasDPM, DDIM",
            });
        }
        Ok(())
    }
}

/// torch.cumprod of f32 values on CPU: a double-precision running product
/// rounded to f32 at each element.
fn cumprod(values: impl IntoIterator<Item = f32>) -> Vec<f32> {
    let mut product = 1f64;
    values
        .into_iter()
        .map(|value| {
            product *= f64::from(value);
            product as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` in torch's f32 arithmetic: shift
/// and scale √ᾱ so the last is 0 and the first unchanged, then back to betas.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut roots: Vec<f32> = cumprod(betas.iter().map(|b| 1.0 - b))
        .into_iter()
        .map(f32::sqrt)
        .collect();
    let (Some(&first), Some(&last)) = (roots.first(), roots.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    for root in &mut roots {
        *root = (*root - last) * scale;
    }
    let alphas_bar: Vec<f32> = roots.iter().map(|r| r * r).collect();
    let mut rescaled = Vec::with_capacity(betas.len());
    rescaled.push(1.0 - alphas_bar[0]);
    rescaled.extend(alphas_bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    rescaled
}

/// torch.linspace(start, end, steps, dtype=float32) on CPU: the first half
/// counts up from `start`, the second down from `end`.
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// numpy.interp of `x` over (0, 1, 2, …) → `table`.
pub fn interp(x: f64, table: &[f32]) -> f64 {
    if x <= 0.0 {
        return f64::from(table[0]);
    }
    let last = table.len() - 1;
    if x >= last as f64 {
        return f64::from(table[last]);
    }
    let low = x.floor() as usize;
    let w = x - low as f64;
    let (a, b) = (f64::from(table[low]), f64::from(table[low + 1]));
    a + (b - a) * w
}

/// Karras et al.'s sigmas (ρ = 7) between the schedule's ends.
pub fn karras_sigmas(sigma_max: f64, sigma_min: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, by linear
/// interpolation in log-sigma (diffusers' `_sigma_to_t`).
pub fn sigma_to_t(sigma: f64, train_sigmas: &[f32]) -> f64 {
    let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| f64::from(s.ln())).collect();
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    // argmax of the cumulative count: the last index where it increases.
    let low = if count == 0 {
        0
    } else {
        log_sigmas
            .iter()
            .rposition(|&l| log_sigma - l >= 0.0)
            .unwrap_or(0)
    }
    .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Noise for ancestral steps (torch's generator, continuing its stream).
pub trait NoiseSource {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor>;
}

impl NoiseSource for kiln_engine::rng::TorchGenerator {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let values = self.randn(like.elem_count());
        Tensor::from_vec(values, like.shape(), like.device())?.to_dtype(like.dtype())
    }
}

/// One sampler run: call `scale_model_input` then `step` for each index of
/// `timesteps()` in order.
pub trait Sampler: Send {
    /// The timesteps the model is called at, in order.
    fn timesteps(&self) -> &[f64];
    /// The scale of the initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// The model's input at step `index`.
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor>;
    /// The next sample from the model's output at step `index`.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// How many model calls one inference step takes (Heun: 2).
    fn order(&self) -> usize {
        1
    }
    /// `original` noised to the level of step `index` (image-to-image and
    /// inpainting start there): diffusers' `add_noise` for this sampler.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
}

/// DDPM's forward process at training timestep `t`: √ᾱ·x + √(1−ᾱ)·ε.
pub fn ddpm_add_noise(alphas: &[f32], original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
    let a = f64::from(alphas[(t.max(0.0) as usize).min(alphas.len() - 1)]);
    combine(original, a.sqrt(), noise, (1.0 - a).sqrt())
}

/// `a·x + b·y` for tensors of one shape.
pub fn combine(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    x.affine(a, 0.0)? + y.affine(b, 0.0)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_spacing_matches_diffusers_sdxl_defaults() {
        let config = DiscreteConfig::default();
        assert_eq!(
            config.spaced_timesteps(4, 0, false).unwrap(),
            vec![751.0, 501.0, 251.0, 1.0]
        );
        // DPM-Solver divides by N + 1 and drops the last point.
        assert_eq!(
            config.spaced_timesteps(4, 1, true).unwrap(),
            vec![801.0, 601.0, 401.0, 201.0]
        );
        assert!(config.spaced_timesteps(0, 0, false).is_err());
    }

    #[test]
    fn interpolation_and_karras_ends() {
        assert_eq!(interp(1.5, &[0.0, 1.0, 3.0]), 2.0);
        assert_eq!(interp(9.0, &[0.0, 1.0, 3.0]), 3.0);
        let k = karras_sigmas(10.0, 0.1, 5);
        assert!((k[0] - 10.0).abs() < 1e-12 && (k[4] - 0.1).abs() < 1e-12);
    }
}
