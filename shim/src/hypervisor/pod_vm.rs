//! A running pod VM: its processes, sockets and logs, from launch to teardown.
//!
//! With husk-vmm a VM is one `husk-vmm run` process on KVM with every device
//! in it. On the QEMU path it is QEMU plus one husk-vmm process per vhost-user
//! device (vsock always, virtio-fs when the pod has a shared directory). Every way out (a clean shutdown, a
//! guest that hangs, a guest that crashes, a launch that fails half-way, or the
//! `PodVm` simply being dropped) ends both processes and removes the state
//! directory, so nothing is leaked.

use std::{
    fs, io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tokio::{
    process::{Child, Command},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

pub use super::choose::select;
use super::{
    cgroup::{self, CgroupError, PodCgroup},
    husk_vmm,
    process::{inherit_fd, reap_now, spawn, tail},
    qemu,
    qemu_backends::Backend,
    qemu_jail, Accel, Hypervisor, VmSpec,
};
use crate::agent_client::{AgentClient, AgentError};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("KVM was requested but cannot be used: {0}")]
    KvmUnavailable(String),
    #[error("creating VM state directory {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("starting {what} ({binary}): {source}")]
    Spawn {
        what: &'static str,
        binary: PathBuf,
        source: io::Error,
    },
    #[error("{what} did not come up within {timeout:?}; its log:\n{log}")]
    VmmNotReady {
        what: &'static str,
        timeout: Duration,
        log: String,
    },
    #[error("{what} exited ({status}) before the agent was ready; console:\n{console}\n{what} log:\n{log}")]
    Exited {
        what: &'static str,
        status: ExitStatus,
        console: String,
        log: String,
    },
    #[error("the guest agent did not answer within {timeout:?} (last error: {last_error}); console:\n{console}")]
    BootTimeout {
        timeout: Duration,
        last_error: String,
        console: String,
    },
    #[error("watching VM processes: {0}")]
    Wait(io::Error),
    #[error("the pod's host cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    QemuJail(#[from] super::qemu_jail::QemuJailError),
}

/// Host-side timestamps of a launch, from the start of [`PodVm::launch`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LaunchTimings {
    /// Every husk-vmm device backend's vhost-user socket is accepting connections.
    pub vmm_ready: Duration,
    /// The VM process (QEMU or husk-vmm) has been spawned.
    pub vm_spawned: Duration,
    /// The agent answered its first health check.
    pub agent_ready: Duration,
}

/// How a VM went down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest powered off on the agent's request within the grace period.
    Clean,
    /// The processes had to be killed; the reason says why.
    Forced(String),
}

pub(super) struct Paths {
    pub(super) dir: PathBuf,
    pub(super) vsock_uds: PathBuf,
    pub(super) vhost_vsock: PathBuf,
    pub(super) console_log: PathBuf,
    /// QEMU's serial console connects here; the shim writes console.log.
    pub(super) console_sock: PathBuf,
    qemu_log: PathBuf,
    husk_vmm_log: PathBuf,
    api_sock: PathBuf,
    pub(super) vhost_fs: PathBuf,
    pub(super) agent_log: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            vsock_uds: dir.join("vsock.sock"),
            vhost_vsock: dir.join("vsock.vhost"),
            console_log: dir.join("console.log"),
            console_sock: dir.join("console.sock"),
            qemu_log: dir.join("qemu.log"),
            husk_vmm_log: dir.join("husk-vmm.log"),
            api_sock: dir.join("api.sock"),
            vhost_fs: dir.join("fs.vhost"),
            agent_log: dir.join("agent.log"),
        }
    }
}

/// A launched pod VM whose agent is answering.
pub struct PodVm {
    pub(super) spec: VmSpec,
    accel: Accel,
    pub(super) paths: Paths,
    hypervisor: Hypervisor,
    /// QEMU, or husk-vmm running the whole VM.
    vm: Option<Child>,
    pub(super) backends: Vec<Backend>,
    /// Log listeners (console, agent log): aborted at teardown.
    pub(super) log_servers: Vec<JoinHandle<()>>,
    /// The VM processes' stdout and stderr into their logs: they end at EOF.
    pub(super) log_pipes: Vec<JoinHandle<()>>,
    agent: Option<AgentClient>,
    timings: LaunchTimings,
    /// Where the VM's processes run on the host; removed after they are gone.
    cgroup: Option<PodCgroup>,
    /// The uid a jailed QEMU runs as, leased for the pod's life.
    qemu_user: Option<super::qemu_jail::QemuUser>,
}

