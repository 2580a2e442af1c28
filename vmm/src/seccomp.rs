//! Per-thread seccomp filters.
//!
//! husk-vmm has two kinds of threads once the guest runs: vCPU threads (KVM_RUN and the
//! device register accesses it exits with) and one event-loop thread (queues, device
//! backends, the API socket, signals). Each installs its own filter before it touches the
//! guest, allowing only what that thread does. Everything else traps with SIGSYS; the handler
//! names the syscall on stderr and exits with status 159 (128 + SIGSYS), so a missing entry
//! is a clear, immediate failure rather than a silent hole.
//!
//! Filters are compiled up front (while the process may still allocate freely) and applied
//! with [`apply`].

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status after a seccomp violation.
pub const SECCOMP_EXIT_STATUS: i32 = 159;

// ioctl request numbers (linux/kvm.h, asm-generic/ioctls.h).
const KVM_RUN: u64 = 0xae80;
/// _IOR(KVMIO, 0x81, struct kvm_regs): read registers for an error message.
const KVM_GET_REGS: u64 = 0x8090_ae81;
/// `_IOR(KVMIO, 0x83, struct kvm_sregs)`: read on a triple fault, for the log.
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;
/// virtio-net tells the tap which offloads the guest negotiated from the event loop.
const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install seccomp filter: {0}")]
    Apply(#[from] seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    EventLoop,
    /// A vhost-user backend process (`husk-vmm vhost-user-*`): its main thread takes the
    /// filter before it starts any other, and every thread it starts inherits it.
    VhostUser,
}

/// Syscalls every thread needs: memory allocation, locks, signal return, logging, exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// vCPU threads also reset devices on the driver's request, which may close host
/// connections and take them off the device's epoll; and write the serial console, whose
/// capped log starts over with ftruncate when full (husk_bounds::BoundedLog).
const VCPU: &[i64] = &[
    libc::SYS_epoll_ctl,
    libc::SYS_shutdown,
    libc::SYS_read,
    libc::SYS_ftruncate,
];

/// The event loop: epoll, eventfds, the vsock host side (accepting, connecting to
/// `<uds>_<port>`, streaming), the rng's reads, timers, the API socket, kicking vCPUs, and
/// removing its sockets at exit.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getrandom,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
];

/// What a vhost-user backend adds to the event loop's calls: worker threads started under
/// the filter (clone only with CLONE_THREAD, see [`filter_with`]: never a new process, and
/// no execve), the vhost-user protocol's epoll and eventfds and the guest memory QEMU passes
/// as an fd to map, and its signal thread's wait.
const VHOST_USER: &[i64] = &[
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_write,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigaction,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_getdents64,
    libc::SYS_openat,
    libc::SYS_lseek,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What the event loop adds when it serves virtio-fs in-process: the passthrough file
/// system's calls on the shared directory (O_PATH fds, *at calls, xattrs through
/// /proc/self/fd, per-request fsuid/fsgid for new files).
pub const FS_SERVER: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_copy_file_range,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_umask,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_prctl,
];

fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    requests
        .iter()
        .map(|&req| {
            Ok(SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                req,
            )?])?)
        })
        .collect()
}

/// Compiles the filter for one kind of thread.
pub fn filter_for(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    filter_with(kind, &[])
}

/// Compiles the filter for one kind of thread, allowing `more` syscalls besides (e.g.
/// [`FS_SERVER`] when the event loop serves virtio-fs). It names this process's pid (the one
/// tgkill may target): compile it in the process that applies it.
pub fn filter_with(kind: ThreadKind, more: &[i64]) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[&[i64]] = match kind {
        ThreadKind::Vcpu => &[VCPU],
        ThreadKind::EventLoop => &[EVENT_LOOP],
        ThreadKind::VhostUser => &[EVENT_LOOP, VHOST_USER],
    };
    for nr in COMMON
        .iter()
        .chain(extra.iter().copied().flatten())
        .chain(more)
    {
        rules.insert(*nr, Vec::new());
    }
    let ioctls = match kind {
        ThreadKind::Vcpu => ioctl_rules(&[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, FIONBIO])?,
        ThreadKind::EventLoop | ThreadKind::VhostUser => {
            ioctl_rules(&[FIONBIO, FIOCLEX, TUNSETOFFLOAD])?
        }
    };
    rules.insert(libc::SYS_ioctl, ioctls);
    // No reach beyond the process: signals only to its own threads (a vCPU kick, abort's
    // raise), sockets only of the Unix family (vsock's host side, the API).
    if let Some(allowed) = rules.get_mut(&libc::SYS_tgkill) {
        *allowed = vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(std::process::id()),
        )?])?];
    }
    if let Some(allowed) = rules.get_mut(&libc::SYS_socket) {
        *allowed = vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )?])?];
    }
    if kind == ThreadKind::VhostUser {
        // Threads, never processes: clone's flags must carry CLONE_THREAD. (clone3 keeps
        // its flags in memory a filter cannot read: see [`apply_to_process`].)
        // Allowed here so that the ENOSYS of the filter beside it is what clone3 gets (a
        // trap here would take precedence over it).
        rules.insert(libc::SYS_clone3, Vec::new());
        let thread = libc::CLONE_THREAD as u64;
        rules.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(thread),
                thread,
            )?])?],
        );
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

