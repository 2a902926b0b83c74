//! Real servers the tests run beside herd, each of the test's own on
//! 127.0.0.1 and killed by its pid when dropped: `redis-server` (the seed's
//! session store) and Prometheus (scraping herd's `/metrics`); and a
//! [`Visitor`] of the seed's session app, which keeps its cookie.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// A `redis-server` of the test's own on 127.0.0.1, killed (by its pid) on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Redis {
    /// Starts redis-server on a free port and waits until it answers PING.
    /// None (the caller skips) if redis-server is not installed, but only
    /// outside CI: in CI its absence fails the test.
    pub fn start(name: &str) -> Option<Redis> {
        Redis::start_bound(name, &[])
    }

    /// [`Redis::start`], listening on the addresses `also` of this machine
    /// too (besides 127.0.0.1), for clients elsewhere (tests/hosts.rs).
    pub fn start_bound(name: &str, also: &[IpAddr]) -> Option<Redis> {
        if let Err(e) = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            skip_unless_ci(
                name,
                &format!("needs redis-server ({e}); scripts/test installs it"),
            );
            return None;
        }
        let dir = scratch_dir(&format!("{name}-redis"));
        let mut last_log = String::new();
        // Between finding the port free and redis-server binding it, another
        // process may take it; redis-server then exits, and we try another.
        for _ in 0..5 {
            let port = free_port();
            // (A failed try's drop removed it.)
            std::fs::create_dir_all(&dir).unwrap();
            let log = File::create(dir.join("redis.log")).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(also.iter().map(|addr| addr.to_string()))
                // Clients other than 127.0.0.1, with no password: let in.
                .args([
                    "--protected-mode",
                    if also.is_empty() { "yes" } else { "no" },
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start redis-server");
            // Owned before the wait, so a failed wait still kills it.
            let mut redis = Redis {
                child,
                port,
                dir: dir.clone(),
            };
            if redis.wait_for_pong() {
                return Some(redis);
            }
            last_log = redis.log();
        }
        panic!("redis-server exited at start 5 times; its last log:\n{last_log}");
    }

    /// true once the server answers PING; false if it exited first.
    fn wait_for_pong(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if ping(self.port).is_some_and(|answer| answer.starts_with("+PONG")) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} never answered PING; its log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The URL at one of the addresses it was started on.
    pub fn url_at(&self, addr: IpAddr) -> String {
        format!("redis://{addr}:{}", self.port)
    }
}

/// Sends `PING` to 127.0.0.1:`port` and returns the first line of the answer.
fn ping(port: u16) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(b"PING\r\n").ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 64];
    while !answer.ends_with(b"\r\n") && answer.len() < 1024 {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&answer).into_owned())
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Prometheus server of the test's own.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    api: SocketAddr,
}

impl Prometheus {
    /// Prometheus scraping herd's metrics at `target` every second.
    pub fn scraping(target: SocketAddr) -> Prometheus {
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: herd\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        Prometheus::with_config("prometheus", &config)
    }

    /// Prometheus running `config` (prometheus.yml's text), in a scratch
    /// directory named after `name`, its API on a free port.
    pub fn with_config(name: &str, config: &str) -> Prometheus {
        let dir = scratch_dir(name);
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, config).unwrap();
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus)");
        Prometheus { child, dir, api }
    }

    /// GET an API path; None until the server answers.
    pub fn api(&self, path: &str) -> Option<Value> {
        let mut stream = TcpStream::connect_timeout(&self.api, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        serde_json::from_str(&responses::parse(response.as_bytes()).ok()?.body).ok()
    }

    /// The value of an instant query that returns one series, if it does.
    pub fn query(&self, promql: &str) -> Option<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let answer = self.api(&format!("/api/v1/query?query={encoded}"))?;
        let result = answer["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Whether every target of the scrape config is up.
    pub fn targets_up(&self) -> bool {
        self.api("/api/v1/targets").is_some_and(|targets| {
            targets["data"]["activeTargets"]
                .as_array()
                .is_some_and(|t| !t.is_empty() && t.iter().all(|t| t["health"] == "up"))
        })
    }

    /// Waits (at most 60 s: Prometheus takes seconds to start and scrape)
    /// until `check` holds.
    pub fn wait_until(&self, what: &str, check: impl Fn(&Prometheus) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check(self) {
            assert!(Instant::now() < deadline, "Prometheus never saw {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A browser of the seed's Express + express-session app: keeps the
/// session cookie the app sets.
#[derive(Default)]
pub struct Visitor {
    cookie: Option<String>,
}

impl Visitor {
    /// One `GET /`: the answering worker's pid and the session's view count.
    pub fn visit(&mut self, addr: SocketAddr) -> (u32, u64) {
        let cookie = self
            .cookie
            .as_ref()
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        let page = load::exchange(addr, "/", &cookie).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(page.status, 200, "{page:?}");
        // `Set-Cookie: connect.sid=s%3A...; Path=/; Expires=...; HttpOnly`
        if let Some(cookie) = page.header("set-cookie") {
            self.cookie = Some(cookie.split(';').next().unwrap().to_string());
        }
        // `PID: 123 | Views: 4`
        let parsed = page.body.strip_prefix("PID: ").and_then(|rest| {
            let (pid, views) = rest.split_once(" | Views: ")?;
            Some((pid.parse().ok()?, views.parse().ok()?))
        });
        parsed.unwrap_or_else(|| panic!("{:?}", page.body))
    }

    /// `count` visits whose view count goes on from `seen` one by one,
    /// whichever worker answers; returns the pids that answered.
    pub fn visits(&mut self, addr: SocketAddr, seen: u64, count: u64) -> BTreeSet<u32> {
        let mut answered = Vec::new();
        for expected in seen + 1..=seen + count {
            let (pid, views) = self.visit(addr);
            answered.push((pid, views));
            assert_eq!(
                views, expected,
                "the session's count, kept in Redis: (pid, views) {answered:?}"
            );
        }
        answered.into_iter().map(|(pid, _)| pid).collect()
    }
}
