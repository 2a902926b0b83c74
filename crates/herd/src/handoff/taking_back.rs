//! What comes back from a worker of queued hand-offs: what herd takes back
//! off its channel (it died, hung, stalled or is retired), from every
//! hand-off thread, and what it sends back itself (RETURN). Each goes to
//! the front of the queue, for another worker.

use super::*;
use herd_protocol::page::MAX_HANDOFF_THREADS;
use herd_protocol::wire::{Batch, MAX_BATCH_LEN};

impl HandoffLoop {
    /// Connections that were never sent go back to the front of their
    /// lines, in the order they were accepted.
    pub(super) fn put_back(&mut self, conns: &mut Vec<Accepted>) {
        for conn in conns.drain(..).rev() {
            self.queue.push_front(conn.listener(), conn);
        }
    }

    /// Takes back what is still queued on worker `channel`'s channel (it
    /// died, hung, or is being retired), to the front of the queue, oldest
    /// first. What is no longer there, the worker took: counted as taken.
    /// Returns how many came back.
    pub(super) fn take_back(&mut self, channel: ChannelIx) -> usize {
        // First no other thread sends: what is read back is all there is.
        self.close_gate(channel);
        let listeners = self.counters.listener_count();
        self.catch_up(channel, listeners);
        let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
            return 0;
        };
        let mut unsent = std::mem::take(&mut worker.unsent);
        let Some(end) = worker.worker_end.as_ref() else {
            self.put_back(&mut unsent);
            return 0;
        };
        let mut back = Vec::new();
        let mut lied = 0u64;
        let mut buf = [0u8; MAX_BATCH_LEN];
        // Bounded: herd reads back only what it sent, at most max_unacked.
        while let Ok(Some(received)) = fdpass::recv_batch(end.as_fd(), &mut buf, true, true) {
            let Ok(Batch::Handoffs(handoffs)) = PrimaryMessage::decode_batch(&buf[..received.len])
            else {
                continue; // DRAIN: the worker is going anyway.
            };
            for (handoff, fd) in handoffs.into_iter().zip(received.fds) {
                let thread = herd_protocol::wire::handoff_thread(handoff.connection_id);
                if let Some(seen) = worker.threads.as_ref().filter(|_| thread != 0) {
                    self.next_connection_id += 1;
                    back.push(taken_back_from(
                        seen,
                        thread,
                        handoff,
                        fd,
                        self.next_connection_id,
                    ));
                    continue;
                }
                if let Some(seen) = &worker.threads {
                    // Thread 0's own, read back: least-conn counts it no more.
                    bump(&seen.shared.taken_back[0], 1);
                }
                let position = worker
                    .queued
                    .iter()
                    .position(|q| q.handoff.connection_id == handoff.connection_id);
                let stream = mio::net::TcpStream::from_std(std::net::TcpStream::from(fd));
                let conn = match position.and_then(|at| worker.queued.remove(at)) {
                    Some(entry) => Accepted {
                        stream,
                        handoff: entry.handoff,
                        accepted_at: entry.accepted_at,
                        refused_by: entry.refused_by,
                        refusals: entry.refusals,
                    },
                    // Only herd writes to this queue, so the record is
                    // herd's own; its entry went when the page claimed it
                    // taken (a worker that lies). It waits anew.
                    None => {
                        lied += 1;
                        Accepted {
                            stream,
                            handoff,
                            accepted_at: Instant::now(),
                            refused_by: None,
                            refusals: Refusals::default(),
                        }
                    }
                };
                back.push(conn);
            }
        }
        // The rest it took (before it went, if it went).
        worker.all_queued_taken(&self.counters);
        let returned = back.len();
        // What the page claimed taken was no longer counted in flight.
        self.counters
            .in_flight
            .fetch_sub(returned as u64 - lied, Relaxed);
        self.put_back(&mut unsent);
        self.put_back(&mut back);
        returned
    }

    /// A worker that takes queued hand-offs sent one back (RETURN, with
    /// its fd): like a NACK, it goes to the front of its line, for another.
    pub(super) fn on_return(&mut self, channel: ChannelIx, handoff: Handoff, fd: OwnedFd) {
        // The worker had the fd, so it could do anything with it; what it
        // says of it is checked before another worker is given it.
        let listener = ListenerIx::from(handoff.listener);
        let stream = std::net::TcpStream::from(fd);
        let is_connection = self.listener(listener).is_some() && is_tcp_connection(&stream);
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        if !worker.takes_queued() {
            return worker.bad_message(
                BadMessage::Malformed,
                "a RETURN from a worker that does not take queued hand-offs; closed its fd",
            );
        }
        if !is_connection {
            return worker.bad_message(
                BadMessage::Malformed,
                format!(
                    "a RETURN of connection {} that is not a connection from listener {}; closed it",
                    handoff.connection_id, handoff.listener
                ),
            );
        }
        let slot = worker.slot;
        worker.refused += 1;
        if let Some(seen) = &worker.threads {
            bump(&seen.shared.refused, 1);
        }
        self.counters.requeued_refused.fetch_add(1, Relaxed);
        let serving = self.active.iter().flatten().count();
        let mut refusals = Refusals::default();
        refusals.refused(self.capacity_epoch, serving, Instant::now());
        let conn = Accepted {
            stream: mio::net::TcpStream::from_std(stream),
            // Thread 0 sends it next, under an id of its own.
            handoff: Handoff {
                connection_id: self.fresh_id(),
                ..handoff
            },
            // Its accept time did not come back with it: it waits anew.
            accepted_at: Instant::now(),
            refused_by: Some(slot),
            refusals,
        };
        self.queue.push_front(conn.listener(), conn);
    }
}

/// Another thread's hand-off, read back: counted back for that thread, it
/// waits anew under thread 0's `id` (thread 0 sends it next).
fn taken_back_from(
    seen: &super::from_threads::ThreadsSeen,
    thread: usize,
    handoff: Handoff,
    fd: OwnedFd,
    id: u64,
) -> Accepted {
    bump(
        &seen.shared.taken_back[thread.min(MAX_HANDOFF_THREADS - 1)],
        1,
    );
    Accepted {
        stream: mio::net::TcpStream::from_std(std::net::TcpStream::from(fd)),
        handoff: Handoff {
            connection_id: id,
            ..handoff
        },
        accepted_at: Instant::now(),
        refused_by: None,
        refusals: Refusals::default(),
    }
}

/// Is `stream` a connected TCP socket (and not a pipe, a Unix socket or
/// UDP a worker passed off as one)?
fn is_tcp_connection(stream: &std::net::TcpStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    let stream_type = getsockopt(stream, sockopt::SockType);
    matches!(stream_type, Ok(SockType::Stream)) && stream.peer_addr().is_ok()
}
