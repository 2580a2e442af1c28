//! The pod VM's host cgroup.
//!
//! containerd's CRI plugin answers PodSandboxStats from the host cgroup of the pod (kubelet's
//! `cgroup_parent`), not from the shim; kubelet also enforces the pod's limits (containers'
//! plus the RuntimeClass overhead) there. A husk pod's cost on the host is its VM's
//! processes, so those processes live in the sandbox container's `linux.cgroupsPath`, a child
//! of that pod cgroup: stats then show what the pod really costs and its limits apply to it.
//!
//! Processes join from inside the child between fork and exec (writing `0` to the cgroup's
//! `cgroup.procs` through descriptors opened beforehand), not after spawn: in cgroup v1
//! memory already charged elsewhere does not move with a process, and QEMU allocates as soon
//! as it runs. That is also why this is not done with a cgroup manager crate, whose
//! `add_task` runs after the fact.

use std::{
    fs, io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use tracing::{debug, warn};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// v1 hierarchies whose numbers CRI reports or whose limits kubelet sets. cpuset is left
/// out: a new v1 cpuset cgroup has no CPUs until someone gives it some.
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "blkio"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroupsPath {path:?}: {reason}")]
    BadPath { path: String, reason: String },
    #[error("no cgroup hierarchy mounted under {CGROUP_ROOT}")]
    NoHierarchy,
    #[error("creating cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
}

/// The directories of one cgroup (one per hierarchy in v1, one in v2), created and ready
/// for processes to join.
#[derive(Debug)]
pub struct PodCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<OwnedFd>,
}

impl PodCgroup {
    /// Creates the cgroup named by an OCI `linux.cgroupsPath`: a path (absolute or relative
    /// to each hierarchy's root) or systemd's `slice:prefix:name`.
    pub fn create(cgroups_path: &str) -> Result<PodCgroup, CgroupError> {
        let rel = relative_path(cgroups_path)?;
        let roots = hierarchy_roots()?;
        let mut cg = PodCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        for root in roots {
            if let Err(e) = cg.add_hierarchy(&root.join(&rel)) {
                remove_dirs(&cg.dirs);
                return Err(e);
            }
        }
        debug!(dirs = ?cg.dirs, "pod cgroup ready");
        Ok(cg)
    }

    fn add_hierarchy(&mut self, dir: &Path) -> Result<(), CgroupError> {
        fs::create_dir_all(dir).map_err(|source| CgroupError::Create {
            path: dir.to_path_buf(),
            source,
        })?;
        self.dirs.push(dir.to_path_buf());
        let procs = dir.join("cgroup.procs");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|source| CgroupError::Create {
                path: procs,
                source,
            })?;
        self.procs.push(f.into());
        Ok(())
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Descriptors for [`join_self`], to call between fork and exec.
    pub fn procs_fds(&self) -> Vec<i32> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` files are open as `fds`.
/// Only async-signal-safe calls: it runs in a forked child of a multi-threaded process.
pub fn join_self(fds: &[i32]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: write(2) on a descriptor the parent opened and keeps open; the buffer is a
        // static string.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Removes cgroup directories once their processes are gone: the kernel frees a cgroup a
/// moment after its last process is reaped, so EBUSY is retried for a while.
pub fn remove_dirs(dirs: &[PathBuf]) {
    for dir in dirs {
        let mut tries = 0;
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    warn!("removing cgroup {}: {e}", dir.display());
                    break;
                }
            }
        }
    }
}

/// `cgroupsPath` as a path relative to a hierarchy's root, with nothing that climbs out.
fn relative_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = |reason: &str| CgroupError::BadPath {
        path: cgroups_path.to_string(),
        reason: reason.to_string(),
    };
    let expanded = if cgroups_path.contains(':') {
        systemd_path(cgroups_path).ok_or_else(|| bad("not slice:prefix:name"))?
    } else {
        PathBuf::from(cgroups_path)
    };
    let mut rel = PathBuf::new();
    for c in expanded.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            Component::ParentDir | Component::Prefix(_) => return Err(bad("contains ..")),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(bad("names the root cgroup"));
    }
    Ok(rel)
}

/// systemd's `slice:prefix:name` as the path systemd gives that unit:
/// `kubepods-besteffort-pod1.slice:cri-containerd:abc` is
/// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope`.
fn systemd_path(s: &str) -> Option<PathBuf> {
    let mut parts = s.splitn(3, ':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if name.is_empty() || name.contains('/') || prefix.contains('/') || slice.contains('/') {
        return None;
    }
    let mut path = PathBuf::new();
    if !slice.is_empty() && slice != "-.slice" {
        let stem = slice.strip_suffix(".slice")?;
        if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
            return None;
        }
        let mut acc = String::new();
        for part in stem.split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            path.push(format!("{acc}.slice"));
        }
    }
    let unit = if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    path.push(unit);
    Some(path)
}

