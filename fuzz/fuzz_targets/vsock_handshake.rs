//! The hybrid-vsock host-side handshake: `CONNECT <port>\n` from a host client.
//!
//! Two parts per input:
//! 1. `parse_connect_line` on the input after byte 0, against an independent reference parser.
//! 2. The same bytes through the muxer for real: a host client connects to the hybrid socket
//!    and writes the input in fuzzer-chosen chunks. If the stream starts with a valid line the
//!    guest must see exactly one REQUEST to that port; after the guest accepts, the client must
//!    read `OK <local port>\n` and every byte it sent after the newline must reach the guest,
//!    in order. An invalid or overlong line must close the client without a REQUEST.
//!
//! Input: byte 0 = number of chunks (mod 8) + flags, then the stream bytes; chunk boundaries
//! are derived from the following bytes of the stream itself via `split_lens`.
#![no_main]
// Test code: an unwrap on the harness's own set-up (temporary files, guest memory) is an
// assertion; a panic anywhere is the finding libFuzzer reports.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use husk_fuzz::*;
use husk_vmm::devices::virtio::vsock::defs::*;
use husk_vmm::devices::virtio::vsock::unix::parse_connect_line;
use husk_vmm::devices::virtio::vsock::{MuxerConfig, PktHeader, VsockDevice, VsockMuxer};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_CID: u64 = 3;
const MAX_LINE: usize = 64;

fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
}

/// Reference: `CONNECT ` + 1 or more ASCII digits (a u32) + optional `\r` + `\n`.
fn reference(line: &[u8]) -> Option<u32> {
    let (&last, body) = line.split_last()?;
    if last != b'\n' {
        return None;
    }
    let body = match body.split_last() {
        Some((&b'\r', rest)) => rest,
        _ => body,
    };
    let digits = body.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() {
        return None;
    }
    let mut v: u32 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u32::from(d - b'0'))?;
    }
    Some(v)
}

struct Guest {
    mem: GuestMemoryMmap,
    alloc: Alloc,
    rx: Ring,
    tx: Ring,
    rxq: virtio_queue::Queue,
    txq: virtio_queue::Queue,
    rx_bufs: std::collections::HashMap<u16, (u64, u64)>,
}

impl Guest {
    fn new() -> Self {
        let (rx, rxq) = Ring::new(0x1000, 64, false);
        let (tx, txq) = Ring::new(0x8000, 64, false);
        Guest {
            mem: guest_memory(),
            alloc: Alloc::default(),
            rx,
            tx,
            rxq,
            txq,
            rx_bufs: Default::default(),
        }
    }

    fn pump(&mut self, dev: &mut VsockDevice<VsockMuxer>) -> Vec<(PktHeader, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..8 {
            while self.rx.free_slots() >= 2 {
                let h = self.alloc.alloc(VSOCK_PKT_HDR_SIZE as u64);
                let d = self.alloc.alloc(4096);
                let descs = [
                    Desc {
                        addr: h,
                        len: VSOCK_PKT_HDR_SIZE as u32,
                        write: true,
                    },
                    Desc {
                        addr: d,
                        len: 4096,
                        write: true,
                    },
                ];
                if let Some(head) = self.rx.add_chain(&self.mem, &descs) {
                    self.rx_bufs.insert(head, (h, d));
                }
            }
            dev.notify_backend();
            dev.process_tx(&self.mem, &mut self.txq).unwrap();
            dev.process_rx(&self.mem, &mut self.rxq).unwrap();
            self.tx.drain_used(&self.mem, |_, _| {});
            let mut used = Vec::new();
            self.rx
                .drain_used(&self.mem, |id, len| used.push((id, len)));
            for (id, len) in used {
                let (h, d) = self.rx_bufs.remove(&(id as u16)).expect("unknown RX id");
                if len == 0 {
                    continue;
                }
                let mut raw = [0u8; VSOCK_PKT_HDR_SIZE];
                self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
                let hdr = PktHeader::from_bytes(&raw);
                assert_eq!(len, VSOCK_PKT_HDR_SIZE as u32 + hdr.len);
                let mut data = vec![0u8; hdr.len as usize];
                self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
                out.push((hdr, data));
            }
        }
        out
    }

    fn send(&mut self, h: PktHeader) {
        let addr = self.alloc.put(&self.mem, &h.to_bytes());
        self.tx
            .add_chain(
                &self.mem,
                &[Desc {
                    addr,
                    len: VSOCK_PKT_HDR_SIZE as u32,
                    write: false,
                }],
            )
            .expect("TX ring full");
    }
}

