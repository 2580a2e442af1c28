//! Starting, watching and stopping a pod's microVM.
//!
//! Two backends, one guest: where the host's KVM can run a stock guest
//! ([`detect`]), husk-vmm runs the whole VM (vCPUs and every device) in one
//! process; elsewhere QEMU (`-M microvm`, virtio-mmio, TCG emulation) runs the
//! vCPUs and husk-vmm serves its vsock and virtio-fs devices over vhost-user,
//! so the guest sees husk's own device code either way. QEMU can also be
//! asked for on KVM.

pub mod cgroup;
mod choose;
pub mod detect;
pub mod husk_vmm;
mod log_wiring;
pub mod logs;
mod pod_vm;
mod process;
pub mod qemu;
mod qemu_backends;
pub mod qemu_jail;
mod spec_check;

use std::{os::fd::OwnedFd, path::PathBuf, sync::Arc, time::Duration};

pub use pod_vm::{select, LaunchError, LaunchTimings, PodVm, ShutdownOutcome};

/// The program that runs a pod VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypervisor {
    Qemu,
    HuskVmm,
}

impl Hypervisor {
    pub fn name(self) -> &'static str {
        match self {
            Hypervisor::Qemu => "QEMU",
            Hypervisor::HuskVmm => "husk-vmm",
        }
    }
}

impl std::fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the caller asks for; `Auto` is husk-vmm where KVM can run a stock
/// guest and QEMU with TCG elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HypervisorChoice {
    #[default]
    Auto,
    Qemu,
    HuskVmm,
}

/// How the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// What the caller asks for; `Auto` picks KVM only where it can run a stock guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Everything needed to start one pod VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Short name used in process titles and logs.
    pub id: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Private directory for this VM's sockets and logs; created by the launch
    /// (it must not exist yet) and removed when the VM is torn down.
    pub state_dir: PathBuf,
    pub hypervisor: HypervisorChoice,
    pub accel: AccelChoice,
    pub qemu_binary: PathBuf,
    pub vmm_binary: PathBuf,
    /// From process start until the agent answers a health check.
    pub boot_timeout: Duration,
    /// Deadline for each agent call once the VM is up.
    pub call_timeout: Duration,
    /// Appended to husk's kernel command line.
    pub extra_cmdline: String,
    pub guest_cid: u32,
    /// Host vsock port the agent streams its log to (a guest-initiated
    /// connection); `None` leaves the agent's log on the serial console only.
    pub agent_log_port: Option<u32>,
    /// The pod's shared directory, exported to the guest with virtio-fs.
    pub share: Option<Share>,
    /// The pod's NIC: a tap QEMU drives as a virtio-net device.
    pub network: Option<NetDevice>,
    /// Run husk-vmm, and on the QEMU path QEMU and its vhost-user backends,
    /// in the jail (own namespaces, empty root, capabilities dropped: see
    /// husk-vmm's `jail` module; QEMU also as a uid of its own, see
    /// [`qemu_jail`]). Needs root.
    pub jail: bool,
    /// The host cgroup the VM's processes run in (the sandbox container's OCI
    /// `linux.cgroupsPath`), created by the launch and removed at teardown.
    pub cgroups_path: Option<String>,
    /// The cap on each log file the VM feeds (console, agent log, each
    /// process's output).
    pub log_max_bytes: u64,
    /// How many guest-initiated agent-log connections are served at once.
    pub agent_log_connections: usize,
}

/// A virtio-net device backed by a tap the caller opened (in the pod's
/// network namespace). QEMU inherits the fd; the launch does not close the
/// caller's copy.
#[derive(Debug, Clone)]
pub struct NetDevice {
    pub tap: Arc<OwnedFd>,
    /// The guest NIC's MAC: the CNI interface's, so that the pod IP keeps
    /// the MAC the CNI bridge has learned for it.
    pub mac: [u8; 6],
}

/// A host directory the guest mounts with `mount -t virtiofs <tag> <dir>`.
#[derive(Debug, Clone)]
pub struct Share {
    pub dir: PathBuf,
    /// At most 36 bytes of `[A-Za-z0-9._-]` (virtio-fs config space, and no
    /// commas that QEMU's option parser would split on).
    pub tag: String,
}

impl VmSpec {
    /// A spec with husk's defaults for the given guest kernel and initrd.
    pub fn new(
        id: impl Into<String>,
        kernel: PathBuf,
        initrd: PathBuf,
        state_dir: PathBuf,
    ) -> Self {
        Self {
            id: id.into(),
            kernel,
            initrd,
            vcpus: 1,
            memory_mib: 256,
            state_dir,
            hypervisor: HypervisorChoice::Auto,
            accel: AccelChoice::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            vmm_binary: PathBuf::from("husk-vmm"),
            // TCG boots in a few seconds; the margin covers a loaded 2-core host.
            boot_timeout: Duration::from_secs(60),
            call_timeout: Duration::from_secs(10),
            extra_cmdline: String::new(),
            guest_cid: 3,
            agent_log_port: Some(DEFAULT_AGENT_LOG_PORT),
            share: None,
            network: None,
            jail: true,
            cgroups_path: None,
            log_max_bytes: husk_bounds::DEFAULT_LOG_MAX_BYTES,
            agent_log_connections: DEFAULT_AGENT_LOG_CONNECTIONS,
        }
    }
}

/// How the guest's reboot (the agent's power-off: the lean guest has no ACPI)
/// reaches the VMM, which ends the VM on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reboot {
    /// `reboot=k`: 0xFE to the i8042, which husk-vmm reports as a power-off,
    /// apart from a triple fault (a crash).
    Keyboard,
    /// `reboot=t`: a triple fault, which QEMU's `-no-reboot` turns into an
    /// exit. QEMU's microvm has no i8042, where `reboot=k` would wait on the
    /// absent controller before falling back to this.
    TripleFault,
}

/// husk's kernel command line: `reboot` as the VMM wants it, `panic=-1` so a
/// kernel panic ends the VM the same way (a crashed guest never sits there
/// burning CPU). husk-vmm appends its devices' `virtio_mmio.device=` entries,
/// QEMU's microvm its own.
pub fn kernel_cmdline(spec: &VmSpec, reboot: Reboot) -> String {
    let reboot = match reboot {
        Reboot::Keyboard => "k",
        Reboot::TripleFault => "t",
    };
    let mut c = format!("console=ttyS0 reboot={reboot} panic=-1 quiet");
    if let Some(port) = spec.agent_log_port {
        c.push_str(&format!(" husk.log_port={port}"));
    }
    if !spec.extra_cmdline.trim().is_empty() {
        c.push(' ');
        c.push_str(spec.extra_cmdline.trim());
    }
    c
}

/// Host port the agent connects to for its log stream.
pub const DEFAULT_AGENT_LOG_PORT: u32 = 1025;
/// The agent opens one log connection (again after a reconnect); a few more
/// are tolerated, any beyond are closed.
pub const DEFAULT_AGENT_LOG_CONNECTIONS: usize = 4;
