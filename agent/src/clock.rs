//! Guest boot-time stamps.
//!
//! CLOCK_BOOTTIME starts at zero when the kernel starts and keeps counting
//! while the VM is suspended, so a stamp taken inside the guest is directly
//! "time since the kernel started": the shim subtracts nothing to learn how
//! long the kernel took to reach /init and how long the agent took to listen.

use nix::time::{clock_gettime, ClockId};

const NANOS_PER_SEC: u64 = 1_000_000_000;
const NANOS_PER_MILLI: u64 = 1_000_000;

/// Current CLOCK_BOOTTIME in nanoseconds.
///
/// clock_gettime(CLOCK_BOOTTIME) cannot fail on any kernel the agent runs on
/// (it exists since 2.6.39); should it fail anyway, 0 is returned rather than
/// an error, because a missing stamp must never stop PID 1.
pub fn boottime_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs.saturating_mul(NANOS_PER_SEC).saturating_add(nanos)
        }
        Err(_) => 0,
    }
}

/// The two moments of the agent's start-up, in CLOCK_BOOTTIME nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootStamps {
    /// Taken first thing in `main`: when the kernel handed over to /init.
    pub init_started_ns: u64,
    /// Taken once the RPC listener is bound: from then on a client's connect
    /// succeeds (it waits in the listen backlog at worst).
    pub agent_ready_ns: u64,
}

impl BootStamps {
    /// Kernel start to /init, in whole milliseconds.
    pub fn boot_to_init_ms(&self) -> u64 {
        self.init_started_ns / NANOS_PER_MILLI
    }

    /// /init to a bound listener, in milliseconds with one decimal place,
    /// because the agent's own start-up is usually well under a millisecond's
    /// tens and whole milliseconds would hide it.
    pub fn init_to_ready_ms(&self) -> f64 {
        // Lossy u64 -> f64 is fine for a human-readable duration.
        self.agent_ready_ns.saturating_sub(self.init_started_ns) as f64 / NANOS_PER_MILLI as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_is_monotonic_and_nonzero() {
        let a = boottime_ns();
        let b = boottime_ns();
        assert!(a > 0);
        assert!(b >= a);
    }

    #[test]
    fn durations_are_derived_from_stamps() {
        let s = BootStamps {
            init_started_ns: 812_345_678,
            agent_ready_ns: 815_845_678,
        };
        assert_eq!(s.boot_to_init_ms(), 812);
        assert!((s.init_to_ready_ms() - 3.5).abs() < 1e-9);
    }

    #[test]
    fn ready_before_init_does_not_underflow() {
        let s = BootStamps {
            init_started_ns: 10,
            agent_ready_ns: 5,
        };
        assert_eq!(s.init_to_ready_ms(), 0.0);
    }
}
