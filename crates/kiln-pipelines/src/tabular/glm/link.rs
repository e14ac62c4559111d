//! GLM link functions with statsmodels' exact formulas and clipping.

use std::f64::consts::PI;
use std::fmt;

/// `np.finfo(float).eps`, statsmodels' clipping bound.
pub const EPS: f64 = f64::EPSILON;

/// A link function g with mean `mu = g^-1(eta)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Link {
    Identity,
    Log,
    Logit,
    Probit,
    Cauchy,
    CLogLog,
    LogLog,
    LogC,
    Sqrt,
    InversePower,
    InverseSquared,
    /// `mu^p`.
    Power(f64),
    /// `log(mu / (mu + 1/alpha))`.
    NegativeBinomial(f64),
}

fn clip01(p: f64) -> f64 {
    p.clamp(EPS, 1.0 - EPS)
}

/// Standard normal density.
fn normal_pdf(x: f64) -> f64 {
    (-x * x / 2.0).exp() / (2.0 * PI).sqrt()
}

/// Standard normal CDF via `erfc` (musl's, accurate to an ulp in both tails).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Standard normal quantile to double precision, for `EPS <= p <= 1 - EPS`:
/// Abramowitz & Stegun 26.2.23 (error < 4.5e-4) polished by Halley steps on
/// `normal_cdf(x) - p`, as precise as scipy's `ndtri`.
pub fn normal_quantile(p: f64) -> f64 {
    let tail = p.min(1.0 - p);
    let t = (-2.0 * tail.ln()).sqrt();
    let upper = t
        - (2.515517 + 0.802853 * t + 0.010328 * t * t)
            / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t);
    let mut x = if p < 0.5 { -upper } else { upper };
    for _ in 0..8 {
        let error = normal_cdf(x) - p;
        let u = error / normal_pdf(x);
        let step = u / (1.0 + x * u / 2.0);
        x -= step;
        if step.abs() <= 1e-16 * x.abs().max(1.0) {
            break;
        }
    }
    x
}

impl Link {
    /// The names accepted on the command line (`power` takes `--link-power`,
    /// `nbinom` the family's alpha).
    pub const NAMES: [&'static str; 13] = [
        "identity",
        "log",
        "logit",
        "probit",
        "cauchy",
        "cloglog",
        "loglog",
        "logc",
        "sqrt",
        "inverse_power",
        "inverse_squared",
        "power",
        "nbinom",
    ];

