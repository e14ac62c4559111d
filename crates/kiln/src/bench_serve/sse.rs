//! Reading a streamed completion: an incremental `text/event-stream` parser
//! and the decoding of each event's JSON chunk.

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::clip;

/// An incremental parser of a `text/event-stream` body: feed it the bytes as
/// they arrive, however they are split, and it returns the `data` of each
/// complete event (several `data:` lines joined with newlines). Comments
/// (`:` lines) and other fields are skipped; lines may end in LF, CRLF or CR.
#[derive(Default)]
pub struct SseParser {
    pending: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// The events completed by `bytes`.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(offset) = self.pending[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let end = start + offset;
            let terminator = match (self.pending[end], self.pending.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                // A CR that ends the input may be the first half of a CRLF.
                (b'\r', None) => break,
                _ => 1,
            };
            let line = String::from_utf8_lossy(&self.pending[start..end]).into_owned();
            start = end + terminator;
            events.extend(self.take_line(&line));
        }
        self.pending.drain(..start);
        events
    }

    /// The last event when the body ends without its blank line.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        let line = String::from_utf8_lossy(&rest);
        let line = line.trim_end_matches('\r');
        if !line.is_empty() {
            self.take_line(line);
        }
        self.data.take()
    }

    /// Apply one line; a blank line completes the event being built.
    fn take_line(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        None
    }
}

/// What one streamed chunk carries.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ChunkContent {
    pub(super) has_text: bool,
    pub(super) prompt_tokens: Option<u64>,
    pub(super) completion_tokens: Option<u64>,
}

/// Read one event's data: completions' `choices[].text`, chat's
/// `choices[].delta.content` (or `reasoning_content`) and `usage`; an
/// `error` object, or data that is not JSON, is an error.
pub(super) fn read_chunk(data: &str) -> Result<ChunkContent> {
    let chunk: Value = serde_json::from_str(data)
        .with_context(|| format!("a streamed event is not JSON: {}", clip(data, 200)))?;
    if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
        let message = error["message"].as_str().map(str::to_owned);
        bail!(
            "the server sent an error: {}",
            message.unwrap_or_else(|| error.to_string())
        );
    }
    let non_empty = |value: &Value| value.as_str().is_some_and(|s| !s.is_empty());
    let has_text = chunk["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|choice| {
            non_empty(&choice["text"])
                || non_empty(&choice["delta"]["content"])
                || non_empty(&choice["delta"]["reasoning_content"])
        })
    });
    let usage = &chunk["usage"];
    Ok(ChunkContent {
        has_text,
        prompt_tokens: usage["prompt_tokens"].as_u64(),
        completion_tokens: usage["completion_tokens"].as_u64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_serve::dataset::SplitMix64;

    /// Feed `body` split at the given byte offsets and collect every event.
    fn parse_split(body: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain([body.len()].iter()) {
            events.extend(parser.push(&body[start..cut]));
            start = cut;
        }
        events.extend(parser.finish());
        events
    }

    const BODY: &str = ": keep-alive\r\n\
        data: {\"choices\":[{\"text\":\"héllo\"}]}\r\n\r\n\
        event: message\n\
        data: first line\n\
        data:second line\n\n\
        id: 7\r\
        data: cr only\r\r\
        data: [DONE]\n\n";

    fn expected_events() -> Vec<String> {
        vec![
            "{\"choices\":[{\"text\":\"héllo\"}]}".to_owned(),
            "first line\nsecond line".to_owned(),
            "cr only".to_owned(),
            "[DONE]".to_owned(),
        ]
    }

    #[test]
    fn sse_events_are_the_same_however_the_body_is_split() {
        let body = BODY.as_bytes();
        assert_eq!(parse_split(body, &[]), expected_events());
        for cut in 0..=body.len() {
            assert_eq!(parse_split(body, &[cut]), expected_events(), "cut at {cut}");
        }
        let every_byte: Vec<usize> = (1..body.len()).collect();
        assert_eq!(parse_split(body, &every_byte), expected_events());
        let mut rng = SplitMix64::new(3);
        for _ in 0..200 {
            let mut cuts: Vec<usize> = (0..4)
                .map(|_| rng.below(body.len() as u64) as usize)
                .collect();
            cuts.sort_unstable();
            assert_eq!(parse_split(body, &cuts), expected_events(), "cuts {cuts:?}");
        }
    }

    #[test]
    fn an_sse_event_without_its_blank_line_is_returned_at_the_end() {
        assert_eq!(parse_split(b"data: a\n\ndata: b", &[3]), ["a", "b"]);
        assert_eq!(parse_split(b"data: a\r", &[]), ["a"]);
        assert!(parse_split(b": only a comment\n\n", &[]).is_empty());
    }

    #[test]
    fn chunks_are_read_for_text_usage_and_errors() {
        let completion = read_chunk(r#"{"choices":[{"index":0,"text":"hi"}]}"#).unwrap();
        assert!(completion.has_text);
        let chat = read_chunk(r#"{"choices":[{"delta":{"content":"hi"}}]}"#).unwrap();
        assert!(chat.has_text);
        let role_only = read_chunk(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#).unwrap();
        assert!(!role_only.has_text);
        let usage =
            read_chunk(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}"#)
                .unwrap();
        assert_eq!(
            usage,
            ChunkContent {
                has_text: false,
                prompt_tokens: Some(5),
                completion_tokens: Some(9),
            }
        );
        let error = read_chunk(r#"{"error":{"message":"out of memory"}}"#).unwrap_err();
        assert!(format!("{error:#}").contains("out of memory"));
        assert!(read_chunk("not json").is_err());
    }
}
