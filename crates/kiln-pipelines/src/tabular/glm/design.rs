//! Design matrices with patsy's column order, treatment coding and names, built
//! from training data and rebuilt identically from prediction frames.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use super::columns::{Columns, DataProblem};
use super::formula::{Factor, Formula, Term};

/// How one factor enters the design.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FactorKind {
    Numeric,
    /// Levels sorted as patsy sorts them; the first is the reference.
    Categorical {
        levels: Vec<String>,
    },
}

/// A factor of the model with its data-derived coding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactorSpec {
    pub column: String,
    pub label: String,
    #[serde(flatten)]
    pub kind: FactorKind,
}

/// One multiplicand of a design column.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "part", rename_all = "snake_case")]
pub enum DesignPart {
    /// The factor's numeric value.
    Value { factor: usize },
    /// 1 where the factor's level equals `level`, else 0.
    Indicator { factor: usize, level: usize },
}

/// A design column: its patsy name and the product that computes it
/// (an empty product is the intercept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesignColumn {
    pub name: String,
    pub parts: Vec<DesignPart>,
}

/// Everything needed to rebuild the design matrix from new data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesignSpec {
    pub factors: Vec<FactorSpec>,
    pub columns: Vec<DesignColumn>,
}

/// A dense row-major design matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct DesignMatrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f64>,
}

impl DesignMatrix {
    pub fn get(&self, row: usize, col: usize) -> f64 {
        self.values[row * self.cols + col]
    }
}

/// A categorical factor inside a subterm; `full` means all levels (no reference dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Coded {
    factor: usize,
    full: bool,
}

/// patsy's `_subsets_sorted`: subsets by size, ties in the recursive generation order.
fn subsets_sorted(items: &[usize]) -> Vec<Vec<usize>> {
    fn generate(items: &[usize]) -> Vec<Vec<usize>> {
        match items.split_first() {
            None => vec![vec![]],
            Some((first, rest)) => {
                let mut out = Vec::new();
                for subset in generate(rest) {
                    let mut with_first = vec![*first];
                    with_first.extend(&subset);
                    out.push(subset);
                    out.push(with_first);
                }
                out
            }
        }
    }
    let mut indexed: Vec<(usize, Vec<usize>)> = generate(items).into_iter().enumerate().collect();
    indexed.sort_by_key(|(i, subset)| (subset.len(), *i));
    indexed.into_iter().map(|(_, s)| s).collect()
}

/// patsy's greedy merge: a subterm S followed by S ∪ {f reduced} becomes S with f full.
fn simplify(mut subterms: Vec<BTreeSet<Coded>>) -> Vec<BTreeSet<Coded>> {
    'again: loop {
        for short in 0..subterms.len() {
            for long in short + 1..subterms.len() {
                let (s, l) = (&subterms[short], &subterms[long]);
                if l.len() == s.len() + 1 && l.is_superset(s) {
                    let extra = *l.difference(s).next().unwrap_or(&Coded {
                        factor: 0,
                        full: false,
                    });
                    let mut merged = s.clone();
                    merged.insert(Coded {
                        factor: extra.factor,
                        full: true,
                    });
                    subterms[long] = merged;
                    subterms.remove(short);
                    continue 'again;
                }
            }
        }
        return subterms;
    }
}

impl DesignSpec {
    /// Derive factor codings and columns from the formula and the training data.
    pub fn from_training(formula: &Formula, data: &dyn Columns) -> Result<Self, DataProblem> {
        let mut factors: Vec<FactorSpec> = Vec::new();
        let mut term_factors: Vec<Vec<usize>> = Vec::new();
        for term in &formula.terms {
            let mut indices = Vec::new();
            for factor in term {
                let index = match factors.iter().position(|f| f.label == factor.label()) {
                    Some(index) => index,
                    None => {
                        factors.push(factor_spec(factor, data)?);
                        factors.len() - 1
                    }
                };
                indices.push(index);
            }
            term_factors.push(indices);
        }
        let columns = patsy_columns(&formula.terms, &term_factors, &factors);
        Ok(DesignSpec { factors, columns })
    }