    /// Parse a link name; `power` and `nbinom` need their parameter.
    pub fn from_name(name: &str, power: Option<f64>, alpha: f64) -> Option<Link> {
        Some(match name {
            "identity" => Link::Identity,
            "log" => Link::Log,
            "logit" => Link::Logit,
            "probit" => Link::Probit,
            "cauchy" => Link::Cauchy,
            "cloglog" => Link::CLogLog,
            "loglog" => Link::LogLog,
            "logc" => Link::LogC,
            "sqrt" => Link::Sqrt,
            "inverse_power" => Link::InversePower,
            "inverse_squared" => Link::InverseSquared,
            "power" => Link::Power(power?),
            "nbinom" => Link::NegativeBinomial(alpha),
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Link::Identity => "identity",
            Link::Log => "log",
            Link::Logit => "logit",
            Link::Probit => "probit",
            Link::Cauchy => "cauchy",
            Link::CLogLog => "cloglog",
            Link::LogLog => "loglog",
            Link::LogC => "logc",
            Link::Sqrt => "sqrt",
            Link::InversePower => "inverse_power",
            Link::InverseSquared => "inverse_squared",
            Link::Power(_) => "power",
            Link::NegativeBinomial(_) => "nbinom",
        }
    }

    /// The power for the power-family links (identity is power 1).
    pub fn power(&self) -> Option<f64> {
        match self {
            Link::Identity => Some(1.0),
            Link::Sqrt => Some(0.5),
            Link::InversePower => Some(-1.0),
            Link::InverseSquared => Some(-2.0),
            Link::Power(p) => Some(*p),
            _ => None,
        }
    }

    /// g(mu).
    pub fn link(&self, mu: f64) -> f64 {
        match self {
            Link::Log => mu.max(EPS).ln(),
            Link::Logit => {
                let p = clip01(mu);
                (p / (1.0 - p)).ln()
            }
            Link::Probit => normal_quantile(clip01(mu)),
            Link::Cauchy => (PI * (clip01(mu) - 0.5)).tan(),
            Link::CLogLog => (-(1.0 - clip01(mu)).ln()).ln(),
            Link::LogLog => -(-clip01(mu).ln()).ln(),
            Link::LogC => (1.0 - clip01(mu)).ln(),
            Link::NegativeBinomial(alpha) => {
                let p = mu.max(EPS);
                (p / (p + 1.0 / alpha)).ln()
            }
            Link::Identity
            | Link::Sqrt
            | Link::InversePower
            | Link::InverseSquared
            | Link::Power(_) => {
                let p = self.power().unwrap_or(1.0);
                if p == 1.0 { mu } else { mu.powf(p) }
            }
        }
    }

    /// g^-1(eta), never clipped (as statsmodels).
    pub fn inverse(&self, eta: f64) -> f64 {
        match self {
            Link::Log => eta.exp(),
            Link::Logit => 1.0 / (1.0 + (-eta).exp()),
            Link::Probit => normal_cdf(eta),
            Link::Cauchy => 0.5 + eta.atan() / PI,
            Link::CLogLog => 1.0 - (-eta.exp()).exp(),
            Link::LogLog => (-(-eta).exp()).exp(),
            Link::LogC => 1.0 - eta.exp(),
            Link::NegativeBinomial(alpha) => -1.0 / (alpha * (1.0 - (-eta).exp())),
            Link::Identity
            | Link::Sqrt
            | Link::InversePower
            | Link::InverseSquared
            | Link::Power(_) => {
                let p = self.power().unwrap_or(1.0);
                if p == 1.0 { eta } else { eta.powf(1.0 / p) }
            }
        }
    }

    /// g'(mu).
    pub fn derivative(&self, mu: f64) -> f64 {
        match self {
            Link::Log => 1.0 / mu.max(EPS),
            Link::Logit => {
                let p = clip01(mu);
                1.0 / (p * (1.0 - p))
            }
            Link::Probit => 1.0 / normal_pdf(normal_quantile(clip01(mu))),
            Link::Cauchy => {
                let t = (PI * (clip01(mu) - 0.5)).tan();
                PI * (1.0 + t * t)
            }
            Link::CLogLog => {
                let p = clip01(mu);
                1.0 / ((p - 1.0) * (1.0 - p).ln())
            }
            Link::LogLog => {
                let p = clip01(mu);
                -1.0 / (p * p.ln())
            }
            Link::LogC => -1.0 / (1.0 - clip01(mu)),
            Link::NegativeBinomial(alpha) => 1.0 / (mu + alpha * mu * mu),
            Link::Identity
            | Link::Sqrt
            | Link::InversePower
            | Link::InverseSquared
            | Link::Power(_) => {
                let p = self.power().unwrap_or(1.0);
                if p == 1.0 { 1.0 } else { p * mu.powf(p - 1.0) }
            }
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Power(p) => write!(f, "power({p})"),
            Link::NegativeBinomial(a) => write!(f, "nbinom(alpha={a})"),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_is_exact_to_double_precision() {
        // scipy.special.ndtri values.
        for (p, expected) in [
            (0.975, 1.959963984540054),
            (0.2, -0.8416212335729142),
            (1e-10, -6.361340902404056),
        ] {
            let x = normal_quantile(p);
            assert!(
                ((x - expected) / expected).abs() < 1e-14,
                "{p}: {x} vs {expected}"
            );
        }
    }

    #[test]
    fn inverse_undoes_link_and_derivative_matches_finite_difference() {
        let links = [
            Link::Identity,
            Link::Log,
            Link::Logit,
            Link::Probit,
            Link::Cauchy,
            Link::CLogLog,
            Link::LogLog,
            Link::LogC,
            Link::Sqrt,
            Link::InversePower,
            Link::InverseSquared,
            Link::Power(1.5),
            Link::NegativeBinomial(0.7),
        ];
        for link in links {
            for mu in [0.2, 0.45, 0.7] {
                let eta = link.link(mu);
                assert!((link.inverse(eta) - mu).abs() < 1e-12, "{link} at {mu}");
                let h = 1e-6;
                let numeric = (link.link(mu + h) - link.link(mu - h)) / (2.0 * h);
                let analytic = link.derivative(mu);
                assert!(
                    ((numeric - analytic) / analytic).abs() < 1e-6,
                    "{link} derivative at {mu}: {numeric} vs {analytic}"
                );
            }
        }
    }
}
