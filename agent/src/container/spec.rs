//! Checking and adapting what the shim sends: container and exec ids, the
//! OCI spec and exec'ed processes, the rootfs path.
//!
//! The shim is on the other side of the VM boundary and is treated as
//! fallible (and, across a compromised host component, hostile): nothing it
//! sends may panic the agent, and a bad request gets an INVALID_ARGUMENT that
//! names the offending field instead of an obscure failure deep in the
//! runtime.
//!
//! The spec is written for the host's view of the world; a few parts are
//! rewritten for the guest:
//! - `root.path`: the rootfs as the guest sees it (on the virtio-fs share).
//! - `linux.cgroupsPath`: `/husk/<id>`, so stats, freezer and OOM watching
//!   know where to look whatever cgroup naming the host uses.
//! - a cgroup namespace is added when the spec has none, so the container
//!   reads its own limits at /sys/fs/cgroup.
//! - the network namespace is dropped: the VM is the pod, and the guest's
//!   network namespace (the one the agent configures) is the pod's network;
//!   its `net.*` sysctls are the agent's to set there ([`super::sysctl`]).
//! - `process.terminal` follows the request's `terminal`.
//! - `process.user.username`, if given, is resolved in the container's own
//!   /etc/passwd and /etc/group.
//!
//! A seccomp profile is left for libcontainer, which is built with its
//! `libseccomp` feature so the profile is enforced, never skipped.

use std::{
    fs,
    io::Read,
    path::{Component, Path, PathBuf},
};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Process, Spec, User};

use super::error::{Error, Result};

/// Longest container or exec id accepted.
pub const MAX_ID_LEN: usize = 128;
/// Largest /etc/passwd or /etc/group read for a user name.
const MAX_USER_DB: u64 = 1 << 20;

/// The cgroup (below the cgroup2 root) of container `id`.
pub fn cgroups_path(id: &str) -> PathBuf {
    Path::new("/husk").join(id)
}

/// Ids become file and cgroup names: the characters libcontainer allows,
/// bounded in length.
pub fn validate_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{field} is empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(format!(
            "{field} is longer than {MAX_ID_LEN} characters"
        )));
    }
    if id == "." || id == ".." {
        return Err(Error::invalid(format!("{field} {id:?} is not a valid id")));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.')))
    {
        return Err(Error::invalid(format!(
            "{field} {id:?} contains {c:?}; allowed are A-Z a-z 0-9 _ + - ."
        )));
    }
    Ok(())
}

/// The container's rootfs in the guest: `requested` relative to the share
/// (default `<id>/rootfs`), or an absolute guest path. It must be a
/// directory.
pub fn resolve_rootfs(requested: &str, id: &str, share: Option<&Path>) -> Result<PathBuf> {
    let requested = if requested.is_empty() {
        format!("{id}/rootfs")
    } else {
        requested.to_string()
    };
    let path = Path::new(&requested);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(Error::invalid(format!(
            "rootfs {requested:?} contains \"..\""
        )));
    }
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        let share = share.ok_or_else(|| {
            Error::precondition(format!(
                "rootfs {requested:?} is relative to the sandbox share, but no sandbox was \
                 created (CreateSandbox) yet"
            ))
        })?;
        share.join(path)
    };
    match fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        Ok(_) => Err(Error::invalid(format!(
            "rootfs {} is not a directory",
            path.display()
        ))),
        Err(e) => Err(Error::invalid(format!("rootfs {}: {e}", path.display()))),
    }
}

/// Parses the spec JSON; serde's message names the missing or mistyped
/// field and where it is.
pub fn parse_spec(json: &[u8]) -> Result<Spec> {
    if json.is_empty() {
        return Err(Error::invalid("oci_spec is empty"));
    }
    serde_json::from_slice(json).map_err(|e| Error::invalid(format!("oci_spec: {e}")))
}

/// What [`prepare_spec`] needs besides the spec.
pub struct SpecContext<'a> {
    pub id: &'a str,
    pub rootfs: &'a Path,
    pub terminal: bool,
    /// The sandbox share, against which relative bind-mount sources resolve.
    pub share: Option<&'a Path>,
}

