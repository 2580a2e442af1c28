//! Bounds on what a guest can make a host process do. See README.md.

mod log_file;
mod rate;

pub use log_file::{read_tail, BoundedLog, DEFAULT_LOG_MAX_BYTES};
pub use rate::RateLimit;

/// Logs through `tracing` at most `burst` lines at once and `per_sec` a second from
/// this call site; the count of suppressed lines rides on the next line let through.
///
/// ```
/// husk_bounds::ratelimited!(warn, "bad descriptor chain: {}", 3);
/// ```
#[macro_export]
macro_rules! ratelimited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::RateLimit = $crate::RateLimit::new(10, 20);
        if let Some(suppressed) = LIMIT.admit() {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, $($arg)+);
            } else {
                ::tracing::$level!($($arg)+);
            }
        }
    }};
}
