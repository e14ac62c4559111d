//! Validated model names (`catalog.schema.model`) and alias names (`champion`).

use std::fmt;

use crate::error::{Error, Result};

const MAX_PART_LEN: usize = 128;

/// A three-level model name as in Unity Catalog: `catalog.schema.model`.
/// Parts are case-insensitive and stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelName {
    parts: [String; 3],
}

impl ModelName {
    /// Parse and validate `catalog.schema.model`.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |rule: String| Error::InvalidName {
            name: text.to_string(),
            rule,
        };
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() != 3 {
            return Err(invalid(format!(
                "expected three dot-separated parts catalog.schema.model, found {}",
                parts.len()
            )));
        }
        let mut out: [String; 3] = Default::default();
        for (slot, (part, label)) in out
            .iter_mut()
            .zip(parts.iter().zip(["catalog", "schema", "model"]))
        {
            check_identifier(part).map_err(|rule| invalid(format!("{label} part {rule}")))?;
            *slot = part.to_ascii_lowercase();
        }
        Ok(ModelName { parts: out })
    }

    pub fn catalog(&self) -> &str {
        &self.parts[0]
    }
    pub fn schema(&self) -> &str {
        &self.parts[1]
    }
    pub fn model(&self) -> &str {
        &self.parts[2]
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.parts[0], self.parts[1], self.parts[2])
    }
}

/// A mutable pointer to one version, e.g. `champion`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Alias(String);

impl Alias {
    /// Parse and validate an alias; numeric aliases and `latest` are reserved.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |rule: &str| Error::InvalidAlias {
            alias: text.to_string(),
            rule: rule.to_string(),
        };
        check_identifier(text).map_err(|rule| Error::InvalidAlias {
            alias: text.to_string(),
            rule,
        })?;
        if text.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid(
                "an alias cannot be all digits (that would read as a version)",
            ));
        }
        if text.eq_ignore_ascii_case("latest") {
            return Err(invalid("`latest` is reserved for the newest version"));
        }
        Ok(Alias(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifiers are 1..=128 ASCII letters, digits, `_` or `-`, not starting with `-`.
fn check_identifier(part: &str) -> std::result::Result<(), String> {
    if part.is_empty() {
        return Err("must not be empty".into());
    }
    if part.len() > MAX_PART_LEN {
        return Err(format!("must be at most {MAX_PART_LEN} characters"));
    }
    if part.starts_with('-') {
        return Err("must not start with '-'".into());
    }
    if let Some(bad) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "may only contain letters, digits, '_' and '-' (found {bad:?})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_part_names_are_lowercased() {
        let name = ModelName::parse("Main.Pricing.Claims_GLM").unwrap();
        assert_eq!(name.to_string(), "main.pricing.claims_glm");
        assert_eq!(name.catalog(), "main");
        assert_eq!(name.model(), "claims_glm");
    }

    #[test]
    fn names_with_wrong_shape_or_characters_are_rejected_with_the_rule() {
        let err = ModelName::parse("pricing.glm").unwrap_err().to_string();
        assert!(err.contains("three dot-separated parts"), "{err}");
        let err = ModelName::parse("a.b/c.d").unwrap_err().to_string();
        assert!(err.contains("may only contain"), "{err}");
        assert!(ModelName::parse("a..c").is_err());
        assert!(ModelName::parse("a.b.-c").is_err());
    }

    #[test]
    fn aliases_cannot_look_like_versions() {
        assert!(Alias::parse("champion").is_ok());
        assert!(Alias::parse("42").is_err());
        assert!(Alias::parse("latest").is_err());
        assert!(Alias::parse("a b").is_err());
    }
}
