//! The VM's devices and where the guest finds them.
//!
//! Kept out of `Vmm::build` so that the guest's view of its hardware (which device sits on
//! which port or virtio-mmio window, on which IRQ, announced by which `virtio_mmio.device=`
//! entry) is assigned in one place, and `build` reads as the order of its steps.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::config::{TapSource, VmConfig};
use super::error::BuildError;
use super::event_loop::{TOKEN_BACKEND, TOKEN_QUEUE};
use crate::arch::x86_64::{
    I8042_COMMAND_PORT, I8042_DATA_PORT, SERIAL_IRQ, SERIAL_PORT, VIRTIO_IRQ_BASE,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::devices::bus::Bus;
use crate::devices::legacy::{Serial, I8042};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::fs::FsDevice;
use crate::devices::virtio::net::{NetDevice, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::transport::mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::devices::virtio::vsock::{MuxerConfig, VsockDevice, VsockMuxer};
use crate::vstate::{ExitNotifier, Vm};

/// Most virtio-mmio devices: IRQs 5..=23.
const MAX_VIRTIO_DEVICES: u32 = 19;

pub(super) struct VirtioSlot {
    pub(super) transport: Arc<Mutex<MmioTransport>>,
    pub(super) queue_evts: Vec<EventFd>,
}

/// The virtio devices once they are on the MMIO bus.
pub(super) struct MmioDevices {
    pub(super) bus: Bus,
    pub(super) slots: Vec<VirtioSlot>,
    /// The `virtio_mmio.device=` entries for the kernel command line.
    pub(super) cmdline: Vec<String>,
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(BuildError::EventFd)
}

/// Legacy devices on the port bus.
pub(super) fn legacy_devices(
    vm: &Vm,
    exit: &ExitNotifier,
    console: Box<dyn Write + Send>,
) -> Result<Bus, BuildError> {
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
    Ok(pio)
}

/// Creates the configured virtio devices, vsock first so its address is stable.
pub(super) fn virtio_devices(cfg: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, BuildError> {
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(v) = &cfg.vsock {
        let muxer = VsockMuxer::bind(MuxerConfig::new(v.guest_cid, &v.uds)).map_err(|source| {
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
    Ok(virtio)
}

/// Puts each virtio device on its own virtio-mmio window: ioeventfd per queue, irqfd per
/// device, and the queue and backend fds on the event loop's epoll.
pub(super) fn attach_virtio(
    vm: &Vm,
    epoll: &Epoll,
    virtio: Vec<Box<dyn VirtioDevice>>,
) -> Result<MmioDevices, BuildError> {
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
                    EpollEvent::new(EventSet::IN, TOKEN_QUEUE | (u64::from(i) << 16) | q as u64),
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
    Ok(MmioDevices {
        bus: mmio,
        slots: devices,
        cmdline: cmdline_devices,
    })
}

/// Puts the `virtio_mmio.device=` entries before any `--` (init's arguments).
pub(super) fn cmdline_with_devices(cmdline: &str, devices: &[String]) -> String {
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
}
