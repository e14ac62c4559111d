//! Diffusion samplers' noise schedules, each matching its diffusers class:
//! flow matching for FLUX, and the discrete-time samplers SDXL offers, chosen
//! per request by Cog's names or diffusers' class names.

pub mod ddim;
pub mod discrete;
pub mod dpm;
pub mod euler;
pub mod flow_match;

pub use discrete::{DiscreteConfig, NoiseSource, Sampler, ScheduleError};
pub use flow_match::{FlowMatchEulerConfig, FlowMatchSchedule, empirical_mu};

/// The discrete samplers by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    DpmSolverMultistepKarras,
    Ddim,
    Heun,
    Pndm,
}

/// Accepted names: Cog SDXL's first, then diffusers' class names.
const NAMES: &[(&str, SamplerKind)] = &[
    ("K_EULER", SamplerKind::Euler),
    ("K_EULER_ANCESTRAL", SamplerKind::EulerAncestral),
    ("DPMSolverMultistep", SamplerKind::DpmSolverMultistep),
    ("KarrasDPM", SamplerKind::DpmSolverMultistepKarras),
    ("DDIM", SamplerKind::Ddim),
    ("HeunDiscrete", SamplerKind::Heun),
    ("PNDM", SamplerKind::Pndm),
    ("EulerDiscreteScheduler", SamplerKind::Euler),
    (
        "EulerAncestralDiscreteScheduler",
        SamplerKind::EulerAncestral,
    ),
    (
        "DPMSolverMultistepScheduler",
        SamplerKind::DpmSolverMultistep,
    ),
    ("DDIMScheduler", SamplerKind::Ddim),
    ("HeunDiscreteScheduler", SamplerKind::Heun),
    ("PNDMScheduler", SamplerKind::Pndm),
];

impl SamplerKind {
    /// Every accepted name, for schemas and error messages.
    pub fn names() -> Vec<&'static str> {
        NAMES.iter().map(|(name, _)| *name).collect()
    }

    /// The sampler called `name` (Cog's or diffusers').
    pub fn parse(name: &str) -> Result<SamplerKind, String> {
        NAMES
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, kind)| *kind)
            .ok_or_else(|| {
                format!(
                    "unknown scheduler {name:?}; valid: {}",
                    Self::names().join(", ")
                )
            })
    }

    /// A sampler for `steps` inference steps on `config` (the model's
    /// `scheduler_config.json`; KarrasDPM turns Karras sigmas on).
    pub fn build(
        self,
        config: &DiscreteConfig,
        steps: usize,
    ) -> Result<Box<dyn Sampler>, ScheduleError> {
        Ok(match self {
            SamplerKind::Euler => Box::new(euler::Euler::new(config, steps)?),
            SamplerKind::EulerAncestral => Box::new(euler::EulerAncestral::new(config, steps)?),
            SamplerKind::Heun => {
                config.refuse_zero_snr("Heun")?;
                Box::new(euler::Heun::new(config, steps)?)
            }
            SamplerKind::DpmSolverMultistep => {
                Box::new(dpm::DpmSolverMultistep::new(config, steps)?)
            }
            SamplerKind::DpmSolverMultistepKarras => {
                let mut karras = config.clone();
                karras.use_karras_sigmas = true;
                Box::new(dpm::DpmSolverMultistep::new(&karras, steps)?)
            }
            SamplerKind::Ddim => Box::new(ddim::Ddim::new(config, steps)?),
            SamplerKind::Pndm => {
                config.refuse_zero_snr("PNDM")?;
                Box::new(ddim::Pndm::new(config, steps)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_list_the_valid() {
        assert_eq!(SamplerKind::parse("K_EULER"), Ok(SamplerKind::Euler));
        assert_eq!(
            SamplerKind::parse("DPMSolverMultistepScheduler"),
            Ok(SamplerKind::DpmSolverMultistep)
        );
        let err = SamplerKind::parse("LMS").unwrap_err();
        assert!(err.contains("KarrasDPM") && err.contains("PNDM"), "{err}");
    }
}
