//! Micro-benchmarks of the hand-off path's building blocks.
//!
//! - `fd_roundtrip`: one connection's trip through a worker channel as the
//!   primary and a worker do it: encode HANDOFF, sendmsg with SCM_RIGHTS,
//!   recvmsg + decode on the worker side, ACK back, primary reads the ACK.
//!   Both ends run on this thread, so the figure is the CPU cost of the
//!   protocol on one core, without scheduler wake-ups.
//! - `fd_roundtrip_with_metrics`: the same plus the per-connection metric
//!   work herd does when `/metrics` is served (issue: < 2% apart).
//! - `metrics/record_latency`: exactly the work metrics add per connection.
//! - `dispatch/*`: choosing a worker slot per policy and pool size.
//!
//! Run: `cargo bench --bench handoff`

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use herd::counters::Counters;
use herd::dispatch::{Dispatcher, Mode};
use herd::ids::SlotIx;
use herd_protocol::fdpass;
use herd_protocol::wire::{
    Handoff, PrimaryMessage, WorkerMessage, HANDOFF_LEN, MAX_MESSAGE_LEN, WORKER_MESSAGE_MAX_LEN,
};

fn fd_roundtrip(c: &mut Criterion) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let counters = Counters::new(&["127.0.0.1:1".parse().unwrap()]);
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(1));
    // "metrics off" still keeps the loop's atomic counters (they feed `herd
    // status`); "on" adds what the loop does per connection when /metrics is
    // served: timing the hand-off into the latency histogram.
    for (name, measure_latency) in [("fd_roundtrip", false), ("fd_roundtrip_with_metrics", true)] {
        // Fresh channel and connection per variant: state left in the kernel
        // by one variant must not tilt the next (an A/A run showed 3%).
        let (primary, worker) = fdpass::channel_pair().unwrap();
        let connection = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut handoff = Handoff {
            connection_id: 0,
            listener: 0,
            peer: "127.0.0.1:40000".parse().unwrap(),
            local: listener.local_addr().unwrap(),
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let accepted_at = Instant::now();
                handoff.connection_id += 1;
                let mut out = [0u8; HANDOFF_LEN];
                fdpass::send_with_fd(
                    primary.as_fd(),
                    handoff.encode(&mut out),
                    connection.as_fd(),
                )
                .unwrap();
                counters.in_flight.fetch_add(1, Relaxed);

                let mut inbox = [0u8; MAX_MESSAGE_LEN];
                let received = fdpass::recv_with_fd(worker.as_fd(), &mut inbox, true)
                    .unwrap()
                    .unwrap();
                let PrimaryMessage::Handoff(got) =
                    PrimaryMessage::decode(&inbox[..received.len]).unwrap()
                else {
                    unreachable!()
                };
                let mut ack = [0u8; WORKER_MESSAGE_MAX_LEN];
                fdpass::send(
                    worker.as_fd(),
                    WorkerMessage::Ack(got.connection_id).encode(&mut ack),
                    true,
                )
                .unwrap();
                drop(received.fd); // the worker's copy (a real worker would serve it)

                let mut reply = [0u8; MAX_MESSAGE_LEN];
                let acked = fdpass::recv_with_fd(primary.as_fd(), &mut reply, true)
                    .unwrap()
                    .unwrap();
                black_box(WorkerMessage::decode(&reply[..acked.len]).unwrap());
                if measure_latency {
                    counters
                        .latency
                        .record(accepted_at.elapsed().as_nanos() as u64);
                }
                counters.in_flight.fetch_sub(1, Relaxed);
                counters.handed_off[SlotIx(0)].fetch_add(1, Relaxed);
            })
        });
    }
    group.finish();
}

/// Exactly what metrics add per connection: one clock read and one record.
fn latency_record(c: &mut Criterion) {
    let counters = Counters::new(&["127.0.0.1:1".parse().unwrap()]);
    let accepted_at = Instant::now();
    c.bench_function("metrics/record_latency", |b| {
        b.iter(|| {
            counters
                .latency
                .record(black_box(accepted_at.elapsed().as_nanos() as u64))
        })
    });
}

fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(1));
    for (mode, name) in [
        (Mode::RoundRobin, "round-robin"),
        (Mode::Sticky, "sticky"),
        (Mode::LeastConn, "least-conn"),
    ] {
        for slots in [4usize, 64] {
            let mut dispatcher = Dispatcher::new(mode);
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::new(name, slots), &slots, |b, &slots| {
                b.iter(|| {
                    client = client.wrapping_add(1);
                    let ip = IpAddr::V4(Ipv4Addr::from(client));
                    black_box(dispatcher.choose(ip, slots, |s| (s != 1).then_some(s as u64 % 3)))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, fd_roundtrip, latency_record, dispatch);
criterion_main!(benches);
