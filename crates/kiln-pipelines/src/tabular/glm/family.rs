//! GLM families (variance, deviance, log-likelihood, starting values, allowed links)
//! with statsmodels' exact formulas, including its clipping constants.

use std::f64::consts::PI;
use std::fmt;

use libm::lgamma as ln_gamma;

use super::link::{EPS, Link};

/// An exponential-family distribution for the response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    Gaussian,
    Binomial,
    Poisson,
    Gamma,
    InverseGaussian,
    NegativeBinomial { alpha: f64 },
    Tweedie { var_power: f64 },
}

/// Per-observation data the family formulas need.
pub struct Observations<'a> {
    pub y: &'a [f64],
    pub var_weights: &'a [f64],
    pub freq_weights: &'a [f64],
    /// Binomial trials per row (1 for every other family and for 0/1 responses).
    pub trials: &'a [f64],
}

fn clean(x: f64) -> f64 {
    x.max(EPS)
}

impl Family {
    pub const NAMES: [&'static str; 7] = [
        "gaussian",
        "binomial",
        "poisson",
        "gamma",
        "inverse_gaussian",
        "negative_binomial",
        "tweedie",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Family::Gaussian => "gaussian",
            Family::Binomial => "binomial",
            Family::Poisson => "poisson",
            Family::Gamma => "gamma",
            Family::InverseGaussian => "inverse_gaussian",
            Family::NegativeBinomial { .. } => "negative_binomial",
            Family::Tweedie { .. } => "tweedie",
        }
    }

    /// The link statsmodels uses when none is given.
    pub fn default_link(&self) -> Link {
        match self {
            Family::Gaussian => Link::Identity,
            Family::Binomial => Link::Logit,
            Family::Poisson | Family::NegativeBinomial { .. } | Family::Tweedie { .. } => Link::Log,
            Family::Gamma => Link::InversePower,
            Family::InverseGaussian => Link::InverseSquared,
        }
    }

    /// Whether statsmodels accepts `link` for this family.
    pub fn allows(&self, link: &Link) -> bool {
        use Link::*;
        match self {
            Family::Gaussian => matches!(link, Log | Identity | InversePower),
            Family::Binomial => matches!(
                link,
                Logit | Probit | Cauchy | Log | LogC | CLogLog | LogLog | Identity
            ),
            Family::Poisson => matches!(link, Log | Identity | Sqrt),
            Family::Gamma => matches!(link, Log | Identity | InversePower),
            Family::InverseGaussian => {
                matches!(link, InverseSquared | InversePower | Identity | Log)
            }
            Family::NegativeBinomial { .. } => {
                matches!(link, Log | CLogLog | Identity | NegativeBinomial(_))
                    || link.power().is_some()
            }
            Family::Tweedie { .. } => matches!(link, Log) || link.power().is_some(),
        }
    }

    /// Names of the links this family accepts, for error messages.
    pub fn allowed_link_names(&self) -> Vec<&'static str> {
        Link::NAMES
            .iter()
            .copied()
            .filter(|name| {
                Link::from_name(name, Some(2.0), 1.0).is_some_and(|link| self.allows(&link))
            })
            .collect()
    }

    /// Whether the dispersion is fixed at 1 (otherwise estimated by Pearson X2).
    pub fn fixed_scale(&self) -> bool {
        matches!(
            self,
            Family::Binomial | Family::Poisson | Family::NegativeBinomial { .. }
        )
    }

    /// V(mu).
    pub fn variance(&self, mu: f64) -> f64 {
        match self {
            Family::Gaussian => 1.0,
            Family::Binomial => {
                let p = mu.clamp(EPS, 1.0 - EPS);
                p * (1.0 - p)
            }
            Family::Poisson => mu.abs(),
            Family::Gamma => mu.abs().powi(2),
            Family::InverseGaussian => mu.abs().powi(3),
            Family::NegativeBinomial { alpha } => {
                let p = mu.max(EPS);
                p + alpha * p * p
            }
            Family::Tweedie { var_power } => mu.abs().powf(*var_power),
        }
    }

    /// statsmodels' `starting_mu`.
    pub fn starting_mu(&self, y: &[f64]) -> Vec<f64> {
        match self {
            Family::Binomial => y.iter().map(|v| (v + 0.5) / 2.0).collect(),
            _ => {
                let mean = y.iter().sum::<f64>() / y.len() as f64;
                y.iter().map(|v| (v + mean) / 2.0).collect()
            }
        }
    }

    /// Unit deviance of one observation (before weights), `trials` for Binomial.
    fn unit_deviance(&self, y: f64, mu: f64, trials: f64) -> f64 {
        match self {
            Family::Gaussian => (y - mu).powi(2),
            Family::Binomial => {
                2.0 * trials
                    * (y * clean(y / (mu + 1e-20)).ln()
                        + (1.0 - y) * clean((1.0 - y) / (1.0 - mu + 1e-20)).ln())
            }
            Family::Poisson => 2.0 * (y * clean(y / mu).ln() - (y - mu)),
            Family::Gamma => 2.0 * (-clean(y / mu).ln() + (y - mu) / mu),
            Family::InverseGaussian => (y - mu).powi(2) / (y * mu * mu),
            Family::NegativeBinomial { alpha } => {
                let r = 1.0 / alpha;
                2.0 * (y * clean(y / mu).ln() - (y + r) * ((y + r) / (mu + r)).ln())
            }
            Family::Tweedie { var_power: p } => {
                let p = *p;
                if p == 1.0 {
                    2.0 * if y == 0.0 {
                        mu
                    } else {
                        y * (y / mu).ln() + (mu - y)
                    }
                } else if p == 2.0 {
                    2.0 * ((y - mu) / mu - (clean(y) / mu).ln())
                } else {
                    2.0 * (y.powf(2.0 - p) / ((1.0 - p) * (2.0 - p))
                        - y * mu.powf(1.0 - p) / (1.0 - p)
                        + mu.powf(2.0 - p) / (2.0 - p))
                }
            }
        }
    }

    /// `sum(unit_dev * fw * vw) / scale`.
    pub fn deviance(&self, obs: &Observations, mu: &[f64], scale: f64) -> f64 {
        (0..mu.len())
            .map(|i| {
                self.unit_deviance(obs.y[i], mu[i], obs.trials[i])
                    * obs.freq_weights[i]
                    * obs.var_weights[i]
                    / scale
            })
            .sum()
    }

    /// Log-likelihood of one observation; NaN where statsmodels gives NaN.
    fn loglike_obs(&self, y: f64, mu: f64, var_weight: f64, trials: f64, scale: f64) -> f64 {
        match self {
            Family::Gaussian => {
                (-var_weight * (y - mu).powi(2) / scale
                    - (scale / var_weight).ln()
                    - (2.0 * PI).ln())
                    / 2.0
            }
            Family::Binomial => {
                let n = trials;
                let k = y * n;
                (ln_gamma(n + 1.0) - ln_gamma(k + 1.0) - ln_gamma(n - k + 1.0)
                    + k * ((mu + 1e-20) / (1.0 - mu + 1e-20)).ln()
                    + n * (1.0 - mu + 1e-20).ln())
                    * var_weight
            }
            Family::Poisson => var_weight / scale * (y * mu.ln() - mu - ln_gamma(y + 1.0)),
            Family::Gamma => {
                let r = clean(y / mu);
                let ws = var_weight / scale;
                ws * (ws * r).ln() - ws * r - ln_gamma(ws) - y.ln()
            }
            Family::InverseGaussian => {
                (-var_weight * (y - mu).powi(2) / (scale * y * mu * mu)
                    - (scale * y.powi(3) / var_weight).ln()
                    - (2.0 * PI).ln())
                    / 2.0
            }
            Family::NegativeBinomial { alpha } => {
                let r = 1.0 / alpha;
                var_weight / scale
                    * (y * (alpha * mu).ln() - (y + r) * (1.0 + alpha * mu).ln() + ln_gamma(y + r)
                        - ln_gamma(r)
                        - ln_gamma(y + 1.0))
            }
            Family::Tweedie { var_power: p } => {
                let p = *p;
                if p == 1.0 {
                    Family::Poisson.loglike_obs(y, mu, var_weight, trials, scale)
                } else if p == 2.0 {
                    Family::Gamma.loglike_obs(y, mu, var_weight, trials, scale)
                } else if !(1.0..=2.0).contains(&p) {
                    f64::NAN
                } else {
                    tweedie_loglike(y, mu, p, scale / var_weight)
                }
            }
        }
    }

    /// `sum(loglike_obs * fw)`.
    pub fn loglike(&self, obs: &Observations, mu: &[f64], scale: f64) -> f64 {
        (0..mu.len())
            .map(|i| {
                self.loglike_obs(obs.y[i], mu[i], obs.var_weights[i], obs.trials[i], scale)
                    * obs.freq_weights[i]
            })
            .sum()
    }

    /// Check the response is in the family's support; returns the rule broken.
    pub fn check_response(&self, y: f64) -> Result<(), &'static str> {
        let ok = match self {
            Family::Gaussian => true,
            Family::Binomial => (0.0..=1.0).contains(&y),
            Family::Poisson | Family::NegativeBinomial { .. } => y >= 0.0,
            Family::Gamma | Family::InverseGaussian => y > 0.0,
            Family::Tweedie { var_power } => {
                if *var_power >= 2.0 {
                    y > 0.0
                } else {
                    y >= 0.0
                }
            }
        };
        if ok {
            Ok(())
        } else {
            Err(match self {
                Family::Binomial => "must be between 0 and 1 (or give successes + failures)",
                Family::Gamma | Family::InverseGaussian => "must be > 0",
                Family::Tweedie { .. } => "must be > 0 for var_power >= 2, >= 0 otherwise",
                _ => "must be >= 0",
            })
        }
    }
}

