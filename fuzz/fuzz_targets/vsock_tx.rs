//! Guest TX packets through the virtio-vsock device and the hybrid-vsock muxer, with real Unix
//! sockets on the host side (listeners for guest connections, clients doing `CONNECT`).
//!
//! Input: one config byte, then a sequence of operations (see `Op` below), each a selector
//! byte and its arguments. Checked beyond "no panic": every RX packet the device fills is a
//! well-formed host-to-guest header whose used length matches it and fits the buffer, and a
//! device reset leaves no connection or handshake behind.
#![no_main]
// Test code: an unwrap on the harness's own set-up (temporary files, guest memory) is an
// assertion; a panic anywhere is the finding libFuzzer reports.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use husk_fuzz::*;
use husk_vmm::devices::virtio::vsock::defs::*;
use husk_vmm::devices::virtio::vsock::{MuxerConfig, PktHeader, VsockDevice, VsockMuxer};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_CID: u64 = 3;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x8000;
/// Host ports with a listener (`<uds>_<port>`).
const LISTEN_PORTS: [u32; 2] = [1024, 5000];
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const MAX_STREAMS: usize = 8;

fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
}

fn port(inp: &mut Input<'_>) -> u32 {
    match inp.u8() % 8 {
        0 => LISTEN_PORTS[0],
        1 => LISTEN_PORTS[1],
        2 => FIRST_LOCAL_PORT,
        3 => FIRST_LOCAL_PORT + 1,
        4 => 52,
        5 => 7777, // nobody listens
        6 => u32::MAX,
        _ => inp.u32(),
    }
}

struct Fuzz {
    mem: GuestMemoryMmap,
    alloc: Alloc,
    rx: Ring,
    tx: Ring,
    rxq: virtio_queue::Queue,
    txq: virtio_queue::Queue,
    dev: VsockDevice<VsockMuxer>,
    uds: PathBuf,
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
    /// RX chains we posted: head -> (header addr, header len, total writable capacity).
    rx_bufs: std::collections::HashMap<u16, (u64, u32, u64)>,
    rx_prints: Footprints,
    /// A posted RX chain let the device write over the rings: RX headers are no longer
    /// checked (what the device read as a chain may be anything).
    rings_hit: bool,
}