/// Validates `spec` and adapts it to the guest (see the module docs).
pub fn prepare_spec(mut spec: Spec, cx: &SpecContext<'_>) -> Result<Spec> {
    if !spec.version().starts_with("1.") {
        return Err(Error::invalid(format!(
            "oci_spec.ociVersion {:?} is not supported (1.x only)",
            spec.version()
        )));
    }
    let Some(root) = spec.root_mut() else {
        return Err(Error::invalid("oci_spec.root is missing"));
    };
    root.set_path(cx.rootfs.to_path_buf());

    let Some(process) = spec.process_mut() else {
        return Err(Error::invalid("oci_spec.process is missing"));
    };
    check_process(process, "oci_spec.process")?;
    process.set_terminal(Some(cx.terminal));
    resolve_user(process.user_mut(), cx.rootfs, "oci_spec.process.user")?;

    if let Some(mounts) = spec.mounts_mut() {
        for (i, m) in mounts.iter_mut().enumerate() {
            if !m.destination().is_absolute() {
                return Err(Error::invalid(format!(
                    "oci_spec.mounts[{i}].destination {:?} is not absolute",
                    m.destination()
                )));
            }
            let is_bind = m.typ().as_deref() == Some("bind")
                || m.options()
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
            if !is_bind {
                continue;
            }
            let Some(source) = m.source().clone() else {
                return Err(Error::invalid(format!(
                    "oci_spec.mounts[{i}] is a bind mount without a source"
                )));
            };
            let source = if source.is_absolute() {
                source
            } else {
                // The host's bundle is not in the guest; what the shim shares
                // for the container (hosts, resolv.conf, volumes) is on the
                // share, so a relative source means "on the share".
                match cx.share {
                    Some(share) if !source.components().any(|c| c == Component::ParentDir) => {
                        share.join(source)
                    }
                    _ => {
                        return Err(Error::invalid(format!(
                            "oci_spec.mounts[{i}].source {source:?} is relative and there is no \
                             sandbox share to resolve it against"
                        )))
                    }
                }
            };
            if fs::symlink_metadata(&source).is_err() {
                return Err(Error::invalid(format!(
                    "oci_spec.mounts[{i}].source {} does not exist in the guest",
                    source.display()
                )));
            }
            m.set_source(Some(source));
        }
    }

    let Some(linux) = spec.linux_mut() else {
        return Err(Error::invalid("oci_spec.linux is missing"));
    };
    linux.set_cgroups_path(Some(cgroups_path(cx.id)));
    let namespaces = linux.namespaces_mut().get_or_insert_with(Vec::new);
    // Its own cgroup namespace, always: the container's /sys/fs/cgroup is then its own
    // cgroup, whose memory.max and cpu.max are what JVMs, Go and Node size themselves by
    // (containerd's ctr and CRI on some set-ups send none; the guest's root cgroup has no
    // limits to read).
    if !namespaces
        .iter()
        .any(|ns| ns.typ() == LinuxNamespaceType::Cgroup)
    {
        let mut cgroup = LinuxNamespace::default();
        cgroup.set_typ(LinuxNamespaceType::Cgroup);
        namespaces.push(cgroup);
    }
    namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
    for (i, ns) in namespaces.iter().enumerate() {
        if let Some(path) = ns.path() {
            if !path.exists() {
                return Err(Error::invalid(format!(
                    "oci_spec.linux.namespaces[{i}].path {} does not exist in the guest",
                    path.display()
                )));
            }
        }
    }
    Ok(spec)
}

/// Parses and checks the OCI Process of an exec.
pub fn parse_process(json: &[u8], terminal: bool, rootfs: &Path) -> Result<Process> {
    if json.is_empty() {
        return Err(Error::invalid("process is empty"));
    }
    let mut process: Process =
        serde_json::from_slice(json).map_err(|e| Error::invalid(format!("process: {e}")))?;
    check_process(&process, "process")?;
    process.set_terminal(Some(terminal));
    resolve_user(process.user_mut(), rootfs, "process.user")?;
    Ok(process)
}

fn check_process(process: &Process, field: &str) -> Result<()> {
    match process.args() {
        Some(args) if !args.is_empty() => {}
        _ => return Err(Error::invalid(format!("{field}.args is empty"))),
    }
    if !process.cwd().is_absolute() {
        return Err(Error::invalid(format!(
            "{field}.cwd {:?} is not absolute",
            process.cwd()
        )));
    }
    Ok(())
}

