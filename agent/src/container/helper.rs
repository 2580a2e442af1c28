//! The runtime helper: libcontainer runs in a short-lived child process of
//! the agent (the agent binary re-executed as `husk-agent __husk-runtime
//! <op as JSON>`), never inside the agent itself.
//!
//! Why a separate process:
//! - **Reaping.** libcontainer waits for the children it forks (the
//!   intermediate process, hooks) with `waitpid(pid)`. In the agent, the
//!   reaper's `waitpid(-1)` would steal those statuses and fail hooks at
//!   random. In the helper nobody else waits.
//! - **fork safety.** libcontainer clones processes that go on running Rust
//!   code (allocating, logging) before they exec; the agent is
//!   multi-threaded (tokio), the helper is single-threaded.
//! - **Side effects.** libcontainer sets the calling process non-dumpable and
//!   writes its `oom_score_adj`; that must not happen to PID 1.
//!
//! How the container's processes reach the agent: libcontainer clones a
//! container's init (and an exec'ed process) with CLONE_PARENT from its
//! intermediate process, so it is the helper's child. The helper exits right
//! after reporting the pid; the kernel re-parents the process to the agent
//! (PID 1 in the guest, a child subreaper on a host), whose reaper collects
//! its exit status. The agent takes a [`ReapMark`] before starting the helper
//! and then [`Reaper::claim`]s the pid, which also covers a process that exits
//! before the helper has even replied.
//!
//! Protocol: the op is argv[2] as JSON; the container's stdio, when given, is
//! on fds 3, 4, 5; the helper prints one JSON [`Reply`] line on stdout and
//! logs on stderr, which the agent forwards into its own log.

