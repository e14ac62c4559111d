//! The built-in default model: a Poisson claim-frequency GLM fitted at first start
//! from a small synthetic motor-insurance dataset shipped inside the binary, so a
//! fresh `kiln serve` has something real to serve.

use std::path::Path;

use anyhow::{Context, Result};
use kiln_pipelines::RawFrame;
use kiln_pipelines::tabular::glm::{FitOptions, GlmSpec, fit_glm};
use kiln_registry::{Alias, ModelName, ModelRef, Registry, ResolvedModel, Verification};

/// Name of the default model in the registry.
pub const DEFAULT_MODEL: &str = "kiln.examples.claims_frequency";
/// Alias the default model is served under.
pub const DEFAULT_ALIAS: &str = "champion";

/// The dataset (`crates/kiln/data/claims.csv`, made by `fixtures/glm/generate.py`).
const CLAIMS_CSV: &str = include_str!("../data/claims.csv");

/// The model's specification: claim counts per policy-year.
pub fn claims_spec() -> GlmSpec {
    GlmSpec {
        exposure: Some("exposure".into()),
        ..GlmSpec::new(
            "claims ~ driver_age + vehicle_power + C(region) + urban + driver_age:urban",
            "poisson",
        )
    }
}

/// Resolve the default model, fitting and registering it first if it is absent.
pub fn ensure_default_model(home: &Path) -> Result<ResolvedModel> {
    let registry = Registry::open(home);
    let reference = ModelRef::parse(&format!("{DEFAULT_MODEL}@{DEFAULT_ALIAS}"))?;
    match registry.resolve(&reference, Verification::Full) {
        Ok(model) => return Ok(model),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(
        model = DEFAULT_MODEL,
        "first start: fitting the built-in claims GLM"
    );
    let data = RawFrame::from_csv(CLAIMS_CSV).context("reading the built-in dataset")?;
    let (config, inputs) = fit_glm(&claims_spec(), &data, FitOptions::default())?;
    let mut manifest = config.to_manifest(&inputs);
    manifest.description = format!(
        "Built-in example: Poisson claim frequency with exposure ({} rows)",
        config.results.nobs
    );
    let name = ModelName::parse(DEFAULT_MODEL)?;
    let alias = Alias::parse(DEFAULT_ALIAS)?;
    Ok(registry.register(&name, manifest, None, Some(&alias))?)
}
