//! A fake virtio-fs driver for the device tests: guest memory with the high-priority and one
//! request queue, and FUSE requests laid out the way Linux's virtio_fs driver does (the
//! request in device-readable descriptors, then the reply buffers).

use std::ffi::CString;
use std::mem::size_of;
use std::path::PathBuf;

use fuse_backend_rs::abi::fuse_abi::*;
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::{FsConfig, FsDevice};
use crate::devices::virtio::test_utils::{Desc, Ring};

const QSIZE: u16 = 256;
pub const MEM_SIZE: usize = 64 << 20;
const HIPRIO_RING: u64 = 0x1_0000;
const REQ_RING: u64 = 0x2_0000;
const BUF_START: u64 = 0x10_0000;

pub const ROOT: u64 = 1;
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;

/// A reply as the driver sees it.
#[derive(Debug)]
pub struct Reply {
    /// The out header's error (0 or a negative errno); `None` if nothing was written.
    pub error: Option<i32>,
    pub unique: u64,
    /// Bytes after the out header, as many as the header's `len` says.
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(&self) -> &[u8] {
        assert_eq!(self.error, Some(0), "reply {self:?}");
        &self.body
    }

    pub fn errno(&self) -> i32 {
        -self
            .error
            .unwrap_or_else(|| panic!("no reply written: {self:?}"))
    }

    pub fn obj<T: ByteValued>(&self) -> T {
        let body = self.ok();
        T::from_slice(&body[..size_of::<T>()]).copied().unwrap()
    }
}

/// The guest side: memory, two queues, a bump allocator, and FUSE request helpers.
pub struct FsGuest {
    pub mem: GuestMemoryMmap,
    hiprio: Ring,
    req: Ring,
    pub hiprioq: Queue,
    pub reqq: Queue,
    next_buf: u64,
    next_unique: u64,
    /// Interrupts the device asked for on the request queue.
    pub irqs: usize,
}

impl Default for FsGuest {
    fn default() -> Self {
        Self::new()
    }
}

