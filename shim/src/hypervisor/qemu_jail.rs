//! QEMU in husk-vmm's jail: a uid of its own per pod, and the `husk-vmm jail-exec` command
//! line that shows it only what it opens by path.
//!
//! QEMU is what a hostile guest attacks first on hosts without usable KVM (device emulation,
//! TCG). Started as root in the host's mount namespace, a bug there would be host root; here
//! it runs as an unprivileged uid that owns nothing on the host, that no other pod's QEMU
//! shares (so one cannot signal or ptrace another), in an empty read-only root with its
//! program, the guest kernel and initrd read-only, the pod's three sockets it connects to,
//! and `/dev/null` and `/dev/urandom` (and `/dev/kvm` under KVM), under its own `-sandbox`
//! filter.

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use super::VmSpec;

/// The first uid (and gid) handed to a pod's QEMU: inside the range systemd leaves to
/// container payloads (524288..1879048191), high enough that no distribution's users or
/// dynamic users reach it.
pub const DEFAULT_UID_BASE: u32 = 1_800_000_000;
/// How many QEMUs can run jailed at once on a node.
pub const DEFAULT_UID_COUNT: u32 = 65_536;
/// Where the uid leases live: one lock file per uid, held (flock) for the pod's life.
pub const LEASE_DIR: &str = "/run/husk/qemu-uids";

/// Host paths QEMU may reach besides the pod's own; whatever of them the host has.
const DEVICES: &[&str] = &["/dev/null", "/dev/urandom"];
/// Top-level directories a merged-/usr host has as links into /usr, and others as real
/// directories (bound read-only then): the dynamic loader's path goes through one of them.
const ROOT_LINKS: &[&str] = &["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"];

#[derive(Debug, thiserror::Error)]
pub enum QemuJailError {
    #[error("QEMU ({0}) not found: set hypervisor.qemu_path to its absolute path")]
    NoQemu(PathBuf),
    #[error("no free uid for QEMU among {count} from {base} (leases in {dir}): too many jailed QEMUs on this node")]
    NoFreeUid { base: u32, count: u32, dir: PathBuf },
    #[error("QEMU jail: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> QemuJailError {
    let what = what.into();
    move |source| QemuJailError::Io { what, source }
}

/// A uid (gid the same number) leased to one pod's QEMU for as long as this value lives.
#[derive(Debug)]
pub struct QemuUser {
    pub uid: u32,
    /// Holds the lease: the lock goes with the file, also when the shim dies.
    _lease: File,
}

impl QemuUser {
    /// Leases a free uid, starting the search at one that depends on `pod` (pods rarely
    /// probe the same leases).
    pub fn lease(dir: &Path, base: u32, count: u32, pod: &str) -> Result<Self, QemuJailError> {
        fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(io_err(format!("creating {}", dir.display())))?;
        let start = pod
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        for i in 0..count {
            let uid = base + (start.wrapping_add(i) % count);
            let path = dir.join(uid.to_string());
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_err(format!("opening {}", path.display())))?;
            // SAFETY: flock(2) on an fd this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(QemuUser { uid, _lease: file });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_err(format!("locking {}", path.display()))(e));
            }
        }
        Err(QemuJailError::NoFreeUid {
            base,
            count,
            dir: dir.to_path_buf(),
        })
    }
}

/// What QEMU connects to and loads.
pub struct JailPaths<'a> {
    pub qemu: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// The Unix sockets QEMU connects to (vhost-user backends, the console listener).
    pub sockets: Vec<&'a Path>,
    /// Where the jail makes its temporary mount point: the pod's state directory.
    pub scratch: &'a Path,
    /// Bind `/dev/kvm` and add its group.
    pub kvm: bool,
}

/// Lets `uid`'s group connect to the sockets (owner root, group the QEMU's, mode 0660).
pub fn grant_sockets(paths: &JailPaths<'_>, uid: u32) -> Result<(), QemuJailError> {
    for s in &paths.sockets {
        std::os::unix::fs::lchown(s, Some(0), Some(uid))
            .map_err(io_err(format!("chown {}", s.display())))?;
        fs::set_permissions(s, fs::Permissions::from_mode(0o660))
            .map_err(io_err(format!("chmod {}", s.display())))?;
    }
    Ok(())
}

