//! virtio-fs device tests: a fake driver sends FUSE requests through a split queue in guest
//! memory; the share is a temp directory, with a second one "outside" for escape attempts.

use std::fs;
use std::mem::size_of;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use fuse_backend_rs::abi::fuse_abi::*;
use vm_memory::ByteValued;

use super::defs::*;
use super::test_utils::*;
use super::*;
use crate::devices::virtio::test_utils::Desc;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn init_negotiates_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let dev = FsDevice::new(FsConfig::new(dir.path(), "t")).unwrap();
    let mut g = FsGuest::new();
    let out = g.init(&dev);
    assert_eq!(out.major, 7);
    // 1 MiB writes, not the 4 KiB PassthroughFs alone would give; no writeback cache, no
    // locks: those need more from the file system than it does.
    assert_eq!(out.max_write, MAX_IO_SIZE);
    assert_eq!(out.max_pages, 256);
    let flags = FsOptions::from_bits_truncate(u64::from(out.flags));
    assert!(flags.contains(FsOptions::BIG_WRITES | FsOptions::MAX_PAGES | FsOptions::ASYNC_READ));
    assert!(!flags.intersects(FsOptions::WRITEBACK_CACHE | FsOptions::POSIX_LOCKS));
    assert!(g.irqs >= 1, "a reply must interrupt the guest");
}

