//! What workers send: reading each channel a turn's budget at a time,
//! herd-protocol messages (ACK, NACK, READY, ACCEPTED, CLOSED) and Node
//! cluster messages.

use super::*;

impl HandoffLoop {
    /// Reads what waits on a worker's channel, a turn's budget at most
    /// (the rest on the next turn), and acts on each message; retires the
    /// worker if the channel closed.
    pub(super) fn read_worker(&mut self, channel: ChannelIx) {
        let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
            return;
        };
        worker.more_to_read = false;
        // The scratch list keeps its capacity from turn to turn: no
        // allocation per read.
        let mut messages = std::mem::take(&mut self.scratch);
        let end = worker.read_messages(&mut messages);
        for message in messages.drain(..) {
            match message {
                Message::Herd(message) => self.on_message(channel, message),
                Message::Node(message) => self.on_node_message(channel, message),
                Message::Returned(handoff, fd) => self.on_return(channel, handoff, fd),
            }
        }
        self.scratch = messages;
        match end {
            ReadEnd::Drained => {}
            ReadEnd::More => self.read_again(channel),
            ReadEnd::Closed => self.retire(channel, Retired::ChannelClosed),
        }
    }

    /// The channel may hold more than this turn read: with edge-triggered
    /// polling no new wake-up comes for it, so it is read again next turn.
    pub(super) fn read_again(&mut self, channel: ChannelIx) {
        if let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) {
            if !worker.more_to_read {
                worker.more_to_read = true;
                self.more_to_read.push(channel);
            }
        }
    }

    pub(super) fn on_message(&mut self, channel: ChannelIx, message: WorkerMessage) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        match message {
            WorkerMessage::Ack(id) => self.on_ack(channel, id),
            WorkerMessage::Nack(id) => self.on_nack(channel, id),
            WorkerMessage::Ready(flags) => {
                if flags.contains(ReadyFlags::REPORTS_CLOSED) && worker.closed.is_none() {
                    worker.closed = Some(0);
                    self.counters.reports_closed[worker.slot].store(true, Relaxed);
                }
                // The first READY only (the link is taken), whatever the
                // role: a worker counted ready by `ready_delay` before it
                // said READY still gets what its flags ask for.
                self.on_ready_flags(channel, flags);
                self.report_ready(channel)
            }
            WorkerMessage::Accepted { listener, .. } => {
                // OS-scheduled modes: the worker accepted by itself; count
                // it as herd counts its own hand-offs.
                if let Some(accepted) = self.counters.accepted.get(ListenerIx::from(listener)) {
                    accepted.fetch_add(1, Relaxed);
                }
                worker.count_acknowledged(1, &self.counters);
                if worker.count_sent(1) {
                    let _ = self.events.send(Event::RecycleDue {
                        worker: worker.worker,
                    });
                }
            }
            WorkerMessage::Closed(id) => {
                if worker.count_closed(1, &self.counters) == 0 {
                    worker.bad_message(
                        BadMessage::UnknownId,
                        format!(
                            "a CLOSED for connection {id}, beyond every connection it acknowledged"
                        ),
                    );
                }
            }
            WorkerMessage::Bound { listener, address } => self.on_bound(channel, listener, address),
            WorkerMessage::Return(handoff) => worker.bad_message(
                BadMessage::Malformed,
                format!(
                    "a RETURN of connection {} without its fd",
                    handoff.connection_id
                ),
            ),
        }
    }

    /// The preload library says what the program bound: captured for a
    /// served listener, or left alone. Logged (rate-limited), nothing else.
    fn on_bound(&mut self, channel: ChannelIx, listener: Option<u16>, asked: SocketAddr) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        let seen = match listener {
            Some(_) => &mut worker.errors.captured,
            None => &mut worker.errors.passed,
        };
        let Some(total) = seen.record() else {
            return;
        };
        let (slot, pid) = (worker.slot.get(), worker.pid);
        // The counters know every configured listener, in every mode (the
        // OS-scheduled ones have none in this loop).
        let served = listener.map(|ix| {
            let addrs = self.counters.listen_addrs();
            addrs
                .get(usize::from(ix))
                .map_or("?".to_string(), SocketAddr::to_string)
        });
        match served {
            Some(served) => info!(
                slot,
                pid,
                total,
                asked = %asked,
                listener = %served,
                event = "preload_captured",
                "the worker's bind({asked}) was captured: it takes herd's hand-offs for {served}"
            ),
            None => info!(
                slot,
                pid,
                total,
                address = %asked,
                event = "preload_bind_passed",
                "the worker bound {asked}, which herd does not serve: left to the program"
            ),
        }
    }

    /// The worker has the connection: herd closes its copy.
    fn on_ack(&mut self, channel: ChannelIx, id: u64) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
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
        worker.count_acknowledged(1, &self.counters);
        if worker.blocked {
            worker.blocked = false;
            self.send_pending_drain(channel);
        }
    }

    /// The worker refused the connection: it goes back to the front of
    /// its queue, for another worker.
    fn on_nack(&mut self, channel: ChannelIx, id: u64) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        let Some(mut entry) = take_in_flight(&mut worker.in_flight, id) else {
            return worker.bad_message(
                BadMessage::UnknownId,
                format!("a NACK for connection {id}, which it has not got in flight"),
            );
        };
        self.counters.requeued_refused.fetch_add(1, Relaxed);
        self.counters.in_flight.fetch_sub(1, Relaxed);
        worker.refused += 1;
        entry.conn.refused_by = Some(worker.slot);
        let serving = self.active.iter().flatten().count();
        entry
            .conn
            .refusals
            .refused(self.capacity_epoch, serving, Instant::now());
        self.queue.push_front(entry.conn.listener(), entry.conn);
    }

    pub(super) fn on_node_message(&mut self, channel: ChannelIx, message: node_ipc::NodeMessage) {
        use node_ipc::NodeMessage;
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        let Protocol::Node(node) = &mut worker.protocol else {
            return;
        };
        let fd = worker.channel.as_fd();
        let sent = match message {
            NodeMessage::QueryServer(query) => return self.answer_query(channel, query),
            NodeMessage::Listening => {
                self.report_ready(channel);
                self.app_primary_worker_event(channel, "listening");
                Ok(())
            }
            NodeMessage::Online if self.app_primary.runs => {
                // Under the app's primary a worker may never listen
                // (`@socket.io/sticky` passes it connections): online is ready.
                self.report_ready(channel);
                self.app_primary_worker_event(channel, "online");
                Ok(())
            }
            NodeMessage::AppHandle(line) => {
                let handle = node.take_relayed_handle();
                let acked = node.send_line(fd, node_ipc::handle_ack());
                self.app_primary_handle(channel, &line, handle);
                acked
            }
            NodeMessage::AppLine(raw) => {
                self.app_primary_message(channel, &raw);
                Ok(())
            }
            NodeMessage::Accepted { ack, accepted } => {
                let message = if accepted {
                    WorkerMessage::Ack(ack)
                } else {
                    WorkerMessage::Nack(ack)
                };
                self.on_message(channel, message);
                Ok(())
            }
            NodeMessage::HandleAck => {
                node.handle_answered();
                Ok(())
            }
            NodeMessage::HandleNack => {
                // The handle never arrived: that connection goes elsewhere.
                if let Some(SentHandle::Connection(id)) = node.handle_answered() {
                    self.on_message(channel, WorkerMessage::Nack(id));
                }
                Ok(())
            }
            NodeMessage::Handle => node.send_line(fd, node_ipc::handle_ack()),
            NodeMessage::ExitedAfterDisconnect { seq: theirs } => {
                let seq = node.next_seq();
                node.send_line(fd, node_ipc::ack(theirs, seq))
            }
            NodeMessage::Close { key } => {
                if let Some(listener) = node.remove_server(&key) {
                    self.update_rotation(listener, channel, SlotRotation::release);
                    self.release_if_unused(listener);
                }
                return;
            }
            NodeMessage::AppDropped { total } => {
                warn!(
                    slot = worker.slot.get(),
                    pid = worker.pid,
                    total,
                    event = "node_message_dropped",
                    "a Node worker sent a message of its own (process.send) to its primary: herd does not run the app's primary branch, so it is dropped (README: Node cluster apps)"
                );
                Ok(())
            }
            NodeMessage::Online | NodeMessage::App | NodeMessage::Other => Ok(()),
        };
        self.after_node_send(channel, sent);
    }

    /// Watches for room while a Node worker's outbox is not empty; retires
    /// the worker if its channel failed.
    pub(super) fn after_node_send(&mut self, channel: ChannelIx, sent: io::Result<()>) {
        match sent {
            Ok(()) => {
                // A worker skipped for a full channel waits for room too.
                let wants_write = self.channels[channel]
                    .as_ref()
                    .is_some_and(WorkerChannel::wants_write);
                self.watch_writable(channel, wants_write);
            }
            Err(e) => {
                debug!("Node worker channel failed on send: {e}");
                self.retire(channel, Retired::ChannelClosed);
            }
        }
    }
}
