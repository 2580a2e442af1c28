//! containerd's rootfs mounts (the snapshotter's overlayfs, or bind mounts),
//! made on a descriptor of the mount point with the host-side flags husk adds.

use std::{io, os::fd::OwnedFd, path::Path, path::PathBuf};

use nix::{
    fcntl::OFlag,
    mount::{mount, MsFlags},
};

use crate::hostfs::{detached, resolve};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("rootfs mount {index} ({kind} from {source_path}): unsupported type {kind:?}")]
    Unsupported {
        index: usize,
        kind: String,
        source_path: String,
    },
    #[error("mounting {kind} {source_path} on {target}: {errno}")]
    Mount {
        kind: String,
        source_path: String,
        target: PathBuf,
        errno: nix::Error,
    },
    #[error("mount point {path}: {source}")]
    Target { path: PathBuf, source: io::Error },
    #[error("recording the mount: {0}")]
    Record(#[from] io::Error),
}

/// One entry of `CreateTaskRequest.rootfs`, as containerd sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// What every rootfs mount gets on the host, whatever containerd asked: files
/// the guest made setuid or device nodes it created mean nothing on the host.
const HOST_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// Mounts `m` on the directory `target` (held open); `host_path` is the same
/// mount point by name, for errors.
pub fn mount_one(
    index: usize,
    m: &RootfsMount,
    target: &OwnedFd,
    host_path: &Path,
) -> Result<(), MountError> {
    let (flags, data) = parse_options(&m.options);
    let kind = match m.kind.as_str() {
        "bind" | "rbind" => None,
        "overlay" | "tmpfs" | "ext4" | "xfs" => Some(m.kind.as_str()),
        _ => {
            return Err(MountError::Unsupported {
                index,
                kind: m.kind.clone(),
                source_path: m.source.clone(),
            })
        }
    };
    let flags = flags | HOST_FLAGS;
    let err = |errno| MountError::Mount {
        kind: m.kind.clone(),
        source_path: m.source.clone(),
        target: host_path.to_path_buf(),
        errno,
    };
    let Some(kind) = kind else {
        // A bind gets its flags before it is attached, so the guest's view
        // (a propagated copy) has them too: see hostfs::detached.
        let recursive = m.kind == "rbind" || flags.contains(MsFlags::MS_REC);
        let source = nix::fcntl::open(
            m.source.as_str(),
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(err)?;
        // SAFETY: a new descriptor nothing else owns.
        let source = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(source) };
        let mut attrs = 0;
        for (flag, attr) in [
            (MsFlags::MS_RDONLY, detached::ATTR_RDONLY),
            (MsFlags::MS_NOSUID, detached::ATTR_NOSUID),
            (MsFlags::MS_NODEV, detached::ATTR_NODEV),
            (MsFlags::MS_NOEXEC, detached::ATTR_NOEXEC),
        ] {
            if flags.contains(flag) {
                attrs |= attr;
            }
        }
        return detached::bind(&source, target, recursive, attrs).map_err(|e| {
            err(nix::errno::Errno::from_raw(
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        });
    };
    let data_opt = (!data.is_empty()).then_some(data.as_str());
    let flags = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
    mount(
        Some(m.source.as_str()),
        &resolve::fd_path(target),
        Some(kind),
        flags,
        data_opt,
    )
    .map_err(err)?;
    Ok(())
}

/// Splits mount(8)-style options into flags and the filesystem's data string.
///
/// Not containerd-shim's `mount_rootfs`: it mounts onto a path (which a guest-writable
/// directory could redirect; here the target is an fd resolved with openat2), forks for
/// each mount, and keeps its option table private.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            // Asked-for suid/dev are not honoured on the host (HOST_FLAGS).
            "suid" | "dev" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options(&[
            "index=off".into(),
            "ro".into(),
            "lowerdir=/a:/b".into(),
            "nosuid".into(),
        ]);
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID));
        assert_eq!(d, "index=off,lowerdir=/a:/b");
        let (f, _) = parse_options(&["ro".into(), "rw".into()]);
        assert!(!f.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn unknown_types_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let fd = OwnedFd::from(std::fs::File::open(dir.path()).unwrap());
        let e = mount_one(
            0,
            &RootfsMount {
                kind: "zfs".into(),
                source: "pool/x".into(),
                options: vec![],
            },
            &fd,
            dir.path(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("zfs"), "{e}");
    }
}
