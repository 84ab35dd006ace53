//! Property tests over the parsers and the normaliser (issue 8 item 9): arbitrary and hostile
//! payloads never panic, and whatever is published has header-safe ids and headers. A few
//! thousand cases per target here; `benches/fuzz.rs` runs millions and counts panics.

#[path = "support/fuzz.rs"]
mod fuzz;

use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Regressions are kept as tests by hand, not in files beside the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn diffs_never_panic(payload in fuzz::diff_payload()) {
        fuzz::target_diff(&payload);
    }

    #[test]
    fn snapshot_pages_never_panic(items in prop::collection::vec(fuzz::entity(), 0..12)) {
        fuzz::target_page(&items);
    }

    #[test]
    fn acks_and_history_pages_never_panic(
        ack in fuzz::json_value(),
        batches in prop::collection::vec(fuzz::history_batch(), 0..4),
    ) {
        fuzz::target_ack(&ack, &batches);
    }

    #[test]
    fn job_frames_never_panic(text in fuzz::job_frame_text()) {
        fuzz::target_job(&text);
    }

    #[test]
    fn config_files_never_panic(text in fuzz::config_text()) {
        fuzz::target_config(&text);
    }
}
