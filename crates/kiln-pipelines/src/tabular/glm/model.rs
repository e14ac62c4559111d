//! Fitting a GLM from a table into a manifest-ready model, and serving it:
//! the `tabular/glm` pipeline (mean or linear predictor, honouring offset/exposure).

use std::sync::Arc;

use kiln_registry::{Manifest, ResolvedModel};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::columns::{Columns, DataProblem};
use super::design::DesignSpec;
use super::family::Family;
use super::fit::{FitData, FitError, FitOptions, first_dependent_column, matrix_rank};
use super::formula::{Formula, FormulaError};
use super::link::Link;
use super::results::{GlmResults, fit_and_summarise};
use crate::contract::{
    InputSpec, ModelInterface, Pipeline, PredictInput, PredictRequest, Prediction,
};
use crate::error::{PipelineError, ProblemKind};
use crate::frame::{ColumnSpec, ColumnType, RawFrame, Signature};
use crate::schema::{FieldKind, FieldSpec, InputSchema};
use crate::tensor::Tensor;

/// The manifest `pipeline` value for GLMs.
pub const PIPELINE_KIND: &str = "tabular/glm";

/// What to fit: formula, distribution, link and the optional special columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlmSpec {
    pub formula: String,
    /// Family name, e.g. `poisson` (see [`Family::NAMES`]).
    pub family: String,
    /// Link name; the family's default when absent (see [`Link::NAMES`]).
    #[serde(default)]
    pub link: Option<String>,
    /// Exponent for `link = "power"`.
    #[serde(default)]
    pub link_power: Option<f64>,
    /// NegativeBinomial ancillary parameter (default 1.0).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Tweedie variance power (default 1.0).
    #[serde(default)]
    pub var_power: Option<f64>,
    #[serde(default)]
    pub offset: Option<String>,
    #[serde(default)]
    pub exposure: Option<String>,
    /// Prior (variance) weights, as R's `weights` and statsmodels' `var_weights`.
    #[serde(default)]
    pub var_weights: Option<String>,
    /// Frequency weights (row counts).
    #[serde(default)]
    pub freq_weights: Option<String>,
}

impl GlmSpec {
    /// A spec with the family's default link and no special columns.
    pub fn new(formula: impl Into<String>, family: impl Into<String>) -> Self {
        GlmSpec {
            formula: formula.into(),
            family: family.into(),
            link: None,
            link_power: None,
            alpha: None,
            var_power: None,
            offset: None,
            exposure: None,
            var_weights: None,
            freq_weights: None,
        }
    }

    /// Resolve family and link, checking statsmodels' allowed combinations.
    pub fn family_and_link(&self) -> Result<(Family, Link), GlmError> {
        let alpha = self.alpha.unwrap_or(1.0);
        if alpha <= 0.0 || !alpha.is_finite() {
            return Err(GlmError::Spec(format!("--alpha must be > 0, got {alpha}")));
        }
        let family = match self.family.to_ascii_lowercase().replace('-', "_").as_str() {
            "gaussian" | "normal" => Family::Gaussian,
            "binomial" => Family::Binomial,
            "poisson" => Family::Poisson,
            "gamma" => Family::Gamma,
            "inverse_gaussian" | "inversegaussian" => Family::InverseGaussian,
            "negative_binomial" | "negativebinomial" | "negbin" => {
                Family::NegativeBinomial { alpha }
            }
            "tweedie" => Family::Tweedie {
                var_power: self.var_power.unwrap_or(1.0),
            },
            other => {
                return Err(GlmError::Spec(format!(
                    "unknown family {other:?}; choose one of {}",
                    Family::NAMES.join(", ")
                )));
            }
        };
        if self.var_power.is_some() && !matches!(family, Family::Tweedie { .. }) {
            return Err(GlmError::Spec(
                "--var-power applies only to the tweedie family".into(),
            ));
        }
        if self.alpha.is_some() && !matches!(family, Family::NegativeBinomial { .. }) {
            return Err(GlmError::Spec(
                "--alpha applies only to the negative_binomial family".into(),
            ));
        }
        let link = match &self.link {
            None => family.default_link(),
            Some(name) => Link::from_name(&name.to_ascii_lowercase(), self.link_power, alpha)
                .ok_or_else(|| {
                    if name == "power" {
                        GlmError::Spec("the power link needs --link-power".into())
                    } else {
                        GlmError::Spec(format!(
                            "unknown link {name:?}; choose one of {}",
                            Link::NAMES.join(", ")
                        ))
                    }
                })?,
        };
        if !family.allows(&link) {
            return Err(GlmError::Spec(format!(
                "the {family} family does not support the {link} link; allowed: {}",
                family.allowed_link_names().join(", ")
            )));
        }
        if self.exposure.is_some() && link != Link::Log {
            return Err(GlmError::Spec(
                "--exposure requires the log link (use --offset otherwise)".into(),
            ));
        }
        Ok((family, link))
    }
}