    /// Names of the design columns, in order.
    pub fn column_names(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.name.clone()).collect()
    }

    /// Build the design matrix for `data`; unknown categorical levels are errors.
    pub fn matrix(&self, data: &dyn Columns) -> Result<DesignMatrix, DataProblem> {
        let rows = data.rows();
        let mut numbers: Vec<Option<Vec<f64>>> = vec![None; self.factors.len()];
        let mut level_index: Vec<Option<Vec<usize>>> = vec![None; self.factors.len()];
        for (i, factor) in self.factors.iter().enumerate() {
            match &factor.kind {
                FactorKind::Numeric => numbers[i] = Some(data.numbers(&factor.column)?),
                FactorKind::Categorical { levels } => {
                    let keys = data.categories(&factor.column)?;
                    let mut indices = Vec::with_capacity(rows);
                    for (row, key) in keys.iter().enumerate() {
                        match levels.iter().position(|l| l == key) {
                            Some(index) => indices.push(index),
                            None => {
                                return Err(DataProblem::at(
                                    &factor.column,
                                    row,
                                    format!(
                                        "level {key:?} was not seen in training (known levels: {})",
                                        levels.join(", ")
                                    ),
                                ));
                            }
                        }
                    }
                    level_index[i] = Some(indices);
                }
            }
        }
        let cols = self.columns.len();
        let mut values = vec![1.0; rows * cols];
        for (j, column) in self.columns.iter().enumerate() {
            for part in &column.parts {
                match *part {
                    DesignPart::Value { factor } => {
                        if let Some(v) = &numbers[factor] {
                            for row in 0..rows {
                                values[row * cols + j] *= v[row];
                            }
                        }
                    }
                    DesignPart::Indicator { factor, level } => {
                        if let Some(idx) = &level_index[factor] {
                            for row in 0..rows {
                                if idx[row] != level {
                                    values[row * cols + j] = 0.0;
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(DesignMatrix { rows, cols, values })
    }
}

fn factor_spec(factor: &Factor, data: &dyn Columns) -> Result<FactorSpec, DataProblem> {
    let categorical = factor.explicit_categorical || !data.is_numeric(&factor.column)?;
    let kind = if categorical {
        FactorKind::Categorical {
            levels: data.sorted_levels(&factor.column)?,
        }
    } else {
        FactorKind::Numeric
    };
    Ok(FactorSpec {
        column: factor.column.clone(),
        label: factor.label(),
        kind,
    })
}

fn patsy_columns(
    terms: &[Term],
    term_factors: &[Vec<usize>],
    factors: &[FactorSpec],
) -> Vec<DesignColumn> {
    let is_categorical = |f: usize| matches!(factors[f].kind, FactorKind::Categorical { .. });
    // Bucket terms by their set of numeric factors: the empty set first, then in
    // order of first appearance; inside a bucket, fewer factors first (stable).
    let mut buckets: Vec<(BTreeSet<usize>, Vec<usize>)> = vec![(BTreeSet::new(), Vec::new())];
    for (t, indices) in term_factors.iter().enumerate() {
        let numeric: BTreeSet<usize> = indices
            .iter()
            .copied()
            .filter(|f| !is_categorical(*f))
            .collect();
        match buckets.iter_mut().find(|(key, _)| *key == numeric) {
            Some((_, members)) => members.push(t),
            None => buckets.push((numeric, vec![t])),
        }
    }
    let mut columns = Vec::new();
    for (_, mut members) in buckets {
        members.sort_by_key(|t| terms[*t].len());
        let mut used: HashSet<BTreeSet<usize>> = HashSet::new();
        for t in members {
            let indices = &term_factors[t];
            let categorical: Vec<usize> = indices
                .iter()
                .copied()
                .filter(|f| is_categorical(*f))
                .collect();
            let mut remaining = Vec::new();
            for subset in subsets_sorted(&categorical) {
                let key: BTreeSet<usize> = subset.iter().copied().collect();
                if used.insert(key) {
                    remaining.push(
                        subset
                            .iter()
                            .map(|f| Coded {
                                factor: *f,
                                full: false,
                            })
                            .collect::<BTreeSet<Coded>>(),
                    );
                }
            }
            for subterm in simplify(remaining) {
                columns.extend(subterm_columns(indices, &subterm, factors));
            }
        }
    }
    columns
}

/// How one factor of a term appears in a subterm's columns.
struct TermFactor {
    factor: usize,
    /// `None` for a numeric factor; for a categorical one, whether it is full-rank
    /// and the level indices its columns use.
    levels: Option<(bool, Vec<usize>)>,
}

/// Columns of one subterm: categorical levels vary with the first factor fastest;
/// names join factors in the term's written order.
fn subterm_columns(
    indices: &[usize],
    subterm: &BTreeSet<Coded>,
    factors: &[FactorSpec],
) -> Vec<DesignColumn> {
    if indices.is_empty() {
        return vec![DesignColumn {
            name: "Intercept".into(),
            parts: vec![],
        }];
    }
    let mut term: Vec<TermFactor> = Vec::new();
    for &factor in indices {
        match &factors[factor].kind {
            FactorKind::Numeric => term.push(TermFactor {
                factor,
                levels: None,
            }),
            FactorKind::Categorical { levels } => {
                if let Some(coded) = subterm.iter().find(|c| c.factor == factor) {
                    let first = if coded.full { 0 } else { 1 };
                    term.push(TermFactor {
                        factor,
                        levels: Some((coded.full, (first..levels.len()).collect())),
                    });
                }
            }
        }
    }
    let total: usize = term
        .iter()
        .filter_map(|t| t.levels.as_ref().map(|(_, l)| l.len()))
        .product();
    let mut out = Vec::with_capacity(total);
    for combination in 0..total {
        // Decode `combination` with the first categorical factor varying fastest.
        let mut rest = combination;
        let mut names = Vec::with_capacity(term.len());
        let mut parts = Vec::with_capacity(term.len());
        for t in &term {
            let spec = &factors[t.factor];
            match (&t.levels, &spec.kind) {
                (Some((full, used)), FactorKind::Categorical { levels }) => {
                    let level = used[rest % used.len()];
                    rest /= used.len();
                    let prefix = if *full { "" } else { "T." };
                    names.push(format!("{}[{prefix}{}]", spec.label, levels[level]));
                    parts.push(DesignPart::Indicator {
                        factor: t.factor,
                        level,
                    });
                }
                _ => {
                    names.push(spec.label.clone());
                    parts.push(DesignPart::Value { factor: t.factor });
                }
            }
        }
        out.push(DesignColumn {
            name: names.join(":"),
            parts,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::RawFrame;

    fn names(formula: &str) -> Vec<String> {
        let data = RawFrame::from_csv(
            "y,x1,x2,r,b\n1,0.5,2,east,u\n2,1.5,3,north,v\n3,2.5,1,south,u\n4,3.5,0,west,v\n",
        )
        .unwrap();
        let formula = Formula::parse(formula).unwrap();
        DesignSpec::from_training(&formula, &data)
            .unwrap()
            .column_names()
    }

    #[test]
    fn column_order_and_coding_follow_patsy() {
        assert_eq!(
            names("y ~ x1 + C(r) + x1:x2 + C(r):x1"),
            [
                "Intercept",
                "C(r)[T.north]",
                "C(r)[T.south]",
                "C(r)[T.west]",
                "x1",
                "C(r)[T.north]:x1",
                "C(r)[T.south]:x1",
                "C(r)[T.west]:x1",
                "x1:x2"
            ]
        );
        assert_eq!(
            names("y ~ x1 + x1:x2 + x2"),
            ["Intercept", "x1", "x1:x2", "x2"]
        );
        assert_eq!(
            names("y ~ C(r):x1"),
            [
                "Intercept",
                "C(r)[east]:x1",
                "C(r)[north]:x1",
                "C(r)[south]:x1",
                "C(r)[west]:x1"
            ]
        );
        assert_eq!(
            names("y ~ 0 + C(r) + C(b)"),
            [
                "C(r)[east]",
                "C(r)[north]",
                "C(r)[south]",
                "C(r)[west]",
                "C(b)[T.v]"
            ]
        );
        assert_eq!(
            names("y ~ C(r) + C(b):C(r)"),
            [
                "Intercept",
                "C(r)[T.north]",
                "C(r)[T.south]",
                "C(r)[T.west]",
                "C(b)[T.v]:C(r)[east]",
                "C(b)[T.v]:C(r)[north]",
                "C(b)[T.v]:C(r)[south]",
                "C(b)[T.v]:C(r)[west]"
            ]
        );
    }

    #[test]
    fn matrix_multiplies_values_and_indicators() {
        let data = RawFrame::from_csv("y,x1,r\n1,2.0,a\n2,3.0,b\n").unwrap();
        let formula = Formula::parse("y ~ x1 + C(r) + C(r):x1").unwrap();
        let spec = DesignSpec::from_training(&formula, &data).unwrap();
        let matrix = spec.matrix(&data).unwrap();
        assert_eq!(
            spec.column_names(),
            ["Intercept", "C(r)[T.b]", "x1", "C(r)[T.b]:x1"]
        );
        assert_eq!(matrix.values, vec![1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 3.0, 3.0]);
        let unseen = RawFrame::from_csv("x1,r\n1.0,z\n").unwrap();
        let err = spec.matrix(&unseen).unwrap_err().to_string();
        assert!(err.contains("\"z\" was not seen in training"), "{err}");
    }
}
