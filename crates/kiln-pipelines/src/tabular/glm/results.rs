//! Fitted-model statistics with statsmodels' definitions (normal-based inference,
//! null deviance, profile scale for Gaussian/identity llf, bic = bic_llf) and the
//! printed summary table.

use libm::erfc;
use serde::{Deserialize, Serialize};

use super::family::Family;
use super::fit::{FitData, FitError, FitOptions, IrlsOutcome, estimate_scale, irls};
use super::link::Link;

/// `scipy.stats.norm.ppf(0.975)`: the 95% two-sided normal quantile.
pub const Z_975: f64 = 1.959_963_984_540_054;

/// Everything `kiln glm fit` reports, stored in the model's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlmResults {
    pub param_names: Vec<String>,
    pub params: Vec<f64>,
    pub bse: Vec<f64>,
    /// z statistics (`params / bse`); statsmodels calls them `tvalues`.
    pub zvalues: Vec<f64>,
    pub pvalues: Vec<f64>,
    /// 95% intervals, `[lower, upper]` per parameter.
    pub conf_int: Vec<[f64; 2]>,
    /// `cov_params()` row-major, k×k.
    pub cov_params: Vec<f64>,
    pub deviance: f64,
    pub null_deviance: f64,
    pub pearson_chi2: f64,
    /// `None` where statsmodels gives NaN (Tweedie outside 1 <= p <= 2).
    pub llf: Option<f64>,
    pub aic: Option<f64>,
    /// statsmodels 0.15's `bic` (= `bic_llf`).
    pub bic: Option<f64>,
    pub bic_deviance: f64,
    pub scale: f64,
    pub df_model: f64,
    pub df_resid: f64,
    pub nobs: usize,
    pub iterations: usize,
    pub converged: bool,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Fit the model and compute every statistic. `rank` is the design's rank.
pub fn fit_and_summarise(
    family: &Family,
    link: &Link,
    data: &FitData,
    param_names: Vec<String>,
    rank: usize,
    has_offset: bool,
    options: FitOptions,
) -> Result<GlmResults, FitError> {
    let wnobs = data.weighted_nobs();
    let df_model = rank as f64 - 1.0;
    let df_resid = wnobs - rank as f64;
    let outcome = irls(family, link, data, None, df_resid, options)?;
    if !outcome.converged {
        return Err(FitError::NotConverged {
            iterations: outcome.iterations,
            last_change: outcome.last_change,
            tol: options.tol,
        });
    }
    let IrlsOutcome {
        params,
        normalized_cov,
        mu,
        iterations,
        ..
    } = outcome;
    let obs = data.observations();
    let k = params.len();
    let scale = estimate_scale(family, data, &mu, df_resid);
    let cov_params: Vec<f64> = normalized_cov.iter().map(|v| v * scale).collect();
    let bse: Vec<f64> = (0..k).map(|j| cov_params[j * k + j].sqrt()).collect();
    let zvalues: Vec<f64> = params.iter().zip(&bse).map(|(p, s)| p / s).collect();
    let pvalues = zvalues
        .iter()
        .map(|z| erfc(z.abs() / std::f64::consts::SQRT_2))
        .collect();
    let conf_int = params
        .iter()
        .zip(&bse)
        .map(|(p, s)| [p - Z_975 * s, p + Z_975 * s])
        .collect();
    let deviance = family.deviance(&obs, &mu, 1.0);
    let pearson_chi2 = (0..mu.len())
        .map(|i| {
            (data.y[i] - mu[i]).powi(2) / family.variance(mu[i])
                * data.freq_weights[i]
                * data.var_weights[i]
                * data.trials[i]
        })
        .sum();
    let null_deviance = null_deviance(family, link, data, has_offset, options)?;
    let llf_scale = if *family == Family::Gaussian && link.power() == Some(1.0) {
        (0..mu.len())
            .map(|i| (data.y[i] - mu[i]).powi(2) * data.freq_weights[i] * data.var_weights[i])
            .sum::<f64>()
            / wnobs
    } else {
        scale
    };
    let llf = finite(family.loglike(&obs, &mu, llf_scale));
    let k_params = df_model + 1.0;
    Ok(GlmResults {
        param_names,
        bse,
        zvalues,
        pvalues,
        conf_int,
        cov_params,
        deviance,
        null_deviance,
        pearson_chi2,
        llf,
        aic: llf.map(|l| -2.0 * l + 2.0 * k_params),
        bic: llf.map(|l| -2.0 * l + k_params * wnobs.ln()),
        bic_deviance: deviance - df_resid * wnobs.ln(),
        scale,
        df_model,
        df_resid,
        nobs: data.y.len(),
        iterations,
        converged: true,
        params,
    })
}

