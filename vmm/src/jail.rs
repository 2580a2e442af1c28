//! The jail husk-vmm enters once the VM is built and before any thread starts: what a guest
//! that escaped into the VMM process would find.
//!
//! - Its own mount, network, IPC and UTS namespaces. The file system is an empty read-only
//!   tmpfs holding only the directories the VMM still reaches by path (the one with its sockets,
//!   where guest-initiated vsock connections go, and the virtio-fs share), bound at the same
//!   paths. Everything else (the kernel, initrd, /dev/kvm, the tap, the console log) was opened
//!   before and is held as file descriptors. No network interfaces at all.
//! - No capabilities, except, when it serves virtio-fs, the ones a passthrough file server
//!   needs to act as the guest's users (ownership, permission checks, set[ug]id). The bounding
//!   and ambient sets are emptied and no_new_privs is set, so nothing can be regained by exec.
//! - Then the per-thread seccomp filters (see `seccomp`).
//!
//! Namespaces and capabilities belong to threads: entering the jail with other threads running
//! would leave them outside, so it refuses to.

use std::{
    fs, io,
    os::unix::fs::DirBuilderExt,
    path::{Component, Path, PathBuf},
};

use caps::{CapSet, Capability, CapsHashSet};
use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{unshare, CloneFlags},
};

/// The capabilities fuse-backend-rs's passthrough file system uses to serve the guest's users:
/// file ownership and modes the guest sets (CHOWN, FOWNER, FSETID), permission checks as the
/// guest's users rather than as root (DAC_OVERRIDE, DAC_READ_SEARCH: the server, not the host,
/// decides, against the guest's uid), and acting as them while creating files (SETUID, SETGID
/// for the per-request fsuid/fsgid). Not CAP_MKNOD: the guest gets no device nodes on the
/// share (FIFOs and sockets need none).
const FS_SERVER_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
];

/// Name (with the pid after it) of the temporary mount point made in a visible directory:
/// per process, since a pod's backends jail themselves at once in the same directory.
const JAIL_DIR: &str = ".husk-jail";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail needs root (CAP_SYS_ADMIN for its namespaces and mounts)")]
    NotRoot,
    #[error("the jail must be entered before any thread starts ({0} threads running)")]
    Threads(usize),
    #[error("jail: {path}: must be an absolute directory path without `..`")]
    BadPath { path: PathBuf },
    #[error("jail: {path}: must be an absolute path without `..`")]
    BadFile { path: PathBuf },
    #[error("jail: {path}: not a symbolic link on the host")]
    NotALink { path: PathBuf },
    #[error("jail: user {0}: must not be root (uid and gid 0 are refused)")]
    RootUser(u32),
    #[error("jail: nothing to keep visible")]
    NoDirs,
    #[error("jail: {what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("jail: capabilities: {0}")]
    Caps(String),
}

fn sys<E: Into<io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> JailError {
    let what = what.into();
    move |e| JailError::Sys {
        what,
        source: e.into(),
    }
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// What the jail keeps.
#[derive(Debug, Clone, Default)]
pub struct JailConfig {
    /// Directories the VMM still reaches by path, bound read-write at the same paths.
    pub visible_dirs: Vec<PathBuf>,
    /// Single files (Unix sockets, device nodes) bound read-write at the same paths: a
    /// process that needs a few names of a directory sees only those.
    pub visible_files: Vec<PathBuf>,
    /// Files and directories bound read-only at the same paths: a program the jail goes on
    /// to exec and what it loads (`/usr`, a guest kernel).
    pub read_only: Vec<PathBuf>,
    /// Symbolic links of the host recreated in the jail's root with the same target (a
    /// merged-/usr host's `/lib64 -> usr/lib64`, which the dynamic loader's path goes
    /// through).
    pub links: Vec<PathBuf>,
    /// Where the jail's tmpfs is mounted while it is built when no visible directory is
    /// writable (or there is none); the directory itself stays out of the jail.
    pub scratch: Option<PathBuf>,
    /// Run as this unprivileged user from then on (with no capabilities at all, whatever
    /// `fs_server` says).
    pub user: Option<JailUser>,
    /// Keep [`FS_SERVER_CAPS`] (virtio-fs is served in-process).
    pub fs_server: bool,
}

/// The credentials a jailed program runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailUser {
    pub uid: u32,
    pub gid: u32,
    /// One supplementary group, for a device node the program opens (`/dev/kvm`'s group).
    pub extra_group: Option<u32>,
}