/// Tweedie log-density for 1 < p < 2 (compound Poisson–gamma), via the series
/// of Dunn & Smyth summed in log space; matches `scipy.special.log_wright_bessel`.
fn tweedie_loglike(y: f64, mu: f64, p: f64, phi: f64) -> f64 {
    let theta = mu.powf(1.0 - p) / (1.0 - p);
    let kappa = mu.powf(2.0 - p) / (2.0 - p);
    let base = (y * theta - kappa) / phi;
    if y == 0.0 {
        return base;
    }
    let a = (2.0 - p) / (1.0 - p);
    let x = ((p - 1.0) * phi / y).powf(a) / ((2.0 - p) * phi);
    base - y.ln() + log_wright_bessel_zero_b(-a, x)
}

/// `log(sum_{j>=1} x^j / (j! Gamma(a j)))` for a > 0, x > 0.
fn log_wright_bessel_zero_b(a: f64, x: f64) -> f64 {
    let log_x = x.ln();
    let term = |j: f64| j * log_x - ln_gamma(j + 1.0) - ln_gamma(a * j);
    // The terms are unimodal in j; find the peak, then sum outward until negligible.
    let peak_estimate = (x.powf(1.0 / (1.0 + a))).max(1.0);
    let mut peak = peak_estimate.round().max(1.0);
    while term(peak + 1.0) > term(peak) {
        peak += 1.0;
    }
    while peak > 1.0 && term(peak - 1.0) > term(peak) {
        peak -= 1.0;
    }
    let top = term(peak);
    let mut sum = 1.0;
    let mut j = peak + 1.0;
    loop {
        let ratio = (term(j) - top).exp();
        sum += ratio;
        if ratio < 1e-17 {
            break;
        }
        j += 1.0;
    }
    let mut j = peak - 1.0;
    while j >= 1.0 {
        let ratio = (term(j) - top).exp();
        sum += ratio;
        if ratio < 1e-17 {
            break;
        }
        j -= 1.0;
    }
    top + sum.ln()
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Family::NegativeBinomial { alpha } => write!(f, "NegativeBinomial(alpha={alpha})"),
            Family::Tweedie { var_power } => write!(f, "Tweedie(var_power={var_power})"),
            Family::Gaussian => f.write_str("Gaussian"),
            Family::Binomial => f.write_str("Binomial"),
            Family::Poisson => f.write_str("Poisson"),
            Family::Gamma => f.write_str("Gamma"),
            Family::InverseGaussian => f.write_str("InverseGaussian"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wright_bessel_series_matches_direct_sum() {
        // Direct summation is exact enough for moderate x.
        for (a, x) in [(1.0, 0.5), (1.0, 7.0), (4.0, 3.0), (0.25, 2.0)] {
            let direct: f64 = (1..200)
                .map(|j| {
                    let j = j as f64;
                    (j * f64::ln(x) - ln_gamma(j + 1.0) - ln_gamma(a * j)).exp()
                })
                .sum();
            let ours = log_wright_bessel_zero_b(a, x);
            assert!(
                (ours - direct.ln()).abs() < 1e-12,
                "a={a} x={x}: {ours} vs {}",
                direct.ln()
            );
        }
    }

    #[test]
    fn tweedie_reduces_to_poisson_and_gamma_at_the_ends() {
        let obs_p = Family::Tweedie { var_power: 1.0 }.loglike_obs(3.0, 2.5, 1.0, 1.0, 1.0);
        let poisson = Family::Poisson.loglike_obs(3.0, 2.5, 1.0, 1.0, 1.0);
        assert_eq!(obs_p, poisson);
        assert!(
            Family::Tweedie { var_power: 2.5 }
                .loglike_obs(1.0, 1.0, 1.0, 1.0, 1.0)
                .is_nan()
        );
    }

    #[test]
    fn links_allowed_per_family_follow_statsmodels() {
        assert_eq!(
            Family::Poisson.allowed_link_names(),
            vec!["identity", "log", "sqrt"]
        );
        assert!(!Family::Gamma.allows(&Link::Logit));
        assert!(Family::InverseGaussian.allows(&Link::InverseSquared));
        assert!(Family::Tweedie { var_power: 1.5 }.allows(&Link::Power(0.5)));
    }
}
