//! Runs `taskstream run` as a child process (so a test can kill -9 it and start it again on
//! the same state), and compares what reached a broker with the simulator's `/truth`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use taskstream::config::Config;

/// A connector config for the simulator at `url`, writing JSON lines to `{dir}/records.jsonl`,
/// with its state in `{dir}`; `extra_source` is appended to `[source]`.
pub fn file_config(url: &str, extra_source: &str) -> String {
    format!(
        r#"
[source]
url = "{url}"
{extra_source}

[state]
path = "{{dir}}/state.redb"

[sinks.stdout]
enabled = true
path = "{{dir}}/records.jsonl"

[metrics]
listen = "127.0.0.1:{{metrics}}"
"#
    )
}

/// A connector process with its own directory (config, state, log, file sink).
pub struct Connector {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: String,
    token: String,
    extra_env: Vec<(String, String)>,
    /// Port of its metrics endpoint.
    pub metrics_port: u16,
    starts: u32,
}

impl Connector {
    /// Writes `config` (with `{dir}` replaced by the process directory and `{metrics}` by a free
    /// port) and starts `taskstream run` with the token in `SYNAPTASK_API_TOKEN`.
    pub fn start(config: &str, token: &str) -> Self {
        Self::start_with_env(config, token, &[])
    }

    /// Like [`Connector::start`], with extra environment variables.
    pub fn start_with_env(config: &str, token: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("connector tempdir");
        let metrics_port = super::free_port();
        let config = config
            .replace("{dir}", &dir.path().display().to_string())
            .replace("{metrics}", &metrics_port.to_string());
        std::fs::write(dir.path().join("taskstream.toml"), &config).expect("write config");
        let mut c = Self {
            child: None,
            dir,
            config,
            token: token.to_string(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            metrics_port,
            starts: 0,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open connector log");
        let child = Command::new(env!("CARGO_BIN_EXE_taskstream"))
            .args(["run", "--config"])
            .arg(self.dir.path().join("taskstream.toml"))
            .env("SYNAPTASK_API_TOKEN", &self.token)
            .env("RUST_LOG", "info")
            // Human lines, which some tests read (`key=value`); a test may ask for JSON.
            .env("TASKSTREAM_LOG_FORMAT", "text")
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn taskstream run");
        self.child = Some(child);
    }

    /// The process id of the running connector.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The process directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The config as written.
    pub fn config(&self) -> &str {
        &self.config
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("connector.log")
    }

    /// Everything the process printed (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL, no chance to flush or checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same directory and state.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let pid = self.child.as_ref()?.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        self.wait_exit(Duration::from_secs(40))
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// `GET /metrics`, parsed into name -> value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return out;
        };
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        for line in body.lines().filter(|l| l.starts_with("taskstream_")) {
            if let Some((k, v)) = line.split_once(' ') {
                out.insert(k.to_string(), v.parse().unwrap_or(0.0));
            }
        }
        out
    }

    /// Waits until nothing is in flight and acks have stopped moving for a moment, i.e. the
    /// checkpoint has caught up with what the broker holds.
    pub fn wait_settled(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = -1.0;
        let mut stable_since = Instant::now();
        while Instant::now() < deadline {
            let m = self.metrics();
            let acked = m
                .get("taskstream_messages_acked_total")
                .copied()
                .unwrap_or(-2.0);
            let in_flight = m.get("taskstream_in_flight").copied().unwrap_or(1.0);
            if acked != last || in_flight != 0.0 {
                last = acked;
                stable_since = Instant::now();
            } else if stable_since.elapsed() > Duration::from_millis(1500) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "connector did not settle; metrics: {:?}\nlog:\n{}",
            self.metrics(),
            self.log()
        );
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.kill9();
        // For debugging a failed test: `TASKSTREAM_TEST_KEEP=/some/dir` keeps a copy of the
        // connector's directory (config, log, state, records) there.
        if let Some(keep) = std::env::var_os("TASKSTREAM_TEST_KEEP") {
            let to = PathBuf::from(keep).join(
                self.dir
                    .path()
                    .file_name()
                    .unwrap_or_else(|| std::ffi::OsStr::new("connector")),
            );
            let _ = std::process::Command::new("cp")
                .arg("-r")
                .arg(self.dir.path())
                .arg(&to)
                .status();
        }
    }
}

/// One record as it reached a broker (or the file sink).
#[derive(Debug, Clone)]
pub struct Seen {
    /// The record, `None` for a tombstone.
    pub record: Option<Value>,
    /// The message key (entity id).
    pub key: String,
    /// Kafka topic / NATS subject / "file".
    pub channel: String,
}

/// The last record per entity key (`node:<id>` / `link:<id>`), in arrival order, and whether a
/// tombstone followed it.
#[derive(Debug, Default)]
pub struct Latest {
    /// Entity key -> last record.
    pub last: HashMap<String, Value>,
    /// Entity keys whose last message was a tombstone.
    pub tombstoned: std::collections::HashSet<String>,
    /// Every record id, in arrival order (duplicates kept).
    pub ids: Vec<String>,
    /// Status records.
    pub status: Vec<Value>,
    /// Dead letters.
    pub dead_letters: Vec<Value>,
}

