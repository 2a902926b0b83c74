//! herd-tooling: load generation against herd, kept out of the primary.
//!
//! `herd bench` and `herd compare` are subcommands of the one `herd` binary,
//! but nothing here is linked into the primary's library: a primary never
//! generates load, and its dependency tree stays free of the histogram and
//! the HTTP client this needs.
//!
//! # Layout
//! - [`mod@bench`]: a small bounded HTTP/1.1 load generator, with per-worker
//!   shares read from each response's body. Its options and [`bench::run`]
//!   in `bench/mod.rs`; `target.rs` (target and source range), `client.rs`
//!   (one client task's loop), `response.rs` (reading a response, the head
//!   parsed by httparse), `report.rs` (counts, latency, shares, the text form).
//! - [`compare`]: the same load against each of herd's distribution modes in
//!   turn, one table (and Markdown, CSV, SVG) side by side. Its options,
//!   rows and [`compare::run`] in `compare/mod.rs`; `scenario.rs` (the
//!   loads), `run.rs` (one row: herd started in a mode, status polled until
//!   ready, a worker stalled, the load, herd stopped), `report.rs` (table,
//!   Markdown, CSV, the files), `svg.rs` (the chart).

pub mod bench;
pub mod compare;
