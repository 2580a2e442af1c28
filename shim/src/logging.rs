//! The shim's own log. In the long-running server it goes to the `log` FIFO
//! that containerd opened in the bundle (containerd copies it into its own
//! log); for `start` and `delete` it goes to stderr, which containerd reports
//! when they fail. The level comes from `-debug`, `RUST_LOG`, or the config's
//! `shim.log_level` once the first container's config is read.

use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    sync::{Mutex, OnceLock},
};

use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogLevel;

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Where the log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// The `log` FIFO in the working directory (the long-running shim).
    LogFifo,
    Stderr,
    /// Nowhere: containerd 1.6 reads `start`'s stdout and stderr together
    /// as the shim's address, so `start` must print nothing else.
    Silent,
}

/// Sets up logging.
pub fn init(sink: Sink, debug: bool) {
    if sink == Sink::Silent {
        return;
    }
    let server = sink == Sink::LogFifo;
    use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt};
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let fifo = if server { open_log_fifo() } else { None };
    let registry = tracing_subscriber::registry().with(filter);
    match fifo {
        Some(f) => {
            let _ = registry
                .with(fmt::layer().with_ansi(false).with_writer(Mutex::new(f)))
                .try_init();
        }
        None => {
            let _ = registry
                .with(fmt::layer().with_ansi(false).with_writer(std::io::stderr))
                .try_init();
        }
    }
}

/// Applies the configured level, unless RUST_LOG says otherwise.
pub fn set_level(level: LogLevel) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    if let Some(h) = FILTER.get() {
        let _ = h.modify(|f| *f = EnvFilter::new(level.as_str()));
    }
}

fn open_log_fifo() -> Option<File> {
    // Non-blocking open: fails at once instead of hanging when nobody reads.
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .ok()?;
    // Blocking writes from here on, so that a burst is not dropped.
    let fl = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).ok()?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(fl);
    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).ok()?;
    Some(f)
}