/// Deviance of the intercept-only model, as statsmodels computes `null_deviance`.
fn null_deviance(
    family: &Family,
    link: &Link,
    data: &FitData,
    has_offset: bool,
    options: FitOptions,
) -> Result<f64, FitError> {
    let n = data.y.len();
    let obs = data.observations();
    if !has_offset {
        let weights: Vec<f64> = (0..n)
            .map(|i| data.freq_weights[i] * data.var_weights[i] * data.trials[i])
            .collect();
        let mean =
            (0..n).map(|i| weights[i] * data.y[i]).sum::<f64>() / weights.iter().sum::<f64>();
        return Ok(family.deviance(&obs, &vec![mean; n], 1.0));
    }
    let ones = super::design::DesignMatrix {
        rows: n,
        cols: 1,
        values: vec![1.0; n],
    };
    let null_data = FitData { x: &ones, ..*data };
    let start = [link.link(data.y.iter().sum::<f64>() / n as f64)];
    let outcome = irls(
        family,
        link,
        &null_data,
        Some(&start),
        data.weighted_nobs() - 1.0,
        options,
    )?;
    Ok(family.deviance(&obs, &outcome.mu, 1.0))
}

fn format_stat(x: f64) -> String {
    if x.abs() >= 1e5 || (x != 0.0 && x.abs() < 1e-3) {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

impl GlmResults {
    /// A statsmodels-style summary table.
    pub fn summary(&self, response: &str, family: &Family, link: &Link) -> String {
        let rule = "=".repeat(78);
        let mut out = String::new();
        out.push_str(&format!(
            "{:^78}\n{rule}\n",
            "Generalized Linear Model Regression Results"
        ));
        let opt = |x: Option<f64>| x.map(format_stat).unwrap_or_else(|| "nan".into());
        let left = [
            ("Dep. Variable:", response.to_string()),
            ("Model:", "GLM".into()),
            ("Model Family:", family.to_string()),
            ("Link Function:", link.to_string()),
            ("Method:", "IRLS".into()),
            ("No. Iterations:", self.iterations.to_string()),
            ("Covariance Type:", "nonrobust".into()),
        ];
        let right = [
            ("No. Observations:", self.nobs.to_string()),
            ("Df Residuals:", format!("{}", self.df_resid)),
            ("Df Model:", format!("{}", self.df_model)),
            ("Scale:", format!("{:.4}", self.scale)),
            ("Log-Likelihood:", opt(self.llf)),
            ("Deviance:", format_stat(self.deviance)),
            ("Pearson chi2:", format_stat(self.pearson_chi2)),
        ];
        for ((l, lv), (r, rv)) in left.iter().zip(right.iter()) {
            out.push_str(&format!("{l:<16}{lv:>22}   {r:<18}{rv:>19}\n"));
        }
        out.push_str(&format!(
            "{:<16}{:>22}   {:<18}{:>19}\n",
            "AIC:",
            opt(self.aic),
            "BIC:",
            opt(self.bic)
        ));
        out.push_str(&format!(
            "{:<16}{:>22}   {:<18}{:>19}\n",
            "Null deviance:",
            format_stat(self.null_deviance),
            "Converged:",
            self.converged
        ));
        out.push_str(&format!("{rule}\n"));
        let width = self
            .param_names
            .iter()
            .map(|n| n.len())
            .max()
            .unwrap_or(9)
            .max(9);
        out.push_str(&format!(
            "{:<width$} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "", "coef", "std err", "z", "P>|z|", "[0.025", "0.975]"
        ));
        out.push_str(&format!("{}\n", "-".repeat(width + 66)));
        for j in 0..self.params.len() {
            out.push_str(&format!(
                "{:<width$} {:>10.4} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}\n",
                self.param_names[j],
                self.params[j],
                self.bse[j],
                self.zvalues[j],
                self.pvalues[j],
                self.conf_int[j][0],
                self.conf_int[j][1]
            ));
        }
        out.push_str(&format!("{rule}\n"));
        out
    }
}
