//! A fake guest driver for the vsock device tests: guest memory with RX and TX split queues
//! that the test fills and reads the way a virtio driver would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::defs::*;
use super::packet::PktHeader;
use super::unix::MuxerConfig;
use super::{VsockDevice, VsockMuxer};

pub const GUEST_CID: u64 = 3;
pub const GUEST_BUF_ALLOC: u32 = 64 * 1024;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const BUF_START: u64 = 0x10_0000;
pub const RX_DATA_SIZE: u32 = 4096;

/// One descriptor as the test wants it: where, how long, device-writable or not.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Driver-side view of one split queue.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(base: u64) -> (Self, Queue) {
        // Laid out by hand: virtio-queue 0.17's MockSplitQueue sizes the avail ring in
        // elements rather than bytes, so its used ring overlaps avail entries 128 and up.
        let desc = base;
        let avail = desc + 16 * u64::from(QSIZE);
        let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        let ring = Ring {
            desc,
            avail,
            used,
            free: (0..QSIZE).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            used_seen: 0,
        };
        (ring, queue)
    }

    fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let idx: Vec<u16> = descs
            .iter()
            .map(|_| self.free.pop().expect("test ring full"))
            .collect();
        for (i, d) in descs.iter().enumerate() {
            let mut flags = 0u16;
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                idx[i + 1]
            } else {
                0
            };
            let at = self.desc + 16 * u64::from(idx[i]);
            mem.write_obj(d.addr, GuestAddress(at)).unwrap();
            mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let head = idx[0];
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        self.chains.insert(head, idx);
        head
    }

    /// Next used element: (head, len).
    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let used_idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if used_idx == self.used_seen {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        let head = id as u16;
        if let Some(idx) = self.chains.remove(&head) {
            self.free.extend(idx);
        }
        Some((head, len))
    }

    fn outstanding(&self) -> usize {
        self.chains.len()
    }
}

/// The guest: memory, its two queues, and a bump allocator for buffers.
pub struct TestGuest {
    pub mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    pub rxq: Queue,
    pub txq: Queue,
    next_buf: u64,
    rx_bufs: HashMap<u16, (u64, u64)>,
    /// Interrupts the device asked for, per queue.
    pub rx_irqs: usize,
    pub tx_irqs: usize,
}

