//! Iteratively reweighted least squares exactly as statsmodels' `GLM.fit()` runs it
//! (start values, lagged scaled-deviance convergence, weights of the last solve),
//! with weighted least squares through faer's SVD.

use faer::Mat;

use super::design::DesignMatrix;
use super::family::{Family, Observations};
use super::link::Link;

/// Inputs to a fit, one entry per row.
pub struct FitData<'a> {
    pub x: &'a DesignMatrix,
    pub y: &'a [f64],
    pub trials: &'a [f64],
    pub var_weights: &'a [f64],
    pub freq_weights: &'a [f64],
    /// offset + log(exposure); all zeros when neither was given.
    pub offset: &'a [f64],
}

impl FitData<'_> {
    pub fn observations(&self) -> Observations<'_> {
        Observations {
            y: self.y,
            var_weights: self.var_weights,
            freq_weights: self.freq_weights,
            trials: self.trials,
        }
    }

    /// `sum(freq_weights)`: the weighted number of observations.
    pub fn weighted_nobs(&self) -> f64 {
        self.freq_weights.iter().sum()
    }

    fn iweight(&self, i: usize) -> f64 {
        self.freq_weights[i] * self.var_weights[i]
    }
}

/// IRLS controls (statsmodels' defaults: 100 iterations, deviance tolerance 1e-8).
#[derive(Debug, Clone, Copy)]
pub struct FitOptions {
    pub max_iter: usize,
    pub tol: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            max_iter: 100,
            tol: 1e-8,
        }
    }
}

/// Why IRLS failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error(
        "the deviance at the starting values is not finite; check the response against the family and link"
    )]
    NonFiniteStart,
    #[error(
        "the weighted least-squares step produced non-finite values at iteration {0} (the link may map the mean outside the family's range)"
    )]
    NonFiniteStep(usize),
    #[error(
        "IRLS did not converge in {iterations} iterations (last deviance change {last_change:.3e}, tolerance {tol:e}); raise --max-iter or simplify the model"
    )]
    NotConverged {
        iterations: usize,
        last_change: f64,
        tol: f64,
    },
    #[error("linear algebra failed: {0}")]
    LinearAlgebra(String),
}

/// What IRLS produced.
#[derive(Debug, Clone)]
pub struct IrlsOutcome {
    pub params: Vec<f64>,
    /// `(X' W X)^-1` with the weights of the last solve, row-major k×k.
    pub normalized_cov: Vec<f64>,
    pub mu: Vec<f64>,
    pub iterations: usize,
    pub converged: bool,
    pub last_change: f64,
}

/// A thin SVD `A = U diag(s) V'` of an n×k matrix.
struct ThinSvd {
    u: Mat<f64>,
    s: Vec<f64>,
    v: Mat<f64>,
}

fn thin_svd(a: &Mat<f64>) -> Result<ThinSvd, FitError> {
    let svd = a
        .thin_svd()
        .map_err(|e| FitError::LinearAlgebra(format!("SVD did not converge: {e:?}")))?;
    let s = svd.S().column_vector();
    Ok(ThinSvd {
        u: svd.U().to_owned(),
        s: (0..s.nrows()).map(|i| s[i]).collect(),
        v: svd.V().to_owned(),
    })
}

/// Numerical rank with numpy's default tolerance `s_max * max(n, k) * eps`.
pub fn matrix_rank(x: &DesignMatrix) -> Result<usize, FitError> {
    let a = Mat::from_fn(x.rows, x.cols, |i, j| x.get(i, j));
    let s = thin_svd(&a)?.s;
    let s_max = s.iter().copied().fold(0.0, f64::max);
    let tol = s_max * (x.rows.max(x.cols) as f64) * f64::EPSILON;
    Ok(s.iter().filter(|v| **v > tol).count())
}

/// The first column that is a linear combination of the columns before it.
pub fn first_dependent_column(x: &DesignMatrix) -> Result<Option<usize>, FitError> {
    for j in 0..x.cols {
        let prefix = DesignMatrix {
            rows: x.rows,
            cols: j + 1,
            values: (0..x.rows)
                .flat_map(|i| (0..=j).map(move |c| (i, c)))
                .map(|(i, c)| x.get(i, c))
                .collect(),
        };
        if matrix_rank(&prefix)? < j + 1 {
            return Ok(Some(j));
        }
    }
    Ok(None)
}

