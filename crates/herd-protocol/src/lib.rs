//! herd-protocol: what the herd primary and its workers share.
//!
//! The bytes on a worker's channel (herd protocol v1, `docs/protocol.md`),
//! the system calls that move file descriptors between processes, and the
//! names of the environment a worker is started with. Both the primary
//! (`herd`) and the worker library (`herd-worker`) build on it, so neither
//! depends on the other.
//!
//! # Layout
//! - [`wire`]: the message layout, encoded on the stack, decoded strictly.
//! - [`mod@env`]: `HERD_CHANNEL_FD`, `HERD_WORKER_ID` and systemd's `LISTEN_*`.
//! - [`fdpass`]: socketpairs, `sendmsg`/`recvmsg` with SCM_RIGHTS, and a
//!   child's fds, user and limits set between `fork` and `exec`.
//! - [`bpf`]: the SK_REUSEPORT program that deals connections over a
//!   SO_REUSEPORT group in strict turns.
//! - [`listen_queue`]: a listening socket's accept-queue depth, and moving
//!   what waits there to the rest of its group.
//! - [`page`]: the counter page a worker counts its connections in,
//!   instead of a message per connection.
//!
//! This is the only crate in the workspace with `unsafe` code, and only in
//! [`fdpass`], [`bpf`], [`listen_queue`] and [`page`], each block with a `// SAFETY:`
//! comment.

pub mod bpf;
pub mod env;
pub mod fdpass;
pub mod listen_queue;
pub mod page;
pub mod wire;
