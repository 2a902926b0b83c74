//! Starting a worker process: its sockets, cgroup, notification socket and
//! readiness probe, the process itself, and its channel handed to the
//! hand-off loop.

use super::*;

impl Supervisor {
    /// Starts probing worker `id` of `slot` where `ready` says so.
    fn probe(&mut self, settings: &Settings, slot: SlotIx, id: WorkerId) -> Option<Probing> {
        if !settings.ready.probes() {
            return None;
        }
        let (prober, addr) = self.sockets.per_slot()?.offer_probe(slot, id)?;
        let target = probe::Target {
            worker: id,
            slot,
            addr,
            prober,
        };
        probe::spawn(&settings.ready, target, self.notes.clone())
    }

    /// A cgroup for worker `id` of `slot` (kill_mode control-group).
    pub(super) fn leaf_for(&self, slot: SlotIx, id: WorkerId) -> Result<Option<Leaf>, String> {
        let Some(tree) = &self.cgroups else {
            return Ok(None);
        };
        match tree.leaf(&format!("slot{slot}.w{id}")) {
            Ok(leaf) => Ok(Some(leaf)),
            Err(e) => Err(format!(
                "cannot create its cgroup in {}: {e}",
                tree.path().display()
            )),
        }
    }

    /// Starts worker `id` for `slot` on `version`; its pid.
    pub(super) fn start(
        &mut self,
        id: WorkerId,
        slot: SlotIx,
        version: Version,
    ) -> Result<u32, String> {
        let _span = lifecycle::slot_span(slot).entered();
        let settings = self
            .versions
            .get(&version)
            .cloned()
            .ok_or("its configuration is gone")?;
        let program = settings.program.display().to_string();
        let listen_fds = self.sockets.for_slot(slot, id).map_err(|e| e.to_string())?;
        let leaf = self.leaf_for(slot, id)?;
        let notify = NotifySocket::for_worker(&settings, id)?;
        let started = process::spawn(Launch {
            settings: &settings,
            slot,
            workers: self.core.slot_count(),
            listen_fds,
            cgroup_procs: leaf.as_ref().map(Leaf::procs_fd),
            nofile: (self.fd_limit.soft != self.fd_limit.original)
                .then_some((self.fd_limit.original, self.fd_limit.hard)),
            notify: notify.as_ref(),
            served: &self.served,
        })
        .map_err(|e| format!("{program}: {e}"))?;
        let pid = started.pid;
        info!(
            slot = slot.get(),
            pid,
            event = "worker_started",
            "worker started"
        );
        let framing = settings.framing;
        let output = vec![
            worker_output::forward_worker(started.stdout, slot, pid, false, framing),
            worker_output::forward_worker(started.stderr, slot, pid, true, framing),
        ];
        let recycle_after = settings.recycle_after(id.0);
        let heard = Heard::new(notify.as_ref().and_then(|socket| socket.watchdog));
        let notify = notify.and_then(|socket| socket.listen(id, pid, self.notes.clone()));
        let probe = self.probe(&settings, slot, id);
        self.processes.insert(
            id,
            Process {
                pid,
                slot,
                started: Instant::now(),
                last_sample: None,
                cpu_percent: 0.0,
                leaf,
                _notify: notify,
                heard,
                _probe: probe,
                output,
            },
        );
        self.by_pid.insert(pid, id);
        let added = self.handoff.send(Command::AddWorker {
            worker: NewWorker {
                slot,
                worker: id,
                pid,
                node: Policy::of(&settings).node,
                recycle_after,
                hang_timeout: settings.hang_timeout,
                link: started.link,
            },
            channel: started.channel,
        });
        if let Err(e) = added {
            // No channel, no worker: it is killed and reaped like any other.
            process::signal_group(pid, Signal::SIGKILL);
            return Err(format!("hand-off loop: {e}"));
        }
        Ok(pid)
    }
}
