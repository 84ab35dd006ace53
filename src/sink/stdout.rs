//! The stdout / file sink: one JSON record per line. The embedded default, and what the demo
//! prints.
//!
//! Lines are written whole by one writer thread (blocking file I/O stays off the runtime), in
//! batches: whatever was enqueued while the previous write (or fsync) ran goes in the next.
//! When a message counts as acknowledged depends on `fsync`:
//! - `always` (a file's default): after the fsync that follows its write, so a power loss can
//!   never leave the checkpoint ahead of the file;
//! - `interval`: after its write; the file is synced every `fsync_interval_ms`;
//! - `never` (standard output's default): after its write.
//!
//! A write that fails half-way is cut back off the file (or, on standard output, ended with a
//! newline before the next line), so two records never share a line; the batch is retried with
//! backoff until it is written, and its messages stay unacknowledged meanwhile.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::Deserialize;
use tokio::sync::watch;

use super::{AckFuture, Message, Sink, SinkError};
use crate::backoff::Backoff;
use crate::metrics;

/// When written lines are synced to disk, and acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Sync before acknowledging (group commit: one fsync per batch).
    Always,
    /// Acknowledge once written; sync every `fsync_interval_ms`.
    Interval,
    /// Acknowledge once written; leave syncing to the OS.
    Never,
}

/// `[sinks.stdout]`: JSON lines to standard output or a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutConfig {
    /// Whether this sink is on.
    pub enabled: bool,
    /// Append to this file instead of standard output.
    pub path: Option<PathBuf>,
    /// `always`, `interval` or `never`; unset: `always` for a file, `never` for standard output.
    pub fsync: Option<Fsync>,
    /// With `fsync = "interval"`: milliseconds between syncs.
    pub fsync_interval_ms: u64,
}

impl Default for StdoutConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            fsync: None,
            fsync_interval_ms: 1000,
        }
    }
}

/// Where lines go: standard output or a file that can be synced and cut back.
enum Out {
    Stdout(std::io::Stdout),
    File {
        file: std::fs::File,
        len: u64,
    },
    /// Tests: a writer that fails on demand.
    #[cfg(test)]
    Faulty(Arc<Mutex<tests::Faulty>>),
}

impl Out {
    /// Writes `bytes` whole, or cuts back what part of them got written and says whether that
    /// worked (false: a partial line may be left at the end).
    fn write_lines(&mut self, bytes: &[u8]) -> Result<(), (std::io::Error, bool)> {
        match self {
            Out::Stdout(s) => {
                let mut lock = s.lock();
                lock.write_all(bytes)
                    .and_then(|()| lock.flush())
                    .map_err(|e| (e, false))
            }
            Out::File { file, len } => match file.write_all(bytes) {
                Ok(()) => {
                    *len += bytes.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    let cut = file.set_len(*len).is_ok();
                    Err((e, cut))
                }
            },
            #[cfg(test)]
            Out::Faulty(f) => f.lock().unwrap().write_lines(bytes),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match self {
            Out::Stdout(_) => Ok(()),
            // A device or a pipe (`/dev/null`, a FIFO) cannot be synced and says so with
            // EINVAL: there is nothing to wait for, and retrying would hold a shutdown until its
            // drain timeout.
            Out::File { file, .. } => match file.sync_data() {
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
                r => r,
            },
            #[cfg(test)]
            Out::Faulty(f) => {
                f.lock().unwrap().syncs += 1;
                Ok(())
            }
        }
    }
}

/// The largest buffer kept for reuse between batches.
const SPARE_MAX: usize = 8 << 20;

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Pending {
    /// Whole lines, in order.
    buf: Vec<u8>,
    /// The writer's last buffer, emptied, for `buf` to continue in: a new buffer grown from
    /// nothing for every batch cost a fifth of the pipeline's time in page faults (e2e profile).
    spare: Vec<u8>,
    /// Lines enqueued so far (the sequence number of the last one).
    enqueued: u64,
    /// `flush` wants a sync of everything enqueued.
    sync_wanted: bool,
    /// The sink is gone: the thread ends once nothing is pending.
    closed: bool,
}

/// What the writer thread has done, for the ack futures.
#[derive(Debug, Clone, Copy, Default)]
struct Done {
    /// Lines written.
    written: u64,
    /// Lines acknowledged (written, and synced when the policy says so).
    acked: u64,
    /// Lines synced.
    synced: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // The writer thread holds the lock only to swap buffers; a panic there leaves consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes records as JSON lines.
pub struct StdoutSink {
    name: String,
    shared: Arc<Shared>,
    done: watch::Receiver<Done>,
}

impl super::SinkConfig for StdoutConfig {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn format(&self) -> Option<super::Format> {
        // JSON lines, whatever `[encoding]` says.
        Some(super::Format::Json)
    }

