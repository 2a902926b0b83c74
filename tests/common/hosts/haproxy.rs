//! A real HAProxy of the test's own in the root namespace, running the
//! shipped deploy/haproxy/haproxy.cfg with only its addresses swapped (its
//! `bind` to 127.0.0.1 and a free port, its `stats socket` into a scratch
//! directory, its `server` lines to the test's hosts), in the foreground
//! (`-db`), killed by its pid on drop. Its runtime API (`show stat` on the
//! stats socket) says which backend servers are UP.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::super::*;
use super::APP_PORT;

/// The backend the shipped config balances the hosts in.
pub const BACKEND: &str = "herd";

/// The shipped config.
pub fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/haproxy.cfg")
}

/// `haproxy -c -f FILE`: Ok, or Err with what it said.
pub fn check_config(file: &Path) -> Result<(), String> {
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(file)
        .output()
        .map_err(|e| format!("haproxy: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(said)
    }
}

/// `shipped` (the config's text) with `bind` at `listen`, the stats socket
/// at `stats`, and one `server hostN ADDR:APP_PORT` per host (N from 1),
/// each keeping what the shipped file's first `server` line says after
/// its address; the shipped file's other `server` lines are left out.
pub fn config_for(shipped: &str, listen: SocketAddr, stats: &Path, hosts: &[Ipv4Addr]) -> String {
    let mut out = String::new();
    let mut servers_written = false;
    for line in shipped.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["bind", _, rest @ ..] => {
                out.push_str(&format!("{indent}bind {listen} {}\n", rest.join(" ")));
            }
            ["stats", "socket", _, rest @ ..] => {
                let path = stats.display();
                out.push_str(&format!("{indent}stats socket {path} {}\n", rest.join(" ")));
            }
            ["server", _, _, rest @ ..] => {
                if !servers_written {
                    for (i, addr) in hosts.iter().enumerate() {
                        let n = i + 1;
                        let rest = rest.join(" ");
                        out.push_str(&format!(
                            "{indent}server host{n} {addr}:{APP_PORT} {rest}\n"
                        ));
                    }
                    servers_written = true;
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert!(
        servers_written,
        "the shipped haproxy.cfg has no server line"
    );
    out
}

/// The name HAProxy knows host `i` (from 0) by: `hostN`, N from 1.
pub fn server_name(i: usize) -> String {
    format!("host{}", i + 1)
}

/// A running `haproxy -db`.
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
    /// Where clients connect: the frontend's `bind`.
    pub addr: SocketAddr,
    stats: PathBuf,
}

impl Haproxy {
    /// HAProxy balancing `hosts` (their addresses) with the shipped config,
    /// in a scratch directory named after `name`; once its stats socket
    /// answers.
    pub fn start(name: &str, hosts: &[Ipv4Addr]) -> Haproxy {
        let dir = scratch_dir(&format!("{name}-haproxy"));
        let stats = dir.join("admin.sock");
        let shipped = std::fs::read_to_string(shipped_config()).unwrap();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config_for(&shipped, addr, &stats, hosts)).unwrap();
        let log = File::create(dir.join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("haproxy (Debian package haproxy; scripts/test installs it)");
        // Owned before the wait, so a failed wait still kills it.
        let mut haproxy = Haproxy {
            child,
            dir,
            addr,
            stats,
        };
        wait_until("HAProxy's stats socket", || {
            let exited = haproxy.child.try_wait().unwrap();
            assert!(exited.is_none(), "haproxy exited: {}", haproxy.log());
            haproxy.servers().ok()
        });
        haproxy
    }

    /// What HAProxy wrote (its warnings, alerts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// The runtime API's answer to `command`.
    pub fn runtime(&self, command: &str) -> std::io::Result<String> {
        let mut socket = UnixStream::connect(&self.stats)?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// Each server of the backend: name → (status, last check's status),
    /// as `show stat` says them (`UP`, `DOWN`, ...; `L7OK`, `L7STS`, ...).
    pub fn servers(&self) -> std::io::Result<BTreeMap<String, (String, String)>> {
        let csv = self.runtime("show stat")?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .ok_or_else(|| std::io::Error::other(format!("no header in {csv:?}")))?
            .split(',')
            .collect();
        let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (px, sv) = (column("pxname"), column("svname"));
        let (status, check) = (column("status"), column("check_status"));
        let mut servers = BTreeMap::new();
        for row in lines.map(|l| l.split(',').collect::<Vec<&str>>()) {
            if row.len() == header.len()
                && row[px] == BACKEND
                && !["FRONTEND", "BACKEND"].contains(&row[sv])
            {
                let state = (row[status].to_string(), row[check].to_string());
                servers.insert(row[sv].to_string(), state);
            }
        }
        Ok(servers)
    }

    /// Waits until HAProxy has host `i`'s server in `status` (`UP` after a
    /// passed check, or `DOWN`).
    pub fn wait_for_server(&self, i: usize, status: &str) {
        let name = server_name(i);
        let mut last = None;
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let servers = self.servers().unwrap();
            let state = servers.get(&name).cloned();
            let passed =
                |(s, check): &(String, String)| s == status && (status != "UP" || check == "L7OK");
            if state.as_ref().is_some_and(passed) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "HAProxy never had {name} {status}; last {last:?}, now {servers:?}; log:\n{}",
                self.log()
            );
            last = state;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
