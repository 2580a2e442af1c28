//! virtio-net TX (and RX) chains through `NetDevice` over an in-memory backend standing in for
//! the tap (the device's `NetBackend` trait), so no privileges and no real network.
//!
//! Checked beyond "no panic": every frame handed to the backend is exactly the bytes of one TX
//! chain, at least header + Ethernet header and at most header + 65550 bytes; every RX used
//! length fits its chain; an RX frame delivered into one chain arrives intact, with
//! `num_buffers` = 1 when the header has that field.
//!
//! Input: one config byte (MAC, ring sizes, event idx), then operations (see the match in the
//! target).
#![no_main]
// Test code: an unwrap on the harness's own set-up (temporary files, guest memory) is an
// assertion; a panic anywhere is the finding libFuzzer reports.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use husk_fuzz::*;
use husk_vmm::devices::virtio::net::defs::*;
use husk_vmm::devices::virtio::net::{NetBackend, NetDevice};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x8000;

/// A tap that keeps frames in memory. The fd is an eventfd (readable while frames wait), only
/// so the device has something to put in its epoll set.
struct FakeTap {
    fd: EventFd,
    st: Arc<Mutex<TapState>>,
}

/// What the tap holds, shared with the target (the device only hands out `&B`).
#[derive(Default)]
struct TapState {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    hdr_len: usize,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(f) = self.st.lock().unwrap().to_guest.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // A tap truncates a datagram that does not fit the read buffer.
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() == 1234 {
            // Sometimes the tap refuses (full, or a header the kernel rejects).
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.st.lock().unwrap().from_guest.push(buf.to_vec());
        Ok(buf.len())
    }
    fn set_vnet_hdr_len(&mut self, len: usize) -> io::Result<()> {
        assert!(
            len == HDR_LEN_V1 || len == HDR_LEN_LEGACY,
            "header length {len}"
        );
        self.st.lock().unwrap().hdr_len = len;
        Ok(())
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

struct Fuzz {
    mem: GuestMemoryMmap,
    alloc: Alloc,
    rx: Ring,
    tx: Ring,
    rxq: virtio_queue::Queue,
    txq: virtio_queue::Queue,
    dev: NetDevice<FakeTap>,
    tap: Arc<Mutex<TapState>>,
    /// TX chains we built: head -> the bytes they hold (None if deliberately broken).
    tx_sent: std::collections::HashMap<u16, Option<Vec<u8>>>,
    /// RX chains we posted: head -> (segments, capacity).
    rx_bufs: std::collections::HashMap<u16, (Vec<(u64, u32)>, u64)>,
    /// Frames queued to the backend, for the integrity check.
    injected: VecDeque<Vec<u8>>,
    raw_used: bool,
    /// Queue 0 = RX, 1 = TX.
    prints: Footprints,
}

impl Fuzz {
    fn tx_chain(&mut self, inp: &mut Input<'_>) {
        let hdr_len = self.dev.hdr_len();
        let hdr = inp.bytes(hdr_len).to_vec();
        let frame_len = match inp.u8() % 8 {
            0 => 0,
            1 => 13,
            2 => 14,
            3 => MAX_FRAME_LEN,
            4 => MAX_FRAME_LEN + 1,
            _ => usize::from(inp.u16()),
        };
        let head_bytes = inp.blob(256);
        let mut bytes = hdr;
        bytes.resize(hdr_len, 0);
        bytes.extend_from_slice(head_bytes);
        bytes.resize(hdr_len + frame_len, 0xab);
        let layout = inp.u8();
        let mut descs = Vec::new();
        let mut off = 0;
        for n in split_lens(inp, bytes.len(), 1 + usize::from(layout & 7)) {
            let addr = self.alloc.put(&self.mem, &bytes[off..off + n]);
            descs.push(Desc {
                addr,
                len: n as u32,
                write: false,
            });
            off += n;
        }
        if descs.is_empty() {
            descs.push(Desc {
                addr: DATA_START,
                len: 0,
                write: false,
            });
        }
        let laid = descs.clone();
        let mut intact = true;
        if layout & 0x80 != 0 {
            let i = usize::from(inp.u8()) % descs.len();
            match inp.u8() % 3 {
                0 => descs[i].write = true,
                1 => descs[i].addr = fuzz_addr(inp),
                _ => descs[i].len = inp.u32(),
            }
            intact = false;
        }
        let table = (layout & 0x40 != 0).then(|| self.alloc.alloc(16 * descs.len() as u64));
        let head = match table {
            Some(table) => self.tx.add_indirect(&self.mem, table, &descs),
            None => self.tx.add_chain(&self.mem, &descs),
        };
        match head {
            Some(head) => {
                let clash = self.prints.add((1, head), footprint(&descs, &laid, table));
                self.untrack(&clash);
                self.tx_sent
                    .insert(head, (intact && clash.is_empty()).then_some(bytes));
            }
            None => {
                // Not published, but its buffers were written: stop checking what they overlap.
                let clash = self.prints.clash(&footprint(&descs, &laid, table));
                self.untrack(&clash);
            }
        }
    }

    fn rx_bufs(&mut self, inp: &mut Input<'_>) {
        let n = 1 + usize::from(inp.u8() % 4);
        let shape = inp.u8();
        for _ in 0..n {
            let sizes: Vec<u32> = match shape % 4 {
                0 => vec![1526],
                1 => vec![65562],
                2 => vec![12, 4096],
                _ => (0..1 + inp.u8() % 3)
                    .map(|_| u32::from(inp.u16()))
                    .collect(),
            };
            let mut descs: Vec<Desc> = sizes
                .iter()
                .map(|&len| Desc {
                    addr: self.alloc.alloc(u64::from(len)),
                    len,
                    write: true,
                })
                .collect();
            let mut tracked = true;
            if shape & 0x80 != 0 {
                let i = usize::from(inp.u8()) % descs.len();
                if inp.bool() {
                    descs[i].write = false;
                } else {
                    descs[i].addr = fuzz_addr(inp);
                }
                tracked = false;
                if writes_rings(&descs) {
                    self.raw_used = true;
                }
            }
            let segs: Vec<(u64, u32)> = descs.iter().map(|d| (d.addr, d.len)).collect();
            let cap = segs.iter().map(|&(_, l)| u64::from(l)).sum();
            if let Some(head) = self.rx.add_chain(&self.mem, &descs) {
                let clash = self.prints.add((0, head), footprint(&descs, &[], None));
                self.untrack(&clash);
                self.rx_bufs.remove(&head);
                if tracked && clash.is_empty() {
                    self.rx_bufs.insert(head, (segs, cap));
                }
            }
        }
    }

    fn untrack(&mut self, clash: &[(usize, u16)]) {
        for &(q, h) in clash {
            if q == 0 {
                self.rx_bufs.remove(&h);
            } else if let Some(e) = self.tx_sent.get_mut(&h) {
                *e = None;
            }
        }
    }

    fn raw(&mut self, inp: &mut Input<'_>) {
        self.raw_used = true;
        let ring = if inp.bool() {
            &mut self.rx
        } else {
            &mut self.tx
        };
        for _ in 0..(inp.u8() % 4) {
            ring.raw_desc(&self.mem, inp);
        }
        match inp.u8() % 8 {
            0 => ring.raw_avail_idx(&self.mem, inp.u16()),
            1 => ring.raw_avail_flags(&self.mem, inp.u16(), inp.u16()),
            _ => {
                let head = ring.size / 2 + inp.u16() % (ring.size / 2);
                ring.raw_publish(&self.mem, head);
            }
        }
    }

    fn inject(&mut self, inp: &mut Input<'_>) {
        let len = match inp.u8() % 6 {
            0 => 0,
            1 => 25,
            2 => MAX_BUF_LEN,
            3 => MAX_BUF_LEN + 7,
            _ => usize::from(inp.u16()),
        };
        let mut f = inp.blob(512).to_vec();
        f.resize(len, 0xcd);
        let mut tap = self.tap.lock().unwrap();
        if tap.to_guest.len() < 64 {
            self.injected.push_back(f.clone());
            tap.to_guest.push_back(f);
            let _ = self.dev.backend().fd.write(1);
        }
    }

    fn check_tx(&mut self) {
        let mut used = Vec::new();
        self.tx
            .drain_used(&self.mem, |id, len| used.push((id, len)));
        for &(id, len) in &used {
            assert_eq!(len, 0, "TX used length");
            self.prints.remove((1, id as u16));
        }
        let mut frames = std::mem::take(&mut self.tap.lock().unwrap().from_guest);
        let hdr_len = self.dev.hdr_len();
        for f in &frames {
            assert!(
                f.len() >= hdr_len + ETH_HLEN,
                "runt of {} bytes reached the tap",
                f.len()
            );
            assert!(
                f.len() <= hdr_len + MAX_FRAME_LEN,
                "{} bytes reached the tap",
                f.len()
            );
        }
        if !self.raw_used {
            // Each frame is exactly one intact chain's bytes, in used-ring order.
            let mut expected = Vec::new();
            for (id, _) in used {
                if let Some(Some(bytes)) = self.tx_sent.remove(&(id as u16)) {
                    if bytes.len() >= hdr_len + ETH_HLEN
                        && bytes.len() <= hdr_len + MAX_FRAME_LEN
                        && bytes.len() != 1234
                    {
                        expected.push(bytes);
                    }
                }
            }
            for e in expected {
                let i = frames.iter().position(|f| *f == e);
                assert!(
                    i.is_some(),
                    "intact TX chain of {} bytes missing from the tap",
                    e.len()
                );
                frames.swap_remove(i.unwrap());
            }
        }
    }

    fn check_rx(&mut self) {
        let mut used = Vec::new();
        self.rx
            .drain_used(&self.mem, |id, len| used.push((id, len)));
        let hdr_len = self.dev.hdr_len();
        let mergeable = self.dev.acked_features() & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        for (id, len) in used {
            self.prints.remove((0, id as u16));
            let Some((segs, cap)) = self.rx_bufs.remove(&(id as u16)) else {
                continue;
            };
            assert!(
                u64::from(len) <= cap,
                "RX used length {len} beyond the chain's {cap}"
            );
            if len == 0 || self.raw_used || mergeable {
                continue;
            }
            // Without mergeable buffers a frame is in exactly one chain.
            let mut got = Vec::new();
            let mut left = len as usize;
            for (addr, n) in segs {
                let take = left.min(n as usize);
                let mut b = vec![0u8; take];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                got.extend_from_slice(&b);
                left -= take;
            }
            assert!(
                got.len() >= hdr_len + ETH_HLEN,
                "runt of {} bytes delivered",
                got.len()
            );
            if hdr_len == HDR_LEN_V1 {
                assert_eq!(
                    &got[NUM_BUFFERS_OFFSET..HDR_LEN_V1],
                    &1u16.to_le_bytes(),
                    "num_buffers"
                );
                got[NUM_BUFFERS_OFFSET..HDR_LEN_V1].copy_from_slice(&[0, 0]);
            }
            let found = self.injected.iter().position(|f| {
                let mut f = f.clone();
                f.truncate(MAX_BUF_LEN);
                if hdr_len == HDR_LEN_V1 && f.len() >= HDR_LEN_V1 {
                    f[NUM_BUFFERS_OFFSET..HDR_LEN_V1].copy_from_slice(&[0, 0]);
                }
                f == got
            });
            assert!(
                found.is_some(),
                "RX frame of {} bytes is not a frame the tap gave",
                got.len()
            );
            self.injected.remove(found.unwrap());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    ignore_sigpipe();
    let mut inp = Input::new(data);
    let cfg = inp.u8();
    let mac = (cfg & 1 != 0).then_some([0x02, 0, 0, 0, 0, 1]);
    let qsize = [16u16, 64, 256, 8][usize::from((cfg >> 1) & 3)];
    let event_idx = cfg & 8 != 0;
    let st = Arc::new(Mutex::new(TapState {
        hdr_len: HDR_LEN_V1,
        ..Default::default()
    }));
    let tap = FakeTap {
        fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        st: Arc::clone(&st),
    };
    let Ok(dev) = NetDevice::new(tap, mac) else {
        return;
    };
    let mem = guest_memory();
    let (rx, rxq) = Ring::new(RX_RING, qsize, event_idx);
    let (tx, txq) = Ring::new(TX_RING, qsize, event_idx);
    assert!(TX_RING + ring_bytes(qsize) <= DATA_START && RX_RING + ring_bytes(qsize) <= TX_RING);
    let mut f = Fuzz {
        mem,
        alloc: Alloc::default(),
        rx,
        tx,
        rxq,
        txq,
        dev,
        tap: st,
        tx_sent: Default::default(),
        rx_bufs: Default::default(),
        injected: VecDeque::new(),
        raw_used: false,
        prints: Footprints::default(),
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < 128 {
        ops += 1;
        match inp.u8() % 12 {
            0..=2 => f.tx_chain(&mut inp),
            3 => {
                // A queue error stops the device in a front end; it is not a bug in itself.
                let _ = f.dev.process_tx(&f.mem, &mut f.txq);
                f.check_tx();
            }
            4 => f.rx_bufs(&mut inp),
            5 => f.inject(&mut inp),
            6 => {
                let _ = f.dev.process_rx(&f.mem, &mut f.rxq);
                f.check_rx();
            }
            7 => {
                let _ = f.dev.rx_kick(&f.mem, &mut f.rxq);
                f.check_rx();
            }
            8 => f.raw(&mut inp),
            9 => {
                let feats = match inp.u8() % 4 {
                    0 => f.dev.device_features(),
                    1 => 0,
                    2 => f.dev.device_features() & !(1 << VIRTIO_NET_F_MRG_RXBUF),
                    _ => inp.u64(),
                };
                f.dev.set_acked_features(feats);
            }
            10 => {
                if inp.u8() % 4 == 0 {
                    f.dev.reset();
                    f.injected.clear();
                    f.tap.lock().unwrap().to_guest.clear();
                    // Held RX chains are forgotten by a reset: the driver reposts.
                    f.raw_used = true;
                }
            }
            _ => {
                let mut c = [0u8; 16];
                let off = u64::from(inp.u8());
                let n = usize::from(inp.u8() % 17);
                f.dev.read_config(off, &mut c[..n]);
            }
        }
    }
    let _ = f.dev.process_tx(&f.mem, &mut f.txq);
    f.check_tx();
    let _ = f.dev.process_rx(&f.mem, &mut f.rxq);
    f.check_rx();
});
