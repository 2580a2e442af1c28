//! virtio-net device tests: a fake guest driver lays out split rings in real guest memory.
//! Device logic runs against a datagram socket pair standing in for the tap (no privileges
//! needed); the `tap_*` tests use a real tap in a fresh network namespace and need root.

// Test code: an unwrap is the assertion that the step worked.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::defs::*;
use super::*;
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::test_utils::{Desc, Ring};

const MEM_SIZE: usize = 4 << 20;
const RXQ_BASE: u64 = 0x1000;
const TXQ_BASE: u64 = 0x4000;
const RING_SIZE: u16 = 16;
const BUF_BASE: u64 = 0x10000;

const F_V1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const F_MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

/// A datagram socket standing in for a tap: one datagram per header+frame, like a tap fd.
pub(crate) struct FakeTap {
    sock: UnixDatagram,
    pub hdr_len: usize,
    pub offload: Option<u32>,
}

impl FakeTap {
    /// The device's end and the "network" end.
    pub(crate) fn pair() -> (FakeTap, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (
            FakeTap {
                sock: a,
                hdr_len: HDR_LEN_V1,
                offload: None,
            },
            b,
        )
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.send(buf)
    }
    fn set_vnet_hdr_len(&mut self, len: usize) -> io::Result<()> {
        self.hdr_len = len;
        Ok(())
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload = Some(flags);
        Ok(())
    }
}

/// An Ethernet frame of `len` bytes with our test ethertype (0x88b5, local experimental).
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

fn with_hdr(hdr_len: usize, f: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; hdr_len];
    v.extend_from_slice(f);
    v
}

struct Ctx<B: NetBackend> {
    mem: GuestMemoryMmap,
    dev: NetDevice<B>,
    rx: Ring,
    rxq: Queue,
    tx: Ring,
    txq: Queue,
    next_buf: u64,
}

impl<B: NetBackend> Ctx<B> {
    fn new(backend: B, acked: u64) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, rxq) = Ring::new(RXQ_BASE, RING_SIZE);
        let (tx, txq) = Ring::new(TXQ_BASE, RING_SIZE);
        let mut dev = NetDevice::new(backend, Some([2, 0, 0, 0, 0, 9])).unwrap();
        dev.set_acked_features(acked);
        Ctx {
            mem,
            dev,
            rx,
            rxq,
            tx,
            txq,
            next_buf: BUF_BASE,
        }
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let at = self.next_buf;
        self.next_buf = (at + len as u64 + 15) & !15;
        assert!(self.next_buf < MEM_SIZE as u64);
        at
    }

    /// Puts `data` in guest memory split at `splits` and queues it on TX.
    fn guest_send(&mut self, data: &[u8], splits: &[usize]) -> u16 {
        let mut descs = Vec::new();
        let mut start = 0;
        for &end in splits.iter().chain(std::iter::once(&data.len())) {
            let addr = self.alloc(end - start);
            self.mem
                .write_slice(&data[start..end], GuestAddress(addr))
                .unwrap();
            descs.push(Desc {
                addr,
                len: (end - start) as u32,
                write: false,
            });
            start = end;
        }
        self.tx.add_chain(&self.mem, &descs)
    }

    /// Posts one RX buffer of `len` bytes; returns (head, address).
    fn post_rx(&mut self, len: u32) -> (u16, u64) {
        let addr = self.alloc(len as usize);
        let head = self.rx.add_chain(
            &self.mem,
            &[Desc {
                addr,
                len,
                write: true,
            }],
        );
        (head, addr)
    }

    fn tx(&mut self) -> bool {
        self.dev.process_tx(&self.mem, &mut self.txq).unwrap()
    }

    fn rx(&mut self) -> bool {
        self.dev.process_rx(&self.mem, &mut self.rxq).unwrap()
    }

    fn kick_rx(&mut self) -> bool {
        self.dev.rx_kick(&self.mem, &mut self.rxq).unwrap()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// Whether `fd` is readable within `ms`.
fn readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn tx_frame_reaches_the_backend_whole() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
    let pkt = with_hdr(12, &frame(1000, 1));
    let head = ctx.guest_send(&pkt, &[12, 500]);
    assert!(ctx.tx());
    assert_eq!(ctx.tx.pop_used(&ctx.mem), Some((head, 0)));
    let mut buf = vec![0u8; 4096];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &pkt[..]);
    let s = ctx.dev.stats();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 1000, 0));
}