impl TestGuest {
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, rxq) = Ring::new(RX_RING);
        let (tx, txq) = Ring::new(TX_RING);
        TestGuest {
            mem,
            rx,
            tx,
            rxq,
            txq,
            next_buf: BUF_START,
            rx_bufs: HashMap::new(),
            rx_irqs: 0,
            tx_irqs: 0,
        }
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buf;
        self.next_buf += (len + 0xfff) & !0xfff;
        // Recycle the buffer area; tests never keep this many buffers outstanding.
        if self.next_buf > MEM_SIZE as u64 - 0x10_0000 {
            self.next_buf = BUF_START;
        }
        addr
    }

    /// Posts `n` RX buffers the way Linux 6.1 does: a header descriptor and a data descriptor.
    pub fn provide_rx(&mut self, n: usize) {
        for _ in 0..n {
            let hdr = self.alloc(VSOCK_PKT_HDR_SIZE as u64);
            let data = self.alloc(u64::from(RX_DATA_SIZE));
            let head = self.rx.add_chain(
                &self.mem,
                &[
                    Desc {
                        addr: hdr,
                        len: VSOCK_PKT_HDR_SIZE as u32,
                        write: true,
                    },
                    Desc {
                        addr: data,
                        len: RX_DATA_SIZE,
                        write: true,
                    },
                ],
            );
            self.rx_bufs.insert(head, (hdr, data));
        }
    }

    pub fn rx_outstanding(&self) -> usize {
        self.rx.outstanding()
    }

    /// Posts an arbitrary RX chain (for malformed-buffer tests).
    pub fn provide_rx_raw(&mut self, descs: &[Desc]) {
        self.rx.add_chain(&self.mem, descs);
    }

    /// Queues a packet on TX with header and payload in separate descriptors.
    pub fn send(&mut self, hdr: PktHeader, data: &[u8]) {
        let h = self.alloc(VSOCK_PKT_HDR_SIZE as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        let mut descs = vec![Desc {
            addr: h,
            len: VSOCK_PKT_HDR_SIZE as u32,
            write: false,
        }];
        if !data.is_empty() {
            let d = self.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            descs.push(Desc {
                addr: d,
                len: data.len() as u32,
                write: false,
            });
        }
        self.tx.add_chain(&self.mem, &descs);
    }

    /// Queues an arbitrary TX chain; `contents` are written to the matching descriptors.
    pub fn send_raw(&mut self, descs: &[(Vec<u8>, bool)]) {
        let descs: Vec<Desc> = descs
            .iter()
            .map(|(bytes, write)| {
                let addr = self.alloc(bytes.len().max(1) as u64);
                self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
                Desc {
                    addr,
                    len: bytes.len() as u32,
                    write: *write,
                }
            })
            .collect();
        self.tx.add_chain(&self.mem, &descs);
    }

    /// Queues a TX chain of explicit descriptors (addresses chosen by the test).
    pub fn send_descs(&mut self, descs: &[Desc]) {
        self.tx.add_chain(&self.mem, descs);
    }

    /// Runs the device once the way a front end would on any event.
    pub fn run(&mut self, dev: &mut VsockDevice<VsockMuxer>) {
        dev.notify_backend();
        if dev.process_tx(&self.mem, &mut self.txq).unwrap() {
            self.tx_irqs += 1;
        }
        if dev.process_rx(&self.mem, &mut self.rxq).unwrap() {
            self.rx_irqs += 1;
        }
        while self.tx.pop_used(&self.mem).is_some() {}
    }

    /// Packets the device delivered on RX since the last call.
    pub fn recv(&mut self) -> Vec<(PktHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rx.pop_used(&self.mem) {
            let Some((h, d)) = self.rx_bufs.remove(&head) else {
                continue;
            };
            if len == 0 {
                continue;
            }
            let mut raw = [0u8; VSOCK_PKT_HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
            let hdr = PktHeader::from_bytes(&raw);
            assert_eq!(
                len,
                VSOCK_PKT_HDR_SIZE as u32 + hdr.len,
                "used len of head {head}: {hdr:?}"
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
            out.push((hdr, data));
        }
        out
    }

    /// Runs the device until it has nothing more to say, collecting RX packets.
    pub fn pump(&mut self, dev: &mut VsockDevice<VsockMuxer>) -> Vec<(PktHeader, Vec<u8>)> {
        let mut all = Vec::new();
        for _ in 0..50 {
            if self.rx_outstanding() < 64 {
                self.provide_rx(64);
            }
            self.run(dev);
            let got = self.recv();
            if got.is_empty() && !dev.has_pending_rx() && !backend_ready(dev) {
                break;
            }
            all.extend(got);
        }
        all
    }
}

/// Whether the backend's fd would wake a front end's event loop right now.
pub fn backend_ready(dev: &VsockDevice<VsockMuxer>) -> bool {
    let mut fds = [libc::pollfd {
        fd: dev.backend_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd and a zero timeout.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) > 0 }
}

/// A header from the guest (CID 3) to the host.
pub fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> PktHeader {
    PktHeader {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: VIRTIO_VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// A device over a muxer bound in a fresh temp dir.
pub struct TestCtx {
    pub dev: VsockDevice<VsockMuxer>,
    pub guest: TestGuest,
    pub uds: PathBuf,
    /// Keeps the socket directory alive as long as the test.
    _dir: tempfile::TempDir,
}

impl TestCtx {
    pub fn new() -> Self {
        Self::with_config(|_| {})
    }

    pub fn with_config(f: impl FnOnce(&mut MuxerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mut cfg = MuxerConfig::new(GUEST_CID, &uds);
        cfg.handshake_timeout = Duration::from_millis(200);
        cfg.connect_timeout = Duration::from_millis(200);
        cfg.shutdown_timeout = Duration::from_millis(200);
        f(&mut cfg);
        let muxer = VsockMuxer::bind(cfg).unwrap();
        TestCtx {
            dev: VsockDevice::new(GUEST_CID, muxer),
            guest: TestGuest::new(),
            uds,
            _dir: dir,
        }
    }

    pub fn pump(&mut self) -> Vec<(PktHeader, Vec<u8>)> {
        self.guest.pump(&mut self.dev)
    }

    pub fn muxer(&self) -> &VsockMuxer {
        self.dev.backend()
    }

    /// The host listener for guest connections to host port `port`.
    pub fn host_listener(&self, port: u32) -> std::os::unix::net::UnixListener {
        let path = format!("{}_{}", self.uds.display(), port);
        std::os::unix::net::UnixListener::bind(path).unwrap()
    }
}
