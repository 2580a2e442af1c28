//! Mounting containerd's rootfs (the snapshotter's overlayfs or bind mounts)
//! into the pod's shared directory, where virtio-fs exports it to the guest.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::state;

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
    #[error("creating mount point {path}: {source}")]
    MountPoint { path: PathBuf, source: io::Error },
}

/// One entry of `CreateTaskRequest.rootfs`, as containerd sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Mounts `mounts` on `target` in order (containerd's semantics: each one on
/// top of the last). On error, what was mounted is undone.
pub fn mount_rootfs(mounts: &[RootfsMount], target: &Path) -> Result<(), MountError> {
    fs::create_dir_all(target).map_err(|source| MountError::MountPoint {
        path: target.to_path_buf(),
        source,
    })?;
    for (index, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(index, m, target) {
            unmount_all(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Bind-mounts an existing directory (a bundle's prepared rootfs).
pub fn bind(source: &Path, target: &Path) -> Result<(), MountError> {
    let m = RootfsMount {
        kind: "bind".into(),
        source: source.to_string_lossy().into_owned(),
        options: vec!["rbind".into()],
    };
    mount_rootfs(&[m], target)
}

/// Unmounts everything at or below `target`.
pub fn unmount_all(target: &Path) {
    for m in state::mounts_under(target) {
        if umount2(&m, MntFlags::empty()).is_err() {
            // Busy (a late reader through virtio-fs): detach instead.
            let _ = umount2(&m, MntFlags::MNT_DETACH);
        }
    }
}

fn mount_one(index: usize, m: &RootfsMount, target: &Path) -> Result<(), MountError> {
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
    let mut flags = flags;
    if kind.is_none() {
        flags |= MsFlags::MS_BIND;
        if m.kind == "rbind" {
            flags |= MsFlags::MS_REC;
        }
    }
    let err = |errno| MountError::Mount {
        kind: m.kind.clone(),
        source_path: m.source.clone(),
        target: target.to_path_buf(),
        errno,
    };
    let data_opt = (!data.is_empty()).then_some(data.as_str());
    mount(Some(m.source.as_str()), target, kind, flags, data_opt).map_err(err)?;
    // A bind mount ignores MS_RDONLY on the first call: remount to apply it.
    if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// Splits mount(8)-style options into flags and the filesystem's data string.
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
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
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
        let e = mount_rootfs(
            &[RootfsMount {
                kind: "zfs".into(),
                source: "pool/x".into(),
                options: vec![],
            }],
            &dir.path().join("t"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("zfs"), "{e}");
    }
}
