//! Wilkinson formulas as patsy reads them: `y ~ x1 + C(region) + x1:x2`, `a*b`,
//! `-1`/`0` for no intercept, parentheses, and `successes + failures ~ ...`.

use std::fmt;

/// One variable in a term: a column used as a number, or as categories.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Factor {
    /// The column it reads.
    pub column: String,
    /// Written as `C(column)`; bare string/bool columns are categorical too,
    /// which is decided later from the data.
    pub explicit_categorical: bool,
}

impl Factor {
    /// The factor as written: `C(region)` or `x1`.
    pub fn label(&self) -> String {
        if self.explicit_categorical {
            format!("C({})", self.column)
        } else {
            self.column.clone()
        }
    }
}

/// A term is a set of factors (kept in written order); the empty term is the intercept.
pub type Term = Vec<Factor>;

/// A parsed formula.
#[derive(Debug, Clone, PartialEq)]
pub struct Formula {
    /// One response column, or two (successes, failures) for Binomial counts.
    pub response: Vec<String>,
    /// Terms in written order, intercept (if kept) first, duplicates removed.
    pub terms: Vec<Term>,
}

/// Why a formula could not be parsed, with the character position.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("formula error at character {position}: {message}")]
pub struct FormulaError {
    pub position: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Number(String),
    Plus,
    Minus,
    Star,
    Colon,
    Open,
    Close,
}

fn tokenize(text: &str, offset: usize) -> Result<Vec<(usize, Token)>, FormulaError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let position = offset + i;
        match c {
            ' ' | '\t' | '\n' => i += 1,
            '+' | '-' | '*' | ':' | '(' | ')' => {
                tokens.push((
                    position,
                    match c {
                        '+' => Token::Plus,
                        '-' => Token::Minus,
                        '*' => Token::Star,
                        ':' => Token::Colon,
                        '(' => Token::Open,
                        _ => Token::Close,
                    },
                ));
                i += 1;
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                tokens.push((position, Token::Number(chars[start..i].iter().collect())));
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
                {
                    i += 1;
                }
                tokens.push((position, Token::Name(chars[start..i].iter().collect())));
            }
            other => {
                return Err(FormulaError {
                    position,
                    message: format!("unexpected character {other:?}"),
                });
            }
        }
    }
    Ok(tokens)
}

/// Terms plus whether the intercept was explicitly removed/added.
#[derive(Debug, Clone, Default)]
struct TermList {
    terms: Vec<Term>,
    intercept: Option<bool>,
}

impl TermList {
    fn push_unique(&mut self, term: Term) {
        let exists = self.terms.iter().any(|t| same_set(t, &term));
        if !exists {
            self.terms.push(term);
        }
    }
}

fn same_set(a: &Term, b: &Term) -> bool {
    a.len() == b.len() && a.iter().all(|f| b.contains(f))
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    next: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.next).map(|(_, t)| t)
    }

    fn position(&self) -> usize {
        self.tokens
            .get(self.next)
            .map(|(p, _)| *p)
            .unwrap_or(self.end)
    }

    fn error(&self, message: impl Into<String>) -> FormulaError {
        FormulaError {
            position: self.position(),
            message: message.into(),
        }
    }

    fn expression(&mut self) -> Result<TermList, FormulaError> {
        let mut list = self.product()?;
        loop {
            match self.peek() {
                Some(Token::Plus) => {
                    self.next += 1;
                    let rhs = self.product()?;
                    if rhs.intercept.is_some() {
                        list.intercept = rhs.intercept;
                    }
                    for term in rhs.terms {
                        list.push_unique(term);
                    }
                }
                Some(Token::Minus) => {
                    self.next += 1;
                    let rhs = self.product()?;
                    if rhs.intercept == Some(true) {
                        list.intercept = Some(false);
                    }
                    list.terms
                        .retain(|t| !rhs.terms.iter().any(|r| same_set(t, r)));
                }
                _ => return Ok(list),
            }
        }
    }

    fn product(&mut self) -> Result<TermList, FormulaError> {
        let mut left = self.interaction()?;
        while self.peek() == Some(&Token::Star) {
            self.next += 1;
            let right = self.interaction()?;
            let crossed = cross(&left, &right);
            for term in right.terms {
                left.push_unique(term);
            }
            for term in crossed.terms {
                left.push_unique(term);
            }
        }
        Ok(left)
    }

    fn interaction(&mut self) -> Result<TermList, FormulaError> {
        let mut left = self.atom()?;
        while self.peek() == Some(&Token::Colon) {
            self.next += 1;
            let right = self.atom()?;
            left = cross(&left, &right);
        }
        Ok(left)
    }

    fn atom(&mut self) -> Result<TermList, FormulaError> {
        let token = self.peek().cloned();
        match token {
            Some(Token::Open) => {
                self.next += 1;
                let inner = self.expression()?;
                if self.peek() != Some(&Token::Close) {
                    return Err(self.error("expected ')'"));
                }
                self.next += 1;
                Ok(inner)
            }
            Some(Token::Number(n)) => {
                self.next += 1;
                match n.as_str() {
                    "1" => Ok(TermList {
                        terms: vec![],
                        intercept: Some(true),
                    }),
                    "0" => Ok(TermList {
                        terms: vec![],
                        intercept: Some(false),
                    }),
                    other => Err(FormulaError {
                        position: self.tokens[self.next - 1].0,
                        message: format!("only 0 and 1 may appear as numbers, found {other}"),
                    }),
                }
            }
            Some(Token::Name(name)) => {
                self.next += 1;
                if self.peek() == Some(&Token::Open) {
                    if name != "C" {
                        return Err(FormulaError {
                            position: self.tokens[self.next - 1].0,
                            message: format!(
                                "function {name}() is not supported: only C(column) is; \
                                 add a precomputed column to the data instead"
                            ),
                        });
                    }
                    self.next += 1;
                    let column = match self.peek().cloned() {
                        Some(Token::Name(column)) => column,
                        _ => return Err(self.error("C() takes one column name")),
                    };
                    self.next += 1;
                    if self.peek() != Some(&Token::Close) {
                        return Err(self.error("C() takes one column name and no options"));
                    }
                    self.next += 1;
                    return Ok(single(Factor {
                        column,
                        explicit_categorical: true,
                    }));
                }
                Ok(single(Factor {
                    column: name,
                    explicit_categorical: false,
                }))
            }
            _ => Err(self.error("expected a column name, C(column), 0, 1 or '('")),
        }
    }
}

