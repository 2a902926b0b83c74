//! The supervisor across `herd upgrade`: what it carries of its slots and
//! workers (the core's view, each process's pid and output pipes, the CPU
//! it used) and the supervisor the new herd starts from with them.
//!
//! The workers keep running through the exec: they are this process's
//! children still (an exec keeps the pid), their channels and pipes are
//! inherited, and their cgroups are found again by name. Per-slot sockets
//! are carried (`slot_sockets::handover`), each `ready = "notify"`
//! worker's notification socket with what it said there, and a Node app's
//! own primary (`node.primary = "run"`): its pid, age and pipes.

use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};

use super::*;
use crate::lifecycle::{Adopted, CarriedCore, CarriedSlot};

/// What the supervisor carries over `herd upgrade`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedSupervisor {
    /// Per slot: workers started to refill it, and whether it ever had one.
    pub slots: Vec<(u64, bool)>,
    pub workers: Vec<CarriedWorker>,
    pub next_worker: u64,
    pub cpu_seconds: Vec<f64>,
    /// `shared` mode: the sockets every worker inherits.
    pub shared_sockets: Vec<RawFd>,
    /// `reuseport` and kernel rotation of workers that accept themselves:
    /// every slot's sockets.
    #[serde(default)]
    pub slot_groups: Option<crate::slot_sockets::CarriedGroups>,
    /// `node.primary = "run"`: the app's own primary.
    #[serde(default)]
    pub app_primary: Option<crate::node_primary::supervise::CarriedAppPrimary>,
    /// Children not yet reaped that are not workers (the dry run).
    #[serde(default)]
    pub expected: Vec<u32>,
}

/// A serving worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedWorker {
    pub id: u64,
    pub slot: usize,
    pub pid: u32,
    /// How long it has run.
    pub age_ms: u64,
    pub announced: bool,
    /// herd's ends of its stdout and stderr pipes, while open.
    pub stdout: Option<RawFd>,
    pub stderr: Option<RawFd>,
    /// `ready = "notify"`: its NOTIFY_SOCKET, and what it said there.
    #[serde(default)]
    pub notify: Option<CarriedNotify>,
}

/// A worker's notification socket and what herd heard on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedNotify {
    pub fd: RawFd,
    pub status: Option<String>,
    pub watchdog_ms: Option<u64>,
    pub ping_ms_ago: Option<u64>,
}

impl CarriedSupervisor {
    /// Every fd it names, for the exec to keep open.
    pub fn fds(&self) -> Vec<RawFd> {
        let pipes = self
            .workers
            .iter()
            .flat_map(|w| [w.stdout, w.stderr, w.notify.as_ref().map(|n| n.fd)]);
        let groups = self.slot_groups.iter().flat_map(|g| g.fds());
        let primary = self.app_primary.iter().flat_map(|p| {
            p.running
                .iter()
                .flat_map(|&(_, _, stdout, stderr)| [stdout, stderr])
                .flatten()
        });
        pipes
            .flatten()
            .chain(self.shared_sockets.iter().copied())
            .chain(groups)
            .chain(primary)
            .collect()
    }
}

impl Supervisor {
    /// What `herd upgrade` carries, or why it cannot carry this herd now.
    pub fn carried(&self) -> Result<CarriedSupervisor, String> {
        let (shared_sockets, slot_groups) = match &self.sockets {
            WorkerSockets::HandOff => (Vec::new(), None),
            WorkerSockets::Shared(sockets) => {
                (sockets.iter().map(|s| s.as_raw_fd()).collect(), None)
            }
            WorkerSockets::PerSlot(groups) => (Vec::new(), Some(groups.carried())),
        };
        let core = self.core.carried()?;
        let now = Instant::now();
        let mut workers = Vec::with_capacity(core.workers.len());
        for adopted in &core.workers {
            let process = self
                .processes
                .get(&adopted.id)
                .ok_or_else(|| format!("the worker in slot {} has no process", adopted.slot))?;
            let pipe = |i: usize| process.output.get(i).and_then(|p| p.as_ref()?.fd());
            let notify = process._notify.as_ref().and_then(|listening| {
                let (status, watchdog_ms, ping_ms_ago) = process.heard.carried(now);
                Some(CarriedNotify {
                    fd: listening.fd()?,
                    status,
                    watchdog_ms,
                    ping_ms_ago,
                })
            });
            workers.push(CarriedWorker {
                id: adopted.id.0,
                slot: adopted.slot.get(),
                pid: adopted.pid,
                age_ms: u64::try_from(now.saturating_duration_since(adopted.started).as_millis())
                    .unwrap_or(u64::MAX),
                announced: adopted.announced,
                stdout: pipe(0),
                stderr: pipe(1),
                notify,
            });
        }
        Ok(CarriedSupervisor {
            slots: core
                .slots
                .iter()
                .map(|s| (s.restarts, s.filled_before))
                .collect(),
            workers,
            next_worker: core.next_worker,
            cpu_seconds: self.cpu_seconds.clone(),
            shared_sockets,
            slot_groups,
            app_primary: self.app_primary.as_ref().map(|p| p.carried(now)),
            expected: self.expected.iter().copied().collect(),
        })
    }

