//! Transport tests: a fake driver programs the registers the way Linux's virtio_mmio driver
//! does, over real guest memory and split queues.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::test_utils::{Desc, Ring};
use crate::devices::virtio::vsock::{MuxerConfig, VsockDevice, VsockMuxer};

#[derive(Clone, Default)]
struct CountingIrq(Arc<AtomicUsize>);
impl IrqTrigger for CountingIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory")
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn transport(dev: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap) -> (MmioTransport, CountingIrq) {
    let irq = CountingIrq::default();
    let t = MmioTransport::new(dev, mem.clone(), Box::new(irq.clone())).expect("transport");
    (t, irq)
}

/// ACKNOWLEDGE, DRIVER, features (device's lower/upper words back), FEATURES_OK.
fn negotiate(t: &mut MmioTransport) {
    wr(t, STATUS, STATUS_ACKNOWLEDGE);
    wr(t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for sel in 0..2 {
        wr(t, DEVICE_FEATURES_SEL, sel);
        let f = rd(t, DEVICE_FEATURES);
        wr(t, DRIVER_FEATURES_SEL, sel);
        wr(t, DRIVER_FEATURES, f);
    }
    wr(
        t,
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_ne!(rd(t, STATUS) & STATUS_FEATURES_OK, 0);
}

/// Programs queue `index` from a test ring's addresses and marks it ready.
fn setup_queue(t: &mut MmioTransport, index: u32, q: &Queue) {
    wr(t, QUEUE_SEL, index);
    assert!(rd(t, QUEUE_NUM_MAX) >= u32::from(q.size()));
    wr(t, QUEUE_NUM, u32::from(q.size()));
    for (lo, hi, addr) in [
        (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, q.desc_table()),
        (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, q.avail_ring()),
        (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, q.used_ring()),
    ] {
        wr(t, lo, addr as u32);
        wr(t, hi, (addr >> 32) as u32);
    }
    wr(t, QUEUE_READY, 1);
    assert_eq!(rd(t, QUEUE_READY), 1);
}

const DRIVER_OK_ALL: u32 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

#[test]
fn identity_registers() {
    let mem = mem();
    let (mut t, _) = transport(Box::new(Rng::new().expect("rng")), &mem);
    assert_eq!(rd(&mut t, MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(rd(&mut t, VERSION), 2);
    assert_eq!(rd(&mut t, DEVICE_ID), 4);
    assert_eq!(rd(&mut t, VENDOR_ID), VENDOR);
    wr(&mut t, DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    wr(&mut t, QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, QUEUE_NUM_MAX), 256);
    wr(&mut t, QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, QUEUE_NUM_MAX), 0, "no such queue");
    assert_eq!(rd(&mut t, SHM_LEN_LOW), u32::MAX);
    // Narrow or unaligned register accesses read as zero and write nothing.
    let mut two = [0xffu8; 2];
    t.read(MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(STATUS, &[1]);
    assert_eq!(rd(&mut t, STATUS), 0);
}

#[test]
fn features_ok_requires_version_1_and_known_bits() {
    let mem = mem();
    let (mut t, _) = transport(Box::new(Rng::new().expect("rng")), &mem);
    wr(&mut t, STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Legacy driver: no VERSION_1.
    wr(
        &mut t,
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(rd(&mut t, STATUS) & STATUS_FEATURES_OK, 0);
    // A feature the device never offered.
    wr(&mut t, DRIVER_FEATURES_SEL, 1);
    wr(&mut t, DRIVER_FEATURES, 1 | 2);
    wr(
        &mut t,
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(rd(&mut t, STATUS) & STATUS_FEATURES_OK, 0);
    wr(&mut t, DRIVER_FEATURES, 1);
    wr(
        &mut t,
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_ne!(rd(&mut t, STATUS) & STATUS_FEATURES_OK, 0);
    // After FEATURES_OK the features are frozen.
    wr(&mut t, DRIVER_FEATURES, 3);
    assert_eq!(t.acked_features, 1 << 32);
    // Clearing bits without a reset is ignored.
    wr(&mut t, STATUS, STATUS_ACKNOWLEDGE);
    assert_ne!(rd(&mut t, STATUS) & STATUS_FEATURES_OK, 0);
}

#[test]
fn rng_queue_round_trip_with_interrupt_and_reset() {
    let mem = mem();
    let (mut t, irq) = transport(Box::new(Rng::new().expect("rng")), &mem);
    let (mut ring, q) = Ring::new(0x10_0000, 16);
    // Queue registers before FEATURES_OK are ignored.
    wr(&mut t, QUEUE_SEL, 0);
    wr(&mut t, QUEUE_READY, 1);
    assert_eq!(rd(&mut t, QUEUE_READY), 0);
    negotiate(&mut t);
    setup_queue(&mut t, 0, &q);
    wr(&mut t, STATUS, DRIVER_OK_ALL);
    assert!(t.is_active());

    let buf = 0x20_0000;
    let head = ring.add_chain(
        &mem,
        &[
            Desc {
                addr: buf,
                len: 16,
                write: true,
            },
            Desc {
                addr: buf + 16,
                len: 16,
                write: true,
            },
        ],
    );
    wr(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(ring.pop_used(&mem), Some((head, 32)));
    let mut got = [0u8; 32];
    mem.read_slice(&mut got, GuestAddress(buf)).expect("read");
    assert_ne!(got, [0u8; 32], "random bytes arrived");
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    assert_eq!(rd(&mut t, INTERRUPT_STATUS), INT_VRING);
    wr(&mut t, INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut t, INTERRUPT_STATUS), 0);

    // Queue registers are frozen while the device runs.
    wr(&mut t, QUEUE_NUM, 8);
    assert_eq!(t.queues[0].size(), 16);

    wr(&mut t, STATUS, 0);
    assert_eq!(rd(&mut t, STATUS), 0);
    assert_eq!(rd(&mut t, QUEUE_READY), 0);
    assert!(!t.is_active());
    // Notifications to a reset device do nothing.
    ring.add_chain(
        &mem,
        &[Desc {
            addr: buf,
            len: 8,
            write: true,
        }],
    );
    wr(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(ring.pop_used(&mem), None);
}

#[test]
fn driver_ok_with_invalid_queue_stops_the_device() {
    let mem = mem();
    let (mut t, irq) = transport(Box::new(Rng::new().expect("rng")), &mem);
    negotiate(&mut t);
    wr(&mut t, QUEUE_SEL, 0);
    wr(&mut t, QUEUE_NUM, 16);
    // Descriptor table beyond guest memory.
    wr(&mut t, QUEUE_DESC_LOW, 0x4000_0000);
    wr(&mut t, QUEUE_READY, 1);
    wr(&mut t, STATUS, DRIVER_OK_ALL);
    assert_ne!(rd(&mut t, STATUS) & STATUS_NEEDS_RESET, 0);
    assert_eq!(rd(&mut t, INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    assert!(!t.is_active());
    // The driver resets and tries again properly.
    wr(&mut t, STATUS, 0);
    let (_ring, q) = Ring::new(0x10_0000, 16);
    negotiate(&mut t);
    setup_queue(&mut t, 0, &q);
    wr(&mut t, STATUS, DRIVER_OK_ALL);
    assert!(t.is_active());
}

/// A device whose queue processing always fails, like one fed a corrupt ring.
struct Broken;
impl VirtioDevice for Broken {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(7);
    }
    fn process_queue(
        &mut self,
        _mem: &GuestMemoryMmap,
        _queues: &mut [Queue],
        _index: usize,
    ) -> Result<QueueMask, DeviceError> {
        Err(DeviceError::Other("corrupt ring".into()))
    }
    fn reset(&mut self) {}
}

#[test]
fn device_error_needs_reset_not_a_panic() {
    let mem = mem();
    let (mut t, _) = transport(Box::new(Broken), &mem);
    let (_ring, q) = Ring::new(0x10_0000, 8);
    negotiate(&mut t);
    setup_queue(&mut t, 0, &q);
    wr(&mut t, STATUS, DRIVER_OK_ALL);
    t.notify_queue(0);
    assert_ne!(rd(&mut t, STATUS) & STATUS_NEEDS_RESET, 0);
    assert!(!t.is_active());
    // Out-of-range queue indices from the guest are harmless too.
    t.notify_queue(usize::MAX);
    let mut cfg = [0u8; 3];
    t.read(CONFIG_SPACE + 1, &mut cfg);
    assert_eq!(cfg, [7, 7, 7]);
}

#[test]
fn vsock_over_mmio_answers_request_with_rst() {
    let dir = tempfile::tempdir().expect("tempdir");
    let muxer = VsockMuxer::bind(MuxerConfig::new(3, dir.path().join("v.sock"))).expect("muxer");
    let mem = mem();
    let (mut t, irq) = transport(Box::new(VsockDevice::new(3, muxer)), &mem);
    assert_eq!(rd(&mut t, DEVICE_ID), 19);
    let mut cid = [0u8; 8];
    t.read(CONFIG_SPACE, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 3);

    let (mut rx, rxq) = Ring::new(0x10_0000, 64);
    let (mut tx, txq) = Ring::new(0x18_0000, 64);
    negotiate(&mut t);
    setup_queue(&mut t, 0, &rxq);
    setup_queue(&mut t, 1, &txq);
    wr(&mut t, STATUS, DRIVER_OK_ALL);
    assert!(t.is_active());

    // RX buffer, then a REQUEST to host port 9999, where nobody listens.
    let rx_buf = 0x30_0000;
    let rx_head = rx.add_chain(
        &mem,
        &[Desc {
            addr: rx_buf,
            len: 4096,
            write: true,
        }],
    );
    let hdr_at = 0x40_0000;
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&3u64.to_le_bytes()); // src_cid
    hdr.extend_from_slice(&2u64.to_le_bytes()); // dst_cid
    hdr.extend_from_slice(&5000u32.to_le_bytes()); // src_port
    hdr.extend_from_slice(&9999u32.to_le_bytes()); // dst_port
    hdr.extend_from_slice(&0u32.to_le_bytes()); // len
    hdr.extend_from_slice(&1u16.to_le_bytes()); // type: stream
    hdr.extend_from_slice(&1u16.to_le_bytes()); // op: request
    hdr.extend_from_slice(&0u32.to_le_bytes()); // flags
    hdr.extend_from_slice(&65536u32.to_le_bytes()); // buf_alloc
    hdr.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    mem.write_slice(&hdr, GuestAddress(hdr_at)).expect("write");
    let tx_head = tx.add_chain(
        &mem,
        &[Desc {
            addr: hdr_at,
            len: 44,
            write: false,
        }],
    );
    t.notify_queue(1);
    assert_eq!(tx.pop_used(&mem), Some((tx_head, 0)));
    let (head, len) = rx.pop_used(&mem).expect("reply on RX");
    assert_eq!(head, rx_head);
    assert_eq!(len, 44);
    let op: u16 = mem.read_obj(GuestAddress(rx_buf + 30)).expect("read");
    assert_eq!(op, 3, "RST");
    assert!(irq.0.load(Ordering::SeqCst) >= 1);
    assert_ne!(rd(&mut t, INTERRUPT_STATUS) & INT_VRING, 0);
}