impl JailConfig {
    /// The capabilities the jailed process keeps.
    pub fn kept_caps(&self) -> CapsHashSet {
        if self.fs_server && self.user.is_none() {
            FS_SERVER_CAPS.iter().copied().collect()
        } else {
            CapsHashSet::new()
        }
    }
}

/// Enters the jail (see the module docs). Call it from the process's only thread.
pub fn enter(cfg: &JailConfig) -> Result<(), JailError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(JailError::NotRoot);
    }
    let threads = thread_count();
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    let dirs = visible_dirs(&cfg.visible_dirs)?;
    let files = absolute_paths(&cfg.visible_files)?;
    let read_only = absolute_paths(&cfg.read_only)?;
    let links = host_links(&cfg.links)?;
    if dirs.is_empty() && files.is_empty() && read_only.is_empty() {
        return Err(JailError::NoDirs);
    }
    if let Some(u) = cfg.user {
        if u.uid == 0 || u.gid == 0 {
            return Err(JailError::RootUser(u.uid));
        }
    }
    // What caps needs from /proc, read while /proc is still there.
    let all_caps = caps::all();

    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(|e| sys("unshare")(errno(e)))?;
    // Slave, not private: mounts the host makes later under a bound directory (the shim
    // mounts each container's rootfs under the share) still reach the jail, while nothing
    // done here reaches the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| sys("making / a slave mount")(errno(e)))?;

    let root = jail_mount_point(&dirs, cfg.scratch.as_deref())?;
    mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(|e| sys(format!("mounting the jail's tmpfs on {}", root.display()))(errno(e)))?;
    for dir in &dirs {
        let target = root.join(dir.strip_prefix("/").unwrap_or(dir));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&target)
            .map_err(sys(format!("creating {}", target.display())))?;
        mount(
            Some(dir.as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| sys(format!("binding {}", dir.display()))(errno(e)))?;
    }
    for (link, target) in &links {
        let at = root.join(link.strip_prefix("/").unwrap_or(link));
        make_parent(&at)?;
        std::os::unix::fs::symlink(target, &at)
            .map_err(sys(format!("recreating the link {}", link.display())))?;
    }
    for file in &files {
        bind_at(&root, file, false)?;
    }
    for path in &read_only {
        bind_at(&root, path, true)?;
    }
    nix::unistd::chdir(&root).map_err(|e| sys("chdir to the jail")(errno(e)))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| sys("pivot_root")(errno(e)))?;
    // The old root now sits on top of the new one at "/": detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| sys("detaching the old root")(errno(e)))?;
    nix::unistd::chdir("/").map_err(|e| sys("chdir /")(errno(e)))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(|e| sys("remounting the jail's root read-only")(errno(e)))?;
    // The recursive bind of the first directory copied the jail's own tmpfs mount at the
    // mount point: drop that copy, then the mount point itself.
    let _ = umount2(&root, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&root);

    // Only what the process has: a host may run us without some of them.
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(|e| JailError::Caps(e.to_string()))?;
    let keep: CapsHashSet = cfg.kept_caps().intersection(&permitted).copied().collect();
    match cfg.user {
        Some(user) => become_user(user, all_caps)?,
        None => drop_capabilities(&keep, all_caps)?,
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("PR_SET_NO_NEW_PRIVS")(io::Error::last_os_error()));
    }
    Ok(())
}

