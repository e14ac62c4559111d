//! Bad data and bad specifications give errors that name the row, column or cause.

use kiln_pipelines::RawFrame;
use kiln_pipelines::tabular::glm::{FitOptions, GlmSpec, fit_glm};

fn spec(formula: &str, family: &str) -> GlmSpec {
    GlmSpec::new(formula, family)
}

fn fit_error(spec: &GlmSpec, csv: &str) -> String {
    let data = RawFrame::from_csv(csv).unwrap();
    match fit_glm(spec, &data, FitOptions::default()) {
        Ok(_) => panic!("expected {} on this data to fail", spec.formula),
        Err(e) => e.to_string(),
    }
}

const GOOD: &str = "y,x,r\n1,0.5,a\n0,1.5,b\n3,2.5,a\n2,3.5,b\n5,4.5,a\n";

#[test]
fn missing_and_non_numeric_cells_name_row_and_column() {
    let err = fit_error(&spec("y ~ x", "poisson"), "y,x\n1,0.5\n2,\n3,1.0\n");
    assert_eq!(err, "bad data: column `x` row 1: missing value");
    let err = fit_error(&spec("y ~ x", "poisson"), "y,x\n1,0.5\n2,abc\n3,1.0\n");
    assert!(
        err.contains("column `x` row 1") && err.contains("mixes numbers and text"),
        "{err}"
    );
    let err = fit_error(&spec("y ~ x", "poisson"), "y,x\n1,0.5\n2,inf\n");
    assert!(
        err.contains("column `x` row 1") && err.contains("finite"),
        "{err}"
    );
    let err = fit_error(&spec("y ~ z", "poisson"), GOOD);
    assert!(
        err.contains("column `z`") && err.contains("no such column"),
        "{err}"
    );
}

#[test]
fn responses_outside_the_family_support_are_rejected() {
    let err = fit_error(&spec("y ~ x", "poisson"), "y,x\n1,0.5\n-2,1\n3,2\n");
    assert!(
        err.contains("column `y` row 1") && err.contains("must be >= 0"),
        "{err}"
    );
    let err = fit_error(&spec("y ~ x", "binomial"), "y,x\n1,0.5\n2,1\n0,2\n");
    assert!(err.contains("between 0 and 1"), "{err}");
    let err = fit_error(&spec("y ~ x", "gamma"), "y,x\n1,0.5\n0,1\n3,2\n");
    assert!(err.contains("must be > 0"), "{err}");
}

#[test]
fn singular_designs_name_the_dependent_column() {
    let csv = "y,x,z\n1,1,2\n2,2,4\n4,3,6\n3,4,8\n";
    let err = fit_error(&spec("y ~ x + z", "gaussian"), csv);
    assert!(err.starts_with("singular design: column \"z\""), "{err}");
}

#[test]
fn non_convergence_is_an_error_that_says_what_to_do() {
    let data = RawFrame::from_csv(GOOD).unwrap();
    let options = FitOptions {
        max_iter: 2,
        tol: 1e-8,
    };
    let err = fit_glm(&spec("y ~ x + C(r)", "poisson"), &data, options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("did not converge in 2 iterations") && err.contains("--max-iter"),
        "{err}"
    );
}

#[test]
fn specifications_are_checked_against_statsmodels_rules() {
    let mut bad_link = spec("y ~ x", "poisson");
    bad_link.link = Some("logit".into());
    let err = fit_error(&bad_link, GOOD);
    assert!(
        err.contains("does not support the logit link; allowed: identity, log, sqrt"),
        "{err}"
    );
    let mut exposure = spec("y ~ x", "poisson");
    exposure.link = Some("identity".into());
    exposure.exposure = Some("x".into());
    assert!(fit_error(&exposure, GOOD).contains("--exposure requires the log link"));
    assert!(fit_error(&spec("y ~ x", "weibull"), GOOD).contains("unknown family \"weibull\""));
    let mut alpha = spec("y ~ x", "poisson");
    alpha.alpha = Some(0.5);
    assert!(fit_error(&alpha, GOOD).contains("--alpha applies only"));
    assert!(
        fit_error(&spec("y ~ log(x)", "poisson"), GOOD).contains("function log() is not supported")
    );
    assert!(fit_error(&spec("y + x ~ r", "poisson"), GOOD).contains("needs the binomial family"));
}
