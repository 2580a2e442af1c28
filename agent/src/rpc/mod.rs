//! The agent's RPC server: binds the listener, registers the agent API and
//! runs until a shutdown is requested.

mod service;

use std::{fs, io, os::unix::fs::FileTypeExt, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use husk_protocol::agent_ttrpc::create_agent_service;
use tokio::signal::unix::{signal, SignalKind};
use ttrpc::r#async::{transport::Listener, Server};

pub use self::service::Service;
use crate::{
    cli::ListenAddr,
    clock::{self, BootStamps},
    container::Runtime,
    shutdown,
};

/// Upper bound on closing client connections when stopping as an ordinary
/// process; the ttrpc default (10 s) is far longer than a test wants to wait.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How the agent runs, which decides how it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in the guest: stops only on `Shutdown`, and does not bother
    /// closing connections, since the VM ends right after.
    Init,
    /// An ordinary process (on a host, for tests): also stops on
    /// SIGINT/SIGTERM, and closes its connections and socket on the way out.
    Process,
}

pub struct ServeOptions {
    pub listen: ListenAddr,
    pub init_started_ns: u64,
    pub mode: Mode,
    /// The container runtime the container calls go to.
    pub runtime: Arc<Runtime>,
}

/// What made [`serve`] return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub reason: shutdown::Reason,
}

/// Serves the agent API until asked to stop, and returns then (after closing
/// connections in [`Mode::Process`]). Must run inside a tokio runtime.
pub async fn serve(opts: ServeOptions) -> Result<Stopped> {
    let (requester, waiter) = shutdown::channel();
    // Before anything announces readiness: a SIGTERM sent right after the
    // ready line must stop the agent, not kill it.
    if opts.mode == Mode::Process {
        watch_stop_signals(requester.clone())?;
    }

    let listener = bind(&opts.listen)?;
    // The listener is bound and listening: a client's connect now succeeds.
    let stamps = BootStamps {
        init_started_ns: opts.init_started_ns,
        agent_ready_ns: clock::boottime_ns(),
    };

    let service = Service::new(stamps, requester, opts.runtime.clone());
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(create_agent_service(Arc::new(service)));
    server.start().await.context("starting the ttrpc server")?;

    announce_ready(&opts.listen, &stamps);

    let reason = waiter.wait().await;
    tracing::info!(?reason, "stopping the RPC server");
    if opts.mode == Mode::Init {
        return Ok(Stopped { reason });
    }

    if tokio::time::timeout(SERVER_STOP_TIMEOUT, server.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("RPC connections did not close within {SERVER_STOP_TIMEOUT:?}");
    }
    if let ListenAddr::Unix(path) = &opts.listen {
        if let Err(e) = fs::remove_file(path) {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
    Ok(Stopped { reason })
}

fn bind(addr: &ListenAddr) -> Result<Listener> {
    if let ListenAddr::Unix(path) = addr {
        remove_stale_socket(path)?;
    }
    Listener::bind(addr.ttrpc_addr()).with_context(|| format!("binding {addr}"))
}

/// A socket file left by an earlier run would make bind fail with EADDRINUSE;
/// anything that is not a socket is left alone (and bind reports it).
fn remove_stale_socket(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display())),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
}

/// The one line the console always shows, whatever the log level: the host
/// side (and a person watching the console) keys on it.
fn announce_ready(listen: &ListenAddr, stamps: &BootStamps) {
    use std::io::Write as _;
    let line = format!(
        "husk-agent: ready on {listen} (boot\u{2192}init {} ms, init\u{2192}ready {:.1} ms)\n",
        stamps.boot_to_init_ms(),
        stamps.init_to_ready_ms(),
    );
    // Not eprintln!: it panics if stderr is gone, and that would be PID 1.
    let _ = std::io::stderr().write_all(line.as_bytes());
    crate::log_stream::write(line.as_bytes());
}

fn watch_stop_signals(requester: shutdown::Requester) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        tracing::info!("stop signal received");
        requester.request(shutdown::Reason::Signal);
    });
    Ok(())
}
