//! DPM-Solver++ (2M), as diffusers' `DPMSolverMultistepScheduler` with its
//! defaults (second order, midpoint, lower-order final step, final sigma 0):
//! Cog's DPMSolverMultistep, and KarrasDPM with Karras sigmas. The model's
//! output is converted to a denoised estimate and combined with the previous
//! step's in log-SNR (λ) time.

use candle_core::{Result, Tensor};

use super::discrete::{
    DiscreteConfig, NoiseSource, Prediction, Sampler, ScheduleError, combine, interp,
    karras_sigmas, sigma_to_t,
};

pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    /// The previous step's denoised estimate.
    previous: Option<Tensor>,
}

/// (α_t, σ_t) of a sigma: α = 1/sqrt(σ²+1), σ_t = σ·α.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// log-SNR λ = ln α − ln σ_t.
fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    alpha.ln() - sigma_t.ln()
}

impl DpmSolverMultistep {
    pub fn new(config: &DiscreteConfig, steps: usize) -> std::result::Result<Self, ScheduleError> {
        let train = config.train_sigmas()?;
        let mut timesteps = config.spaced_timesteps(steps, 1, true)?;
        let mut sigmas: Vec<f64> = if config.use_karras_sigmas {
            let karras = karras_sigmas(
                f64::from(train[train.len() - 1]),
                f64::from(train[0]),
                steps,
            );
            timesteps = karras
                .iter()
                .map(|&s| sigma_to_t(s, &train).round_ties_even())
                .collect();
            karras
        } else {
            timesteps.iter().map(|&t| interp(t, &train)).collect()
        };
        sigmas.push(0.0);
        Ok(DpmSolverMultistep {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| f64::from(s as f32)).collect(),
            prediction: config.prediction()?,
            previous: None,
        })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The denoised estimate x₀ from the model's output.
    fn denoised(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let (alpha, sigma_t) = alpha_sigma(sigma);
        match self.prediction {
            Prediction::Epsilon => combine(sample, 1.0 / alpha, model_output, -sigma_t / alpha),
            Prediction::VPrediction => combine(sample, alpha, model_output, -sigma_t),
            Prediction::Sample => Ok(model_output.clone()),
        }
    }
}

impl Sampler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        combine(original, alpha, noise, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma_s, sigma_t) = (self.sigmas[index], self.sigmas[index + 1]);
        let denoised = self.denoised(model_output, sample, sigma_s)?;
        let last = index + 1 == self.timesteps.len();
        let (alpha_t, sigma_t_scaled) = alpha_sigma(sigma_t);
        let (_, sigma_s_scaled) = alpha_sigma(sigma_s);
        let h = lambda(sigma_t) - lambda(sigma_s);
        let phi = alpha_t * ((-h).exp() - 1.0);
        let ratio = sigma_t_scaled / sigma_s_scaled;
        let next = match (&self.previous, last) {
            // First order: the first step, and the last (final sigma 0).
            (None, _) | (_, true) => combine(sample, ratio, &denoised, -phi)?,
            (Some(previous), false) => {
                let h_0 = lambda(sigma_s) - lambda(self.sigmas[index - 1]);
                let r0 = h_0 / h;
                // D1 = (m0 - m1) / r0; x = ratio·x − φ·D0 − ½φ·D1.
                let d1 = ((&denoised - previous)? / r0)?;
                (combine(sample, ratio, &denoised, -phi)? + d1.affine(-0.5 * phi, 0.0)?)?
            }
        };
        self.previous = Some(denoised);
        Ok(next)
    }
}
