//! How a vhost-user backend confines itself once its device is set up: husk-vmm's jail
//! (the same one `husk-vmm run --jail` enters), then the vhost-user seccomp filter on the
//! main thread before any other thread exists, so every thread the backend starts has it.

use std::path::PathBuf;

use crate::jail::{self, JailConfig, JailError};
use crate::seccomp::{self, SeccompError, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] SeccompError),
}

/// Enters the jail keeping `visible_dirs` (what the backend still reaches by path) and, for
/// the file server, its capabilities and file-system calls; then the seccomp filter.
pub fn confine(visible_dirs: Vec<PathBuf>, fs_server: bool) -> Result<(), ConfineError> {
    jail::enter(&JailConfig {
        visible_dirs,
        fs_server,
        ..Default::default()
    })?;
    let more: &[i64] = if fs_server { seccomp::FS_SERVER } else { &[] };
    // Compiled here, after the jail: the filter names this process's pid.
    let filter = seccomp::filter_with(ThreadKind::VhostUser, more)?;
    seccomp::apply_to_process(&filter)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;
    use std::ffi::CString;
    use std::fs;
    use std::path::Path;
    use std::sync::atomic::{AtomicI32, Ordering};

    /// The test process's pid, for probes (plain fns) that try to signal it.
    static HOST_PID: AtomicI32 = AtomicI32::new(0);

    /// Exit statuses of a probe child.
    const DONE: i32 = 0;
    const REFUSED: i32 = 1;
    const NOT_CONFINED: i32 = 2;

    /// Forks a child that confines itself as the virtio-fs backend (the most permissive
    /// backend: it keeps the file server's capabilities and calls) with `kept` visible, then
    /// tries `attempt`. Its exit status: [`DONE`] when the attempt worked, [`REFUSED`] when it
    /// failed with an error, [`crate::seccomp::SECCOMP_EXIT_STATUS`] when the filter stopped it.
    fn probe(kept: &Path, attempt: fn(&Path) -> bool) -> i32 {
        // SAFETY: the child makes system calls (glibc's allocator is fork-safe) and exits
        // with _exit; it never returns into the test harness.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = match confine(vec![kept.to_path_buf()], true) {
                    Err(_) => NOT_CONFINED,
                    Ok(()) if attempt(kept) => DONE,
                    Ok(()) => REFUSED,
                };
                // SAFETY: _exit(2) ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                match nix::sys::wait::waitpid(child, None).unwrap() {
                    nix::sys::wait::WaitStatus::Exited(_, code) => code,
                    other => panic!("probe child ended with {other:?}"),
                }
            }
        }
    }

    /// An escape into a confined backend (what a guest that compromised the device code
    /// would have): it can do its job in the directory it keeps, and cannot see or signal a
    /// host process, open a socket of another family, make a device node, start a program or
    /// a process, leave its namespaces, or read a host file.
    #[test]
    fn a_confined_backend_cannot_reach_the_host() {
        if !nix::unistd::geteuid().is_root() {
            husk_skip::missing("a_confined_backend_cannot_reach_the_host", "needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let kept = t.path().join("kept");
        fs::create_dir(&kept).unwrap();
        let trapped = seccomp::SECCOMP_EXIT_STATUS;

        // Its job still works: files in what it keeps, Unix sockets, its own threads.
        assert_eq!(probe(&kept, |k| fs::write(k.join("f"), b"x").is_ok()), DONE);
        assert_eq!(fs::read(kept.join("f")).unwrap(), b"x");
        let unix = |_: &Path| {
            // SAFETY: socket(2) with constant arguments; a leaked fd ends with the child.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) >= 0 }
        };
        assert_eq!(probe(&kept, unix), DONE);
        assert_eq!(
            probe(&kept, |_| std::thread::spawn(|| 7).join().ok() == Some(7)),
            DONE
        );

        // Nothing of the host: no /proc to find processes in, no host files.
        assert_eq!(probe(&kept, |_| fs::read_dir("/proc").is_ok()), REFUSED);
        assert_eq!(probe(&kept, |_| fs::read("/etc/passwd").is_ok()), REFUSED);
        // Signals to another process (the test, its parent, stands for the host's).
        HOST_PID.store(std::process::id() as i32, Ordering::SeqCst);
        let host = |_: &Path| {
            let p = HOST_PID.load(Ordering::SeqCst);
            // SAFETY: kill(2) with signal 0 only checks that it could be sent.
            unsafe { libc::kill(p, 0) == 0 }
        };
        assert_eq!(probe(&kept, host), trapped, "kill(2) of a host process");
        let tg = |_: &Path| {
            let p = HOST_PID.load(Ordering::SeqCst);
            // SAFETY: as above, through tgkill(2).
            unsafe { libc::syscall(libc::SYS_tgkill, p, p, 0) == 0 }
        };
        assert_eq!(probe(&kept, tg), trapped, "tgkill(2) of a host process");
        // Sockets of other families.
        let inet = |_: &Path| {
            // SAFETY: socket(2) with constant arguments; a leaked fd ends with the child.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) >= 0 }
        };
        assert_eq!(probe(&kept, inet), trapped, "an AF_INET socket");
        let inet6 = |_: &Path| {
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0) >= 0 }
        };
        assert_eq!(probe(&kept, inet6), trapped, "an AF_INET6 socket");
        let netlink = |_: &Path| {
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) >= 0 }
        };
        assert_eq!(probe(&kept, netlink), trapped, "an AF_NETLINK socket");
        let packet = |_: &Path| {
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) >= 0 }
        };
        assert_eq!(probe(&kept, packet), trapped, "an AF_PACKET socket");
        // A device node, even where it may write.
        let mknod = |k: &Path| {
            let p = CString::new(k.join("mem").into_os_string().into_encoded_bytes()).unwrap();
            // SAFETY: mknod(2) with a NUL-terminated path.
            unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 1)) == 0 }
        };
        assert_eq!(probe(&kept, mknod), REFUSED, "mknod of /dev/mem's device");
        // A new process or program, or other namespaces.
        // SAFETY: fork(2); a child that did start would exit at once with the probe.
        let fork = |_: &Path| unsafe { libc::fork() >= 0 };
        assert_eq!(probe(&kept, fork), trapped, "fork");
        let exec = |_: &Path| {
            let sh = c"/bin/sh";
            let argv = [sh.as_ptr(), std::ptr::null()];
            // SAFETY: execv(3) with a NUL-terminated argv.
            unsafe { libc::execv(sh.as_ptr(), argv.as_ptr()) };
            false
        };
        assert_eq!(probe(&kept, exec), trapped, "execve");
        // SAFETY: unshare(2) with a constant flag.
        let unshare = |_: &Path| unsafe { libc::unshare(libc::CLONE_NEWNS) == 0 };
        assert_eq!(probe(&kept, unshare), trapped, "unshare");
    }
}
