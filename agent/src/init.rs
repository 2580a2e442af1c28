//! The init system's part of PID 1: the filesystems, console, cgroups and
//! hostname a Linux userspace expects, set up once at boot.
//!
//! The guest's initrd holds nothing but the agent, so nothing else does this.
//! Every step tolerates failure with a warning: a guest without, say, /tmp is
//! still more useful serving RPCs (and reporting the problem) than powered
//! off.

use std::{
    fs::{self, DirBuilder, OpenOptions},
    io::{self, Write},
    os::unix::fs::{symlink, DirBuilderExt, MetadataExt},
    path::Path,
};

use nix::{
    fcntl::{fcntl, open, FcntlArg, OFlag},
    mount::{mount, MsFlags},
    sys::stat::Mode,
    unistd::{close, dup2, sethostname},
};
use thiserror::Error;

/// Hostname until the sandbox set-up call gives the pod's own.
pub const DEFAULT_HOSTNAME: &str = "husk";

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Error)]
pub enum InitError {
    #[error("creating mount point {target}: {source}")]
    MountPoint {
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("mounting {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("opening /dev/console for stdio: {0}")]
    Console(#[source] nix::Error),
    #[error("setting hostname {DEFAULT_HOSTNAME:?}: {0}")]
    Hostname(#[source] nix::Error),
    #[error("cgroup v2 {what}: {source}")]
    Cgroup {
        what: String,
        #[source]
        source: io::Error,
    },
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// What must exist before anything else: /proc for the kernel command line
/// (the log level) and /dev for the console (the log's destination).
const EARLY_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
];

/// In order: a mount point inside an earlier mount comes after it.
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "cgroup2",
        target: CGROUP_ROOT,
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        // newinstance: containers mount their own devpts; the guest's must
        // not be the shared initial instance. ptmxmode=0666 so /dev/ptmx
        // (which resolves to pts/ptmx) is usable by unprivileged processes.
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "run",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "tmp",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

/// The /dev links programs expect and devtmpfs does not provide.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
];

/// Runs before logging exists, so failures are returned for the caller to
/// log once it can.
pub fn early() -> Vec<InitError> {
    let mut errors: Vec<InitError> = EARLY_MOUNTS
        .iter()
        .filter_map(|m| mount_one(m).err())
        .collect();
    if let Err(e) = console_as_stdio() {
        errors.push(e);
    }
    errors
}

/// The rest of the boot-time set-up; logs its own warnings.
pub fn setup() {
    for m in MOUNTS {
        if let Err(e) = mount_one(m) {
            tracing::warn!("{e}");
        }
    }
    for (target, link) in DEV_LINKS {
        match symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => tracing::warn!("linking {link} to {target}: {e}"),
        }
    }
    match enable_cgroup_controllers(Path::new(CGROUP_ROOT)) {
        Ok(enabled) => tracing::debug!(?enabled, "cgroup v2 controllers enabled"),
        Err(e) => tracing::warn!("{e}"),
    }
    if let Err(e) = sethostname(DEFAULT_HOSTNAME) {
        tracing::warn!("{}", InitError::Hostname(e));
    }
}

fn mount_one(m: &MountSpec) -> Result<(), InitError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(m.target)
        .map_err(|source| InitError::MountPoint {
            target: m.target,
            source,
        })?;
    // Already mounted (a kernel that automounts devtmpfs, or an agent
    // restarted by hand for debugging): mounting again would stack a second
    // instance over the first.
    if is_mount_point(Path::new(m.target)) {
        return Ok(());
    }
    mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data).map_err(|source| {
        InitError::Mount {
            fstype: m.fstype,
            target: m.target,
            source,
        }
    })
}

/// A directory on another device than its parent is a mount point (good
/// enough for the fixed, fresh mount points above; bind mounts of the same
/// filesystem would not show).
fn is_mount_point(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return true;
    };
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(p), Ok(parent)) => p.dev() != parent.dev(),
        _ => false,
    }
}

/// Points any of fds 0-2 the kernel left closed at /dev/console.
///
/// The kernel opens /dev/console for /init only if the initrd has that node;
/// without it the agent would run with no stderr, and every log line and the
/// ready line would vanish.
fn console_as_stdio() -> Result<(), InitError> {
    let is_open = |fd| fcntl(fd, FcntlArg::F_GETFD).is_ok();
    if (0..=2).all(is_open) {
        return Ok(());
    }
    // open() returns the lowest free descriptor, so this may itself land on
    // one of 0-2; the loop below then fills the others from it.
    let console = open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(InitError::Console)?;
    for fd in 0..=2 {
        if !is_open(fd) {
            dup2(console, fd).map_err(InitError::Console)?;
        }
    }
    if console > 2 {
        close(console).map_err(InitError::Console)?;
    }
    Ok(())
}

/// Delegates every available controller to child cgroups (the containers'),
/// one at a time so that one the kernel refuses does not block the rest.
fn enable_cgroup_controllers(root: &Path) -> Result<Vec<String>, InitError> {
    let list_path = root.join("cgroup.controllers");
    let available = fs::read_to_string(&list_path).map_err(|source| InitError::Cgroup {
        what: format!("reading {}", list_path.display()),
        source,
    })?;
    let control_path = root.join("cgroup.subtree_control");
    let mut enabled = Vec::new();
    for controller in available.split_whitespace() {
        let write = OpenOptions::new()
            .write(true)
            .open(&control_path)
            .and_then(|mut f| f.write_all(format!("+{controller}").as_bytes()));
        match write {
            Ok(()) => enabled.push(controller.to_string()),
            Err(source) => tracing::warn!(
                "{}",
                InitError::Cgroup {
                    what: format!("enabling controller {controller}"),
                    source
                }
            ),
        }
    }
    Ok(enabled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_tables_are_ordered_parent_first() {
        let all: Vec<&str> = EARLY_MOUNTS
            .iter()
            .chain(MOUNTS)
            .map(|m| m.target)
            .collect();
        for (i, target) in all.iter().enumerate() {
            for earlier_child in &all[..i] {
                assert!(
                    !Path::new(earlier_child).starts_with(target),
                    "{earlier_child} is mounted before its parent {target}"
                );
            }
        }
    }

    #[test]
    fn mount_point_detection() {
        assert!(is_mount_point(Path::new("/proc")));
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(!is_mount_point(&sub));
    }

    #[test]
    fn controllers_are_enabled_one_by_one() {
        // A plain directory stands in for cgroupfs: the writes land in a
        // regular file, the last one winning.
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("cgroup.controllers"),
            "cpu io memory pids\n",
        )
        .unwrap();
        fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        let enabled = enable_cgroup_controllers(dir.path()).unwrap();
        assert_eq!(enabled, ["cpu", "io", "memory", "pids"]);
    }

    #[test]
    fn missing_cgroupfs_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = enable_cgroup_controllers(dir.path()).unwrap_err();
        assert!(err.to_string().contains("cgroup.controllers"));
    }
}
