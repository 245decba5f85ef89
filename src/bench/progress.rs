//! The progress bar every bench operation shows on stderr once it has run for a second.
//!
//! Short operations print nothing; with `--json`, or when stderr is not a terminal, the bar
//! stays hidden (indicatif's terminal target draws only to a terminal), so piped output and
//! logs hold results only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long an operation runs before its bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// One operation's bar: `label`, bytes done of the total, rate and time left.
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    enabled: bool,
    shown: AtomicBool,
}

impl Progress {
    /// A bar for `total` bytes, hidden until the operation has run for a second; never
    /// shown when `enabled` is false.
    pub fn new(enabled: bool, label: &str, total: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>10} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        {
            bar.set_style(style);
        }
        bar.set_message(label.to_string());
        Progress {
            bar,
            start: Instant::now(),
            enabled,
            shown: AtomicBool::new(false),
        }
    }

    /// Bytes done so far; draws the bar once a second has passed.
    pub fn set_position(&self, bytes: u64) {
        self.show_if_due();
        self.bar.set_position(bytes);
    }

    /// Names what the operation is doing now (e.g. waiting for its last writes).
    pub fn set_label(&self, label: &str) {
        self.bar.set_message(label.to_string());
        self.show_if_due();
    }

    /// Clears the bar (the results line takes its place).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn show_if_due(&self) {
        if self.enabled && !self.shown.load(Ordering::Relaxed) && self.start.elapsed() > SHOW_AFTER {
            self.shown.store(true, Ordering::Relaxed);
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            // Keeps the rate and time left moving while nothing new is reported.
            self.bar.enable_steady_tick(Duration::from_millis(200));
        }
    }

    /// Updates the bar from `position()` every 50 ms until `done()`; for operations whose
    /// threads report through a shared counter.
    pub fn watch(&self, position: impl Fn() -> u64, done: impl Fn() -> bool) {
        while !done() {
            std::thread::sleep(Duration::from_millis(50));
            self.set_position(position());
        }
        self.finish();
    }

    /// Whether the bar has been drawn (for tests).
    #[cfg(test)]
    fn is_shown(&self) -> bool {
        self.shown.load(Ordering::Relaxed)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An operation that failed leaves no half-drawn bar above its error.
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_appears_only_after_a_second_and_only_when_enabled() {
        let p = Progress::new(true, "write", 100);
        p.set_position(10);
        assert!(!p.is_shown(), "shown before a second had passed");
        std::thread::sleep(SHOW_AFTER + Duration::from_millis(50));
        p.set_position(20);
        assert!(p.is_shown());
        p.finish();

        let q = Progress::new(false, "write", 100);
        std::thread::sleep(SHOW_AFTER + Duration::from_millis(50));
        q.set_position(20);
        assert!(!q.is_shown(), "a disabled bar was shown");
    }
}