#[test]
fn file_lifecycle() {
    let mut t = TestFs::new();
    let (dev, g) = (&t.dev, &mut t.guest);

    let (entry, fh) = g
        .create(dev, ROOT, b"hello.txt", 0o644, libc::O_RDWR)
        .unwrap();
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(
        g.write(dev, entry.nodeid, fh, 0, b"hello, world").unwrap(),
        12
    );
    assert_eq!(g.read(dev, entry.nodeid, fh, 7, 100).unwrap(), b"world");
    g.release(dev, entry.nodeid, fh, false);
    assert_eq!(
        fs::read(t.share.join("hello.txt")).unwrap(),
        b"hello, world"
    );

    // LOOKUP and GETATTR see the same inode; OPEN of a host-made file reads its contents.
    let again = g.lookup(dev, ROOT, b"hello.txt").unwrap();
    assert_eq!(again.nodeid, entry.nodeid);
    assert_eq!(g.getattr(dev, entry.nodeid).unwrap().size, 12);
    fs::write(t.share.join("host.txt"), b"from the host").unwrap();
    let host = g.lookup(dev, ROOT, b"host.txt").unwrap();
    let fh = g.open(dev, host.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(
        g.read(dev, host.nodeid, fh, 0, 4096).unwrap(),
        b"from the host"
    );
    g.release(dev, host.nodeid, fh, false);

    // SETATTR: truncate and chmod.
    let set = SetattrIn {
        valid: FATTR_SIZE | FATTR_MODE,
        size: 5,
        mode: 0o600,
        ..Default::default()
    };
    let attr = g.setattr(dev, entry.nodeid, set).unwrap();
    assert_eq!(attr.size, 5);
    assert_eq!(attr.mode & 0o777, 0o600);
    let md = fs::metadata(t.share.join("hello.txt")).unwrap();
    assert_eq!(md.len(), 5);
    assert_eq!(md.permissions().mode() & 0o777, 0o600);

    // MKDIR, RENAME into it, READDIR.
    let sub = g.mkdir(dev, ROOT, b"sub", 0o755).unwrap();
    assert_eq!(sub.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    g.rename(dev, ROOT, b"hello.txt", sub.nodeid, b"moved.txt")
        .unwrap();
    assert!(t.share.join("sub/moved.txt").exists());
    assert!(!t.share.join("hello.txt").exists());
    let dh = g.opendir(dev, sub.nodeid).unwrap();
    let mut names = g.readdir(dev, sub.nodeid, dh).unwrap();
    names.retain(|n| n != b"." && n != b"..");
    assert_eq!(names, vec![b"moved.txt".to_vec()]);
    g.release(dev, sub.nodeid, dh, true);

    // UNLINK, RMDIR.
    assert_eq!(g.rmdir(dev, ROOT, b"sub"), Err(libc::ENOTEMPTY));
    g.unlink(dev, sub.nodeid, b"moved.txt").unwrap();
    assert_eq!(
        g.lookup(dev, sub.nodeid, b"moved.txt").unwrap_err(),
        libc::ENOENT
    );
    g.rmdir(dev, ROOT, b"sub").unwrap();
    assert!(!t.share.join("sub").exists());

    // FORGET on the high-priority queue; the inode is gone afterwards.
    g.forget(dev, host.nodeid, 2);
    assert_eq!(g.getattr(dev, host.nodeid).unwrap_err(), libc::EBADF);
}

#[test]
fn many_requests_through_a_small_ring() {
    // More requests than ring slots: the ring wraps and every request is answered.
    let mut t = TestFs::new();
    let (dev, g) = (&t.dev, &mut t.guest);
    for i in 0..600 {
        let name = format!("f{i}");
        let (e, fh) = g
            .create(dev, ROOT, name.as_bytes(), 0o644, libc::O_WRONLY)
            .unwrap();
        g.release(dev, e.nodeid, fh, false);
        g.unlink(dev, ROOT, name.as_bytes()).unwrap();
        g.forget(dev, e.nodeid, 1);
    }
    assert_eq!(fs::read_dir(t.share).unwrap().count(), 0);
}

#[test]
fn new_files_belong_to_the_requester() {
    if !is_root() {
        eprintln!("skipped: needs root to switch credentials");
        return;
    }
    let mut t = TestFs::new();
    fs::set_permissions(&t.share, fs::Permissions::from_mode(0o1777)).unwrap();
    let (e, fh) = t
        .guest
        .create_as(&t.dev, ROOT, b"mine", 0o644, libc::O_RDWR, 1234, 2345)
        .unwrap();
    assert_eq!((e.attr.uid, e.attr.gid), (1234, 2345));
    t.guest.release(&t.dev, e.nodeid, fh, false);
    let md = fs::metadata(t.share.join("mine")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 2345));
    // The serving thread got its own credentials back.
    // SAFETY: geteuid/getegid have no preconditions.
    assert_eq!(unsafe { (libc::geteuid(), libc::getegid()) }, (0, 0));
}

#[test]
fn dotdot_and_absolute_names_stay_inside() {
    let mut t = TestFs::new();
    let (dev, g) = (&t.dev, &mut t.guest);
    let share_ino = fs::metadata(&t.share).unwrap().ino();

    // `..` at the root is the root.
    let up = g.lookup(dev, ROOT, b"..").unwrap();
    assert_eq!(up.nodeid, ROOT);
    assert_eq!(up.attr.ino, share_ino);
    let up2 = g.lookup(dev, up.nodeid, b"..").unwrap();
    assert_eq!(up2.attr.ino, share_ino);
    // `..` from a subdirectory is the root, and `..` again stays there.
    let sub = g.mkdir(dev, ROOT, b"sub", 0o755).unwrap();
    let parent = g.lookup(dev, sub.nodeid, b"..").unwrap();
    assert_eq!(parent.nodeid, ROOT);

    // Names with a slash never resolve: absolute or relative paths.
    for name in [
        &b"/etc"[..],
        b"/etc/passwd",
        b"../..",
        b"../../etc",
        b"sub/../..",
    ] {
        assert_eq!(
            g.lookup(dev, ROOT, name).unwrap_err(),
            libc::EINVAL,
            "{name:?}"
        );
    }
    // Creating names can't use `.`, `..` or slashes either.
    let escape = t.outside.clone();
    let escape_name = format!("{}/planted", escape.display());
    for name in [&b".."[..], b".", b"../planted", escape_name.as_bytes()] {
        assert_eq!(g.mkdir(dev, ROOT, name, 0o755).unwrap_err(), libc::EINVAL);
        assert_eq!(
            g.create(dev, ROOT, name, 0o644, libc::O_RDWR).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(
            g.symlink(dev, ROOT, name, b"/etc").unwrap_err(),
            libc::EINVAL
        );
    }
    assert_eq!(
        g.rename(dev, ROOT, b"sub", ROOT, b"../sub").unwrap_err(),
        libc::EINVAL
    );
    assert_eq!(
        g.rename(dev, ROOT, b"sub", ROOT, escape_name.as_bytes())
            .unwrap_err(),
        libc::EINVAL
    );
    assert_eq!(fs::read_dir(&escape).unwrap().count(), 0);
    assert!(!t.share.parent().unwrap().join("planted").exists());
    assert!(!t.share.parent().unwrap().join("sub").exists());
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let mut t = TestFs::new();
    let outside = t.outside.clone();
    fs::write(outside.join("secret"), b"host secret").unwrap();
    fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    // Explicit modes: the passthrough file system cleared the test process's umask.
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
    // One link made by the guest, one planted on the host, both pointing outside.
    std::os::unix::fs::symlink(&outside, t.share.join("host-link")).unwrap();
    let (dev, g) = (&t.dev, &mut t.guest);
    let target = outside.join("secret");
    let guest_link = g
        .symlink(
            dev,
            ROOT,
            b"guest-link",
            target.as_os_str().as_encoded_bytes(),
        )
        .unwrap();
    let etc_link = g.symlink(dev, ROOT, b"etc", b"/etc").unwrap();
    let host_link = g.lookup(dev, ROOT, b"host-link").unwrap();
    assert_eq!(host_link.attr.mode & libc::S_IFMT, libc::S_IFLNK);

    // Looking up through a link to a directory fails: the link is not a directory here.
    assert!(g.lookup(dev, host_link.nodeid, b"secret").is_err());
    assert!(g.lookup(dev, etc_link.nodeid, b"passwd").is_err());
    assert!(g.opendir(dev, etc_link.nodeid).is_err());
    // Opening a link to a file fails instead of opening the target.
    assert!(g.open(dev, guest_link.nodeid, libc::O_RDONLY).is_err());
    assert!(g.open(dev, guest_link.nodeid, libc::O_RDWR).is_err());
    // SETATTR on the link never reaches the target. (fuse-backend-rs applies mode and times
    // through /proc/self/fd/N; the kernel resolves that magic link to the symlink itself and
    // does not follow the symlink further: these tests pin that down.)
    let set = SetattrIn {
        valid: FATTR_SIZE,
        size: 0,
        ..Default::default()
    };
    assert!(g.setattr(dev, guest_link.nodeid, set).is_err());
    let set = SetattrIn {
        valid: FATTR_MODE,
        mode: 0o777,
        ..Default::default()
    };
    assert_eq!(
        g.setattr(dev, guest_link.nodeid, set).unwrap_err(),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        g.setattr(dev, host_link.nodeid, set).unwrap_err(),
        libc::EOPNOTSUPP
    );
    let outside_mtime = fs::metadata(&outside).unwrap().mtime();
    let set = SetattrIn {
        valid: FATTR_ATIME | FATTR_MTIME,
        atime: 1,
        mtime: 1,
        ..Default::default()
    };
    // `touch -h`: sets the link's own times.
    let attr = g.setattr(dev, host_link.nodeid, set).unwrap();
    assert_eq!(attr.mtime, 1);
    assert_eq!(fs::metadata(&outside).unwrap().mtime(), outside_mtime);
    assert_eq!(
        fs::symlink_metadata(t.share.join("host-link"))
            .unwrap()
            .mtime(),
        1
    );
    let md = fs::metadata(&target).unwrap();
    assert_eq!(md.len(), 11);
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::read(&target).unwrap(), b"host secret");
    let outside_mode = fs::metadata(&outside).unwrap().permissions().mode();
    assert_eq!(outside_mode & 0o777, 0o700);
    // And nothing was created through the links.
    assert!(g
        .create(dev, host_link.nodeid, b"planted", 0o644, libc::O_RDWR)
        .is_err());
    assert!(g.mkdir(dev, etc_link.nodeid, b"planted", 0o755).is_err());
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        1,
        "only the secret"
    );
}

