//! How building or running a VM fails.
//!
//! Each build error names the command-line flag it came from, so that `husk-vmm run` can
//! report it as is and the shim's log points at the bad argument.

use std::io;
use std::path::PathBuf;

use super::config::MAX_VCPUS;
use crate::arch::x86_64::mptable;
use crate::loader;
use crate::seccomp;
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("--memory {0}: must be at least 16 MiB")]
    Memory(u64),
    #[error("--vsock guest CID {0}: must be between 3 and 4294967294")]
    GuestCid(u64),
    #[error("--kernel {}: {source}", path.display())]
    Kernel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--initrd {}: {source}", path.display())]
    Initrd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--console-log {}: {source}", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--vsock-uds {}: {source}", path.display())]
    Vsock {
        path: PathBuf,
        #[source]
        source: crate::devices::virtio::vsock::VsockError,
    },
    #[error("--api-sock {}: {source}", path.display())]
    ApiSock {
        path: PathBuf,
        #[source]
        source: crate::sock::BindError,
    },
    #[error("virtio-fs share: {0}")]
    Fs(#[source] crate::devices::virtio::fs::FsError),
    #[error("--net-tap {tap}: {source}")]
    NetTap {
        tap: String,
        #[source]
        source: crate::devices::virtio::net::TapError,
    },
    #[error("virtio-net: {0}")]
    Net(#[source] crate::devices::virtio::net::NetError),
    #[error("cannot open /dev/urandom for virtio-rng: {0}")]
    Rng(#[source] io::Error),
    #[error(transparent)]
    Vm(#[from] crate::vstate::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::VcpuError),
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("KVM_IRQFD (GSI {gsi}): {source}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IOEVENTFD ({addr:#x}): {source}")]
    Ioeventfd {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("cannot set up epoll: {0}")]
    Epoll(#[source] io::Error),
    #[error("too many virtio devices")]
    TooManyDevices,
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    #[error("virtqueue set-up: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] nix::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::VcpuError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("epoll_wait: {0}")]
    Epoll(#[source] io::Error),
    #[error("the VM was already run")]
    AlreadyRun,
}