#[test]
fn rx_frame_gets_header_with_num_buffers() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
    let (head, addr) = ctx.post_rx(2048);
    let f = frame(200, 2);
    let mut from_tap = with_hdr(12, &f);
    from_tap[0] = 1; // NEEDS_CSUM from the tap goes through to the guest.
    peer.send(&from_tap).unwrap();
    assert!(ctx.rx());
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((head, 212)));
    let got = ctx.read(addr, 212);
    assert_eq!(got[0], 1);
    assert_eq!(&got[NUM_BUFFERS_OFFSET..12], &1u16.to_le_bytes());
    assert_eq!(&got[12..], &f[..]);
    assert_eq!(ctx.dev.stats().rx_frames, 1);
}

#[test]
fn mergeable_rx_spans_buffers() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
    let bufs: Vec<_> = (0..3).map(|_| ctx.post_rx(1500)).collect();
    let f = frame(2980, 3);
    peer.send(&with_hdr(12, &f)).unwrap();
    assert!(ctx.rx());
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((bufs[0].0, 1500)));
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((bufs[1].0, 1492)));
    assert_eq!(ctx.rx.pop_used(&ctx.mem), None, "third buffer not needed");
    let mut got = ctx.read(bufs[0].1, 1500);
    got.extend(ctx.read(bufs[1].1, 1492));
    assert_eq!(&got[NUM_BUFFERS_OFFSET..12], &2u16.to_le_bytes());
    assert_eq!(&got[12..], &f[..]);
    // The unused buffer takes the next frame.
    let f2 = frame(60, 4);
    peer.send(&with_hdr(12, &f2)).unwrap();
    ctx.rx();
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((bufs[2].0, 72)));
}

#[test]
fn rx_waits_for_buffers_without_spinning() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG | F_EVENT_IDX);
    ctx.rxq.set_event_idx(true);
    let f = frame(100, 5);
    peer.send(&with_hdr(12, &f)).unwrap();
    assert!(readable(ctx.dev.backend_fd(), 1000));
    assert!(!ctx.rx(), "no buffers: nothing used");
    assert!(!ctx.dev.is_rx_armed());
    // The front end's poll fd goes quiet although the frame is still pending.
    assert!(!readable(ctx.dev.backend_fd(), 50));
    // More frames wait in the backend meanwhile.
    peer.send(&with_hdr(12, &frame(80, 6))).unwrap();
    assert!(!readable(ctx.dev.backend_fd(), 50));
    let (h1, a1) = ctx.post_rx(1024);
    let (h2, _) = ctx.post_rx(1024);
    assert!(ctx.kick_rx());
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((h1, 112)));
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((h2, 92)));
    assert_eq!(&ctx.read(a1 + 12, 100), &f[..]);
    assert!(ctx.dev.is_rx_armed());
    assert_eq!(ctx.dev.stats().rx_frames, 2);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
    // A device-writable descriptor in a TX chain.
    let a = ctx.alloc(100);
    let h1 = ctx.tx.add_chain(
        &ctx.mem,
        &[
            Desc {
                addr: a,
                len: 50,
                write: false,
            },
            Desc {
                addr: a + 50,
                len: 50,
                write: true,
            },
        ],
    );
    // Shorter than the header.
    let h2 = ctx.guest_send(&[0u8; 5], &[]);
    // Header but no Ethernet header.
    let h3 = ctx.guest_send(&[0u8; 20], &[]);
    // Over 65550 bytes of frame.
    let big = with_hdr(12, &frame(MAX_FRAME_LEN + 1, 7));
    let h4 = ctx.guest_send(&big, &[40000]);
    // A buffer outside guest memory.
    let h5 = ctx.tx.add_chain(
        &ctx.mem,
        &[Desc {
            addr: MEM_SIZE as u64 - 10,
            len: 100,
            write: false,
        }],
    );
    // Exactly the largest frame is fine, and so is what follows.
    let max = with_hdr(12, &frame(MAX_FRAME_LEN, 8));
    let h6 = ctx.guest_send(&max, &[30000]);
    assert!(ctx.tx());
    for h in [h1, h2, h3, h4, h5, h6] {
        assert_eq!(ctx.tx.pop_used(&ctx.mem), Some((h, 0)));
    }
    assert_eq!(ctx.dev.stats().tx_dropped, 5);
    assert_eq!(ctx.dev.stats().tx_frames, 1);
    let mut buf = vec![0u8; MAX_BUF_LEN + 10];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(n, max.len());
    assert_eq!(&buf[..n], &max[..]);
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
    let a = ctx.alloc(64);
    // A device-readable descriptor in an RX chain, then one outside guest memory.
    let bad1 = ctx.rx.add_chain(
        &ctx.mem,
        &[Desc {
            addr: a,
            len: 64,
            write: false,
        }],
    );
    let bad2 = ctx.rx.add_chain(
        &ctx.mem,
        &[Desc {
            addr: MEM_SIZE as u64 - 8,
            len: 64,
            write: true,
        }],
    );
    let (good, addr) = ctx.post_rx(2048);
    let f = frame(300, 9);
    peer.send(&with_hdr(12, &f)).unwrap();
    assert!(ctx.rx());
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((bad1, 0)));
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((bad2, 0)));
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((good, 312)));
    assert_eq!(&ctx.read(addr + 12, 300), &f[..]);
    assert_eq!(ctx.dev.stats().rx_bad_buffers, 2);
}