impl FsGuest {
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (hiprio, hiprioq) = Ring::new(HIPRIO_RING, QSIZE);
        let (req, reqq) = Ring::new(REQ_RING, QSIZE);
        FsGuest {
            mem,
            hiprio,
            req,
            hiprioq,
            reqq,
            next_buf: BUF_START,
            next_unique: 1,
            irqs: 0,
        }
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buf;
        self.next_buf += (len.max(1) + 0xfff) & !0xfff;
        // Recycle the buffer area; tests never keep this many buffers outstanding.
        if self.next_buf > MEM_SIZE as u64 - (4 << 20) {
            self.next_buf = BUF_START;
        }
        addr
    }

    /// Copies `bytes` into fresh guest memory and describes them.
    pub fn buf(&mut self, bytes: &[u8], write: bool) -> Desc {
        let addr = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        Desc {
            addr,
            len: bytes.len() as u32,
            write,
        }
    }

    /// Queues a chain on the request queue, runs the device, and returns what came back for
    /// it (`None` if the device returned nothing yet).
    pub fn run_chain(&mut self, dev: &FsDevice, descs: &[Desc]) -> Option<(u16, u32)> {
        let head = self.req.add_chain(&self.mem, descs);
        if dev.process_queue(&self.mem, &mut self.reqq).unwrap() {
            self.irqs += 1;
        }
        let (used_head, len) = self.req.pop_used(&self.mem)?;
        assert_eq!(used_head, head);
        Some((used_head, len))
    }

    /// Queues a chain on the high-priority queue and runs the device.
    pub fn run_hiprio(&mut self, dev: &FsDevice, descs: &[Desc]) -> Option<(u16, u32)> {
        self.hiprio.add_chain(&self.mem, descs);
        dev.process_queue(&self.mem, &mut self.hiprioq).unwrap();
        self.hiprio.pop_used(&self.mem)
    }

    pub fn header(&mut self, opcode: Opcode, nodeid: u64, body_len: usize) -> InHeader {
        let unique = self.next_unique;
        self.next_unique += 2;
        InHeader {
            len: (size_of::<InHeader>() + body_len) as u32,
            opcode: opcode as u32,
            unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        }
    }

    /// Sends one request (header + body in one descriptor, `reply_cap` bytes of reply buffer)
    /// and returns the reply.
    pub fn request(
        &mut self,
        dev: &FsDevice,
        opcode: Opcode,
        nodeid: u64,
        body: &[u8],
        reply_cap: usize,
    ) -> Reply {
        let hdr = self.header(opcode, nodeid, body.len());
        self.request_with(dev, hdr, body, reply_cap)
    }

    /// Like [`FsGuest::request`] with a header the test made (any uid, any length).
    pub fn request_with(
        &mut self,
        dev: &FsDevice,
        hdr: InHeader,
        body: &[u8],
        reply_cap: usize,
    ) -> Reply {
        let mut bytes = hdr.as_slice().to_vec();
        bytes.extend_from_slice(body);
        let input = self.buf(&bytes, false);
        let output = self.buf(&vec![0xa5u8; reply_cap], true);
        let (_, used_len) = self
            .run_chain(dev, &[input, output])
            .expect("device returned no buffer");
        self.read_reply(output.addr, used_len)
    }

    pub fn read_reply(&self, addr: u64, used_len: u32) -> Reply {
        if (used_len as usize) < size_of::<OutHeader>() {
            return Reply {
                error: None,
                unique: 0,
                body: Vec::new(),
            };
        }
        let out: OutHeader = self.mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(out.len, used_len, "out header length vs used length");
        let mut body = vec![0u8; out.len as usize - size_of::<OutHeader>()];
        self.mem
            .read_slice(
                &mut body,
                GuestAddress(addr + size_of::<OutHeader>() as u64),
            )
            .unwrap();
        Reply {
            error: Some(out.error),
            unique: out.unique,
            body,
        }
    }

    pub fn init(&mut self, dev: &FsDevice) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 128 << 10,
            // What Linux 6.1 offers, minus INIT_EXT (no second flags word here).
            flags: (FsOptions::ASYNC_READ
                | FsOptions::BIG_WRITES
                | FsOptions::MAX_PAGES
                | FsOptions::PARALLEL_DIROPS
                | FsOptions::WRITEBACK_CACHE
                | FsOptions::POSIX_LOCKS
                | FsOptions::DO_READDIRPLUS)
                .bits() as u32,
        };
        self.request(dev, Opcode::Init, 0, init.as_slice(), 256)
            .obj()
    }

    pub fn lookup(&mut self, dev: &FsDevice, parent: u64, name: &[u8]) -> Result<EntryOut, i32> {
        let r = self.request(dev, Opcode::Lookup, parent, &cstr(name), 256);
        match r.error {
            Some(0) => Ok(r.obj()),
            _ => Err(r.errno()),
        }
    }

    pub fn getattr(&mut self, dev: &FsDevice, ino: u64) -> Result<Attr, i32> {
        let body = GetattrIn::default();
        let r = self.request(dev, Opcode::Getattr, ino, body.as_slice(), 256);
        match r.error {
            Some(0) => Ok(r.obj::<AttrOut>().attr),
            _ => Err(r.errno()),
        }
    }

    pub fn setattr(&mut self, dev: &FsDevice, ino: u64, set: SetattrIn) -> Result<Attr, i32> {
        let r = self.request(dev, Opcode::Setattr, ino, set.as_slice(), 256);
        match r.error {
            Some(0) => Ok(r.obj::<AttrOut>().attr),
            _ => Err(r.errno()),
        }
    }

    pub fn open(&mut self, dev: &FsDevice, ino: u64, flags: i32) -> Result<u64, i32> {
        let body = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let r = self.request(dev, Opcode::Open, ino, body.as_slice(), 256);
        match r.error {
            Some(0) => Ok(r.obj::<OpenOut>().fh),
            _ => Err(r.errno()),
        }
    }

    pub fn opendir(&mut self, dev: &FsDevice, ino: u64) -> Result<u64, i32> {
        let body = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let r = self.request(dev, Opcode::Opendir, ino, body.as_slice(), 256);
        match r.error {
            Some(0) => Ok(r.obj::<OpenOut>().fh),
            _ => Err(r.errno()),
        }
    }

    pub fn read(
        &mut self,
        dev: &FsDevice,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, i32> {
        let body = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let r = self.request(
            dev,
            Opcode::Read,
            ino,
            body.as_slice(),
            size as usize + size_of::<OutHeader>(),
        );
        match r.error {
            Some(0) => Ok(r.body),
            _ => Err(r.errno()),
        }
    }

    pub fn write(
        &mut self,
        dev: &FsDevice,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, i32> {
        let mut body = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        }
        .as_slice()
        .to_vec();
        body.extend_from_slice(data);
        let r = self.request(dev, Opcode::Write, ino, &body, 256);
        match r.error {
            Some(0) => Ok(r.obj::<WriteOut>().size),
            _ => Err(r.errno()),
        }
    }

    pub fn release(&mut self, dev: &FsDevice, ino: u64, fh: u64, dir: bool) {
        let body = ReleaseIn {
            fh,
            ..Default::default()
        };
        let op = if dir {
            Opcode::Releasedir
        } else {
            Opcode::Release
        };
        self.request(dev, op, ino, body.as_slice(), 256).ok();
    }

    pub fn create(
        &mut self,
        dev: &FsDevice,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<(EntryOut, u64), i32> {
        self.create_as(dev, parent, name, mode, flags, 0, 0)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create_as(
        &mut self,
        dev: &FsDevice,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> Result<(EntryOut, u64), i32> {
        let mut body = CreateIn {
            flags: flags as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        }
        .as_slice()
        .to_vec();
        body.extend_from_slice(&cstr(name));
        let mut hdr = self.header(Opcode::Create, parent, body.len());
        hdr.uid = uid;
        hdr.gid = gid;
        let r = self.request_with(dev, hdr, &body, 512);
        match r.error {
            Some(0) => {
                let entry = EntryOut::from_slice(&r.body[..size_of::<EntryOut>()])
                    .copied()
                    .unwrap();
                let open = OpenOut::from_slice(
                    &r.body[size_of::<EntryOut>()..size_of::<EntryOut>() + size_of::<OpenOut>()],
                )
                .copied()
                .unwrap();
                Ok((entry, open.fh))
            }
            _ => Err(r.errno()),
        }
    }

    pub fn mkdir(
        &mut self,
        dev: &FsDevice,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> Result<EntryOut, i32> {
        let mut body = MkdirIn { mode, umask: 0 }.as_slice().to_vec();
        body.extend_from_slice(&cstr(name));
        let r = self.request(dev, Opcode::Mkdir, parent, &body, 256);
        match r.error {
            Some(0) => Ok(r.obj()),
            _ => Err(r.errno()),
        }
    }

    pub fn symlink(
        &mut self,
        dev: &FsDevice,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> Result<EntryOut, i32> {
        let mut body = cstr(name);
        body.extend_from_slice(&cstr(target));
        let r = self.request(dev, Opcode::Symlink, parent, &body, 256);
        match r.error {
            Some(0) => Ok(r.obj()),
            _ => Err(r.errno()),
        }
    }

    pub fn unlink(&mut self, dev: &FsDevice, parent: u64, name: &[u8]) -> Result<(), i32> {
        let r = self.request(dev, Opcode::Unlink, parent, &cstr(name), 256);
        match r.error {
            Some(0) => Ok(()),
            _ => Err(r.errno()),
        }
    }

    pub fn rmdir(&mut self, dev: &FsDevice, parent: u64, name: &[u8]) -> Result<(), i32> {
        let r = self.request(dev, Opcode::Rmdir, parent, &cstr(name), 256);
        match r.error {
            Some(0) => Ok(()),
            _ => Err(r.errno()),
        }
    }

    pub fn rename(
        &mut self,
        dev: &FsDevice,
        parent: u64,
        old: &[u8],
        newdir: u64,
        new: &[u8],
    ) -> Result<(), i32> {
        let mut body = RenameIn { newdir }.as_slice().to_vec();
        body.extend_from_slice(&cstr(old));
        body.extend_from_slice(&cstr(new));
        let r = self.request(dev, Opcode::Rename, parent, &body, 256);
        match r.error {
            Some(0) => Ok(()),
            _ => Err(r.errno()),
        }
    }

    /// READDIR on an open directory; returns the names.
    pub fn readdir(&mut self, dev: &FsDevice, ino: u64, fh: u64) -> Result<Vec<Vec<u8>>, i32> {
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let body = ReadIn {
                fh,
                offset,
                size: 4096,
                ..Default::default()
            };
            let r = self.request(dev, Opcode::Readdir, ino, body.as_slice(), 4096 + 16);
            if r.error != Some(0) {
                return Err(r.errno());
            }
            if r.body.is_empty() {
                return Ok(names);
            }
            let mut rest = &r.body[..];
            while rest.len() >= size_of::<Dirent>() {
                let d = Dirent::from_slice(&rest[..size_of::<Dirent>()])
                    .copied()
                    .unwrap();
                let name_end = size_of::<Dirent>() + d.namelen as usize;
                names.push(rest[size_of::<Dirent>()..name_end].to_vec());
                offset = d.off;
                let padded = (name_end + 7) & !7;
                rest = &rest[padded.min(rest.len())..];
            }
        }
    }

    /// FORGET on the high-priority queue (no reply).
    pub fn forget(&mut self, dev: &FsDevice, ino: u64, nlookup: u64) {
        let body = ForgetIn { nlookup };
        let hdr = self.header(Opcode::Forget, ino, size_of::<ForgetIn>());
        let mut bytes = hdr.as_slice().to_vec();
        bytes.extend_from_slice(body.as_slice());
        let d = self.buf(&bytes, false);
        let (_, len) = self.run_hiprio(dev, &[d]).expect("forget not returned");
        assert_eq!(len, 0);
    }
}

pub fn cstr(name: &[u8]) -> Vec<u8> {
    CString::new(name).unwrap().into_bytes_with_nul()
}

/// A device over a fresh share, plus a directory outside it for escape tests.
pub struct TestFs {
    pub dev: FsDevice,
    pub guest: FsGuest,
    pub share: PathBuf,
    pub outside: PathBuf,
    /// Keep the directories alive as long as the test.
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl TestFs {
    pub fn new() -> Self {
        Self::with_config(|_| {})
    }

    pub fn with_config(f: impl FnOnce(&mut FsConfig)) -> Self {
        let share = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let mut cfg = FsConfig::new(share.path(), "test");
        f(&mut cfg);
        let dev = FsDevice::new(cfg).unwrap();
        let mut guest = FsGuest::new();
        let init = guest.init(&dev);
        assert_eq!(init.major, 7);
        TestFs {
            dev,
            guest,
            share: share.path().to_path_buf(),
            outside: outside.path().to_path_buf(),
            _dirs: (share, outside),
        }
    }
}
