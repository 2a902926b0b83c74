//! Several hosts on this machine, each a network namespace running one
//! herd with the seed's Express + express-session + connect-redis app
//! (tests/hosts.rs, README "Beyond one machine"): [`Hosts::start`] makes
//! the namespaces ([`netns`]), a `redis-server` in the root namespace that
//! every host reaches over its own link (the shared session store), one
//! herd per host, and a real HAProxy in front ([`haproxy`]), and waits until
//! HAProxy has every host UP. [`steady::SteadyLoad`] is the clients.
//!
//! Each herd runs as a deployment would: its config file (written into the
//! host's scratch directory) listens on the host's own address, port
//! [`APP_PORT`], serves `/metrics` and `/readyz` on [`METRICS_PORT`], has
//! its control socket in that directory and a `shutdown_delay`; the same
//! ports on every host, each namespace having ports of its own.
//!
//! Everything is the test's own and stopped by its pid (HAProxy, herd,
//! Redis, Prometheus) or deleted by name (namespaces, veths) on drop,
//! panic or not. herd's workers go with herd: they die with it (herd sets
//! their parent-death signal).
//!
//! `ip netns exec` runs herd in a mount namespace of its own with a fresh
//! `/sys`, so herd sees no cgroup filesystem there and tracks workers by
//! process group (it logs `no_cgroups`), as in a container without one.

pub mod haproxy;
pub mod netns;
pub mod steady;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use super::servers::{Prometheus, Redis};
use super::*;
use haproxy::Haproxy;
use netns::Netns;

/// The app's port on every host (deploy/haproxy/haproxy.cfg's `server` lines).
pub const APP_PORT: u16 = 3000;

/// herd's metrics endpoint on every host (haproxy.cfg's `check port`).
pub const METRICS_PORT: u16 = 9464;

/// Workers per herd.
pub const WORKERS: usize = 2;

/// herd's `shutdown_delay`: longer than HAProxy's `inter` × `fall`
/// (200ms × 1), so HAProxy has taken a stopping host out before herd closes
/// its listeners.
pub const SHUTDOWN_DELAY: &str = "2s";

/// The seed's session app; fails (never skips) when its packages are not
/// installed.
pub fn session_app() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node-express");
    for package in ["express", "express-session", "connect-redis", "redis"] {
        assert!(
            dir.join("node_modules")
                .join(package)
                .join("package.json")
                .is_file(),
            "{package} is not installed for the fixture: run `npm ci` in {} (scripts/test does)",
            dir.display()
        );
    }
    dir.join("session-app.js")
}

/// Whether every program the hosts need runs here; else `test` is skipped
/// (or, in CI, failed).
pub fn programs_here(test: &str) -> bool {
    let programs = [
        ("ip", "-V"),
        ("haproxy", "-v"),
        ("redis-server", "--version"),
        ("prometheus", "--version"),
        ("node", "--version"),
    ];
    programs.iter().all(|(program, flag)| {
        let ran = Command::new(program)
            .arg(flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match ran {
            Ok(_) => true,
            Err(e) => skip_unless_ci(
                test,
                &format!("needs {program} ({e}); scripts/test installs it"),
            ),
        }
    })
}

/// Whether this process's effective uid is 0 (`Uid:` in /proc/self/status:
/// real, effective, saved, fs).
fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        == Some("0")
}

/// One host: its namespace and the herd running in it.
pub struct Host {
    /// Dropped first: killing herd (and so its workers) before its
    /// namespace goes.
    herd: Herd,
    pub netns: Netns,
    /// herd's config file, which `herd CMD -c CONFIG` reads too.
    pub config: PathBuf,
    /// herd's control socket, as the config names it.
    pub control: PathBuf,
    /// The worker pids herd reported ready at start.
    pub pids: BTreeSet<u32>,
    /// herd has exited and been waited for: its pid is no longer ours.
    exited: bool,
}

