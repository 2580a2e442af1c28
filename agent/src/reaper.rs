//! Reaping of child processes.
//!
//! As PID 1 the agent inherits every orphan in the guest and must wait(2) for
//! each, or zombies pile up. The catch is that `waitpid(-1)` also collects the
//! agent's *own* children, whose exit status someone wants (a container's init
//! process, an exec'ed process). So the reaper keeps a registry: whoever starts
//! a child registers its pid and gets an [`ExitWatch`] that resolves with the
//! exit status; everything else is reaped and logged.
//!
//! Registration happens under the same lock the reaper holds while it waits,
//! and the child is started inside that lock ([`Reaper::spawn_watched`]), so a
//! child that exits at once cannot be reaped before it is registered.
//!
//! Some processes the agent wants cannot be started that way: a container's
//! init and exec'ed processes are forked by libcontainer in a helper process
//! (see `container::helper`) and become the agent's children only when that
//! helper exits and they are re-parented to the agent (PID 1, or a child
//! subreaper on a host). Such a process may well exit before its pid is known
//! here. So the reaper keeps the statuses of unwatched children for a while
//! ([`UNCLAIMED_TTL`], at most [`UNCLAIMED_MAX`]), and [`Reaper::claim`] picks
//! one up or registers a watch. Each reaped status carries a sequence number;
//! a claim passes the [`ReapMark`] taken before the helper was started, so a
//! status kept for an earlier process that had the same pid is never mistaken
//! for the new one's.
//!
//! Nothing else in the agent may wait for children: not
//! `std::process::Child::wait`, nor `tokio::process` (whose own waitpid(pid)
//! would race this one). Start children through [`Reaper::spawn_watched`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use thiserror::Error;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};

#[derive(Debug, Error)]
pub enum ReaperError {
    #[error("installing the SIGCHLD handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("the reaper stopped before process {0} exited")]
    ReaperGone(Pid),
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// The status as a shell reports it (128 + signal for a killed process),
    /// which is what containerd expects as a task's exit code.
    pub fn code(&self) -> i32 {
        match *self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled { signal, .. } => 128 + signal,
        }
    }
}

/// How long the status of a child nobody registered is kept for a late
/// [`Reaper::claim`]. A claim comes milliseconds after the helper that
/// started the process exits; this is ample.
pub const UNCLAIMED_TTL: Duration = Duration::from_secs(60);
/// Most unclaimed statuses kept (orphans of a fork-happy container); the
/// oldest go first.
pub const UNCLAIMED_MAX: usize = 4096;

/// Handle to the reaper task; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    registry: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    watched: HashMap<Pid, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<Pid, Unclaimed>,
    /// Number of children reaped so far; orders statuses against marks.
    seq: u64,
}

struct Unclaimed {
    status: ExitStatus,
    seq: u64,
    at: Instant,
}

/// A point in the reaper's history: statuses reaped after it are newer than
/// any process started after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReapMark(u64);

/// Resolves with the exit status of one registered child.
#[derive(Debug)]
pub struct ExitWatch {
    pid: Pid,
    rx: oneshot::Receiver<ExitStatus>,
}

impl ExitWatch {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub async fn wait(self) -> Result<ExitStatus, ReaperError> {
        self.rx.await.map_err(|_| ReaperError::ReaperGone(self.pid))
    }
}

impl Reaper {
    /// Installs the SIGCHLD handler and spawns the reaping task on the current
    /// tokio runtime.
    pub fn start() -> Result<Self, ReaperError> {
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let reaper = Reaper {
            registry: Arc::new(Mutex::new(Registry::default())),
        };
        let task = reaper.clone();
        tokio::spawn(async move {
            // Children that ended before the handler existed sent their
            // SIGCHLD to nobody.
            task.reap_all();
            // SIGCHLDs coalesce, so each wake-up drains every ended child.
            while sigchld.recv().await.is_some() {
                task.reap_all();
            }
            tracing::error!("SIGCHLD stream ended: orphans will no longer be reaped");
        });
        Ok(reaper)
    }

