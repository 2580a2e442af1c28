//! Leaving the initramfs before anything else runs.
//!
//! The kernel starts /init on its initial rootfs, and pivot_root(2) refuses
//! to move that mount. Container runtimes need pivot_root to enter a
//! container's root (a plain chroot can be escaped by a process holding
//! CAP_SYS_CHROOT), so PID 1 first copies itself onto a fresh tmpfs, moves
//! that over `/`, and re-executes itself from there, the way switch_root(8)
//! does for a distribution's initramfs.

use std::{
    ffi::{CString, OsString},
    fs,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::Path,
};

use nix::{
    mount::{mount, MsFlags},
    unistd::{chdir, chroot, execve},
};

/// Set on the re-executed agent, carrying the first run's boot stamp.
pub const STARTED_ENV: &str = "HUSK_INIT_STARTED_NS";

const NEW_ROOT: &str = "/.husk-root";
const DIRS: &[&str] = &["dev", "proc", "sys", "run", "tmp", "etc", "mnt", "root"];

#[derive(Debug, thiserror::Error)]
#[error("leaving the initramfs: {step}: {source}")]
pub struct SwitchRootError {
    step: &'static str,
    source: std::io::Error,
}

fn step<T, E: Into<std::io::Error>>(
    step: &'static str,
    r: Result<T, E>,
) -> Result<T, SwitchRootError> {
    r.map_err(|e| SwitchRootError {
        step,
        source: e.into(),
    })
}

/// The boot stamp passed on by the first run, if this is the re-executed agent.
pub fn inherited_start() -> Option<u64> {
    std::env::var(STARTED_ENV).ok()?.parse().ok()
}

/// Whether `/` is the kernel's initial rootfs (ramfs or tmpfs) holding our
/// /init; not so when the agent runs as PID 1 of a namespace on a host.
pub fn on_initramfs() -> bool {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let fs_type = nix::sys::statfs::statfs("/").map(|s| s.filesystem_type().0);
    matches!(fs_type, Ok(RAMFS_MAGIC) | Ok(TMPFS_MAGIC)) && Path::new("/init").is_file()
}

/// Moves `/` to a tmpfs holding only the agent and re-executes it; returns
/// only on failure.
pub fn leave_initramfs(init_started_ns: u64, args: &[OsString]) -> SwitchRootError {
    match try_leave(init_started_ns, args) {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

fn try_leave(
    init_started_ns: u64,
    args: &[OsString],
) -> Result<std::convert::Infallible, SwitchRootError> {
    let new_root = Path::new(NEW_ROOT);
    step("creating the new root", fs::create_dir_all(new_root))?;
    step(
        "mounting its tmpfs",
        mount(
            Some("tmpfs"),
            new_root,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        ),
    )?;
    let init = new_root.join("init");
    step("copying /init", fs::copy("/init", &init))?;
    step(
        "making /init executable",
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755)),
    )?;
    for d in DIRS {
        step(
            "creating mount points",
            fs::create_dir_all(new_root.join(d)),
        )?;
    }
    // The initramfs copy is hidden once the new root is on top: free it.
    let _ = fs::remove_file("/init");
    step("entering the new root", chdir(new_root))?;
    step(
        "moving it over /",
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
    )?;
    step("chroot", chroot("."))?;
    step("chdir /", chdir("/"))?;

    let path = CString::new("/init").map_err(|e| SwitchRootError {
        step: "exec path",
        source: std::io::Error::other(e),
    })?;
    let mut argv = vec![path.clone()];
    for a in args {
        if let Ok(c) = CString::new(a.as_bytes()) {
            argv.push(c);
        }
    }
    let mut env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    if let Ok(c) = CString::new(format!("{STARTED_ENV}={init_started_ns}")) {
        env.push(c);
    }
    step("re-executing /init", execve(&path, &argv, &env))
}
