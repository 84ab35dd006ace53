//! One broker child process: finding its binary, spawning it with its output in a log file,
//! waiting for it to become ready, killing it, and quoting that log when something goes wrong.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many log lines a failure message quotes.
const LOG_TAIL_LINES: usize = 40;

/// A broker process that can be killed and started again with the same command line.
pub(crate) struct BrokerProcess {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    log_path: PathBuf,
    child: Option<Child>,
}

impl BrokerProcess {
    /// Describes the process without starting it; `log_path` collects stdout and stderr of
    /// every run so test output stays clean.
    pub(crate) fn new(
        name: &'static str,
        program: PathBuf,
        args: Vec<String>,
        log_path: PathBuf,
    ) -> Self {
        Self {
            name,
            program,
            args,
            log_path,
            child: None,
        }
    }

    /// Starts the process; the log is appended to, so a restart keeps the earlier run's lines.
    pub(crate) fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = self.open_log_with_banner();
        let stderr = log.try_clone().expect("clone log file handle");
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// SIGKILLs the process and reaps it; a no-op when it is not running.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it already exited; `wait` still reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Polls `probe` until it returns true, failing the test if the process exits first or
    /// `timeout` runs out.
    pub(crate) async fn wait_ready<F, Fut>(&mut self, timeout: Duration, mut probe: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            self.fail_if_exited();
            if probe().await {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("not ready within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics with the log tail if the process has exited.
    fn fail_if_exited(&mut self) {
        let status = match self.child.as_mut() {
            Some(child) => child.try_wait().expect("try_wait on broker child"),
            None => self.fail("is not running"),
        };
        if let Some(status) = status {
            self.child = None;
            self.fail(&format!("exited during startup with {status}"));
        }
    }

    /// Fails the test, quoting the end of the broker's log.
    pub(crate) fn fail(&self, what: &str) -> ! {
        panic!(
            "{} ({} {}) {what}\n--- last {LOG_TAIL_LINES} lines of {} ---\n{}",
            self.name,
            self.program.display(),
            self.args.join(" "),
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES),
        )
    }

    /// The last `lines` lines of the log, with terminal colour codes removed because tansu
    /// colours its log even when writing to a file.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let bytes = std::fs::read(&self.log_path).unwrap_or_default();
        let text = strip_ansi(&String::from_utf8_lossy(&bytes));
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Opens the log for appending and marks where this run starts.
    fn open_log_with_banner(&self) -> File {
        use std::io::Write as _;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
        let _ = writeln!(
            log,
            "=== harness: starting {} {}",
            self.program.display(),
            self.args.join(" ")
        );
        log
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Finds an executable: `env_override` (a variable naming a path) wins, then `PATH`, then
/// `fallbacks`, because Debian puts nats-server in /usr/sbin and cargo installs into
/// ~/.cargo/bin, neither of which is always on a test runner's `PATH`.
pub(crate) fn find_binary(
    name: &str,
    env_override: &str,
    fallbacks: &[PathBuf],
    install_hint: &str,
) -> PathBuf {
    if let Some(path) = std::env::var_os(env_override) {
        let path = PathBuf::from(path);
        assert!(
            is_executable(&path),
            "{env_override}={} is not an executable file; install the broker with: {install_hint}",
            path.display()
        );
        return path;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(fallbacks.iter().cloned())
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found on PATH, at {fallbacks:?}, or via ${env_override}. \
                 These tests need a real broker; install it with: {install_hint}"
            )
        })
}

/// Drops `ESC [ ... letter` sequences, which is all the colouring brokers emit.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `~/.cargo/bin/<name>`, honouring `CARGO_HOME`.
pub(crate) fn cargo_bin(name: &str) -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    Some(cargo_home.join("bin").join(name))
}