impl Fuzz {
    fn new(inp: &mut Input<'_>) -> Option<Self> {
        let cfg_byte = inp.u8();
        let uds = dir().join("v.sock");
        let mut cfg = MuxerConfig::new(GUEST_CID, &uds);
        // Long deadlines: nothing may expire during one run, so runs are reproducible.
        cfg.handshake_timeout = Duration::from_secs(3600);
        cfg.connect_timeout = Duration::from_secs(3600);
        cfg.shutdown_timeout = Duration::from_secs(3600);
        cfg.max_connections = [1usize, 2, 4, 16][usize::from(cfg_byte & 3)];
        cfg.conn_buf_size = [256 * 1024, 4096, 64, 0][usize::from((cfg_byte >> 2) & 3)];
        let event_idx = cfg_byte & 0x10 != 0;
        let qsize = if cfg_byte & 0x20 != 0 { 16 } else { 64 };
        let muxer = VsockMuxer::bind(cfg).ok()?;
        let mut listeners = Vec::new();
        for p in LISTEN_PORTS {
            let path = PathBuf::from(format!("{}_{p}", uds.display()));
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path).ok()?;
            l.set_nonblocking(true).ok()?;
            listeners.push(l);
        }
        let mem = guest_memory();
        let (rx, rxq) = Ring::new(RX_RING, qsize, event_idx);
        let (tx, txq) = Ring::new(TX_RING, qsize, event_idx);
        Some(Fuzz {
            mem,
            alloc: Alloc::default(),
            rx,
            tx,
            rxq,
            txq,
            dev: VsockDevice::new(GUEST_CID, muxer),
            uds,
            listeners,
            streams: Vec::new(),
            rx_bufs: Default::default(),
            rings_hit: false,
            rx_prints: Footprints::default(),
        })
    }

    fn header(&mut self, inp: &mut Input<'_>, payload_len: usize) -> PktHeader {
        let mode = inp.u8();
        let (src_cid, dst_cid, type_) = if mode & 0xf0 == 0xf0 {
            (inp.u64(), inp.u64(), inp.u16())
        } else {
            (GUEST_CID, VSOCK_HOST_CID, VIRTIO_VSOCK_TYPE_STREAM)
        };
        let op = match inp.u8() {
            b @ 0..=239 => u16::from(b % 8),
            _ => inp.u16(),
        };
        let src_port = port(inp);
        let dst_port = port(inp);
        let len = if mode & 1 != 0 {
            inp.u32()
        } else {
            payload_len as u32
        };
        let flags = match inp.u8() % 4 {
            0 => 0,
            1 => VIRTIO_VSOCK_SHUTDOWN_SEND,
            2 => VIRTIO_VSOCK_SHUTDOWN_ALL,
            _ => inp.u32(),
        };
        let (buf_alloc, fwd_cnt) = if mode & 2 != 0 {
            (inp.u32(), inp.u32())
        } else {
            (64 * 1024, 0)
        };
        PktHeader {
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            len,
            type_,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// A well-formed-ish packet: header and payload, laid out in 1..=4 descriptors.
    fn send_packet(&mut self, inp: &mut Input<'_>) {
        let payload = inp.blob(8192).to_vec();
        let hdr = self.header(inp, payload.len());
        let layout = inp.u8();
        let mut bytes = hdr.to_bytes().to_vec();
        if layout & 0x40 != 0 {
            // Truncated header.
            bytes.truncate(usize::from(inp.u8()) % VSOCK_PKT_HDR_SIZE);
        }
        let mut descs = Vec::new();
        if layout & 1 != 0 {
            // Header and payload in one buffer.
            bytes.extend_from_slice(&payload);
            let addr = self.alloc.put(&self.mem, &bytes);
            descs.push(Desc {
                addr,
                len: bytes.len() as u32,
                write: false,
            });
        } else {
            let addr = self.alloc.put(&self.mem, &bytes);
            descs.push(Desc {
                addr,
                len: bytes.len() as u32,
                write: false,
            });
            let parts = 1 + usize::from((layout >> 1) & 3);
            let mut off = 0;
            for n in split_lens(inp, payload.len(), parts) {
                let addr = self.alloc.put(&self.mem, &payload[off..off + n]);
                descs.push(Desc {
                    addr,
                    len: n as u32,
                    write: false,
                });
                off += n;
            }
        }
        if layout & 0x80 != 0 {
            // One descriptor device-writable, or one pointing anywhere.
            let i = usize::from(inp.u8()) % descs.len();
            if inp.bool() {
                descs[i].write = true;
            } else {
                descs[i].addr = fuzz_addr(inp);
            }
        }
        if layout & 0x20 != 0 {
            let table = self.alloc.alloc(16 * descs.len() as u64);
            self.tx.add_indirect(&self.mem, table, &descs);
        } else {
            self.tx.add_chain(&self.mem, &descs);
        }
    }

    fn raw_tx(&mut self, inp: &mut Input<'_>) {
        for _ in 0..(inp.u8() % 4) {
            self.tx.raw_desc(&self.mem, inp);
        }
        match inp.u8() % 8 {
            0 => self.tx.raw_avail_idx(&self.mem, inp.u16()),
            1 => self.tx.raw_avail_flags(&self.mem, inp.u16(), inp.u16()),
            _ => {
                let head = self.tx.size / 2 + inp.u16() % (self.tx.size / 2);
                self.tx.raw_publish(&self.mem, head);
            }
        }
    }

    fn provide_rx(&mut self, inp: &mut Input<'_>) {
        let n = 1 + usize::from(inp.u8() % 8);
        let shape = inp.u8();
        for _ in 0..n {
            let (hdr_len, data_len) = match shape % 4 {
                0 => (VSOCK_PKT_HDR_SIZE as u32, 4096),
                1 => (VSOCK_PKT_HDR_SIZE as u32 + 256, 0), // one buffer for both
                2 => (u32::from(inp.u8()), u32::from(inp.u16())),
                _ => (VSOCK_PKT_HDR_SIZE as u32, 1),
            };
            let h = self.alloc.alloc(u64::from(hdr_len));
            let mut descs = vec![Desc {
                addr: h,
                len: hdr_len,
                write: shape & 0x10 == 0,
            }];
            if data_len > 0 {
                let d = self.alloc.alloc(u64::from(data_len));
                descs.push(Desc {
                    addr: d,
                    len: data_len,
                    write: shape & 0x20 == 0,
                });
            }
            if shape & 0x40 != 0 {
                descs[0].addr = fuzz_addr(inp);
                self.rings_hit |= writes_rings(&descs);
            }
            let cap: u64 = descs
                .iter()
                .filter(|d| d.write)
                .map(|d| u64::from(d.len))
                .sum();
            let all_writable = descs.iter().all(|d| d.write);
            if let Some(head) = self.rx.add_chain(&self.mem, &descs) {
                let clash = self.rx_prints.add((0, head), footprint(&descs, &[], None));
                for (_, h) in &clash {
                    self.rx_bufs.remove(h);
                }
                self.rx_bufs.remove(&head);
                if all_writable && shape & 0x40 == 0 && clash.is_empty() {
                    self.rx_bufs.insert(head, (descs[0].addr, hdr_len, cap));
                }
            }
        }
    }

    /// Runs the device the way a front end does on an event, then checks what it returned.
    fn run(&mut self) {
        self.dev.notify_backend();
        // A queue error stops the device in a front end; it is not a bug in itself.
        let _ = self.dev.process_tx(&self.mem, &mut self.txq);
        let _ = self.dev.process_rx(&self.mem, &mut self.rxq);
        self.tx
            .drain_used(&self.mem, |_, len| assert_eq!(len, 0, "TX used length"));
        let mut got = Vec::new();
        self.rx.drain_used(&self.mem, |id, len| got.push((id, len)));
        for (id, len) in got {
            self.rx_prints.remove((0, id as u16));
            let Some((hdr_addr, hdr_len, cap)) = self.rx_bufs.remove(&(id as u16)) else {
                continue;
            };
            assert!(
                u64::from(len) <= cap,
                "RX used length {len} beyond the buffer's {cap}"
            );
            if len == 0 || self.rings_hit || (hdr_len as usize) < VSOCK_PKT_HDR_SIZE {
                continue;
            }
            let mut raw = [0u8; VSOCK_PKT_HDR_SIZE];
            self.mem
                .read_slice(&mut raw, GuestAddress(hdr_addr))
                .unwrap();
            let h = PktHeader::from_bytes(&raw);
            assert_eq!(
                len,
                VSOCK_PKT_HDR_SIZE as u32 + h.len,
                "used length vs header {h:?}"
            );
            assert_eq!(h.src_cid, VSOCK_HOST_CID, "{h:?}");
            assert_eq!(h.dst_cid, GUEST_CID, "{h:?}");
            assert_eq!(h.type_, VIRTIO_VSOCK_TYPE_STREAM, "{h:?}");
            assert!(
                (VIRTIO_VSOCK_OP_REQUEST..=VIRTIO_VSOCK_OP_CREDIT_REQUEST).contains(&h.op),
                "{h:?}"
            );
            assert!(
                h.op == VIRTIO_VSOCK_OP_RW || h.len == 0,
                "payload on a control packet {h:?}"
            );
            assert!(h.len <= MAX_PKT_PAYLOAD, "{h:?}");
        }
    }

    fn host(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % 8 {
            0 => {
                // Accept whatever the guest connected to our listeners.
                for l in &self.listeners {
                    while self.streams.len() < MAX_STREAMS {
                        match l.accept() {
                            Ok((s, _)) => {
                                let _ = s.set_nonblocking(true);
                                self.streams.push(s);
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
            1 => {
                // A host client connects to a guest port.
                if self.streams.len() < MAX_STREAMS {
                    if let Ok(mut s) = UnixStream::connect(&self.uds) {
                        let _ = s.set_nonblocking(true);
                        let line = match inp.u8() % 4 {
                            0 => format!("CONNECT {}\n", port(inp)).into_bytes(),
                            1 => inp.blob(128).to_vec(),
                            _ => b"CONNECT 1024\n".to_vec(),
                        };
                        let _ = s.write(&line);
                        self.streams.push(s);
                    }
                }
            }
            op => {
                if self.streams.is_empty() {
                    return;
                }
                let i = usize::from(inp.u8()) % self.streams.len();
                match op {
                    2 | 3 => {
                        let data = inp.blob(16384).to_vec();
                        let _ = self.streams[i].write(&data);
                    }
                    4 => {
                        let mut buf = [0u8; 65536];
                        let _ = self.streams[i].read(&mut buf);
                    }
                    5 => {
                        let _ = self.streams[i].shutdown(Shutdown::Write);
                    }
                    6 => {
                        let _ = self.streams[i].shutdown(Shutdown::Read);
                    }
                    _ => {
                        self.streams.swap_remove(i);
                    }
                }
            }
        }
    }

    /// A guest packet written by the device model itself (guest_hdr style), answering a
    /// host-initiated REQUEST: RESPONSE from `port` to FIRST_LOCAL_PORT + k.
    fn respond(&mut self, inp: &mut Input<'_>) {
        let k = u32::from(inp.u8() % 4);
        let peer = port(inp);
        let h = PktHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: peer,
            dst_port: FIRST_LOCAL_PORT + k,
            len: 0,
            type_: VIRTIO_VSOCK_TYPE_STREAM,
            op: VIRTIO_VSOCK_OP_RESPONSE,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        };
        let addr = self.alloc.put(&self.mem, &h.to_bytes());
        self.tx.add_chain(
            &self.mem,
            &[Desc {
                addr,
                len: VSOCK_PKT_HDR_SIZE as u32,
                write: false,
            }],
        );
    }
}

fuzz_target!(|data: &[u8]| {
    ignore_sigpipe();
    let mut inp = Input::new(data);
    let Some(mut f) = Fuzz::new(&mut inp) else {
        return;
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < 256 {
        ops += 1;
        match inp.u8() % 10 {
            0..=2 => f.send_packet(&mut inp),
            3 => f.raw_tx(&mut inp),
            4 => f.provide_rx(&mut inp),
            5 | 6 => f.run(),
            7 => f.host(&mut inp),
            8 => f.respond(&mut inp),
            _ => {
                if inp.u8() % 4 == 0 {
                    f.dev.reset();
                    assert_eq!(f.dev.backend().connection_count(), 0);
                    assert_eq!(f.dev.backend().handshake_count(), 0);
                    assert_eq!(f.dev.backend().tracked_fds(), 0);
                } else {
                    f.run();
                }
            }
        }
    }
    f.provide_rx(&mut Input::new(&[7, 0]));
    f.run();
});
