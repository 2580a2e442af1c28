//! The parts of a container's OCI spec that name host objects, rewritten so
//! that they mean something inside the pod VM.
//!
//! CRI writes specs for a runtime that shares the host's kernel:
//! - bind mounts of host files and directories (`/etc/hosts`,
//!   `/etc/resolv.conf`, `/etc/hostname` from CRI's sandbox directory,
//!   volumes): the guest cannot see the host's paths, so each source is
//!   bind-mounted into the container's directory on the pod share
//!   (`<id>/mounts/<n>`, made by [`crate::pod_share`]) and the spec names it
//!   relative to the share, which the agent resolves on its virtio-fs mount.
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

use std::path::{Component, PathBuf};

use serde_json::{json, Value};

pub use crate::pod_share::HostBind;

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
}

/// The rewritten spec and the binds it relies on.
#[derive(Debug)]
pub struct GuestSpec {
    pub json: Vec<u8>,
    pub binds: Vec<HostBind>,
}

/// Rewrites the spec of container `id` (see the module docs).
/// `sandbox_guest_pid` is the guest pid of the pod's sandbox container, if it
/// runs.
pub fn adapt(
    spec_json: &[u8],
    id: &str,
    sandbox_guest_pid: Option<u32>,
) -> Result<GuestSpec, GuestSpecError> {
    let mut spec: Value =
        serde_json::from_slice(spec_json).map_err(|e| GuestSpecError::Json(e.to_string()))?;
    let mut binds = Vec::new();
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for (index, m) in mounts.iter_mut().enumerate() {
            if let Some(bind) = adapt_mount(index, m, id)? {
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

fn adapt_mount(index: usize, m: &mut Value, id: &str) -> Result<Option<HostBind>, GuestSpecError> {
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
    let bind = HostBind {
        source,
        index,
        readonly: options.iter().any(|o| o == "ro"),
    };
    obj.insert("source".into(), json!(bind.guest_path(id)));
    Ok(Some(bind))
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
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
        let g = adapt(&s, "c1", None).unwrap();
        assert_eq!(
            g.binds,
            vec![HostBind {
                source: hosts,
                index: 1,
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
        let e = adapt(&s, "c1", None).unwrap_err().to_string();
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
        let g = adapt(&s, "c1", Some(7)).unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(v["linux"]["namespaces"][0]["path"], "/proc/7/ns/ipc");
        assert_eq!(v["linux"]["namespaces"][1]["path"], "/proc/7/ns/uts");
        assert_eq!(
            v["linux"]["namespaces"][2]["path"], "/proc/4242/ns/net",
            "left for the agent, which drops the network namespace"
        );
        assert!(v["linux"]["namespaces"][3].get("path").is_none());

        let g = adapt(&s, "c1", None).unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert!(v["linux"]["namespaces"][0].get("path").is_none());
    }
}
