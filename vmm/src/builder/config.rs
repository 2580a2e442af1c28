//! What `husk-vmm run` is asked to build.
//!
//! Plain data, apart from the code that acts on it, so the CLI and the tests can describe a
//! VM without touching KVM; [`Vmm::build`](super::Vmm::build) checks the values.

use std::path::PathBuf;

use crate::devices::virtio::fs::FsConfig;

/// Most vCPUs: what the MP table holds, rounded to a sane bound.
pub const MAX_VCPUS: u8 = 32;

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// A Linux kernel (ELF vmlinux with or without PVH note, or bzImage).
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// A raw 64-bit program loaded at `addr` and entered in long mode.
    Program { code: Vec<u8>, addr: u64 },
}

/// The hybrid vsock device.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds: PathBuf,
}

/// The virtio-net device: an existing tap in husk-vmm's network namespace.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub tap: TapSource,
    /// Offered to the guest with VIRTIO_NET_F_MAC; without it the guest picks one.
    pub mac: Option<[u8; 6]>,
}

/// Where the virtio-net device's tap comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// An existing tap interface in husk-vmm's network namespace.
    Name(String),
    /// An inherited fd already attached to a tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR): how a
    /// caller hands over a tap it made in another network namespace (a pod's).
    Fd(i32),
}

impl std::fmt::Display for TapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapSource::Name(n) => write!(f, "tap {n}"),
            TapSource::Fd(fd) => write!(f, "tap fd {fd}"),
        }
    }
}

/// Everything `husk-vmm run` takes.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub boot: BootSource,
    pub console_log: Option<PathBuf>,
    /// The console log's cap (the guest writes it as fast as it likes).
    pub console_log_max_bytes: u64,
    pub vsock: Option<VsockConfig>,
    pub rng: bool,
    pub net: Option<NetConfig>,
    /// A virtio-fs share served in-process (the pod's shared directory).
    pub fs: Option<FsConfig>,
    pub api_sock: Option<PathBuf>,
    pub seccomp: bool,
    /// Turn SIGTERM and SIGINT into a clean stop (the binary; tests leave signals alone).
    pub handle_signals: bool,
    /// Print when vCPU 0 first enters the guest, measured from this CLOCK_MONOTONIC time (ns).
    pub boot_timer_t0_ns: Option<u64>,
}

impl VmConfig {
    pub fn new(boot: BootSource) -> Self {
        VmConfig {
            vcpus: 1,
            memory_mib: 128,
            boot,
            console_log: None,
            console_log_max_bytes: husk_bounds::DEFAULT_LOG_MAX_BYTES,
            vsock: None,
            rng: false,
            net: None,
            fs: None,
            api_sock: None,
            seccomp: true,
            handle_signals: false,
            boot_timer_t0_ns: None,
        }
    }
}
