//! File-descriptor passing, and preparing a child's fds before `exec`.
//!
//! Owns the raw system calls that move file descriptors between processes:
//! creating a worker channel, `sendmsg`/`recvmsg` with one SCM_RIGHTS fd, and
//! making a channel end (or a listening socket) survive `exec` in exactly one
//! child. Everything above this module works with `OwnedFd`/`BorrowedFd`.
//!
//! We call libc directly rather than `nix::sys::socket::sendmsg` because the
//! latter allocates its control-message buffer on every call, and sending is
//! on the per-connection hot path; here the buffer lives on the stack.

#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// Room for the control message of up to `MAX_FDS_PER_MESSAGE` fds; aligned
/// for `cmsghdr` because the kernel and the CMSG_* macros require it.
#[repr(C)]
union ControlBuffer {
    _align: libc::cmsghdr,
    bytes: [u8; CONTROL_LEN],
}

/// Room for `cmsghdr` (16 bytes) and [`MAX_FDS_PER_MESSAGE`] fds, rounded up.
const CONTROL_LEN: usize = 16 + 4 * MAX_FDS_PER_MESSAGE + 16;

/// The most fds one message carries (a hand-off batch,
/// [`crate::wire::MAX_BATCH`]); a peer that sends more has the rest closed
/// by the kernel, and the message is refused as truncated.
pub const MAX_FDS_PER_MESSAGE: usize = crate::wire::MAX_BATCH;

/// Creates a worker channel: a `SOCK_SEQPACKET` socketpair with both ends
/// close-on-exec. Returns (primary end, non-blocking; child end, blocking).
pub fn channel_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket_pair(SockType::SeqPacket)
}

fn socket_pair(kind: SockType) -> io::Result<(OwnedFd, OwnedFd)> {
    let (primary, child) = socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC)?;
    set_nonblocking(primary.as_fd(), true)?;
    Ok((primary, child))
}

/// Sets or clears O_NONBLOCK.
pub fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if nonblocking {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Sends one message with `fd` attached as SCM_RIGHTS. Never blocks (returns
/// `WouldBlock` when the channel is full) and never raises SIGPIPE. On a
/// SOCK_SEQPACKET socket the message is sent whole or not at all.
pub fn send_with_fd(channel: BorrowedFd<'_>, payload: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    sendmsg_with_fd(channel, payload, fd).map(|_| ())
}

/// Like [`send_with_fd`] but returns how many bytes went out: on a
/// SOCK_STREAM socket (Node's IPC channel) a send can be partial. The fd
/// travels with the first byte, so the rest is sent with [`send_stream`].
pub fn sendmsg_with_fd(
    channel: BorrowedFd<'_>,
    payload: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<usize> {
    sendmsg_with_fds(channel, payload, &[fd.as_raw_fd()])
}

/// Sends one message with every fd of `fds` (at most
/// [`MAX_FDS_PER_MESSAGE`]) in one SCM_RIGHTS control message, as
/// [`send_with_fd`] does with one: a hand-off batch.
pub fn send_with_fds(channel: BorrowedFd<'_>, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    sendmsg_with_fds(channel, payload, fds).map(|_| ())
}

fn sendmsg_with_fds(channel: BorrowedFd<'_>, payload: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.is_empty() || fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a message carries 1 to MAX_FDS_PER_MESSAGE fds",
        ));
    }
    let mut control = ControlBuffer {
        bytes: [0; CONTROL_LEN],
    };
    let fds_len = std::mem::size_of_val(fds) as u32;
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the
    // sendmsg call (iov, control and payload are locals/borrows), and the
    // CMSG_* macros are used exactly as cmsg(3) prescribes on a buffer that
    // is aligned for cmsghdr and large enough for CMSG_SPACE(MAX fds),
    // which `fds` does not exceed (checked above).
    let sent = unsafe {
        let mut msg: libc::msghdr = MaybeUninit::zeroed().assume_init();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.bytes.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(fds_len) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fds_len) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr().cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            fds_len as usize,
        );
        libc::sendmsg(
            channel.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// Sends what fits of `payload` on a SOCK_STREAM socket without blocking
/// or SIGPIPE; returns how many bytes went out.
pub fn send_stream(channel: BorrowedFd<'_>, payload: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::MsgFlags;
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    Ok(nix::sys::socket::send(channel.as_raw_fd(), payload, flags)?)
}

/// Creates a Node.js IPC channel: an AF_UNIX SOCK_STREAM socketpair, both
/// ends close-on-exec. Returns (herd's end, non-blocking; the child's end).
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket_pair(SockType::Stream)
}

