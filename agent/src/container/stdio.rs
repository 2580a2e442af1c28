//! A container process's stdio as the agent holds it: its output buffered
//! (bounded) for the shim's long-poll reads, its stdin written on request,
//! and, for a terminal, the pty master received over the console socket.
//!
//! Output is pulled from the process only while the buffer has room: a
//! process whose output nobody reads blocks on a full pipe, as it would on a
//! host, instead of growing the agent's memory without bound.

use std::{
    collections::VecDeque,
    io,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::net::UnixListener as StdUnixListener,
    },
    path::{Path, PathBuf},
    pin::pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use nix::{
    cmsg_space,
    errno::Errno,
    fcntl::{fcntl, FcntlArg, OFlag},
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
    unistd::pipe2,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    net::UnixListener,
    sync::Notify,
};

use super::error::{Error, Result};

/// Output kept per stream before the process is made to wait.
pub const OUTPUT_BUFFER_BYTES: usize = 1 << 20;
/// Largest chunk one read returns (and the default).
pub const MAX_READ_BYTES: usize = 64 * 1024;
/// Longest a read waits for data (and the default).
pub const MAX_READ_WAIT: Duration = Duration::from_secs(30);
/// Largest stdin write accepted in one call.
pub const MAX_WRITE_BYTES: usize = 1 << 20;
/// How long the container gets to send its pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// ASCII EOT: what a terminal sends for ^D.
const EOT: u8 = 0x04;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One stream of a process's output.
pub struct OutputBuffer {
    state: Mutex<BufState>,
    changed: Notify,
    cap: usize,
}

#[derive(Default)]
struct BufState {
    data: VecDeque<u8>,
    eof: bool,
}

/// What a read returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    pub data: Vec<u8>,
    pub eof: bool,
}

impl OutputBuffer {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(BufState::default()),
            changed: Notify::new(),
            cap,
        })
    }

    /// A stream that is at its end from the start (stderr of a terminal).
    pub fn closed() -> Arc<Self> {
        let b = Self::new(0);
        b.close();
        b
    }

    /// Appends output; never more than the room [`wait_for_room`] reported.
    pub fn push(&self, bytes: &[u8]) {
        let mut s = lock(&self.state);
        let room = self.cap.saturating_sub(s.data.len());
        s.data.extend(&bytes[..bytes.len().min(room)]);
        drop(s);
        self.changed.notify_waiters();
    }

    /// No more output will come.
    pub fn close(&self) {
        lock(&self.state).eof = true;
        self.changed.notify_waiters();
    }

    pub fn len(&self) -> usize {
        lock(&self.state).data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until there is room and returns how much.
    pub async fn wait_for_room(&self) -> usize {
        loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            let room = self.cap.saturating_sub(self.len());
            if room > 0 {
                return room;
            }
            notified.await;
        }
    }

    /// Up to `max` bytes as soon as there are any; EOF once drained and
    /// closed; nothing if `wait` passes first.
    pub async fn read(&self, max: usize, wait: Duration) -> Chunk {
        let max = max.clamp(1, MAX_READ_BYTES);
        let deadline = tokio::time::Instant::now() + wait.min(MAX_READ_WAIT);
        loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            {
                let mut s = lock(&self.state);
                if !s.data.is_empty() {
                    let n = max.min(s.data.len());
                    let data: Vec<u8> = s.data.drain(..n).collect();
                    let eof = s.eof && s.data.is_empty();
                    drop(s);
                    // The pump may be waiting for room.
                    self.changed.notify_waiters();
                    return Chunk { data, eof };
                }
                if s.eof {
                    return Chunk {
                        data: Vec::new(),
                        eof: true,
                    };
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Chunk::default();
            }
        }
    }
}

/// Sets O_NONBLOCK and registers `fd` with tokio.
fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: an OwnedFd is a valid descriptor that stays open, and the
    // same, for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Copies from `fd` into `buf` until EOF (or, for a pty master, EIO: every
/// slave end closed), pausing while `buf` is full.
async fn pump(fd: Arc<AsyncFd<OwnedFd>>, buf: Arc<OutputBuffer>, what: &'static str) {
    let mut chunk = vec![0u8; MAX_READ_BYTES];
    loop {
        let room = buf.wait_for_room().await.min(chunk.len());
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("{what}: {e}");
                break;
            }
        };
        match guard.try_io(|fd| {
            nix::unistd::read(fd.as_raw_fd(), &mut chunk[..room]).map_err(io::Error::from)
        }) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.push(&chunk[..n]),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => break,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => {
                tracing::warn!("{what}: {e}");
                break;
            }
            Err(_would_block) => {}
        }
    }
    buf.close();
}