    /// Starts a child with `spawn` (which returns the child's pid and whatever
    /// handle the caller wants back) and registers it, atomically with respect
    /// to reaping.
    ///
    /// `spawn` runs with the registry locked, so it should only start the
    /// process (fork/clone and return), not wait on it.
    pub fn spawn_watched<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(Pid, T), E>,
    ) -> Result<(T, ExitWatch), E> {
        let mut registry = self.lock();
        let (pid, handle) = spawn()?;
        let (tx, rx) = oneshot::channel();
        registry.watched.insert(pid, tx);
        Ok((handle, ExitWatch { pid, rx }))
    }

    /// Marks the present: take it before starting whatever will later hand
    /// over a pid to [`claim`](Self::claim).
    pub fn mark(&self) -> ReapMark {
        ReapMark(self.lock().seq)
    }

    /// Watches `pid`, a child the agent inherited (or will inherit) rather
    /// than started itself. If it was already reaped after `since`, the
    /// watch resolves at once; a status kept from before `since` belonged to
    /// an earlier process with the same pid and is dropped.
    pub fn claim(&self, pid: Pid, since: ReapMark) -> ExitWatch {
        let mut registry = self.lock();
        let (tx, rx) = oneshot::channel();
        match registry.unclaimed.remove(&pid) {
            Some(u) if u.seq > since.0 => {
                let _ = tx.send(u.status);
            }
            _ => {
                registry.watched.insert(pid, tx);
            }
        }
        ExitWatch { pid, rx }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic elsewhere while holding the lock leaves the maps themselves
        // consistent (inserts and removes are single operations), so keep
        // reaping rather than leave zombies behind.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reap_all(&self) {
        let mut registry = self.lock();
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, signal, core_dumped)) => (
                    pid,
                    ExitStatus::Signaled {
                        signal: signal as i32,
                        core_dumped,
                    },
                ),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                // Without WUNTRACED/WCONTINUED these do not occur; nothing to
                // reap if they did.
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            registry.seq += 1;
            match registry.watched.remove(&pid) {
                Some(tx) => {
                    tracing::debug!(%pid, ?status, "watched child exited");
                    // The watcher may have given up waiting; the status is
                    // then simply not needed.
                    let _ = tx.send(status);
                }
                None => {
                    tracing::debug!(%pid, ?status, "reaped unwatched child");
                    let seq = registry.seq;
                    registry.keep_unclaimed(pid, status, seq, Instant::now());
                }
            }
        }
    }
}