/// Sends one message without fds. Never raises SIGPIPE. `dontwait` makes it
/// non-blocking regardless of the socket's mode.
pub fn send(channel: BorrowedFd<'_>, payload: &[u8], dontwait: bool) -> io::Result<()> {
    use nix::sys::socket::MsgFlags;
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if dontwait {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    nix::sys::socket::send(channel.as_raw_fd(), payload, flags)?;
    Ok(())
}

/// A received message: its length in the caller's buffer and the fd that
/// came with it, if any. Received fds are close-on-exec.
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fd: Option<OwnedFd>,
}

/// Receives one message (without blocking when `dontwait`). `Ok(None)` means
/// the peer closed the channel. A message longer than `buf` is an error
/// (`InvalidData`), as is more than one fd; surplus fds are closed, never leaked.
pub fn recv_with_fd(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
    dontwait: bool,
) -> io::Result<Option<Received>> {
    recv_message(channel, buf, dontwait, true)
}

/// [`recv_with_fd`], with the received fd close-on-exec only when
/// `cloexec` (the preload library's `accept4` honours `SOCK_CLOEXEC`).
pub fn recv_message(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
    dontwait: bool,
    cloexec: bool,
) -> io::Result<Option<Received>> {
    let Some(mut received) = recv_batch(channel, buf, dontwait, cloexec)? else {
        return Ok(None);
    };
    if received.fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message carried more than one file descriptor",
        ));
    }
    Ok(Some(Received {
        len: received.len,
        fd: received.fds.pop(),
    }))
}

/// A received message with every fd that came with it (a hand-off batch).
#[derive(Debug)]
pub struct ReceivedBatch {
    pub len: usize,
    /// In the order they were sent; close-on-exec when asked.
    pub fds: Vec<OwnedFd>,
}

/// Receives one message with up to [`MAX_FDS_PER_MESSAGE`] fds. `Ok(None)`
/// means the peer closed the channel. A message longer than `buf`, or with
/// more fds than that, is an error (`InvalidData`); every fd received is
/// owned (closed on drop), never leaked.
pub fn recv_batch(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
    dontwait: bool,
    cloexec: bool,
) -> io::Result<Option<ReceivedBatch>> {
    let mut control = ControlBuffer {
        bytes: [0; CONTROL_LEN],
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut flags = if cloexec { libc::MSG_CMSG_CLOEXEC } else { 0 };
    if dontwait {
        flags |= libc::MSG_DONTWAIT;
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: as in send_with_fd, every pointer in msghdr refers to a live
    // local. After recvmsg we walk the control messages the kernel wrote
    // with CMSG_FIRSTHDR/CMSG_NXTHDR, bounded by msg_controllen, and take
    // ownership of each SCM_RIGHTS fd exactly once (the kernel installed
    // them in our table just for us), so each OwnedFd is unique.
    let (received, msg_flags) = unsafe {
        let mut msg: libc::msghdr = MaybeUninit::zeroed().assume_init();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.bytes.as_mut_ptr().cast();
        msg.msg_controllen =
            libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * size_of::<RawFd>()) as u32) as _;
        let received = libc::recvmsg(channel.as_raw_fd(), &mut msg, flags);
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        (received as usize, msg.msg_flags)
    };
    if received == 0 && fds.is_empty() {
        return Ok(None);
    }
    if msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message or its file descriptors were truncated",
        ));
    }
    Ok(Some(ReceivedBatch { len: received, fds }))
}

/// The first fd a child inherits: 0-2 are stdio (systemd's `SD_LISTEN_FDS_START`).
pub const FIRST_INHERITED_FD: RawFd = 3;

