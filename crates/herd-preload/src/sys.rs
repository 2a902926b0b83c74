//! The system calls the library makes, and the two per-fd tables it keeps.
//!
//! The calls this library interposes (`bind`, `listen`, `accept4`, `close`,
//! ...) are made here as raw `syscall(2)`s, never through libc's symbols:
//! those symbols are this library's own, so calling them would recurse, and
//! resolving the next ones with `dlsym` may allocate, which a `close` made
//! inside `malloc` must not. Everything else (`recvmsg`, `send`, `fcntl`,
//! `poll`) goes through libc as usual.
//!
//! [`FdTable`] is a flat array of `AtomicU64` indexed by fd, mapped once at
//! load: lock-free, so safe in any thread and across `fork`, and no
//! allocation on the hot path.

use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use libc::{c_int, c_long, sockaddr, socklen_t};

/// Sets `errno` and returns -1, as a failed libc call does.
pub fn fail(errno: c_int) -> c_int {
    // SAFETY: __errno_location returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() = errno };
    -1
}

pub fn errno() -> c_int {
    // SAFETY: as in `fail`.
    unsafe { *libc::__errno_location() }
}

/// One raw system call; -1 and `errno` on failure.
///
/// # Safety
/// The arguments must be what system call `number` takes: any pointer
/// among them valid for what the call reads or writes through it.
unsafe fn raw(number: c_long, args: [c_long; 5]) -> c_int {
    let [a, b, c, d, e] = args;
    // SAFETY: the caller's promise, above.
    unsafe { libc::syscall(number, a, b, c, d, e) as c_int }
}

/// The system calls this library interposes, as the kernel has them.
/// Each `# Safety`: the pointers must be valid as for the libc call of the
/// same name (they are the program's own, passed on unchanged).
///
/// # Safety
/// `addr` valid for `len` bytes.
pub unsafe fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: as the caller promises.
    unsafe {
        raw(
            libc::SYS_bind,
            [fd.into(), addr as c_long, len.into(), 0, 0],
        )
    }
}

pub fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: no pointers.
    unsafe { raw(libc::SYS_listen, [fd.into(), backlog.into(), 0, 0, 0]) }
}

/// # Safety
/// `addr` null or valid for `*len` bytes, `len` null or valid.
pub unsafe fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    let args = [fd.into(), addr as c_long, len as c_long, flags.into(), 0];
    // SAFETY: as the caller promises.
    unsafe { raw(libc::SYS_accept4, args) }
}

/// # Safety
/// As [`accept4`].
pub unsafe fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let args = [fd.into(), addr as c_long, len as c_long, 0, 0];
    // SAFETY: as the caller promises.
    unsafe { raw(libc::SYS_getsockname, args) }
}

pub fn close(fd: c_int) -> c_int {
    // SAFETY: no pointers.
    unsafe { raw(libc::SYS_close, [fd.into(), 0, 0, 0, 0]) }
}

pub fn close_range(first: libc::c_uint, last: libc::c_uint, flags: libc::c_int) -> c_int {
    let args = [first.into(), last.into(), flags.into(), 0, 0];
    // SAFETY: no pointers.
    unsafe { raw(libc::SYS_close_range, args) }
}

pub fn dup3(from: c_int, to: c_int, flags: c_int) -> c_int {
    // SAFETY: no pointers.
    unsafe { raw(libc::SYS_dup3, [from.into(), to.into(), flags.into(), 0, 0]) }
}

pub fn shutdown(fd: c_int, how: c_int) -> c_int {
    // SAFETY: no pointers.
    unsafe { raw(libc::SYS_shutdown, [fd.into(), how.into(), 0, 0, 0]) }
}

/// # Safety
/// `value` valid for `len` bytes.
pub unsafe fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *const libc::c_void,
    len: socklen_t,
) -> c_int {
    let args = [
        fd.into(),
        level.into(),
        name.into(),
        value as c_long,
        len.into(),
    ];
    // SAFETY: as the caller promises.
    unsafe { raw(libc::SYS_setsockopt, args) }
}

