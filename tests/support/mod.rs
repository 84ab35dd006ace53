//! Real-broker harness shared by the integration tests: a `tests/*.rs` file says `mod support;`
//! and gets throwaway nats-server and tansu processes on free loopback ports.
//!
//! A broker that is missing or does not come up fails the test with a message saying how to
//! install it; nothing is ever skipped.

// Each integration test compiles this module on its own and uses only part of it; the
// re-exports below count as unused imports in a test that never names them.
#![allow(dead_code, unused_imports)]

mod connector;
mod nats;
mod process;
mod registry;
mod sim;
mod tansu;

pub use connector::{
    file_config, in_process_config, read_file_sink, use_jetstream, use_kafka, wait_until_matches,
    Connector, Latest, Seen,
};
pub use nats::{jetstream_messages, read_jetstream, Nats};
pub use registry::Registry;
pub use sim::{http_json, SimProcess};
pub use tansu::Tansu;

use std::net::{Ipv4Addr, TcpListener};

/// A loopback TCP port that was free a moment ago.
///
/// The listener is dropped before returning, so another process could take the port before the
/// broker binds it; on a test machine that race is rare enough to accept.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local_addr of bound listener")
        .port()
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`.
pub fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; what follows the name starts at field 3.
    // The kernel reports them in USER_HZ, 100 per second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}
