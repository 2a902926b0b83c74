//! A "host" of the test's own: a Linux network namespace joined to the
//! root namespace by a veth pair with a private /30 of its own (root side
//! `.1`, the namespace's `eth0` `.2`), both removed on drop, panic or not.
//!
//! Names and subnets are unique per process and per host: the namespace is
//! `herd-<pid>-<n>`, the root-side veth `hx<pid>-<n>` (at most 15 bytes,
//! the kernel's limit), `n` a counter of this process. The /30 is chosen
//! among 10.0.0.0/8 under a file lock that every test process takes, and
//! only where no route of this machine overlaps it, so two test binaries
//! run in parallel by nextest (or another checkout's) never share one.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use nix::fcntl::{Flock, FlockArg};

/// Taken while choosing a subnet and configuring it, by every test process.
const LOCK: &str = "/tmp/herd-test-hosts.lock";

/// Namespaces made by this process so far (the `n` of the names).
static MADE: AtomicU32 = AtomicU32::new(0);

/// `ip ARGS`: Ok, or Err with what it printed.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("ip {}: {}", args.join(" "), err.trim()))
    }
}

/// One network namespace and its link to the root namespace.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name, for `ip netns exec`.
    pub name: String,
    /// The root side of the veth pair; deleting it deletes both ends.
    pub veth: String,
    /// The root namespace's address on the link: what the host reaches
    /// the shared servers (Redis) at.
    pub gateway: Ipv4Addr,
    /// The host's own address, on its `eth0`: what herd binds.
    pub addr: Ipv4Addr,
}

impl Netns {
    /// A new namespace with its link up; Err (nothing left behind) if this
    /// machine will not make one (not root, no `ip netns`).
    pub fn create() -> Result<Netns, String> {
        let file = File::create(LOCK).map_err(|e| format!("{LOCK}: {e}"))?;
        // Released when dropped, at the end of this function.
        let _lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("lock {LOCK}: {e}"))?;
        remove_leftovers();
        let pid = std::process::id();
        let n = MADE.fetch_add(1, SeqCst);
        let block = free_block(pid.wrapping_mul(2_654_435_761).wrapping_add(n * 7919))?;
        let netns = Netns {
            name: format!("herd-{pid}-{n}"),
            veth: format!("hx{pid}-{n}"),
            gateway: address_in(block, 1),
            addr: address_in(block, 2),
        };
        ip(&["netns", "add", &netns.name])?;
        // From here on, dropping `netns` removes what was made.
        netns.configure()?;
        Ok(netns)
    }

    /// The veth pair (its inner end made inside the namespace, as `eth0`),
    /// the addresses, every link up, loopback too.
    fn configure(&self) -> Result<(), String> {
        let (ns, veth) = (self.name.as_str(), self.veth.as_str());
        let gateway = format!("{}/30", self.gateway);
        let addr = format!("{}/30", self.addr);
        ip(&[
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["addr", "add", &gateway, "dev", veth])?;
        ip(&["link", "set", veth, "up"])?;
        let inside = ["netns", "exec", ns, "ip"];
        let run = |args: &[&str]| ip(&[&inside[..], args].concat());
        run(&["addr", "add", &addr, "dev", "eth0"])?;
        run(&["link", "set", "eth0", "up"])?;
        run(&["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// `ip netns exec NAME`, to put before a command run inside.
    pub fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes the other.
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Address `host` (1 or 2) of /30 number `block` of 10.0.0.0/8.
fn address_in(block: u32, host: u32) -> Ipv4Addr {
    Ipv4Addr::from((10 << 24) | ((block & 0x3f_ffff) << 2) | host)
}

/// A /30 of 10.0.0.0/8 that no route here overlaps, trying from `start`
/// on. The caller holds the lock, so no other test takes it meanwhile.
fn free_block(start: u32) -> Result<u32, String> {
    let taken = routes()?;
    (0..4096)
        .map(|i| start.wrapping_add(i) & 0x3f_ffff)
        // Not 10.0.0.0/30 nor the top one: the ends of the range.
        .filter(|&block| block != 0 && block != 0x3f_ffff)
        .find(|&block| {
            let net = u32::from(address_in(block, 0));
            taken
                .iter()
                .all(|&(other, len)| !overlaps(net, 30, other, len))
        })
        .ok_or_else(|| "no free /30 in 10.0.0.0/8".to_string())
}

/// Whether two IPv4 networks share an address.
fn overlaps(a: u32, a_len: u32, b: u32, b_len: u32) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

/// Every IPv4 destination in the root namespace's routing tables (but the
/// default route), as (network, prefix length): the subnets in use.
fn routes() -> Result<Vec<(u32, u32)>, String> {
    let text = ip(&["-4", "route", "show", "table", "all"])?;
    let types = ["local", "broadcast", "unicast", "unreachable", "prohibit"];
    let mut routes = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace().peekable();
        if words.peek().is_some_and(|w| types.contains(w)) {
            words.next();
        }
        let Some(dest) = words.next() else { continue };
        let (addr, len) = dest.split_once('/').unwrap_or((dest, "32"));
        if let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>()) {
            if len > 0 {
                routes.push((u32::from(addr), len));
            }
        }
    }
    Ok(routes)
}

/// Namespaces and veths of test processes that are gone (killed before
/// their drop ran, e.g. by nextest's timeout): removed, so their subnets
/// and names are free again. Only ours (`herd-<pid>-<n>`, `hx<pid>-<n>`)
/// of a pid no longer running.
fn remove_leftovers() {
    let dead = |pid: &str| {
        pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    };
    let netns = ip(&["netns", "list"]).unwrap_or_default();
    for name in netns.lines().filter_map(|l| l.split_whitespace().next()) {
        let pid = name.strip_prefix("herd-").and_then(|r| r.split_once('-'));
        if pid.is_some_and(|(pid, _)| dead(pid)) {
            let _ = ip(&["netns", "del", name]);
        }
    }
    let links = ip(&["-o", "link", "show", "type", "veth"]).unwrap_or_default();
    for line in links.lines() {
        // `7: hx123-0@if2: <BROADCAST,...`
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let pid = name.strip_prefix("hx").and_then(|r| r.split_once('-'));
        if pid.is_some_and(|(pid, _)| dead(pid)) {
            let _ = ip(&["link", "del", name]);
        }
    }
}
