//! The counter page: one page of shared memory per worker, in which the
//! worker counts what it would otherwise tell herd with a message per
//! connection (ACCEPTED, CLOSED, and for hand-offs, that it took them).
//!
//! herd creates the page (a sealed `memfd`), writes its [`MAGIC`] and passes
//! it to the worker as an inherited fd named by [`PAGE_FD_ENV`]. A worker
//! that maps it and says so in READY ([`crate::wire::ReadyFlags::PAGE`])
//! increments the counters with atomic adds and sends no per-connection
//! message; herd reads them when it samples (every 100 ms, and on demand).
//! A message costs herd a wake-up and two system calls; a counter costs
//! the worker one atomic add and herd nothing.
//!
//! Layout (4096 bytes, every field a native-endian, 8-byte-aligned `u64`;
//! herd and its workers run on the same machine):
//!
//! | offset | field | written by |
//! |---:|---|---|
//! | 0 | magic, `"herdpag1"` as bytes | herd, once |
//! | 64 | connections closed | the worker |
//! | 72 | hand-offs received (from hand-off thread 0, or from every thread without [`crate::wire::ReadyFlags::THREADS`]) | the worker |
//! | 72 + 8 × *t* | hand-offs received from hand-off thread *t*, 1 ≤ *t* < [`MAX_HANDOFF_THREADS`] (with `THREADS`) | the worker |
//! | 128 + 8 × *i* | connections accepted on inherited listener *i* (OS modes), *i* < [`PAGE_LISTENERS`] | the worker |
//!
//! Every counter only grows. herd trusts none of them: it reads deltas,
//! ignores a counter that went back, and clamps each to what it can be
//! (no more closed than taken, no more received than sent). The memfd is
//! sealed against shrinking, so a worker cannot truncate it under herd's
//! mapping (which would make herd's next read a `SIGBUS`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::libc;

/// Environment variable naming the inherited counter page's fd.
pub const PAGE_FD_ENV: &str = "HERD_PAGE_FD";
/// The page's size in bytes.
pub const PAGE_LEN: usize = 4096;
/// The first eight bytes of every counter page.
pub const MAGIC: [u8; 8] = *b"herdpag1";
const CLOSED_AT: usize = 64;
const RECEIVED_AT: usize = 72;
const ACCEPTED_AT: usize = 128;
/// herd's hand-off threads a page counts receipts for, each on its own
/// counter (72 + 8 × thread, up to the listeners' counters at 128): a
/// thread's count says which of *its* hand-offs were taken, whatever the
/// others sent in between.
pub const MAX_HANDOFF_THREADS: usize = (ACCEPTED_AT - RECEIVED_AT) / 8;
/// Listeners the page counts accepts for; accepts on a listener beyond
/// these are counted on the last one.
pub const PAGE_LISTENERS: usize = (PAGE_LEN - ACCEPTED_AT) / 8;

