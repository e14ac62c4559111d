//! Stop strings over streamed text: text that could still become a stop string
//! is held back, and a matched stop string is never returned (OpenAI's rule).

/// Watches generated text for any of the stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released.
    pending: String,
}

/// What a new piece of text produced.
#[derive(Debug, Clone, PartialEq)]
pub enum StopOutcome {
    /// Text safe to send now (possibly empty).
    Continue(String),
    /// A stop string matched: the text before it; generation ends.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Add generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopOutcome::Continue(std::mem::take(&mut self.pending));
        }
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(before);
        }
        // Hold back the longest tail that begins some stop string.
        let mut hold = 0;
        for stop in &self.stops {
            for (end, _) in stop.char_indices().skip(1).chain([(stop.len(), ' ')]) {
                let prefix = &stop[..end];
                if end < stop.len() && self.pending.ends_with(prefix) {
                    hold = hold.max(prefix.len());
                }
            }
        }
        let release = self.pending.len() - hold;
        let text = self.pending[..release].to_string();
        self.pending.drain(..release);
        StopOutcome::Continue(text)
    }

    /// The held-back text, when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_split_across_pieces_is_caught_and_not_returned() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), StopOutcome::Continue("hello ".into()));
        assert_eq!(m.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("D and more"), StopOutcome::Stopped(String::new()));
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(m.push("ENx"), StopOutcome::Continue("ENx".into()));
        assert_eq!(m.push("a\n"), StopOutcome::Continue("a".into()));
        assert_eq!(m.finish(), "\n");
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("café"), StopOutcome::Continue("caf".into()));
        assert_eq!(m.push("!"), StopOutcome::Stopped(String::new()));
    }
}
