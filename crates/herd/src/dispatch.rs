//! Where does a connection go next? The dispatch policies.
//!
//! Owns the choice of worker slot for one new connection, given which slots
//! can take a connection right now. Pure logic with no I/O and no
//! allocation, so the hand-off loop can call it per connection and the unit
//! tests can check it exhaustively.

use std::net::IpAddr;
use std::str::FromStr;

/// How connections are spread over worker slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Strict rotation over the slots that can take a connection (Node's default).
    #[default]
    RoundRobin,
    /// Rendezvous hash of the client IP: a client keeps its slot while the slot lives.
    Sticky,
    /// The slot whose worker holds the fewest connections (ties in rotation).
    LeastConn,
    /// OS-scheduled: every worker inherits the same listening sockets
    /// (systemd's `LISTEN_FDS`) and the kernel gives each connection to
    /// whichever worker calls `accept` first.
    Shared,
    /// OS-scheduled: one `SO_REUSEPORT` socket per slot, inherited by that
    /// slot's worker; the kernel spreads connections by a hash of the
    /// addresses, whether or not the slot's worker is accepting.
    ReusePort,
}

impl Mode {
    pub const NAMES: &'static [&'static str] =
        &["round-robin", "sticky", "least-conn", "shared", "reuseport"];

    pub fn name(self) -> &'static str {
        match self {
            Mode::RoundRobin => "round-robin",
            Mode::Sticky => "sticky",
            Mode::LeastConn => "least-conn",
            Mode::Shared => "shared",
            Mode::ReusePort => "reuseport",
        }
    }

    /// herd accepts and hands each connection over itself; otherwise the
    /// workers accept from inherited sockets and the kernel chooses.
    pub fn hands_off(self) -> bool {
        !matches!(self, Mode::Shared | Mode::ReusePort)
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "round-robin" => Ok(Mode::RoundRobin),
            "sticky" => Ok(Mode::Sticky),
            "least-conn" => Ok(Mode::LeastConn),
            "shared" => Ok(Mode::Shared),
            "reuseport" => Ok(Mode::ReusePort),
            _ => Err(format!("expected one of: {}", Mode::NAMES.join(", "))),
        }
    }
}

/// Chooses a worker slot per connection.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    mode: Mode,
    /// Round-robin: the slot to try first for the next connection.
    next: usize,
}

impl Dispatcher {
    pub fn new(mode: Mode) -> Self {
        Dispatcher { mode, next: 0 }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Picks a slot among `0..slots` for a connection from `client`, or
    /// `None` when no slot can take it. `load(slot)` is `None` when the slot
    /// cannot take a connection (not live, not ready, backed up), else how
    /// many connections its worker holds; only `least-conn` looks at it.
    pub fn choose(
        &mut self,
        client: IpAddr,
        slots: usize,
        load: impl Fn(usize) -> Option<u64>,
    ) -> Option<usize> {
        let start = if self.next < slots { self.next } else { 0 };
        let rotation = (start..slots).chain(0..start);
        let slot = match self.mode {
            // The OS modes never reach the hand-off loop's dispatcher.
            Mode::RoundRobin | Mode::Shared | Mode::ReusePort => {
                rotation.into_iter().find(|&s| load(s).is_some())?
            }
            Mode::Sticky => return sticky_choice(client_key(client), slots, |s| load(s).is_some()),
            // min_by_key keeps the first of equal loads: ties go in rotation.
            Mode::LeastConn => {
                rotation
                    .filter_map(|s| Some((s, load(s)?)))
                    .min_by_key(|&(_, l)| l)?
                    .0
            }
        };
        self.next = slot + 1;
        Some(slot)
    }
}

/// Rendezvous (highest random weight) hashing: every slot gets a score for
/// this client and the highest available one wins. When a slot disappears
/// only its own clients move (to their second choice); when it returns they
/// come back, and adding a slot moves just 1/N of the clients to it.
fn sticky_choice(client: u64, slots: usize, can_take: impl Fn(usize) -> bool) -> Option<usize> {
    (0..slots)
        .filter(|&s| can_take(s))
        .max_by_key(|&s| mix64(client ^ mix64(s as u64 + 1)))
}

/// Folds an IP address into 64 bits. IPv4-mapped IPv6 addresses count as
/// their IPv4 form, so a client keeps its slot on a dual-stack listener.
fn client_key(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => mix64(u64::from(u32::from(v4))),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            mix64((bits >> 64) as u64 ^ mix64(bits as u64))
        }
    }
}

