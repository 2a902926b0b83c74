//! Issue 17, point 9: past one machine, on real parts. Three hosts, each a
//! Linux network namespace with a link and addresses of its own, each
//! running one herd with the seed's Express + express-session +
//! connect-redis app; a shared `redis-server` for the sessions, a real
//! HAProxy balancing round-robin across the hosts with HTTP checks on
//! herd's `/readyz`, and a real Prometheus scraping every herd
//! (tests/common/hosts.rs makes them all). Under a steady load of clients
//! each keeping its session cookie: a session's count goes on whichever
//! host answers, Prometheus sees every host, and a host drained with
//! SIGTERM (herd's `shutdown_delay` longer than HAProxy's checks take to
//! see it) loses no request, exits 0, and is then down in Prometheus.
//!
//! HAProxy runs the shipped deploy/haproxy/haproxy.cfg, only its addresses
//! swapped, and the README shows its backend as the file has it.
//!
//! Needs root (network namespaces), haproxy, redis-server, prometheus and
//! node (scripts/test installs them) and `npm ci` in
//! tests/fixtures/node-express; without root or a program it is skipped,
//! except in CI (`CI` set), where it fails. Run it with
//! `cargo nextest run --test hosts`.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use common::hosts::haproxy::{check_config, config_for, shipped_config};
use common::hosts::steady::{
    assert_every_visit_answered, assert_sessions_counted_on, SteadyLoad, Visit,
};
use common::hosts::*;
use common::servers::Prometheus;
use common::*;

/// Clients of the steady load: not a multiple of the hosts, so no client
/// keeps meeting the same host in turn.
const CLIENTS: usize = 4;

