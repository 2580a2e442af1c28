//! Logging to stderr, which in the guest is the serial console.
//!
//! Lines are stamped with CLOCK_BOOTTIME in the kernel's own `[sec.usec]`
//! style, so agent and kernel messages on the console read as one timeline
//! (wall-clock time in a fresh guest may not even be set).

use std::fmt;

use tracing_subscriber::{
    fmt::{format::Writer, time::FormatTime},
    EnvFilter,
};

use crate::clock;

const DEFAULT_FILTER: &str = "info";

/// Writes each log line to stderr (the console) and to the host log stream,
/// if one was started ([`crate::log_stream`]).
struct Tee;

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::log_stream::write(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Timestamps log lines with seconds since the kernel started.
struct BootTime;

impl FormatTime for BootTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let ns = clock::boottime_ns();
        write!(
            w,
            "[{:5}.{:06}]",
            ns / 1_000_000_000,
            ns % 1_000_000_000 / 1_000
        )
    }
}

/// Installs the global subscriber.
///
/// The filter is the first valid one of: `cmdline_filter` (the `husk.log`
/// kernel parameter, in PID 1 mode), `RUST_LOG`, then `info`. Returns
/// warnings about rejected filters; they are for the caller to log, since
/// only now is there a logger to log them with.
pub fn init(cmdline_filter: Option<&str>) -> Vec<String> {
    let env_filter = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let candidates = [
        (cmdline_filter, "husk.log kernel parameter"),
        (env_filter.as_deref(), EnvFilter::DEFAULT_ENV),
    ];
    let mut warnings = Vec::new();
    let mut chosen = None;
    for (directives, origin) in candidates {
        let Some(directives) = directives else {
            continue;
        };
        match EnvFilter::try_new(directives) {
            Ok(filter) => {
                chosen = Some(filter);
                break;
            }
            Err(e) => warnings.push(format!("ignoring {origin} {directives:?}: {e}")),
        }
    }
    let filter = chosen.unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));

    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Tee)
        .with_ansi(false)
        .with_timer(BootTime)
        .try_init();
    if let Err(e) = installed {
        warnings.push(format!("a logger was already installed: {e}"));
    }
    warnings
}
