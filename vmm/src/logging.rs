//! The husk-vmm binary's logging: `tracing` to stderr, filtered by `RUST_LOG`, with the `log`
//! records of its dependencies rate-limited per call site.
//!
//! husk-vmm's own lines that a guest can trigger go through `husk_bounds::ratelimited!`. The
//! crates under the devices log through `log`, and some of them log what the guest sends:
//! virtio-queue an invalid queue size or ring alignment (guest register writes),
//! fuse-backend-rs a name without NUL or a GETATTR of an inode that does not exist (any FUSE
//! request), vhost-user-backend queue errors. tracing-subscriber's own bridge would pass each
//! of those on, as often as the guest likes; this one lets each call site through at
//! `husk_bounds::ratelimited!`'s rate (10 lines a second, 20 at once) and says how many it
//! held back when the site next gets through.

use std::collections::BTreeMap;
use std::sync::Mutex;

use husk_bounds::RateLimit;
use tracing::level_filters::LevelFilter;
use tracing_log::{AsLog, LogTracer};
use tracing_subscriber::EnvFilter;

/// Lines a second and burst for each call site, as `husk_bounds::ratelimited!`.
const PER_SEC: u32 = 10;
const BURST: u32 = 20;
/// Call sites tracked one by one; past that (only records without a static file and line
/// could make so many), the rest share one limit.
const MAX_SITES: usize = 1024;

/// Installs the global subscriber (stderr, `RUST_LOG`, default `info`) and the rate-limited
/// `log` bridge. Call once, first thing.
pub fn init() {
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish();
    // `finish` + set_global_default rather than `init`: `init` would install tracing-log's
    // own bridge, which does not limit anything.
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        return;
    }
    if log::set_boxed_logger(Box::new(RateLimitedLog::new(LogTracer::new()))).is_ok() {
        log::set_max_level(LevelFilter::current().as_log());
    }
}

/// A `log::Log` that passes each call site's records on to `inner` at a bounded rate.
pub struct RateLimitedLog<L> {
    inner: L,
    sites: Mutex<BTreeMap<(&'static str, u32), RateLimit>>,
    other: RateLimit,
}

impl<L: log::Log> RateLimitedLog<L> {
    pub fn new(inner: L) -> Self {
        RateLimitedLog {
            inner,
            sites: Mutex::new(BTreeMap::new()),
            other: RateLimit::new(PER_SEC, BURST),
        }
    }

    /// `Some(suppressed)` if this record's call site may log now.
    fn admit(&self, record: &log::Record<'_>) -> Option<u64> {
        let site = record.file_static().zip(record.line());
        // A poisoned lock only means a thread panicked mid-insert: the map is still usable.
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        match site {
            Some(key) if sites.contains_key(&key) || sites.len() < MAX_SITES => sites
                .entry(key)
                .or_insert_with(|| RateLimit::new(PER_SEC, BURST))
                .admit(),
            _ => self.other.admit(),
        }
    }
}

impl<L: log::Log> log::Log for RateLimitedLog<L> {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        // Only records that would be written spend the site's tokens.
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let Some(suppressed) = self.admit(record) else {
            return;
        };
        if suppressed > 0 {
            let held_back = format!(
                "{suppressed} earlier lines from {}:{} were rate-limited",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            );
            self.inner.log(
                &log::Record::builder()
                    .level(record.level())
                    .target(record.target())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .args(format_args!("{held_back}"))
                    .build(),
            );
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl log::Log for Lines {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Info
        }
        fn log(&self, record: &log::Record<'_>) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    fn record<'a>(level: log::Level, line: u32, args: std::fmt::Arguments<'a>) -> log::Record<'a> {
        log::Record::builder()
            .level(level)
            .target("fuse_backend_rs::api::server::sync_io")
            .file_static(Some("src/api/server/sync_io.rs"))
            .line(Some(line))
            .args(args)
            .build()
    }

    #[test]
    fn each_call_site_gets_its_burst_and_the_held_back_count_follows() {
        let lines = Lines::default();
        let log = RateLimitedLog::new(lines.clone());
        for i in 0..10_000 {
            log::Log::log(
                &log,
                &record(log::Level::Error, 229, format_args!("bad name {i}")),
            );
        }
        // Another call site is not starved by the first.
        log::Log::log(
            &log,
            &record(log::Level::Warn, 1048, format_args!("other site")),
        );
        // Disabled levels neither show nor spend tokens.
        log::Log::log(&log, &record(log::Level::Debug, 229, format_args!("debug")));
        let got = lines.0.lock().unwrap().clone();
        assert_eq!(got.len(), BURST as usize + 1, "{got:?}");
        assert_eq!(got[0], "bad name 0");
        assert_eq!(got.last().map(String::as_str), Some("other site"));

        // A token comes back after 100 ms: the next line says how many were held back.
        std::thread::sleep(Duration::from_millis(150));
        log::Log::log(
            &log,
            &record(log::Level::Error, 229, format_args!("bad name again")),
        );
        let got = lines.0.lock().unwrap().clone();
        let n = 10_000 - BURST as usize;
        assert_eq!(
            got[BURST as usize + 1],
            format!("{n} earlier lines from src/api/server/sync_io.rs:229 were rate-limited")
        );
        assert_eq!(got[BURST as usize + 2], "bad name again");
    }

    #[test]
    fn records_without_a_site_share_one_limit() {
        let lines = Lines::default();
        let log = RateLimitedLog::new(lines.clone());
        for i in 0..1000 {
            log::Log::log(
                &log,
                &log::Record::builder()
                    .level(log::Level::Warn)
                    .args(format_args!("dynamic {i}"))
                    .build(),
            );
        }
        assert_eq!(lines.0.lock().unwrap().len(), BURST as usize);
    }
}