/// Why a GLM could not be fitted.
#[derive(Debug, thiserror::Error)]
pub enum GlmError {
    #[error(transparent)]
    Formula(#[from] FormulaError),
    #[error("bad data: {0}")]
    Data(DataProblem),
    #[error("{0}")]
    Spec(String),
    #[error(
        "singular design: column {column:?} is a linear combination of the columns before it (rank {rank} < {columns} columns); drop or recode it"
    )]
    Singular {
        column: String,
        rank: usize,
        columns: usize,
    },
    #[error("fit failed: {0}")]
    Fit(#[from] FitError),
}

impl From<DataProblem> for GlmError {
    fn from(problem: DataProblem) -> Self {
        GlmError::Data(problem)
    }
}

/// The fitted model as stored in the manifest's `config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlmConfig {
    pub spec: GlmSpec,
    pub response: Vec<String>,
    pub design: DesignSpec,
    pub results: GlmResults,
}

impl GlmConfig {
    /// The statsmodels-style summary of this fit.
    pub fn summary(&self) -> Result<String, GlmError> {
        let (family, link) = self.spec.family_and_link()?;
        Ok(self
            .results
            .summary(&self.response.join(" + "), &family, &link))
    }

    /// The model's manifest: pipeline kind, signature, config and a description.
    pub fn to_manifest(&self, input_types: &[ColumnSpec]) -> Manifest {
        let mut manifest = Manifest::new(PIPELINE_KIND);
        manifest.description = format!("GLM {} ({})", self.spec.formula, self.spec.family);
        let signature = Signature {
            inputs: input_types.to_vec(),
            outputs: vec![ColumnSpec {
                name: "predictions".into(),
                column_type: ColumnType::Double,
                required: true,
            }],
        };
        manifest.signature = serde_json::to_value(signature).unwrap_or(Value::Null);
        manifest.config = serde_json::to_value(self).unwrap_or(Value::Null);
        manifest
    }
}

fn optional_numbers(
    data: &dyn Columns,
    column: &Option<String>,
) -> Result<Option<Vec<f64>>, DataProblem> {
    column.as_ref().map(|c| data.numbers(c)).transpose()
}

fn check_positive(column: &str, values: &[f64], rule: &str) -> Result<(), DataProblem> {
    match values.iter().position(|v| *v <= 0.0) {
        Some(row) => Err(DataProblem::at(
            column,
            row,
            format!("{rule}, found {}", values[row]),
        )),
        None => Ok(()),
    }
}

/// offset + log(exposure) for each row.
fn combined_offset(
    data: &dyn Columns,
    offset: &Option<String>,
    exposure: &Option<String>,
) -> Result<Vec<f64>, DataProblem> {
    let n = data.rows();
    let mut total = optional_numbers(data, offset)?.unwrap_or_else(|| vec![0.0; n]);
    if let (Some(column), Some(values)) = (exposure, optional_numbers(data, exposure)?) {
        check_positive(column, &values, "exposure must be > 0")?;
        for (t, e) in total.iter_mut().zip(values) {
            *t += e.ln();
        }
    }
    Ok(total)
}

