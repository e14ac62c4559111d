//! Model references as users write them: `models:/name/3`, `models:/name@alias`,
//! a bare name (latest version) or a local model folder.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::name::{Alias, ModelName};

/// Which version of a registered model a reference means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSelector {
    Latest,
    Number(u64),
    Alias(Alias),
}

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Registered {
        name: ModelName,
        selector: VersionSelector,
    },
    /// A folder holding a Kiln `manifest.json` and its artifacts, a model folder
    /// Kiln recognises, or a single-file model (GGUF).
    LocalFolder(PathBuf),
}

impl ModelRef {
    /// Parse a reference. Strings starting with `/`, `./`, `../` or `~/`, or naming
    /// an existing directory or file (a GGUF model), are local paths; everything
    /// else is a registry name.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("models:/") {
            return parse_registered(text, rest);
        }
        let looks_like_path = text.starts_with('/')
            || text.starts_with("./")
            || text.starts_with("../")
            || text.starts_with("~/")
            || Path::new(text).is_dir()
            || Path::new(text).is_file();
        if looks_like_path {
            return Ok(ModelRef::LocalFolder(expand_home(text)));
        }
        parse_registered(text, text)
    }

    /// The model name, for registered references.
    pub fn name(&self) -> Option<&ModelName> {
        match self {
            ModelRef::Registered { name, .. } => Some(name),
            ModelRef::LocalFolder(_) => None,
        }
    }
}

fn parse_registered(original: &str, rest: &str) -> Result<ModelRef> {
    let invalid = |rule: &str| Error::InvalidReference {
        reference: original.to_string(),
        rule: rule.to_string(),
    };
    if rest.is_empty() {
        return Err(invalid("missing model name after models:/"));
    }
    let (name_text, selector) = if let Some((name, alias)) = rest.split_once('@') {
        (name, VersionSelector::Alias(Alias::parse(alias)?))
    } else if let Some((name, version)) = rest.split_once('/') {
        let number = version
            .parse::<u64>()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| invalid("the part after '/' must be a version number >= 1"))?;
        (name, VersionSelector::Number(number))
    } else {
        (rest, VersionSelector::Latest)
    };
    Ok(ModelRef::Registered {
        name: ModelName::parse(name_text)?,
        selector,
    })
}

fn expand_home(text: &str) -> PathBuf {
    match (text.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(text),
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Registered { name, selector } => match selector {
                VersionSelector::Latest => write!(f, "models:/{name}"),
                VersionSelector::Number(v) => write!(f, "models:/{name}/{v}"),
                VersionSelector::Alias(a) => write!(f, "models:/{name}@{a}"),
            },
            ModelRef::LocalFolder(path) => write!(f, "{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(text: &str) -> (String, VersionSelector) {
        match ModelRef::parse(text).unwrap() {
            ModelRef::Registered { name, selector } => (name.to_string(), selector),
            other => panic!("expected a registry reference, got {other:?}"),
        }
    }

    #[test]
    fn uri_forms_select_version_alias_or_latest() {
        assert_eq!(
            registered("models:/main.risk.glm/3"),
            ("main.risk.glm".into(), VersionSelector::Number(3))
        );
        assert_eq!(
            registered("models:/main.risk.glm@champion"),
            (
                "main.risk.glm".into(),
                VersionSelector::Alias(Alias::parse("champion").unwrap())
            )
        );
        assert_eq!(
            registered("main.risk.glm"),
            ("main.risk.glm".into(), VersionSelector::Latest)
        );
        assert_eq!(
            registered("main.risk.glm@prod"),
            (
                "main.risk.glm".into(),
                VersionSelector::Alias(Alias::parse("prod").unwrap())
            )
        );
    }

    #[test]
    fn paths_are_local_folders() {
        assert_eq!(
            ModelRef::parse("./models/glm").unwrap(),
            ModelRef::LocalFolder(PathBuf::from("./models/glm"))
        );
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().to_str().unwrap();
        assert!(matches!(
            ModelRef::parse(text).unwrap(),
            ModelRef::LocalFolder(_)
        ));
    }

    #[test]
    fn bad_references_name_the_rule() {
        let err = ModelRef::parse("models:/a.b.c/zero")
            .unwrap_err()
            .to_string();
        assert!(err.contains("version number"), "{err}");
        assert!(ModelRef::parse("models:/a.b.c/0").is_err());
        assert!(ModelRef::parse("models:/").is_err());
        let err = ModelRef::parse("models:/a.b@12").unwrap_err().to_string();
        assert!(err.contains("alias"), "{err}");
    }

    #[test]
    fn display_round_trips() {
        for text in ["models:/a.b.c/2", "models:/a.b.c@champion", "models:/a.b.c"] {
            assert_eq!(ModelRef::parse(text).unwrap().to_string(), text);
        }
    }
}
