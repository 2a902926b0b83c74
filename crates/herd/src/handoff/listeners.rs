//! The listener table: configured listeners, those bound on demand for
//! what Node apps ask (`queryServer`), released when no worker listens any
//! more, and each listener's kernel rotation.

use super::*;

/// Why a listener could not be added.
#[derive(Debug, thiserror::Error)]
pub(super) enum AddListenerError {
    #[error("herd holds at most {MAX_LISTENERS} listeners (MAX_LISTENERS)")]
    TableFull,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl HandoffLoop {
    /// `shared` mode (Node workers): the workers accept from herd's sockets.
    pub(super) fn workers_accept(&self) -> bool {
        !self.dispatcher.mode().hands_off()
    }

    pub(super) fn listener(&self, listener: ListenerIx) -> Option<&Listening> {
        self.listeners.get(listener).and_then(Option::as_ref)
    }

    pub(super) fn listener_mut(&mut self, listener: ListenerIx) -> Option<&mut Listening> {
        self.listeners.get_mut(listener).and_then(Option::as_mut)
    }

    /// Registers a bound listener (for accepting, in the hand-off modes)
    /// at the first free index; returns it.
    pub(super) fn add_listener(
        &mut self,
        socket: std::net::TcpListener,
        node_key: Option<String>,
    ) -> Result<ListenerIx, AddListenerError> {
        let listener = match self.listeners.position(Option::is_none) {
            Some(free) => free,
            None if self.listeners.len() < MAX_LISTENERS => self.listeners.push(None),
            None => return Err(AddListenerError::TableFull),
        };
        self.install_listener(listener, socket, node_key)?;
        Ok(listener)
    }

    /// Puts a bound listener at index `listener` (a free one, which
    /// [`HandoffLoop::add_listener`] picks; or the one it had before
    /// `herd upgrade`).
    pub(super) fn install_listener(
        &mut self,
        listener: ListenerIx,
        socket: std::net::TcpListener,
        node_key: Option<String>,
    ) -> io::Result<()> {
        let local = socket.local_addr()?;
        let rotation = self.start_rotation(&socket, local);
        self.put_listener(listener, socket, node_key, rotation)
    }

    /// Puts a listener at `listener` with its kernel rotation, if it has one.
    pub(super) fn put_listener(
        &mut self,
        listener: ListenerIx,
        socket: std::net::TcpListener,
        node_key: Option<String>,
        rotation: Option<SlotRotation>,
    ) -> io::Result<()> {
        self.listeners.reach(listener, || None);
        let local = socket.local_addr()?;
        if rotation.is_some() {
            self.tally_due
                .get_or_insert(Instant::now() + TALLY_INTERVAL);
        }
        let mut socket = mio::net::TcpListener::from_std(socket);
        // In `shared` mode the workers accept; herd only keeps the socket.
        if !self.workers_accept() {
            self.poll.registry().register(
                &mut socket,
                listener_token(listener),
                Interest::READABLE,
            )?;
        }
        self.listeners[listener] = Some(Listening {
            socket,
            local,
            node_key,
            rotation,
        });
        self.counters.set_listener(listener, Some(local));
        Ok(())
    }

    /// Closes a listener bound for Node apps once no worker listens on it
    /// any more, as Node's primary closes a server then; what still waits
    /// for it is closed (no worker will ever take it). Configured
    /// listeners stay for herd's lifetime. A worker that exits keeps its
    /// servers: its replacement asks for the same ones, and a port that
    /// closed between the two would refuse clients.
    pub(super) fn release_if_unused(&mut self, listener: ListenerIx) {
        let Some(listening) = self.listener(listener) else {
            return;
        };
        let served = self
            .channels
            .iter()
            .flatten()
            .any(|w| w.node_serves(listener));
        if listening.node_key.is_none() || served {
            return;
        }
        let mut listening = self.listeners[listener].take().expect("looked up above");
        let _ = self.poll.registry().deregister(&mut listening.socket);
        self.counters.set_listener(listener, None);
        let closed = self.queue.clear_lane(listener);
        self.counters
            .dropped_queue_timeout
            .fetch_add(closed as u64, Relaxed);
        info!(
            listener = listener.get(),
            closed,
            addr = %listening.local,
            event = "listener_released",
            "released {} (no Node worker listens on it any more)",
            listening.local
        );
    }

    /// The kernel rotation for a new listener, if round-robin is to be
    /// dealt by the kernel. Where the kernel refuses (no CAP_BPF, an old
    /// kernel, a socket without SO_REUSEPORT), says why once and hands off.
    pub(super) fn start_rotation(
        &mut self,
        socket: &std::net::TcpListener,
        local: SocketAddr,
    ) -> Option<SlotRotation> {
        if !self.limits.kernel_rotation {
            return None;
        }
        match SlotRotation::start(socket.as_fd(), self.backlog) {
            Ok(rotation) => {
                self.tally_due
                    .get_or_insert(Instant::now() + TALLY_INTERVAL);
                Some(rotation)
            }
            Err(e) => {
                warn!(
                    addr = %local,
                    event = "kernel_rotation_unavailable",
                    "round-robin on {local} falls back to hand-offs over the cluster channel: {e}"
                );
                self.limits.kernel_rotation = false;
                None
            }
        }
    }

    /// Applies `change` for the worker on `channel` to every listener's
    /// rotation. (Ids, not an iterator over the table: `update_rotation`
    /// borrows the loop mutably.)
    pub(super) fn update_rotations(
        &mut self,
        channel: ChannelIx,
        change: fn(&mut SlotRotation, ChannelIx),
    ) {
        for listener in self.listeners.ids() {
            self.update_rotation(listener, channel, change);
        }
    }

    /// Applies `change` for the worker on `channel` to `listener`'s rotation
    /// (if it has one and the worker holds a socket of it) and brings the
    /// kernel in line.
    pub(super) fn update_rotation(
        &mut self,
        listener: ListenerIx,
        channel: ChannelIx,
        change: fn(&mut SlotRotation, ChannelIx),
    ) {
        let Some(rotation) = self
            .listeners
            .get_mut(listener)
            .and_then(Option::as_mut)
            .and_then(|l| l.rotation.as_mut())
        else {
            return;
        };
        if !rotation.holds(channel) {
            return;
        }
        change(rotation, channel);
        apply_rotation(self.poll.registry(), rotation, listener);
    }

    /// Reads what the kernel dealt per slot into the counters, as if herd
    /// had handed those connections off itself.
    pub(super) fn tally_kernel_rotations(&mut self) {
        for listener in self.listeners.ids() {
            let Some(rotation) = self
                .listener_mut(listener)
                .and_then(|l| l.rotation.as_mut())
            else {
                continue;
            };
            let dealt = match rotation.take_dealt() {
                Ok(dealt) => dealt,
                Err(e) => {
                    debug!(
                        listener = listener.get(),
                        "cannot read the kernel rotation's counts: {e}"
                    );
                    continue;
                }
            };
            for (slot, count) in dealt {
                self.counters.accepted[listener].fetch_add(count, Relaxed);
                self.counters.kernel_dealt.fetch_add(count, Relaxed);
                if let Some(handed_off) = self.counters.handed_off.get(slot) {
                    handed_off.fetch_add(count, Relaxed);
                }
                let Some(worker) = self
                    .active
                    .get(slot)
                    .copied()
                    .flatten()
                    .and_then(|channel| self.channels[channel].as_mut())
                else {
                    continue;
                };
                worker.acked += count;
                if worker.count_sent(count) {
                    let _ = self.events.send(Event::RecycleDue {
                        worker: worker.worker,
                    });
                }
            }
        }
    }

    /// Answers a Node worker's `listen` (its `queryServer`): with the
    /// listener that serves it (its address as `sockname`; in `shared` mode
    /// the socket itself), or with the errno of why there is none.
    pub(super) fn answer_query(&mut self, channel: ChannelIx, query: node_ipc::QueryServer) {
        let listener = self.listener_for(&query);
        if let Ok(listener) = listener {
            if self
                .listener(listener)
                .is_some_and(|l| l.rotation.is_some())
                && self.answer_with_slot_socket(channel, listener, &query)
            {
                return;
            }
        }
        let shared = self.workers_accept();
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        let Protocol::Node(node) = &mut worker.protocol else {
            return;
        };
        let fd = worker.channel.as_fd();
        let seq = node.next_seq();
        let sent = match listener {
            Err((errno, why)) => {
                warn!(
                    slot = worker.slot.get(),
                    pid = worker.pid,
                    key = %query.key,
                    errno = ?errno,
                    event = "listen_refused",
                    "refused a Node worker's listen ({}): {why}",
                    errno.desc()
                );
                let errno = Some(node_ipc::uv_errno(errno));
                node.send_line(fd, node_ipc::query_reply(&query, None, errno, seq))
            }
            Ok(listener) if shared => {
                let Some(listening) = self.listeners[listener].as_ref() else {
                    return;
                };
                node.add_server(listener, query.key.clone());
                let line = node_ipc::query_reply_with_server(&query, seq);
                node.send_server(fd, line, listening.socket.as_fd())
            }
            Ok(listener) => {
                // Node checks that the port it asked for is the one bound
                // (else EADDRINUSE): when herd serves `listen(3000)` on a
                // configured listener with another port, `sockname` (and so
                // `server.address()`) keeps the asked-for port.
                let Some(local) = self.listeners[listener].as_ref().map(|l| l.local) else {
                    return;
                };
                let sockname = match query.port {
                    Some(asked) if asked != 0 => SocketAddr::new(local.ip(), asked),
                    _ => local,
                };
                node.add_server(listener, query.key.clone());
                let line = node_ipc::query_reply(&query, Some(sockname), None, seq);
                node.send_line(fd, line)
            }
        };
        self.after_node_send(channel, sent);
    }

    /// Kernel rotation: answers a Node worker's `listen` on `listener` with
    /// its slot's socket, as Node's primary answers in `shared` mode, and
    /// puts the slot in the rotation. False if the worker must be served by
    /// hand-offs instead: the app asked for another port than the
    /// listener's (Node checks the socket's real port), or the slot socket
    /// could not be bound.
    pub(super) fn answer_with_slot_socket(
        &mut self,
        channel: ChannelIx,
        listener: ListenerIx,
        query: &node_ipc::QueryServer,
    ) -> bool {
        let Some(worker) = self.channels[channel].as_mut() else {
            return true;
        };
        let Some(Listening {
            local, rotation, ..
        }) = self.listeners[listener].as_mut()
        else {
            return false;
        };
        let Some(rotation) = rotation.as_mut() else {
            return false;
        };
        if query
            .port
            .is_some_and(|asked| asked != 0 && asked != local.port())
        {
            return false;
        }
        let socket = match rotation.hold(worker.slot, channel) {
            Ok(socket) => socket,
            Err(e) => {
                warn!(
                    slot = worker.slot.get(),
                    event = "worker_rotation_unavailable",
                    "hand-offs instead of kernel rotation for this worker: {e}"
                );
                return false;
            }
        };
        let Protocol::Node(node) = &mut worker.protocol else {
            return true;
        };
        node.add_server(listener, query.key.clone());
        let seq = node.next_seq();
        let line = node_ipc::query_reply_with_server(query, seq);
        let sent = node.send_server(worker.channel.as_fd(), line, socket);
        apply_rotation(self.poll.registry(), rotation, listener);
        self.after_node_send(channel, sent);
        true
    }

    /// The listener for a Node worker's `listen`. With listeners configured,
    /// the one on the port the app asked for, else the first. Without, the
    /// one bound for this key before (so `listen(0)` picks a port once and
    /// every worker shares it), or one bound now, as Node's primary binds:
    /// no address means `[::]`, dual-stack, falling back to `0.0.0.0`.
    pub(super) fn listener_for(
        &mut self,
        query: &node_ipc::QueryServer,
    ) -> Result<ListenerIx, (nix::Error, String)> {
        use nix::Error as Errno;
        if self.stopped_accepting {
            return Err((Errno::ESHUTDOWN, "herd is stopping".into()));
        }
        let Some(port) = query.port else {
            return Err((
                Errno::EAFNOSUPPORT,
                "herd serves TCP ports only (not Unix socket paths or UDP)".into(),
            ));
        };
        if query.fd.is_some() {
            return Err((
                Errno::EINVAL,
                "listen({fd}) names a socket of the worker's, which herd cannot share".into(),
            ));
        }
        if !self.listen_on_demand {
            return self.configured_listener_for(port);
        }
        if let Some(listener) = self.listeners.position(|l| {
            l.as_ref()
                .is_some_and(|l| l.node_key.as_deref() == Some(query.key.as_str()))
        }) {
            return Ok(listener);
        }
        if self.listeners.len() >= MAX_LISTENERS && self.listeners.iter().all(Option::is_some) {
            // Not EMFILE: herd has fds; its listener table is what is full.
            return Err((
                Errno::ENOBUFS,
                format!(
                    "herd holds at most {MAX_LISTENERS} listeners (MAX_LISTENERS), and as many servers are open; close one, or listen on a shared port"
                ),
            ));
        }
        let socket = self.bind_for_node(query, port)?;
        let listener = self
            .add_listener(socket, Some(query.key.clone()))
            .map_err(|e| match e {
                AddListenerError::TableFull => (Errno::ENOBUFS, e.to_string()),
                AddListenerError::Io(io) => (
                    io.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
                    io.to_string(),
                ),
            })?;
        let local = self.listener(listener).expect("just added").local;
        info!(
            listener = listener.get(),
            addr = %local,
            key = %query.key,
            event = "listening",
            "listening on {local} (asked for by a Node worker: {})",
            query.key
        );
        Ok(listener)
    }

    /// With listeners configured: the one on the port a Node app asked
    /// for, else the first.
    fn configured_listener_for(&self, port: u16) -> Result<ListenerIx, (nix::Error, String)> {
        use nix::Error as Errno;
        let by_port = self
            .listeners
            .position(|l| l.as_ref().is_some_and(|l| l.local.port() == port));
        let shared = self.workers_accept();
        match by_port {
            Some(listener) => Ok(listener),
            // Node checks the real socket's port in `shared` mode.
            None if shared && port != 0 => Err((
                Errno::EADDRINUSE,
                format!(
                    "in shared mode a Node app must listen on the port herd listens on, or 0 (it asked for {port}); or leave `listen` out and herd binds what the app asks"
                ),
            )),
            None if self.listener(ListenerIx(0)).is_none() => {
                Err((Errno::ESHUTDOWN, "herd is stopping".into()))
            }
            None => Ok(ListenerIx(0)),
        }
    }

    /// Binds what a Node app asked for, as Node's primary binds: no
    /// address means `[::]`, dual-stack, falling back to `0.0.0.0`.
    fn bind_for_node(
        &self,
        query: &node_ipc::QueryServer,
        port: u16,
    ) -> Result<std::net::TcpListener, (nix::Error, String)> {
        use nix::Error as Errno;
        let failed = |e: listener::ListenError| (e.source, e.to_string());
        let options = BindOptions {
            // A kernel rotation needs a SO_REUSEPORT group to deal over.
            reuse_port: self.limits.kernel_rotation,
            v6_only: query.ipv6_only,
        };
        match &query.address {
            None => {
                let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
                listener::bind_with(any6, self.backlog, options).or_else(|e| match e.source {
                    Errno::EAFNOSUPPORT | Errno::EADDRNOTAVAIL => {
                        let any4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
                        let options = BindOptions {
                            v6_only: true,
                            ..options
                        };
                        listener::bind_with(any4, self.backlog, options)
                    }
                    _ => Err(e),
                })
            }
            Some(text) => match text.parse::<std::net::IpAddr>() {
                Ok(ip) => listener::bind_with(SocketAddr::new(ip, port), self.backlog, options),
                Err(_) => {
                    return Err((Errno::EINVAL, format!("{text:?} is not an IP address")));
                }
            },
        }
        .map_err(failed)
    }
}

/// Hands the kernel `listener`'s rotation as it now stands (and herd the
/// slot sockets it takes over); a failure is logged, the rotation kept as
/// the kernel last had it.
pub(super) fn apply_rotation(
    registry: &mio::Registry,
    rotation: &mut SlotRotation,
    listener: ListenerIx,
) {
    if let Err(e) = rotation.apply(registry, |slot| slot_token(listener, slot)) {
        error!(
            listener = listener.get(),
            event = "kernel_rotation_update_failed",
            "cannot update the kernel rotation: {e}"
        );
    }
}
