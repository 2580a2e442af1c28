//! Sequences of virtio-mmio register reads and writes (offset, width, value) against
//! `MmioTransport` in front of a simple device: virtio-rng (reading /dev/zero) or virtio-net
//! over an in-memory backend. Besides raw accesses the input can ask for driver-like steps
//! (negotiate, program a queue, DRIVER_OK, post a buffer, notify) so that the fuzzer reaches
//! queue processing quickly and then perturbs it.
//!
//! Checked beyond "no panic": constant registers read back constant, a status write of 0
//! resets status and interrupt status, interrupt status only ever holds VRING|CONFIG, and every
//! used length fits the chain it was posted with.
#![no_main]
// Test code: an unwrap on the harness's own set-up (temporary files, guest memory) is an
// assertion; a panic anywhere is the finding libFuzzer reports.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use husk_fuzz::*;
use husk_vmm::devices::bus::BusDevice;
use husk_vmm::devices::virtio::net::{NetBackend, NetDevice};
use husk_vmm::devices::virtio::rng::Rng;
use husk_vmm::devices::virtio::transport::mmio::*;
use husk_vmm::devices::virtio::transport::IrqTrigger;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

const RING_BASE: [u64; 2] = [0x1000, 0x8000];
const RING_SIZE: u16 = 16;

const REGS: [u64; 31] = [
    MAGIC_VALUE,
    VERSION,
    DEVICE_ID,
    VENDOR_ID,
    DEVICE_FEATURES,
    DEVICE_FEATURES_SEL,
    DRIVER_FEATURES,
    DRIVER_FEATURES_SEL,
    QUEUE_SEL,
    QUEUE_NUM_MAX,
    QUEUE_NUM,
    QUEUE_READY,
    QUEUE_NOTIFY,
    INTERRUPT_STATUS,
    INTERRUPT_ACK,
    STATUS,
    QUEUE_DESC_LOW,
    QUEUE_DESC_HIGH,
    QUEUE_DRIVER_LOW,
    QUEUE_DRIVER_HIGH,
    QUEUE_DEVICE_LOW,
    QUEUE_DEVICE_HIGH,
    SHM_SEL,
    SHM_LEN_LOW,
    SHM_LEN_HIGH,
    SHM_BASE_LOW,
    SHM_BASE_HIGH,
    CONFIG_GENERATION,
    CONFIG_SPACE,
    CONFIG_SPACE + 6,
    0x0fe,
];

#[derive(Clone, Default)]
struct CountingIrq(Arc<AtomicUsize>);
impl IrqTrigger for CountingIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A tap that drops what the guest sends and has a frame ready now and then.
struct NullTap {
    fd: EventFd,
    frames: VecDeque<Vec<u8>>,
}
impl AsRawFd for NullTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
impl NetBackend for NullTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.frames.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn set_vnet_hdr_len(&mut self, _len: usize) -> io::Result<()> {
        Ok(())
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

struct Fuzz {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    alloc: Alloc,
    rings: [Ring; 2],
    /// Posted chains: (queue, head) -> writable capacity.
    posted: HashMap<(usize, u16), u64>,
}

impl Fuzz {
    fn rd(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
        if off == STATUS && v == 0 {
            assert_eq!(self.rd(STATUS), 0, "status after reset");
            assert_eq!(self.rd(INTERRUPT_STATUS), 0, "interrupt status after reset");
            // The driver starts over with clean rings.
            for q in 0..2 {
                let zero = vec![0u8; ring_bytes(RING_SIZE) as usize];
                let _ = vm_memory::Bytes::write_slice(
                    &self.mem,
                    &zero,
                    vm_memory::GuestAddress(RING_BASE[q]),
                );
                self.rings[q] = Ring::layout(RING_BASE[q], RING_SIZE);
            }
            self.posted.clear();
        }
    }

    fn offset(inp: &mut Input<'_>) -> u64 {
        let sel = inp.u8();
        if sel < 224 {
            REGS[usize::from(sel) % REGS.len()]
        } else {
            u64::from(inp.u16() & 0x1ff)
        }
    }

    fn width(inp: &mut Input<'_>) -> usize {
        match inp.u8() {
            0..=199 => 4,
            200..=214 => 1,
            215..=229 => 2,
            230..=244 => 8,
            b => usize::from(b % 17),
        }
    }

    fn negotiate(&mut self, inp: &mut Input<'_>) {
        self.wr(STATUS, 1);
        self.wr(STATUS, 3);
        let mask = if inp.bool() { u64::MAX } else { inp.u64() };
        for sel in 0..2u32 {
            self.wr(DEVICE_FEATURES_SEL, sel);
            let f = self.rd(DEVICE_FEATURES);
            self.wr(DRIVER_FEATURES_SEL, sel);
            self.wr(DRIVER_FEATURES, f & (mask >> (32 * sel)) as u32);
        }
        self.wr(STATUS, 3 | 8);
    }

    fn setup_queue(&mut self, q: usize) {
        let r = &self.rings[q];
        let (desc, avail, used) = (r.desc, r.avail, r.used);
        self.wr(QUEUE_SEL, q as u32);
        self.wr(QUEUE_NUM, u32::from(RING_SIZE));
        for (lo, hi, addr) in [
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, desc),
            (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail),
            (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used),
        ] {
            self.wr(lo, addr as u32);
            self.wr(hi, (addr >> 32) as u32);
        }
        self.wr(QUEUE_READY, 1);
    }

