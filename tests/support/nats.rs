//! A throwaway `nats-server` with JetStream, its store in its own temp dir so a restart on the
//! same port finds the streams it had before.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::AsyncBufReadExt as _;
use tokio::net::TcpStream;

use super::process::{find_binary, BrokerProcess};

const INSTALL_HINT: &str =
    "`apt-get install -y nats-server` (or point $NATS_SERVER_BIN at a binary)";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running nats-server on 127.0.0.1; dropping it kills the server and deletes its store.
pub struct Nats {
    port: u16,
    process: BrokerProcess,
    // Last field so it is deleted after the process is dead.
    dir: TempDir,
}

impl Nats {
    /// Starts nats-server with JetStream on a free port and waits until it greets clients.
    pub async fn start() -> Nats {
        let program = find_binary(
            "nats-server",
            "NATS_SERVER_BIN",
            &[
                "/usr/sbin/nats-server".into(),
                "/usr/local/bin/nats-server".into(),
            ],
            INSTALL_HINT,
        );
        let dir = tempfile::Builder::new()
            .prefix("nats-")
            .tempdir()
            .expect("nats tempdir");
        let port = super::free_port();
        let store = dir.path().join("store");
        let args = [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-sd",
            &store.to_string_lossy(),
        ]
        .map(String::from)
        .to_vec();
        let process = BrokerProcess::new("nats-server", program, args, dir.path().join("nats.log"));
        let mut nats = Nats { port, process, dir };
        nats.restart().await;
        nats
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port, which stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory, kept across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// SIGKILLs the server, as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port and store; call [`Nats::kill`] first.
    pub async fn restart(&mut self) {
        self.process.spawn();
        let port = self.port;
        self.process
            .wait_ready(READY_TIMEOUT, || greets_with_jetstream(port))
            .await;
    }

    /// The end of the server's log, for assertions that want context.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Where the server's stdout and stderr go.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }
}

/// True once the server accepts a connection and its `INFO` line says JetStream is on, so a
/// test's first JetStream call does not race the server's startup.
async fn greets_with_jetstream(port: u16) -> bool {
    let probe = async {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut line = String::new();
        tokio::io::BufReader::new(stream)
            .read_line(&mut line)
            .await
            .ok()?;
        Some(line.starts_with("INFO ") && line.contains("\"jetstream\":true"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), probe).await,
        Ok(Some(true))
    )
}

/// Every message of the SYNAPTASK stream, in stream order (none when the stream is missing).
pub async fn jetstream_messages(url: &str) -> Vec<async_nats::jetstream::Message> {
    use futures_util::StreamExt;
    let client = async_nats::connect(url).await.expect("nats connect");
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream("SYNAPTASK").await else {
        return Vec::new();
    };
    let total = stream.info().await.map(|i| i.state.messages).unwrap_or(0);
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        let mut batch = consumer
            .fetch()
            .max_messages(5000)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .expect("fetch");
        let mut got = 0;
        while let Some(Ok(m)) = batch.next().await {
            got += 1;
            out.push(m);
        }
        if got == 0 {
            break;
        }
    }
    out
}

/// Every record of the SYNAPTASK stream, in stream order, each checked to carry its record id
/// as `Nats-Msg-Id`.
pub async fn read_jetstream(url: &str) -> Vec<super::Seen> {
    jetstream_messages(url)
        .await
        .into_iter()
        .map(|m| {
            let record: serde_json::Value =
                serde_json::from_slice(&m.payload).expect("JSON payload");
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string());
            assert_eq!(
                id.as_deref(),
                record["id"].as_str(),
                "Nats-Msg-Id is the record id"
            );
            super::Seen {
                key: record["subject"].as_str().unwrap_or_default().to_string(),
                record: Some(record),
                channel: m.subject.to_string(),
            }
        })
        .collect()
}
