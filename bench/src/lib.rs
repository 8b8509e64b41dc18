//! Switchboard's load generator as a library: synthetic participants speaking the real protocol
//! ([`client`]) and the reports of a run ([`report`]). The `switchboard-bench` binary drives
//! them; the server's integration tests build their peer connections the same way.

pub mod client;
pub mod report;
