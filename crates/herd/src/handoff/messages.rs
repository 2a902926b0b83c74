//! What workers send: reading each channel a turn's budget at a time,
//! herd-protocol messages (ACK, NACK, READY, ACCEPTED, CLOSED) and Node
//! cluster messages.

use super::*;

impl HandoffLoop {
    /// Reads what waits on a worker's channel, a turn's budget at most
    /// (the rest on the next turn); retires the worker if the channel closed.
    pub(super) fn read_worker(&mut self, index: usize) {
        let Some(worker) = self.channels.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        worker.more_to_read = false;
        if worker.node.is_some() {
            return self.read_node_worker(index);
        }
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        for _ in 0..READ_BUDGET_MESSAGES {
            let Some(worker) = self.channels.get_mut(index).and_then(Option::as_mut) else {
                return;
            };
            match fdpass::recv_with_fd(worker.channel.as_fd(), &mut buf, true) {
                Ok(Some(received)) => {
                    if received.fd.is_some() {
                        // Closed when `received` is dropped.
                        worker.bad_message(
                            BadMessage::StrayFd,
                            "a file descriptor (herd never asks a worker for one); closed it",
                        );
                    }
                    match WorkerMessage::decode(&buf[..received.len]) {
                        Ok(message) => self.on_message(index, message),
                        Err(e) => worker.bad_message(
                            BadMessage::Malformed,
                            format!("a malformed message: {e}"),
                        ),
                    }
                }
                Ok(None) => return self.retire(index, Retired::ChannelClosed),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    worker.bad_message(BadMessage::Malformed, format!("a malformed message: {e}"));
                }
                Err(e) => {
                    debug!(slot = worker.slot, "worker channel failed on receive: {e}");
                    return self.retire(index, Retired::ChannelClosed);
                }
            }
        }
        self.read_again(index);
    }

    /// The channel may hold more than this turn read: with edge-triggered
    /// polling no new wake-up comes for it, so it is read again next turn.
    pub(super) fn read_again(&mut self, index: usize) {
        if let Some(worker) = self.channels.get_mut(index).and_then(Option::as_mut) {
            if !worker.more_to_read {
                worker.more_to_read = true;
                self.more_to_read.push(index);
            }
        }
    }

    pub(super) fn on_message(&mut self, index: usize, message: WorkerMessage) {
        let Some(worker) = self.channels[index].as_mut() else {
            return;
        };
        match message {
            WorkerMessage::Ack(id) => {
                let Some(entry) = take_in_flight(&mut worker.in_flight, id) else {
                    return worker.bad_message(
                        BadMessage::UnknownId,
                        format!("an ACK for connection {id}, which it has not got in flight"),
                    );
                };
                self.capacity_epoch += 1;
                if self.measure_latency {
                    let nanos = entry.conn.accepted_at.elapsed().as_nanos() as u64;
                    self.counters.latency.record(nanos);
                }
                // Dropping the entry closes the primary's copy of the fd.
                drop(entry);
                self.counters.in_flight.fetch_sub(1, Relaxed);
                self.counters.handed_off[worker.slot].fetch_add(1, Relaxed);
                worker.acked += 1;
                if worker.closed.is_some() {
                    self.counters.open_connections[worker.slot].fetch_add(1, Relaxed);
                }
                if worker.blocked {
                    worker.blocked = false;
                    self.send_pending_drain(index);
                }
            }
            WorkerMessage::Nack(id) => {
                let Some(mut entry) = take_in_flight(&mut worker.in_flight, id) else {
                    return worker.bad_message(
                        BadMessage::UnknownId,
                        format!("a NACK for connection {id}, which it has not got in flight"),
                    );
                };
                self.counters.requeued_refused.fetch_add(1, Relaxed);
                self.counters.in_flight.fetch_sub(1, Relaxed);
                entry.conn.refused_by = Some(worker.slot);
                let serving = self.active.iter().flatten().count();
                entry
                    .conn
                    .refusals
                    .refused(self.capacity_epoch, serving, Instant::now());
                self.queue
                    .push_front(usize::from(entry.conn.handoff.listener), entry.conn);
            }
            WorkerMessage::Ready { reports_closed } => {
                if reports_closed && worker.closed.is_none() {
                    worker.closed = Some(0);
                    self.counters.reports_closed[worker.slot].store(true, Relaxed);
                }
                self.report_ready(index)
            }
            WorkerMessage::Accepted { listener, .. } => {
                // OS-scheduled modes: the worker accepted by itself; count
                // it as herd counts its own hand-offs.
                if let Some(accepted) = self.counters.accepted.get(usize::from(listener)) {
                    accepted.fetch_add(1, Relaxed);
                }
                self.counters.handed_off[worker.slot].fetch_add(1, Relaxed);
                worker.acked += 1;
                if worker.closed.is_some() {
                    self.counters.open_connections[worker.slot].fetch_add(1, Relaxed);
                }
                if worker.count_sent(1) {
                    let _ = self.events.send(Event::RecycleDue {
                        worker: worker.worker,
                    });
                }
            }
            WorkerMessage::Closed(id) => {
                let slot = worker.slot;
                let open = &self.counters.open_connections[slot];
                if worker.closed.is_none() {
                    // The first report: from now on this worker's count is
                    // tracked, and all it acknowledged so far counts as open.
                    worker.closed = Some(0);
                    self.counters.reports_closed[slot].store(true, Relaxed);
                    open.fetch_add(worker.acked, Relaxed);
                }
                let closed = worker.closed.as_mut().expect("set above");
                if *closed < worker.acked {
                    *closed += 1;
                    open.fetch_sub(1, Relaxed);
                } else {
                    // Never more closed than acknowledged: the count cannot
                    // wrap, so least-conn cannot be fooled into starving it.
                    worker.bad_message(
                        BadMessage::UnknownId,
                        format!(
                            "a CLOSED for connection {id}, beyond every connection it acknowledged"
                        ),
                    );
                }
            }
        }
    }

    /// Reads and acts on what a Node cluster worker sent, a turn's budget
    /// at most (see [`node_ipc::NodeChannel::read`]).
    pub(super) fn read_node_worker(&mut self, index: usize) {
        let mut messages = Vec::new();
        let read = {
            let Some(worker) = self.channels[index].as_mut() else {
                return;
            };
            let node = worker.node.as_mut().expect("a Node worker");
            node.read(worker.channel.as_fd(), &mut messages)
        };
        for message in messages {
            self.on_node_message(index, message);
        }
        match read {
            Ok(node_ipc::Read::Drained) => {}
            Ok(node_ipc::Read::More) => self.read_again(index),
            Ok(node_ipc::Read::Closed) => self.retire(index, Retired::ChannelClosed),
            Err(e) => {
                debug!("Node worker channel failed: {e}");
                self.retire(index, Retired::ChannelClosed);
            }
        }
    }

    pub(super) fn on_node_message(&mut self, index: usize, message: node_ipc::Incoming) {
        use node_ipc::Incoming;
        let Some(worker) = self.channels[index].as_mut() else {
            return;
        };
        let node = worker.node.as_mut().expect("a Node worker");
        let channel = worker.channel.as_fd();
        let sent = match message {
            Incoming::QueryServer(query) => return self.answer_query(index, query),
            Incoming::Listening => {
                self.report_ready(index);
                Ok(())
            }
            Incoming::Accepted { ack, accepted } => {
                let message = if accepted {
                    WorkerMessage::Ack(ack)
                } else {
                    WorkerMessage::Nack(ack)
                };
                self.on_message(index, message);
                Ok(())
            }
            Incoming::HandleAck => {
                node.handle_answered();
                Ok(())
            }
            Incoming::HandleNack => {
                // The handle never arrived: that connection goes elsewhere.
                if let Some(SentHandle::Connection(id)) = node.handle_answered() {
                    self.on_message(index, WorkerMessage::Nack(id));
                }
                Ok(())
            }
            Incoming::Handle => node.send_line(channel, node_ipc::handle_ack()),
            Incoming::ExitedAfterDisconnect { seq: theirs } => {
                let seq = node.next_seq();
                node.send_line(channel, node_ipc::ack(theirs, seq))
            }
            Incoming::Close { key } => {
                if let Some(listener) = node.remove_server(&key) {
                    self.update_rotation(usize::from(listener), index, SlotRotation::release);
                    self.release_if_unused(usize::from(listener));
                }
                return;
            }
            Incoming::Online | Incoming::Other => Ok(()),
        };
        self.after_node_send(index, sent);
    }

    /// Watches for room while a Node worker's outbox is not empty; retires
    /// the worker if its channel failed.
    pub(super) fn after_node_send(&mut self, index: usize, sent: io::Result<()>) {
        match sent {
            Ok(()) => {
                // A worker skipped for a full channel waits for room too.
                let wants_write = self.channels[index].as_ref().is_some_and(|w| {
                    w.blocked || w.node.as_ref().is_some_and(NodeChannel::wants_write)
                });
                self.watch_writable(index, wants_write);
            }
            Err(e) => {
                debug!("Node worker channel failed on send: {e}");
                self.retire(index, Retired::ChannelClosed);
            }
        }
    }
}
