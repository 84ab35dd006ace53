//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), as JSON lines
//! when `TASKSTREAM_LOG_FORMAT=json` for containers.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Crates whose debug and trace output includes raw handshakes or packets: the
/// `Authorization` header, the CONNECT auth payload, a `?token=` URL, broker credentials.
/// They are capped at `info` whatever `RUST_LOG` asks, so a secret can never reach a log line.
const SECRET_BEARING: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "rust_socketio",
    "rust_engineio",
    "reqwest",
    "hyper",
    "hyper_util",
    "async_nats",
    "rdkafka",
];

/// The filter: `RUST_LOG` (default `info`) with the secret-bearing crates capped.
pub fn filter() -> EnvFilter {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for target in SECRET_BEARING {
        // A static, well-formed directive; parsing cannot fail.
        if let Ok(d) = format!("{target}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// Installs the global subscriber once; later calls are no-ops.
pub fn init() {
    let filter = filter();
    let json = std::env::var("TASKSTREAM_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a person at a terminal; in files and collectors they are noise.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
