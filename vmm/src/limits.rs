//! Process-wide bounds every husk-vmm subcommand sets at start-up.
//!
//! The guest is hostile, and some of what it can make a device do holds a host fd for as long
//! as the guest likes:
//!
//! - the virtio-fs passthrough server keeps one `O_PATH` fd per inode the guest has looked up
//!   until the guest sends `FORGET` for it (and one per open file or directory until
//!   `RELEASE`): a guest that never forgets would hold host fds without bound;
//! - every vsock connection holds a host stream (the muxer caps them at 1024 at once, but a
//!   backend has other fds too).
//!
//! `RLIMIT_NOFILE` is what bounds them all: past it the guest gets `EMFILE` (virtio-fs) or a
//! refused connection (vsock), and the host is unaffected.

use std::io;

/// `--max-open-files` unless given, for what serves no file system (vsock, net): its
/// connections and a margin, far below what would strain the host.
pub const DEFAULT_MAX_OPEN_FILES: u64 = 16_384;

/// The same where virtio-fs is served (`vhost-user-fs`, `run --shared-dir`): a guest keeps
/// an inode (one host fd) per file it has looked up until it forgets it, and a container
/// walking a large image (a `node_modules`, `find /`) legitimately holds 100k of them. Still a
/// bound: the host's own default maximum (fs.nr_open) is 1048576.
pub const DEFAULT_MAX_OPEN_FILES_FS: u64 = 262_144;

/// Sets this process's `RLIMIT_NOFILE`, soft and hard, to `max` (or to the current hard limit
/// if that is lower: raising it needs `CAP_SYS_RESOURCE`), so that nothing later in the
/// process, the guest's doing or not, can lift it. Returns the limit set.
pub fn limit_open_files(max: u64) -> io::Result<u64> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let limit = max.min(cur.rlim_max);
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit reads one rlimit struct that we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child (the limit is process-wide and cannot be raised again) and
    /// returns its exit status: 0 when every check in it held.
    fn in_child(f: impl FnOnce() -> bool) -> i32 {
        // SAFETY: the child only makes async-signal-safe calls (getrlimit, setrlimit, open,
        // close, _exit) plus `f`, which allocates nothing.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", io::Error::last_os_error()),
            0 => {
                let ok = f();
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waits for our own child, status is ours.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                assert!(libc::WIFEXITED(status), "child status {status:#x}");
                libc::WEXITSTATUS(status)
            }
        }
    }

    fn nofile() -> libc::rlimit {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct that we own.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
        r
    }

    #[test]
    fn the_limit_is_set_soft_and_hard_and_holds() {
        let status = in_child(|| {
            if limit_open_files(40).ok() != Some(40) {
                return false;
            }
            let r = nofile();
            if r.rlim_cur != 40 || r.rlim_max != 40 {
                return false;
            }
            // Opening fds stops at the limit with EMFILE.
            let mut opened = [0i32; 64];
            let mut n = 0;
            let mut emfile = false;
            while n < opened.len() {
                // SAFETY: a NUL-terminated literal path.
                let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
                if fd < 0 {
                    emfile = io::Error::last_os_error().raw_os_error() == Some(libc::EMFILE);
                    break;
                }
                opened[n] = fd;
                n += 1;
            }
            for fd in &opened[..n] {
                // SAFETY: fds this loop opened.
                unsafe { libc::close(*fd) };
            }
            // And it cannot be lifted again, even by root (the hard limit is 40).
            let up = libc::rlimit {
                rlim_cur: 41,
                rlim_max: 41,
            };
            // SAFETY: setrlimit reads one rlimit struct that we own.
            let raised = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &up) } == 0;
            emfile && n < 40 && (!raised || is_root())
        });
        assert_eq!(status, 0, "limit not applied in the child");
    }

    #[test]
    fn a_bound_above_the_hard_limit_takes_the_hard_limit() {
        let status = in_child(|| {
            // Never raised: asking for more than the hard limit gets the hard limit.
            limit_open_files(100).ok() == Some(100) && limit_open_files(1 << 20).ok() == Some(100)
        });
        assert_eq!(status, 0);
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