impl Latest {
    /// Folds a stream of messages.
    pub fn from(seen: &[Seen]) -> Self {
        let mut l = Latest::default();
        for s in seen {
            match &s.record {
                None => {
                    let kind = if s.channel.contains("link") {
                        "link"
                    } else {
                        "node"
                    };
                    l.tombstoned.insert(format!("{kind}:{}", s.key));
                }
                Some(r) => {
                    l.ids.push(r["id"].as_str().unwrap_or_default().to_string());
                    let t = r["type"].as_str().unwrap_or_default();
                    if t == "synaptask.task.status_changed" {
                        l.status.push(r.clone());
                    } else if t == "synaptask.dead_letter" {
                        l.dead_letters.push(r.clone());
                    } else if let Some(kind) = t
                        .strip_prefix("synaptask.")
                        .and_then(|t| t.split('.').next())
                    {
                        let key = format!("{kind}:{}", r["subject"].as_str().unwrap_or_default());
                        // Records of one entity are ordered per key; keep the highest sequence.
                        let newer = l
                            .last
                            .get(&key)
                            .is_none_or(|old| old["sequence"].as_u64() <= r["sequence"].as_u64());
                        if newer {
                            l.tombstoned.remove(&key);
                            l.last.insert(key, r.clone());
                        }
                    }
                }
            }
        }
        l
    }

    /// Differences between this and the truth, as readable lines (empty when they match):
    /// every node and link of the truth is present at its version (active ones with their
    /// fields, trashed ones as trashed), and every deleted one the broker saw ends deleted.
    pub fn mismatches(&self, truth: &Value, uid: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, list) in [("node", &truth["nodes"]), ("link", &truth["links"])] {
            for e in list
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["ownerUid"] == uid)
            {
                let key = format!("{kind}:{}", e["id"].as_str().unwrap_or_default());
                let Some(r) = self.last.get(&key) else {
                    out.push(format!("{key} v{} missing", e["version"]));
                    continue;
                };
                if r["sequence"] != e["version"] {
                    out.push(format!(
                        "{key}: broker at v{} ({}), truth at v{}",
                        r["sequence"], r["type"], e["version"]
                    ));
                    continue;
                }
                if e["inTrash"] == true {
                    if !r["type"].as_str().unwrap_or_default().ends_with(".trashed") {
                        out.push(format!(
                            "{key}: trashed in truth, last record {}",
                            r["type"]
                        ));
                    }
                    continue;
                }
                let fields: &[&str] = if kind == "node" {
                    &["title", "status", "tags", "priority", "assignee"]
                } else {
                    &["source", "target", "type", "wasBlocker"]
                };
                for f in fields {
                    if r["after"][f] != e[f] {
                        out.push(format!(
                            "{key}.{f}: broker {} truth {}",
                            r["after"][f], e[f]
                        ));
                    }
                }
            }
            for d in truth["deleted"][format!("{kind}s")]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["ownerUid"] == uid)
            {
                let key = format!("{kind}:{}", d["id"].as_str().unwrap_or_default());
                if let Some(r) = self.last.get(&key) {
                    if r["type"].as_str() != Some(&format!("synaptask.{kind}.deleted")) {
                        out.push(format!(
                            "{key}: deleted in truth, last record {} v{}",
                            r["type"], r["sequence"]
                        ));
                    }
                }
            }
        }
        out
    }
}

/// Reads a JSON-lines file written by the file sink.
pub fn read_file_sink(path: &std::path::Path) -> Vec<Seen> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The sink may be mid-write: a last line without its newline is not complete yet.
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad line in file sink: {e}: {l}"));
            Seen {
                key: v["subject"].as_str().unwrap_or_default().to_string(),
                record: Some(v),
                channel: "file".into(),
            }
        })
        .collect()
}

/// Polls `read` until the folded records match the truth (after the simulator is paused), or
/// panics with the differences.
pub fn wait_until_matches(
    sim: &super::SimProcess,
    uid: &str,
    timeout: Duration,
    mut read: impl FnMut() -> Vec<Seen>,
) -> (Latest, Value) {
    let deadline = Instant::now() + timeout;
    loop {
        let truth = sim.truth_light();
        let latest = Latest::from(&read());
        let diff = latest.mismatches(&truth, uid);
        if diff.is_empty() {
            return (latest, truth);
        }
        if Instant::now() > deadline {
            panic!(
                "broker does not match the truth after {timeout:?}: {} differences, first: {:#?}",
                diff.len(),
                &diff[..diff.len().min(15)]
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An in-process connector config (for `taskstream::app::run`) reading the simulator at `url`,
/// with `token` written to `token_file`; sinks as the defaults have them until a caller
/// changes them (see [`use_kafka`], [`use_jetstream`]).
pub fn in_process_config(url: String, token: &str, token_file: &Path) -> Config {
    std::fs::write(token_file, token).expect("token file");
    let mut cfg = Config::default();
    cfg.source.url = url;
    cfg.source.token_env = String::new();
    cfg.source.token_file = Some(token_file.to_path_buf());
    cfg
}

/// Publishes to Kafka at `brokers` only.
pub fn use_kafka(cfg: &mut Config, brokers: &str) {
    cfg.sinks.stdout.enabled = false;
    cfg.sinks.kafka.enabled = true;
    cfg.sinks.kafka.brokers = brokers.to_string();
}

/// Publishes to NATS JetStream at `url` only.
pub fn use_jetstream(cfg: &mut Config, url: &str) {
    cfg.sinks.stdout.enabled = false;
    cfg.sinks.nats.enabled = true;
    cfg.sinks.nats.url = url.to_string();
}
