//! Launches `taskstream sim` as a child process on free ports and talks to its HTTP control
//! routes (`/truth`, `/pause`, ...). Killed on Drop, like the brokers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// A running simulator process.
pub struct SimProcess {
    child: Child,
    /// Port of the Socket.IO API and HTTP routes.
    pub port: u16,
    /// Port of the job-event WebSocket API.
    pub jobs_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl SimProcess {
    /// Starts `taskstream sim --port 0 --jobs-port 0 ARGS...` and waits for its ready line.
    pub fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for simulator log");
        let log = dir.path().join("sim.log");
        let stderr = std::fs::File::create(&log).expect("create simulator log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_taskstream"))
            .args(["sim", "--port", "0", "--jobs-port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn taskstream sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "simulator did not print its ready line; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let ready: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
            panic!(
                "bad ready line {line:?}: {e}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let port = ready["port"].as_u64().expect("port in ready line") as u16;
        let jobs_port = ready["jobs_port"]
            .as_u64()
            .expect("jobs_port in ready line") as u16;
        Self {
            child,
            port,
            jobs_port,
            log,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`, the Socket.IO server URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The simulator's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /truth` with the history batches.
    pub fn truth(&self) -> Value {
        http_json(self.port, "GET", "/truth?history=1", None)
    }

    /// `GET /truth` without the history batches (cheaper to poll).
    pub fn truth_light(&self) -> Value {
        http_json(self.port, "GET", "/truth?history=0", None)
    }

    /// `POST /pause`: stops the generator; the truth read after it is final.
    pub fn pause(&self) {
        http_json(self.port, "POST", "/pause", None);
    }

    /// `POST /resume`.
    pub fn resume(&self) {
        http_json(self.port, "POST", "/resume", None);
    }

    /// Any other control route.
    pub fn post(&self, path: &str, body: Option<&Value>) -> Value {
        http_json(self.port, "POST", path, body)
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client for the simulator's JSON routes (no extra dependency needed).
pub fn http_json(port: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to simulator HTTP");
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send HTTP request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read HTTP response");
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text.split_once("\r\n\r\n").expect("HTTP response head");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{method} {path}: {head}\n{payload}"
    );
    let payload = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload)
    } else {
        payload.to_string()
    };
    serde_json::from_str(&payload).unwrap_or_else(|e| panic!("{method} {path}: bad JSON: {e}"))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
