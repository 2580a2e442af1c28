//! Removing a tree without ever crossing into a mount or following a symlink.
//!
//! Every directory is opened relative to its parent with `O_NOFOLLOW`, and every
//! entry's mount id (statx `STATX_MNT_ID`) is compared with the tree's: an entry
//! on another mount (a volume still bound there, a rootfs that would not
//! unmount) is left in place and reported, never deleted through.

use std::{
    ffi::{CStr, CString, OsStr},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    dir::Dir,
    fcntl::{openat, OFlag},
    sys::stat::Mode,
    unistd::{unlinkat, UnlinkatFlags},
};

/// What [`remove_tree`] could not remove.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Mount points (and the directories above them) left in place.
    pub mounts: Vec<PathBuf>,
    /// Entries that would not go, with the reason.
    pub errors: Vec<(PathBuf, io::Error)>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty() && self.errors.is_empty()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for m in &self.mounts {
            writeln!(f, "{}: still a mount point, left in place", m.display())?;
        }
        for (p, e) in &self.errors {
            writeln!(f, "{}: {e}", p.display())?;
        }
        Ok(())
    }
}

struct Stat {
    mnt_id: u64,
    is_dir: bool,
}

fn statx(dir: i32, name: &CStr, flags: i32) -> io::Result<Stat> {
    // SAFETY: a zeroed statx is a valid output buffer.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` outlives the call.
    let r = unsafe {
        libc::statx(
            dir,
            name.as_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_TYPE | libc::STATX_MNT_ID,
            &mut st,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.stx_mask & libc::STATX_MNT_ID == 0 {
        // Linux before 5.8: no way to see a bind of the same filesystem here.
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel does not report mount ids (statx STATX_MNT_ID, Linux 5.8+)",
        ));
    }
    Ok(Stat {
        mnt_id: st.stx_mnt_id,
        is_dir: u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFDIR,
    })
}

/// Removes `path` and everything below it that is on `path`'s own mount.
/// `path` itself must be a directory and not a symlink. A missing `path` is
/// not an error.
pub fn remove_tree(path: &Path) -> io::Result<Leftovers> {
    let fd = match nix::fcntl::open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    ) {
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(nix::errno::Errno::ENOENT) => return Ok(Leftovers::default()),
        Err(e) => {
            return Err(io::Error::new(
                io::Error::from(e).kind(),
                format!("opening {}: {e}", path.display()),
            ))
        }
    };
    let root = statx(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
    let mut left = Leftovers::default();
    let emptied = empty_dir(&fd, path, root.mnt_id, &mut left);
    drop(fd);
    if emptied {
        match std::fs::remove_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => left.errors.push((path.to_path_buf(), e)),
        }
    }
    Ok(left)
}

/// Removes what is in `dir`; true if it is now empty.
fn empty_dir(dir: &OwnedFd, path: &Path, mnt_id: u64, left: &mut Leftovers) -> bool {
    let names: Vec<CString> = match Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(mut d) => d
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect(),
        Err(e) => {
            left.errors.push((path.to_path_buf(), e.into()));
            return false;
        }
    };
    let mut empty = true;
    for name in names {
        let child = path.join(OsStr::from_bytes(name.as_bytes()));
        // Gone already (another cleanup of the same tree, containerd runs one
        // `delete` per container of a pod): nothing to do.
        let gone = |e: &nix::Error| *e == nix::errno::Errno::ENOENT;
        let st = match statx(dir.as_raw_fd(), &name, 0) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                left.errors.push((child, e));
                empty = false;
                continue;
            }
        };
        if st.mnt_id != mnt_id {
            left.mounts.push(child);
            empty = false;
            continue;
        }
        if st.is_dir {
            let sub = match openat(
                Some(dir.as_raw_fd()),
                name.as_c_str(),
                OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
                Mode::empty(),
            ) {
                // SAFETY: a new descriptor nothing else owns.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(e) if gone(&e) => continue,
                Err(e) => {
                    left.errors.push((child, e.into()));
                    empty = false;
                    continue;
                }
            };
            if !empty_dir(&sub, &child, mnt_id, left) {
                empty = false;
                continue;
            }
            drop(sub);
        }
        let how = if st.is_dir {
            UnlinkatFlags::RemoveDir
        } else {
            UnlinkatFlags::NoRemoveDir
        };
        match unlinkat(Some(dir.as_raw_fd()), name.as_c_str(), how) {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e) => {
                left.errors.push((child, e.into()));
                empty = false;
            }
        }
    }
    empty
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use std::fs;

    use super::*;

    #[test]
    fn removes_a_tree_without_following_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), "x").unwrap();
        let tree = t.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/f"), "y").unwrap();
        std::os::unix::fs::symlink(outside.path(), tree.join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), tree.join("flink")).unwrap();
        let left = remove_tree(&tree).unwrap();
        assert!(left.is_empty(), "{left}");
        assert!(!tree.exists());
        assert!(
            outside.path().join("keep").is_file(),
            "symlink targets stay"
        );
        assert!(remove_tree(&tree).unwrap().is_empty(), "missing is fine");
    }

    #[test]
    fn never_deletes_through_a_mount() {
        if !nix::unistd::geteuid().is_root() {
            // Bind mounts need root; the symlink half above runs everywhere.
            husk_skip::missing("never_deletes_through_a_mount", "needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let volume = tempfile::tempdir().unwrap();
        fs::write(volume.path().join("data"), "precious").unwrap();
        let tree = t.path().join("tree");
        fs::create_dir_all(tree.join("c/mounts/0")).unwrap();
        fs::write(tree.join("c/other"), "z").unwrap();
        // Same filesystem as the tree: only the mount id tells it apart.
        nix::mount::mount(
            Some(volume.path()),
            &tree.join("c/mounts/0"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let left = remove_tree(&tree).unwrap();
        assert_eq!(left.mounts, vec![tree.join("c/mounts/0")]);
        assert!(
            volume.path().join("data").is_file(),
            "the volume's data stays"
        );
        assert!(!tree.join("c/other").exists(), "the rest is removed");
        nix::mount::umount2(&tree.join("c/mounts/0"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(remove_tree(&tree).unwrap().is_empty());
        assert!(!tree.exists());
    }
}
