//! The TCP connections a set of processes holds, counted from their fd
//! tables and the kernel's socket tables (sock_diag, else /proc/net/tcp).

use std::collections::BTreeSet;

/// TCP connections, ESTABLISHED or CLOSE_WAIT, with local port `port`, that
/// any of `pids` has open: the requests it holds (a CLOSE_WAIT one is a
/// client that gave up, or a request read but not yet answered).
pub fn connections_held(pids: &[u32], port: u16) -> u64 {
    let mut inodes = BTreeSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    let held = |(local_port, inode): &(u16, u64)| *local_port == port && inodes.contains(inode);
    match sock_diag_tcp() {
        Ok(sockets) => sockets.iter().filter(|s| held(s)).count() as u64,
        Err(_) => proc_net_tcp().iter().filter(|s| held(s)).count() as u64,
    }
}

/// TCP socket states, as the kernel numbers them (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE_WAIT: u8 = 8;

/// (local port, inode) of every ESTABLISHED or CLOSE_WAIT TCP socket, from
/// the kernel's sock_diag netlink interface. The kernel filters by state,
/// so this stays fast when a run has left tens of thousands of
/// connections in TIME_WAIT, which /proc/net/tcp lists one by one (a
/// tenth of a second and more, with the victim stopped meanwhile).
pub fn sock_diag_tcp() -> Result<Vec<(u16, u64)>, String> {
    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(|e| format!("netlink socket: {e}"))?;
    // Never block for good on an answer that does not come.
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| format!("netlink timeout: {e}"))?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut found = Vec::new();
    for family in [libc_af(AddressFamily::Inet), libc_af(AddressFamily::Inet6)] {
        // struct nlmsghdr (16 bytes), then struct inet_diag_req_v2 (56).
        let mut request = Vec::with_capacity(72);
        request.extend_from_slice(&72u32.to_ne_bytes());
        request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        request.push(family);
        request.push(6); // IPPROTO_TCP
        request.push(0); // no extensions
        request.push(0);
        let states = (1u32 << TCP_ESTABLISHED) | (1u32 << TCP_CLOSE_WAIT);
        request.extend_from_slice(&states.to_ne_bytes());
        request.resize(72, 0); // inet_diag_sockid: any
        sendto(raw, &request, &NetlinkAddr::new(0, 0), MsgFlags::empty())
            .map_err(|e| format!("netlink send: {e}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded: a dump of a few sockets is one or two reads; a
        // machine full of connections, a few hundred.
        'dump: for _ in 0..100_000 {
            let len =
                recv(raw, &mut buf, MsgFlags::empty()).map_err(|e| format!("netlink recv: {e}"))?;
            if len == 0 {
                break;
            }
            let mut at = 0;
            while at + 16 <= len {
                let word = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
                let msg_len = word(at) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                if msg_len < 16 || at + msg_len > len {
                    return Err("netlink: malformed message".into());
                }
                match kind {
                    NLMSG_DONE => break 'dump,
                    NLMSG_ERROR => return Err("netlink: the kernel refused the dump".into()),
                    SOCK_DIAG_BY_FAMILY if msg_len >= 16 + 72 => {
                        // struct inet_diag_msg: family, state, timer, retrans,
                        // id (sport big-endian first), expires, rqueue,
                        // wqueue, uid, inode.
                        let msg = at + 16;
                        let state = buf[msg + 1];
                        let sport = u16::from_be_bytes([buf[msg + 4], buf[msg + 5]]);
                        let inode = u64::from(word(msg + 68));
                        if matches!(state, TCP_ESTABLISHED | TCP_CLOSE_WAIT) {
                            found.push((sport, inode));
                        }
                    }
                    _ => {}
                }
                // Messages are aligned to 4 bytes.
                at += (msg_len + 3) & !3;
            }
        }
    }
    Ok(found)
}

pub fn libc_af(family: nix::sys::socket::AddressFamily) -> u8 {
    family as i32 as u8
}

/// The same from /proc/net/tcp and tcp6, where netlink is not available.
pub fn proc_net_tcp() -> Vec<(u16, u64)> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || !matches!(fields[3], "01" | "08") {
                continue;
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if let (Some(port), Ok(inode)) = (local_port, fields[9].parse::<u64>()) {
                found.push((port, inode));
            }
        }
    }
    found
}