/// The signature type of each column the model reads at prediction time.
fn input_columns(
    formula: &Formula,
    design: &DesignSpec,
    spec: &GlmSpec,
    data: &RawFrame,
) -> Vec<ColumnSpec> {
    let mut out: Vec<ColumnSpec> = Vec::new();
    for factor in &design.factors {
        if out.iter().any(|c| c.name == factor.column) {
            continue;
        }
        let column_type = match &factor.kind {
            super::design::FactorKind::Numeric => ColumnType::Double,
            super::design::FactorKind::Categorical { .. } => categorical_type(data, &factor.column),
        };
        out.push(ColumnSpec {
            name: factor.column.clone(),
            column_type,
            required: true,
        });
    }
    debug_assert!(
        formula
            .predictor_columns()
            .iter()
            .all(|c| out.iter().any(|o| &o.name == c))
    );
    for column in [&spec.offset, &spec.exposure].into_iter().flatten() {
        if !out.iter().any(|c| &c.name == column) {
            out.push(ColumnSpec {
                name: column.clone(),
                column_type: ColumnType::Double,
                required: true,
            });
        }
    }
    out
}

fn categorical_type(data: &RawFrame, column: &str) -> ColumnType {
    let cells = data
        .columns
        .iter()
        .find(|(name, _)| name == column)
        .map(|(_, cells)| cells.as_slice())
        .unwrap_or(&[]);
    if cells.iter().all(|c| c.is_i64() || c.is_u64()) {
        ColumnType::Long
    } else if cells.iter().all(Value::is_number) {
        ColumnType::Double
    } else if cells.iter().all(Value::is_boolean) {
        ColumnType::Boolean
    } else {
        ColumnType::String
    }
}

/// Fit a GLM on `data` and return its config and prediction-time input columns.
pub fn fit_glm(
    spec: &GlmSpec,
    data: &RawFrame,
    options: FitOptions,
) -> Result<(GlmConfig, Vec<ColumnSpec>), GlmError> {
    let (family, link) = spec.family_and_link()?;
    let formula = Formula::parse(&spec.formula)?;
    if data.rows() == 0 {
        return Err(GlmError::Spec("the data has no rows".into()));
    }
    let n = data.rows();
    let (y, trials) = match formula.response.as_slice() {
        [successes, failures] => {
            if family != Family::Binomial {
                return Err(GlmError::Spec(
                    "a two-column response (successes + failures) needs the binomial family".into(),
                ));
            }
            let s = data.numbers(successes)?;
            let f = data.numbers(failures)?;
            let mut y = Vec::with_capacity(n);
            let mut trials = Vec::with_capacity(n);
            for row in 0..n {
                let total = s[row] + f[row];
                if s[row] < 0.0 || f[row] < 0.0 || total <= 0.0 {
                    return Err(DataProblem::at(
                        successes,
                        row,
                        "successes and failures must be >= 0 with a positive total",
                    )
                    .into());
                }
                y.push(s[row] / total);
                trials.push(total);
            }
            (y, trials)
        }
        [response] => (data.numbers(response)?, vec![1.0; n]),
        _ => {
            return Err(GlmError::Spec(
                "the response must be one column or two".into(),
            ));
        }
    };
    let response_column = formula.response[0].clone();
    if let Some(row) = y.iter().position(|v| family.check_response(*v).is_err()) {
        let rule = family
            .check_response(y[row])
            .err()
            .unwrap_or("is out of range");
        return Err(DataProblem::at(
            &response_column,
            row,
            format!("response {} {rule} for the {family} family", y[row]),
        )
        .into());
    }
    let var_weights = optional_numbers(data, &spec.var_weights)?.unwrap_or_else(|| vec![1.0; n]);
    let freq_weights = optional_numbers(data, &spec.freq_weights)?.unwrap_or_else(|| vec![1.0; n]);
    for (column, values) in [
        (&spec.var_weights, &var_weights),
        (&spec.freq_weights, &freq_weights),
    ] {
        if let Some(column) = column
            && let Some(row) = values.iter().position(|w| *w < 0.0)
        {
            return Err(DataProblem::at(column, row, "weights must be >= 0").into());
        }
    }
    let offset = combined_offset(data, &spec.offset, &spec.exposure)?;
    let design = DesignSpec::from_training(&formula, data)?;
    let x = design.matrix(data)?;
    let rank = matrix_rank(&x)?;
    if rank < x.cols {
        let dependent = first_dependent_column(&x)?.unwrap_or(x.cols - 1);
        return Err(GlmError::Singular {
            column: design.columns[dependent].name.clone(),
            rank,
            columns: x.cols,
        });
    }
    let fit_data = FitData {
        x: &x,
        y: &y,
        trials: &trials,
        var_weights: &var_weights,
        freq_weights: &freq_weights,
        offset: &offset,
    };
    let has_offset = spec.offset.is_some() || spec.exposure.is_some();
    let results = fit_and_summarise(
        &family,
        &link,
        &fit_data,
        design.column_names(),
        rank,
        has_offset,
        options,
    )?;
    let inputs = input_columns(&formula, &design, spec, data);
    Ok((
        GlmConfig {
            spec: spec.clone(),
            response: formula.response.clone(),
            design,
            results,
        },
        inputs,
    ))
}