    fn route_name(&self, _route: super::Route) -> Option<String> {
        None
    }

    fn build(&self, _format: super::Format) -> Result<Arc<dyn super::Sink>, SinkError> {
        Ok(Arc::new(StdoutSink::new(self)?))
    }
}

impl StdoutSink {
    /// Opens the file (appending) or standard output, and starts the writer thread.
    pub fn new(cfg: &StdoutConfig) -> Result<Self, SinkError> {
        let (name, out, default_fsync) = match &cfg.path {
            Some(p) => {
                let open_error = |e: std::io::Error| SinkError::Fatal {
                    sink: "file".into(),
                    message: format!("cannot open {}: {e}", p.display()),
                };
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    .open(p)
                    .map_err(open_error)?;
                // A kill mid-write leaves a partial last line; end it, so the next record
                // starts a line of its own (the partial record was never acknowledged and
                // will be sent again).
                if ends_mid_line(&mut f).map_err(open_error)? {
                    f.write_all(b"\n").map_err(open_error)?;
                }
                let len = f.metadata().map_err(open_error)?.len();
                ("file", Out::File { file: f, len }, Fsync::Always)
            }
            None => ("stdout", Out::Stdout(std::io::stdout()), Fsync::Never),
        };
        Self::start(name, out, cfg.fsync.unwrap_or(default_fsync), cfg)
    }

    fn start(name: &str, out: Out, fsync: Fsync, cfg: &StdoutConfig) -> Result<Self, SinkError> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let (tx, done) = watch::channel(Done::default());
        let writer = Writer {
            name: name.to_string(),
            out,
            fsync,
            interval: Duration::from_millis(cfg.fsync_interval_ms.max(1)),
            shared: Arc::clone(&shared),
            done: tx,
            partial: false,
        };
        std::thread::Builder::new()
            .name(format!("taskstream-{name}"))
            .spawn(move || writer.run())
            .map_err(|e| SinkError::Fatal {
                sink: name.to_string(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            name: name.to_string(),
            shared,
            done,
        })
    }

    fn closed(&self) -> SinkError {
        SinkError::Fatal {
            sink: self.name.clone(),
            message: "the writer thread stopped".into(),
        }
    }
}

impl Drop for StdoutSink {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_all();
    }
}

/// The writer thread's side.
struct Writer {
    name: String,
    out: Out,
    fsync: Fsync,
    interval: Duration,
    shared: Arc<Shared>,
    done: watch::Sender<Done>,
    /// A failed write may have left a partial line that could not be cut back: the next write
    /// starts with a newline.
    partial: bool,
}

impl Writer {
    fn run(mut self) {
        let mut last_sync = Instant::now();
        let mut state = Done::default();
        loop {
            let (batch, upto, sync_wanted) = {
                let mut p = lock(&self.shared.pending);
                loop {
                    if !p.buf.is_empty() || p.sync_wanted {
                        break;
                    }
                    if p.closed {
                        return;
                    }
                    let wait = match self.fsync {
                        Fsync::Interval if state.synced < state.written => {
                            self.interval.saturating_sub(last_sync.elapsed())
                        }
                        _ => Duration::from_secs(3600),
                    };
                    if wait.is_zero() {
                        break;
                    }
                    p = self
                        .shared
                        .wake
                        .wait_timeout(p, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                let wanted = std::mem::take(&mut p.sync_wanted);
                let spare = std::mem::take(&mut p.spare);
                (std::mem::replace(&mut p.buf, spare), p.enqueued, wanted)
            };
            if !batch.is_empty() && !self.write(&batch) {
                return;
            }
            // Kept for reuse unless a backlog made it large.
            if batch.capacity() <= SPARE_MAX {
                let mut batch = batch;
                batch.clear();
                lock(&self.shared.pending).spare = batch;
            }
            state.written = upto;
            let due = match self.fsync {
                Fsync::Always => true,
                Fsync::Interval => sync_wanted || last_sync.elapsed() >= self.interval,
                Fsync::Never => sync_wanted,
            };
            if due && state.synced < state.written {
                if !self.retry("sync", |out| out.sync()) {
                    return;
                }
                state.synced = state.written;
                last_sync = Instant::now();
            } else if due {
                last_sync = Instant::now();
            }
            state.acked = if self.fsync == Fsync::Always {
                state.synced
            } else {
                state.written
            };
            if self.done.send(state).is_err() {
                return;
            }
        }
    }

    /// Writes whole lines, retrying until it works; false when the sink is gone meanwhile.
    fn write(&mut self, batch: &[u8]) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut failures = 0u32;
        loop {
            let result = if self.partial {
                self.out.write_lines(b"\n").map(|()| self.partial = false)
            } else {
                Ok(())
            }
            .and_then(|()| self.out.write_lines(batch));
            match result {
                Ok(()) => return true,
                Err((e, cut)) => {
                    self.partial |= !cut;
                    failures += 1;
                    metrics::inc(&metrics::metrics().sink_retries_total);
                    if failures.is_power_of_two() {
                        tracing::warn!(sink = %self.name, error = %e, failures, "write failed; retrying (records wait unacknowledged)");
                    }
                }
            }
            if !self.pause(&mut backoff) {
                return false;
            }
        }
    }

    fn retry(&mut self, what: &str, mut f: impl FnMut(&mut Out) -> std::io::Result<()>) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut failures = 0u32;
        loop {
            match f(&mut self.out) {
                Ok(()) => return true,
                Err(e) => {
                    failures += 1;
                    metrics::inc(&metrics::metrics().sink_retries_total);
                    if failures.is_power_of_two() {
                        tracing::warn!(sink = %self.name, error = %e, failures, "{what} failed; retrying");
                    }
                }
            }
            if !self.pause(&mut backoff) {
                return false;
            }
        }
    }