#[test]
fn special_files_are_not_opened_on_the_host() {
    let mut t = TestFs::new();
    let fifo = t.share.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    let (dev, g) = (&t.dev, &mut t.guest);
    let e = g.lookup(dev, ROOT, b"fifo").unwrap();
    // Opening a FIFO on the host would block the device thread; it is refused instead.
    assert_eq!(
        g.open(dev, e.nodeid, libc::O_RDONLY).unwrap_err(),
        libc::EBADF
    );
    let set = SetattrIn {
        valid: FATTR_SIZE,
        ..Default::default()
    };
    assert!(g.setattr(dev, e.nodeid, set).is_err());
    if is_root() {
        // A device node the guest makes (here: /dev/null's numbers) is inert on the host.
        let mut body = MknodIn {
            mode: libc::S_IFCHR | 0o666,
            rdev: libc::makedev(1, 3) as u32,
            ..Default::default()
        }
        .as_slice()
        .to_vec();
        body.extend_from_slice(&cstr(b"null"));
        let r = g.request(dev, Opcode::Mknod, ROOT, &body, 256);
        let node: EntryOut = r.obj();
        assert_eq!(
            g.open(dev, node.nodeid, libc::O_RDWR).unwrap_err(),
            libc::EBADF
        );
    }
}

#[test]
fn malformed_requests_get_errors_and_the_device_goes_on() {
    let mut t = TestFs::new();
    let (dev, g) = (&t.dev, &mut t.guest);

    // Shorter than a FUSE header: dropped, nothing written.
    let d = g.buf(&[1u8; 10], false);
    let out = g.buf(&[0u8; 64], true);
    assert_eq!(g.run_chain(dev, &[d, out]).unwrap().1, 0);

    // Unknown opcode: ENOSYS.
    let mut hdr = g.header(Opcode::Lookup, ROOT, 0);
    hdr.opcode = 9999;
    let r = g.request_with(dev, hdr, &[], 64);
    assert_eq!(r.errno(), libc::ENOSYS);
    assert_eq!(r.unique, hdr.unique);

    // Header length beyond the request, or below the header itself: EINVAL.
    let mut hdr = g.header(Opcode::Lookup, ROOT, 4);
    hdr.len += 100;
    let r = g.request_with(dev, hdr, b"abc\0", 64);
    assert_eq!(r.errno(), libc::EINVAL);
    assert_eq!(r.unique, hdr.unique);
    let mut hdr = g.header(Opcode::Getattr, ROOT, 16);
    hdr.len = 8;
    assert_eq!(
        g.request_with(dev, hdr, GetattrIn::default().as_slice(), 64)
            .errno(),
        libc::EINVAL
    );
    // Body shorter than the opcode's fixed part.
    assert_eq!(
        g.request(dev, Opcode::Mkdir, ROOT, &[0u8; 4], 64).errno(),
        libc::EINVAL
    );
    // A name without its NUL.
    assert_eq!(
        g.request(dev, Opcode::Lookup, ROOT, b"abc", 64).errno(),
        libc::EINVAL
    );
    // Unknown inode.
    assert_eq!(g.getattr(dev, 0xdead_beef).unwrap_err(), libc::EBADF);
    assert_eq!(g.getattr(dev, 0).unwrap_err(), libc::EBADF);

    // Sizes beyond what FUSE_INIT negotiated.
    let read = ReadIn {
        size: MAX_IO_SIZE + 1,
        ..Default::default()
    };
    assert_eq!(
        g.request(dev, Opcode::Readdir, ROOT, read.as_slice(), 64)
            .errno(),
        libc::EINVAL
    );
    let mut get = GetxattrIn {
        size: u32::MAX,
        padding: 0,
    }
    .as_slice()
    .to_vec();
    get.extend_from_slice(b"user.x\0");
    assert_eq!(
        g.request(dev, Opcode::Getxattr, ROOT, &get, 64).errno(),
        libc::E2BIG
    );
    // A request bigger than any FUSE request (aliased descriptors cost the guest nothing).
    let hdr = g.header(Opcode::Write, ROOT, 0);
    let head = g.buf(hdr.as_slice(), false);
    let big = g.alloc(1 << 20);
    let out = g.buf(&[0u8; 64], true);
    let alias = Desc {
        addr: big,
        len: 1 << 20,
        write: false,
    };
    let (_, len) = g.run_chain(dev, &[head, alias, alias, out]).unwrap();
    let r = g.read_reply(out.addr, len);
    assert_eq!(r.errno(), libc::E2BIG);

    // Only device-writable descriptors: no request to read, dropped.
    let w1 = g.buf(&[0u8; 64], true);
    let w2 = g.buf(&[0u8; 64], true);
    assert_eq!(g.run_chain(dev, &[w1, w2]).unwrap().1, 0);

    // Descriptors outside guest memory, readable or writable: dropped.
    let outside = Desc {
        addr: MEM_SIZE as u64 - 8,
        len: 4096,
        write: false,
    };
    assert_eq!(g.run_chain(dev, &[outside]).unwrap().1, 0);
    let hdr = g.header(Opcode::Getattr, ROOT, size_of::<GetattrIn>());
    let mut bytes = hdr.as_slice().to_vec();
    bytes.extend_from_slice(GetattrIn::default().as_slice());
    let input = g.buf(&bytes, false);
    let bad_out = Desc {
        addr: u64::MAX - 4096,
        len: 8192,
        write: true,
    };
    assert_eq!(g.run_chain(dev, &[input, bad_out]).unwrap().1, 0);

    // No reply buffer at all: nothing to write into, returned empty.
    let input = g.buf(&bytes, false);
    assert_eq!(g.run_chain(dev, &[input]).unwrap().1, 0);
    // A reply buffer too small for even the out header.
    let input = g.buf(&bytes, false);
    let tiny = g.buf(&[0u8; 8], true);
    assert_eq!(g.run_chain(dev, &[input, tiny]).unwrap().1, 0);

    // FORGET of unknown inodes and a BATCH_FORGET claiming more entries than it has.
    g.forget(dev, 0x1234, u64::MAX);
    g.forget(dev, ROOT, u64::MAX);
    let hdr = g.header(Opcode::BatchForget, 0, 8);
    let mut bytes = hdr.as_slice().to_vec();
    bytes.extend_from_slice(
        BatchForgetIn {
            count: u32::MAX,
            dummy: 0,
        }
        .as_slice(),
    );
    let d = g.buf(&bytes, false);
    assert_eq!(g.run_hiprio(dev, &[d]).unwrap().1, 0);

    // After all that the device still serves, and the root survived the forgets.
    let (e, fh) = g
        .create(dev, ROOT, b"still-ok", 0o644, libc::O_RDWR)
        .unwrap();
    assert_eq!(g.write(dev, e.nodeid, fh, 0, b"yes").unwrap(), 3);
}