/// Arranges for a child process to get `inherited` as fds 3, 4, 5, … in
/// that order (systemd's convention; everything else herd holds is
/// close-on-exec), to be SIGKILLed if herd dies, so no worker outlives its
/// primary even when herd is SIGKILLed, and, given `cgroup_procs` (an open
/// `cgroup.procs` of the worker's cgroup), to move itself into that cgroup
/// before it runs a single instruction of the program. Given `nofile`
/// (soft, hard), the child gets that `RLIMIT_NOFILE` back: herd raises its
/// own soft limit, which a `select(2)`-based worker must not inherit.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked dies, so callers must
/// spawn from a thread that lives as long as herd (the main thread).
pub fn prepare_child(
    command: &mut std::process::Command,
    inherited: Vec<RawFd>,
    cgroup_procs: Option<RawFd>,
    nofile: Option<(u64, u64)>,
) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // Copies are made above the target range first, so that placing fd i
    // can never overwrite a source not yet placed.
    let above_targets = FIRST_INHERITED_FD + inherited.len() as RawFd;
    // SAFETY: the closure runs between fork and exec, so it only makes
    // async-signal-safe system calls (write, fcntl, dup2, setrlimit, prctl,
    // getppid) and touches no locks or allocator; `inherited` is read, not
    // mutated, and the rlimit is a plain struct on the closure's stack.
    // `cgroup_procs` is written before any dup2, which could otherwise
    // have replaced that fd number with an inherited socket.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = cgroup_procs {
                // "0" moves the writing process itself (cgroup v2).
                if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (offset, &fd) in inherited.iter().enumerate() {
                let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above_targets);
                if copy < 0 {
                    return Err(io::Error::last_os_error());
                }
                // dup2 leaves the new fd without FD_CLOEXEC: it survives exec.
                // The close-on-exec copy goes away with the exec.
                if libc::dup2(copy, FIRST_INHERITED_FD + offset as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((soft, hard)) = nofile {
                let limit = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // herd may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                return Err(io::Error::other(
                    "herd exited while this worker was starting",
                ));
            }
            Ok(())
        });
    }
}

/// Arranges for a child process to run as `uid`:`gid` with exactly the
/// supplementary `groups` (as `initgroups(3)` computed them, before the
/// fork: reading the group database is not async-signal-safe).
///
/// `std::process::Command::uid` cannot do this on stable Rust: it clears
/// the supplementary groups and has no way to set them. The switch happens
/// in this order because each step needs the privilege the next drops:
/// setgroups, setgid, then setuid. Call this before [`prepare_child`]: a
/// change of credentials clears `PR_SET_PDEATHSIG`, so the death signal
/// must be set after the switch, and `pre_exec` hooks run in the order they
/// were added.
pub fn run_as_user(command: &mut std::process::Command, uid: u32, gid: u32, groups: Vec<u32>) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = groups.into_iter().map(|g| g as libc::gid_t).collect();
    // SAFETY: the closure runs between fork and exec, so it only makes
    // async-signal-safe system calls (setgroups, setgid, setuid) and
    // touches no locks or allocator: `groups` was built before the fork and
    // is only read, its pointer and length valid for the whole call.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid as libc::gid_t) < 0
                || libc::setuid(uid as libc::uid_t) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Registers a worker's channel end with the tokio reactor (readable and