/// Fills uid, gid and (unless given) the supplementary groups from a user
/// name, looked up in the container's own /etc/passwd and /etc/group, as the
/// image defines them. Numeric ids need nothing.
fn resolve_user(user: &mut User, rootfs: &Path, field: &str) -> Result<()> {
    let Some(name) = user.username().clone().filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    let passwd = read_user_db(&rootfs.join("etc/passwd"))
        .map_err(|e| Error::invalid(format!("{field}.username {name:?}: {e}")))?;
    let (uid, gid) = lookup_passwd(&passwd, &name).ok_or_else(|| {
        Error::invalid(format!(
            "{field}.username {name:?} is not in the container's /etc/passwd"
        ))
    })?;
    user.set_uid(uid);
    user.set_gid(gid);
    if user.additional_gids().is_none() {
        // A missing /etc/group just means no supplementary groups.
        if let Ok(group) = read_user_db(&rootfs.join("etc/group")) {
            let gids = groups_of(&group, &name, gid);
            if !gids.is_empty() {
                user.set_additional_gids(Some(gids));
            }
        }
    }
    // Resolved; libcontainer works with the numbers.
    user.set_username(None);
    Ok(())
}

fn read_user_db(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    fs::File::open(path)?
        .take(MAX_USER_DB)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// uid and gid of `name` in passwd(5) text.
pub fn lookup_passwd(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != name {
            return None;
        }
        let _password = f.next()?;
        let uid = f.next()?.trim().parse().ok()?;
        let gid = f.next()?.trim().parse().ok()?;
        Some((uid, gid))
    })
}

