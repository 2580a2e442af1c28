//! The virtio-mmio transport (virtio 1.2, section 4.2.2: the "modern", version 2 register
//! layout), husk-vmm's own, in front of any [`VirtioDevice`].
//!
//! A vCPU thread reads and writes the registers through the MMIO bus. Queue notifications do
//! not come here as register writes: the builder binds an ioeventfd to `QueueNotify` for each
//! queue, and the event loop calls [`MmioTransport::notify_queue`]. Interrupts go out through
//! an irqfd ([`IrqTrigger`]).
//!
//! Everything the driver writes is checked against the spec's rules. A driver that breaks
//! them, or a device error while processing its queues, sets DEVICE_NEEDS_RESET and stops
//! the device until the driver resets it; the VMM itself never fails because of a guest.

use std::io;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::virtio::device::{DeviceError, QueueMask, VirtioDevice};

// Register offsets (virtio 1.2, table 4.1).
pub const MAGIC_VALUE: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const VENDOR_ID: u64 = 0x00c;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const SHM_SEL: u64 = 0x0ac;
pub const SHM_LEN_LOW: u64 = 0x0b0;
pub const SHM_LEN_HIGH: u64 = 0x0b4;
pub const SHM_BASE_LOW: u64 = 0x0b8;
pub const SHM_BASE_HIGH: u64 = 0x0bc;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG_SPACE: u64 = 0x100;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// The vendor id QEMU and others use for virtio-mmio ("QEMU" is 0x554d4551); we pick our own.
pub const VENDOR: u32 = 0x4b53_5548; // "HUSK"

/// Interrupt status bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

const STATUS_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const STATUS_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// An interrupt line towards the guest.
pub trait IrqTrigger: Send {
    fn trigger(&self) -> io::Result<()>;
}

