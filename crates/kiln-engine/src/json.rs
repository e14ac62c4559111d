//! Reading JSON configs as Python's `json` writes them: diffusers and
//! transformers save `Infinity`, `-Infinity` and `NaN` (e.g.
//! DPMSolverMultistepScheduler's `lambda_min_clipped = -Infinity`), which
//! strict JSON refuses. Outside strings, `±Infinity` become `±f64::MAX` (the
//! same in every comparison a config makes) and `NaN` becomes `null` (the
//! key's default).

use serde::de::DeserializeOwned;
use serde_json::Value;

const HUGE: &str = "1.7976931348623157e308";

/// Rewrite Python's non-finite number tokens into strict JSON.
pub fn strict_text(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("Infinity") || text.contains("NaN")) {
        return std::borrow::Cow::Borrowed(text);
    }
    // Bytes in, bytes out: only ASCII tokens outside strings are replaced, so
    // the result stays valid UTF-8 and no index lands inside a character.
    let bytes = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len() + 32);
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let c = bytes[i];
        let rest = &bytes[i..];
        if in_string {
            if c == b'\\' && i + 1 < bytes.len() {
                out.extend_from_slice(&bytes[i..i + 2]);
                i += 2;
                continue;
            }
            in_string = c != b'"';
            out.push(c);
            i += 1;
        } else if c == b'"' {
            in_string = true;
            out.push(c);
            i += 1;
        } else if rest.starts_with(b"-Infinity") {
            out.push(b'-');
            out.extend_from_slice(HUGE.as_bytes());
            i += "-Infinity".len();
        } else if rest.starts_with(b"Infinity") {
            out.extend_from_slice(HUGE.as_bytes());
            i += "Infinity".len();
        } else if rest.starts_with(b"NaN") {
            out.extend_from_slice(b"null");
            i += "NaN".len();
        } else {
            out.push(c);
            i += 1;
        }
    }
    match String::from_utf8(out) {
        Ok(strict) => std::borrow::Cow::Owned(strict),
        // Unreachable for a &str input; keep the original for the parser's error.
        Err(_) => std::borrow::Cow::Borrowed(text),
    }
}

/// Parse a config document, accepting `Infinity`, `-Infinity` and `NaN`.
pub fn parse_lenient(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str(&strict_text(text))
}

/// Deserialize a typed config, accepting `Infinity`, `-Infinity` and `NaN`.
pub fn from_str_lenient<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    serde_json::from_str(&strict_text(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_numbers_parse_and_strings_are_untouched() {
        let value = parse_lenient(
            r#"{"lambda_min_clipped": -Infinity, "cap": Infinity, "x": NaN,
                "note": "NaN and -Infinity \" Infinity", "list": [1, -Infinity]}"#,
        )
        .unwrap();
        assert_eq!(value["lambda_min_clipped"].as_f64(), Some(-f64::MAX));
        assert_eq!(value["cap"].as_f64(), Some(f64::MAX));
        assert!(value["x"].is_null());
        assert_eq!(value["note"], "NaN and -Infinity \" Infinity");
        assert_eq!(value["list"][1].as_f64(), Some(-f64::MAX));
        assert!(parse_lenient("{\"a\": Infinit}").is_err());
        let unicode = parse_lenient("{\"é\\\"ü\": \"ÿNaN\", \"b\": NaN}").unwrap();
        assert_eq!(unicode["é\"ü"], "ÿNaN");
    }
}