/// Writes all of `data` to `fd`.
async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// The agent's ends of a process's stdio.
pub struct ProcessIo {
    stdin: tokio::sync::Mutex<Option<Arc<AsyncFd<OwnedFd>>>>,
    pub stdout: Arc<OutputBuffer>,
    pub stderr: Arc<OutputBuffer>,
    /// The pty master, for a terminal.
    tty: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl ProcessIo {
    pub fn is_tty(&self) -> bool {
        self.tty.is_some()
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        if data.len() > MAX_WRITE_BYTES {
            return Err(Error::invalid(format!(
                "data is {} bytes; at most {MAX_WRITE_BYTES} per call",
                data.len()
            )));
        }
        let stdin = self.stdin.lock().await;
        let Some(fd) = stdin.as_ref() else {
            return Err(Error::precondition("stdin is closed"));
        };
        match write_all(fd, data).await {
            Ok(()) => Ok(data.len()),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => Err(Error::precondition(
                "stdin is closed by the process (it exited or closed its stdin)",
            )),
            Err(e) => Err(Error::internal(format!("writing stdin: {e}"))),
        }
    }

    pub async fn close_stdin(&self) -> Result<()> {
        let mut stdin = self.stdin.lock().await;
        if let (Some(fd), true) = (stdin.as_ref(), self.is_tty()) {
            // The master stays open for the output; a terminal's end of
            // input is ^D, as if typed.
            let _ = write_all(fd, &[EOT]).await;
        }
        *stdin = None;
        Ok(())
    }

    pub fn resize(&self, rows: u32, columns: u32) -> Result<()> {
        let Some(tty) = &self.tty else {
            return Err(Error::precondition("the process has no terminal"));
        };
        let size = libc::winsize {
            ws_row: u16::try_from(rows).map_err(|_| Error::invalid("rows is over 65535"))?,
            ws_col: u16::try_from(columns).map_err(|_| Error::invalid("columns is over 65535"))?,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
        let rc = unsafe { libc::ioctl(tty.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(Error::internal(format!(
                "resizing the terminal: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

/// Stdio being set up for a process that is about to be created.
pub enum PendingIo {
    Pipes {
        /// The process's ends: stdin, stdout, stderr, for the helper.
        child: Option<[OwnedFd; 3]>,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    Tty(ConsoleSocket),
}

impl PendingIo {
    pub fn pipes() -> Result<Self> {
        let p = || pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::internal(format!("pipe: {e}")));
        let (in_r, in_w) = p()?;
        let (out_r, out_w) = p()?;
        let (err_r, err_w) = p()?;
        Ok(PendingIo::Pipes {
            child: Some([in_r, out_w, err_w]),
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
        })
    }

    pub fn tty(path: PathBuf) -> Result<Self> {
        ConsoleSocket::bind(path).map(PendingIo::Tty)
    }

    /// What the helper passes to libcontainer: the fds to hand over, and the
    /// console socket path.
    pub fn take_child_side(&mut self) -> (Option<[OwnedFd; 3]>, Option<PathBuf>) {
        match self {
            PendingIo::Pipes { child, .. } => (child.take(), None),
            PendingIo::Tty(console) => (None, Some(console.path.clone())),
        }
    }

    /// Once the process exists: starts pumping its output.
    pub async fn finish(self) -> Result<ProcessIo> {
        match self {
            PendingIo::Pipes {
                stdin,
                stdout,
                stderr,
                ..
            } => {
                let reg = |fd| async_fd(fd).map_err(|e| Error::internal(format!("stdio: {e}")));
                let stdin = Arc::new(reg(stdin)?);
                let (out, err) = (
                    OutputBuffer::new(OUTPUT_BUFFER_BYTES),
                    OutputBuffer::new(OUTPUT_BUFFER_BYTES),
                );
                tokio::spawn(pump(Arc::new(reg(stdout)?), out.clone(), "stdout"));
                tokio::spawn(pump(Arc::new(reg(stderr)?), err.clone(), "stderr"));
                Ok(ProcessIo {
                    stdin: tokio::sync::Mutex::new(Some(stdin)),
                    stdout: out,
                    stderr: err,
                    tty: None,
                })
            }
            PendingIo::Tty(console) => {
                let master = console.receive().await?;
                let master = Arc::new(
                    async_fd(master).map_err(|e| Error::internal(format!("pty master: {e}")))?,
                );
                let out = OutputBuffer::new(OUTPUT_BUFFER_BYTES);
                tokio::spawn(pump(master.clone(), out.clone(), "terminal"));
                Ok(ProcessIo {
                    stdin: tokio::sync::Mutex::new(Some(master.clone())),
                    stdout: out,
                    stderr: OutputBuffer::closed(),
                    tty: Some(master),
                })
            }
        }
    }
}

/// The listening end of runc's console-socket convention: the container's
/// init connects and sends the pty master with SCM_RIGHTS.
pub struct ConsoleSocket {
    path: PathBuf,
    listener: StdUnixListener,
}

impl ConsoleSocket {
    fn bind(path: PathBuf) -> Result<Self> {
        let _ = std::fs::remove_file(&path);
        let listener = StdUnixListener::bind(&path)
            .map_err(|e| Error::internal(format!("console socket {}: {e}", path.display())))?;
        Ok(Self { path, listener })
    }

    async fn receive(self) -> Result<OwnedFd> {
        let result = tokio::time::timeout(CONSOLE_TIMEOUT, self.accept_and_receive()).await;
        let _ = std::fs::remove_file(&self.path);
        match result {
            Ok(r) => r,
            Err(_) => Err(Error::internal(format!(
                "the container sent no pty master within {CONSOLE_TIMEOUT:?}"
            ))),
        }
    }

    async fn accept_and_receive(&self) -> Result<OwnedFd> {
        let io_err = |e: io::Error| Error::internal(format!("console socket: {e}"));
        let std = self.listener.try_clone().map_err(io_err)?;
        std.set_nonblocking(true).map_err(io_err)?;
        let listener = UnixListener::from_std(std).map_err(io_err)?;
        let (stream, _) = listener.accept().await.map_err(io_err)?;
        loop {
            stream.readable().await.map_err(io_err)?;
            match stream.try_io(Interest::READABLE, || {
                receive_fd(stream.as_raw_fd()).map_err(io::Error::from)
            }) {
                Ok(fd) => return Ok(fd),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
    }
}

fn receive_fd(sock: RawFd) -> nix::Result<OwnedFd> {
    let mut name = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut name)];
    let mut cmsg = cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us.
                // Any further ones in the message are closed right away.
                for &extra in &fds[1..] {
                    let _ = nix::unistd::close(extra);
                }
                return Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.bytes == 0 {
        return Err(Errno::ECONNRESET);
    }
    Err(Errno::EBADMSG)
}

/// A short console socket path (sun_path holds 108 bytes; ids alone may be
/// 128 characters).
pub fn console_socket_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_take_what_is_there_and_end_with_eof() {
        let b = OutputBuffer::new(16);
        b.push(b"hello");
        assert_eq!(
            b.read(3, Duration::from_secs(1)).await,
            Chunk {
                data: b"hel".to_vec(),
                eof: false
            }
        );
        b.close();
        // The rest is still delivered, with EOF once drained.
        assert_eq!(
            b.read(100, Duration::from_secs(1)).await,
            Chunk {
                data: b"lo".to_vec(),
                eof: true
            }
        );
        assert_eq!(
            b.read(100, Duration::from_secs(1)).await,
            Chunk {
                data: vec![],
                eof: true
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_read_returns_after_its_wait() {
        let b = OutputBuffer::new(16);
        let c = b.read(10, Duration::from_millis(50)).await;
        assert_eq!(c, Chunk::default());
        // Waits are capped.
        let start = tokio::time::Instant::now();
        b.read(10, Duration::from_secs(3600)).await;
        assert_eq!(start.elapsed(), MAX_READ_WAIT);
    }

    #[tokio::test]
    async fn a_waiting_read_wakes_on_data() {
        let b = OutputBuffer::new(16);
        let reader = {
            let b = b.clone();
            tokio::spawn(async move { b.read(10, Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        b.push(b"x");
        assert_eq!(reader.await.unwrap().data, b"x");
    }

    #[tokio::test]
    async fn the_buffer_is_bounded_and_the_pump_waits_for_room() {
        let (r, w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let buf = OutputBuffer::new(8);
        let task = tokio::spawn(pump(Arc::new(async_fd(r).unwrap()), buf.clone(), "test"));
        let w = Arc::new(async_fd(w).unwrap());
        write_all(&w, b"0123456789abcdef").await.unwrap();
        // The pump fills the buffer to its bound, and no further.
        tokio::time::timeout(Duration::from_secs(5), async {
            while buf.len() < 8 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(buf.len(), 8);
        drop(w);
        let mut all = Vec::new();
        loop {
            let c = buf.read(64, Duration::from_secs(5)).await;
            all.extend(c.data);
            if c.eof {
                break;
            }
        }
        assert_eq!(all, b"0123456789abcdef");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn pipes_carry_stdin_and_report_a_closed_reader() {
        let mut pending = PendingIo::pipes().unwrap();
        let (child, console) = pending.take_child_side();
        assert!(console.is_none());
        let [cin, cout, _cerr] = child.unwrap();
        let io = pending.finish().await.unwrap();
        assert!(!io.is_tty());
        io.write_stdin(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        nix::unistd::read(cin.as_raw_fd(), &mut got).unwrap();
        assert_eq!(&got, b"ping");
        nix::unistd::write(&cout, b"pong").unwrap();
        drop(cout);
        assert_eq!(
            io.stdout.read(10, Duration::from_secs(5)).await.data,
            b"pong"
        );
        assert!(matches!(
            io.resize(10, 10),
            Err(Error::FailedPrecondition(_))
        ));
        drop(cin);
        assert!(matches!(
            io.write_stdin(b"x").await,
            Err(Error::FailedPrecondition(_))
        ));
        io.close_stdin().await.unwrap();
        assert!(matches!(
            io.write_stdin(b"x").await,
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            io.write_stdin(&vec![0; MAX_WRITE_BYTES + 1]).await,
            Err(Error::InvalidArgument(_))
        ));
    }
}