/// Binds `path` (a file or a directory) at the same path under `root`, read-only or not.
fn bind_at(root: &Path, path: &Path, read_only: bool) -> Result<(), JailError> {
    let target = root.join(path.strip_prefix("/").unwrap_or(path));
    let md = fs::metadata(path).map_err(sys(format!("{}", path.display())))?;
    if md.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&target)
            .map_err(sys(format!("creating {}", target.display())))?;
    } else {
        make_parent(&target)?;
        // A regular file as the mount point: any non-directory binds onto one.
        fs::File::create(&target).map_err(sys(format!("creating {}", target.display())))?;
    }
    mount(
        Some(path),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| sys(format!("binding {}", path.display()))(errno(e)))?;
    if read_only {
        // A bind takes the flags of its source; read-only (and nosuid: nothing in the jail
        // may gain privileges) needs a remount of the bind itself.
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
            None::<&str>,
        )
        .map_err(|e| sys(format!("making {} read-only", path.display()))(errno(e)))?;
    }
    Ok(())
}

fn make_parent(at: &Path) -> Result<(), JailError> {
    match at.parent() {
        Some(parent) => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(sys(format!("creating {}", parent.display()))),
        None => Ok(()),
    }
}

/// Switches to `user` for good: the bounding, ambient and inheritable sets emptied first
/// (that needs CAP_SETPCAP, which the switch takes away), then groups, gid and uid (real,
/// effective and saved), which leaves no capability at all.
fn become_user(user: JailUser, all: CapsHashSet) -> Result<(), JailError> {
    let err = |e: caps::errors::CapsError| JailError::Caps(e.to_string());
    for cap in &all {
        caps::drop(None, CapSet::Bounding, *cap).map_err(err)?;
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    let groups: Vec<nix::unistd::Gid> = user
        .extra_group
        .map(nix::unistd::Gid::from_raw)
        .into_iter()
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| sys("setgroups")(errno(e)))?;
    let gid = nix::unistd::Gid::from_raw(user.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| sys("setresgid")(errno(e)))?;
    let uid = nix::unistd::Uid::from_raw(user.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| sys("setresuid")(errno(e)))?;
    let left = caps::read(None, CapSet::Permitted).map_err(err)?;
    if !left.is_empty() {
        return Err(JailError::Caps(format!(
            "capabilities left after becoming uid {}: {left:?}",
            user.uid
        )));
    }
    Ok(())
}

