//! The agent's log, streamed to the host over a vsock connection the guest
//! opens itself (`husk.log_port=<port>` on the kernel command line).
//!
//! The serial console is slow and shared with the kernel; the host side wants
//! the agent's log as a stream of its own. Lines logged before the connection
//! is up are kept (up to a bound) and sent first, so the host sees the whole
//! start-up. When the host end goes away the stream is dropped and the console
//! stays the only copy.

use std::{
    fs::File,
    io::Write,
    sync::{Mutex, OnceLock},
    thread,
    time::Duration,
};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

/// Kernel parameter naming the host port to stream to.
pub const LOG_PORT_PARAM: &str = "husk.log_port";
/// The host's vsock context id.
const HOST_CID: u32 = 2;
/// Log kept while the connection is not up yet; more is dropped and counted.
const BACKLOG_LIMIT: usize = 64 * 1024;
const CONNECT_ATTEMPTS: u32 = 50;
const CONNECT_RETRY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    sink: Option<File>,
    backlog: Vec<u8>,
    dropped: usize,
    /// False once the stream failed for good: stop keeping a backlog.
    live: bool,
}

static STREAM: OnceLock<Mutex<State>> = OnceLock::new();

/// Starts connecting to host `port` in the background; returns at once.
pub fn start(port: u32) {
    let state = Mutex::new(State {
        live: true,
        ..State::default()
    });
    if STREAM.set(state).is_err() {
        return;
    }
    let spawned = thread::Builder::new()
        .name("log-stream".into())
        .spawn(move || connect_loop(port));
    if let Err(e) = spawned {
        give_up(&format!("cannot start the log stream thread: {e}"));
    }
}

/// Sends `buf` to the host, or keeps it until the connection is up.
pub fn write(buf: &[u8]) {
    let Some(state) = STREAM.get() else { return };
    let Ok(mut s) = state.lock() else { return };
    if let Some(sink) = s.sink.as_mut() {
        if sink.write_all(buf).is_err() {
            // The host closed its end: the console keeps the log from here.
            s.sink = None;
            s.live = false;
        }
    } else if s.live {
        if s.backlog.len() + buf.len() <= BACKLOG_LIMIT {
            s.backlog.extend_from_slice(buf);
        } else {
            s.dropped += buf.len();
        }
    }
}

fn connect_loop(port: u32) {
    let mut last_error = String::new();
    for _ in 0..CONNECT_ATTEMPTS {
        match connect_once(port) {
            Ok(mut file) => {
                let Some(state) = STREAM.get() else { return };
                let Ok(mut s) = state.lock() else { return };
                let mut backlog = std::mem::take(&mut s.backlog);
                if s.dropped > 0 {
                    backlog.extend_from_slice(
                        format!("husk-agent: {} bytes of early log dropped\n", s.dropped)
                            .as_bytes(),
                    );
                }
                if file.write_all(&backlog).is_ok() {
                    s.sink = Some(file);
                } else {
                    s.live = false;
                }
                return;
            }
            Err(e) => last_error = e.to_string(),
        }
        thread::sleep(CONNECT_RETRY);
    }
    give_up(&format!(
        "no host listener on vsock port {port} after {CONNECT_ATTEMPTS} attempts ({last_error}); log stays on the console"
    ));
}

fn connect_once(port: u32) -> nix::Result<File> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(HOST_CID, port),
    )?;
    Ok(File::from(fd))
}

fn give_up(reason: &str) {
    if let Some(state) = STREAM.get() {
        if let Ok(mut s) = state.lock() {
            s.live = false;
            s.backlog.clear();
        }
    }
    tracing::warn!("{reason}");
}
