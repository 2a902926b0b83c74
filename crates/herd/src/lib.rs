//! herd: a multi-core front for server processes; the primary, as a library.
//!
//! The primary binds the listeners, accepts every connection and passes its
//! file descriptor over a Unix-domain socket to a worker process chosen by a
//! dispatch policy; after the hand-off it is out of the data path. For
//! comparison it can also let the kernel choose: the workers then inherit
//! the listening sockets and accept themselves.
//!
//! # Layout
//! The public modules are what the binary, `herd-tooling` and the tests
//! use; the rest is private, so rustc finds what nothing uses.
//! docs/architecture.md has the map, bottom-up.
//!
//! Public:
//! - [`ids`]: the ids passed around (worker channel, listener, slot, worker), a type each.
//! - [`status`]: what herd reports about itself (phase, slot states, fairness), below everyone who reports it.
//! - [`config`]: the config file and CLI overrides, typed as read, validated
//!   and resolved into `Settings`; what a reload does with each key.
//! - [`dispatch`]: the modes and the policies that choose a worker for each connection.
//! - [`counters`]: what the hand-off loop counts, lock-free.
//! - [`activation`]: the sockets workers inherit (`shared`, `reuseport`,
//!   kernel rotation of such workers), the `__exec-worker` shim.
//! - [`fd_budget`]: herd's open-file limit, raised at start, and what a configuration may need of it.
//! - [`node_ipc`]: Node.js cluster IPC, so unmodified Node cluster apps are workers.
//! - [`node_primary`]: a Node cluster app's own primary branch, run beside herd's workers (`node.primary = "run"`).
//! - [`cgroup`]: a cgroup v2 leaf per worker, so nothing it starts outlives it.
//! - [`worker_output`]: workers' stdout and stderr (and herd's own log) forwarded through bounded queues, long lines split, drops counted; nothing waits on herd's output.
//! - [`procstat`]: worker memory and CPU from `/proc`.
//! - [`control`]: the control socket behind `herd status`, `reload`, `scale`, `stop`, and its client.
//! - [`signals`]: the signals herd acts on, as the [`signals::SignalEvent`] a test can inject.
//! - [`primary`]: wiring it together: [`primary::bind`], then [`primary::run`] until stopped.
//!
//! Private:
//! - `listener`: binding the listening sockets.
//! - `rate_limit`: logging an error that can repeat at the 1st, 2nd, 4th, ... time.
//! - `wait_queue`: accepted connections waiting for a worker, one line per listener.
//! - `rotation`: round-robin for Node workers dealt by the kernel over
//!   per-slot SO_REUSEPORT sockets, with herd taking over a gone worker's queue.
//! - `probe`: readiness by probe (`ready = "tcp"`, `"http:/path"`), steered
//!   to the starting worker's own socket.
//! - `stall`: when a slot dealt to by the kernel stops taking its
//!   connections (a pure decision over accept-queue samples).
//! - `slot_sockets`: per-slot sockets for workers that take an inherited
//!   socket (`reuseport`, kernel rotation): who is dealt to, counts, and
//!   moving a dead or stalled slot's queue to the others.
//! - `handoff`: the mio loop that accepts and hands connections off.
//! - `lifecycle`: the supervisor's decision core, a pure state machine of
//!   worker slots and processes (start, restart, replace, drain, kill, reload, stop).
//! - `notify`: systemd's `sd_notify` readiness protocol: a socket per worker, read as it speaks (`ready = "notify"`).
//! - `process`: starting, signalling and reaping worker processes (herd is their subreaper).
//! - `supervisor`: carries out the core's decisions on real processes.
//! - `metrics`: Prometheus metrics, rendered for `/metrics`.
//! - [`line_format`]: how workers' output lines are framed (`log_lines`).
//! - [`log_files`]: per-slot log files (`log_dir`) and `herd logs`.
//! - `endpoint`: the HTTP endpoint on `metrics.address`: `/metrics`, `/livez`, `/readyz`, `/status`.
//! - `systemd`: herd as a `Type=notify` service (`READY=1`, `RELOADING=1`,
//!   `STOPPING=1`, `STATUS=`, `WATCHDOG=1`) and its listeners from socket activation (`LISTEN_FDS`).

// Raw system calls live in herd-protocol alone.
#![forbid(unsafe_code)]

pub mod activation;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod counters;
pub mod dispatch;
mod endpoint;
pub mod fd_budget;
mod handoff;
pub mod ids;
mod lifecycle;
pub mod line_format;
mod listener;
pub mod log_files;
mod metrics;
pub mod node_ipc;
pub mod node_primary;
mod notify;
pub mod primary;
mod probe;
mod process;
pub mod procstat;
mod rate_limit;
mod rotation;
pub mod signals;
mod slot_sockets;
mod stall;
pub mod status;
mod supervisor;
mod systemd;
pub mod upgrade;
mod wait_queue;
pub mod worker_output;