impl Registry {
    fn keep_unclaimed(&mut self, pid: Pid, status: ExitStatus, seq: u64, now: Instant) {
        self.unclaimed
            .retain(|_, u| now.saturating_duration_since(u.at) < UNCLAIMED_TTL);
        if self.unclaimed.len() >= UNCLAIMED_MAX {
            if let Some(oldest) = self
                .unclaimed
                .iter()
                .min_by_key(|(_, u)| u.seq)
                .map(|(pid, _)| *pid)
            {
                self.unclaimed.remove(&oldest);
            }
        }
        self.unclaimed.insert(
            pid,
            Unclaimed {
                status,
                seq,
                at: now,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{process::Command, time::Duration};

    use nix::sys::signal::{kill, Signal};

    use super::*;

    fn spawn(reaper: &Reaper, script: &str) -> ExitWatch {
        let (_child, watch) = reaper
            .spawn_watched(|| {
                let child = Command::new("/bin/sh").args(["-c", script]).spawn()?;
                let pid = Pid::from_raw(child.id() as i32);
                // Dropping a std Child neither waits nor kills, which is what
                // the reaper needs.
                Ok::<_, std::io::Error>((pid, child))
            })
            .unwrap();
        watch
    }

    async fn wait(watch: ExitWatch) -> ExitStatus {
        tokio::time::timeout(Duration::from_secs(10), watch.wait())
            .await
            .expect("child did not exit in time")
            .unwrap()
    }

    // One test so no two reapers in this process steal each other's children.
    #[tokio::test]
    async fn reports_exit_statuses_of_watched_children() {
        let reaper = Reaper::start().unwrap();

        // Exits before registration could complete if it were not atomic.
        assert_eq!(wait(spawn(&reaper, "exit 0")).await, ExitStatus::Exited(0));
        assert_eq!(wait(spawn(&reaper, "exit 7")).await.code(), 7);

        let sleeper = spawn(&reaper, "exec sleep 30");
        kill(sleeper.pid(), Signal::SIGKILL).unwrap();
        let status = wait(sleeper).await;
        assert_eq!(
            status,
            ExitStatus::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false
            }
        );
        assert_eq!(status.code(), 137);

        // An unwatched child is reaped, not left a zombie.
        let orphan = Command::new("/bin/true").spawn().unwrap();
        let pid = Pid::from_raw(orphan.id() as i32);
        drop(orphan);
        let gone = async {
            while kill(pid, None).is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("unwatched child was not reaped");
    }

    fn bare_reaper() -> Reaper {
        Reaper {
            registry: Arc::new(Mutex::new(Registry::default())),
        }
    }

    #[test]
    fn spawn_errors_are_returned_and_nothing_is_registered() {
        let reaper = bare_reaper();
        let res = reaper.spawn_watched(|| Err::<(Pid, ()), _>("no fork"));
        assert_eq!(res.unwrap_err(), "no fork");
        assert!(reaper.lock().watched.is_empty());
    }

    #[tokio::test]
    async fn a_late_claim_gets_the_kept_status_but_never_a_stale_one() {
        let reaper = bare_reaper();
        let pid = Pid::from_raw(4242);
        // Reaped before anyone knew the pid (the helper had not reported it).
        let mark = reaper.mark();
        {
            let mut r = reaper.lock();
            r.seq += 1;
            let seq = r.seq;
            r.keep_unclaimed(pid, ExitStatus::Exited(3), seq, Instant::now());
        }
        assert_eq!(
            reaper.claim(pid, mark).wait().await.unwrap(),
            ExitStatus::Exited(3)
        );
        assert!(reaper.lock().unclaimed.is_empty());

        // A status from before the mark belongs to an earlier process with
        // that pid: the claim must wait for the new one's.
        {
            let mut r = reaper.lock();
            r.seq += 1;
            let seq = r.seq;
            r.keep_unclaimed(pid, ExitStatus::Exited(9), seq, Instant::now());
        }
        let watch = reaper.claim(pid, reaper.mark());
        let tx = reaper
            .lock()
            .watched
            .remove(&pid)
            .expect("the claim must wait");
        tx.send(ExitStatus::Exited(0)).unwrap();
        assert_eq!(watch.wait().await.unwrap(), ExitStatus::Exited(0));
    }

    #[test]
    fn unclaimed_statuses_are_bounded_and_expire() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        for i in 0..(UNCLAIMED_MAX as i32 + 10) {
            r.seq += 1;
            let seq = r.seq;
            r.keep_unclaimed(Pid::from_raw(i + 1), ExitStatus::Exited(0), seq, t0);
        }
        assert_eq!(r.unclaimed.len(), UNCLAIMED_MAX);
        // The oldest went first.
        assert!(!r.unclaimed.contains_key(&Pid::from_raw(1)));
        assert!(r
            .unclaimed
            .contains_key(&Pid::from_raw(UNCLAIMED_MAX as i32 + 10)));
        r.seq += 1;
        let seq = r.seq;
        r.keep_unclaimed(
            Pid::from_raw(1),
            ExitStatus::Exited(0),
            seq,
            t0 + UNCLAIMED_TTL + Duration::from_secs(1),
        );
        assert_eq!(r.unclaimed.len(), 1);
    }
}
