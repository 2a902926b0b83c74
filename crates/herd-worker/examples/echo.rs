//! The smallest server that runs under herd: it echoes what each client
//! sends. Everything herd-specific is `Worker::from_env` and `accept`; the
//! rest is plain tokio.
//!
//! ```sh
//! cargo build --release --workspace --examples
//! ./target/release/herd run --listen 127.0.0.1:7000 --workers 2 -- ./target/release/examples/echo
//! echo hello | nc -q1 127.0.0.1 7000    # -> hello
//! ```

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), herd_worker::WorkerError> {
    let mut worker = herd_worker::Worker::from_env()?;
    // `None` once herd asks this worker to drain (reload, scale down, stop).
    while let Some(connection) = worker.accept().await? {
        tokio::spawn(async move {
            let mut stream = connection.stream;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            // Dropping the stream closes it and tells herd (CLOSED).
        });
    }
    Ok(())
}