impl Host {
    /// herd on `netns`, its sessions at `redis_url`, in a scratch directory
    /// named after `name` and `i`; once its workers are ready.
    fn start(name: &str, i: usize, netns: Netns, app: &Path, redis_url: &str) -> Host {
        let dir = scratch_dir(&format!("{name}-host{i}"));
        let control = dir.join("herd.sock");
        let config = dir.join("herd.toml");
        let addr = netns.addr;
        let text = format!(
            "# Host {i} of tests/hosts.rs: deploy/docker/herd.toml's keys, on the\n\
             # host's own address.\n\
             listen = [\"{addr}:{APP_PORT}\"]\n\
             workers = {WORKERS}\n\
             command = [\"node\", {app:?}]\n\
             control = {control:?}\n\
             # HAProxy's checks see /readyz fail well within this.\n\
             shutdown_delay = \"{SHUTDOWN_DELAY}\"\n\
             shutdown_timeout = \"10s\"\n\
             \n\
             [metrics]\n\
             address = \"{addr}:{METRICS_PORT}\"\n"
        );
        std::fs::write(&config, text).unwrap();
        let prefix = netns.exec_prefix();
        let herd = Herd::start_with(
            &dir,
            &prefix,
            &[("REDIS_URL", redis_url)],
            &["-c", config.to_str().unwrap()],
        );
        // `herd status` from the root namespace: a control socket is a
        // file, reached from any network namespace.
        let pids = herd.wait_all_ready(WORKERS);
        Host {
            herd,
            netns,
            config,
            control,
            pids,
            exited: false,
        }
    }

    /// The herd running on this host.
    pub fn herd(&self) -> &Herd {
        &self.herd
    }

    pub fn herd_pid(&self) -> u32 {
        self.herd.pid()
    }

    /// The app's address, as HAProxy's `server` line names it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.netns.addr, APP_PORT))
    }

    /// herd's metrics endpoint, which HAProxy checks and Prometheus scrapes.
    pub fn metrics(&self) -> SocketAddr {
        SocketAddr::from((self.netns.addr, METRICS_PORT))
    }

    /// The scratch directory herd runs in.
    pub fn dir(&self) -> &Path {
        &self.herd.dir
    }
}

/// The hosts, their shared Redis and the HAProxy in front.
pub struct Hosts {
    /// Dropped first, then the hosts, then Redis.
    haproxy: Haproxy,
    hosts: Vec<Host>,
    redis: Redis,
    name: String,
}

impl Hosts {
    /// `count` hosts, named after `name` (a scratch-directory prefix, also
    /// the test named when skipping), each with its herd ready and UP in
    /// HAProxy. None when this machine cannot run them (not root, no
    /// `ip netns`, a program missing), except in CI, where that fails.
    pub fn start(name: &str, count: usize) -> Option<Hosts> {
        let app = session_app();
        if !programs_here(name) {
            return None;
        }
        if !is_root() {
            skip_unless_ci(name, "needs root, for `ip netns` and veth links");
            return None;
        }
        let mut nets = Vec::new();
        for _ in 0..count {
            match Netns::create() {
                Ok(netns) => nets.push(netns),
                Err(e) => {
                    let why = format!("cannot make a network namespace: {e}");
                    skip_unless_ci(name, &why);
                    return None;
                }
            }
        }
        let gateways: Vec<IpAddr> = nets.iter().map(|n| IpAddr::V4(n.gateway)).collect();
        let redis = Redis::start_bound(name, &gateways)?;
        let hosts: Vec<Host> = nets
            .into_iter()
            .enumerate()
            .map(|(i, netns)| {
                let url = redis.url_at(IpAddr::V4(netns.gateway));
                Host::start(name, i, netns, &app, &url)
            })
            .collect();
        let addrs: Vec<_> = hosts.iter().map(|h| h.netns.addr).collect();
        let haproxy = Haproxy::start(name, &addrs);
        for i in 0..count {
            haproxy.wait_for_server(i, "UP");
        }
        Some(Hosts {
            haproxy,
            hosts,
            redis,
            name: name.to_string(),
        })
    }

