//! FUSE requests from the guest through `FsDevice::process_queue`: husk's own request checks
//! (`request::check`) and then fuse-backend-rs's server over the passthrough file system, on a
//! fresh shared directory per run (on /dev/shm, so no disk I/O).
//!
//! The share holds a file, a directory, a symlink to a file *outside* the share, and an
//! absolute symlink; next to the share sits a sentinel file. After every run the sentinel
//! must be unchanged and nothing may have appeared beside the share: a guest must never reach
//! outside it. Every reply must fit the buffers the guest gave, and a reply to a structured
//! request must carry that request's `unique` and a length matching the used length.
//!
//! Input: one config byte (cache mode, xattr), then requests (see `request` below).
//! FALLOCATE is never sent: on a real disk it allocates what the guest asks for, which a fuzzer
//! would turn into filling the host's disk; it is not a parser concern.
#![no_main]
// Test code: an unwrap on the harness's own set-up (temporary files, guest memory) is an
// assertion; a panic anywhere is the finding libFuzzer reports.

use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use husk_fuzz::*;
use husk_vmm::devices::virtio::fs::{CacheMode, FsConfig, FsDevice};
use libfuzzer_sys::fuzz_target;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

const HIPRIO_RING: u64 = 0x1000;
const REQ_RING: u64 = 0x8000;
const QSIZE: u16 = 32;
const SENTINEL: &[u8] = b"outside the share: the guest must never change this\n";

const FALLOCATE: u32 = 43;
/// Opcodes the fuzzer picks from by index (anything else comes in raw).
const OPCODES: [u32; 44] = [
    26, // INIT first: most seeds start with it
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 27, 28, 29,
    30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 44, 45, 46, 47,
];

fn base() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("tempdir")
    })
    .path()
}

/// A fresh `<base>/run/{share/..., sentinel}`; returns (run dir, share).
fn fresh_share() -> (PathBuf, PathBuf) {
    let run = base().join("run");
    if run.exists() {
        std::fs::remove_dir_all(&run).expect("clean up the last share");
    }
    let share = run.join("share");
    std::fs::create_dir_all(share.join("dir")).unwrap();
    std::fs::write(share.join("file"), b"hello from the share\n").unwrap();
    std::fs::write(share.join("dir/inner"), vec![0x5a; 8192]).unwrap();
    std::fs::write(run.join("sentinel"), SENTINEL).unwrap();
    std::os::unix::fs::symlink("../sentinel", share.join("link")).unwrap();
    std::os::unix::fs::symlink(run.join("sentinel"), share.join("abs")).unwrap();
    (run, share)
}

fn check_outside(run: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["sentinel", "share"],
        "something appeared outside the share"
    );
    let md = std::fs::symlink_metadata(run.join("sentinel")).unwrap();
    assert!(md.file_type().is_file(), "sentinel replaced");
    assert_eq!(
        std::fs::read(run.join("sentinel")).unwrap(),
        SENTINEL,
        "sentinel changed"
    );
}

struct Guest {
    mem: GuestMemoryMmap,
    alloc: Alloc,
    rings: [Ring; 2],
    queues: [virtio_queue::Queue; 2],
    next_unique: u64,
    /// Raw ring writes happened, or a chain let the device write over the rings: chains may
    /// have been served twice into the same buffers, so only the length bound is checked from
    /// then on.
    raw_used: bool,
    prints: Footprints,
}

/// A request the target built, to check its reply.
struct Sent {
    head: u16,
    unique: u64,
    expects_reply: bool,
    /// Writable descriptors (addr, len), in order, and their total.
    reply: Vec<(u64, u32)>,
    cap: u64,
}

impl Guest {
    fn nodeid(inp: &mut Input<'_>) -> u64 {
        match inp.u8() {
            0..=99 => 1,
            b @ 100..=239 => u64::from(b - 98), // 2..=141: inodes the server hands out
            240 => 0,
            _ => inp.u64(),
        }
    }

