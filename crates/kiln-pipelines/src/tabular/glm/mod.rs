//! Generalized linear models: formulas, patsy-compatible design matrices, IRLS with
//! statsmodels' semantics, inference statistics, and the serving pipeline.

mod columns;
mod design;
mod family;
mod fit;
mod formula;
mod link;
mod model;
mod results;

pub use columns::{Columns, DataProblem};
pub use design::{DesignMatrix, DesignSpec};
pub use family::Family;
pub use fit::{FitError, FitOptions};
pub use formula::{Formula, FormulaError};
pub use link::Link;
pub use model::{GlmConfig, GlmError, GlmSpec, PIPELINE_KIND, fit_glm, load};
pub use results::GlmResults;
