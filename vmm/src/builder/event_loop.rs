//! Running a built VM: the vCPU threads and the event loop on the calling thread.
//!
//! Kept apart from the build because, once `Vmm::run` has applied them, the vCPU and
//! event-loop seccomp filters bound what the code here may call; the build has no such
//! limit. The epoll tokens live here, beside the dispatch that decodes them, which is why
//! the loop's own sources (exit, signals, API socket) are registered here too.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signalfd::SignalFd;
use tracing::{info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::error::{BuildError, RunError};
use super::Vmm;
use crate::api::{self, Action, LineBuffer, Response, VmState};
use crate::seccomp::{self, ThreadKind};
use crate::sock::AcceptReserve;
use crate::vstate::{ExitNotifier, VmExit};

// Event-loop tokens.
const TOKEN_EXIT: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_API_LISTENER: u64 = 2;
const TOKEN_API_CONN: u64 = 1 << 32;
pub(super) const TOKEN_QUEUE: u64 = 2 << 32;
pub(super) const TOKEN_BACKEND: u64 = 3 << 32;

pub(super) struct ApiConn {
    stream: UnixStream,
    lines: LineBuffer,
}

/// Puts the exit notifier, the signals and the API socket (bound here) on the loop's epoll.
pub(super) fn watch_loop_sources(
    epoll: &Epoll,
    exit: &ExitNotifier,
    signals: Option<&SignalFd>,
    api_sock: Option<&PathBuf>,
) -> Result<Option<ApiListener>, BuildError> {
    epoll
        .ctl(
            ControlOperation::Add,
            exit.eventfd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_EXIT),
        )
        .map_err(BuildError::Epoll)?;
    if let Some(sfd) = signals {
        epoll
            .ctl(
                ControlOperation::Add,
                sfd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_SIGNAL),
            )
            .map_err(BuildError::Epoll)?;
    }
    let api = match api_sock {
        Some(path) => {
            let l =
                crate::sock::bind_unix_listener(path).map_err(|source| BuildError::ApiSock {
                    path: path.clone(),
                    source,
                })?;
            l.set_nonblocking(true).map_err(|e| BuildError::ApiSock {
                path: path.clone(),
                source: crate::sock::BindError::from(e),
            })?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    l.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_API_LISTENER),
                )
                .map_err(BuildError::Epoll)?;
            let reserve = AcceptReserve::new(l.as_fd()).map_err(|e| BuildError::ApiSock {
                path: path.clone(),
                source: crate::sock::BindError::from(e),
            })?;
            Some(ApiListener {
                listener: l,
                path: path.clone(),
                reserve,
            })
        }
        None => None,
    };
    Ok(api)
}

/// The API socket: its listener, its path (removed at exit), and the fd that lets it shed
/// clients at the fd limit.
pub(super) struct ApiListener {
    listener: UnixListener,
    path: PathBuf,
    reserve: AcceptReserve,
}