use std::{
    collections::VecDeque,
    ffi::OsString,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use libcontainer::{
    container::{builder::ContainerBuilder, Container},
    error::LibcontainerError,
    oci_spec::runtime::{LinuxSeccomp, Spec},
    syscall::syscall::SyscallType,
    workload::{default::DefaultExecutor, Executor, ExecutorError, ExecutorValidationError},
};
use nix::{sys::signal, unistd::Pid};
use serde::{Deserialize, Serialize};

use super::error::{chain, Error, Result};
use crate::reaper::Reaper;

/// argv[1] that makes the agent binary act as the helper.
pub const HELPER_ARG: &str = "__husk-runtime";
/// Log filter for the helper, set by the agent from its own.
const LOG_ENV: &str = "HUSK_RUNTIME_LOG";
/// First of the three fds that carry the container's stdin, stdout, stderr.
const STDIO_BASE_FD: RawFd = 3;
/// Log lines of a failed helper quoted in the error.
const TAIL_LINES: usize = 8;
/// How long to wait for the helper's last log lines after it exited.
const LOG_DRAIN: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Creates the container from `<bundle>/config.json`; its init waits for
    /// `Start`.
    Create {
        id: String,
        root: PathBuf,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: bool,
    },
    Start {
        id: String,
        root: PathBuf,
    },
    /// Runs the OCI Process in `process` (a JSON file) in the container
    /// whose spec is in `bundle`.
    Exec {
        id: String,
        root: PathBuf,
        bundle: PathBuf,
        process: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: bool,
    },
    Delete {
        id: String,
        root: PathBuf,
        force: bool,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    /// The new process's pid (Create, Exec).
    pub pid: Option<i32>,
    pub error: Option<ReplyError>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplyError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidArgument,
    FailedPrecondition,
    AlreadyExists,
    NotFound,
    Internal,
}

// ---------------------------------------------------------------------------
// The helper process side.

/// Entry point of the helper process (`args` without argv[0]).
pub fn main(args: &[OsString]) -> ExitCode {
    // Rust's runtime ignores SIGPIPE; an ignored signal stays ignored across
    // exec, so the container's processes would inherit that. Restore the
    // default before libcontainer forks them.
    // SAFETY: setting a default disposition, before any threads exist.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let filter = std::env::var(LOG_ENV).unwrap_or_else(|_| "warn".to_string());
    // Warnings about the filter itself are not worth a failed container.
    let _ = crate::logging::init(Some(&filter));
    let reply = match args.get(1).and_then(|a| a.to_str()) {
        Some(json) => match serde_json::from_str::<Op>(json) {
            Ok(op) => run_op(op),
            Err(e) => failed(ErrorKind::Internal, format!("bad helper request: {e}")),
        },
        None => failed(ErrorKind::Internal, "helper request missing".to_string()),
    };
    let mut line = serde_json::to_string(&reply).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"kind":"internal","message":"encoding reply: {e}"}}}}"#)
    });
    line.push('\n');
    let mut out = std::io::stdout();
    if out
        .write_all(line.as_bytes())
        .and_then(|_| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn failed(kind: ErrorKind, message: String) -> Reply {
    Reply {
        pid: None,
        error: Some(ReplyError { kind, message }),
    }
}

fn run_op(op: Op) -> Reply {
    let result = match op {
        Op::Create {
            id,
            root,
            bundle,
            console_socket,
            stdio,
        } => builder(id, root, stdio).and_then(|b| {
            b.with_console_socket(console_socket)
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .and_then(|c| {
                    c.pid().map(Pid::as_raw).ok_or_else(|| {
                        LibcontainerError::Other("created container has no pid".into())
                    })
                })
                .map(Some)
        }),
        Op::Start { id, root } => {
            Container::load(root.join(id)).and_then(|mut c| c.start().map(|()| None))
        }
        Op::Exec {
            id,
            root,
            bundle,
            process,
            console_socket,
            stdio,
        } => exec_seccomp(&bundle)
            .and_then(|seccomp| {
                let b = builder(id, root, stdio)?;
                Ok(match seccomp {
                    Some(profile) => b.with_executor(SeccompExecutor { profile }),
                    None => b,
                })
            })
            .and_then(|b| {
                b.with_console_socket(console_socket)
                    .as_tenant()
                    .with_detach(true)
                    .with_process(Some(process))
                    .build()
                    .map(|pid| Some(pid.as_raw()))
            }),
        Op::Delete { id, root, force } => {
            Container::load(root.join(id)).and_then(|mut c| c.delete(force).map(|()| None))
        }
    };
    match result {
        Ok(pid) => Reply { pid, error: None },
        Err(e) => {
            let kind = match &e {
                LibcontainerError::InvalidID(_)
                | LibcontainerError::MissingSpec(_)
                | LibcontainerError::InvalidSpec(_)
                | LibcontainerError::Spec(_)
                | LibcontainerError::InvalidInput(_) => ErrorKind::InvalidArgument,
                LibcontainerError::IncorrectStatus(_) => ErrorKind::FailedPrecondition,
                LibcontainerError::Exist => ErrorKind::AlreadyExists,
                LibcontainerError::NoDirectory => ErrorKind::NotFound,
                _ => ErrorKind::Internal,
            };
            failed(kind, chain(&e))
        }
    }
}

/// The container's seccomp profile, which an exec'ed process must run under
/// too.
fn exec_seccomp(bundle: &std::path::Path) -> Result<Option<LinuxSeccomp>, LibcontainerError> {
    let spec = Spec::load(bundle.join("config.json"))?;
    Ok(spec.linux().as_ref().and_then(|l| l.seccomp().clone()))
}

/// Installs the container's seccomp profile in an exec'ed process, right
/// before it execs.
///
/// libcontainer 0.7's tenant (exec) path rebuilds the spec's `linux` section
/// without the seccomp profile, so an exec'ed process would otherwise escape
/// the filter its container runs under. This executor runs in the new
/// process after libcontainer's set-up (namespaces, user, capabilities) and
/// applies the profile itself. Capabilities are dropped by then, so it sets
/// no_new_privs first (as the kernel requires without CAP_SYS_ADMIN): an
/// exec'ed process in a seccomp-confined container always runs with
/// no_new_privs, stricter than the spec may ask, never looser.
#[derive(Clone)]
struct SeccompExecutor {
    profile: LinuxSeccomp,
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(ExecutorError::Other(format!(
                "setting no_new_privs for seccomp: {}",
                std::io::Error::last_os_error()
            )));
        }
        match libcontainer::seccomp::initialize_seccomp(&self.profile) {
            Ok(None) => {}
            Ok(Some(fd)) => {
                let _ = nix::unistd::close(fd);
                return Err(ExecutorError::Other(
                    "seccomp profiles with a notify listener are not supported for exec".into(),
                ));
            }
            Err(e) => {
                return Err(ExecutorError::Other(format!(
                    "installing the container's seccomp profile: {}",
                    chain(&e)
                )))
            }
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

fn builder(id: String, root: PathBuf, stdio: bool) -> Result<ContainerBuilder, LibcontainerError> {
    let mut b = ContainerBuilder::new(id, SyscallType::default())
        .validate_id()?
        .with_root_path(root)?;
    if stdio {
        // SAFETY: the agent started this process with fds 3-5 open for the
        // container's stdio (see `run`), and nothing else here owns them.
        let [stdin, stdout, stderr] =
            [0, 1, 2].map(|i| unsafe { OwnedFd::from_raw_fd(STDIO_BASE_FD + i) });
        b = b.with_stdin(stdin).with_stdout(stdout).with_stderr(stderr);
    }
    Ok(b)
}

// ---------------------------------------------------------------------------
// The agent side.

/// Runs `op` in a helper process and returns the pid it reports. `stdio`
/// (stdin, stdout, stderr for the container) is handed to the helper and
/// closed here once it runs.
pub async fn run(
    reaper: &Reaper,
    op: &Op,
    stdio: Option<[OwnedFd; 3]>,
    timeout: Duration,
) -> Result<Option<i32>> {
    let request =
        serde_json::to_string(op).map_err(|e| Error::internal(format!("encoding op: {e}")))?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG)
        .arg(request)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env(LOG_ENV, helper_log_filter());
    if let Some(fds) = &stdio {
        let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl,
        // dup2, close) on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || place_stdio(raw));
        }
    }
    let (mut child, exit) = reaper
        .spawn_watched(|| {
            let child = cmd.spawn()?;
            Ok::<_, std::io::Error>((Pid::from_raw(child.id() as i32), child))
        })
        .map_err(|e| Error::internal(format!("starting the runtime helper: {e}")))?;
    // The helper has its copies; ours would keep the container's stdin open
    // and its stdout from ever reaching EOF.
    drop(stdio);
    let helper_pid = exit.pid();

    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Error::internal("runtime helper has no stdout/stderr pipe"));
    };
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let log = {
        let tail = tail.clone();
        tokio::task::spawn_blocking(move || forward_log(stderr, &tail))
    };
    let reply = tokio::task::spawn_blocking(move || {
        // One line, not EOF: the container's processes may inherit the pipe.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = match tokio::time::timeout(timeout, reply).await {
        Ok(Ok(Ok(line))) => line,
        Ok(Ok(Err(e))) => return Err(Error::internal(format!("reading the runtime helper: {e}"))),
        Ok(Err(e)) => return Err(Error::internal(format!("runtime helper reader: {e}"))),
        Err(_) => {
            // A hook or a container set-up that hangs: give up on it.
            let _ = signal::kill(helper_pid, signal::Signal::SIGKILL);
            return Err(Error::DeadlineExceeded(format!(
                "{} did not finish within {timeout:?}",
                op.name()
            )));
        }
    };
    let status = exit
        .wait()
        .await
        .map_err(|e| Error::internal(e.to_string()))?;
    // The pipe reaches EOF only once every process that inherited it has
    // replaced or closed it; a created container's init may hold it until it
    // is started. So wait briefly for the last lines, never for EOF.
    let _ = tokio::time::timeout(LOG_DRAIN, log).await;
    let tail: Vec<String> = lock(&tail).iter().cloned().collect();

    let reply: Reply = serde_json::from_str(line.trim()).map_err(|_| {
        Error::internal(format!(
            "{}: runtime helper ended ({status:?}) without a reply; its log: {}",
            op.name(),
            tail.join(" | ")
        ))
    })?;
    match reply.error {
        None => Ok(reply.pid),
        Some(e) => {
            let message = format!("{}: {}", op.name(), e.message);
            Err(match e.kind {
                ErrorKind::InvalidArgument => Error::InvalidArgument(message),
                ErrorKind::FailedPrecondition => Error::FailedPrecondition(message),
                ErrorKind::AlreadyExists => Error::AlreadyExists(message),
                ErrorKind::NotFound => Error::NotFound(message),
                ErrorKind::Internal => Error::Internal(message),
            })
        }
    }
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "creating the container",
            Op::Start { .. } => "starting the container",
            Op::Exec { .. } => "starting the exec process",
            Op::Delete { .. } => "deleting the container",
        }
    }
}

