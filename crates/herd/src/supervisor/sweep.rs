//! The last sweep, once every worker has exited: what the workers left
//! behind (helpers herd adopted as their subreaper, processes still in a
//! cgroup) is killed and reaped, bounded by [`SWEEP_WAIT`].

use super::*;

impl Supervisor {
    /// After the stop: kills whatever herd's workers left behind (helpers
    /// herd adopted as their subreaper, processes still in a cgroup) and
    /// waits, bounded, until they are gone.
    pub fn sweep(&mut self) {
        let leftovers = process::children();
        if !leftovers.is_empty() {
            warn!(
                count = leftovers.len(),
                event = "killing_leftovers",
                "killing processes the workers left behind: {:?}",
                leftovers.values().collect::<Vec<_>>()
            );
            for &pid in leftovers.keys() {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        for leaf in &self.dead_leaves {
            leaf.kill();
        }
        let deadline = Instant::now() + SWEEP_WAIT;
        while Instant::now() < deadline {
            while let Some(pid) = process::next_exited() {
                if process::reap(pid).is_none() {
                    break;
                }
            }
            self.dead_leaves
                .retain(|leaf| !(leaf.is_empty() && leaf.remove().is_ok()));
            if process::children().is_empty() && self.dead_leaves.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Dropping the tree kills and removes whatever leaf is left.
        self.cgroups = None;
    }
}