impl Vmm {
    /// Runs the VM until it ends: vCPU threads plus this thread as the event loop. The
    /// seccomp filter, if enabled, stays on this thread afterwards.
    pub fn run(&mut self) -> Result<VmExit, RunError> {
        if self.ran {
            return Err(RunError::AlreadyRun);
        }
        self.ran = true;
        let (vcpu_filter, loop_filter) = if self.seccomp {
            (
                Some(Arc::new(seccomp::filter_for(ThreadKind::Vcpu)?)),
                Some(seccomp::filter_with(
                    ThreadKind::EventLoop,
                    if self.serves_fs {
                        seccomp::FS_SERVER
                    } else {
                        &[]
                    },
                )?),
            )
        } else {
            (None, None)
        };
        for vcpu in self.vcpus.drain(..) {
            let filter = vcpu_filter.clone();
            let handle = vcpu.spawn(self.control.clone(), move || match &filter {
                Some(f) => seccomp::apply(f).map_err(|e| e.to_string()),
                None => Ok(()),
            })?;
            self.handles.push(handle);
        }
        if let Some(f) = &loop_filter {
            seccomp::apply(f)?;
        }
        let res = self.event_loop();
        // Whatever ended the loop, the vCPUs go too.
        self.control.stop(&self.handles);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            for h in &self.handles {
                h.kick();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.cleanup();
        res
    }

    fn cleanup(&mut self) {
        let mut paths: Vec<PathBuf> = Vec::new();
        if let Some(ApiListener { path: p, .. }) = self.api.take() {
            paths.push(p);
        }
        if let Some(p) = self.vsock_uds.take() {
            paths.push(p);
        }
        for p in paths {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %p.display(), error = %e, "cannot remove socket");
                }
            }
        }
    }

    fn event_loop(&mut self) -> Result<VmExit, RunError> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            if let Some(exit) = self.exit.reason() {
                return Ok(exit);
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RunError::Epoll(e)),
            };
            for ev in &events[..n] {
                self.dispatch(ev.data());
            }
        }
    }

    fn dispatch(&mut self, token: u64) {
        match token {
            TOKEN_EXIT => {
                let _ = self.exit.eventfd().read();
            }
            TOKEN_SIGNAL => {
                if let Some(sfd) = &mut self.signals {
                    if let Ok(Some(info)) = sfd.read_signal() {
                        info!(signal = info.ssi_signo, "stopping on signal");
                        self.exit
                            .notify(VmExit::Stopped(format!("signal {}", info.ssi_signo)));
                    }
                }
            }
            TOKEN_API_LISTENER => self.accept_api(),
            t if t & !0xffff_ffff == TOKEN_API_CONN => {
                self.api_readable((t & 0xffff_ffff) as RawFd)
            }
            t if t & !0xffff_ffff == TOKEN_QUEUE => {
                let dev = ((t >> 16) & 0xffff) as usize;
                let q = (t & 0xffff) as usize;
                let Some(slot) = self.devices.get(dev) else {
                    return;
                };
                if let Some(evt) = slot.queue_evts.get(q) {
                    let _ = evt.read();
                }
                if let Ok(mut t) = slot.transport.lock() {
                    t.notify_queue(q);
                }
            }
            t if t & !0xffff_ffff == TOKEN_BACKEND => {
                let dev = (t & 0xffff_ffff) as usize;
                if let Some(slot) = self.devices.get(dev) {
                    if let Ok(mut t) = slot.transport.lock() {
                        t.backend_event();
                    }
                }
            }
            other => husk_bounds::ratelimited!(debug, token = other, "unknown event"),
        }
    }

    fn accept_api(&mut self) {
        let Some(api) = &mut self.api else {
            return;
        };
        loop {
            match api.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let ev = EpollEvent::new(EventSet::IN, TOKEN_API_CONN | fd as u64);
                    if self.epoll.ctl(ControlOperation::Add, fd, ev).is_err() {
                        continue;
                    }
                    self.api_conns.insert(
                        fd,
                        ApiConn {
                            stream,
                            lines: LineBuffer::default(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if AcceptReserve::is_fd_limit(&e) => {
                    husk_bounds::ratelimited!(
                        warn,
                        error = %e,
                        "out of fds (--max-open-files): refusing an API client"
                    );
                    if !api.reserve.shed(&api.listener) {
                        return;
                    }
                }
                Err(e) => {
                    husk_bounds::ratelimited!(warn, error = %e, "API accept failed");
                    return;
                }
            }
        }
    }

    fn close_api(&mut self, fd: RawFd) {
        if let Some(conn) = self.api_conns.remove(&fd) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn api_readable(&mut self, fd: RawFd) {
        let mut buf = [0u8; 1024];
        let mut lines = Vec::new();
        let mut close = false;
        {
            let Some(conn) = self.api_conns.get_mut(&fd) else {
                return;
            };
            match conn.stream.read(&mut buf) {
                Ok(0) => close = true,
                Ok(n) => match conn.lines.push(&buf[..n]) {
                    Ok(l) => lines = l,
                    Err(_) => {
                        let _ = conn
                            .stream
                            .write_all(&Response::error("request too long").to_line());
                        close = true;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => close = true,
            }
        }
        for line in lines {
            let resp = match api::parse_request(&line) {
                Ok(action) => self.api_action(action),
                Err(e) => Response::error(e),
            };
            if let Some(conn) = self.api_conns.get_mut(&fd) {
                // Responses are tiny; a client that does not read them loses its connection.
                if conn.stream.write_all(&resp.to_line()).is_err() {
                    close = true;
                }
            }
        }
        if close {
            self.close_api(fd);
        }
    }

    fn api_action(&mut self, action: Action) -> Response {
        match action {
            Action::State => Response::state(self.state()),
            Action::Pause => {
                if self.control.pause(&self.handles) {
                    info!("VM paused");
                    Response::state(VmState::Paused)
                } else {
                    Response::error("vCPUs did not pause in time")
                }
            }
            Action::Resume => {
                self.control.resume();
                info!("VM resumed");
                Response::state(VmState::Running)
            }
            Action::Shutdown => {
                self.exit.notify(VmExit::Stopped("API shutdown".into()));
                Response::state(VmState::Stopping)
            }
        }
    }

    fn state(&self) -> VmState {
        if self.exit.reason().is_some() {
            VmState::Stopping
        } else if self.control.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }
}