#[test]
fn random_requests_never_panic() {
    // A small deterministic fuzz: random opcodes, node ids, lengths and bodies, some with
    // a valid header length, through every reply-buffer shape.
    let mut t = TestFs::new();
    fs::create_dir(t.share.join("d")).unwrap();
    fs::write(t.share.join("d/f"), b"data").unwrap();
    let (dev, g) = (&t.dev, &mut t.guest);
    let d = g.lookup(dev, ROOT, b"d").unwrap();
    let f = g.lookup(dev, d.nodeid, b"f").unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let opcode = match next() % 4 {
            0 => (next() % 64) as u32,
            _ => [
                1u32, 3, 4, 14, 15, 16, 20, 22, 23, 26, 27, 28, 35, 43, 44, 45,
            ][(next() % 16) as usize],
        };
        // Skip requests that would end the session or rewrite the share root wholesale.
        if opcode == Opcode::Destroy as u32 || opcode == Opcode::Setattr as u32 {
            continue;
        }
        let nodeid = [ROOT, d.nodeid, f.nodeid, next() % 8][(next() % 4) as usize];
        let body_len = (next() % 200) as usize;
        let mut body: Vec<u8> = (0..body_len).map(|_| next() as u8).collect();
        if next() % 2 == 0 && body_len > 0 {
            // Make the body look like "fixed part + name\0" for the name-taking ops.
            body[body_len - 1] = 0;
        }
        let mut hdr = g.header(Opcode::Lookup, nodeid, body.len());
        hdr.opcode = opcode;
        if next() % 4 == 0 {
            hdr.len = next() as u32;
        }
        let reply_cap = [0usize, 8, 16, 64, 4096][(next() % 5) as usize];
        let mut bytes = hdr.as_slice().to_vec();
        bytes.extend_from_slice(&body);
        let input = g.buf(&bytes, false);
        let mut descs = vec![input];
        if reply_cap > 0 {
            descs.push(g.buf(&vec![0u8; reply_cap], true));
        }
        let (_, len) = g.run_chain(dev, &descs).unwrap();
        assert!(len as usize <= reply_cap);
    }
    // Random FORGETs may have dropped `d`: look it up afresh.
    let d = g.lookup(dev, ROOT, b"d").unwrap();
    assert_eq!(g.lookup(dev, d.nodeid, b"f").unwrap().attr.size, 4);
}