#[test]
fn runts_from_the_backend_are_dropped() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
    let (head, _) = ctx.post_rx(2048);
    peer.send(&[0u8; 11]).unwrap();
    peer.send(&[0u8; 20]).unwrap();
    peer.send(&with_hdr(12, &frame(64, 1))).unwrap();
    assert!(ctx.rx());
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((head, 76)));
    assert_eq!(ctx.dev.stats().rx_dropped, 2);
}

#[test]
fn without_mergeable_buffers_a_too_big_frame_is_dropped_and_the_buffer_kept() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1);
    let (head, addr) = ctx.post_rx(1526);
    let (_h2, _) = ctx.post_rx(1526);
    peer.send(&with_hdr(12, &frame(3000, 1))).unwrap();
    let f = frame(1514, 2);
    peer.send(&with_hdr(12, &f)).unwrap();
    assert!(ctx.rx());
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((head, 1526)));
    assert_eq!(ctx.rx.pop_used(&ctx.mem), None);
    let got = ctx.read(addr, 1526);
    // VERSION_1 without MRG_RXBUF: num_buffers is still there, and 1.
    assert_eq!(&got[NUM_BUFFERS_OFFSET..12], &1u16.to_le_bytes());
    assert_eq!(&got[12..], &f[..]);
    assert_eq!(ctx.dev.stats().rx_dropped, 1);
}

/// Found by the net_tx fuzz target: chains held for a mergeable frame, then features acked
/// again without MRG_RXBUF, must not take one frame across several chains.
#[test]
fn renegotiating_without_mergeable_buffers_never_spreads_a_frame() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
    let (h1, a1) = ctx.post_rx(1526);
    let (h2, _) = ctx.post_rx(1526);
    peer.send(&with_hdr(12, &frame(4000, 1))).unwrap();
    // Two buffers for a frame that needs three: both held, the frame waits.
    assert!(!ctx.rx());
    assert_eq!(ctx.rx.pop_used(&ctx.mem), None);
    ctx.dev.set_acked_features(F_V1);
    // Without MRG_RXBUF the waiting frame and a 3000-byte one fit no single chain: both
    // dropped, neither split over h1 and h2; a frame that fits one chain takes h1.
    peer.send(&with_hdr(12, &frame(3000, 2))).unwrap();
    let f = frame(1000, 3);
    peer.send(&with_hdr(12, &f)).unwrap();
    assert!(ctx.kick_rx());
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((h1, 1012)));
    assert_eq!(ctx.rx.pop_used(&ctx.mem), None, "h2 ({h2}) waits");
    let got = ctx.read(a1, 1012);
    assert_eq!(&got[NUM_BUFFERS_OFFSET..12], &1u16.to_le_bytes());
    assert_eq!(&got[12..], &f[..]);
    assert_eq!(ctx.dev.stats().rx_dropped, 2);
}