impl IrqTrigger for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Box<dyn IrqTrigger>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Set after a device error: the device is stopped until the driver resets it.
    broken: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Box<dyn IrqTrigger>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            irq,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            broken: false,
        })
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && !self.broken
    }

    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Offered features: the device's plus VERSION_1, which this transport requires.
    fn offered_features(&self) -> u64 {
        self.device.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.irq.trigger() {
            husk_bounds::ratelimited!(warn, error = %e, "virtio-mmio: cannot interrupt the guest");
        }
    }

    /// Stops the device after an error the guest caused, and tells the driver.
    fn fail(&mut self, what: &str, err: &dyn std::fmt::Display) {
        husk_bounds::ratelimited!(warn, device = self.device.device_type(),
            error = %err,
            "virtio-mmio: {what}; device stopped until the driver resets it"
        );
        self.broken = true;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.status |= STATUS_NEEDS_RESET;
            self.raise(INT_CONFIG);
        }
    }

    fn handle_result(&mut self, what: &str, res: Result<QueueMask, DeviceError>) {
        match res {
            Ok(0) => {}
            Ok(_) => self.raise(INT_VRING),
            Err(e) => self.fail(what, &e),
        }
    }

    /// The driver notified queue `index` (through its ioeventfd).
    pub fn notify_queue(&mut self, index: usize) {
        if !self.is_active() {
            return;
        }
        let res = self
            .device
            .process_queue(&self.mem, &mut self.queues, index);
        self.handle_result("queue processing failed", res);
    }

    /// The device's backend fd became readable.
    pub fn backend_event(&mut self) {
        if !self.is_active() {
            // Still let the backend drain its fd, or a level-triggered poll spins.
            let mut idle: Vec<Queue> = Vec::new();
            let _ = self.device.process_backend(&self.mem, &mut idle);
            return;
        }
        let res = self.device.process_backend(&self.mem, &mut self.queues);
        self.handle_result("backend processing failed", res);
    }

    fn reset(&mut self) {
        husk_bounds::ratelimited!(
            debug,
            device = self.device.device_type(),
            "virtio-mmio reset"
        );
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.broken = false;
    }

    fn features_ok(&self) -> bool {
        let unknown = self.acked_features & !self.offered_features();
        unknown == 0 && self.acked_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.acked_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() {
                if !q.is_valid(&self.mem) {
                    return Err(format!("queue {i} is not valid in guest memory"));
                }
                q.set_event_idx(event_idx);
            }
        }
        self.device
            .activate(&self.mem, self.acked_features)
            .map_err(|e| e.to_string())
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added, one stage at a time, until the driver resets.
        if value & self.status != self.status {
            husk_bounds::ratelimited!(
                warn,
                old = self.status,
                new = value,
                "virtio-mmio: driver cleared status bits without a reset; ignored"
            );
            return;
        }
        let added = value & !self.status;
        let mut value = value;
        if added & STATUS_FAILED != 0 {
            husk_bounds::ratelimited!(
                info,
                device = self.device.device_type(),
                "virtio driver gave up on the device"
            );
        }
        if added & STATUS_FEATURES_OK != 0 {
            let staged = self.status & (STATUS_ACKNOWLEDGE | STATUS_DRIVER)
                == (STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            if !staged || !self.features_ok() {
                husk_bounds::ratelimited!(
                    warn,
                    acked = self.acked_features,
                    offered = self.offered_features(),
                    "virtio-mmio: refusing FEATURES_OK"
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 {
            if value & STATUS_FEATURES_OK == 0 {
                husk_bounds::ratelimited!(
                    warn,
                    "virtio-mmio: DRIVER_OK without FEATURES_OK; ignored"
                );
                return;
            }
            self.status = value;
            if let Err(e) = self.activate() {
                self.fail("activation failed", &e);
            }
            return;
        }
        self.status = value;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            // No shared memory regions: length reads as "none" (all ones).
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX,
            SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                husk_bounds::ratelimited!(
                    debug,
                    offset,
                    "virtio-mmio: read of write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let driver_ok = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => {
                // Features are fixed once FEATURES_OK is set.
                if self.status & STATUS_FEATURES_OK != 0 || self.status & STATUS_DRIVER == 0 {
                    husk_bounds::ratelimited!(
                        warn,
                        "virtio-mmio: driver features written out of order; ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                self.write_queue_reg(offset, value, driver_ok)
            }
            // Notifications are normally caught by the ioeventfd; a write that reaches us
            // (no ioeventfd, e.g. in tests) is handled the same way.
            QUEUE_NOTIFY => self.notify_queue(value as usize),
            INTERRUPT_ACK => self.interrupt_status &= !value,
            STATUS => self.set_status(value),
            SHM_SEL => {}
            _ => husk_bounds::ratelimited!(
                debug,
                offset,
                value,
                "virtio-mmio: write to read-only or unknown register"
            ),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32, driver_ok: bool) {
        let features_ok = self.status & STATUS_FEATURES_OK != 0;
        let Some(q) = self.selected_queue() else {
            husk_bounds::ratelimited!(
                warn,
                offset,
                "virtio-mmio: queue register write with no queue selected"
            );
            return;
        };
        // Queues are configured after FEATURES_OK and before DRIVER_OK, and only while not
        // ready (except for turning them off).
        if !features_ok || driver_ok || (q.ready() && offset != QUEUE_READY) {
            husk_bounds::ratelimited!(
                warn,
                offset,
                "virtio-mmio: queue register written out of order; ignored"
            );
            return;
        }
        match offset {
            QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => q.set_size(size),
                Err(_) => husk_bounds::ratelimited!(
                    warn,
                    value,
                    "virtio-mmio: queue size out of range; ignored"
                ),
            },
            QUEUE_READY => q.set_ready(value == 1),
            QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset.is_multiple_of(4) => *word = self.read_reg(offset).to_le_bytes(),
            _ => {
                // The spec allows only aligned 32-bit register accesses.
                husk_bounds::ratelimited!(
                    warn,
                    offset,
                    len = data.len(),
                    "virtio-mmio: bad register read width"
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_FEATURES_OK == 0 && self.status & STATUS_DRIVER == 0 {
                husk_bounds::ratelimited!(
                    debug,
                    "virtio-mmio: config write before the driver is set up"
                );
            }
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(word))
            }
            _ => husk_bounds::ratelimited!(
                warn,
                offset,
                len = data.len(),
                "virtio-mmio: bad register write width"
            ),
        }
    }
}

#[cfg(test)]
mod tests;