fuzz_target!(|data: &[u8]| {
    ignore_sigpipe();
    // Part 1: the parser alone, on the same bytes part 2 streams.
    let line = data.get(1..).unwrap_or_default();
    assert_eq!(parse_connect_line(line), reference(line), "{line:?}");

    // Part 2: through the muxer.
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let stream = inp.bytes(4096).to_vec();
    let mut chunker = Input::new(&stream);
    let chunks = split_lens(&mut chunker, stream.len(), 1 + usize::from(flags % 8));

    let uds = dir().join("h.sock");
    let mut cfg = MuxerConfig::new(GUEST_CID, &uds);
    cfg.handshake_timeout = Duration::from_secs(3600);
    cfg.connect_timeout = Duration::from_secs(3600);
    cfg.shutdown_timeout = Duration::from_secs(3600);
    let mut dev = VsockDevice::new(GUEST_CID, VsockMuxer::bind(cfg).expect("bind"));
    let mut guest = Guest::new();
    let mut client = UnixStream::connect(&uds).expect("connect");
    client.set_nonblocking(true).unwrap();

    let mut pkts = Vec::new();
    let mut off = 0;
    for n in chunks {
        if client.write_all(&stream[off..off + n]).is_err() {
            // The muxer already closed us (a bad or overlong line): checked below.
            break;
        }
        off += n;
        pkts.extend(guest.pump(&mut dev));
    }
    pkts.extend(guest.pump(&mut dev));

    // What the handshake should have made of the stream.
    let nl = stream.iter().position(|&b| b == b'\n');
    let expect = match nl {
        Some(p) if p < MAX_LINE => Some(reference(&stream[..=p])),
        _ if stream.len() >= MAX_LINE => Some(None), // overlong: refused
        _ => None,                                   // still incomplete
    };
    let requests: Vec<PktHeader> = pkts
        .iter()
        .filter(|(h, _)| h.op == VIRTIO_VSOCK_OP_REQUEST)
        .map(|(h, _)| *h)
        .collect();
    match expect {
        None => {
            assert!(
                requests.is_empty(),
                "REQUEST from an incomplete line: {requests:?}"
            );
            assert_eq!(dev.backend().handshake_count(), 1);
        }
        Some(None) => {
            assert!(requests.is_empty(), "REQUEST from a bad line: {requests:?}");
            assert_eq!(dev.backend().handshake_count(), 0);
            assert_eq!(dev.backend().connection_count(), 0);
            // The client is closed: reads give EOF.
            let mut b = [0u8; 16];
            match client.read(&mut b) {
                // EOF, or a reset when the muxer closed with our bytes still unread.
                Ok(0) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => panic!("client not closed after a bad handshake: {other:?}"),
            }
        }
        Some(Some(port)) => {
            assert_eq!(requests.len(), 1, "{pkts:?}");
            let req = requests[0];
            assert_eq!(req.dst_port, port);
            assert_eq!(dev.backend().connection_count(), 1);
            // The guest accepts.
            guest.send(PktHeader {
                src_cid: GUEST_CID,
                dst_cid: VSOCK_HOST_CID,
                src_port: port,
                dst_port: req.src_port,
                len: 0,
                type_: VIRTIO_VSOCK_TYPE_STREAM,
                op: VIRTIO_VSOCK_OP_RESPONSE,
                flags: 0,
                buf_alloc: 1 << 20,
                fwd_cnt: 0,
            });
            let rest = &stream[nl.unwrap() + 1..];
            let mut got: Vec<u8> = pkts
                .iter()
                .filter(|(h, _)| h.op == VIRTIO_VSOCK_OP_RW)
                .flat_map(|(_, d)| d.clone())
                .collect();
            for _ in 0..16 {
                for (h, d) in guest.pump(&mut dev) {
                    assert_ne!(h.op, VIRTIO_VSOCK_OP_RST, "connection reset: {h:?}");
                    if h.op == VIRTIO_VSOCK_OP_RW {
                        got.extend_from_slice(&d);
                    }
                }
                if got.len() >= rest.len() {
                    break;
                }
            }
            assert_eq!(got, rest, "payload after the handshake line");
            let ok = format!("OK {}\n", req.src_port);
            let mut line = vec![0u8; ok.len()];
            let mut have = 0;
            for _ in 0..16 {
                if have == line.len() {
                    break;
                }
                match client.read(&mut line[have..]) {
                    Ok(0) => break,
                    Ok(n) => have += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        guest.pump(&mut dev);
                    }
                    Err(e) => panic!("client read: {e}"),
                }
            }
            assert_eq!(String::from_utf8_lossy(&line[..have]), ok);
        }
    }
});