#[test]
fn legacy_driver_uses_the_10_byte_header() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, 0);
    assert_eq!(ctx.dev.hdr_len(), HDR_LEN_LEGACY);
    let pkt = with_hdr(10, &frame(100, 3));
    ctx.guest_send(&pkt, &[10]);
    ctx.tx();
    assert_eq!(
        ctx.dev.backend().hdr_len,
        10,
        "backend told before the first frame"
    );
    assert_eq!(ctx.dev.backend().offload, Some(0));
    let mut buf = vec![0u8; 512];
    assert_eq!(peer.recv(&mut buf).unwrap(), 110);
    let (head, addr) = ctx.post_rx(1524);
    let f = frame(90, 4);
    peer.send(&with_hdr(10, &f)).unwrap();
    ctx.rx();
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((head, 100)));
    assert_eq!(&ctx.read(addr + 10, 90), &f[..]);
}

#[test]
fn offloads_follow_what_the_guest_acked() {
    let (tap, _peer) = FakeTap::pair();
    let all = (1u64 << VIRTIO_NET_F_GUEST_CSUM)
        | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
        | (1u64 << VIRTIO_NET_F_GUEST_TSO6);
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG | all);
    ctx.tx();
    let want = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(ctx.dev.backend().offload, Some(want));
    // TSO without checksum offload is not passed on.
    ctx.dev
        .set_acked_features(F_V1 | (1u64 << VIRTIO_NET_F_GUEST_TSO4));
    ctx.tx();
    assert_eq!(ctx.dev.backend().offload, Some(0));
}

#[test]
fn config_space_and_features() {
    let (tap, _peer) = FakeTap::pair();
    let ctx = Ctx::new(tap, F_V1);
    let mut c = [0u8; 10];
    VirtioDevice::read_config(&ctx.dev, 0, &mut c);
    assert_eq!(c, [2, 0, 0, 0, 0, 9, 1, 0, 0, 0]);
    let f = VirtioDevice::features(&ctx.dev);
    for bit in [
        32,
        29,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(f & (1u64 << bit), 0, "bit {bit}");
    }
    assert_eq!(VirtioDevice::device_type(&ctx.dev), 1);
    assert_eq!(VirtioDevice::queue_max_sizes(&ctx.dev), &[256, 256]);
}

#[test]
fn inactive_device_stops_polling_and_reset_forgets_the_pending_frame() {
    let (tap, peer) = FakeTap::pair();
    let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
    peer.send(&with_hdr(12, &frame(100, 1))).unwrap();
    assert!(readable(ctx.dev.backend_fd(), 1000));
    let mut none: Vec<Queue> = Vec::new();
    assert_eq!(ctx.dev.process_backend(&ctx.mem, &mut none).unwrap(), 0);
    assert!(!readable(ctx.dev.backend_fd(), 50), "inactive: not polled");
    // Activation arms it again and the frame is still there.
    VirtioDevice::activate(&mut ctx.dev, &ctx.mem, F_V1 | F_MRG).unwrap();
    assert!(readable(ctx.dev.backend_fd(), 1000));
    let (head, _) = ctx.post_rx(512);
    let mut queues = vec![std::mem::replace(&mut ctx.rxq, Queue::new(16).unwrap())];
    assert_eq!(ctx.dev.process_backend(&ctx.mem, &mut queues).unwrap(), 1);
    ctx.rxq = queues.swap_remove(0);
    assert_eq!(ctx.rx.pop_used(&ctx.mem), Some((head, 112)));
}

#[test]
fn mac_parsing() {
    assert_eq!(
        parse_mac("02:aB:00:11:22:33"),
        Ok([2, 0xab, 0, 0x11, 0x22, 0x33])
    );
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "2:0:0:0:0:0",
        "zz:00:00:00:00:00",
    ] {
        assert!(matches!(parse_mac(bad), Err(MacError::Syntax(_))), "{bad}");
    }
    assert!(matches!(
        parse_mac("01:00:5e:00:00:01"),
        Err(MacError::Multicast(_))
    ));
    assert!(matches!(
        parse_mac("00:00:00:00:00:00"),
        Err(MacError::Zero(_))
    ));
}