/// # Safety
/// `value` valid for `*len` bytes, `len` valid.
pub unsafe fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *mut libc::c_void,
    len: *mut socklen_t,
) -> c_int {
    let args = [
        fd.into(),
        level.into(),
        name.into(),
        value as c_long,
        len as c_long,
    ];
    // SAFETY: as the caller promises.
    unsafe { raw(libc::SYS_getsockopt, args) }
}

/// An `int` socket option (SO_TYPE, SO_DOMAIN, SO_ACCEPTCONN).
pub fn int_option(fd: RawFd, name: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    let pointer = (&mut value as *mut c_int).cast();
    // SAFETY: `value` and `len` are locals of the sizes given.
    let got = unsafe { getsockopt(fd, libc::SOL_SOCKET, name, pointer, &mut len) };
    (got == 0).then_some(value)
}

/// Sets or clears `O_NONBLOCK` on `fd`'s open file description.
pub fn set_nonblocking(fd: RawFd, on: bool) {
    // SAFETY: fcntl on an fd number only reads or sets its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            let flags = if on {
                flags | libc::O_NONBLOCK
            } else {
                flags & !libc::O_NONBLOCK
            };
            libc::fcntl(fd, libc::F_SETFL, flags);
        }
    }
}

pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: as in `set_nonblocking`.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

pub fn is_nonblocking(fd: RawFd) -> bool {
    // SAFETY: as in `set_nonblocking`.
    unsafe { libc::fcntl(fd, libc::F_GETFL) & libc::O_NONBLOCK != 0 }
}

pub fn is_cloexec(fd: RawFd) -> bool {
    // SAFETY: as in `set_nonblocking`.
    unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
}

pub fn set_cloexec(fd: RawFd) {
    // SAFETY: as in `set_nonblocking`.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Makes `to` another fd for `from`'s socket (closing what `to` was),
/// keeping `to`'s close-on-exec flag and blocking mode: the program still
/// holds "its" socket, as it made it.
pub fn replace(from: RawFd, to: RawFd) -> Result<(), c_int> {
    let cloexec = is_cloexec(to);
    let nonblocking = is_nonblocking(to);
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // The raw call: libc's `dup3` is this library's own (see `takeover`).
    // `to` is the program's socket, which it handed to bind() and so
    // expects to keep using under that number.
    if dup3(from, to, flags) < 0 {
        return Err(errno());
    }
    set_nonblocking(to, nonblocking);
    Ok(())
}

pub fn pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

/// The program's own graceful stop: what herd's SIGTERM would be.
pub fn terminate_self() {
    // SAFETY: kill on our own pid.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

/// Reads an IPv4 or IPv6 socket address the program passed; `None` for
/// any other family (Unix sockets pass through untouched).
///
/// # Safety
/// `addr` must be null or valid for `len` bytes.
pub unsafe fn read_address(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: the caller says `addr` holds `len` bytes; the family is read
    // first and the rest only when `len` covers that family's struct. The
    // program's buffer may be unaligned, hence read_unaligned.
    unsafe {
        match c_int::from(addr.cast::<libc::sa_family_t>().read_unaligned()) {
            libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
                let a = addr.cast::<libc::sockaddr_in>().read_unaligned();
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
            }
            libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
                let a = addr.cast::<libc::sockaddr_in6>().read_unaligned();
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                let port = u16::from_be(a.sin6_port);
                let v6 = SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id);
                Some(SocketAddr::V6(v6))
            }
            _ => None,
        }
    }
}