/// Groups in group(5) text that list `name` as a member, other than its
/// primary group.
pub fn groups_of(group: &str, name: &str, primary: u32) -> Vec<u32> {
    group
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let gid: u32 = f.get(2)?.trim().parse().ok()?;
            let members = f.get(3)?;
            (gid != primary && members.split(',').any(|m| m.trim() == name)).then_some(gid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "cgroupsPath": "/k8s.io/abc",
            "namespaces": [
                {"type": "pid"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1234"}
            ]
        }
    }"#;

    fn cx<'a>(rootfs: &'a Path, share: Option<&'a Path>) -> SpecContext<'a> {
        SpecContext {
            id: "c1",
            rootfs,
            terminal: true,
            share,
        }
    }

    fn prepare(json: &str, rootfs: &Path) -> Result<Spec> {
        prepare_spec(parse_spec(json.as_bytes())?, &cx(rootfs, None))
    }

    fn invalid_message(r: Result<Spec>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn ids() {
        for good in ["a", "abc-DEF_1.2+3", &"x".repeat(MAX_ID_LEN)] {
            validate_id("container_id", good).unwrap();
        }
        for (bad, says) in [
            ("", "is empty"),
            (".", "not a valid id"),
            ("..", "not a valid id"),
            ("a/b", "'/'"),
            ("a b", "' '"),
            (&"x".repeat(MAX_ID_LEN + 1), "longer than"),
        ] {
            let e = validate_id("exec_id", bad).unwrap_err().to_string();
            assert!(e.starts_with("exec_id") && e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn adapts_a_valid_spec_to_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let spec = prepare(MINIMAL, dir.path()).unwrap();
        let root = spec.root().as_ref().unwrap();
        assert_eq!(root.path(), dir.path());
        assert_eq!(root.readonly(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("/husk/c1")));
        let types: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert_eq!(
            types,
            [
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Cgroup
            ],
            "the host's network namespace dropped, a cgroup namespace added"
        );
        assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(true));
    }

    #[test]
    fn malformed_json_names_the_problem() {
        let e = invalid_message(prepare("{not json", Path::new("/")));
        assert!(e.starts_with("oci_spec: "), "{e}");
        let e = invalid_message(prepare(r#"{"ociVersion": 1}"#, Path::new("/")));
        assert!(e.contains("invalid type"), "{e}");
        let e = invalid_message(prepare("", Path::new("/")));
        assert_eq!(e, "oci_spec is empty");
    }

    #[test]
    fn missing_parts_are_named() {
        let spec: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
        for (remove, says) in [
            ("root", "oci_spec.root is missing"),
            ("process", "oci_spec.process is missing"),
            ("linux", "oci_spec.linux is missing"),
        ] {
            let mut s = spec.clone();
            s.as_object_mut().unwrap().remove(remove);
            let e = invalid_message(prepare(&s.to_string(), Path::new("/")));
            assert_eq!(e, says);
        }
        let mut s = spec.clone();
        s["ociVersion"] = "0.9".into();
        let e = invalid_message(prepare(&s.to_string(), Path::new("/")));
        assert!(e.contains("oci_spec.ociVersion"), "{e}");
        let mut s = spec.clone();
        s["process"]["args"] = serde_json::json!([]);
        let e = invalid_message(prepare(&s.to_string(), Path::new("/")));
        assert_eq!(e, "oci_spec.process.args is empty");
        let mut s = spec.clone();
        s["process"]["cwd"] = "relative".into();
        let e = invalid_message(prepare(&s.to_string(), Path::new("/")));
        assert!(e.contains("oci_spec.process.cwd"), "{e}");
    }

    #[test]
    fn bad_mounts_and_namespace_paths_are_named() {
        let spec: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
        let mut s = spec.clone();
        s["mounts"][0]["destination"] = "proc".into();
        let e = invalid_message(prepare(&s.to_string(), Path::new("/")));
        assert!(e.contains("oci_spec.mounts[0].destination"), "{e}");

        let mut s = spec.clone();
        s["mounts"] = serde_json::json!([{
            "destination": "/etc/hosts", "type": "bind",
            "source": "/nonexistent/hosts", "options": ["rbind"]
        }]);
        let e = invalid_message(prepare(&s.to_string(), Path::new("/")));
        assert!(e.contains("oci_spec.mounts[0].source") && e.contains("does not exist"));

        let mut s = spec.clone();
        s["linux"]["namespaces"] =
            serde_json::json!([{"type": "ipc", "path": "/proc/999999999/ns/ipc"}]);
        let e = invalid_message(prepare(&s.to_string(), Path::new("/")));
        assert!(e.contains("oci_spec.linux.namespaces[0].path"), "{e}");
    }

    #[test]
    fn relative_bind_sources_resolve_on_the_share() {
        let share = tempfile::tempdir().unwrap();
        fs::create_dir_all(share.path().join("c1")).unwrap();
        fs::write(share.path().join("c1/hosts"), "").unwrap();
        let mut s: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
        s["mounts"] = serde_json::json!([{
            "destination": "/etc/hosts", "source": "c1/hosts", "options": ["rbind", "ro"]
        }]);
        let spec = parse_spec(s.to_string().as_bytes()).unwrap();
        let spec = prepare_spec(spec, &cx(Path::new("/"), Some(share.path()))).unwrap();
        let m = &spec.mounts().as_ref().unwrap()[0];
        assert_eq!(
            m.source().as_deref(),
            Some(share.path().join("c1/hosts").as_path())
        );
    }

    #[test]
    fn rootfs_paths() {
        let share = tempfile::tempdir().unwrap();
        fs::create_dir_all(share.path().join("c1/rootfs")).unwrap();
        assert_eq!(
            resolve_rootfs("", "c1", Some(share.path())).unwrap(),
            share.path().join("c1/rootfs")
        );
        assert_eq!(
            resolve_rootfs("c1/rootfs", "c1", Some(share.path())).unwrap(),
            share.path().join("c1/rootfs")
        );
        let abs = share.path().join("c1/rootfs");
        assert_eq!(
            resolve_rootfs(abs.to_str().unwrap(), "c1", None).unwrap(),
            abs
        );
        assert!(matches!(
            resolve_rootfs("c1/rootfs", "c1", None),
            Err(Error::FailedPrecondition(_))
        ));
        for bad in ["../etc", "c1/../../x", "c2/rootfs"] {
            let e = resolve_rootfs(bad, "c1", Some(share.path())).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
            assert!(e.to_string().starts_with("rootfs"), "{e}");
        }
    }

    #[test]
    fn exec_process() {
        let p = parse_process(
            br#"{"args": ["ls"], "cwd": "/tmp", "terminal": true, "user": {"uid": 0, "gid": 0}}"#,
            false,
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(p.terminal(), Some(false));
        let e = parse_process(
            br#"{"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
            false,
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "process.args is empty");
        let e = parse_process(b"[]", false, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("process: "), "{e}");
        let e = parse_process(br#"{"args": ["ls"], "cwd": "/"}"#, false, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `user`"), "{e}");
    }

    #[test]
    fn user_names_resolve_in_the_container() {
        let rootfs = tempfile::tempdir().unwrap();
        fs::create_dir_all(rootfs.path().join("etc")).unwrap();
        fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34:www:/var/www:/bin/false\n",
        )
        .unwrap();
        fs::write(
            rootfs.path().join("etc/group"),
            "root:x:0:\nwww:x:34:\nadm:x:4:www,other\nstaff:x:50:other\n",
        )
        .unwrap();
        let p = parse_process(
            br#"{"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0, "username": "www"}}"#,
            false,
            rootfs.path(),
        )
        .unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (33, 34));
        assert_eq!(p.user().additional_gids().as_deref(), Some(&[4][..]));
        assert_eq!(p.user().username(), &None);

        let e = parse_process(
            br#"{"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0, "username": "nobody"}}"#,
            false,
            rootfs.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("process.user.username \"nobody\""), "{e}");
    }
}
