//! Fuzzing as a benchmark (issue 8 item 9): runs each target of `tests/support/fuzz.rs` on
//! `FUZZ_CASES` generated inputs (default 10,000,000) and reports executions, panics and
//! executions per second per target. `cargo fuzz` needs a nightly toolchain, which this
//! machine cannot fetch; the inputs come from proptest strategies instead.
//!
//! `FUZZ_CASES=1000000 cargo bench --bench fuzz` (release build; about a minute per million
//! executions per target on this machine). `FUZZ_TARGETS=diff,job` runs only those.

#[path = "../tests/support/fuzz.rs"]
mod fuzz;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

static PANICS: AtomicU64 = AtomicU64::new(0);

fn run<S: Strategy>(name: &str, cases: u64, strategy: S, target: impl Fn(&S::Value)) {
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let before = PANICS.load(Ordering::Relaxed);
    let mut first_panic: Option<String> = None;
    let started = Instant::now();
    for _ in 0..cases {
        let Ok(tree) = strategy.new_tree(&mut runner) else {
            continue;
        };
        let input = tree.current();
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            PANICS.fetch_add(1, Ordering::Relaxed);
            if first_panic.is_none() {
                first_panic = Some(format!("{input:?}").chars().take(2000).collect());
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let panics = PANICS.load(Ordering::Relaxed) - before;
    println!(
        "{name:<8} executions {cases:>11}  panics {panics:>5}  {:>9.0} exec/s  {secs:>7.1} s",
        cases as f64 / secs
    );
    if let Some(input) = first_panic {
        println!("  first panicking input: {input}");
    }
}

fn main() {
    let cases: u64 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let only = std::env::var("FUZZ_TARGETS").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|t| t == name))
    };
    // Counted, not printed: a panic's message would flood the report.
    std::panic::set_hook(Box::new(|_| {}));
    if wanted("diff") {
        run("diff", cases, fuzz::diff_payload(), fuzz::target_diff);
    }
    if wanted("page") {
        run(
            "page",
            cases,
            prop::collection::vec(fuzz::entity(), 0..12),
            |items| fuzz::target_page(items),
        );
    }
    if wanted("ack") {
        run(
            "ack",
            cases,
            (
                fuzz::json_value(),
                prop::collection::vec(fuzz::history_batch(), 0..4),
            ),
            |(ack, batches)| fuzz::target_ack(ack, batches),
        );
    }
    if wanted("job") {
        run("job", cases, fuzz::job_frame_text(), |t| {
            fuzz::target_job(t)
        });
    }
    if wanted("config") {
        run("config", cases, fuzz::config_text(), |t| {
            fuzz::target_config(t)
        });
    }
    let total = PANICS.load(Ordering::Relaxed);
    println!("panics in all: {total}");
}