    fn post(&mut self, inp: &mut Input<'_>) {
        let q = usize::from(inp.u8() & 1);
        let n = 1 + usize::from(inp.u8() % 3);
        let write = inp.u8();
        let mut descs = Vec::new();
        for i in 0..n {
            let len = match inp.u8() % 4 {
                0 => 64,
                1 => 1526,
                2 => 70000,
                _ => u32::from(inp.u16()),
            };
            let mut content = inp.blob(64).to_vec();
            content.resize(len as usize, 0);
            let addr = self.alloc.put(&self.mem, &content);
            descs.push(Desc {
                addr,
                len,
                write: write & (1 << i) == 0,
            });
        }
        if write & 0x80 != 0 {
            let i = usize::from(inp.u8()) % descs.len();
            descs[i].addr = fuzz_addr(inp);
        }
        let cap = descs
            .iter()
            .filter(|d| d.write)
            .map(|d| u64::from(d.len))
            .sum();
        if let Some(head) = self.rings[q].add_chain(&self.mem, &descs) {
            self.posted.insert((q, head), cap);
        }
    }

    fn check_used(&mut self) {
        for q in 0..2 {
            let mut used = Vec::new();
            self.rings[q].drain_used(&self.mem, |id, len| used.push((id, len)));
            for (id, len) in used {
                if let Some(cap) = self.posted.remove(&(q, id as u16)) {
                    assert!(
                        u64::from(len) <= cap,
                        "queue {q}: used length {len} beyond {cap}"
                    );
                }
            }
        }
        let is = self.t.interrupt_status();
        assert_eq!(
            is & !(INT_VRING | INT_CONFIG),
            0,
            "interrupt status {is:#x}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    ignore_sigpipe();
    let mut inp = Input::new(data);
    let cfg = inp.u8();
    let mem = guest_memory();
    let device: Box<dyn husk_vmm::devices::virtio::device::VirtioDevice> = if cfg & 1 == 0 {
        let Ok(zero) = File::open("/dev/zero") else {
            return;
        };
        Box::new(Rng::with_source(zero))
    } else {
        let tap = NullTap {
            fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            frames: VecDeque::new(),
        };
        let Ok(dev) = NetDevice::new(tap, Some([2, 0, 0, 0, 0, 1])) else {
            return;
        };
        Box::new(dev)
    };
    let irq = CountingIrq::default();
    let Ok(t) = MmioTransport::new(device, mem.clone(), Box::new(irq)) else {
        return;
    };
    let mut f = Fuzz {
        t,
        mem,
        alloc: Alloc::default(),
        rings: [
            Ring::layout(RING_BASE[0], RING_SIZE),
            Ring::layout(RING_BASE[1], RING_SIZE),
        ],
        posted: HashMap::new(),
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < 512 {
        ops += 1;
        match inp.u8() % 12 {
            0 | 1 => {
                let off = Fuzz::offset(&mut inp);
                let w = Fuzz::width(&mut inp);
                let v = inp.u64().to_le_bytes();
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&v);
                if w == 4 {
                    f.wr(off, u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                } else {
                    f.t.write(off, &b[..w]);
                }
            }
            2 | 3 => {
                let off = Fuzz::offset(&mut inp);
                let w = Fuzz::width(&mut inp);
                let mut b = [0u8; 16];
                f.t.read(off, &mut b[..w]);
                if w == 4 {
                    let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    match off {
                        MAGIC_VALUE => assert_eq!(v, MMIO_MAGIC),
                        VERSION => assert_eq!(v, MMIO_VERSION),
                        VENDOR_ID => assert_eq!(v, VENDOR),
                        _ => {}
                    }
                } else if off < CONFIG_SPACE {
                    assert_eq!(b, [0u8; 16], "bad-width register read returned data");
                }
            }
            4 => f.negotiate(&mut inp),
            5 => {
                let q = usize::from(inp.u8() & 1);
                f.setup_queue(q);
            }
            6 => {
                let s = f.rd(STATUS);
                f.wr(STATUS, s | 4);
            }
            7 => f.post(&mut inp),
            8 => {
                let v = match inp.u8() % 4 {
                    0 => 0,
                    1 => 1,
                    _ => inp.u32(),
                };
                f.wr(QUEUE_NOTIFY, v);
                f.check_used();
            }
            9 => {
                f.t.notify_queue(usize::from(inp.u8() % 3));
                f.check_used();
            }
            10 => {
                f.t.backend_event();
                f.check_used();
            }
            _ => {
                let q = usize::from(inp.u8() & 1);
                let ring = &mut f.rings[q];
                match inp.u8() % 4 {
                    0 => ring.raw_avail_idx(&f.mem, inp.u16()),
                    1 => ring.raw_avail_flags(&f.mem, inp.u16(), inp.u16()),
                    2 => ring.raw_desc(&f.mem, &mut inp),
                    _ => {
                        let head = inp.u16();
                        ring.raw_publish(&f.mem, head);
                    }
                }
                // Raw ring writes can make the device re-serve old chains: forget them.
                f.posted.clear();
            }
        }
    }
    f.t.notify_queue(0);
    f.t.notify_queue(1);
    f.check_used();
});
