//! The pod: its microVM, its agent connection and its host directory.
//!
//! One sandbox per shim. It boots when the pod's first container (the CRI
//! sandbox container, or a plain `ctr run` container) is created, and goes
//! down when containerd shuts the shim down after the last container is
//! deleted. See [`crate::state`] for the directory layout.

pub mod oom;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    agent_client::{AgentClient, GuestRoute},
    config::Config,
    events::Events,
    hypervisor::{NetDevice, PodVm, Share, VmSpec},
    ids::SandboxId,
    network::{format_mac, NetworkError, PodNetwork},
    pod_share::{PodShare, ShareError},
    state::{self, ProcessRef, SandboxState},
};

/// virtio-fs tag of the pod's shared directory.
pub const SHARE_TAG: &str = "husk";
/// Where the agent mounts the shared directory in the guest.
pub const SHARE_IN_GUEST: &str = "/run/husk/shared";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    Config(String),
    #[error("sandbox {id} is already running (its shim, pid {pid}, is alive)")]
    AlreadyRunning { id: String, pid: u32 },
    #[error("sandbox directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the pod VM: {0}")]
    Launch(#[from] crate::hypervisor::LaunchError),
    #[error("setting up the sandbox in the guest: {0}")]
    Agent(#[from] crate::agent_client::AgentError),
    #[error("pod network: {0}")]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Share(#[from] ShareError),
}

/// How long the boot took, for logs and the bench.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    pub vm_ready: Duration,
    pub sandbox_ready: Duration,
}

/// Shared (`Arc`) between the task calls that use it, so that none holds the
/// pod's lock while it talks to the agent; going down takes `&self`.
pub struct Sandbox {
    id: SandboxId,
    dir: PathBuf,
    /// `None` once the VM is down. Held only to read pids or to take the VM out.
    vm: Mutex<Option<PodVm>>,
    /// The VM's pid, read once: what every task reports to containerd.
    vm_pid: u32,
    /// The pod share; torn down after the VM, which exports it.
    share: PodShare,
    /// The tap and tc redirect in the pod's network namespace; torn down
    /// after the VM, which holds the tap.
    network: Mutex<Option<PodNetwork>>,
    agent: AgentClient,
    console_copy: Option<PathBuf>,
    /// The pod's container ids, for checking what the guest reports.
    known: oom::KnownContainers,
    oom_task: JoinHandle<()>,
    pub timings: BootTimings,
}