/// `husk-vmm jail-exec ... -- QEMU`: the arguments after the husk-vmm binary, ending with
/// QEMU's own.
pub fn jail_exec_args(
    paths: &JailPaths<'_>,
    uid: u32,
    qemu_args: Vec<OsString>,
) -> Result<Vec<OsString>, QemuJailError> {
    let mut a: Vec<OsString> = vec!["jail-exec".into()];
    let mut push = |flag: &str, p: &Path| {
        a.push(flag.into());
        a.push(p.as_os_str().to_owned());
    };
    push("--scratch", paths.scratch);
    for s in &paths.sockets {
        push("--file", s);
    }
    for d in DEVICES {
        if Path::new(d).exists() {
            push("--file", Path::new(d));
        }
    }
    let mut extra_group = None;
    if paths.kvm {
        let kvm = Path::new("/dev/kvm");
        let md = fs::metadata(kvm).map_err(io_err("/dev/kvm"))?;
        if md.gid() != 0 {
            extra_group = Some(md.gid());
        }
        push("--file", kvm);
    }
    push("--ro", Path::new("/usr"));
    for top in ROOT_LINKS {
        let p = Path::new(top);
        match fs::symlink_metadata(p) {
            Ok(md) if md.file_type().is_symlink() => push("--link", p),
            Ok(md) if md.is_dir() => push("--ro", p),
            _ => {}
        }
    }
    if Path::new("/etc/ld.so.cache").exists() {
        push("--ro", Path::new("/etc/ld.so.cache"));
    }
    for p in [paths.qemu, paths.kernel, paths.initrd] {
        if !p.starts_with("/usr") {
            push("--ro", p);
        }
    }
    a.push("--user".into());
    a.push(format!("{uid}:{uid}").into());
    if let Some(g) = extra_group {
        a.push("--extra-group".into());
        a.push(g.to_string().into());
    }
    a.push("--".into());
    a.push(paths.qemu.as_os_str().to_owned());
    a.extend(qemu_args);
    Ok(a)
}

/// The command that starts a pod's QEMU jailed (`sockets`: what it connects to; `scratch`:
/// the pod's state directory), and the uid lease it runs under (keep it until QEMU is gone).
pub(super) fn command(
    spec: &VmSpec,
    kvm: bool,
    sockets: Vec<&Path>,
    scratch: &Path,
    qemu_args: Vec<OsString>,
) -> Result<(tokio::process::Command, QemuUser), QemuJailError> {
    let qemu = absolute_program(&spec.qemu_binary)
        .ok_or_else(|| QemuJailError::NoQemu(spec.qemu_binary.clone()))?;
    let paths = JailPaths {
        qemu: &qemu,
        kernel: &spec.kernel,
        initrd: &spec.initrd,
        sockets,
        scratch,
        kvm,
    };
    let user = QemuUser::lease(
        Path::new(LEASE_DIR),
        DEFAULT_UID_BASE,
        DEFAULT_UID_COUNT,
        &spec.id,
    )?;
    grant_sockets(&paths, user.uid)?;
    let mut cmd = tokio::process::Command::new(&spec.vmm_binary);
    cmd.args(jail_exec_args(&paths, user.uid, qemu_args)?);
    Ok((cmd, user))
}

/// `binary` as an absolute path: as it is when it has a `/`, else the first executable of
/// that name on PATH (the jail has no PATH to search).
pub fn absolute_program(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 || binary.is_absolute() {
        return std::path::absolute(binary).ok();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|c| {
            fs::metadata(c)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn leases_are_exclusive_and_end_with_their_holder() {
        let dir = tempfile::tempdir().unwrap();
        let a = QemuUser::lease(dir.path(), 5000, 2, "pod-a").unwrap();
        let b = QemuUser::lease(dir.path(), 5000, 2, "pod-a").unwrap();
        assert_ne!(a.uid, b.uid);
        assert!((5000..5002).contains(&a.uid) && (5000..5002).contains(&b.uid));
        let full = QemuUser::lease(dir.path(), 5000, 2, "pod-c").unwrap_err();
        assert!(full.to_string().contains("no free uid"), "{full}");
        let freed = a.uid;
        drop(a);
        assert_eq!(
            QemuUser::lease(dir.path(), 5000, 2, "pod-d").unwrap().uid,
            freed
        );
    }

    #[test]
    fn a_lease_file_that_is_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("7000")).unwrap();
        let e = QemuUser::lease(dir.path(), 7000, 1, "p").unwrap_err();
        assert!(e.to_string().contains("7000"), "{e}");
        assert!(!elsewhere.exists());
    }

    #[test]
    fn the_command_line_names_only_what_qemu_opens() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let sock = dir.path().join("vsock.vhost");
        let paths = JailPaths {
            qemu: Path::new("/usr/bin/qemu-system-x86_64"),
            kernel: &kernel,
            initrd: Path::new("/usr/share/husk/initrd.img"),
            sockets: vec![&sock],
            scratch: dir.path(),
            kvm: false,
        };
        let a = jail_exec_args(&paths, 1_800_000_001, vec!["-M".into(), "microvm".into()]);
        let a: Vec<String> = a
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let joined = a.join(" ");
        assert!(joined.starts_with("jail-exec --scratch "), "{joined}");
        assert!(joined.contains(&format!("--file {}", sock.display())));
        assert!(joined.contains(&format!("--ro {}", kernel.display())));
        assert!(joined.contains("--ro /usr "));
        // Under /usr already: not bound twice.
        assert!(!joined.contains("--ro /usr/share/husk/initrd.img"));
        assert!(!joined.contains("/dev/kvm"));
        assert!(joined
            .ends_with("--user 1800000001:1800000001 -- /usr/bin/qemu-system-x86_64 -M microvm"));
    }

    #[test]
    fn programs_are_found_on_path() {
        let sh = absolute_program(Path::new("sh")).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"));
        assert!(absolute_program(Path::new("no-such-program-husk")).is_none());
        assert_eq!(
            absolute_program(Path::new("/usr/bin/x")).unwrap(),
            Path::new("/usr/bin/x")
        );
    }
}
