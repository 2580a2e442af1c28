//! The long-running shim: serves containerd's Task API on the socket
//! containerd named, until the pod's last container is gone.

use std::{collections::HashMap, os::unix::net::UnixListener, path::Path, sync::Arc};

use containerd_shim::{publisher::RemotePublisher, Error, ExitSignal, Flags};
use containerd_shim_protos::{
    shim_async::{create_task, Task},
    ttrpc::r#async::{transport::Listener, Server, Service},
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, info, warn};

use crate::{events::Events, task::TaskService};

/// containerd 1.6 calls the Task service by this name; the protos crate
/// registers it as `containerd.task.v3.Task`. The messages are the same.
const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";

pub async fn serve(flags: &Flags) -> Result<(), Error> {
    if flags.socket.is_empty() {
        return Err(Error::InvalidArgument("-socket is required".into()));
    }
    let ttrpc_address = std::env::var("TTRPC_ADDRESS")
        .map_err(|_| Error::InvalidArgument("TTRPC_ADDRESS is not set".into()))?;
    let publisher = RemotePublisher::new(&ttrpc_address).await?;
    let exit = Arc::new(ExitSignal::default());
    let service: Arc<dyn Task + Send + Sync> = Arc::new(TaskService::new(
        &flags.namespace,
        Events::new(publisher, &flags.namespace),
        exit.clone(),
    ));
    let mut services: HashMap<String, Service> = create_task(service.clone());
    if let Some(v3) = create_task(service).remove(TASK_V3) {
        services.insert(TASK_V2.to_string(), v3);
    }

    let path = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_string();
    let listener = bind(Path::new(&path))?;
    let listener = Listener::try_from(listener).map_err(|e| Error::IoError {
        context: format!("listening on {path}"),
        err: e,
    })?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await?;
    signal_server_started();
    info!(id = %flags.id, socket = %path, "shim serving");

    tokio::spawn(log_signals());
    exit.wait().await;
    info!(id = %flags.id, "shim exiting");
    if let Err(e) = server.shutdown().await {
        warn!("stopping the ttrpc server: {e}");
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::IoError {
            context: format!("creating {}", dir.display()),
            err: e,
        })?;
    }
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // A socket file left by a shim that died: nobody answers on it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::IoError {
                    context: format!("another shim serves {}", path.display()),
                    err: e,
                });
            }
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(|e| Error::IoError {
                context: format!("binding {}", path.display()),
                err: e,
            })
        }
        Err(e) => Err(Error::IoError {
            context: format!("binding {}", path.display()),
            err: e,
        }),
    }
}

/// `start` waits for EOF on our stdout (a pipe): point stdout at stderr once
/// the socket is served, closing the pipe.
fn signal_server_started() {
    // SAFETY: dup2 on the process's own standard descriptors.
    if unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
        warn!("redirecting stdout: {}", std::io::Error::last_os_error());
    }
}

/// containerd ends a shim through Shutdown, not signals: SIGTERM and SIGINT
/// are logged and otherwise ignored (a VM must not die with a stray signal).
async fn log_signals() {
    let (Ok(mut term), Ok(mut int), Ok(mut pipe)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::pipe()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM ignored: containerd shuts the shim down through the Task API"),
            _ = int.recv() => info!("SIGINT ignored"),
            _ = pipe.recv() => debug!("SIGPIPE"),
        }
    }
}
