//! `kiln glm fit`: fit a GLM from a CSV file, print its summary, optionally register it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_pipelines::RawFrame;
use kiln_pipelines::tabular::glm::{FitOptions, GlmSpec, fit_glm};
use kiln_registry::{Alias, ModelName, Registry};

#[derive(Subcommand)]
pub enum GlmCommand {
    /// Fit by IRLS (statsmodels semantics) and print a summary.
    Fit(Box<FitArgs>),
}

#[derive(Args)]
pub struct FitArgs {
    /// CSV file with a header row.
    #[arg(long)]
    data: PathBuf,
    /// e.g. "y ~ x1 + x2 + C(region) + x1:x2"; `succ + fail ~ ...` for binomial counts.
    #[arg(long)]
    formula: String,
    /// gaussian, binomial, poisson, gamma, inverse_gaussian, negative_binomial, tweedie.
    #[arg(long, default_value = "gaussian")]
    family: String,
    /// Link function (default: the family's canonical/default link).
    #[arg(long)]
    link: Option<String>,
    /// Exponent for --link power.
    #[arg(long)]
    link_power: Option<f64>,
    /// Column added to the linear predictor.
    #[arg(long)]
    offset: Option<String>,
    /// Column whose log is added to the linear predictor (log link only).
    #[arg(long)]
    exposure: Option<String>,
    /// Prior (variance) weights column, like R's `weights`.
    #[arg(long)]
    weights: Option<String>,
    /// Frequency weights column (each row counts this many times).
    #[arg(long)]
    freq_weights: Option<String>,
    /// NegativeBinomial dispersion alpha (default 1.0).
    #[arg(long)]
    alpha: Option<f64>,
    /// Tweedie variance power (default 1.0).
    #[arg(long)]
    var_power: Option<f64>,
    /// Maximum IRLS iterations.
    #[arg(long, default_value_t = 100)]
    max_iter: usize,
    /// Convergence tolerance on the deviance change.
    #[arg(long, default_value_t = 1e-8)]
    tol: f64,
    /// Register the fitted model under this `catalog.schema.model` name.
    #[arg(long)]
    register: Option<String>,
    /// Alias for the registered version (e.g. champion).
    #[arg(long, requires = "register")]
    alias: Option<String>,
    /// Print the full results as JSON instead of the summary table.
    #[arg(long)]
    json: bool,
}

pub fn run(home: &Path, command: GlmCommand) -> Result<()> {
    let GlmCommand::Fit(args) = command;
    let args = *args;
    // Validate names before spending time on the fit.
    let name = args.register.as_deref().map(ModelName::parse).transpose()?;
    let alias = args.alias.as_deref().map(Alias::parse).transpose()?;
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let data =
        RawFrame::from_csv(&text).with_context(|| format!("parsing {}", args.data.display()))?;
    let spec = GlmSpec {
        formula: args.formula,
        family: args.family,
        link: args.link,
        link_power: args.link_power,
        alpha: args.alpha,
        var_power: args.var_power,
        offset: args.offset,
        exposure: args.exposure,
        var_weights: args.weights,
        freq_weights: args.freq_weights,
    };
    let options = FitOptions {
        max_iter: args.max_iter,
        tol: args.tol,
    };
    let (config, inputs) = fit_glm(&spec, &data, options)
        .with_context(|| format!("fitting {}", args.data.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&config)?);
    } else {
        print!("{}", config.summary()?);
    }
    if let Some(name) = name {
        let manifest = config.to_manifest(&inputs);
        let published = Registry::open(home).register(&name, manifest, None, alias.as_ref())?;
        let version = published.version.unwrap_or_default();
        eprintln!("registered models:/{name}/{version}");
        if let Some(alias) = alias {
            eprintln!("alias @{alias} -> version {version}");
        }
    }
    Ok(())
}