/// Writes `address` as the kernel would for `accept`/`getsockname`: at most
/// `*len` bytes (truncated silently), and `*len` set to the full size.
///
/// # Safety
/// `addr` must be null, or valid for `*len` bytes with `len` valid.
pub unsafe fn write_address(address: SocketAddr, addr: *mut sockaddr, len: *mut socklen_t) {
    if addr.is_null() || len.is_null() {
        return;
    }
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let size = match address {
        SocketAddr::V4(v4) => {
            let a = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and aligned for it.
            unsafe { storage.as_mut_ptr().cast::<libc::sockaddr_in>().write(a) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let a = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { storage.as_mut_ptr().cast::<libc::sockaddr_in6>().write(a) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: the caller says `addr` holds `*len` bytes; we copy no more
    // than that and no more than `size` (what `storage` holds).
    unsafe {
        let room = (*len as usize).min(size);
        std::ptr::copy_nonoverlapping(storage.as_ptr().cast::<u8>(), addr.cast::<u8>(), room);
        *len = size as socklen_t;
    }
}

/// Sends one message on the channel, whatever the blocking mode the
/// program gave the socket: a full channel (herd reads it continuously)
/// is waited on for up to [`SEND_PATIENCE_MS`], then the message is lost
/// (herd then retries an unacknowledged connection elsewhere).
pub fn send(fd: RawFd, bytes: &[u8]) -> bool {
    let deadline = 50;
    for _ in 0..deadline {
        // SAFETY: send from a live slice.
        let sent = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent >= 0 {
            return true;
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN => {
                let mut poll = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one pollfd on the stack.
                unsafe { libc::poll(&mut poll, 1, (SEND_PATIENCE_MS / deadline) as c_int) };
            }
            _ => return false,
        }
    }
    false
}

/// How long a send waits for room on a full channel, in milliseconds.
pub const SEND_PATIENCE_MS: u64 = 5_000;

/// A value per fd, 0 meaning none, for fds below the table's size.
pub struct FdTable {
    slots: *const AtomicU64,
    len: usize,
}

// SAFETY: the table is only ever accessed through atomics.
unsafe impl Sync for FdTable {}
// SAFETY: as above; the mapping lives as long as the process.
unsafe impl Send for FdTable {}

impl FdTable {
    /// Maps a table for fds `0..len`, reserved lazily by the kernel (pages
    /// are only backed once touched). `wipe_on_fork`: a child starts with
    /// an empty table (MADV_WIPEONFORK) instead of its parent's.
    pub fn map(len: usize, wipe_on_fork: bool) -> Option<FdTable> {
        let bytes = len * size_of::<AtomicU64>();
        // SAFETY: a fresh private anonymous mapping, not aliased by anything.
        let pointer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if pointer == libc::MAP_FAILED {
            return None;
        }
        if wipe_on_fork {
            // SAFETY: advice on our own mapping. Failing (kernels before
            // 4.14) leaves the parent's entries in a child: it then reports
            // CLOSED for connections it inherited, as the parent may too.
            unsafe { libc::madvise(pointer, bytes, libc::MADV_WIPEONFORK) };
        }
        Some(FdTable {
            slots: pointer.cast(),
            len,
        })
    }

    fn slot(&self, fd: RawFd) -> Option<&AtomicU64> {
        let index = usize::try_from(fd).ok().filter(|i| *i < self.len)?;
        // SAFETY: index < len, inside the mapping, which is never unmapped;
        // zeroed memory is a valid AtomicU64 0.
        Some(unsafe { &*self.slots.add(index) })
    }

    /// How many fds the table covers (0 to this, exclusive).
    pub fn covers(&self) -> usize {
        self.len
    }

    pub fn get(&self, fd: RawFd) -> u64 {
        self.slot(fd).map_or(0, |slot| slot.load(Relaxed))
    }

    /// Sets the value; false if `fd` is past the table.
    pub fn set(&self, fd: RawFd, value: u64) -> bool {
        self.slot(fd)
            .map(|slot| slot.store(value, Relaxed))
            .is_some()
    }

    /// Takes the value, leaving 0.
    pub fn take(&self, fd: RawFd) -> u64 {
        self.slot(fd).map_or(0, |slot| slot.swap(0, Relaxed))
    }
}

/// How many fds the tables cover: the hard `RLIMIT_NOFILE` (a process
/// cannot open more, unless root raises it), at least 1024, at most 2^20
/// (8 MiB of address space per table, touched only where fds are).
pub fn table_len() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a struct on the stack.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_max
    } else {
        0
    };
    (hard.min(1 << 20) as usize).max(1024)
}