// ---- real tap tests (root) ----

const ETH_P_ALL: u16 = 0x0003;

/// Runs `f` in a new thread inside a fresh network namespace holding an up tap `name`
/// (created persistent, so the device under test attaches to an existing tap as in
/// production) and a packet socket bound to it. Prints SKIPPED without root or /dev/net/tun.
fn in_netns_with_tap(test: &str, f: impl FnOnce(&str, OwnedFd) + Send + 'static) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        husk_skip::missing(test, "needs root (network namespaces and taps)");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        husk_skip::missing(test, "no /dev/net/tun");
        return;
    }
    let test = test.to_string();
    std::thread::spawn(move || {
        // Only this thread moves: the namespace dies with it and its fds.
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            husk_skip::missing(&test, &format!("unshare(CLONE_NEWNET): {e}"));
            return;
        }
        let name = "htap0";
        create_persistent_tap(name);
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        set_up(name);
        let sock = packet_socket(name);
        f(name, sock);
    })
    .join()
    .unwrap();
}

/// `struct ifreq` for the interface-flag ioctls (SIOCGIFFLAGS/SIOCSIFFLAGS).
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str) -> IfReqFlags {
    let mut r = IfReqFlags {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

fn create_persistent_tap(name: &str) {
    let f = husk_netdev::open_tap(name).unwrap();
    // SAFETY: TUNSETPERSIST takes an int by value.
    assert_eq!(
        unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) },
        0
    );
}

fn set_up(name: &str) {
    // SAFETY: plain socket/ioctl calls on our own fd and ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(s >= 0);
        let mut r = ifreq(name);
        assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut r), 0);
        r.flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, &mut r), 0);
        libc::close(s);
    }
}

/// Attaches to the tap and waits until the kernel has its carrier up (done asynchronously
/// after the attach; frames sent before that are dropped by the inactive qdisc).
fn open_tap(name: &str) -> Tap {
    let tap = Tap::open(name).unwrap();
    for _ in 0..500 {
        // SAFETY: plain socket/ioctl calls on our own fd and ifreq.
        let running = unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            let mut r = ifreq(name);
            let ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut r) == 0;
            libc::close(s);
            ok && i32::from(r.flags) & libc::IFF_RUNNING != 0
        };
        if running {
            std::thread::sleep(Duration::from_millis(20));
            return tap;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("tap {name} never got its carrier");
}

fn packet_socket(name: &str) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: plain socket calls with valid arguments; the fd is owned right away.
    unsafe {
        let s = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        );
        assert!(s >= 0, "{}", io::Error::last_os_error());
        let sock = OwnedFd::from_raw_fd(s);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = libc::if_nametoindex(cname.as_ptr()) as i32;
        assert_eq!(
            libc::bind(
                s,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32
            ),
            0
        );
        sock
    }
}

/// Next frame with our test ethertype on the packet socket (other traffic is skipped).
fn recv_test_frame(sock: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 70000];
    for _ in 0..100 {
        assert!(readable(sock.as_raw_fd(), 5000), "no frame on the tap");
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(n > 0);
        let f = &buf[..n as usize];
        if f.len() >= 14 && f[12..14] == [0x88, 0xb5] {
            return f.to_vec();
        }
    }
    panic!("test frame never arrived");
}

fn send_on_wire(sock: &OwnedFd, f: &[u8]) {
    // SAFETY: send from our buffer.
    let n = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n, f.len() as isize, "{}", io::Error::last_os_error());
}

/// Receives RX frames until one carries the test ethertype; returns (header, frame).
fn guest_recv_test_frame(
    ctx: &mut Ctx<Tap>,
    addrs: &std::collections::HashMap<u16, u64>,
) -> (Vec<u8>, Vec<u8>) {
    for _ in 0..50 {
        if let Some((head, len)) = ctx.rx.pop_used(&ctx.mem) {
            let got = ctx.read(addrs[&head], len as usize);
            let (hdr, f) = got.split_at(12);
            if f.len() >= 14 && f[12..14] == [0x88, 0xb5] {
                return (hdr.to_vec(), f.to_vec());
            }
            continue;
        }
        assert!(
            readable(ctx.dev.backend_fd(), 5000),
            "tap never became readable"
        );
        ctx.rx();
    }
    panic!("test frame never reached the guest");
}

