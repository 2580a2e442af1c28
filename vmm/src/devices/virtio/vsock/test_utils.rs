//! A fake guest driver for the vsock device tests: guest memory with RX and TX split queues
//! that the test fills and reads the way a virtio driver would.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use crate::devices::virtio::test_utils::Desc;
use crate::devices::virtio::test_utils::Ring;

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
        let (rx, rxq) = Ring::new(RX_RING, QSIZE);
        let (tx, txq) = Ring::new(TX_RING, QSIZE);
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