    fn request(&mut self, inp: &mut Input<'_>, sent: &mut Vec<Sent>) {
        let sel = inp.u8();
        let mut opcode = if sel < 200 {
            OPCODES[usize::from(sel) % OPCODES.len()]
        } else {
            inp.u32()
        };
        if opcode == FALLOCATE {
            opcode = 3;
        }
        let nodeid = Self::nodeid(inp);
        let flags = inp.u8();
        let (uid, gid) = if flags & 1 != 0 {
            (inp.u32(), inp.u32())
        } else {
            (0, 0)
        };
        let body = inp.blob(16384).to_vec();
        let unique = self.next_unique;
        self.next_unique += 2;
        let len = if flags & 2 != 0 {
            inp.u32()
        } else {
            (size_of::<InHeader>() + body.len()) as u32
        };
        let hdr = InHeader {
            len,
            opcode,
            unique,
            nodeid,
            uid,
            gid,
            pid: 1,
            padding: 0,
        };
        let mut bytes = hdr.as_slice().to_vec();
        bytes.extend_from_slice(&body);
        if flags & 4 != 0 {
            bytes.truncate(usize::from(inp.u16()) % (bytes.len() + 1));
        }
        // Request in 1..=4 readable descriptors, reply in 0..=3 writable ones.
        let mut descs = Vec::new();
        let mut off = 0;
        for n in split_lens(inp, bytes.len(), 1 + usize::from((flags >> 3) & 3)) {
            let addr = self.alloc.put(&self.mem, &bytes[off..off + n]);
            descs.push(Desc {
                addr,
                len: n as u32,
                write: false,
            });
            off += n;
        }
        let reply_cap = match inp.u8() % 4 {
            0 => 4096 + 16,
            1 => u32::from(inp.u16()),
            2 => 16,
            _ => (1 << 20) + 16,
        };
        let mut reply = Vec::new();
        for n in split_lens(inp, reply_cap as usize, 1 + usize::from((flags >> 5) & 3)) {
            let addr = self.alloc.alloc(n as u64);
            reply.push((addr, n as u32));
            descs.push(Desc {
                addr,
                len: n as u32,
                write: true,
            });
        }
        let laid = descs.clone();
        let mut structured = true;
        if flags & 0x80 != 0 && !descs.is_empty() {
            // Break one descriptor: flip its direction or point it anywhere.
            let i = usize::from(inp.u8()) % descs.len();
            if inp.bool() {
                descs[i].write = !descs[i].write;
            } else {
                descs[i].addr = fuzz_addr(inp);
            }
            structured = false;
        }
        if writes_rings(&descs) {
            self.raw_used = true;
        }
        let q = usize::from(inp.u8() & 1);
        let indirect = inp.u8() % 8 == 0;
        let table = indirect.then(|| self.alloc.alloc(16 * descs.len() as u64));
        let head = match table {
            Some(table) => self.rings[q].add_indirect(&self.mem, table, &descs),
            None => self.rings[q].add_chain(&self.mem, &descs),
        };
        let Some(head) = head else {
            // Not published, but its buffers were written: stop checking what they overlap.
            let clash = self.prints.clash(&footprint(&descs, &laid, table));
            sent.retain(|s| !clash.contains(&(1, s.head)));
            return;
        };
        let clash = self.prints.add((q, head), footprint(&descs, &laid, table));
        sent.retain(|s| !(s.head == head && q == 1) && !clash.contains(&(1, s.head)));
        if let (true, 1, true) = (structured, q, clash.is_empty()) {
            let cap = reply.iter().map(|&(_, n)| u64::from(n)).sum();
            sent.push(Sent {
                head,
                unique,
                expects_reply: opcode != 2 && opcode != 42 && opcode != 36,
                reply,
                cap,
            });
        }
    }