    /// Sleeps the next delay of `backoff`; false when the sink was dropped meanwhile.
    fn pause(&self, backoff: &mut Backoff) -> bool {
        std::thread::sleep(backoff.next_delay());
        !lock(&self.shared.pending).closed
    }
}

/// Whether a non-empty file's last byte is not a newline.
fn ends_mid_line(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn enqueue(&self, msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>> {
        let seq = match &msg.payload {
            // Tombstones only mean something to a compacted Kafka topic: acknowledged once
            // every line before them is.
            None => lock(&self.shared.pending).enqueued,
            Some(p) => {
                let mut pending = lock(&self.shared.pending);
                pending.buf.reserve(p.len() + 1);
                pending.buf.extend_from_slice(p);
                pending.buf.push(b'\n');
                pending.enqueued += 1;
                pending.enqueued
            }
        };
        self.shared.wake.notify_one();
        let mut done = self.done.clone();
        let closed = self.closed();
        let ack: AckFuture = async move {
            done.wait_for(|d| d.acked >= seq)
                .await
                .map(|_| ())
                .map_err(|_| closed)
        }
        .boxed();
        async move { Ok(ack) }.boxed()
    }

    fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>> {
        async move { Ok(format!("{}: ready", self.name)) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            let target = {
                let mut p = lock(&self.shared.pending);
                p.sync_wanted = true;
                p.enqueued
            };
            self.shared.wake.notify_one();
            let mut done = self.done.clone();
            done.wait_for(|d| d.synced >= target)
                .await
                .map(|_| ())
                .map_err(|_| self.closed())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Route;

    /// A target that fails the next `fail` writes half-way.
    #[derive(Default)]
    pub(super) struct Faulty {
        pub data: Vec<u8>,
        pub fail: usize,
        /// Whether a failed write can be cut back (a file) or not (standard output).
        pub cuttable: bool,
        pub syncs: usize,
        /// Writes that reached the target whole.
        pub writes: usize,
    }

    impl Faulty {
        pub(super) fn write_lines(&mut self, bytes: &[u8]) -> Result<(), (std::io::Error, bool)> {
            if self.fail > 0 {
                self.fail -= 1;
                if !self.cuttable {
                    self.data.extend_from_slice(&bytes[..bytes.len() / 2]);
                }
                return Err((std::io::Error::other("disk full"), self.cuttable));
            }
            self.writes += 1;
            self.data.extend_from_slice(bytes);
            Ok(())
        }
    }

    fn line(i: usize) -> Arc<Message> {
        Arc::new(Message {
            avro: None,
            avro_key: None,
            route: Route::Nodes,
            event: "created".into(),
            id: format!("node:a:{i}"),
            key: "a".into(),
            payload: Some(
                format!("{{\"id\":\"node:a:{i}\",\"pad\":\"{}\"}}", "x".repeat(40)).into_bytes(),
            ),
            headers: vec![],
        })
    }

    fn faulty(fail: usize, cuttable: bool, fsync: Fsync) -> (StdoutSink, Arc<Mutex<Faulty>>) {
        let f = Arc::new(Mutex::new(Faulty {
            fail,
            cuttable,
            ..Default::default()
        }));
        let sink = StdoutSink::start(
            "faulty",
            Out::Faulty(Arc::clone(&f)),
            fsync,
            &StdoutConfig::default(),
        )
        .unwrap();
        (sink, f)
    }

    #[tokio::test]
    async fn a_write_that_fails_half_way_never_glues_two_records() {
        for cuttable in [false, true] {
            let (sink, f) = faulty(2, cuttable, Fsync::Never);
            let mut acks = Vec::new();
            for i in 0..20 {
                acks.push(sink.enqueue(line(i)).await.unwrap());
            }
            for a in acks {
                a.await.unwrap();
            }
            let data = String::from_utf8(f.lock().unwrap().data.clone()).unwrap();
            let whole: Vec<serde_json::Value> = data
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let mut ids: Vec<&str> = whole.iter().map(|v| v["id"].as_str().unwrap()).collect();
            if !cuttable {
                // Lines of the failed write that made it whole are written again (at least
                // once); what matters is that no line holds two records.
                let mut seen = std::collections::HashSet::new();
                ids.retain(|id| seen.insert(*id));
            }
            let expected: Vec<String> = (0..20).map(|i| format!("node:a:{i}")).collect();
            assert_eq!(ids, expected, "cuttable {cuttable}: {data}");
            // Every line is either a whole record or the cut-off part of a failed write.
            assert!(data.ends_with('\n'));
            if cuttable {
                assert_eq!(data.lines().count(), 20, "{data}");
            }
        }
    }

    #[tokio::test]
    async fn fsync_always_acknowledges_only_after_a_sync() {
        let (sink, f) = faulty(0, true, Fsync::Always);
        let mut acks = Vec::new();
        for i in 0..50 {
            acks.push(sink.enqueue(line(i)).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
            assert!(f.lock().unwrap().syncs >= 1);
        }
        let f = f.lock().unwrap();
        // Group commit: one sync per batch, not per line.
        assert!(
            f.syncs <= f.writes,
            "{} syncs for {} writes",
            f.syncs,
            f.writes
        );
    }

    #[tokio::test]
    async fn fsync_never_acknowledges_without_syncing_until_flush() {
        let (sink, f) = faulty(0, true, Fsync::Never);
        sink.enqueue(line(1)).await.unwrap().await.unwrap();
        assert_eq!(f.lock().unwrap().syncs, 0);
        sink.flush().await.unwrap();
        assert_eq!(f.lock().unwrap().syncs, 1);
    }

    #[tokio::test]
    async fn a_device_that_cannot_sync_is_not_retried_forever() {
        let cfg: StdoutConfig =
            serde_json::from_str(r#"{"path": "/dev/null", "fsync": "always"}"#).unwrap();
        let sink = StdoutSink::new(&cfg).unwrap();
        let ack = sink.enqueue(line(1)).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            ack.await.unwrap();
            sink.flush().await.unwrap();
        })
        .await
        .expect("acknowledged and flushed without waiting on a sync /dev/null refuses");
    }

    #[test]
    fn fsync_is_read_from_the_config() {
        let cfg: StdoutConfig = serde_json::from_str(
            r#"{"path": "/tmp/x", "fsync": "interval", "fsync_interval_ms": 200}"#,
        )
        .unwrap();
        assert_eq!(cfg.fsync, Some(Fsync::Interval));
        assert!(serde_json::from_str::<StdoutConfig>(r#"{"fsync": "sometimes"}"#).is_err());
    }

    #[tokio::test]
    async fn writes_json_lines_and_skips_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = StdoutSink::new(&StdoutConfig {
            enabled: true,
            path: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        let msg = |payload: Option<&str>| {
            Arc::new(Message {
                avro: None,
                avro_key: None,
                route: Route::Nodes,
                event: "created".into(),
                id: "node:a:1".into(),
                key: "a".into(),
                payload: payload.map(|p| p.as_bytes().to_vec()),
                headers: vec![],
            })
        };
        for m in [
            msg(Some(r#"{"id":"node:a:1"}"#)),
            msg(None),
            msg(Some(r#"{"id":"node:a:2"}"#)),
        ] {
            sink.enqueue(m).await.unwrap().await.unwrap();
        }
        sink.flush().await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"id\":\"node:a:1\"}\n{\"id\":\"node:a:2\"}\n"
        );
    }

    #[tokio::test]
    async fn a_partial_last_line_is_ended_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"id\":\"a\"}\n{\"id\":\"b").unwrap();
        let sink = StdoutSink::new(&StdoutConfig {
            enabled: true,
            path: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        let msg = Arc::new(Message {
            avro: None,
            avro_key: None,
            route: Route::Nodes,
            event: "created".into(),
            id: "node:c:1".into(),
            key: "c".into(),
            payload: Some(b"{\"id\":\"c\"}".to_vec()),
            headers: vec![],
        });
        sink.enqueue(msg).await.unwrap().await.unwrap();
        sink.flush().await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"id\":\"a\"}\n{\"id\":\"b\n{\"id\":\"c\"}\n"
        );
    }
}
