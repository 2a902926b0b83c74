//! Rate-limited reporting of errors that can repeat without end.
//!
//! A misbehaving peer can make the same error happen millions of times a
//! second; logging each would turn herd into a log flood (and a CPU and
//! disk sink) that hides everything else. [`Occurrences`] logs the 1st,
//! 2nd, 4th, 8th, ... time, with the running total, so the first occurrence
//! is always seen, the log grows with the logarithm of the flood, and the
//! count stays exact.

/// How many times one kind of error happened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Occurrences(u64);

impl Occurrences {
    /// Counts one more; returns the total when this one should be logged
    /// (the total is a power of two).
    pub fn record(&mut self) -> Option<u64> {
        self.0 = self.0.saturating_add(1);
        self.0.is_power_of_two().then_some(self.0)
    }

    #[cfg(test)]
    pub fn total(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_at_powers_of_two_and_counts_every_one() {
        let mut seen = Occurrences::default();
        let logged: Vec<u64> = (0..1000).filter_map(|_| seen.record()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
        assert_eq!(seen.total(), 1000);
    }

    #[test]
    fn never_wraps() {
        let mut seen = Occurrences(u64::MAX - 1);
        seen.record();
        assert_eq!(seen.record(), None);
        assert_eq!(seen.total(), u64::MAX);
    }
}