    /// The sockets `shared` mode's workers inherit, taken back from `carried`.
    pub fn carried_sockets(carried: &CarriedSupervisor) -> std::io::Result<WorkerSockets> {
        if let Some(groups) = &carried.slot_groups {
            let groups = crate::slot_sockets::SlotGroups::adopt(groups.clone())?;
            return Ok(WorkerSockets::PerSlot(groups));
        }
        if carried.shared_sockets.is_empty() {
            return Ok(WorkerSockets::HandOff);
        }
        let sockets = carried
            .shared_sockets
            .iter()
            .map(|&fd| {
                herd_protocol::fdpass::adopt_inherited_fd(fd).map(std::net::TcpListener::from)
            })
            .collect::<std::io::Result<_>>()?;
        Ok(WorkerSockets::Shared(sockets))
    }

    /// This supervisor (made by [`Supervisor::new`], nothing started) takes
    /// over the carried workers: the core serves them, their output is
    /// forwarded again, their cgroups found. Slots without a worker are
    /// filled by the next event.
    pub fn adopt(&mut self, carried: CarriedSupervisor) {
        let now = Instant::now();
        let settings = self.settings().clone();
        let workers: Vec<Adopted> = carried
            .workers
            .iter()
            .map(|w| Adopted {
                id: WorkerId(w.id),
                slot: SlotIx(w.slot),
                pid: w.pid,
                started: now
                    .checked_sub(Duration::from_millis(w.age_ms))
                    .unwrap_or(now),
                announced: w.announced,
            })
            .collect();
        let core = CarriedCore {
            slots: carried
                .slots
                .iter()
                .map(|&(restarts, filled_before)| CarriedSlot {
                    restarts,
                    filled_before,
                })
                .collect(),
            workers: workers.clone(),
            next_worker: carried.next_worker,
        };
        self.core = Lifecycle::adopted(Policy::of(&settings), core, settings.workers);
        self.cpu_seconds = carried.cpu_seconds;
        self.expected.extend(carried.expected);
        if let (Some(primary), Some(was)) = (self.app_primary.as_mut(), &carried.app_primary) {
            primary.adopt(was, settings.framing);
        }
        self.cpu_seconds.resize(self.core.slot_count(), 0.0);
        for (worker, adopted) in carried.workers.iter().zip(workers) {
            self.adopt_process(worker, adopted, settings.framing, now);
        }
    }

    /// One carried worker's process: its output forwarded again, its
    /// cgroup and notification socket found, filed under its pid.
    fn adopt_process(
        &mut self,
        worker: &CarriedWorker,
        adopted: Adopted,
        framing: crate::worker_output::Framing,
        now: Instant,
    ) {
        let output = [(worker.stdout, false), (worker.stderr, true)].map(|(fd, stderr)| {
            let fd = herd_protocol::fdpass::adopt_inherited_fd(fd?).ok()?;
            worker_output::forward_worker(fd, adopted.slot, adopted.pid, stderr, framing)
        });
        let leaf = self.leaf_for(adopted.slot, adopted.id).ok().flatten();
        let (notify, heard) = match &worker.notify {
            Some(carried) => {
                let watchdog = carried.watchdog_ms.map(Duration::from_millis);
                let heard = Heard::restored(
                    now,
                    carried.status.clone(),
                    carried.watchdog_ms,
                    carried.ping_ms_ago,
                );
                let socket = crate::notify::NotifySocket::adopt(carried.fd, watchdog).ok();
                let listening =
                    socket.and_then(|s| s.listen(adopted.id, adopted.pid, self.notes.clone()));
                (listening, heard)
            }
            None => (None, Heard::new(None)),
        };
        self.by_pid.insert(adopted.pid, adopted.id);
        self.processes.insert(
            adopted.id,
            Process {
                pid: adopted.pid,
                slot: adopted.slot,
                started: adopted.started,
                last_sample: None,
                cpu_percent: 0.0,
                leaf,
                _notify: notify,
                heard,
                _probe: None,
                output: output.into(),
            },
        );
    }
}