impl PodVm {
    /// Starts the VM and waits until its agent answers a health check.
    pub async fn launch(spec: VmSpec) -> Result<PodVm, LaunchError> {
        let start = Instant::now();
        super::spec_check::validate(&spec)?;
        let (hypervisor, accel, host) = select(&spec)?;
        info!(id = %spec.id, %hypervisor, ?accel, %host, "launching pod VM");

        fs::DirBuilder::new()
            .mode(0o700)
            .create(&spec.state_dir)
            .map_err(|source| LaunchError::StateDir {
                path: spec.state_dir.clone(),
                source,
            })?;
        let paths = Paths::new(&spec.state_dir);
        let mut vm = PodVm {
            spec,
            accel,
            paths,
            hypervisor,
            vm: None,
            backends: Vec::new(),
            log_servers: Vec::new(),
            log_pipes: Vec::new(),
            agent: None,
            timings: LaunchTimings::default(),
            cgroup: None,
            qemu_user: None,
        };
        if let Some(path) = &vm.spec.cgroups_path {
            vm.cgroup = Some(PodCgroup::create(path)?);
        }
        // On any error below, dropping `vm` kills what was started and removes
        // the state directory.
        match hypervisor {
            Hypervisor::Qemu => {
                vm.start_backends().await?;
                vm.timings.vmm_ready = start.elapsed();
                vm.start_agent_log_listener()?;
                vm.start_console_listener()?;
                vm.start_qemu()?;
            }
            Hypervisor::HuskVmm => {
                // Guest-initiated connections find the listener from the start.
                vm.start_agent_log_listener()?;
                vm.start_husk_vmm()?;
                vm.timings.vmm_ready = start.elapsed();
            }
        }
        vm.timings.vm_spawned = start.elapsed();
        let deadline = start + vm.spec.boot_timeout;
        vm.wait_for_agent(deadline).await?;
        vm.timings.agent_ready = start.elapsed();
        info!(id = %vm.spec.id, ready_ms = vm.timings.agent_ready.as_millis() as u64, "pod VM ready");
        Ok(vm)
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Which program runs the VM.
    pub fn hypervisor(&self) -> Hypervisor {
        self.hypervisor
    }

    pub fn timings(&self) -> LaunchTimings {
        self.timings
    }

    /// The hybrid vsock socket: `CONNECT <port>\n` reaches a guest port.
    pub fn vsock_uds(&self) -> &Path {
        &self.paths.vsock_uds
    }

    pub fn state_dir(&self) -> &Path {
        &self.paths.dir
    }

    pub fn console_log_path(&self) -> &Path {
        &self.paths.console_log
    }

    /// What the VM process (QEMU or husk-vmm) logged.
    pub fn vm_log_path(&self) -> &Path {
        self.vm_log()
    }

    /// The agent's log as received over its guest-initiated vsock connection.
    pub fn agent_log_path(&self) -> &Path {
        &self.paths.agent_log
    }

    /// The cap on each of the VM's log files.
    pub fn log_max_bytes(&self) -> u64 {
        self.spec.log_max_bytes
    }

    /// Process ids of the VM process (first: QEMU or husk-vmm) and the
    /// husk-vmm device backends, while they run.
    pub fn pids(&self) -> Vec<u32> {
        self.vm
            .iter()
            .chain(self.backends.iter().map(|b| &b.child))
            .filter_map(|c| c.id())
            .collect()
    }

    /// The VM's host cgroup directories (one per v1 hierarchy, or one in v2).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup
            .as_ref()
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
    }

    /// The connection made during launch. Open more with [`PodVm::connect_agent`].
    pub fn agent(&self) -> Option<&AgentClient> {
        self.agent.as_ref()
    }

    pub async fn connect_agent(&self) -> Result<AgentClient, AgentError> {
        AgentClient::connect(&self.paths.vsock_uds, self.spec.call_timeout).await
    }

