//! Chat templates rendered as transformers renders them: jinja2 with
//! `trim_blocks` and `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`, `strftime_now`, and `tojson` as Python's `json.dumps`
//! (no HTML escaping), with `bos_token`/`eos_token` and the caller's extra
//! variables (`enable_thinking`, `tools`, ...).

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Map;

use crate::error::TextGenError;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
fn tojson(value: Value, indent: Option<usize>) -> Result<Value, Error> {
    let json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = match indent {
        None => python_dumps(&json),
        Some(n) => {
            let spaces = " ".repeat(n);
            let mut out = Vec::new();
            let formatter = serde_json::ser::PrettyFormatter::with_indent(spaces.as_bytes());
            let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
            serde::Serialize::serialize(&json, &mut serializer)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    Ok(Value::from_safe_string(text))
}

/// `json.dumps` with its default separators `", "` and `": "`.
fn python_dumps(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(python_dumps).collect();
            format!("[{}]", parts.join(", "))
        }
        serde_json::Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        serde_json::Value::String(k.clone()),
                        python_dumps(v)
                    )
                })
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        other => other.to_string(),
    }
}

fn strftime_now(format: String) -> String {
    // No clock formatting library: the dates templates ask for ("%d %b %Y") are
    // built from the system time by hand.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const FULL: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let m = (month - 1) as usize;
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", FULL[m])
        .replace("%b", MONTHS[m])
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl ChatTemplate {
    /// Compile `source`; errors name the template's line.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TextGenError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TextGenError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TextGenError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Render `messages` (OpenAI-shaped objects) with `add_generation_prompt` and
    /// extra variables; the template's own errors come back as `Template`.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        extra: &Map<String, serde_json::Value>,
    ) -> Result<String, TextGenError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TextGenError::Template(describe(&e)))?;
        let mut context: Map<String, serde_json::Value> = extra.clone();
        context.insert(
            "messages".into(),
            serde_json::Value::Array(messages.to_vec()),
        );
        context.insert(
            "add_generation_prompt".into(),
            serde_json::Value::Bool(add_generation_prompt),
        );
        for (key, token) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ] {
            context
                .entry(key)
                .or_insert_with(|| serde_json::Value::String(token.clone().unwrap_or_default()));
        }
        template
            .render(Value::from(minijinja::value::Serde(&context)))
            .map_err(|e| TextGenError::Template(describe(&e)))
    }
}

fn describe(error: &Error) -> String {
    match error.kind() {
        ErrorKind::InvalidOperation => error
            .detail()
            .map(str::to_string)
            .unwrap_or_else(|| error.to_string()),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_json_separators_and_no_html_escaping() {
        let t = ChatTemplate::new("{{ x | tojson }}", None, None).unwrap();
        let mut extra = Map::new();
        extra.insert("x".into(), json!({"a": [1, "<b>"], "é": true}));
        assert_eq!(
            t.render(&[], false, &extra).unwrap(),
            r#"{"a": [1, "<b>"], "é": true}"#
        );
    }

    #[test]
    fn raise_exception_reports_the_templates_message() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('Only user roles!') }}{% endif %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let e = t.render(
            &[json!({"role": "robot", "content": "x"})],
            false,
            &Map::new(),
        );
        assert_eq!(e, Err(TextGenError::Template("Only user roles!".into())));
    }

    #[test]
    fn dates_come_out_as_templates_expect() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_423), (2025, 12, 1));
    }
}
