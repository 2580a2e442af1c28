//! A token bucket for one call site, usable from a `static`.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Instant,
};

/// Lets `burst` events through at once and `per_sec` a second after that.
pub struct RateLimit {
    per_sec: u32,
    burst: u32,
    state: Mutex<Option<Bucket>>,
    suppressed: AtomicU64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub const fn new(per_sec: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_sec,
            burst,
            state: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if the event may go through (`n`: how many were suppressed since
    /// the last one that did), `None` if it is over the rate.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked mid-update of two
        // numbers: the bucket is still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = state.get_or_insert(Bucket {
            tokens: f64::from(self.burst),
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * f64::from(self.per_sec)).min(f64::from(self.burst));
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate_and_suppressed_count() {
        let r = RateLimit::new(10, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(r.admit_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(r.admit_at(t0), None);
        }
        // 100 ms later: one token back, and the 1000 dropped lines are reported.
        assert_eq!(r.admit_at(t0 + Duration::from_millis(100)), Some(1000));
        assert_eq!(r.admit_at(t0 + Duration::from_millis(100)), None);
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        let through = (0..100).filter(|_| r.admit_at(later).is_some()).count();
        assert_eq!(through, 5);
    }

    #[test]
    fn the_macro_admits_a_burst_from_one_call_site() {
        let mut through = 0;
        for _ in 0..1000 {
            static LIMIT: RateLimit = RateLimit::new(1, 20);
            if LIMIT.admit().is_some() {
                through += 1;
            }
            crate::ratelimited!(warn, "line {}", through);
        }
        assert!((20..=21).contains(&through), "{through}");
    }
}
