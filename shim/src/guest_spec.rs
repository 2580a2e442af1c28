//! The parts of a container's OCI spec that name host objects, rewritten so
//! that they mean something inside the pod VM.
//!
//! CRI writes specs for a runtime that shares the host's kernel:
//! - bind mounts of host files and directories (`/etc/hosts`,
//!   `/etc/resolv.conf`, `/etc/hostname` from CRI's sandbox directory,
//!   volumes): the guest cannot see the host's paths, so each source is
//!   bind-mounted into the container's directory on the pod share
//!   (`<share>/<id>/mounts/<n>`) and the spec names it relative to the share,
//!   which the agent resolves on its virtio-fs mount.
//! - `/dev/shm` bound from the sandbox's host tmpfs: shared memory through
//!   virtio-fs would not be shared memory at all, so the container gets a
//!   tmpfs of its own in the guest.
//! - namespaces joined by path (`/proc/<pause pid>/ns/ipc`, `.../uts`,
//!   `.../pid` for a shared PID namespace): the pid is the one the shim gave
//!   containerd for the sandbox task, the VM's host pid, so the path names a
//!   host namespace. It is pointed at the sandbox container's process in
//!   the guest, so pod members share IPC and UTS (hostname) inside the VM as
//!   they would on the host; without a sandbox container the path is dropped
//!   (a namespace of the container's own). The network namespace is left for
//!   the agent, which drops it: the VM is the pod's network.

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, MsFlags};
use serde_json::{json, Value};

/// Namespaces that CRI shares between a pod's containers by path.
const POD_NAMESPACES: [&str; 3] = ["ipc", "uts", "pid"];

#[derive(Debug, thiserror::Error)]
pub enum GuestSpecError {
    #[error("config.json is not valid JSON: {0}")]
    Json(String),
    #[error(
        "mounts[{index}] ({destination}): bind source {source_path} does not exist on the host"
    )]
    MissingSource {
        index: usize,
        destination: String,
        source_path: PathBuf,
    },
    #[error("mounts[{index}] ({destination}): bind source {source_path} contains \"..\"")]
    BadSource {
        index: usize,
        destination: String,
        source_path: PathBuf,
    },
    #[error("sharing host {source_path} with the guest at {target}: {reason}")]
    Share {
        source_path: PathBuf,
        target: PathBuf,
        reason: String,
    },
}

/// A host path to bind into the pod share before the container is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub source: PathBuf,
    /// The mount point below the share.
    pub target: PathBuf,
    pub readonly: bool,
}

/// The rewritten spec and the binds it relies on.
#[derive(Debug)]
pub struct GuestSpec {
    pub json: Vec<u8>,
    pub binds: Vec<HostBind>,
}

/// Rewrites the spec of container `id` (see the module docs). `share` is the
/// pod's shared directory on the host; `sandbox_guest_pid` is the guest pid
/// of the pod's sandbox container, if it runs.
pub fn adapt(
    spec_json: &[u8],
    id: &str,
    share: &Path,
    sandbox_guest_pid: Option<u32>,
) -> Result<GuestSpec, GuestSpecError> {
    let mut spec: Value =
        serde_json::from_slice(spec_json).map_err(|e| GuestSpecError::Json(e.to_string()))?;
    let mut binds = Vec::new();
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for (index, m) in mounts.iter_mut().enumerate() {
            if let Some(bind) = adapt_mount(index, m, id, share)? {
                binds.push(bind);
            }
        }
    }
    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        for ns in namespaces.iter_mut() {
            let kind = ns
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if !POD_NAMESPACES.contains(&kind.as_str()) || ns.get("path").is_none() {
                continue;
            }
            let Some(obj) = ns.as_object_mut() else {
                continue;
            };
            match sandbox_guest_pid {
                Some(pid) if pid > 0 => {
                    obj.insert("path".into(), json!(format!("/proc/{pid}/ns/{kind}")));
                }
                _ => {
                    obj.remove("path");
                }
            }
        }
    }
    let json = serde_json::to_vec(&spec).map_err(|e| GuestSpecError::Json(e.to_string()))?;
    Ok(GuestSpec { json, binds })
}