/// Why a counter page could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("counter page: {0}")]
    Io(#[from] io::Error),
    #[error("counter page: the fd is not a herd page ({0})")]
    NotAPage(&'static str),
}

/// A mapped counter page. herd maps it read-only, the worker read-write.
#[derive(Debug)]
pub struct Page {
    base: NonNull<u8>,
    fd: OwnedFd,
    writable: bool,
}

// SAFETY: the mapping is only ever accessed through `AtomicU64`s (or, for
// the magic, read once at map time), so sharing it between threads is as
// safe as sharing atomics; the pointer stays valid until `drop` unmaps it.
unsafe impl Send for Page {}
// SAFETY: as above.
unsafe impl Sync for Page {}

impl Page {
    /// herd's side: a new sealed page with its magic, mapped read-only.
    /// The fd is close-on-exec; the spawner makes it inherited.
    pub fn create() -> Result<Page, PageError> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            c"herd-page",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(io::Error::from)?;
        nix::unistd::ftruncate(&fd, PAGE_LEN as libc::off_t).map_err(io::Error::from)?;
        nix::sys::uio::pwrite(&fd, &MAGIC, 0).map_err(io::Error::from)?;
        // No shrinking (a SIGBUS in herd), no growing, and the seals stay.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(io::Error::from)?;
        Page::map(fd, false)
    }

    /// Maps the page in `fd`: read-write for the worker, read-only for
    /// herd. Refuses an fd that is not a sealed page of [`PAGE_LEN`]
    /// bytes starting with [`MAGIC`].
    pub fn map(fd: OwnedFd, writable: bool) -> Result<Page, PageError> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        let seals =
            fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(|_| PageError::NotAPage("not a memfd"))?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
            return Err(PageError::NotAPage("it can be shrunk"));
        }
        let size = nix::sys::stat::fstat(&fd).map_err(io::Error::from)?.st_size;
        if size != PAGE_LEN as libc::off_t {
            return Err(PageError::NotAPage("wrong size"));
        }
        let mut magic = [0u8; 8];
        nix::sys::uio::pread(&fd, &mut magic, 0).map_err(io::Error::from)?;
        if magic != MAGIC {
            return Err(PageError::NotAPage("wrong magic"));
        }
        let protection = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of PAGE_LEN bytes of a memfd that
        // is exactly that long and sealed against shrinking, so every byte
        // stays backed for the mapping's life; nothing else aliases it in
        // this process except through this `Page`.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_LEN,
                protection,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        let base = NonNull::new(base.cast()).ok_or(PageError::NotAPage("mapped at null"))?;
        Ok(Page { base, fd, writable })
    }

    fn counter(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= PAGE_LEN);
        // SAFETY: `offset` is 8-aligned and inside the page (every caller
        // passes one of the constants above or a clamped listener slot),
        // the page is page-aligned, and the mapping lives as long as
        // `self`; AtomicU64 has the layout of u64.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn accepted_at(listener: usize) -> usize {
        ACCEPTED_AT + 8 * listener.min(PAGE_LISTENERS - 1)
    }

    /// The page's fd (to pass to a worker, or across `herd upgrade`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Connections the worker closed.
    pub fn closed(&self) -> u64 {
        self.counter(CLOSED_AT).load(Ordering::Relaxed)
    }

    /// Hand-offs the worker received (from thread 0, see [`Page::received_from`]).
    pub fn received(&self) -> u64 {
        self.received_from(0)
    }

    /// Hand-offs the worker received from hand-off thread `thread`
    /// ([`crate::wire::handoff_thread`] of their ids); a thread beyond
    /// [`MAX_HANDOFF_THREADS`] reads thread 0's.
    pub fn received_from(&self, thread: usize) -> u64 {
        self.counter(Self::received_at(thread))
            .load(Ordering::Relaxed)
    }

    fn received_at(thread: usize) -> usize {
        let thread = if thread < MAX_HANDOFF_THREADS {
            thread
        } else {
            0
        };
        RECEIVED_AT + 8 * thread
    }

    /// Connections the worker accepted itself on inherited listener `listener`.
    pub fn accepted(&self, listener: usize) -> u64 {
        self.counter(Self::accepted_at(listener))
            .load(Ordering::Relaxed)
    }

    fn add(&self, offset: usize, n: u64) {
        assert!(
            self.writable,
            "herd's mapping of a counter page is read-only"
        );
        self.counter(offset).fetch_add(n, Ordering::Relaxed);
    }

    /// The worker closed `n` connections.
    pub fn add_closed(&self, n: u64) {
        self.add(CLOSED_AT, n);
    }

    /// The worker received `n` hand-offs (from thread 0, or counted together).
    pub fn add_received(&self, n: u64) {
        self.add(RECEIVED_AT, n);
    }

    /// The worker received `n` hand-offs from hand-off thread `thread`
    /// (a worker that says [`crate::wire::ReadyFlags::THREADS`]).
    pub fn add_received_from(&self, thread: usize, n: u64) {
        self.add(Self::received_at(thread), n);
    }

    /// The worker accepted `n` connections on inherited listener `listener`.
    pub fn add_accepted(&self, listener: usize, n: u64) {
        self.add(Self::accepted_at(listener), n);
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: `base` is the start of a PAGE_LEN mapping made in `map`
        // and unmapped only here; no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), PAGE_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker_side(herd: &Page) -> Page {
        let fd = herd.fd().try_clone_to_owned().unwrap();
        Page::map(fd, true).unwrap()
    }

    #[test]
    fn each_thread_has_its_own_receipts_and_none_overlaps_a_listener() {
        let herd = Page::create().unwrap();
        let worker = worker_side(&herd);
        for thread in 0..MAX_HANDOFF_THREADS {
            worker.add_received_from(thread, thread as u64 + 1);
        }
        for thread in 0..MAX_HANDOFF_THREADS {
            assert_eq!(herd.received_from(thread), thread as u64 + 1);
        }
        assert_eq!(herd.received(), 1, "thread 0's is the old counter");
        assert_eq!(
            herd.accepted(0),
            0,
            "the last thread's sits below the listeners'"
        );
        assert_eq!((herd.closed(), herd.fd().as_raw_fd() >= 0), (0, true));
        // A thread past the page's counts on thread 0's.
        worker.add_received_from(MAX_HANDOFF_THREADS, 10);
        assert_eq!(herd.received(), 11);
        assert_eq!(MAX_HANDOFF_THREADS, 7);
    }

    #[test]
    fn what_the_worker_counts_herd_reads() {
        let herd = Page::create().unwrap();
        let worker = worker_side(&herd);
        assert_eq!(
            (herd.closed(), herd.received(), herd.accepted(0)),
            (0, 0, 0)
        );
        worker.add_received(3);
        worker.add_closed(2);
        worker.add_accepted(0, 5);
        worker.add_accepted(7, 1);
        assert_eq!((herd.received(), herd.closed()), (3, 2));
        assert_eq!(
            (herd.accepted(0), herd.accepted(7), herd.accepted(1)),
            (5, 1, 0)
        );
    }

    #[test]
    fn listeners_beyond_the_page_count_on_the_last() {
        let herd = Page::create().unwrap();
        let worker = worker_side(&herd);
        worker.add_accepted(PAGE_LISTENERS + 40, 2);
        assert_eq!(herd.accepted(PAGE_LISTENERS - 1), 2);
        assert_eq!(herd.received(), 0);
    }

    #[test]
    fn a_worker_cannot_shrink_the_page() {
        let herd = Page::create().unwrap();
        let fd = herd.fd().try_clone_to_owned().unwrap();
        assert!(nix::unistd::ftruncate(&fd, 0).is_err());
        assert!(nix::unistd::ftruncate(&fd, 2 * PAGE_LEN as libc::off_t).is_err());
        assert_eq!(herd.closed(), 0);
    }

    #[test]
    fn only_a_herd_page_is_mapped() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            Page::map(file.into(), true),
            Err(PageError::NotAPage(_))
        ));
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let unsealed = memfd_create(c"x", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&unsealed, PAGE_LEN as libc::off_t).unwrap();
        assert!(matches!(
            Page::map(unsealed, true),
            Err(PageError::NotAPage("it can be shrunk"))
        ));
    }

    #[test]
    #[should_panic(expected = "read-only")]
    fn herd_never_writes() {
        Page::create().unwrap().add_closed(1);
    }
}