/// The helper logs what the agent would: its own filter when set (RUST_LOG,
/// or `husk.log` on the kernel command line in the guest), else warnings only
/// (libcontainer's info level is chatty).
fn helper_log_filter() -> String {
    if let Ok(f) = std::env::var("RUST_LOG") {
        return f;
    }
    crate::cmdline::KernelCmdline::read()
        .ok()
        .and_then(|c| c.value(crate::cmdline::LOG_PARAM).map(str::to_string))
        .unwrap_or_else(|| "warn".to_string())
}

/// Moves the container's stdio onto fds 3-5 in the forked child. Sources
/// are first copied above the targets, since a source may itself sit on 3-5.
fn place_stdio(raw: [RawFd; 3]) -> std::io::Result<()> {
    let mut high = [0; 3];
    for (i, fd) in raw.iter().enumerate() {
        // SAFETY: plain fcntl on an open descriptor.
        let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        high[i] = copy;
    }
    for (i, fd) in high.iter().enumerate() {
        // dup2 clears close-on-exec on the target: these three survive exec.
        // SAFETY: as above.
        if unsafe { libc::dup2(*fd, STDIO_BASE_FD + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Copies the helper's log lines into the agent's log, keeping the last few
/// in `tail` for an error message.
fn forward_log(stderr: std::process::ChildStderr, tail: &Mutex<VecDeque<String>>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        tracing::info!(target: "husk_agent::runtime", "{line}");
        let mut tail = lock(tail);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_as_json() {
        let op = Op::Exec {
            id: "c".into(),
            root: "/run/husk/libcontainer".into(),
            bundle: "/run/husk/bundles/c".into(),
            process: "/p.json".into(),
            console_socket: None,
            stdio: true,
        };
        let back: Op = serde_json::from_str(&serde_json::to_string(&op).unwrap()).unwrap();
        assert!(matches!(back, Op::Exec { stdio: true, .. }));
        let reply: Reply =
            serde_json::from_str(r#"{"error":{"kind":"failed_precondition","message":"x"}}"#)
                .unwrap();
        assert!(matches!(
            reply.error.unwrap().kind,
            ErrorKind::FailedPrecondition
        ));
    }
}
