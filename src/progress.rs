//! Progress of long reads (snapshots, history catch-ups): a progress bar (`indicatif`) with
//! pages, objects and an ETA from the read budget when stderr is a terminal; otherwise a
//! structured log line every [`LOG_EVERY`], which a log collector can follow.
//!
//! The API gives no totals, so the expected size is the last known one (the entities the
//! checkpoint holds, or the previous snapshot's count) and the ETA is the pages still expected
//! times the time the read budget allows per page.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the progress log line is written when stderr is no terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// One long read's progress.
#[derive(Debug)]
pub struct Progress {
    what: &'static str,
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Instant,
    pages: u64,
    objects: u64,
    expected_objects: Option<u64>,
    per_page: u64,
    page_interval: Duration,
}

impl Progress {
    /// Starts reporting `what` (`snapshot`, `history`). `expected_objects` is the size last
    /// seen (`None` or 0: unknown); `per_page` the objects a full page brings; `page_interval`
    /// the sustained time per read the budget allows.
    pub fn start(
        what: &'static str,
        expected_objects: Option<u64>,
        per_page: u64,
        page_interval: Duration,
    ) -> Self {
        let expected_objects = expected_objects.filter(|n| *n > 0);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(
                expected_objects,
                ProgressDrawTarget::stderr_with_hz(4),
            );
            let template = if expected_objects.is_some() {
                "{spinner} {prefix}: [{bar:30}] {pos}/{len} objects, {msg}"
            } else {
                "{spinner} {prefix}: {pos} objects, {msg}"
            };
            // The templates are constants; a parse error would be a typo caught by the tests.
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self {
            what,
            bar,
            started: Instant::now(),
            last_log: Instant::now(),
            pages: 0,
            objects: 0,
            expected_objects,
            per_page: per_page.max(1),
            page_interval,
        }
    }

    /// Pages still expected and the time the read budget needs for them.
    pub fn eta(&self) -> Option<Duration> {
        let expected = self.expected_objects?;
        let left = expected.saturating_sub(self.objects);
        let pages = left.div_ceil(self.per_page);
        Some(self.page_interval * u32::try_from(pages).unwrap_or(u32::MAX))
    }

    /// One page of `objects` read.
    pub fn page(&mut self, objects: u64) {
        self.pages += 1;
        self.objects += objects;
        if self.what == "snapshot" {
            let m = crate::metrics::metrics();
            m.snapshot_pages
                .set(i64::try_from(self.pages).unwrap_or(i64::MAX));
            m.snapshot_objects
                .set(i64::try_from(self.objects).unwrap_or(i64::MAX));
        }
        let eta = self.eta();
        if let Some(bar) = &self.bar {
            if let Some(expected) = self.expected_objects {
                // The graph grew past the last count: the bar keeps up.
                bar.set_length(expected.max(self.objects));
            }
            bar.set_position(self.objects);
            bar.set_message(match eta {
                Some(eta) => format!("{} pages, ETA {}s", self.pages, eta.as_secs()),
                None => format!("{} pages", self.pages),
            });
        } else if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            tracing::info!(
                what = self.what,
                pages = self.pages,
                objects = self.objects,
                expected_objects = self.expected_objects,
                eta_secs = eta.map(|d| d.as_secs()),
                elapsed_secs = self.started.elapsed().as_secs(),
                "progress"
            );
        }
    }

    /// The read is over (done or abandoned); dropping it does the same.
    pub fn finish(self) {}
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.what == "snapshot" {
            let m = crate::metrics::metrics();
            m.snapshot_pages.set(0);
            m.snapshot_objects.set(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_is_the_pages_left_at_the_budget_rate() {
        let mut p = Progress::start("test", Some(10_000), 1_000, Duration::from_secs(2));
        assert_eq!(p.eta(), Some(Duration::from_secs(20)));
        p.page(1_000);
        p.page(1_000);
        assert_eq!(p.eta(), Some(Duration::from_secs(16)));
        p.page(9_000);
        assert_eq!(p.eta(), Some(Duration::ZERO));
        let unknown = Progress::start("test", Some(0), 1_000, Duration::from_secs(2));
        assert_eq!(unknown.eta(), None);
        p.finish();
    }
}
