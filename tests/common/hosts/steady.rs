//! A steady load of the seed's session app through the balancer: client
//! threads, each a browser with its own session cookie, sending one `GET /`
//! after another (each on a new connection) until stopped, bounded in
//! count and time whatever the test does; every outcome kept, with which
//! client sent it, when, and what the app answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::load::{exchange, Failure, LOAD_CAP};
use super::super::*;

/// At most this many requests per client.
pub const MAX_VISITS_PER_CLIENT: usize = 5_000;

/// What the app answered: `PID: 123 | Views: 4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// The worker that answered.
    pub pid: u32,
    /// The session's count, kept in Redis: one more per visit.
    pub views: u64,
}

/// One visit by one client.
#[derive(Debug, Clone)]
pub struct Visit {
    /// Which client thread (0..clients) sent it.
    pub client: usize,
    pub began: Instant,
    pub ended: Instant,
    pub answer: Result<Page, (Failure, String)>,
}

/// One `GET /` with `cookie` (the session's, if it has one yet); the page,
/// and the cookie the app set, if it set one.
pub fn visit(
    addr: SocketAddr,
    cookie: Option<&str>,
) -> Result<(Page, Option<String>), (Failure, String)> {
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let page = exchange(addr, "/", &cookie)?;
    let wrong = || (Failure::Wrong, format!("{} {:?}", page.status, page.body));
    if page.status != 200 {
        return Err(wrong());
    }
    let parsed = page.body.strip_prefix("PID: ").and_then(|rest| {
        let (pid, views) = rest.split_once(" | Views: ")?;
        Some(Page {
            pid: pid.parse().ok()?,
            views: views.parse().ok()?,
        })
    });
    // `Set-Cookie: connect.sid=s%3A...; Path=/; Expires=...; HttpOnly`
    let set = page
        .header("set-cookie")
        .map(|c| c.split(';').next().unwrap().to_string());
    Ok((parsed.ok_or_else(wrong)?, set))
}

/// Client threads visiting `addr` until [`SteadyLoad::finish`].
pub struct SteadyLoad {
    visits: Arc<Mutex<Vec<Visit>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SteadyLoad {
    /// `clients` browsers visiting `addr`, each keeping its cookie.
    pub fn start(addr: SocketAddr, clients: usize) -> SteadyLoad {
        let visits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|client| {
                let (visits, stop) = (visits.clone(), stop.clone());
                std::thread::spawn(move || browse(addr, client, &visits, &stop))
            })
            .collect();
        SteadyLoad {
            visits,
            stop,
            threads,
        }
    }

    /// Every visit so far.
    pub fn visits(&self) -> Vec<Visit> {
        self.visits.lock().unwrap().clone()
    }

    pub fn answered(&self) -> usize {
        let visits = self.visits.lock().unwrap();
        visits.iter().filter(|v| v.answer.is_ok()).count()
    }

    /// Waits for `more` answered visits from now.
    pub fn settle(&self, more: usize) {
        let target = self.answered() + more;
        wait_until(&format!("{more} more answered visits"), || {
            (self.answered() >= target).then_some(())
        });
    }

    /// Stops the clients (each after the visit it is in) and returns
    /// every visit.
    pub fn finish(mut self) -> Vec<Visit> {
        self.stop.store(true, SeqCst);
        for thread in self.threads.drain(..) {
            thread.join().unwrap();
        }
        std::mem::take(&mut *self.visits.lock().unwrap())
    }
}

impl Drop for SteadyLoad {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// One client's loop: bounded by [`MAX_VISITS_PER_CLIENT`] and
/// [`LOAD_CAP`] whatever the test does.
fn browse(addr: SocketAddr, client: usize, visits: &Mutex<Vec<Visit>>, stop: &AtomicBool) {
    let started = Instant::now();
    let mut cookie: Option<String> = None;
    for _ in 0..MAX_VISITS_PER_CLIENT {
        if stop.load(SeqCst) || started.elapsed() > LOAD_CAP {
            break;
        }
        let began = Instant::now();
        let answer = visit(addr, cookie.as_deref()).map(|(page, set)| {
            cookie = set.or(cookie.take());
            page
        });
        let ended = Instant::now();
        let failed = answer.is_err();
        visits.lock().unwrap().push(Visit {
            client,
            began,
            ended,
            answer,
        });
        if failed {
            // Not hammering a balancer that refuses: the failure is kept.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Fails unless every visit in `visits` was answered, naming those that
/// were not (with when they began, from the first visit, and what failed).
pub fn assert_every_visit_answered(visits: &[Visit]) {
    let Some(start) = visits.iter().map(|v| v.began).min() else {
        panic!("no visits");
    };
    let lost: Vec<String> = visits
        .iter()
        .filter_map(|v| {
            let (failure, what) = v.answer.as_ref().err()?;
            let at = v.began.duration_since(start);
            Some(format!("client {} at {at:?}: {failure:?} {what}", v.client))
        })
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} visits lost: {lost:#?}",
        lost.len(),
        visits.len()
    );
}

/// Fails unless each client's session counted on one by one (1, 2, 3, ...
/// over its answered visits, in order): the count, kept in the shared
/// Redis, went on whichever host answered. Returns each client's pages.
pub fn assert_sessions_counted_on(visits: &[Visit]) -> BTreeMap<usize, Vec<Page>> {
    let mut pages: BTreeMap<usize, Vec<Page>> = BTreeMap::new();
    for visit in visits {
        if let Ok(page) = visit.answer {
            pages.entry(visit.client).or_default().push(page);
        }
    }
    for (client, pages) in &pages {
        let views: Vec<u64> = pages.iter().map(|p| p.views).collect();
        let counted: Vec<u64> = (1..=views.len() as u64).collect();
        assert_eq!(views, counted, "client {client}'s session count: {pages:?}");
    }
    pages
}