#[test]
fn reset_forgets_everything_but_the_root() {
    let mut t = TestFs::new();
    fs::write(t.share.join("f"), b"x").unwrap();
    let (dev, g) = (&t.dev, &mut t.guest);
    let e = g.lookup(dev, ROOT, b"f").unwrap();
    let fh = g.open(dev, e.nodeid, libc::O_RDONLY).unwrap();
    dev.reset();
    assert_eq!(g.getattr(dev, e.nodeid).unwrap_err(), libc::EBADF);
    assert!(g.read(dev, e.nodeid, fh, 0, 1).is_err());
    g.init(dev);
    assert!(g.lookup(dev, ROOT, b"f").is_ok());
}

#[test]
fn config_space_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let tag36 = "a".repeat(36);
    let dev = FsDevice::new(FsConfig::new(dir.path(), tag36.clone())).unwrap();
    let config = dev.config_space();
    assert_eq!(&config[..36], tag36.as_bytes());
    assert_eq!(&config[36..], &1u32.to_le_bytes());
    assert_eq!(dev.num_queues(), 2);
    let mut buf = [0xffu8; 8];
    dev.read_config(38, &mut buf);
    assert_eq!(buf, [0, 0, 0, 0, 0, 0, 0, 0]);

    for tag in ["", "a\0b"] {
        assert!(matches!(
            FsDevice::new(FsConfig::new(dir.path(), tag)),
            Err(FsError::BadTag(_))
        ));
    }
    assert!(matches!(
        FsConfig::new(dir.path(), "a".repeat(37)).validate(),
        Err(FsError::BadTag(_))
    ));
    assert!(matches!(
        FsConfig::new(dir.path().join("missing"), "t").validate(),
        Err(FsError::SharedDir { .. })
    ));
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        FsConfig::new(&file, "t").validate(),
        Err(FsError::NotADirectory(_))
    ));
    let mut cfg = FsConfig::new(dir.path(), "t");
    cfg.num_request_queues = 0;
    assert!(matches!(cfg.validate(), Err(FsError::NoRequestQueues)));
    assert_eq!("auto".parse::<CacheMode>(), Ok(CacheMode::Auto));
    assert!("sometimes".parse::<CacheMode>().is_err());
}