/// The splitmix64 finaliser: cheap, and every input bit affects every output bit.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const ANY: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn clients(count: u32) -> impl Iterator<Item = IpAddr> {
        (0..count).map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
    }

    #[test]
    fn round_robin_is_exact_over_full_rotations() {
        let mut dispatcher = Dispatcher::new(Mode::RoundRobin);
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[dispatcher.choose(ANY, 4, |_| Some(0)).unwrap()] += 1;
        }
        assert_eq!(counts, [1000; 4]);
    }

    #[test]
    fn round_robin_skips_slots_that_cannot_take() {
        let mut dispatcher = Dispatcher::new(Mode::RoundRobin);
        let picks: Vec<_> = (0..6)
            .map(|_| {
                dispatcher
                    .choose(ANY, 4, |s| (s != 1).then_some(0))
                    .unwrap()
            })
            .collect();
        assert_eq!(picks, [0, 2, 3, 0, 2, 3]);
        assert_eq!(dispatcher.choose(ANY, 4, |_| None), None);
    }

    #[test]
    fn round_robin_survives_the_slot_count_shrinking() {
        let mut dispatcher = Dispatcher::new(Mode::RoundRobin);
        for _ in 0..3 {
            dispatcher.choose(ANY, 4, |_| Some(0));
        }
        assert_eq!(dispatcher.choose(ANY, 2, |_| Some(0)), Some(0));
        assert_eq!(dispatcher.choose(ANY, 2, |_| Some(0)), Some(1));
    }

    #[test]
    fn sticky_is_stable_per_client() {
        let mut dispatcher = Dispatcher::new(Mode::Sticky);
        for client in clients(100) {
            let first = dispatcher.choose(client, 8, |_| Some(0));
            for _ in 0..5 {
                assert_eq!(dispatcher.choose(client, 8, |_| Some(0)), first);
            }
        }
    }

    #[test]
    fn sticky_spreads_1000_clients_within_15_percent_over_4_slots() {
        let mut dispatcher = Dispatcher::new(Mode::Sticky);
        let mut counts = [0u32; 4];
        for client in clients(1000) {
            counts[dispatcher.choose(client, 4, |_| Some(0)).unwrap()] += 1;
        }
        for count in counts {
            assert!((212..=288).contains(&count), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn sticky_spreads_loopback_test_clients() {
        // The process-level test binds 127.0.0.2..=127.0.0.51: they must not all collide.
        let mut dispatcher = Dispatcher::new(Mode::Sticky);
        let mut counts = [0u32; 4];
        for last in 2..=51u8 {
            let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
            counts[dispatcher.choose(client, 4, |_| Some(0)).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c >= 5), "uneven spread {counts:?}");
    }

    #[test]
    fn sticky_moves_only_the_clients_of_a_missing_slot_and_brings_them_back() {
        let mut dispatcher = Dispatcher::new(Mode::Sticky);
        let before: Vec<_> = clients(1000)
            .map(|c| dispatcher.choose(c, 4, |_| Some(0)).unwrap())
            .collect();
        let during: Vec<_> = clients(1000)
            .map(|c| dispatcher.choose(c, 4, |s| (s != 2).then_some(0)).unwrap())
            .collect();
        for (b, d) in before.iter().zip(&during) {
            if *b != 2 {
                assert_eq!(b, d, "a client of a live slot moved");
            } else {
                assert_ne!(*d, 2);
            }
        }
        let after: Vec<_> = clients(1000)
            .map(|c| dispatcher.choose(c, 4, |_| Some(0)).unwrap())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn sticky_growing_by_one_slot_moves_about_one_in_n() {
        let mut dispatcher = Dispatcher::new(Mode::Sticky);
        let moved = clients(1000)
            .filter(|&c| {
                dispatcher.choose(c, 4, |_| Some(0)) != dispatcher.choose(c, 5, |_| Some(0))
            })
            .count();
        // Ideal is 1000/5 = 200 and every mover goes to the new slot.
        assert!((150..=250).contains(&moved), "moved {moved}");
    }

    #[test]
    fn sticky_treats_ipv4_mapped_ipv6_as_ipv4() {
        let mut dispatcher = Dispatcher::new(Mode::Sticky);
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            dispatcher.choose(v4, 16, |_| Some(0)),
            dispatcher.choose(mapped, 16, |_| Some(0))
        );
    }

    #[test]
    fn least_conn_picks_the_lightest_and_rotates_ties() {
        let mut dispatcher = Dispatcher::new(Mode::LeastConn);
        let loads = [5u64, 2, 9, 2];
        let picks: Vec<_> = (0..4)
            .map(|_| dispatcher.choose(ANY, 4, |s| Some(loads[s])).unwrap())
            .collect();
        assert_eq!(picks, [1, 3, 1, 3], "ties between slots 1 and 3 alternate");
        assert_eq!(
            dispatcher.choose(ANY, 4, |s| (s != 1 && s != 3).then_some(loads[s])),
            Some(0)
        );
        assert_eq!(dispatcher.choose(ANY, 4, |_| None), None);
    }

    #[test]
    fn least_conn_spreads_evenly_when_loads_follow_the_choices() {
        let mut dispatcher = Dispatcher::new(Mode::LeastConn);
        let mut loads = [0u64; 4];
        for _ in 0..400 {
            let slot = dispatcher.choose(ANY, 4, |s| Some(loads[s])).unwrap();
            loads[slot] += 1;
        }
        assert_eq!(loads, [100; 4]);
    }

    #[test]
    fn mode_names_parse_back() {
        for name in Mode::NAMES {
            assert_eq!(name.parse::<Mode>().unwrap().name(), *name);
        }
        assert!("fastest".parse::<Mode>().is_err());
    }
}
