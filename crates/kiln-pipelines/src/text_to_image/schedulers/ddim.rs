//! The ᾱ-parameterised samplers, each as its diffusers class: DDIM
//! (`DDIMScheduler`, η = 0 as SDXL pipelines call it) and PNDM
//! (`PNDMScheduler` with `skip_prk_steps`, i.e. PLMS: linear multistep over
//! the last four model outputs). Both index `alphas_cumprod` by integer
//! timesteps and need no input scaling.

use candle_core::{Result, Tensor};

use super::discrete::{
    DiscreteConfig, NoiseSource, Prediction, Sampler, ScheduleError, combine, ddpm_add_noise,
};

/// ᾱ at `t`, or the final value below 0.
fn alpha_at(alphas: &[f32], final_alpha: f64, t: i64) -> f64 {
    if t >= 0 {
        f64::from(alphas[t as usize])
    } else {
        final_alpha
    }
}

fn final_alpha(config: &DiscreteConfig, alphas: &[f32]) -> f64 {
    if config.set_alpha_to_one {
        1.0
    } else {
        f64::from(alphas[0])
    }
}

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas: Vec<f32>,
    final_alpha: f64,
    stride: i64,
    prediction: Prediction,
    clip: Option<f64>,
}

impl Ddim {
    pub fn new(config: &DiscreteConfig, steps: usize) -> std::result::Result<Self, ScheduleError> {
        let alphas = config.alphas_cumprod()?;
        Ok(Ddim {
            timesteps: config.spaced_timesteps(steps, 0, true)?,
            final_alpha: final_alpha(config, &alphas),
            alphas,
            stride: (config.num_train_timesteps / steps) as i64,
            prediction: config.prediction()?,
            clip: config.clip_sample.then_some(config.clip_sample_range),
        })
    }
}

impl Sampler for Ddim {
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
        ddpm_add_noise(&self.alphas, original, noise, self.timesteps[index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timesteps[index] as i64;
        let a_t = alpha_at(&self.alphas, self.final_alpha, t);
        let a_prev = alpha_at(&self.alphas, self.final_alpha, t - self.stride);
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction {
            Prediction::Epsilon => (
                combine(
                    sample,
                    1.0 / a_t.sqrt(),
                    model_output,
                    -b_t.sqrt() / a_t.sqrt(),
                )?,
                model_output.clone(),
            ),
            Prediction::Sample => (
                model_output.clone(),
                combine(
                    sample,
                    1.0 / b_t.sqrt(),
                    model_output,
                    -a_t.sqrt() / b_t.sqrt(),
                )?,
            ),
            Prediction::VPrediction => (
                combine(sample, a_t.sqrt(), model_output, -b_t.sqrt())?,
                combine(model_output, a_t.sqrt(), sample, b_t.sqrt())?,
            ),
        };
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        combine(&x0, a_prev.sqrt(), &eps, (1.0 - a_prev).sqrt())
    }
}

pub struct Pndm {
    timesteps: Vec<f64>,
    alphas: Vec<f32>,
    final_alpha: f64,
    stride: i64,
    prediction: Prediction,
    /// The last (up to four) model outputs.
    outputs: Vec<Tensor>,
    /// The sample the first step started from (its second call restarts there).
    first_sample: Option<Tensor>,
    counter: usize,
}

impl Pndm {
    pub fn new(config: &DiscreteConfig, steps: usize) -> std::result::Result<Self, ScheduleError> {
        let alphas = config.alphas_cumprod()?;
        let mut ascending = config.spaced_timesteps(steps, 0, true)?;
        ascending.reverse();
        // skip_prk_steps: the second-to-last point repeats (a warm-up call).
        let n = ascending.len();
        let mut plms: Vec<f64> = ascending[..n.saturating_sub(1)].to_vec();
        if n >= 2 {
            plms.push(ascending[n - 2]);
        }
        plms.push(ascending[n - 1]);
        plms.reverse();
        let prediction = config.prediction()?;
        if prediction == Prediction::Sample {
            return Err(ScheduleError::Unsupported {
                key: "prediction_type",
                value: "sample".into(),
                supported: "epsilon, v_prediction (PNDM)",
            });
        }
        Ok(Pndm {
            timesteps: plms,
            final_alpha: final_alpha(config, &alphas),
            alphas,
            stride: (config.num_train_timesteps / steps) as i64,
            prediction,
            outputs: Vec::new(),
            first_sample: None,
            counter: 0,
        })
    }

    fn previous_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev: i64,
        output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = alpha_at(&self.alphas, self.final_alpha, t);
        let a_prev = alpha_at(&self.alphas, self.final_alpha, prev);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            Prediction::VPrediction => combine(output, a_t.sqrt(), sample, b_t.sqrt())?,
            _ => output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denominator = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        combine(sample, sample_coeff, &eps, -(a_prev - a_t) / denominator)
    }
}

impl Sampler for Pndm {
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
        ddpm_add_noise(&self.alphas, original, noise, self.timesteps[index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let mut t = self.timesteps[index] as i64;
        let mut prev = t - self.stride;
        if self.counter != 1 {
            if self.outputs.len() == 4 {
                self.outputs.remove(0);
            }
            self.outputs.push(model_output.clone());
        } else {
            prev = t;
            t += self.stride;
        }
        let e = &self.outputs;
        let n = e.len();
        let mut start = sample.clone();
        let output = if n == 1 && self.counter == 0 {
            self.first_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            if let Some(first) = self.first_sample.take() {
                start = first;
            }
            ((model_output + &e[0])? / 2.0)?
        } else if n == 2 {
            combine(&e[1], 1.5, &e[0], -0.5)?
        } else if n == 3 {
            (combine(&e[2], 23.0 / 12.0, &e[1], -16.0 / 12.0)? + e[0].affine(5.0 / 12.0, 0.0)?)?
        } else {
            let a = combine(&e[3], 55.0 / 24.0, &e[2], -59.0 / 24.0)?;
            let b = combine(&e[1], 37.0 / 24.0, &e[0], -9.0 / 24.0)?;
            (a + b)?
        };
        let next = self.previous_sample(&start, t, prev, &output)?;
        self.counter += 1;
        Ok(next)
    }
}
