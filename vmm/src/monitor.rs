//! Watches the guest console for what decides a run: the patterns a CI job
//! expects (`--expect`) or forbids (`--expect-fail`), and a Linux kernel
//! panic. Keeps the last lines for the timeout report.

use std::collections::VecDeque;
use std::time::Instant;

use regex::Regex;

/// Linux's panic line (`panic()` in kernel/panic.c).
const PANIC_LINE: &str = "Kernel panic - not syncing";
/// The line Linux prints after the panic's backtrace.
const PANIC_END: &str = "---[ end Kernel panic";
/// Lines kept for reports.
const RECENT_LINES: usize = 20;
/// Longest line kept whole; longer lines are matched in pieces.
const MAX_LINE: usize = 4096;

/// What the console monitor concluded from one chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Every `--expect` pattern has appeared.
    ExpectationsMet,
    /// An `--expect-fail` pattern appeared (its text).
    ForbiddenOutput(String),
    /// A kernel panic line appeared.
    PanicStarted,
    /// The panic report is complete.
    PanicEnded,
}

/// Console state shared between the console writer and the VMM.
pub struct ConsoleMonitor {
    expect: Vec<(Regex, bool)>,
    expect_fail: Vec<Regex>,
    line: Vec<u8>,
    recent: VecDeque<String>,
    first_output: Option<Instant>,
    panicked: bool,
    met_reported: bool,
}

impl ConsoleMonitor {
    /// A monitor for these patterns.
    pub fn new(expect: Vec<Regex>, expect_fail: Vec<Regex>) -> Self {
        Self {
            expect: expect.into_iter().map(|r| (r, false)).collect(),
            expect_fail,
            line: Vec::new(),
            recent: VecDeque::new(),
            first_output: None,
            panicked: false,
            met_reported: false,
        }
    }

    /// Feeds guest output; returns what it decided, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        if bytes.is_empty() {
            return events;
        }
        self.first_output.get_or_insert_with(Instant::now);
        for &b in bytes {
            match b {
                b'\n' => {
                    self.check_line(&mut events);
                    let line = String::from_utf8_lossy(&self.line)
                        .trim_end_matches('\r')
                        .to_string();
                    if self.recent.len() == RECENT_LINES {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(line);
                    self.line.clear();
                }
                _ => {
                    if self.line.len() == MAX_LINE {
                        self.check_line(&mut events);
                        self.line.clear();
                    }
                    self.line.push(b);
                }
            }
        }
        // Prompts and other unfinished lines can match too.
        if !self.line.is_empty() {
            self.check_line(&mut events);
        }
        events
    }

    fn check_line(&mut self, events: &mut Vec<ConsoleEvent>) {
        let text = String::from_utf8_lossy(&self.line);
        if !self.panicked && text.contains(PANIC_LINE) {
            self.panicked = true;
            events.push(ConsoleEvent::PanicStarted);
        }
        if self.panicked && text.contains(PANIC_END) {
            events.push(ConsoleEvent::PanicEnded);
        }
        for re in &self.expect_fail {
            if let Some(m) = re.find(&text) {
                events.push(ConsoleEvent::ForbiddenOutput(m.as_str().to_string()));
            }
        }
        let mut newly_matched = false;
        for (re, seen) in self.expect.iter_mut().filter(|(_, seen)| !*seen) {
            if re.is_match(&text) {
                *seen = true;
                newly_matched = true;
            }
        }
        if newly_matched && !self.met_reported && self.expect.iter().all(|(_, seen)| *seen) {
            self.met_reported = true;
            events.push(ConsoleEvent::ExpectationsMet);
        }
    }

    /// Whether a kernel panic was seen.
    pub fn panicked(&self) -> bool {
        self.panicked
    }

    /// When the guest first wrote to the console.
    pub fn first_output(&self) -> Option<Instant> {
        self.first_output
    }

    /// `--expect` patterns with whether each has appeared.
    pub fn expectations(&self) -> Vec<(String, bool)> {
        self.expect
            .iter()
            .map(|(re, seen)| (re.as_str().to_string(), *seen))
            .collect()
    }

    /// Whether any `--expect` pattern is still missing.
    pub fn expectations_missing(&self) -> bool {
        self.expect.iter().any(|(_, seen)| !seen)
    }

    /// The last complete lines, oldest first, plus the unfinished one.
    pub fn recent_lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.recent.iter().cloned().collect();
        if !self.line.is_empty() {
            lines.push(String::from_utf8_lossy(&self.line).into_owned());
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn re(s: &str) -> Regex {
        Regex::new(s).unwrap()
    }

    #[test]
    fn expectations_are_met_once_all_have_appeared() {
        let mut m = ConsoleMonitor::new(vec![re("Linux version"), re("ready$")], vec![]);
        assert!(m.feed(b"[0.0] Linux version 6.1\n").is_empty());
        // Matched across chunk boundaries, on an unfinished line.
        assert!(m.feed(b"guest rea").is_empty());
        assert_eq!(m.feed(b"dy"), vec![ConsoleEvent::ExpectationsMet]);
        assert!(m.feed(b"\nready\n").is_empty(), "reported once");
        assert!(!m.expectations_missing());
    }

    #[test]
    fn forbidden_output_is_reported_with_its_text() {
        let mut m = ConsoleMonitor::new(vec![], vec![re("BUG: .*")]);
        assert_eq!(
            m.feed(b"ok\nBUG: unable to handle\n"),
            vec![ConsoleEvent::ForbiddenOutput(
                "BUG: unable to handle".into()
            )]
        );
    }

    #[test]
    fn panic_start_and_end_are_recognised() {
        let mut m = ConsoleMonitor::new(vec![], vec![]);
        assert_eq!(
            m.feed(b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n"),
            vec![ConsoleEvent::PanicStarted]
        );
        assert!(m.panicked());
        assert_eq!(
            m.feed(b"---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n"),
            vec![ConsoleEvent::PanicEnded]
        );
    }

    #[test]
    fn recent_lines_keep_the_tail_and_the_unfinished_line() {
        let mut m = ConsoleMonitor::new(vec![], vec![]);
        for i in 0..30 {
            m.feed(format!("line {i}\r\n").as_bytes());
        }
        m.feed(b"partial");
        let lines = m.recent_lines();
        assert_eq!(lines.len(), RECENT_LINES + 1);
        assert_eq!(lines[0], "line 10");
        assert_eq!(lines.last().unwrap(), "partial");
    }

    #[test]
    fn very_long_lines_do_not_grow_without_bound() {
        let mut m = ConsoleMonitor::new(vec![re("needle")], vec![]);
        m.feed(&vec![b'x'; 3 * MAX_LINE]);
        assert!(m.line.len() <= MAX_LINE);
        assert_eq!(m.feed(b"needle"), vec![ConsoleEvent::ExpectationsMet]);
    }
}