#[test]
fn queue_not_ready_is_left_alone() {
    use virtio_queue::QueueT;
    let dir = tempfile::tempdir().unwrap();
    let dev = FsDevice::new(FsConfig::new(dir.path(), "t")).unwrap();
    let mut g = FsGuest::new();
    g.reqq.set_ready(false);
    assert!(!dev.process_queue(&g.mem, &mut g.reqq).unwrap());
}

#[test]
fn cache_never_and_xattr_configs_serve() {
    let mut t = TestFs::with_config(|c| {
        c.cache = CacheMode::Never;
        c.xattr = true;
    });
    fs::write(t.share.join("f"), b"x").unwrap();
    let e = t.guest.lookup(&t.dev, ROOT, b"f").unwrap();
    assert_eq!(e.entry_valid, 0);
    // LISTXATTR with size 0 asks for the needed size; with xattr on it is answered.
    let get = GetxattrIn::default();
    let r = t
        .guest
        .request(&t.dev, Opcode::Listxattr, e.nodeid, get.as_slice(), 64);
    assert_eq!(r.error, Some(0));
}

#[test]
fn xattr_ops_on_symlinks_stay_inside() {
    let mut t = TestFs::with_config(|c| c.xattr = true);
    let outside = t.outside.clone();
    std::os::unix::fs::symlink(&outside, t.share.join("link")).unwrap();
    let (dev, g) = (&t.dev, &mut t.guest);
    let link = g.lookup(dev, ROOT, b"link").unwrap();

    let mut get = GetxattrIn {
        size: 256,
        padding: 0,
    }
    .as_slice()
    .to_vec();
    get.extend_from_slice(b"user.x\0");
    // Whatever the link itself has, the directory it points to is not what is read.
    let r = g.request(dev, Opcode::Getxattr, link.nodeid, &get, 512);
    assert_ne!(r.error, Some(0));
    let mut set = SetxattrIn { size: 3, flags: 0 }.as_slice().to_vec();
    set.extend_from_slice(b"user.x\0abc");
    let r = g.request(dev, Opcode::Setxattr, link.nodeid, &set, 64);
    assert_eq!(r.errno(), libc::EPERM);
    let r = g.request(dev, Opcode::Removexattr, link.nodeid, b"user.x\0", 64);
    assert_eq!(r.errno(), libc::EPERM);
}