thread_local! {
    /// The thread's name, for the SIGSYS message (const-initialised: reading it in a signal
    /// handler is a plain TLS load).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Installs `prog` on the calling thread only.
pub fn apply(prog: &BpfProgram) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let n = current.name().unwrap_or("unnamed").as_bytes();
    let k = n.len().min(15);
    name[..k].copy_from_slice(&n[..k]);
    THREAD_NAME.with(|c| c.set(name));
    seccompiler::apply_filter(prog)?;
    Ok(())
}

/// Installs `prog` on the calling thread, to be inherited by every thread it starts, with
/// clone3 failing with ENOSYS beside it so threads are made with clone, whose flags `prog`
/// checks (glibc falls back to clone on ENOSYS). For a process that starts its threads
/// after this call: a vhost-user backend.
pub fn apply_to_process(prog: &BpfProgram) -> Result<(), SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    let no_clone3: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?
    .try_into()?;
    // This one first: once `prog` is on, seccomp(2) itself is not allowed.
    seccompiler::apply_filter(&no_clone3)?;
    apply(prog)
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // For SIGSYS the kernel puts the syscall number at offset 24 of siginfo
    // (`_sigsys._syscall`); libc does not name the field.
    // SAFETY: `info` is the kernel's siginfo for this SIGSYS.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut buf = [0u8; 96];
    let prefix = b"husk-vmm: seccomp: blocked syscall ";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        buf[len] = digits[d];
        len += 1;
    }
    // Which thread: the vCPUs and the event loop have different filters. The name was
    // saved when the filter was applied: asking the kernel now could be a blocked call.
    let name = THREAD_NAME.with(Cell::get);
    if name[0] != 0 {
        let on = b" on thread ";
        buf[len..len + on.len()].copy_from_slice(on);
        len += on.len();
        for &b in name.iter().take_while(|&&b| b != 0) {
            buf[len] = b;
            len += 1;
        }
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(SECCOMP_EXIT_STATUS);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        // SAFETY: installs a handler that only does async-signal-safe calls.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = sigsys_handler as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
                res = Err(SeccompError::Handler(std::io::Error::last_os_error()));
            }
        }
    });
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_the_structs_they_carry() {
        let ior = |nr: u64, size: usize| 0x8000_0000 | ((size as u64) << 16) | 0xae00 | nr;
        assert_eq!(
            KVM_GET_REGS,
            ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>())
        );
        assert_eq!(
            KVM_GET_SREGS,
            ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>())
        );
    }

    #[test]
    fn filters_compile() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::EventLoop,
            ThreadKind::VhostUser,
        ] {
            let prog = filter_for(kind).expect("filter");
            assert!(!prog.is_empty());
        }
    }

    #[test]
    fn filter_blocks_on_its_thread_only() {
        // Run in a child process: a SIGSYS exit must not take the test runner down.
        // SAFETY: fork in a test; the child only calls async-signal-safe functions and
        // syscalls before _exit.
        let prog = filter_for(ThreadKind::Vcpu).expect("filter");
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if apply(&prog).is_err() {
                unsafe { libc::_exit(1) };
            }
            // getppid is not in the vCPU list.
            unsafe { libc::syscall(libc::SYS_getppid) };
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), SECCOMP_EXIT_STATUS);
    }
}