/// Answered visits to see after each step before the next.
const STEADY: usize = 40;

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shipped config's lines from `backend herd` on, comments left out.
fn backend_of(config: &str) -> Vec<String> {
    let start = config.find("\nbackend herd").expect("a `backend herd`");
    config[start..]
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn the_shipped_haproxy_cfg_parses_as_shipped_and_as_the_test_runs_it() {
    let test = "the_shipped_haproxy_cfg_parses_as_shipped_and_as_the_test_runs_it";
    if !programs_here(test) {
        return;
    }
    let shipped = read(&shipped_config());
    check_config(&shipped_config()).unwrap_or_else(|e| panic!("haproxy -c: {e}"));
    let dir = scratch_dir("hosts-haproxy-check");
    let hosts: Vec<Ipv4Addr> = ["10.9.0.2", "10.9.0.6", "10.9.0.10"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080));
    let ours = config_for(&shipped, listen, &dir.join("admin.sock"), &hosts);
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, &ours).unwrap();
    check_config(&path).unwrap_or_else(|e| panic!("haproxy -c (the test's): {e}\n{ours}"));
    // The test's backend is the shipped one with its servers swapped.
    let servers = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| !l.starts_with("server "))
            .cloned()
            .collect()
    };
    assert_eq!(servers(&backend_of(&ours)), servers(&backend_of(&shipped)));
    assert!(ours.contains(&format!("server host3 10.9.0.10:{APP_PORT}")));
    // The ports the hosts' herds use are the shipped file's.
    let shipped_servers = backend_of(&shipped);
    let shipped_servers: Vec<&String> = shipped_servers
        .iter()
        .filter(|l| l.starts_with("server "))
        .collect();
    assert!(!shipped_servers.is_empty());
    for line in shipped_servers {
        assert!(line.ends_with(&format!(":{APP_PORT}")), "{line}");
    }
    assert!(shipped.contains(&format!("check port {METRICS_PORT}")));
    // The README shows the backend as the file has it.
    let section = readme_section("Beyond one machine");
    for line in backend_of(&shipped) {
        assert!(section.contains(&line), "README lacks {line:?}");
    }
    assert!(section.contains("cargo nextest run --test hosts"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The hosts each client's visits were answered by, in the order of its
/// visits; panics at a pid no host reported.
fn hosts_per_client(hosts: &Hosts, visits: &[Visit]) -> Vec<BTreeSet<usize>> {
    let mut per_client = vec![BTreeSet::new(); CLIENTS];
    for visit in visits {
        if let Ok(page) = visit.answer {
            let host = hosts
                .host_of(page.pid)
                .unwrap_or_else(|| panic!("pid {} is no host's worker", page.pid));
            per_client[visit.client].insert(host);
        }
    }
    per_client
}

/// Waits until every host has answered and every client's session has
/// been answered by at least two hosts.
fn wait_for_sessions_across_hosts(hosts: &Hosts, load: &SteadyLoad) {
    wait_until(
        "every host answering, every session on two hosts or more",
        || {
            let per_client = hosts_per_client(hosts, &load.visits());
            let all: BTreeSet<usize> = per_client.iter().flatten().copied().collect();
            (all.len() == hosts.len() && per_client.iter().all(|h| h.len() >= 2)).then_some(())
        },
    );
}

/// Prometheus has every host's target up and herd's metrics from each.
fn prometheus_sees_every_host(hosts: &Hosts, prometheus: &Prometheus) -> bool {
    let targets = prometheus.api("/api/v1/targets");
    let active = targets
        .as_ref()
        .and_then(|t| t["data"]["activeTargets"].as_array().cloned())
        .unwrap_or_default();
    active.len() == hosts.len()
        && prometheus.targets_up()
        && prometheus.query("sum(up{job=\"herd\"})") == Some(hosts.len() as f64)
        && (0..hosts.len()).all(|i| {
            let instance = hosts.host(i).metrics();
            let ready =
                format!("herd_workers{{job=\"herd\",instance=\"{instance}\",state=\"ready\"}}");
            let any = format!("count({{__name__=~\"herd_.+\",instance=\"{instance}\"}})");
            prometheus.query(&format!("up{{instance=\"{instance}\"}}")) == Some(1.0)
                && prometheus.query(&ready) == Some(WORKERS as f64)
                && prometheus.query(&any).is_some_and(|n| n > 0.0)
        })
}

#[test]
fn sessions_go_on_across_hosts_and_a_drained_host_loses_no_request() {
    let Some(mut hosts) = Hosts::start("hosts-drain", 3) else {
        return;
    };
    let prometheus = hosts.prometheus();
    let load = SteadyLoad::start(hosts.haproxy_addr(), CLIENTS);
    wait_for_sessions_across_hosts(&hosts, &load);
    prometheus.wait_until("every host's herd, up, with its metrics", |p| {
        prometheus_sees_every_host(&hosts, p)
    });

    // Host 1 drained as a machine is taken out: SIGTERM, herd's /readyz
    // fails while it serves on for shutdown_delay, HAProxy takes it out.
    let drained = 1;
    load.settle(STEADY);
    hosts.drain(drained);
    load.settle(STEADY);
    let status = hosts.wait_exit(drained);
    load.settle(STEADY);
    let visits = load.finish();
    assert!(
        status.success(),
        "host {drained}'s herd exited {status:?}; logs:\n{}",
        hosts.logs()
    );
    assert_every_visit_answered(&visits);
    let pages = assert_sessions_counted_on(&visits);
    assert_eq!(pages.len(), CLIENTS, "every client was answered");
    let per_client = hosts_per_client(&hosts, &visits);
    assert!(
        per_client.iter().all(|h| h.len() >= 2),
        "each session answered by several hosts: {per_client:?}"
    );
    // And Prometheus sees the drained host gone, the others still up.
    let gone = hosts.host(drained).metrics();
    prometheus.wait_until("the drained host's target down", |p| {
        p.query(&format!("up{{instance=\"{gone}\"}}")) == Some(0.0)
            && p.query("sum(up{job=\"herd\"})") == Some(hosts.len() as f64 - 1.0)
    });
    let answered_by = |host: usize| {
        visits
            .iter()
            .filter(|v| {
                v.answer
                    .as_ref()
                    .is_ok_and(|p| hosts.host_of(p.pid) == Some(host))
            })
            .count()
    };
    eprintln!(
        "{} visits, all answered; by host: {:?}",
        visits.len(),
        (0..hosts.len()).map(answered_by).collect::<Vec<_>>()
    );
}

// ---- a rolling `herd upgrade` of every host ----

/// Every host's herd re-executes itself in place (`herd upgrade`), one
/// host after the other, under the same load through HAProxy: no request
/// fails, each herd keeps its pid and its workers, the sessions go on.
#[test]
fn a_rolling_upgrade_of_every_host_loses_nothing() {
    let Some(hosts) = Hosts::start("hosts-upgrade", 3) else {
        return;
    };
    let load = SteadyLoad::start(hosts.haproxy_addr(), CLIENTS);
    wait_for_sessions_across_hosts(&hosts, &load);
    for i in 0..hosts.len() {
        let host = hosts.host(i);
        let before = host.herd_pid();
        let run = hosts.herd_cli(i, &["upgrade"]);
        assert_eq!(
            run.code,
            Some(0),
            "host {i}: {run:?}\n{}",
            host.herd().log_text()
        );
        assert!(run.stdout.contains("upgraded"), "{run:?}");
        assert_eq!(
            host.herd_pid(),
            before,
            "host {i}: herd re-executed in place"
        );
        assert_eq!(
            host.herd().wait_all_ready(WORKERS),
            host.pids,
            "host {i}: the same workers"
        );
        hosts.haproxy().wait_for_server(i, "UP");
        load.settle(STEADY);
    }
    let visits = load.finish();
    assert_every_visit_answered(&visits);
    assert_sessions_counted_on(&visits);
}