/// Weighted least squares: beta = pinv(sqrt(w) X) sqrt(w) z, and (X'WX)^-1.
fn weighted_least_squares(
    x: &DesignMatrix,
    z: &[f64],
    w: &[f64],
) -> Result<(Vec<f64>, Vec<f64>), FitError> {
    let (n, k) = (x.rows, x.cols);
    let a = Mat::from_fn(n, k, |i, j| w[i].sqrt() * x.get(i, j));
    let ThinSvd { u, s, v } = thin_svd(&a)?;
    let s_max = s.iter().copied().fold(0.0, f64::max);
    let cutoff = 1e-15 * s_max;
    let inv: Vec<f64> = s
        .iter()
        .map(|v| if *v > cutoff { 1.0 / v } else { 0.0 })
        .collect();
    // c = diag(1/s) U' b
    let mut c = vec![0.0; k];
    for (j, cj) in c.iter_mut().enumerate() {
        let mut dot = 0.0;
        for i in 0..n {
            dot += u[(i, j)] * w[i].sqrt() * z[i];
        }
        *cj = dot * inv[j];
    }
    let mut beta = vec![0.0; k];
    for (r, b) in beta.iter_mut().enumerate() {
        *b = (0..k).map(|j| v[(r, j)] * c[j]).sum();
    }
    let mut cov = vec![0.0; k * k];
    for r in 0..k {
        for q in 0..k {
            cov[r * k + q] = (0..k)
                .map(|j| v[(r, j)] * v[(q, j)] * inv[j] * inv[j])
                .sum();
        }
    }
    Ok((beta, cov))
}

fn linear_predictor(x: &DesignMatrix, params: &[f64], offset: &[f64]) -> Vec<f64> {
    (0..x.rows)
        .map(|i| (0..x.cols).map(|j| x.get(i, j) * params[j]).sum::<f64>() + offset[i])
        .collect()
}

/// Pearson dispersion used during IRLS: `sum((y-mu)^2 * iw / V(mu)) / df_resid`,
/// or 1 for the fixed-scale families.
pub fn estimate_scale(family: &Family, data: &FitData, mu: &[f64], df_resid: f64) -> f64 {
    if family.fixed_scale() {
        return 1.0;
    }
    let chi2: f64 = (0..mu.len())
        .map(|i| (data.y[i] - mu[i]).powi(2) * data.iweight(i) / family.variance(mu[i]))
        .sum();
    chi2 / df_resid
}

/// Run IRLS. `start` gives starting parameters (as statsmodels' `start_params`);
/// otherwise the family's starting mean is used.
pub fn irls(
    family: &Family,
    link: &Link,
    data: &FitData,
    start: Option<&[f64]>,
    df_resid: f64,
    options: FitOptions,
) -> Result<IrlsOutcome, FitError> {
    let obs = data.observations();
    let (mut lin_pred, mut mu) = match start {
        Some(params) => {
            let lin_pred = linear_predictor(data.x, params, data.offset);
            let mu = lin_pred.iter().map(|e| link.inverse(*e)).collect();
            (lin_pred, mu)
        }
        None => {
            let mu = family.starting_mu(data.y);
            let lin_pred = mu.iter().map(|m| link.link(*m)).collect();
            (lin_pred, mu)
        }
    };
    let mut scale = estimate_scale(family, data, &mu, df_resid);
    let mut previous = family.deviance(&obs, &mu, scale);
    if !previous.is_finite() {
        return Err(FitError::NonFiniteStart);
    }
    let n = data.y.len();
    let mut result: Option<(Vec<f64>, Vec<f64>)> = None;
    let mut converged = false;
    let mut last_change = f64::INFINITY;
    let mut iterations = 0;
    for iteration in 0..options.max_iter {
        iterations = iteration + 1;
        let mut w = vec![0.0; n];
        let mut z = vec![0.0; n];
        for i in 0..n {
            let derivative = link.derivative(mu[i]);
            w[i] = data.iweight(i) * data.trials[i]
                / (derivative * derivative * family.variance(mu[i]));
            z[i] = lin_pred[i] + derivative * (data.y[i] - mu[i]) - data.offset[i];
        }
        if w.iter().chain(z.iter()).any(|v| !v.is_finite()) {
            return Err(FitError::NonFiniteStep(iterations));
        }
        let (beta, cov) = weighted_least_squares(data.x, &z, &w)?;
        lin_pred = linear_predictor(data.x, &beta, data.offset);
        mu = lin_pred.iter().map(|e| link.inverse(*e)).collect();
        let deviance = family.deviance(&obs, &mu, scale);
        scale = estimate_scale(family, data, &mu, df_resid);
        last_change = (previous - deviance).abs();
        result = Some((beta, cov));
        // np.allclose(previous, deviance, atol=tol, rtol=0); NaN never converges.
        if last_change <= options.tol {
            converged = true;
            break;
        }
        previous = deviance;
    }
    let (params, normalized_cov) = result.ok_or(FitError::NonFiniteStep(0))?;
    let mu = linear_predictor(data.x, &params, data.offset)
        .iter()
        .map(|e| link.inverse(*e))
        .collect();
    Ok(IrlsOutcome {
        params,
        normalized_cov,
        mu,
        iterations,
        converged,
        last_change,
    })
}