/// A loaded GLM ready to predict.
struct GlmPipeline {
    interface: ModelInterface,
    config: GlmConfig,
    link: Link,
    signature: Signature,
}

fn params_schema() -> InputSchema {
    InputSchema {
        fields: vec![FieldSpec {
            name: "which".into(),
            description: "`mean` for the expected response, `linear` for the linear predictor (with offset and log exposure)".into(),
            kind: FieldKind::Choice {
                choices: vec!["mean".into(), "linear".into()],
            },
            default: Some(json!("mean")),
        }],
    }
}

/// Load a `tabular/glm` model from its manifest.
pub fn load(model: &ResolvedModel) -> Result<Arc<dyn Pipeline>, PipelineError> {
    let load_error = |message: String| PipelineError::Load {
        model: model.display_name(),
        message,
    };
    let config: GlmConfig = serde_json::from_value(model.manifest.config.clone())
        .map_err(|e| load_error(format!("manifest config is not a GLM: {e}")))?;
    let signature: Signature = serde_json::from_value(model.manifest.signature.clone())
        .map_err(|e| load_error(format!("manifest signature is invalid: {e}")))?;
    let (_, link) = config
        .spec
        .family_and_link()
        .map_err(|e| load_error(e.to_string()))?;
    if config.results.params.len() != config.design.columns.len() {
        return Err(load_error(format!(
            "{} parameters for {} design columns",
            config.results.params.len(),
            config.design.columns.len()
        )));
    }
    Ok(Arc::new(GlmPipeline {
        interface: ModelInterface {
            pipeline: PIPELINE_KIND.into(),
            inputs: InputSpec::Columns(signature.clone()),
            params: params_schema(),
            outputs: Signature {
                inputs: signature.outputs.clone(),
                outputs: vec![],
            },
        },
        config,
        link,
        signature,
    }))
}

impl Pipeline for GlmPipeline {
    fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    fn predict(&self, request: PredictRequest) -> Result<Prediction, PipelineError> {
        let params = self.interface.params.validate(&request.params)?;
        let PredictInput::Frame(raw) = request.input else {
            return Err(PipelineError::invalid(
                "input",
                ProblemKind::Malformed,
                "a GLM takes a table of rows (dataframe_split, dataframe_records, instances, inputs or CSV)",
            ));
        };
        let frame = raw.conform(&self.signature)?;
        let to_input_error = |p: DataProblem| {
            PipelineError::invalid(p.column.clone(), ProblemKind::Constraint, p.to_string())
        };
        let x = self.config.design.matrix(&frame).map_err(to_input_error)?;
        let offset = combined_offset(&frame, &self.config.spec.offset, &self.config.spec.exposure)
            .map_err(to_input_error)?;
        let beta = &self.config.results.params;
        let linear: Vec<f64> = (0..x.rows)
            .map(|i| (0..x.cols).map(|j| x.get(i, j) * beta[j]).sum::<f64>() + offset[i])
            .collect();
        let values = if params.get("which").and_then(Value::as_str) == Some("linear") {
            linear
        } else {
            linear.iter().map(|eta| self.link.inverse(*eta)).collect()
        };
        Ok(Prediction::Tensors(vec![Tensor::f64_vector(
            "predictions",
            values,
        )]))
    }
}
