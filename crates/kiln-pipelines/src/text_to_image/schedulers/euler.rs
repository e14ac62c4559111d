//! The sigma-parameterised samplers, each as its diffusers class: Euler
//! (`EulerDiscreteScheduler`, Cog's K_EULER), Euler ancestral
//! (`EulerAncestralDiscreteScheduler`) and Heun (`HeunDiscreteScheduler`,
//! two model calls per step). They share the sigma schedule (interpolated
//! training sigmas, or Karras sigmas), input scaling by `1/sqrt(σ²+1)` and the
//! initial noise scale.

use candle_core::{Result, Tensor};

use super::discrete::{
    DiscreteConfig, NoiseSource, Prediction, Sampler, ScheduleError, combine, interp,
    karras_sigmas, sigma_to_t,
};

/// Timesteps and sigmas (one more sigma: the final 0).
#[derive(Debug, Clone)]
struct SigmaSchedule {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl SigmaSchedule {
    fn new(config: &DiscreteConfig, steps: usize) -> std::result::Result<Self, ScheduleError> {
        let train = config.train_sigmas()?;
        let mut timesteps = config.spaced_timesteps(steps, 0, false)?;
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
        if config.use_karras_sigmas {
            let (max, min) = (sigmas[0], sigmas[sigmas.len() - 1]);
            sigmas = karras_sigmas(max, min, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(sigma_to_t(s, &train) as f32))
                .collect();
        }
        sigmas.push(0.0);
        // diffusers keeps sigmas as float32.
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = match config.timestep_spacing.as_str() {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        };
        Ok(SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: config.prediction()?,
        })
    }

    /// The model's input: `sample / sqrt(σ² + 1)`.
    fn scale(&self, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)
    }

    /// The denoised estimate from the model's output at `sigma`.
    fn denoised(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => combine(sample, 1.0, model_output, -sigma),
            Prediction::VPrediction => {
                let norm = sigma * sigma + 1.0;
                combine(model_output, -sigma / norm.sqrt(), sample, 1.0 / norm)
            }
            Prediction::Sample => Ok(model_output.clone()),
        }
    }
}

/// Euler's method on the probability-flow ODE (no churn, as pipelines call it).
pub struct Euler {
    schedule: SigmaSchedule,
}

impl Euler {
    pub fn new(config: &DiscreteConfig, steps: usize) -> std::result::Result<Self, ScheduleError> {
        Ok(Euler {
            schedule: SigmaSchedule::new(config, steps)?,
        })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.scale(sample, self.schedule.sigmas[index])
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        combine(original, 1.0, noise, self.schedule.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigmas[index];
        let denoised = self.schedule.denoised(model_output, sample, sigma)?;
        let derivative = ((sample - denoised)? / sigma)?;
        let dt = self.schedule.sigmas[index + 1] - sigma;
        sample + derivative.affine(dt, 0.0)?
    }
}

/// Euler ancestral: an Euler step to σ_down, then fresh noise of σ_up.
pub struct EulerAncestral {
    schedule: SigmaSchedule,
}

impl EulerAncestral {
    pub fn new(config: &DiscreteConfig, steps: usize) -> std::result::Result<Self, ScheduleError> {
        let mut config = config.clone();
        // diffusers' EulerAncestral has no Karras option.
        config.use_karras_sigmas = false;
        Ok(EulerAncestral {
            schedule: SigmaSchedule::new(&config, steps)?,
        })
    }
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.scale(sample, self.schedule.sigmas[index])
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        combine(original, 1.0, noise, self.schedule.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (from, to) = (self.schedule.sigmas[index], self.schedule.sigmas[index + 1]);
        let denoised = self.schedule.denoised(model_output, sample, from)?;
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let derivative = ((sample - denoised)? / from)?;
        let stepped = (sample + derivative.affine(down - from, 0.0)?)?;
        let fresh = noise.randn_like(model_output)?;
        stepped + fresh.affine(up, 0.0)?
    }
}

/// Heun's method: each step's Euler prediction is corrected with the slope at
/// its end (a second model call), except the last step.
pub struct Heun {
    schedule: SigmaSchedule,
    /// Per model call: the sigmas diffusers indexes (interleaved).
    call_sigmas: Vec<f64>,
    call_timesteps: Vec<f64>,
    /// (derivative, dt, sample) from the first half of a step.
    pending: Option<(Tensor, f64, Tensor)>,
}

impl Heun {
    pub fn new(config: &DiscreteConfig, steps: usize) -> std::result::Result<Self, ScheduleError> {
        let schedule = SigmaSchedule::new(config, steps)?;
        let n = schedule.sigmas.len();
        let mut call_sigmas = vec![schedule.sigmas[0]];
        for &sigma in &schedule.sigmas[1..n - 1] {
            call_sigmas.extend([sigma, sigma]);
        }
        call_sigmas.push(schedule.sigmas[n - 1]);
        let mut call_timesteps = vec![schedule.timesteps[0]];
        for &t in &schedule.timesteps[1..] {
            call_timesteps.extend([t, t]);
        }
        Ok(Heun {
            schedule,
            call_sigmas,
            call_timesteps,
            pending: None,
        })
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.call_timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn order(&self) -> usize {
        2
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.scale(sample, self.call_sigmas[index])
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        combine(original, 1.0, noise, self.call_sigmas[index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        match self.pending.take() {
            None => {
                let (sigma, next) = (self.call_sigmas[index], self.call_sigmas[index + 1]);
                let denoised = self.schedule.denoised(model_output, sample, sigma)?;
                let derivative = ((sample - denoised)? / sigma)?;
                let dt = next - sigma;
                let stepped = (sample + derivative.affine(dt, 0.0)?)?;
                self.pending = Some((derivative, dt, sample.clone()));
                Ok(stepped)
            }
            Some((first, dt, start)) => {
                let next = self.call_sigmas[index];
                let denoised = self.schedule.denoised(model_output, sample, next)?;
                let second = ((sample - denoised)? / next)?;
                let derivative = ((first + second)? / 2.0)?;
                start + derivative.affine(dt, 0.0)?
            }
        }
    }
}