/// writable), non-blocking. Must be called inside a tokio runtime.
pub fn async_channel(channel: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    use tokio::io::{unix::AsyncFd, Interest};
    set_nonblocking(channel.as_fd(), true)?;
    // SAFETY: the AsyncFd takes the OwnedFd by value and never exposes it
    // mutably, so the descriptor stays open and refers to the same file for
    // the AsyncFd's whole lifetime, as register_with_interest requires.
    unsafe { AsyncFd::register_with_interest(channel, Interest::READABLE | Interest::WRITABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Clears (`inherit`) or sets close-on-exec on the fd numbered `fd`, which
/// the caller holds open through some owner it cannot borrow from here
/// (`herd upgrade` keeps every fd it names open across its exec). Fails
/// with EBADF if no such fd is open.
pub fn set_inherited(fd: RawFd, inherit: bool) -> io::Result<()> {
    let flags = if inherit { 0 } else { libc::FD_CLOEXEC };
    // SAFETY: F_SETFD only changes the descriptor's close-on-exec flag; on
    // a number that is not open it fails with EBADF and touches nothing.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How many bytes this end of a Unix socket has sent that the peer has not
/// yet taken off its queue (`SIOCOUTQ`: the kernel's count of what is still
/// charged to the sender). 0: the peer has read every message sent.
pub fn unread_by_peer(channel: BorrowedFd<'_>) -> io::Result<usize> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points at
    // a live local of that type.
    let done = unsafe { libc::ioctl(channel.as_raw_fd(), libc::TIOCOUTQ, &mut bytes) };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes.max(0) as usize)
}

/// Whether an fd numbered `fd` is open in this process.
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; on a number that
    // is not open it fails with EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Takes ownership of an fd number a worker was told about in its environment.
///
/// Fails unless `fd` is open; the caller must not use the number elsewhere,
/// which holds for `HERD_CHANNEL_FD` since nothing else in the worker knows it.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (checked above) and, per this function's
    // contract, owned by nobody else in this process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep it away from anything this worker execs in turn.
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_fd_crosses_the_channel_with_its_payload() {
        let (primary, worker) = channel_pair().unwrap();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        send_with_fd(primary.as_fd(), b"hello", theirs.as_fd()).unwrap();
        drop(theirs);

        let mut buf = [0u8; 64];
        let received = recv_with_fd(worker.as_fd(), &mut buf, false)
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..received.len], b"hello");
        let mut passed = UnixStream::from(received.fd.expect("an fd"));
        passed.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    #[test]
    fn a_full_channel_says_would_block_instead_of_blocking() {
        let (primary, _worker) = channel_pair().unwrap();
        let (_a, b) = UnixStream::pair().unwrap();
        let mut sent = 0;
        let error = loop {
            match send_with_fd(primary.as_fd(), &[0u8; 52], b.as_fd()) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 100_000, "channel never filled");
        };
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        assert!(sent > 0);
    }

    #[test]
    fn closed_peer_reads_as_none() {
        let (primary, worker) = channel_pair().unwrap();
        drop(worker);
        let mut buf = [0u8; 8];
        assert!(recv_with_fd(primary.as_fd(), &mut buf, true)
            .unwrap()
            .is_none());
        let error = send(primary.as_fd(), b"x", true).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EPIPE));
    }

    #[test]
    fn a_batch_of_fds_crosses_in_order_and_one_fd_reads_refuse_it() {
        let (primary, worker) = channel_pair().unwrap();
        let pairs: Vec<(UnixStream, UnixStream)> = (0..MAX_FDS_PER_MESSAGE)
            .map(|_| UnixStream::pair().unwrap())
            .collect();
        let theirs: Vec<RawFd> = pairs.iter().map(|(_, t)| t.as_raw_fd()).collect();
        send_with_fds(primary.as_fd(), b"batch", &theirs).unwrap();
        let mut buf = [0u8; 64];
        let received = recv_batch(worker.as_fd(), &mut buf, true, true)
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..received.len], b"batch");
        assert_eq!(received.fds.len(), MAX_FDS_PER_MESSAGE);
        for (i, (fd, (ours, _))) in received.fds.into_iter().zip(&pairs).enumerate() {
            let mut passed = UnixStream::from(fd);
            passed.write_all(&[i as u8]).unwrap();
            let mut got = [0u8; 1];
            (&*ours).read_exact(&mut got).unwrap();
            assert_eq!(got[0], i as u8, "fd {i} arrived out of order");
        }
        // Too many, or none, is refused before anything is sent.
        let too_many = vec![theirs[0]; MAX_FDS_PER_MESSAGE + 1];
        assert!(send_with_fds(primary.as_fd(), b"x", &too_many).is_err());
        assert!(send_with_fds(primary.as_fd(), b"x", &[]).is_err());
        // A reader that takes one fd refuses a message with two (and closes both).
        send_with_fds(primary.as_fd(), b"two", &theirs[..2]).unwrap();
        let error = recv_with_fd(worker.as_fd(), &mut buf, true).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn what_the_peer_has_not_read_is_counted_until_it_reads_it() {
        let (primary, worker) = channel_pair().unwrap();
        assert_eq!(unread_by_peer(primary.as_fd()).unwrap(), 0);
        send(primary.as_fd(), &[1u8; 52], true).unwrap();
        send(primary.as_fd(), &[2u8; 52], true).unwrap();
        let queued = unread_by_peer(primary.as_fd()).unwrap();
        assert!(queued >= 104, "{queued}");
        let mut buf = [0u8; 64];
        recv_with_fd(worker.as_fd(), &mut buf, true).unwrap();
        let left = unread_by_peer(primary.as_fd()).unwrap();
        assert!(left > 0 && left < queued, "{left} of {queued}");
        recv_with_fd(worker.as_fd(), &mut buf, true).unwrap();
        assert_eq!(unread_by_peer(primary.as_fd()).unwrap(), 0);
    }

    #[test]
    fn truncated_message_is_an_error() {
        let (primary, worker) = channel_pair().unwrap();
        send(primary.as_fd(), &[1u8; 32], true).unwrap();
        let mut small = [0u8; 8];
        let error = recv_with_fd(worker.as_fd(), &mut small, true).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