/// husk-vmm's event loop serves virtio-fs in-process under its seccomp filter, and the
/// vhost-user-fs backend under its own: a file's whole life through the device must stay
/// within each filter's allow-list. A call outside it kills this test binary with SIGSYS.
#[test]
fn file_operations_stay_inside_the_event_loop_seccomp_filter() {
    file_operations_stay_inside(crate::seccomp::ThreadKind::EventLoop);
}

#[test]
fn file_operations_stay_inside_the_vhost_user_backend_seccomp_filter() {
    file_operations_stay_inside(crate::seccomp::ThreadKind::VhostUser);
}

fn file_operations_stay_inside(kind: crate::seccomp::ThreadKind) {
    let filter = crate::seccomp::filter_with(kind, crate::seccomp::FS_SERVER).unwrap();
    let mut t = TestFs::new();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                crate::seccomp::apply(&filter).unwrap();
                let (dev, g) = (&t.dev, &mut t.guest);
                g.init(dev);
                let (e, fh) = g.create(dev, ROOT, b"f", 0o644, libc::O_RDWR).unwrap();
                assert_eq!(g.write(dev, e.nodeid, fh, 0, b"data").unwrap(), 4);
                g.release(dev, e.nodeid, fh, false);
                let fh = g.open(dev, e.nodeid, libc::O_RDONLY).unwrap();
                assert_eq!(g.read(dev, e.nodeid, fh, 0, 16).unwrap(), b"data");
                g.release(dev, e.nodeid, fh, false);
                let set = SetattrIn {
                    valid: FATTR_SIZE | FATTR_MODE,
                    size: 1,
                    mode: 0o600,
                    ..Default::default()
                };
                assert_eq!(g.setattr(dev, e.nodeid, set).unwrap().size, 1);
                let d = g.mkdir(dev, ROOT, b"d", 0o755).unwrap();
                g.rename(dev, ROOT, b"f", d.nodeid, b"g").unwrap();
                g.symlink(dev, ROOT, b"l", b"d/g").unwrap();
                let dfh = g.opendir(dev, ROOT).unwrap();
                assert!(!g.readdir(dev, ROOT, dfh).unwrap().is_empty());
                g.release(dev, ROOT, dfh, true);
                g.unlink(dev, d.nodeid, b"g").unwrap();
                g.unlink(dev, ROOT, b"l").unwrap();
                g.rmdir(dev, ROOT, b"d").unwrap();
                g.forget(dev, e.nodeid, 1);
                dev.reset();
            })
            .join()
            .unwrap();
    });
}

/// The driver resets the device through a register write, which husk-vmm handles on a vCPU
/// thread: under the vCPU seccomp filter that must not touch the file system (a call outside
/// it kills this test binary with SIGSYS). The reset then happens on the next queue service.
#[test]
fn a_driver_reset_on_a_vcpu_thread_stays_inside_its_seccomp_filter() {
    use crate::devices::virtio::device::VirtioDevice;
    let filter = crate::seccomp::filter_for(crate::seccomp::ThreadKind::Vcpu).unwrap();
    let mut t = TestFs::new();
    t.guest.init(&t.dev);
    let (e, fh) = t
        .guest
        .create(&t.dev, ROOT, b"kept-open", 0o644, libc::O_RDWR)
        .unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                crate::seccomp::apply(&filter).unwrap();
                VirtioDevice::reset(&mut t.dev);
            })
            .join()
            .unwrap();
    });
    // After the reset the old inode and handle are gone, and a new session works.
    t.guest.init(&t.dev);
    assert!(t.guest.read(&t.dev, e.nodeid, fh, 0, 1).is_err());
    let (_, fh2) = t
        .guest
        .create(&t.dev, ROOT, b"after-reset", 0o644, libc::O_RDWR)
        .unwrap();
    assert!(fh2 > 0);
}
