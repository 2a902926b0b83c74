//! A herd worker that does nothing with its connections: it takes each one
//! and drops it at once, which closes it (the client reads EOF) and tells
//! herd (CLOSED). The primary's hand-off is then the only work per
//! connection, so `benches/ceiling.sh` can measure what the primary itself
//! costs and how far it goes. In the OS modes (`shared`, `reuseport`, the
//! kernel rotation) the library accepts from the inherited sockets, so the
//! same worker closes those too.
//!
//! ```sh
//! cargo build --release --workspace --examples
//! ./target/release/herd run --listen 127.0.0.1:7000 --workers 2 -- ./target/release/examples/close_at_once
//! ./target/release/examples/connect_storm 127.0.0.1:7000 --connections 50 --duration 2s
//! ```

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), herd_worker::WorkerError> {
    let mut worker = herd_worker::Worker::from_env()?;
    // `None` once herd asks this worker to drain (reload, scale down, stop).
    while let Some(connection) = worker.accept().await? {
        // Closes the socket, then reports CLOSED: no task, no read, no write.
        drop(connection);
    }
    Ok(())
}
