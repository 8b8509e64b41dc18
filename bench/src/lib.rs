//! Switchboard's load generator as a library: synthetic participants speaking the real protocol
//! ([`client`]), subscriber links shaped in its own socket layer ([`shaping`]) and the reports
//! of a run ([`report`]). The `switchboard-bench` binary drives
//! them; the server's integration tests build their peer connections the same way.

pub mod client;
pub mod report;
pub mod shaping;
pub mod social;