fn single(factor: Factor) -> TermList {
    TermList {
        terms: vec![vec![factor]],
        intercept: None,
    }
}

fn cross(left: &TermList, right: &TermList) -> TermList {
    let mut out = TermList::default();
    for a in &left.terms {
        for b in &right.terms {
            let mut term = a.clone();
            for factor in b {
                if !term.contains(factor) {
                    term.push(factor.clone());
                }
            }
            out.push_unique(term);
        }
    }
    out
}

impl Formula {
    /// Parse `response ~ terms`.
    pub fn parse(text: &str) -> Result<Self, FormulaError> {
        let Some((lhs, rhs)) = text.split_once('~') else {
            return Err(FormulaError {
                position: 0,
                message: "a formula needs '~' between the response and the terms".into(),
            });
        };
        let lhs_tokens = tokenize(lhs, 0)?;
        let mut response = Vec::new();
        for (i, (position, token)) in lhs_tokens.iter().enumerate() {
            match (i % 2, token) {
                (0, Token::Name(name)) => response.push(name.clone()),
                (1, Token::Plus) => {}
                _ => {
                    return Err(FormulaError {
                        position: *position,
                        message: "the response is one column, or `successes + failures`".into(),
                    });
                }
            }
        }
        if response.is_empty() || response.len() > 2 || lhs_tokens.len() % 2 == 0 {
            return Err(FormulaError {
                position: 0,
                message: "the response is one column, or `successes + failures`".into(),
            });
        }
        let offset = lhs.chars().count() + 1;
        let mut parser = Parser {
            tokens: tokenize(rhs, offset)?,
            next: 0,
            end: text.chars().count(),
        };
        let list = parser.expression()?;
        if parser.next != parser.tokens.len() {
            return Err(parser.error("unexpected token"));
        }
        let mut terms = Vec::new();
        if list.intercept != Some(false) {
            terms.push(Vec::new());
        }
        terms.extend(list.terms.into_iter().filter(|t| !t.is_empty()));
        if terms.is_empty() {
            return Err(FormulaError {
                position: offset,
                message: "the model has no terms".into(),
            });
        }
        Ok(Formula { response, terms })
    }

    /// Every column the right-hand side reads, in first-use order.
    pub fn predictor_columns(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for factor in self.terms.iter().flatten() {
            if !out.contains(&factor.column) {
                out.push(factor.column.clone());
            }
        }
        out
    }
}

impl fmt::Display for Formula {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self
            .terms
            .iter()
            .map(|t| {
                if t.is_empty() {
                    "1".to_string()
                } else {
                    t.iter().map(Factor::label).collect::<Vec<_>>().join(":")
                }
            })
            .collect();
        write!(f, "{} ~ {}", self.response.join(" + "), terms.join(" + "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(formula: &str) -> Vec<String> {
        Formula::parse(formula)
            .unwrap()
            .terms
            .iter()
            .map(|t| t.iter().map(Factor::label).collect::<Vec<_>>().join(":"))
            .collect()
    }

    #[test]
    fn terms_expand_like_patsy() {
        assert_eq!(
            labels("y ~ x1 + C(region) + x1:x2"),
            ["", "x1", "C(region)", "x1:x2"]
        );
        assert_eq!(labels("y ~ a*b"), ["", "a", "b", "a:b"]);
        assert_eq!(labels("y ~ (a + b):c - 1"), ["a:c", "b:c"]);
        assert_eq!(labels("y ~ 0 + x + x"), ["x"]);
        assert_eq!(labels("y ~ x2:x1 + x1:x2"), ["", "x2:x1"]);
        assert_eq!(labels("y ~ a*b - a:b"), ["", "a", "b"]);
    }

    #[test]
    fn two_column_response_for_binomial_counts() {
        let formula = Formula::parse("NABOVE + NBELOW ~ LOWINC").unwrap();
        assert_eq!(formula.response, ["NABOVE", "NBELOW"]);
    }

    #[test]
    fn errors_point_at_the_problem() {
        let err = Formula::parse("y ~ x1 + np.log(x2)").unwrap_err();
        assert!(err.message.contains("not supported"), "{err}");
        assert_eq!(err.position, 9);
        assert!(Formula::parse("y x1").unwrap_err().message.contains("'~'"));
        assert!(Formula::parse("y ~ x1 +").is_err());
        assert!(Formula::parse("y ~ 0").is_err());
        assert!(Formula::parse("a + b + c ~ x").is_err());
    }
}