impl Sandbox {
    /// Boots the pod VM and sets the sandbox up in the guest.
    /// `netns`: the pod's network namespace (CRI's, with the CNI interface
    /// in it), whose network the VM takes over. `cgroups_path`: the sandbox
    /// container's OCI `linux.cgroupsPath`, where the VM's processes run.
    pub async fn boot(
        id: &SandboxId,
        hostname: &str,
        netns: Option<&Path>,
        cgroups_path: Option<&str>,
        config: &Config,
        events: Events,
    ) -> Result<Sandbox, SandboxError> {
        let start = std::time::Instant::now();
        let dir = state::sandbox_dir(id);
        // A directory left by a shim that crashed before containerd ran
        // `delete`: remove it; one whose shim still runs is a conflict.
        if fs::symlink_metadata(&dir).is_ok() {
            match SandboxState::read(&dir) {
                Ok(s) if s.shim.alive() => {
                    return Err(SandboxError::AlreadyRunning {
                        id: id.to_string(),
                        pid: s.shim.pid,
                    })
                }
                _ => {
                    // Kills and waits for leftover processes: blocking.
                    let sid = id.clone();
                    tokio::task::spawn_blocking(move || state::cleanup_sandbox(&sid))
                        .await
                        .map_err(|e| SandboxError::Config(format!("cleaning up {id}: {e}")))?
                        .map_err(|source| SandboxError::Dir {
                            path: dir.clone(),
                            source,
                        })?;
                }
            }
        }
        let dir = state::create_sandbox_dir(id).map_err(|source| SandboxError::Dir {
            path: dir.clone(),
            source,
        })?;
        // From here on, a failure must not leave the directory behind.
        let result = match PodShare::create(&dir) {
            Ok(share) => {
                Self::launch(
                    id,
                    hostname,
                    netns,
                    cgroups_path,
                    config,
                    &dir,
                    share,
                    events,
                )
                .await
            }
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(mut sb) => {
                sb.timings.sandbox_ready = start.elapsed();
                Ok(sb)
            }
            Err(e) => {
                if let Err(e) = state::remove_sandbox_dir(&dir) {
                    warn!(sandbox = %id, "after a failed boot: {e}");
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn launch(
        id: &SandboxId,
        hostname: &str,
        netns: Option<&Path>,
        cgroups_path: Option<&str>,
        config: &Config,
        dir: &Path,
        share: PodShare,
        events: Events,
    ) -> Result<Sandbox, SandboxError> {
        let start = std::time::Instant::now();
        let mut spec = VmSpec::new(
            id.as_str(),
            config.kernel().map_err(SandboxError::Config)?,
            config.initrd().map_err(SandboxError::Config)?,
            dir.join("vm"),
        );
        spec.vcpus = config.vcpus;
        spec.memory_mib = config.memory_mib;
        spec.accel = config.accel;
        spec.hypervisor = config.hypervisor.into();
        spec.qemu_binary = config.qemu_binary().map_err(SandboxError::Config)?;
        spec.vmm_binary = config.vmm_binary().map_err(SandboxError::Config)?;
        spec.boot_timeout = config.boot_timeout;
        spec.call_timeout = config.agent_timeout;
        spec.extra_cmdline = config.kernel_params.clone();
        spec.cgroups_path = cgroups_path.map(str::to_string);
        spec.log_max_bytes = config.log_max_bytes;
        spec.agent_log_connections = config.agent_log_connections;
        spec.share = Some(Share {
            dir: share.view(),
            tag: SHARE_TAG.into(),
        });
        // Dropped (so torn down) on any error below.
        let network = match netns {
            Some(path) => {
                let path = path.to_path_buf();
                // Runs ip and tc: blocking, so off the reactor.
                tokio::task::spawn_blocking(move || PodNetwork::setup(&path))
                    .await
                    .map_err(|e| SandboxError::Config(format!("pod network set-up: {e}")))??
            }
            None => None,
        };
        spec.network = network.as_ref().map(|n| NetDevice {
            tap: n.tap.clone(),
            mac: n.interface.mac,
        });
        let vm = PodVm::launch(spec).await?;
        let vm_ready = start.elapsed();
        // Record who runs the pod before anything else can fail, so that
        // `delete` after a crash finds the VM.
        let st = SandboxState {
            sandbox_id: id.as_str().to_string(),
            shim: ProcessRef::of(std::process::id()).ok_or_else(|| {
                SandboxError::Config("cannot read the shim's own /proc entry".into())
            })?,
            vm: vm.pids().into_iter().filter_map(ProcessRef::of).collect(),
            cgroups: vm.cgroup_dirs(),
        };
        st.write(dir).map_err(|source| SandboxError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let agent = match vm.agent() {
            Some(a) => a.clone(),
            None => vm.connect_agent().await?,
        };
        agent
            .create_sandbox(hostname, "", SHARE_TAG, SHARE_IN_GUEST)
            .await?;
        if let Some(net) = &network {
            configure_guest_network(&agent, net).await?;
        }
        info!(
            sandbox = %id,
            accel = ?vm.accel(),
            vm_ready_ms = vm_ready.as_millis() as u64,
            "sandbox ready"
        );
        let known = oom::KnownContainers::default();
        let oom_task = tokio::spawn(oom::forward(agent.clone(), events, known.clone()));
        Ok(Sandbox {
            id: id.clone(),
            dir: dir.to_path_buf(),
            vm_pid: vm.pids().first().copied().unwrap_or(0),
            vm: Mutex::new(Some(vm)),
            share,
            network: Mutex::new(network),
            agent,
            known,
            console_copy: config
                .console_log
                .as_ref()
                .map(|p| PathBuf::from(p.to_string_lossy().replace("{id}", id.as_str()))),
            oom_task,
            timings: BootTimings {
                vm_ready,
                sandbox_ready: Duration::ZERO,
            },
        })
    }

    pub fn id(&self) -> &str {
        self.id.as_str()
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The pod's containers as the shim knows them: guest events naming any
    /// other id are dropped.
    pub fn known_containers(&self) -> &oom::KnownContainers {
        &self.known
    }

    /// The pod share: where container rootfs and bind mounts are made.
    pub fn share(&self) -> &PodShare {
        &self.share
    }

    /// QEMU's (or husk-vmm's) pid: the host process that stands for the pod's tasks.
    pub fn vm_pid(&self) -> u32 {
        self.vm_pid
    }

    /// Powers the VM off (killing it after `grace`), then removes the
    /// sandbox directory and everything mounted under it. A second call finds
    /// nothing left to do.
    pub async fn shutdown(&self, grace: Duration) {
        self.oom_task.abort();
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(vm) = vm {
            self.copy_console(&vm);
            let outcome = vm.shutdown(grace).await;
            info!(sandbox = %self.id, ?outcome, "pod VM down");
        }
        let net = self
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut net) = net {
            tokio::task::spawn_blocking(move || net.teardown())
                .await
                .unwrap_or_else(|e| warn!("pod network teardown: {e}"));
        }
        self.remove_host_state();
    }

    /// The share's mounts, then the directory: never deleting through a mount
    /// that stayed (what is left is logged and left in place).
    fn remove_host_state(&self) {
        // Leftovers are logged by the share itself.
        let _ = self.share.teardown();
        if let Err(e) = state::remove_sandbox_dir(&self.dir) {
            warn!(sandbox = %self.id, "{e}");
        }
    }

    fn copy_console(&self, vm: &PodVm) {
        let Some(dest) = &self.console_copy else {
            return;
        };
        if let Some(parent) = dest.parent() {
            let _ = fs::create_dir_all(parent);
        }
        // Both logs are guest-written and capped; read no more than the cap.
        let cap = vm.log_max_bytes();
        let mut text = husk_bounds::read_tail(vm.console_log_path(), cap).unwrap_or_default();
        if let Ok(agent_log) = husk_bounds::read_tail(vm.agent_log_path(), cap) {
            text.extend_from_slice(b"\n--- agent log ---\n");
            text.extend_from_slice(&agent_log);
        }
        if let Err(e) = fs::write(dest, text) {
            warn!(sandbox = %self.id, "writing console log {}: {e}", dest.display());
        }
    }
}

/// Gives the guest NIC (found by the pod MAC) the CNI interface's addresses
/// and MTU, then the routes CNI set up through it.
async fn configure_guest_network(
    agent: &AgentClient,
    net: &PodNetwork,
) -> Result<(), SandboxError> {
    let name = agent
        .update_interface(
            &format_mac(net.interface.mac),
            &net.interface.addresses,
            net.interface.mtu,
        )
        .await?;
    let routes: Vec<GuestRoute> = net
        .routes
        .iter()
        .map(|r| GuestRoute {
            destination: r.destination.clone(),
            gateway: r.gateway.clone(),
            device: name.clone(),
        })
        .collect();
    if !routes.is_empty() {
        agent.update_routes(&routes).await?;
    }
    info!(interface = %name, addresses = ?net.interface.addresses, routes = routes.len(), "guest network configured");
    Ok(())
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.oom_task.abort();
        let vm = self.vm.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if vm.is_some() {
            // Dropping the PodVm kills the VM; the directory goes too.
            drop(vm);
            self.network
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            self.remove_host_state();
        }
    }
}