/// Absolute, `..`-free paths that exist (files or directories), deduplicated. Kept as given,
/// not resolved: the jailed program opens them by these names (a guest kernel reached
/// through a link into a cache is bound at the link's path).
fn absolute_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, JailError> {
    let mut out = Vec::new();
    for p in paths {
        let bad = || JailError::BadFile { path: p.clone() };
        if !p.is_absolute()
            || p.components().any(|c| matches!(c, Component::ParentDir))
            || p == Path::new("/")
            || fs::metadata(p).is_err()
        {
            return Err(bad());
        }
        out.push(p.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Each link with its host target, read now (the host's root is gone once the jail is up).
fn host_links(links: &[PathBuf]) -> Result<Vec<(PathBuf, PathBuf)>, JailError> {
    links
        .iter()
        .map(|l| {
            if !l.is_absolute() || l.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(JailError::BadFile { path: l.clone() });
            }
            let target = fs::read_link(l).map_err(|_| JailError::NotALink { path: l.clone() })?;
            Ok((l.clone(), target))
        })
        .collect()
}

/// A directory for the jail's tmpfs while it is built: inside the first visible directory
/// that takes one (a virtio-fs share is read-only to everyone, the socket directory is not),
/// else in `scratch`.
fn jail_mount_point(dirs: &[PathBuf], scratch: Option<&Path>) -> Result<PathBuf, JailError> {
    let mut last = None;
    for dir in dirs.iter().map(PathBuf::as_path).chain(scratch) {
        let root = dir.join(format!("{JAIL_DIR}-{}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&root) {
            Ok(()) => return Ok(root),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(root),
            Err(e) => last = Some((root, e)),
        }
    }
    match last {
        Some((root, e)) => Err(sys(format!(
            "creating {} (no visible directory is writable)",
            root.display()
        ))(e)),
        None => Err(JailError::NoDirs),
    }
}

fn drop_capabilities(keep: &CapsHashSet, all: CapsHashSet) -> Result<(), JailError> {
    let err = |e: caps::errors::CapsError| JailError::Caps(e.to_string());
    for cap in all.difference(keep) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(err)?;
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    caps::set(None, CapSet::Effective, keep).map_err(err)?;
    caps::set(None, CapSet::Permitted, keep).map_err(err)?;
    Ok(())
}

/// Absolute, `..`-free directories, deduplicated, with none inside another (binding the outer
/// one recursively shows the inner one).
fn visible_dirs(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, JailError> {
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let bad = || JailError::BadPath { path: d.clone() };
        if !d.is_absolute() || d.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(bad());
        }
        let d = fs::canonicalize(d).map_err(|_| bad())?;
        if !d.is_dir() || d == Path::new("/") {
            return Err(bad());
        }
        out.push(d);
    }
    out.sort();
    out.dedup();
    let mut kept: Vec<PathBuf> = Vec::new();
    for d in out {
        if !kept.iter().any(|k| d.starts_with(k)) {
            kept.push(d);
        }
    }
    Ok(kept)
}

fn thread_count() -> usize {
    fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    /// For tests: whether `path` exists as seen from inside the jail.
    fn visible(path: &str) -> bool {
        CString::new(path)
            .map(|p| {
                // SAFETY: access(2) on a NUL-terminated path.
                unsafe { libc::access(p.as_ptr(), libc::F_OK) == 0 }
            })
            .unwrap_or(false)
    }

    #[test]
    fn visible_dirs_are_absolute_deduplicated_and_outermost() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = a.join("b");
        fs::create_dir_all(&b).unwrap();
        let got = visible_dirs(&[b.clone(), a.clone(), a.clone()]).unwrap();
        assert_eq!(got, vec![fs::canonicalize(&a).unwrap()]);
        for bad in [
            PathBuf::from("relative"),
            PathBuf::from("/"),
            a.join("../a"),
            t.path().join("missing"),
        ] {
            assert!(
                matches!(
                    visible_dirs(std::slice::from_ref(&bad)),
                    Err(JailError::BadPath { .. })
                ),
                "{}",
                bad.display()
            );
        }
    }

    #[test]
    fn only_the_file_server_keeps_capabilities() {
        let none = JailConfig::default();
        assert!(none.kept_caps().is_empty());
        let fs = JailConfig {
            fs_server: true,
            ..Default::default()
        };
        let kept = fs.kept_caps();
        assert!(kept.contains(&Capability::CAP_CHOWN));
        assert!(!kept.contains(&Capability::CAP_SYS_ADMIN));
        assert!(!kept.contains(&Capability::CAP_NET_ADMIN));
    }

    /// Runs the jail in a child process (it changes the caller for good): the child sees only
    /// the kept directory, no /proc, no network interface but lo, cannot regain capabilities.
    #[test]
    fn a_jailed_process_sees_only_what_it_keeps() {
        if !nix::unistd::geteuid().is_root() {
            husk_skip::missing("a_jailed_process_sees_only_what_it_keeps", "needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let kept = t.path().join("kept");
        fs::create_dir(&kept).unwrap();
        fs::write(kept.join("file"), b"x").unwrap();
        let kept_file = kept.join("file").to_string_lossy().into_owned();
        // SAFETY: the child only makes system calls and exits; the test harness's other
        // threads are not touched in it.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let cfg = JailConfig {
                    visible_dirs: vec![kept.clone()],
                    ..Default::default()
                };
                let code = match enter(&cfg) {
                    Err(_) => 10,
                    Ok(()) if !visible(&kept_file) => 11,
                    Ok(()) if visible("/proc/self") || visible("/etc/passwd") => 12,
                    Ok(()) if fs::write("/new", b"x").is_ok() => 13,
                    Ok(())
                        if caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN)
                            .unwrap_or(true) =>
                    {
                        14
                    }
                    Ok(()) if fs::write(&kept_file, b"written in jail").is_err() => 15,
                    Ok(()) => 0,
                };
                // SAFETY: _exit(2) ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "10 enter failed, 11 kept file hidden, 12 host files visible, 13 root \
                     writable, 14 CAP_SYS_ADMIN kept, 15 kept dir not writable"
                );
                assert_eq!(fs::read(kept.join("file")).unwrap(), b"written in jail");
                assert!(
                    fs::read_dir(&kept).unwrap().all(|e| !e
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(JAIL_DIR)),
                    "mount point left behind"
                );
            }
        }
    }
}
