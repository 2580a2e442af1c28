//! Building and running a VM: the `husk-vmm run` path.
//!
//! [`Vmm::build`] creates the KVM VM, loads what it boots, puts the legacy devices on the
//! port bus and each virtio device on its own virtio-mmio window (ioeventfd per queue, irqfd
//! per device, `virtio_mmio.device=` on the command line), writes the MP table and configures
//! the vCPUs. [`Vmm::run`] starts one thread per vCPU and turns the calling thread into the
//! event loop, each thread under its own seccomp filter, until the VM ends.

mod config;
mod device_manager;
mod error;
mod event_loop;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::info;
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::Epoll;

use crate::arch::x86_64::mptable;
use crate::devices::virtio::transport::mmio::MmioTransport;
use crate::loader;
use crate::vstate::vcpu::{BootEntry, BootTimer};
use crate::vstate::{ExitNotifier, Vcpu, VcpuControl, VcpuHandle, Vm};
use device_manager::{cmdline_with_devices, VirtioSlot};
use event_loop::{ApiConn, ApiListener};

pub use crate::vstate::VmExit;
pub use config::{BootSource, NetConfig, TapSource, VmConfig, VsockConfig, MAX_VCPUS};
pub use error::{BuildError, RunError};

/// A built VM, ready to run.
pub struct Vmm {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    handles: Vec<VcpuHandle>,
    control: Arc<VcpuControl>,
    exit: ExitNotifier,
    devices: Vec<VirtioSlot>,
    epoll: Epoll,
    api: Option<ApiListener>,
    api_conns: HashMap<RawFd, ApiConn>,
    signals: Option<nix::sys::signalfd::SignalFd>,
    seccomp: bool,
    /// The event loop serves virtio-fs: its seccomp filter allows the file system calls.
    serves_fs: bool,
    vsock_uds: Option<PathBuf>,
    cmdline: String,
    ran: bool,
}