fn adapt_mount(
    index: usize,
    m: &mut Value,
    id: &str,
    share: &Path,
) -> Result<Option<HostBind>, GuestSpecError> {
    let options: Vec<String> = m
        .get("options")
        .and_then(Value::as_array)
        .map(|o| {
            o.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
        || options.iter().any(|o| o == "bind" || o == "rbind");
    let Some(source) = m.get("source").and_then(Value::as_str).map(PathBuf::from) else {
        return Ok(None);
    };
    if !is_bind || !source.is_absolute() {
        return Ok(None);
    }
    let destination = m
        .get("destination")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(obj) = m.as_object_mut() else {
        return Ok(None);
    };
    if destination == "/dev/shm" {
        obj.insert("type".into(), json!("tmpfs"));
        obj.insert("source".into(), json!("shm"));
        obj.insert(
            "options".into(),
            json!(["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        );
        return Ok(None);
    }
    if source.components().any(|c| c == Component::ParentDir) {
        return Err(GuestSpecError::BadSource {
            index,
            destination,
            source_path: source,
        });
    }
    if std::fs::symlink_metadata(&source).is_err() {
        return Err(GuestSpecError::MissingSource {
            index,
            destination,
            source_path: source,
        });
    }
    let relative = PathBuf::from(id).join("mounts").join(index.to_string());
    obj.insert("source".into(), json!(relative.to_string_lossy()));
    Ok(Some(HostBind {
        source,
        target: share.join(relative),
        readonly: options.iter().any(|o| o == "ro"),
    }))
}

/// Makes the binds (mount points are created: a file for a file source, a
/// directory otherwise). On error, the binds made so far are undone.
pub fn share_binds(binds: &[HostBind]) -> Result<(), GuestSpecError> {
    for (i, b) in binds.iter().enumerate() {
        if let Err(e) = share_one(b) {
            unshare_binds(&binds[..i]);
            return Err(e);
        }
    }
    Ok(())
}

fn share_one(b: &HostBind) -> Result<(), GuestSpecError> {
    let err = |reason: String| GuestSpecError::Share {
        source_path: b.source.clone(),
        target: b.target.clone(),
        reason,
    };
    let parent = b.target.parent().ok_or_else(|| err("no parent".into()))?;
    std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    let is_dir = std::fs::metadata(&b.source)
        .map_err(|e| err(e.to_string()))?
        .is_dir();
    if is_dir {
        std::fs::create_dir_all(&b.target).map_err(|e| err(e.to_string()))?;
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&b.target)
            .map_err(|e| err(e.to_string()))?;
    }
    let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(
        Some(&b.source),
        &b.target,
        None::<&str>,
        flags,
        None::<&str>,
    )
    .map_err(|e| err(e.to_string()))?;
    if b.readonly {
        // A bind ignores MS_RDONLY until remounted: the host copy stays
        // read-only even to a guest that ignores the spec's "ro".
        if let Err(e) = mount(
            None::<&str>,
            &b.target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            unshare_binds(std::slice::from_ref(b));
            return Err(err(e.to_string()));
        }
    }
    Ok(())
}

/// Unmounts the binds and removes their mount points (never what is below a
/// mount that would not go: only empty directories and unmounted files).
pub fn unshare_binds(binds: &[HostBind]) {
    for b in binds.iter().rev() {
        crate::mount::unmount_all(&b.target);
        if !crate::state::mounts_under(&b.target).is_empty() {
            tracing::warn!(target = %b.target.display(), "bind still mounted; left in place");
            continue;
        }
        match std::fs::symlink_metadata(&b.target) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir(&b.target);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&b.target);
            }
            Err(_) => {}
        }
    }
    if let Some(mounts_dir) = binds.first().and_then(|b| b.target.parent()) {
        let _ = std::fs::remove_dir(mounts_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: Value, namespaces: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "mounts": mounts,
            "linux": {"namespaces": namespaces}
        }))
        .unwrap()
    }

    #[test]
    fn host_binds_move_onto_the_share_and_shm_becomes_tmpfs() {
        let host = tempfile::tempdir().unwrap();
        let hosts = host.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let s = spec(
            json!([
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
                {"destination": "/data", "source": "c1/volume", "options": ["rbind"]}
            ]),
            json!([]),
        );
        let g = adapt(&s, "c1", Path::new("/share"), None).unwrap();
        assert_eq!(
            g.binds,
            vec![HostBind {
                source: hosts,
                target: PathBuf::from("/share/c1/mounts/1"),
                readonly: true
            }]
        );
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(v["mounts"][0]["source"], "proc");
        assert_eq!(v["mounts"][1]["source"], "c1/mounts/1");
        assert_eq!(v["mounts"][2]["type"], "tmpfs");
        assert_eq!(v["mounts"][3]["source"], "c1/volume", "already relative");
    }

    #[test]
    fn missing_host_sources_are_named() {
        let s = spec(
            json!([{"destination": "/etc/hosts", "type": "bind", "source": "/nonexistent/hosts"}]),
            json!([]),
        );
        let e = adapt(&s, "c1", Path::new("/share"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mounts[0]") && e.contains("/nonexistent/hosts"),
            "{e}"
        );
    }

    #[test]
    fn pod_namespaces_point_at_the_sandbox_in_the_guest() {
        let s = spec(
            json!([]),
            json!([
                {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                {"type": "uts", "path": "/proc/4242/ns/uts"},
                {"type": "network", "path": "/proc/4242/ns/net"},
                {"type": "mount"}
            ]),
        );
        let g = adapt(&s, "c1", Path::new("/share"), Some(7)).unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(v["linux"]["namespaces"][0]["path"], "/proc/7/ns/ipc");
        assert_eq!(v["linux"]["namespaces"][1]["path"], "/proc/7/ns/uts");
        assert_eq!(
            v["linux"]["namespaces"][2]["path"], "/proc/4242/ns/net",
            "left for the agent, which drops the network namespace"
        );
        assert!(v["linux"]["namespaces"][3].get("path").is_none());

        let g = adapt(&s, "c1", Path::new("/share"), None).unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert!(v["linux"]["namespaces"][0].get("path").is_none());
    }

    #[test]
    fn binds_are_shared_and_undone() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED binds_are_shared_and_undone: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(&file, "nameserver 10.0.0.1\n").unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("f"), "x").unwrap();
        let share = dir.path().join("share");
        let binds = vec![
            HostBind {
                source: file.clone(),
                target: share.join("c1/mounts/0"),
                readonly: true,
            },
            HostBind {
                source: vol.clone(),
                target: share.join("c1/mounts/1"),
                readonly: false,
            },
        ];
        share_binds(&binds).unwrap();
        assert_eq!(
            std::fs::read_to_string(share.join("c1/mounts/0")).unwrap(),
            "nameserver 10.0.0.1\n"
        );
        assert!(
            std::fs::write(share.join("c1/mounts/0"), "y").is_err(),
            "ro"
        );
        assert!(share.join("c1/mounts/1/f").is_file());
        unshare_binds(&binds);
        assert!(!share.join("c1/mounts").exists());
        assert!(vol.join("f").is_file(), "the host's files stay");
        assert!(file.is_file());
    }
}