/// The roots to create the cgroup under: the unified hierarchy alone when /sys/fs/cgroup is
/// cgroup2, otherwise (legacy or hybrid, where containerd reads v1) each v1 hierarchy of
/// [`V1_CONTROLLERS`].
pub fn hierarchy_roots() -> Result<Vec<PathBuf>, CgroupError> {
    // As bytes: a guest can put a non-UTF-8 name into the host's mountinfo
    // (a directory it renames below a mount), and that must not hide the
    // cgroup hierarchies from every later pod.
    let entries = crate::hostfs::mountinfo::read().unwrap_or_default();
    let roots = roots_from_mountinfo(&entries);
    if roots.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok(roots)
}

fn roots_from_mountinfo(entries: &[crate::hostfs::mountinfo::MountEntry]) -> Vec<PathBuf> {
    let mut v1 = Vec::new();
    for e in entries {
        match e.fs_type.as_str() {
            "cgroup2" if e.mount_point == Path::new(CGROUP_ROOT) => {
                return vec![PathBuf::from(CGROUP_ROOT)];
            }
            "cgroup"
                if e.mount_point.starts_with(CGROUP_ROOT)
                    && e.super_options
                        .split(',')
                        .any(|o| V1_CONTROLLERS.contains(&o))
                    && !v1.contains(&e.mount_point) =>
            {
                v1.push(e.mount_point.clone());
            }
            _ => {}
        }
    }
    v1
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn paths_resolve_under_the_hierarchy() {
        assert_eq!(
            relative_path("/kubepods/besteffort/pod1/abc").unwrap(),
            PathBuf::from("kubepods/besteffort/pod1/abc")
        );
        assert_eq!(
            relative_path("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_path("system.slice:husk:x").unwrap(),
            PathBuf::from("system.slice/husk-x.scope")
        );
    }

    #[test]
    fn escaping_or_malformed_paths_are_refused() {
        for p in [
            "/kubepods/../../etc",
            "..",
            "/",
            "",
            "a.slice:p:../x",
            "nota-slice:p:x",
            "a--b.slice:p:x",
            "a.slice:p:",
        ] {
            let e = relative_path(p).expect_err(p);
            assert!(e.to_string().contains("cgroupsPath"), "{p}: {e}");
        }
    }

    #[test]
    fn hierarchies_come_from_mountinfo() {
        let hybrid = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw shared:9 - cgroup cgroup rw,cpu,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
35 30 0:31 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";
        let parse = |t: &str| crate::hostfs::mountinfo::parse(t.as_bytes());
        let mut hostile = hybrid.as_bytes().to_vec();
        hostile.extend_from_slice(
            b"91 22 0:45 / /run/husk/p/mounts/\xff\xfe/x rw - overlay overlay rw\n",
        );
        assert_eq!(
            roots_from_mountinfo(&crate::hostfs::mountinfo::parse(&hostile)).len(),
            2,
            "a non-UTF-8 mount point hides nothing"
        );
        assert_eq!(
            roots_from_mountinfo(&parse(hybrid)),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                PathBuf::from("/sys/fs/cgroup/memory")
            ]
        );
        let unified = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            roots_from_mountinfo(&parse(unified)),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
        assert!(roots_from_mountinfo(&parse("")).is_empty());
    }

    /// Needs root and a cgroup hierarchy: creates a cgroup, moves a child into it before
    /// exec, and removes it after.
    #[test]
    fn a_child_joins_before_exec_and_the_cgroup_is_removed_after() {
        if !nix::unistd::geteuid().is_root() {
            husk_skip::missing(
                "a_child_joins_before_exec_and_the_cgroup_is_removed_after",
                "needs root",
            );
            return;
        }
        let name = format!("/husk-test-{}", std::process::id());
        let cg = match PodCgroup::create(&name) {
            Ok(cg) => cg,
            Err(CgroupError::NoHierarchy) => {
                husk_skip::missing(
                    "a_child_joins_before_exec_and_the_cgroup_is_removed_after",
                    "no cgroup hierarchy",
                );
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let fds = cg.procs_fds();
        let mut cmd = std::process::Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        // SAFETY: join_self only calls write(2).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || join_self(&fds));
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.lines().any(|l| l.ends_with(&name)),
            "child not in {name}: {text}"
        );
        let dirs = cg.dirs().to_vec();
        drop(cg);
        remove_dirs(&dirs);
        for d in &dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }
}