    fn raw(&mut self, inp: &mut Input<'_>) {
        self.raw_used = true;
        let q = usize::from(inp.u8() & 1);
        for _ in 0..(inp.u8() % 4) {
            self.rings[q].raw_desc(&self.mem, inp);
        }
        match inp.u8() % 8 {
            0 => self.rings[q].raw_avail_idx(&self.mem, inp.u16()),
            1 => self.rings[q].raw_avail_flags(&self.mem, inp.u16(), inp.u16()),
            _ => {
                let head = QSIZE / 2 + inp.u16() % (QSIZE / 2);
                self.rings[q].raw_publish(&self.mem, head);
            }
        }
    }

    /// Reads the start of the reply buffers.
    fn read_reply(&self, s: &Sent, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, n) in &s.reply {
            let take = left.min(n as usize);
            let mut b = vec![0u8; take];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
            left -= take;
            if left == 0 {
                break;
            }
        }
        out
    }
}

fn process(dev: &FsDevice, g: &mut Guest, sent: &mut Vec<Sent>) {
    for q in 0..2 {
        // A queue error stops the device in a front end; it is not a bug in itself.
        let _ = dev.process_queue(&g.mem, &mut g.queues[q]);
    }
    let mut used = Vec::new();
    let mut used0 = Vec::new();
    g.rings[0].drain_used(&g.mem, |id, _| used0.push(id));
    for id in used0 {
        g.prints.remove((0, id as u16));
    }
    g.rings[1].drain_used(&g.mem, |id, len| used.push((id, len)));
    for (id, len) in used {
        g.prints.remove((1, id as u16));
        let Some(i) = sent.iter().position(|s| u32::from(s.head) == id) else {
            continue;
        };
        let s = sent.swap_remove(i);
        assert!(
            u64::from(len) <= s.cap,
            "used length {len} beyond the reply buffers {}",
            s.cap
        );
        if len == 0 || g.raw_used {
            continue;
        }
        assert!(s.expects_reply, "reply to an opcode that gets none");
        assert!(
            len as usize >= size_of::<OutHeader>(),
            "used length {len} shorter than a reply"
        );
        let bytes = g.read_reply(&s, len);
        let out = OutHeader::from_slice(&bytes[..size_of::<OutHeader>()])
            .copied()
            .unwrap();
        assert_eq!(
            out.unique, s.unique,
            "reply carries another request's unique"
        );
        assert_eq!(out.len, len, "reply header length vs used length");
        assert!(
            out.error <= 0 && out.error > -4096,
            "bad errno in reply: {}",
            out.error
        );
    }
}

fuzz_target!(|data: &[u8]| {
    ignore_sigpipe();
    let mut inp = Input::new(data);
    let cfg_byte = inp.u8();
    let (run, share) = fresh_share();
    {
        let mut cfg = FsConfig::new(&share, "fuzz");
        cfg.cache = [
            CacheMode::Auto,
            CacheMode::Never,
            CacheMode::Always,
            CacheMode::Auto,
        ][usize::from(cfg_byte & 3)];
        cfg.xattr = cfg_byte & 4 != 0;
        let dev = FsDevice::new(cfg).expect("FsDevice");
        let mem = guest_memory();
        let event_idx = cfg_byte & 8 != 0;
        let (r0, q0) = Ring::new(HIPRIO_RING, QSIZE, event_idx);
        let (r1, q1) = Ring::new(REQ_RING, QSIZE, event_idx);
        let mut g = Guest {
            mem,
            alloc: Alloc::default(),
            rings: [r0, r1],
            queues: [q0, q1],
            next_unique: 1,
            raw_used: false,
            prints: Footprints::default(),
        };
        let mut sent = Vec::new();
        let mut ops = 0;
        while !inp.is_empty() && ops < 64 {
            ops += 1;
            match inp.u8() % 8 {
                0..=4 => g.request(&mut inp, &mut sent),
                5 => g.raw(&mut inp),
                6 => process(&dev, &mut g, &mut sent),
                _ => {
                    if inp.u8() % 8 == 0 {
                        dev.reset();
                    } else {
                        process(&dev, &mut g, &mut sent);
                    }
                }
            }
        }
        process(&dev, &mut g, &mut sent);
    }
    check_outside(&run);
});
