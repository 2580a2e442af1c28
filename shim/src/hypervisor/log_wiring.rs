//! Which of the VM's outputs goes into which capped log, and who may connect to write it.
//!
//! `logs` has the mechanisms (the capped file, the copy, the accept loop); this is the
//! pod's wiring of them, kept in one place so that every way a guest or a VM process writes
//! a host file (the console and agent-log sockets, the processes' pipes) is visibly capped,
//! limited in connections, and stopped at teardown.

use std::{io, path::Path};

use tokio::{net::UnixListener, process::Child};

use super::{
    logs::{self, SharedLog},
    pod_vm::{LaunchError, PodVm},
};

impl PodVm {
    /// QEMU's serial console connects to this socket at start-up; what the
    /// guest prints goes into the capped console.log.
    pub(super) fn start_console_listener(&mut self) -> Result<(), LaunchError> {
        let sock = &self.paths.console_sock;
        let listener = UnixListener::bind(sock).map_err(|e| state_err(sock, e))?;
        let log = SharedLog::create(&self.paths.console_log, self.spec.log_max_bytes)
            .map_err(|e| state_err(&self.paths.console_log, e))?;
        // One connection is QEMU's; a second could only be another local
        // process, and is refused.
        self.log_servers
            .push(logs::serve(listener, log, 1, "console"));
        Ok(())
    }

    /// Accepts the agent's guest-initiated log connections on
    /// `<vsock uds>_<port>` (a few at most) into the capped agent.log.
    pub(super) fn start_agent_log_listener(&mut self) -> Result<(), LaunchError> {
        let Some(port) = self.spec.agent_log_port else {
            return Ok(());
        };
        let mut path = self.paths.vsock_uds.clone().into_os_string();
        path.push(format!("_{port}"));
        let listener = UnixListener::bind(&path).map_err(|e| state_err(Path::new(&path), e))?;
        let log = SharedLog::create(&self.paths.agent_log, self.spec.log_max_bytes)
            .map_err(|e| state_err(&self.paths.agent_log, e))?;
        self.log_servers.push(logs::serve(
            listener,
            log,
            self.spec.agent_log_connections,
            "agent log",
        ));
        Ok(())
    }

    /// Sends `child`'s stdout and stderr into the capped log at `path`.
    pub(super) fn pipe_logs(&mut self, child: &mut Child, path: &Path) -> Result<(), LaunchError> {
        let log =
            SharedLog::create(path, self.spec.log_max_bytes).map_err(|e| state_err(path, e))?;
        if let Some(out) = child.stdout.take() {
            self.log_pipes
                .push(tokio::spawn(logs::copy_into(out, log.clone())));
        }
        if let Some(err) = child.stderr.take() {
            self.log_pipes.push(tokio::spawn(logs::copy_into(err, log)));
        }
        Ok(())
    }

    pub(super) fn stop_log_tasks(&mut self) {
        for t in self.log_servers.drain(..).chain(self.log_pipes.drain(..)) {
            t.abort();
        }
    }
}

fn state_err(path: &Path, source: io::Error) -> LaunchError {
    LaunchError::StateDir {
        path: path.to_path_buf(),
        source,
    }
}
