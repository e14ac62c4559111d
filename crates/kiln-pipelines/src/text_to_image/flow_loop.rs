//! One flow-matching denoising loop for every flow model (FLUX.1, and FLUX.2
//! next): Euler steps over a FlowMatch schedule, with diffusers' true CFG
//! (`uncond + scale · (cond − uncond)`) when the model has a negative
//! conditioning, the update done in f32 and the latents kept in the model's
//! dtype, as diffusers does. A family supplies only its velocity prediction.

use candle_core::{DType, Tensor};

use crate::error::PipelineError;
use crate::text_to_image::generation::StepCallback;
use crate::text_to_image::schedulers::FlowMatchSchedule;

/// Which conditioning a velocity is predicted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conditioning {
    /// The prompt's.
    Prompt,
    /// The negative prompt's (true CFG).
    Negative,
}

/// A flow model as the loop sees it.
pub trait VelocityModel {
    /// The velocity at `latents` for the scheduler timestep `timestep` (in
    /// the schedule's units, 0..num_train_timesteps).
    fn velocity(
        &self,
        latents: &Tensor,
        timestep: f32,
        conditioning: Conditioning,
    ) -> Result<Tensor, PipelineError>;

    /// Whether a negative conditioning was given (true CFG runs two forwards).
    fn has_negative(&self) -> bool;
}

fn run(e: candle_core::Error) -> PipelineError {
    PipelineError::Execution(format!("denoising failed: {e}"))
}

/// Run steps `start..schedule.timesteps.len()` from `latents`; `cfg_scale`
/// applies when the model has a negative conditioning. `on_step` hears
/// (done, total) after each step; returning false stops with
/// [`PipelineError::Stopped`].
pub fn denoise(
    model: &dyn VelocityModel,
    mut latents: Tensor,
    schedule: &FlowMatchSchedule,
    start: usize,
    cfg_scale: f64,
    on_step: StepCallback,
) -> Result<Tensor, PipelineError> {
    let dtype = latents.dtype();
    let steps = schedule.timesteps.len();
    let total = steps.saturating_sub(start);
    for (done, step) in (start..steps).enumerate() {
        let t = schedule.timesteps[step];
        let mut velocity = model.velocity(&latents, t, Conditioning::Prompt)?;
        if model.has_negative() {
            let unconditional = model.velocity(&latents, t, Conditioning::Negative)?;
            velocity = (&unconditional
                + ((velocity - &unconditional).map_err(run)? * cfg_scale).map_err(run)?)
            .map_err(run)?;
        }
        let dt = schedule.sigmas[step + 1] - schedule.sigmas[step];
        let step_size = Tensor::new(dt, latents.device()).map_err(run)?;
        latents = (latents.to_dtype(DType::F32).map_err(run)?
            + velocity
                .to_dtype(DType::F32)
                .map_err(run)?
                .broadcast_mul(&step_size)
                .map_err(run)?)
        .map_err(run)?
        .to_dtype(dtype)
        .map_err(run)?;
        if !on_step(done + 1, total) {
            return Err(PipelineError::Stopped);
        }
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Velocity = latents · k (k = 1 for the prompt, 3 for the negative).
    struct Linear {
        negative: bool,
    }

    impl VelocityModel for Linear {
        fn velocity(
            &self,
            latents: &Tensor,
            _: f32,
            c: Conditioning,
        ) -> Result<Tensor, PipelineError> {
            let k = if c == Conditioning::Prompt { 1.0 } else { 3.0 };
            (latents * k).map_err(run)
        }
        fn has_negative(&self) -> bool {
            self.negative
        }
    }

    /// The result of denoising 2.0 from `start` with a model that has (or
    /// has not) a negative conditioning, CFG scale 4, stopping when `go` says.
    fn run_from(negative: bool, start: usize, go: bool) -> Result<f32, PipelineError> {
        let schedule = FlowMatchSchedule {
            sigmas: vec![1.0, 0.5, 0.0],
            timesteps: vec![1000.0, 500.0],
        };
        let x = Tensor::new(&[2.0f32], &Device::Cpu).map_err(run)?;
        let out = denoise(
            &Linear { negative },
            x,
            &schedule,
            start,
            4.0,
            &mut |_, _| go,
        )?;
        Ok(out.to_vec1::<f32>().map_err(run)?[0])
    }

    #[test]
    fn euler_steps_with_and_without_true_cfg() {
        // x ← x + v·dt with v = x, dt = −0.5 twice: 2 → 1 → 0.5.
        assert_eq!(run_from(false, 0, true).unwrap(), 0.5);
        // v = 3x + 4(x − 3x) = −5x: 2 → 2 + 5 = 7 → 7 + 17.5 = 24.5.
        assert_eq!(run_from(true, 0, true).unwrap(), 24.5);
        // From step 1 only; and a callback that stops it.
        assert_eq!(run_from(false, 1, true).unwrap(), 1.0);
        assert!(matches!(
            run_from(false, 0, false),
            Err(PipelineError::Stopped)
        ));
    }
}