#[test]
fn tap_guest_tx_reaches_the_tap() {
    in_netns_with_tap("tap_guest_tx_reaches_the_tap", |name, sock| {
        let tap = open_tap(name);
        assert_eq!(tap.name(), name);
        let mut ctx = Ctx::new(tap, F_V1 | F_MRG | F_EVENT_IDX);
        ctx.txq.set_event_idx(true);
        let f = frame(600, 1);
        ctx.guest_send(&with_hdr(12, &f), &[12]);
        ctx.tx();
        assert_eq!(recv_test_frame(&sock), f);
        assert_eq!(ctx.dev.stats().tx_frames, 1);
        assert_eq!(ctx.dev.stats().tx_errors, 0);
    });
}

#[test]
fn tap_frames_reach_the_guest_with_a_clean_header() {
    in_netns_with_tap(
        "tap_frames_reach_the_guest_with_a_clean_header",
        |name, sock| {
            let mut ctx = Ctx::new(open_tap(name), F_V1 | F_MRG);
            let mut addrs = std::collections::HashMap::new();
            for _ in 0..8 {
                let (h, a) = ctx.post_rx(2048);
                addrs.insert(h, a);
            }
            ctx.kick_rx();
            let f = frame(900, 2);
            send_on_wire(&sock, &f);
            let (hdr, got) = guest_recv_test_frame(&mut ctx, &addrs);
            assert_eq!(got, f);
            // No offloads negotiated: no flags, no GSO, one buffer.
            assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        },
    );
}

#[test]
fn tap_rx_without_buffers_pauses_then_resumes() {
    in_netns_with_tap(
        "tap_rx_without_buffers_pauses_then_resumes",
        |name, sock| {
            let mut ctx = Ctx::new(open_tap(name), F_V1 | F_MRG | F_EVENT_IDX);
            ctx.rxq.set_event_idx(true);
            let f = frame(500, 3);
            send_on_wire(&sock, &f);
            assert!(readable(ctx.dev.backend_fd(), 5000));
            assert!(!ctx.rx());
            assert!(!ctx.dev.is_rx_armed(), "no buffers: the tap is not polled");
            assert!(
                !readable(ctx.dev.backend_fd(), 100),
                "poll fd quiet: no spinning"
            );
            let mut addrs = std::collections::HashMap::new();
            for _ in 0..8 {
                let (h, a) = ctx.post_rx(2048);
                addrs.insert(h, a);
            }
            ctx.kick_rx();
            let (_, got) = guest_recv_test_frame(&mut ctx, &addrs);
            assert_eq!(got, f);
        },
    );
}

#[test]
fn tap_open_errors_name_the_problem() {
    in_netns_with_tap("tap_open_errors_name_the_problem", |name, _sock| {
        let e = Tap::open("nosuchtap0").unwrap_err().to_string();
        assert!(e.contains("nosuchtap0"), "{e}");
        assert!(matches!(Tap::open("a/b"), Err(TapError::Name(_))));
        assert!(matches!(
            Tap::open("0123456789abcdef"),
            Err(TapError::Name(_))
        ));
        // A second attach to a single-queue tap in use fails cleanly.
        let _first = Tap::open(name).unwrap();
        assert!(matches!(Tap::open(name), Err(TapError::Attach { .. })));
        // --tap-fd: a non-tun fd is refused.
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(f)),
            Err(TapError::NotTunFd { .. })
        ));
        assert!(tap::tap_from_raw_fd(-1).is_err());
    });
}

#[test]
fn tap_fd_is_adopted() {
    in_netns_with_tap("tap_fd_is_adopted", |name, sock| {
        let tap = Tap::from_fd(husk_netdev::open_tap(name).unwrap()).unwrap();
        assert_eq!(tap.name(), name);
        let mut ctx = Ctx::new(tap, F_V1 | F_MRG);
        let f = frame(64, 5);
        ctx.guest_send(&with_hdr(12, &f), &[]);
        ctx.tx();
        assert_eq!(recv_test_frame(&sock), f);
    });
}