    /// Asks the guest to power off and waits up to `grace` for the VM to end;
    /// kills it otherwise. Either way every process and file is gone after.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownOutcome {
        let outcome = match self.graceful(grace).await {
            Ok(()) => ShutdownOutcome::Clean,
            Err(reason) => {
                warn!(id = %self.spec.id, %reason, "forcing pod VM down");
                ShutdownOutcome::Forced(reason)
            }
        };
        self.teardown().await;
        outcome
    }

    /// Ends the VM at once.
    pub async fn kill(mut self) {
        self.teardown().await;
    }

    async fn graceful(&mut self, grace: Duration) -> Result<(), String> {
        let deadline = Instant::now() + grace;
        let agent = match self.agent.take() {
            Some(a) => a,
            None => self.connect_agent().await.map_err(|e| e.to_string())?,
        };
        tokio::time::timeout_at(deadline.into(), agent.shutdown())
            .await
            .map_err(|_| format!("agent did not acknowledge shutdown within {grace:?}"))?
            .map_err(|e| e.to_string())?;
        let name = self.hypervisor.to_string();
        let vm = self.vm.as_mut().ok_or(format!("{name} is not running"))?;
        let status = tokio::time::timeout_at(deadline.into(), vm.wait())
            .await
            .map_err(|_| format!("guest did not power off within {grace:?}"))?
            .map_err(|e| e.to_string())?;
        self.vm = None;
        if !status.success() {
            return Err(format!("{name} exited with {status} on shutdown"));
        }
        // Each backend exits by itself once QEMU, its vhost-user front end, is gone.
        while let Some(mut b) = self.backends.pop() {
            match tokio::time::timeout_at(deadline.into(), b.child.wait()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => {
                    let what = b.what;
                    self.backends.push(b);
                    return Err(format!("{what} did not exit after QEMU"));
                }
            }
        }
        Ok(())
    }

    async fn teardown(&mut self) {
        self.agent = None;
        let name = self.hypervisor.name();
        let vm = self.vm.take().map(|c| (name, c));
        let backends = self.backends.drain(..).map(|b| (b.what, b.child));
        for (name, mut child) in vm.into_iter().chain(backends).collect::<Vec<_>>() {
            if let Err(e) = child.kill().await {
                warn!(id = %self.spec.id, "killing {name}: {e}");
            }
        }
        // The processes are gone, so their pipes reach EOF: let the last
        // lines (a panic, a fatal error) reach the logs, briefly.
        let mut pipes = std::mem::take(&mut self.log_pipes);
        let drain = async {
            for t in pipes.iter_mut() {
                let _ = t.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
        for t in pipes {
            t.abort();
        }
        self.stop_log_tasks();
        // Retries EBUSY with sleeps while the kernel frees the cgroup: off the
        // async workers.
        if let Some(cg) = self.cgroup.take() {
            let dirs = cg.dirs().to_vec();
            drop(cg);
            let _ = tokio::task::spawn_blocking(move || cgroup::remove_dirs(&dirs)).await;
        }
        remove_state_dir(&self.paths.dir);
    }

    /// Once every VM process is reaped.
    fn remove_cgroup(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let dirs = cg.dirs().to_vec();
            drop(cg);
            cgroup::remove_dirs(&dirs);
        }
    }

    pub(super) fn cgroup_fds(&self) -> Vec<i32> {
        self.cgroup
            .as_ref()
            .map(PodCgroup::procs_fds)
            .unwrap_or_default()
    }

    fn start_qemu(&mut self) -> Result<(), LaunchError> {
        let args = qemu::args(
            &self.spec,
            self.accel,
            &qemu::QemuPaths {
                vhost_vsock_socket: &self.paths.vhost_vsock,
                vhost_fs_socket: self
                    .spec
                    .share
                    .as_ref()
                    .map(|_| self.paths.vhost_fs.as_path()),
                console_sock: &self.paths.console_sock,
            },
        );
        let mut cmd = if self.spec.jail {
            let p = &self.paths;
            let mut sockets = vec![p.vhost_vsock.as_path(), p.console_sock.as_path()];
            sockets.extend(self.spec.share.as_ref().map(|_| p.vhost_fs.as_path()));
            let kvm = self.accel == Accel::Kvm;
            let (cmd, user) = qemu_jail::command(&self.spec, kvm, sockets, &p.dir, args)?;
            self.qemu_user = Some(user);
            cmd
        } else {
            let mut cmd = Command::new(&self.spec.qemu_binary);
            cmd.args(args);
            cmd
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(net) = &self.spec.network {
            inherit_fd(&mut cmd, std::os::fd::AsRawFd::as_raw_fd(&*net.tap));
        }
        debug!(id = %self.spec.id, ?cmd, "starting QEMU");
        let mut child = spawn(cmd, "QEMU", &self.spec.qemu_binary, self.cgroup_fds())?;
        let log = self.paths.qemu_log.clone();
        self.pipe_logs(&mut child, &log)?;
        self.vm = Some(child);
        Ok(())
    }

    /// One `husk-vmm run` process: vCPUs and every device (vsock, virtio-fs,
    /// net, rng) on KVM. The agent answering is its readiness.
    fn start_husk_vmm(&mut self) -> Result<(), LaunchError> {
        let args = husk_vmm::args(
            &self.spec,
            &husk_vmm::HuskVmmPaths {
                vsock_uds: &self.paths.vsock_uds,
                api_sock: &self.paths.api_sock,
                console_log: &self.paths.console_log,
            },
        );
        let mut cmd = Command::new(&self.spec.vmm_binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(net) = &self.spec.network {
            inherit_fd(&mut cmd, std::os::fd::AsRawFd::as_raw_fd(&*net.tap));
        }
        debug!(id = %self.spec.id, ?cmd, "starting husk-vmm");
        let mut child = spawn(cmd, "husk-vmm", &self.spec.vmm_binary, self.cgroup_fds())?;
        let log = self.paths.husk_vmm_log.clone();
        self.pipe_logs(&mut child, &log)?;
        self.vm = Some(child);
        Ok(())
    }

    async fn wait_for_agent(&mut self, deadline: Instant) -> Result<(), LaunchError> {
        let mut last_error = String::from("none yet");
        loop {
            self.check_alive().await?;
            if Instant::now() >= deadline {
                return Err(LaunchError::BootTimeout {
                    timeout: self.spec.boot_timeout,
                    last_error,
                    console: tail(&self.paths.console_log),
                });
            }
            // Short attempts: until the guest's vsock driver is up, a CONNECT
            // waits in the device rather than failing.
            let attempt = Duration::from_millis(500).min(deadline - Instant::now());
            let result = tokio::time::timeout(attempt, async {
                let client = AgentClient::connect(&self.paths.vsock_uds, attempt).await?;
                client.health().await?;
                Ok::<_, AgentError>(client)
            })
            .await;
            match result {
                Ok(Ok(client)) => {
                    // The probe's short deadline was for boot polling only.
                    self.agent = Some(client.with_call_timeout(self.spec.call_timeout));
                    return Ok(());
                }
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = format!("attempt timed out after {attempt:?}"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn check_alive(&mut self) -> Result<(), LaunchError> {
        let mut vm_status = self.vm_exit()?;
        let mut backend_exit = None;
        if vm_status.is_none() {
            for (i, b) in self.backends.iter_mut().enumerate() {
                if let Some(status) = b.child.try_wait().map_err(LaunchError::Wait)? {
                    backend_exit = Some((i, status));
                    break;
                }
            }
        }
        if backend_exit.is_some() {
            // A backend ends when QEMU closes its vhost-user connection, which
            // QEMU does on its way out: give QEMU a moment so that the error
            // names the process that failed first.
            for _ in 0..50 {
                vm_status = self.vm_exit()?;
                if vm_status.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Some(status) = vm_status {
            // QEMU fails to connect to a backend that died first (a seccomp trap, a
            // jail error): its log says why, QEMU's only that the socket was refused.
            let mut log = tail(self.vm_log());
            for b in self.backends.iter_mut() {
                if let Ok(Some(st)) = b.child.try_wait() {
                    log.push_str(&format!("\n{} ({st}):\n{}", b.what, tail(&b.log)));
                }
            }
            return Err(LaunchError::Exited {
                what: self.hypervisor.name(),
                status,
                console: tail(&self.paths.console_log),
                log,
            });
        }
        if let Some((i, status)) = backend_exit {
            let b = &self.backends[i];
            return Err(LaunchError::Exited {
                what: b.what,
                status,
                console: tail(&self.paths.console_log),
                log: tail(&b.log),
            });
        }
        Ok(())
    }

    fn vm_log(&self) -> &Path {
        match self.hypervisor {
            Hypervisor::Qemu => &self.paths.qemu_log,
            Hypervisor::HuskVmm => &self.paths.husk_vmm_log,
        }
    }

    fn vm_exit(&mut self) -> Result<Option<ExitStatus>, LaunchError> {
        match self.vm.as_mut() {
            Some(c) => c.try_wait().map_err(LaunchError::Wait),
            None => Ok(None),
        }
    }
}

impl Drop for PodVm {
    fn drop(&mut self) {
        // Synchronous last resort for a VM that was not shut down: SIGKILL,
        // reap, and remove the state directory.
        let backends = self.backends.drain(..).map(|b| b.child);
        for child in self
            .vm
            .take()
            .into_iter()
            .chain(backends)
            .collect::<Vec<_>>()
        {
            reap_now(child);
        }
        self.stop_log_tasks();
        self.remove_cgroup();
        remove_state_dir(&self.paths.dir);
    }
}

fn remove_state_dir(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("removing VM state directory {}: {e}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[tokio::test]
    async fn missing_vmm_binary_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        fs::write(&k, b"x").unwrap();
        let state = dir.path().join("state");
        let mut s = VmSpec::new("t", k.clone(), k, state.clone());
        s.vmm_binary = dir.path().join("no-such-husk-vmm");
        s.accel = crate::hypervisor::AccelChoice::Tcg;
        let err = PodVm::launch(s).await.err().expect("launch must fail");
        assert!(
            matches!(
                err,
                LaunchError::Spawn {
                    what: "husk-vmm vsock",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!state.exists(), "state directory left behind");
    }
}
