//! Bind mounts made whole before they are attached: `open_tree(OPEN_TREE_CLONE)`
//! copies a tree into a detached mount, `mount_setattr` gives it its flags, and
//! `move_mount` attaches it at a descriptor.
//!
//! Why not `mount(MS_BIND)` then `MS_REMOUNT`: a bind made under a shared mount
//! propagates to its slaves (the guest's view of the pod share) at once, with
//! the flags of that moment, and a later remount changes only the original. The
//! guest would see a writable, suid-honouring copy of a read-only bind.
//! nix wraps none of these calls, hence the raw syscalls.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// `MOUNT_ATTR_*` from linux/mount.h.
pub const ATTR_RDONLY: u64 = 0x1;
pub const ATTR_NOSUID: u64 = 0x2;
pub const ATTR_NODEV: u64 = 0x4;
pub const ATTR_NOEXEC: u64 = 0x8;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A mount tree not attached anywhere yet.
pub struct DetachedMount(OwnedFd);

/// Copies the mount tree at `source` (recursively with `recursive`: the
/// submounts too, as `rbind` does).
pub fn clone_tree(source: &impl AsRawFd, recursive: bool) -> io::Result<DetachedMount> {
    let mut flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: the path is a NUL-terminated empty string; no memory is written.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, source.as_raw_fd(), c"".as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    Ok(DetachedMount(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

impl DetachedMount {
    /// Sets `attrs` (`ATTR_*`) on every mount of the tree.
    pub fn set(&self, attrs: u64) -> io::Result<()> {
        let attr = MountAttr {
            attr_set: attrs,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: `attr` outlives the call and its size is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                self.0.as_raw_fd(),
                c"".as_ptr(),
                (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches the tree on the directory or file `target` holds.
    pub fn attach(self, target: &impl AsRawFd) -> io::Result<()> {
        // SAFETY: both paths are NUL-terminated empty strings.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                self.0.as_raw_fd(),
                c"".as_ptr(),
                target.as_raw_fd(),
                c"".as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Binds `source` on `target` with `attrs` applied before anything can see it.
pub fn bind(
    source: &impl AsRawFd,
    target: &impl AsRawFd,
    recursive: bool,
    attrs: u64,
) -> io::Result<()> {
    let tree = clone_tree(source, recursive)?;
    tree.set(attrs)?;
    tree.attach(target)
}