impl Vmm {
    /// Builds the VM described by `cfg`.
    pub fn build(cfg: VmConfig) -> Result<Vmm, BuildError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(BuildError::Vcpus(cfg.vcpus));
        }
        if cfg.memory_mib < 16 {
            return Err(BuildError::Memory(cfg.memory_mib));
        }
        if let Some(v) = &cfg.vsock {
            if v.guest_cid < 3 || v.guest_cid >= u64::from(u32::MAX) {
                return Err(BuildError::GuestCid(v.guest_cid));
            }
        }
        let mem_size = cfg.memory_mib << 20;

        // Signals first, so every thread we start inherits the blocked mask.
        let signals = if cfg.handle_signals {
            use nix::sys::signal::{SigSet, Signal};
            use nix::sys::signalfd::{SfdFlags, SignalFd};
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGINT);
            set.thread_block().map_err(BuildError::Signals)?;
            Some(
                SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
                    .map_err(BuildError::Signals)?,
            )
        } else {
            None
        };

        // Open every input before creating anything, so that bad arguments fail fast.
        let (mut kernel_file, mut initrd_file) = match &cfg.boot {
            BootSource::Linux { kernel, initrd, .. } => {
                let k = File::open(kernel).map_err(|source| BuildError::Kernel {
                    path: kernel.clone(),
                    source,
                })?;
                let i = match initrd {
                    Some(p) => Some(File::open(p).map_err(|source| BuildError::Initrd {
                        path: p.clone(),
                        source,
                    })?),
                    None => None,
                };
                (Some(k), i)
            }
            BootSource::Program { .. } => (None, None),
        };
        let console: Box<dyn Write + Send> = match &cfg.console_log {
            Some(path) => {
                let err = |source| BuildError::ConsoleLog {
                    path: path.clone(),
                    source,
                };
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(err)?;
                Box::new(
                    husk_bounds::BoundedLog::from_file(file, cfg.console_log_max_bytes)
                        .map_err(err)?,
                )
            }
            None => Box::new(io::sink()),
        };

        let vm = Vm::new(mem_size)?;
        let exit = ExitNotifier::new().map_err(BuildError::EventFd)?;
        let epoll = Epoll::new().map_err(BuildError::Epoll)?;

        let pio = device_manager::legacy_devices(&vm, &exit, console)?;
        let virtio = device_manager::virtio_devices(&cfg)?;
        let device_manager::MmioDevices {
            bus: mmio,
            slots: devices,
            cmdline: cmdline_devices,
        } = device_manager::attach_virtio(&vm, &epoll, virtio)?;

        // What the guest boots.
        let (boot, cmdline) = match (&cfg.boot, kernel_file.as_mut()) {
            (BootSource::Linux { cmdline, .. }, Some(kernel)) => {
                let cmdline = cmdline_with_devices(cmdline, &cmdline_devices);
                let entry = loader::load_linux(
                    vm.memory(),
                    mem_size,
                    kernel,
                    initrd_file.as_mut(),
                    &cmdline,
                )?;
                (entry, cmdline)
            }
            (BootSource::Program { code, addr }, _) => (
                loader::load_program(vm.memory(), mem_size, code, *addr)?,
                String::new(),
            ),
            (BootSource::Linux { kernel, .. }, None) => {
                return Err(BuildError::Kernel {
                    path: kernel.clone(),
                    source: io::Error::from(io::ErrorKind::NotFound),
                })
            }
        };
        drop(kernel_file);
        drop(initrd_file);
        mptable::setup_mptable(vm.memory(), cfg.vcpus)?;

        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            let entry: Option<&BootEntry> = (id == 0).then_some(&boot);
            let mut vcpu = Vcpu::new(
                &vm,
                id,
                cfg.vcpus,
                entry,
                pio.clone(),
                mmio.clone(),
                exit.clone(),
            )?;
            if id == 0 {
                if let Some(t0) = cfg.boot_timer_t0_ns {
                    vcpu.set_boot_timer(BootTimer { t0_ns: t0 });
                }
            }
            vcpus.push(vcpu);
        }

        let api =
            event_loop::watch_loop_sources(&epoll, &exit, signals.as_ref(), cfg.api_sock.as_ref())?;

        if cfg.boot_timer_t0_ns.is_some() {
            // The bench subtracts guest memory from the RSS it measures.
            for region in vm.memory().iter() {
                let start = region.as_ptr() as u64;
                eprintln!(
                    "husk-vmm: boot-timer: guest memory {start:#x}-{:#x}",
                    start + region.len()
                );
            }
        }
        info!(
            vcpus = cfg.vcpus,
            memory_mib = cfg.memory_mib,
            devices = devices.len(),
            mode = ?boot.mode,
            "VM built"
        );
        Ok(Vmm {
            vm,
            vcpus,
            handles: Vec::new(),
            control: Arc::new(VcpuControl::new()),
            exit,
            devices,
            epoll,
            api,
            api_conns: HashMap::new(),
            signals,
            seccomp: cfg.seccomp,
            serves_fs: cfg.fs.is_some(),
            vsock_uds: cfg.vsock.as_ref().map(|v| v.uds.clone()),
            cmdline,
            ran: false,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// A handle that ends the VM from another thread (tests use it as a watchdog).
    pub fn exit_notifier(&self) -> ExitNotifier {
        self.exit.clone()
    }

    /// The kernel command line the guest got (with the device entries).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The virtio-mmio transports, in window order (tests inspect them).
    pub fn transport(&self, index: usize) -> Option<Arc<Mutex<MmioTransport>>> {
        self.devices.get(index).map(|d| d.transport.clone())
    }
}

/// The current CLOCK_MONOTONIC time in ns, the reference the boot timer takes.
pub fn boot_timer_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_named() {
        let mut cfg = VmConfig::new(BootSource::Linux {
            kernel: "/nonexistent/vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
        });
        cfg.vcpus = 0;
        assert!(Vmm::build(cfg.clone())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("--vcpus"));
        cfg.vcpus = 1;
        cfg.memory_mib = 1;
        assert!(Vmm::build(cfg.clone())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("--memory"));
        cfg.memory_mib = 64;
        let err = Vmm::build(cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--kernel /nonexistent/vmlinux"), "{err}");
    }
}
