//! The stdout / file sink: one JSON record per line. The embedded default, and what the demo
//! prints. A message counts as acknowledged once its line is flushed to the file descriptor
//! (and, for a file, synced when the sink flushes at shutdown).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use serde::Deserialize;

use super::{AckFuture, Message, Sink, SinkError};

/// `[sinks.stdout]`: JSON lines to standard output or a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutConfig {
    /// Whether this sink is on.
    pub enabled: bool,
    /// Append to this file instead of standard output.
    pub path: Option<PathBuf>,
}

impl Default for StdoutConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
        }
    }
}

enum Out {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(std::io::BufWriter<std::fs::File>),
}

impl Out {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Out::Stdout(w) => w,
            Out::File(w) => w,
        }
    }
}

/// Writes records as JSON lines.
pub struct StdoutSink {
    name: String,
    out: Arc<Mutex<Out>>,
}

impl StdoutSink {
    /// Opens the file (appending) or standard output.
    pub fn new(cfg: &StdoutConfig) -> Result<Self, SinkError> {
        let (name, out) = match &cfg.path {
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
                ("file".to_string(), Out::File(std::io::BufWriter::new(f)))
            }
            None => (
                "stdout".to_string(),
                Out::Stdout(std::io::BufWriter::new(std::io::stdout())),
            ),
        };
        Ok(Self {
            name,
            out: Arc::new(Mutex::new(out)),
        })
    }

    fn io_error(&self, e: std::io::Error) -> SinkError {
        SinkError::Retryable {
            sink: self.name.clone(),
            message: e.to_string(),
        }
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

fn lock(m: &Mutex<Out>) -> std::sync::MutexGuard<'_, Out> {
    // A panic while holding the lock leaves at worst a partly written line; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn enqueue(&self, msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>> {
        let written = match &msg.payload {
            // Tombstones only mean something to a compacted Kafka topic.
            None => Ok(()),
            Some(p) => {
                let mut out = lock(&self.out);
                let w = out.writer();
                w.write_all(p).and_then(|_| w.write_all(b"\n"))
            }
        };
        let result = written.map_err(|e| self.io_error(e)).map(|_| {
            let out = self.out.clone();
            let name = self.name.clone();
            async move {
                lock(&out)
                    .writer()
                    .flush()
                    .map_err(|e| SinkError::Retryable {
                        sink: name,
                        message: e.to_string(),
                    })
            }
            .boxed()
        });
        async move { result }.boxed()
    }

    fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>> {
        async move { Ok(format!("{}: ready", self.name)) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async move {
            let mut out = lock(&self.out);
            out.writer().flush().map_err(|e| self.io_error(e))?;
            if let Out::File(w) = &mut *out {
                w.get_ref().sync_data().map_err(|e| self.io_error(e))?;
            }
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Route;

    #[tokio::test]
    async fn writes_json_lines_and_skips_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = StdoutSink::new(&StdoutConfig {
            enabled: true,
            path: Some(path.clone()),
        })
        .unwrap();
        let msg = |payload: Option<&str>| {
            Arc::new(Message {
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
        })
        .unwrap();
        let msg = Arc::new(Message {
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
