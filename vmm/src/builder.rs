//! Building and running a VM: the `husk-vmm run` path.
//!
//! [`Vmm::build`] creates the KVM VM, loads what it boots, puts the legacy devices on the
//! port bus and each virtio device on its own virtio-mmio window (ioeventfd per queue, irqfd
//! per device, `virtio_mmio.device=` on the command line), writes the MP table and configures
//! the vCPUs. [`Vmm::run`] starts one thread per vCPU and turns the calling thread into the
//! event loop, each thread under its own seccomp filter, until the VM ends.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use tracing::{info, warn};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{self, Action, LineBuffer, Response, VmState};
use crate::arch::x86_64::{
    mptable, I8042_COMMAND_PORT, I8042_DATA_PORT, SERIAL_IRQ, SERIAL_PORT, VIRTIO_IRQ_BASE,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::devices::bus::Bus;
use crate::devices::legacy::{Serial, I8042};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::fs::{FsConfig, FsDevice};
use crate::devices::virtio::net::{NetDevice, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::transport::mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::devices::virtio::vsock::{MuxerConfig, VsockDevice, VsockMuxer};
use crate::loader;
use crate::seccomp::{self, ThreadKind};
use crate::vstate::vcpu::{BootEntry, BootTimer};
pub use crate::vstate::VmExit;
use crate::vstate::{ExitNotifier, Vcpu, VcpuControl, VcpuHandle, Vm};

/// Most vCPUs: what the MP table holds, rounded to a sane bound.
pub const MAX_VCPUS: u8 = 32;
/// Most virtio-mmio devices: IRQs 5..=23.
const MAX_VIRTIO_DEVICES: u32 = 19;

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

// Event-loop tokens.
const TOKEN_EXIT: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_API_LISTENER: u64 = 2;
const TOKEN_API_CONN: u64 = 1 << 32;
const TOKEN_QUEUE: u64 = 2 << 32;
const TOKEN_BACKEND: u64 = 3 << 32;

struct VirtioSlot {
    transport: Arc<Mutex<MmioTransport>>,
    queue_evts: Vec<EventFd>,
}

struct ApiConn {
    stream: UnixStream,
    lines: LineBuffer,
}

/// A built VM, ready to run.
pub struct Vmm {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    handles: Vec<VcpuHandle>,
    control: Arc<VcpuControl>,
    exit: ExitNotifier,
    devices: Vec<VirtioSlot>,
    epoll: Epoll,
    api: Option<(UnixListener, PathBuf)>,
    api_conns: HashMap<RawFd, ApiConn>,
    signals: Option<nix::sys::signalfd::SignalFd>,
    seccomp: bool,
    /// The event loop serves virtio-fs: its seccomp filter allows the file system calls.
    serves_fs: bool,
    vsock_uds: Option<PathBuf>,
    cmdline: String,
    ran: bool,
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(BuildError::EventFd)
}

/// Puts the `virtio_mmio.device=` entries before any `--` (init's arguments).
fn cmdline_with_devices(cmdline: &str, devices: &[String]) -> String {
    let (kernel, init) = match cmdline.find(" -- ") {
        Some(i) => (&cmdline[..i], Some(&cmdline[i..])),
        None => (cmdline, None),
    };
    let mut out = kernel.trim().to_string();
    for d in devices {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(d);
    }
    if let Some(init) = init {
        out.push_str(init);
    }
    out
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

        // Legacy devices on the port bus.
        let mut pio = Bus::new();
        let serial_irq = eventfd()?;
        vm.fd()
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|source| BuildError::Irqfd {
                gsi: SERIAL_IRQ,
                source,
            })?;
        pio.insert(
            Arc::new(Mutex::new(Serial::new(serial_irq, console))),
            u64::from(SERIAL_PORT),
            8,
        )?;
        // One window over 0x60-0x64 so the device sees offsets 0 (data) and 4 (command);
        // port 0x61 in between is the PIT's speaker port, which KVM handles in the kernel.
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            u64::from(I8042_DATA_PORT),
            u64::from(I8042_COMMAND_PORT - I8042_DATA_PORT) + 1,
        )?;

        // Virtio devices, vsock first so its address is stable.
        let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
        if let Some(v) = &cfg.vsock {
            let muxer =
                VsockMuxer::bind(MuxerConfig::new(v.guest_cid, &v.uds)).map_err(|source| {
                    BuildError::Vsock {
                        path: v.uds.clone(),
                        source,
                    }
                })?;
            virtio.push(Box::new(VsockDevice::new(v.guest_cid, muxer)));
        }
        if cfg.rng {
            virtio.push(Box::new(Rng::new().map_err(BuildError::Rng)?));
        }
        if let Some(fs) = &cfg.fs {
            virtio.push(Box::new(FsDevice::new(fs.clone()).map_err(BuildError::Fs)?));
        }
        if let Some(net) = &cfg.net {
            let tap = match &net.tap {
                TapSource::Name(name) => Tap::open(name),
                TapSource::Fd(fd) => crate::devices::virtio::net::tap::tap_from_raw_fd(*fd),
            }
            .map_err(|source| BuildError::NetTap {
                tap: net.tap.to_string(),
                source,
            })?;
            virtio.push(Box::new(
                NetDevice::new(tap, net.mac).map_err(BuildError::Net)?,
            ));
        }
        let mut mmio = Bus::new();
        let mut devices = Vec::new();
        let mut cmdline_devices = Vec::new();
        for (i, dev) in virtio.into_iter().enumerate() {
            let i = u32::try_from(i).map_err(|_| BuildError::TooManyDevices)?;
            if i >= MAX_VIRTIO_DEVICES {
                return Err(BuildError::TooManyDevices);
            }
            let base = VIRTIO_MMIO_START + u64::from(i) * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_IRQ_BASE + i;
            let irq = eventfd()?;
            vm.fd()
                .register_irqfd(&irq, gsi)
                .map_err(|source| BuildError::Irqfd { gsi, source })?;
            let nqueues = dev.queue_max_sizes().len();
            let backend_fd = dev.backend_fd();
            let transport = MmioTransport::new(dev, vm.memory().clone(), Box::new(irq))?;
            let mut queue_evts = Vec::new();
            for q in 0..nqueues {
                let evt = eventfd()?;
                let addr = base + QUEUE_NOTIFY;
                vm.fd()
                    .register_ioevent(&evt, &IoEventAddress::Mmio(addr), q as u32)
                    .map_err(|source| BuildError::Ioeventfd { addr, source })?;
                epoll
                    .ctl(
                        ControlOperation::Add,
                        evt.as_raw_fd(),
                        EpollEvent::new(
                            EventSet::IN,
                            TOKEN_QUEUE | (u64::from(i) << 16) | q as u64,
                        ),
                    )
                    .map_err(BuildError::Epoll)?;
                queue_evts.push(evt);
            }
            if let Some(fd) = backend_fd {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, TOKEN_BACKEND | u64::from(i)),
                    )
                    .map_err(BuildError::Epoll)?;
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
            cmdline_devices.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
            devices.push(VirtioSlot {
                transport,
                queue_evts,
            });
        }

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

        epoll
            .ctl(
                ControlOperation::Add,
                exit.eventfd().as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_EXIT),
            )
            .map_err(BuildError::Epoll)?;
        if let Some(sfd) = &signals {
            epoll
                .ctl(
                    ControlOperation::Add,
                    sfd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_SIGNAL),
                )
                .map_err(BuildError::Epoll)?;
        }
        let api = match &cfg.api_sock {
            Some(path) => {
                let l = crate::sock::bind_unix_listener(path).map_err(|source| {
                    BuildError::ApiSock {
                        path: path.clone(),
                        source,
                    }
                })?;
                l.set_nonblocking(true).map_err(|e| BuildError::ApiSock {
                    path: path.clone(),
                    source: crate::sock::BindError::from(e),
                })?;
                epoll
                    .ctl(
                        ControlOperation::Add,
                        l.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, TOKEN_API_LISTENER),
                    )
                    .map_err(BuildError::Epoll)?;
                Some((l, path.clone()))
            }
            None => None,
        };

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

    /// Runs the VM until it ends: vCPU threads plus this thread as the event loop. The
    /// seccomp filter, if enabled, stays on this thread afterwards.
    pub fn run(&mut self) -> Result<VmExit, RunError> {
        if self.ran {
            return Err(RunError::AlreadyRun);
        }
        self.ran = true;
        let (vcpu_filter, loop_filter) = if self.seccomp {
            (
                Some(Arc::new(seccomp::filter_for(ThreadKind::Vcpu)?)),
                Some(seccomp::filter_with(
                    ThreadKind::EventLoop,
                    if self.serves_fs {
                        seccomp::FS_SERVER
                    } else {
                        &[]
                    },
                )?),
            )
        } else {
            (None, None)
        };
        for vcpu in self.vcpus.drain(..) {
            let filter = vcpu_filter.clone();
            let handle = vcpu.spawn(self.control.clone(), move || match &filter {
                Some(f) => seccomp::apply(f).map_err(|e| e.to_string()),
                None => Ok(()),
            })?;
            self.handles.push(handle);
        }
        if let Some(f) = &loop_filter {
            seccomp::apply(f)?;
        }
        let res = self.event_loop();
        // Whatever ended the loop, the vCPUs go too.
        self.control.stop(&self.handles);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            for h in &self.handles {
                h.kick();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.cleanup();
        res
    }

    fn cleanup(&mut self) {
        let mut paths: Vec<PathBuf> = Vec::new();
        if let Some((_, p)) = self.api.take() {
            paths.push(p);
        }
        if let Some(p) = self.vsock_uds.take() {
            paths.push(p);
        }
        for p in paths {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %p.display(), error = %e, "cannot remove socket");
                }
            }
        }
    }

    fn event_loop(&mut self) -> Result<VmExit, RunError> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            if let Some(exit) = self.exit.reason() {
                return Ok(exit);
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RunError::Epoll(e)),
            };
            for ev in &events[..n] {
                self.dispatch(ev.data());
            }
        }
    }

    fn dispatch(&mut self, token: u64) {
        match token {
            TOKEN_EXIT => {
                let _ = self.exit.eventfd().read();
            }
            TOKEN_SIGNAL => {
                if let Some(sfd) = &mut self.signals {
                    if let Ok(Some(info)) = sfd.read_signal() {
                        info!(signal = info.ssi_signo, "stopping on signal");
                        self.exit
                            .notify(VmExit::Stopped(format!("signal {}", info.ssi_signo)));
                    }
                }
            }
            TOKEN_API_LISTENER => self.accept_api(),
            t if t & !0xffff_ffff == TOKEN_API_CONN => {
                self.api_readable((t & 0xffff_ffff) as RawFd)
            }
            t if t & !0xffff_ffff == TOKEN_QUEUE => {
                let dev = ((t >> 16) & 0xffff) as usize;
                let q = (t & 0xffff) as usize;
                let Some(slot) = self.devices.get(dev) else {
                    return;
                };
                if let Some(evt) = slot.queue_evts.get(q) {
                    let _ = evt.read();
                }
                if let Ok(mut t) = slot.transport.lock() {
                    t.notify_queue(q);
                }
            }
            t if t & !0xffff_ffff == TOKEN_BACKEND => {
                let dev = (t & 0xffff_ffff) as usize;
                if let Some(slot) = self.devices.get(dev) {
                    if let Ok(mut t) = slot.transport.lock() {
                        t.backend_event();
                    }
                }
            }
            other => husk_bounds::ratelimited!(debug, token = other, "unknown event"),
        }
    }

    fn accept_api(&mut self) {
        let Some((listener, _)) = &self.api else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let ev = EpollEvent::new(EventSet::IN, TOKEN_API_CONN | fd as u64);
                    if self.epoll.ctl(ControlOperation::Add, fd, ev).is_err() {
                        continue;
                    }
                    self.api_conns.insert(
                        fd,
                        ApiConn {
                            stream,
                            lines: LineBuffer::default(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE once the guest has used up --max-open-files (vsock connections,
                    // file server inodes): it repeats on every wake-up until fds come back.
                    husk_bounds::ratelimited!(warn, error = %e, "API accept failed");
                    return;
                }
            }
        }
    }

    fn close_api(&mut self, fd: RawFd) {
        if let Some(conn) = self.api_conns.remove(&fd) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn api_readable(&mut self, fd: RawFd) {
        let mut buf = [0u8; 1024];
        let mut lines = Vec::new();
        let mut close = false;
        {
            let Some(conn) = self.api_conns.get_mut(&fd) else {
                return;
            };
            match conn.stream.read(&mut buf) {
                Ok(0) => close = true,
                Ok(n) => match conn.lines.push(&buf[..n]) {
                    Ok(l) => lines = l,
                    Err(_) => {
                        let _ = conn
                            .stream
                            .write_all(&Response::error("request too long").to_line());
                        close = true;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => close = true,
            }
        }
        for line in lines {
            let resp = match api::parse_request(&line) {
                Ok(action) => self.api_action(action),
                Err(e) => Response::error(e),
            };
            if let Some(conn) = self.api_conns.get_mut(&fd) {
                // Responses are tiny; a client that does not read them loses its connection.
                if conn.stream.write_all(&resp.to_line()).is_err() {
                    close = true;
                }
            }
        }
        if close {
            self.close_api(fd);
        }
    }

    fn api_action(&mut self, action: Action) -> Response {
        match action {
            Action::State => Response::state(self.state()),
            Action::Pause => {
                if self.control.pause(&self.handles) {
                    info!("VM paused");
                    Response::state(VmState::Paused)
                } else {
                    Response::error("vCPUs did not pause in time")
                }
            }
            Action::Resume => {
                self.control.resume();
                info!("VM resumed");
                Response::state(VmState::Running)
            }
            Action::Shutdown => {
                self.exit.notify(VmExit::Stopped("API shutdown".into()));
                Response::state(VmState::Stopping)
            }
        }
    }

    fn state(&self) -> VmState {
        if self.exit.reason().is_some() {
            VmState::Stopping
        } else if self.control.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
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
    fn device_entries_go_before_init_args() {
        let d = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            cmdline_with_devices("console=ttyS0", &d),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            cmdline_with_devices("quiet -- --debug", &d),
            "quiet virtio_mmio.device=4K@0xd0000000:5 -- --debug"
        );
        assert_eq!(cmdline_with_devices("", &d), d[0]);
    }

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
