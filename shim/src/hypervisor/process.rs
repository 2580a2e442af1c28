//! Starting and ending the pod VM's host processes, and reading what they left:
//! spawn with the parent-death signal and the pod cgroup, fd inheritance, the
//! last-resort reap, socket readiness, log tails for error messages.

use std::{
    fs, io,
    path::Path,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};
use tracing::warn;

use super::{cgroup, pod_vm::LaunchError};

/// How much of a log an error message quotes.
pub(super) const LOG_TAIL_BYTES: u64 = 3000;

/// `cgroup_fds`: the pod cgroup's `cgroup.procs` files, joined before exec.
pub(super) fn spawn(
    mut cmd: Command,
    what: &'static str,
    binary: &Path,
    cgroup_fds: Vec<i32>,
) -> Result<Child, LaunchError> {
    cmd.kill_on_drop(true);
    // If the process that launched the VM dies without cleaning up (crash,
    // SIGKILL), the kernel ends the VM's processes too.
    // SAFETY: prctl(2) and join_self's write(2) are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            cgroup::join_self(&cgroup_fds)
        });
    }
    cmd.spawn().map_err(|source| LaunchError::Spawn {
        what,
        binary: binary.to_path_buf(),
        source,
    })
}

/// Lets the VM process inherit the pod's tap. The fd is close-on-exec (so
/// device backends and other children never hold the pod's NIC); only the
/// process whose command line names this number gets it.
pub(super) fn inherit_fd(cmd: &mut Command, fd: i32) {
    // SAFETY: fcntl(2) is async-signal-safe and touches only this fd.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Synchronous last resort (a `Drop`): SIGKILL and reap.
pub(super) fn reap_now(mut child: Child) {
    let _ = child.start_kill();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    warn!(pid = ?child.id(), "VM process did not exit after SIGKILL");
}

/// Whether a Unix socket is bound at `path` and listening, from
/// /proc/net/unix (flag __SO_ACCEPTCON, 0x10000).
pub(super) fn unix_socket_listening(path: &Path) -> bool {
    // Bytes: a socket path is any name a host process chose.
    let Ok(table) = fs::read("/proc/net/unix") else {
        return false;
    };
    let table = String::from_utf8_lossy(&table);
    let want = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == want
            && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// The last few KiB of a log file, for error messages.
pub(super) fn tail(path: &Path) -> String {
    match husk_bounds::read_tail(path, LOG_TAIL_BYTES) {
        Ok(buf) => String::from_utf8_lossy(&buf).into_owned(),
        Err(e) => format!("<{} unreadable: {e}>", path.display()),
    }
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn listening_sockets_are_seen_in_proc_net_unix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sock");
        assert!(!unix_socket_listening(&p));
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(unix_socket_listening(&p));
    }

    #[test]
    fn tail_quotes_the_end_of_a_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        fs::write(&p, "a".repeat(5000) + "END").unwrap();
        let t = tail(&p);
        assert!(t.ends_with("END") && t.len() as u64 == LOG_TAIL_BYTES);
        assert!(tail(&dir.path().join("none")).contains("unreadable"));
    }
}