    /// Where clients connect: HAProxy's frontend.
    pub fn haproxy_addr(&self) -> SocketAddr {
        self.haproxy.addr
    }

    pub fn haproxy(&self) -> &Haproxy {
        &self.haproxy
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// `herd ARGS -c CONFIG` run inside host `i`'s namespace (as an
    /// operator on that host would), waited for at most `DEADLINE`.
    pub fn herd_cli(&self, i: usize, args: &[&str]) -> CliRun {
        let host = &self.hosts[i];
        let config = host.config.to_str().unwrap();
        let args = [args, &["-c", config]].concat();
        herd_cli_under(host.dir(), &host.netns.exec_prefix(), &args, DEADLINE)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Which host the worker `pid` runs on, by the pids each herd
    /// reported at start.
    pub fn host_of(&self, pid: u32) -> Option<usize> {
        self.hosts.iter().position(|h| h.pids.contains(&pid))
    }

    /// Drains host `i` as a deployment stops a machine: SIGTERM to its
    /// herd; waits until herd has begun its `shutdown_delay` and HAProxy
    /// has taken the host out, and checks that it did so while herd was
    /// still serving (else the drain would lose requests, whatever the
    /// load says). Returns at once; [`Hosts::wait_exit`] waits for herd.
    pub fn drain(&self, i: usize) {
        let herd = &self.hosts[i].herd;
        signal(herd.pid(), nix::sys::signal::Signal::SIGTERM);
        herd.wait_for_event("stop_delayed", &[], 1);
        self.haproxy.wait_for_server(i, "DOWN");
        assert!(
            herd.events("stopping", &[]).is_empty(),
            "herd on host {i} stopped (shutdown_delay {SHUTDOWN_DELAY} over) before HAProxy \
             took the host out: the balancer's checks are slower than the delay"
        );
    }

    /// Waits for host `i`'s herd to exit; its exit status.
    pub fn wait_exit(&mut self, i: usize) -> ExitStatus {
        let status = self.hosts[i].herd.wait_exit();
        self.hosts[i].exited = true;
        status
    }

    /// A real Prometheus scraping every host's `/metrics` each second, as
    /// job `herd`.
    pub fn prometheus(&self) -> Prometheus {
        let targets: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("\"{}\"", h.metrics()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
             scrape_configs:\n  - job_name: herd\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        Prometheus::with_config(&format!("{}-prometheus", self.name), &config)
    }

    /// For diagnostics: every host's herd log, and HAProxy's.
    pub fn logs(&self) -> String {
        let mut logs: BTreeMap<String, String> = BTreeMap::new();
        for (i, host) in self.hosts.iter().enumerate() {
            logs.insert(format!("host {i}"), host.herd.log_text());
        }
        logs.insert("haproxy".into(), self.haproxy.log());
        logs.iter()
            .map(|(who, log)| format!("---- {who}\n{log}\n"))
            .collect()
    }
}

impl Drop for Hosts {
    /// Every herd still running is stopped as an operator would, by its
    /// pid: SIGINT (a stop without `shutdown_delay`), so herd stops its
    /// workers' process groups itself. Waits for that at most `DEADLINE`,
    /// never panicking (this may run while a failed test unwinds); what is
    /// left, each Herd's own drop SIGKILLs.
    fn drop(&mut self) {
        let running: Vec<u32> = self
            .hosts
            .iter()
            .filter(|h| !h.exited)
            .map(|h| h.herd.pid())
            .collect();
        for &pid in &running {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
        let deadline = std::time::Instant::now() + DEADLINE;
        // Exited, not yet waited for: a zombie, still ours.
        while running.iter().any(|&pid| procs::process_running(pid))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
