//! Launches `taskstream registry` (the project's small Confluent-compatible schema registry) as
//! a child process on a free port, like the brokers; killed on Drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// A running schema registry.
pub struct Registry {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Registry {
    /// Starts it and waits for its ready line.
    pub fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_taskstream"))
            .args(["registry", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn taskstream registry");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the registry prints its ready line");
        let ready: Value = serde_json::from_str(line.trim()).expect("ready line is JSON");
        let port = ready["port"].as_u64().expect("port in ready line") as u16;
        Self { child, port }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
