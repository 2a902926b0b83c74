//! The C symbols the dynamic loader binds the program's calls to, ahead of
//! libc's (`LD_PRELOAD`). Each is one call into [`crate::takeover`].

use libc::{c_int, c_void, sockaddr, socklen_t};

use crate::takeover;

/// # Safety
/// As `bind(2)`.
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the program's arguments, as bind(2) takes them.
    unsafe { takeover::bind(fd, addr, len) }
}

#[no_mangle]
pub extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    takeover::listen(fd, backlog)
}

/// # Safety
/// As `accept(2)`.
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: as accept(2) takes them.
    unsafe { takeover::accept4(fd, addr, len, 0) }
}

/// # Safety
/// As `accept4(2)`.
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: as accept4(2) takes them.
    unsafe { takeover::accept4(fd, addr, len, flags) }
}

#[no_mangle]
pub extern "C" fn close(fd: c_int) -> c_int {
    takeover::close(fd)
}

/// # Safety
/// As `getsockname(2)`.
#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: as getsockname(2) takes them.
    unsafe { takeover::getsockname(fd, addr, len) }
}

/// # Safety
/// As `setsockopt(2)`.
#[no_mangle]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *const c_void,
    len: socklen_t,
) -> c_int {
    // SAFETY: as setsockopt(2) takes them.
    unsafe { takeover::setsockopt(fd, level, name, value, len) }
}

/// # Safety
/// As `getsockopt(2)`.
#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    // SAFETY: as getsockopt(2) takes them.
    unsafe { takeover::getsockopt(fd, level, name, value, len) }
}

#[no_mangle]
pub extern "C" fn dup2(from: c_int, to: c_int) -> c_int {
    takeover::dup3(from, to, -1)
}

#[no_mangle]
pub extern "C" fn dup3(from: c_int, to: c_int, flags: c_int) -> c_int {
    if from == to {
        // dup3 refuses what dup2 allows.
        return crate::sys::fail(libc::EINVAL);
    }
    takeover::dup3(from, to, flags)
}

#[no_mangle]
pub extern "C" fn close_range(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int {
    takeover::close_range(first, last, flags)
}

#[no_mangle]
pub extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    takeover::shutdown(fd, how)
}
