//! The hybrid-vsock multiplexer: one Unix listener for host-initiated connections, Unix
//! clients for guest-initiated ones, and the table of live connections between them.
//!
//! All host fds (listener, handshakes, connections, a deadline timer) sit in one private epoll
//! set, and that epoll fd is what the front end polls. Level-triggered readiness is only
//! requested for what can make progress right now (no reads while the guest lacks RX buffers
//! or credit, no write interest with nothing buffered), so a stalled guest never makes the
//! device thread spin.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, GuestPkt, RxOutcome, Verdict};
use super::handshake::{Handshake, Progress};
use super::MuxerConfig;
use crate::devices::virtio::vsock::defs::*;
use crate::devices::virtio::vsock::{PktHeader, VsockBackend, VsockChannel, VsockError};
use crate::sock::{bind_unix_listener, AcceptReserve};

/// Epoll tokens 0 and 1 are fixed; every handshake/connection gets a fresh one, never reused,
/// so a stale event in a batch can never be mistaken for a newer fd with the same number.
const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const FIRST_DYNAMIC_TOKEN: u64 = 2;

/// Host-side ports for host-initiated connections start here, away from the well-known ports
/// guests listen on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Events handled per `notify` call; the rest stay ready and come next time.
const EVENTS_PER_NOTIFY: usize = 64;
/// Connections accepted per listener event, so one busy client cannot starve the rest.
const ACCEPTS_PER_EVENT: usize = 32;

/// A connection is named by its host-side port and its guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The port on the host side (`src_port` of packets we send).
    pub local_port: u32,
    /// The port on the guest side (`dst_port` of packets we send).
    pub peer_port: u32,
}

struct ConnEntry {
    conn: Connection,
    token: u64,
    /// What the fd is registered for in our epoll set; `None` when not registered.
    registered: Option<EventSet>,
    /// The key is in `rx_queue`.
    queued: bool,
}

/// The hybrid-vsock [`VsockBackend`].
pub struct VsockMuxer {
    cfg: MuxerConfig,
    listener: UnixListener,
    /// Lets the listener shed a connection at the fd limit instead of spinning.
    reserve: AcceptReserve,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, ConnEntry>,
    conn_tokens: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, Handshake>,
    /// Connections that may have a packet for the guest, in the order they asked.
    rx_queue: VecDeque<ConnKey>,
    /// RSTs for connections that no longer exist (or never did).
    rst_queue: VecDeque<ConnKey>,
    next_token: u64,
    next_local_port: u32,
}

impl VsockMuxer {
    /// Binds the hybrid vsock socket at `cfg.uds_path`.
    pub fn bind(cfg: MuxerConfig) -> Result<Self, VsockError> {
        let listener = bind_unix_listener(&cfg.uds_path).map_err(|source| VsockError::Listen {
            path: cfg.uds_path.clone(),
            source,
        })?;
        let path = cfg.uds_path.clone();
        let muxer = listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Listen {
                path: path.clone(),
                source: e.into(),
            })
            .and_then(|()| Self::with_listener(cfg, listener));
        if muxer.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        muxer
    }

    fn with_listener(cfg: MuxerConfig, listener: UnixListener) -> Result<Self, VsockError> {
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new()
            .map_err(|e| VsockError::Timer(std::io::Error::from_raw_os_error(e.errno())))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )
            .map_err(VsockError::Epoll)?;
        let reserve = AcceptReserve::new(listener.as_fd()).map_err(|e| VsockError::Listen {
            path: cfg.uds_path.clone(),
            source: e.into(),
        })?;
        Ok(VsockMuxer {
            cfg,
            listener,
            reserve,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            conn_tokens: HashMap::new(),
            handshakes: HashMap::new(),
            rx_queue: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_token: FIRST_DYNAMIC_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    pub fn config(&self) -> &MuxerConfig {
        &self.cfg
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host clients that have not finished their `CONNECT` line.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Host fds the muxer is tracking besides its listener and timer (for leak checks).
    pub fn tracked_fds(&self) -> usize {
        self.handshakes.len() + self.conn_tokens.len()
    }

    pub fn connection_keys(&self) -> Vec<ConnKey> {
        self.conns.keys().copied().collect()
    }

    fn total_connections(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn queue_rst(&mut self, key: ConnKey) {
        // Bounded: a guest that floods us with bad packets and never supplies RX buffers gets
        // some of its RSTs dropped, which only matters to itself.
        if self.rst_queue.len() >= self.cfg.max_connections {
            husk_bounds::ratelimited!(debug, ?key, "RST queue full; dropping RST");
            return;
        }
        self.rst_queue.push_back(key);
    }

    fn remove_conn(&mut self, key: ConnKey) -> Option<Connection> {
        let entry = self.conns.remove(&key)?;
        if entry.registered.is_some() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                entry.conn.stream().as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.conn_tokens.remove(&entry.token);
        if entry.queued {
            self.rx_queue.retain(|k| *k != key);
        }
        Some(entry.conn)
    }

    fn reset_conn(&mut self, key: ConnKey) {
        if self.remove_conn(key).is_some() {
            self.queue_rst(key);
        }
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.sync(key),
            Verdict::Reset => self.reset_conn(key),
            Verdict::Drop => {
                self.remove_conn(key);
            }
        }
    }

    /// Brings the epoll registration, RX queueing and timer in line with the connection's
    /// state after anything happened to it.
    fn sync(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.is_finished() {
            self.reset_conn(key);
            return;
        }
        let want = entry.conn.interest();
        if want != entry.registered {
            let fd = entry.conn.stream().as_raw_fd();
            let res = match (entry.registered, want) {
                (None, Some(ev)) => {
                    self.epoll
                        .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, entry.token))
                }
                (Some(_), Some(ev)) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(ev, entry.token),
                ),
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, None) => Ok(()),
            };
            if let Err(e) = res {
                husk_bounds::ratelimited!(warn, ?key, error = %e, "cannot update epoll registration; resetting connection");
                // The fd's registration state is unknown now; removal deletes it either way.
                entry.registered = entry.registered.or(want);
                self.reset_conn(key);
                return;
            }
            entry.registered = want;
        }
        if entry.conn.has_pending_rx() && !entry.queued {
            entry.queued = true;
            self.rx_queue.push_back(key);
        }
        if entry.conn.deadline().is_some() {
            self.arm_timer();
        }
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let tick = [
            self.cfg.handshake_timeout,
            self.cfg.connect_timeout,
            self.cfg.shutdown_timeout,
        ]
        .into_iter()
        .min()
        .unwrap_or(Duration::from_secs(1))
            / 4;
        let tick = tick.clamp(Duration::from_millis(5), Duration::from_secs(1));
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => {
                husk_bounds::ratelimited!(warn, error = %e, "cannot arm the vsock deadline timer")
            }
        }
    }

    /// Reaps handshakes and connections whose deadline passed.
    fn sweep(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| hs.deadline() <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            husk_bounds::ratelimited!(
                debug,
                "host client did not complete the handshake in time; closing"
            );
            self.drop_handshake(token);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            husk_bounds::ratelimited!(debug, ?key, "connection deadline passed; resetting");
            self.reset_conn(key);
        }
        let pending =
            !self.handshakes.is_empty() || self.conns.values().any(|e| e.conn.deadline().is_some());
        if !pending {
            match self.timer.clear() {
                Ok(()) => self.timer_armed = false,
                Err(e) => {
                    husk_bounds::ratelimited!(warn, error = %e, "cannot disarm the vsock deadline timer")
                }
            }
        }
    }

    fn drop_handshake(&mut self, token: u64) {
        if let Some(hs) = self.handshakes.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hs.stream().as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn accept_host_clients(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if AcceptReserve::is_fd_limit(&e) => {
                    husk_bounds::ratelimited!(
                        warn,
                        error = %e,
                        "out of fds (--max-open-files): refusing a host client"
                    );
                    if self.reserve.shed(&self.listener) {
                        continue;
                    }
                    return;
                }
                Err(e) => {
                    husk_bounds::ratelimited!(warn, error = %e, "accept on hybrid vsock socket failed");
                    return;
                }
            };
            if self.total_connections() >= self.cfg.max_connections {
                husk_bounds::ratelimited!(
                    warn,
                    max = self.cfg.max_connections,
                    "too many vsock connections; refusing host client"
                );
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                husk_bounds::ratelimited!(warn, error = %e, "cannot make host client non-blocking; closing it");
                continue;
            }
            let token = self.new_token();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                husk_bounds::ratelimited!(warn, error = %e, "cannot poll host client; closing it");
                continue;
            }
            self.handshakes.insert(
                token,
                Handshake::new(stream, now + self.cfg.handshake_timeout),
            );
            self.arm_timer();
        }
    }

    fn on_handshake_event(&mut self, token: u64, now: Instant) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let peer_port = match hs.read() {
            Progress::Incomplete => return,
            Progress::Failed(why) => {
                husk_bounds::ratelimited!(debug, why, "host client handshake failed; closing");
                self.drop_handshake(token);
                return;
            }
            Progress::Connect(port) => port,
        };
        let Some(hs) = self.handshakes.remove(&token) else {
            return;
        };
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            husk_bounds::ratelimited!(
                warn,
                peer_port,
                "no free host-side vsock port; closing host client"
            );
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hs.stream().as_raw_fd(),
                EpollEvent::default(),
            );
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        husk_bounds::ratelimited!(debug, ?key, "host client connecting to guest");
        let conn = Connection::new_host_initiated(
            hs.into_stream(),
            local_port,
            peer_port,
            self.cfg.conn_buf_size,
            self.cfg.connect_timeout,
            self.cfg.shutdown_timeout,
            now,
        );
        self.conn_tokens.insert(token, key);
        self.conns.insert(
            key,
            ConnEntry {
                conn,
                token,
                // Still registered for IN from the handshake; sync() fixes the interest.
                registered: Some(EventSet::IN),
                queued: false,
            },
        );
        self.sync(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.cfg.max_connections {
            let port = self.next_local_port;
            self.next_local_port = if port >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn on_conn_event(&mut self, token: u64, evset: EventSet) {
        let Some(&key) = self.conn_tokens.get(&token) else {
            return;
        };
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let verdict = entry.conn.on_host_event(evset);
        self.apply(key, verdict);
    }

    /// The guest connects to host port `key.local_port`: connect to `<uds>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, pkt: &GuestPkt) {
        if self.total_connections() >= self.cfg.max_connections {
            husk_bounds::ratelimited!(
                warn,
                ?key,
                max = self.cfg.max_connections,
                "too many vsock connections; refusing guest connection"
            );
            self.queue_rst(key);
            return;
        }
        let mut path = self.cfg.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        let path = PathBuf::from(path);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                husk_bounds::ratelimited!(debug, ?key, path = %path.display(), error = %e,
                    "guest connection refused on the host");
                self.queue_rst(key);
                return;
            }
        };
        husk_bounds::ratelimited!(debug, ?key, path = %path.display(), "guest connected to host listener");
        let conn = Connection::new_guest_initiated(
            stream,
            key.local_port,
            key.peer_port,
            self.cfg.conn_buf_size,
            self.cfg.shutdown_timeout,
            pkt,
        );
        let token = self.new_token();
        self.conn_tokens.insert(token, key);
        self.conns.insert(
            key,
            ConnEntry {
                conn,
                token,
                registered: None,
                queued: false,
            },
        );
        self.sync(key);
    }

    fn write_header<B: BitmapSlice>(
        &self,
        pkt: &mut VsockPacket<'_, B>,
        key: ConnKey,
        op: u16,
        flags: u32,
        len: u32,
        credit: (u32, u32),
    ) {
        pkt.set_src_cid(VSOCK_HOST_CID)
            .set_dst_cid(self.cfg.guest_cid)
            .set_src_port(key.local_port)
            .set_dst_port(key.peer_port)
            .set_type(VIRTIO_VSOCK_TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(len)
            .set_buf_alloc(credit.0)
            .set_fwd_cnt(credit.1);
    }
}

/// Connects to a Unix socket without ever blocking: a listener whose backlog is full fails
/// with EAGAIN instead of stalling the device thread.
fn connect_nonblocking(path: &std::path::Path) -> nix::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

impl VsockChannel for VsockMuxer {
    fn send_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        if pkt.src_cid() != self.cfg.guest_cid || pkt.dst_cid() != VSOCK_HOST_CID {
            // Not addressed from this guest to the host: there is nobody to answer.
            husk_bounds::ratelimited!(
                warn,
                src_cid = pkt.src_cid(),
                dst_cid = pkt.dst_cid(),
                guest_cid = self.cfg.guest_cid,
                "dropping guest packet with wrong CIDs"
            );
            return;
        }
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        let op = pkt.op();
        if pkt.type_() != VIRTIO_VSOCK_TYPE_STREAM {
            husk_bounds::ratelimited!(
                warn,
                ?key,
                type_ = pkt.type_(),
                "unsupported vsock socket type"
            );
            if op != VIRTIO_VSOCK_OP_RST {
                self.reset_conn(key);
                self.queue_rst(key);
            }
            return;
        }
        let gp = GuestPkt {
            op,
            flags: pkt.flags(),
            len: pkt.len(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        };
        let data = if op == VIRTIO_VSOCK_OP_RW {
            pkt.data_slice()
        } else {
            None
        };
        let now = Instant::now();

        if op == VIRTIO_VSOCK_OP_REQUEST {
            if self.remove_conn(key).is_some() {
                // The guest reused the port pair (it rebooted, or forgot): the old stream is
                // dead either way.
                husk_bounds::ratelimited!(
                    info,
                    ?key,
                    "guest re-requested a live connection; replacing it"
                );
            }
            self.guest_connect(key, &gp);
            return;
        }
        let Some(entry) = self.conns.get_mut(&key) else {
            if op != VIRTIO_VSOCK_OP_RST {
                husk_bounds::ratelimited!(
                    debug,
                    ?key,
                    op,
                    "packet for unknown connection; answering RST"
                );
                self.queue_rst(key);
            }
            return;
        };
        let verdict = entry.conn.on_guest_pkt(&gp, data, now);
        self.apply(key, verdict);
    }

    fn recv_pkt<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Result<bool, VsockError> {
        // Zero the header first: it is the only step that can fail, so a failure here loses
        // nothing we meant to send.
        pkt.set_header_from_raw(&[0u8; VSOCK_PKT_HDR_SIZE])
            .map_err(VsockError::PacketHeader)?;
        if let Some(key) = self.rst_queue.pop_front() {
            self.write_header(pkt, key, VIRTIO_VSOCK_OP_RST, 0, 0, (0, 0));
            return Ok(true);
        }
        let data = pkt.data_slice().cloned();
        let now = Instant::now();
        // Each queued connection gets one try per call: one with nothing to send re-queues
        // itself at the back and must not be revisited in this same call.
        for _ in 0..self.rx_queue.len() {
            let Some(key) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.queued = false;
            match entry.conn.fill_rx(data.as_ref(), now) {
                RxOutcome::Packet { op, flags, len } => {
                    let credit = (entry.conn.buf_alloc(), entry.conn.fwd_cnt());
                    self.write_header(pkt, key, op, flags, len, credit);
                    self.sync(key);
                    return Ok(true);
                }
                RxOutcome::Nothing => self.sync(key),
                RxOutcome::Reset => {
                    self.remove_conn(key);
                    self.write_header(pkt, key, VIRTIO_VSOCK_OP_RST, 0, 0, (0, 0));
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_queue.is_empty()
    }
}

impl AsRawFd for VsockMuxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl VsockBackend for VsockMuxer {
    fn notify(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_NOTIFY];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => return,
            Err(e) => {
                husk_bounds::ratelimited!(warn, error = %e, "vsock epoll wait failed");
                return;
            }
        };
        let now = Instant::now();
        for ev in &events[..n] {
            let token = ev.data();
            match token {
                TOKEN_LISTENER => self.accept_host_clients(now),
                TOKEN_TIMER => {
                    // Only called when readable, so this read does not block.
                    let _ = self.timer.wait();
                    self.sweep(now);
                }
                t if self.handshakes.contains_key(&t) => self.on_handshake_event(t, now),
                t => self.on_conn_event(t, ev.event_set()),
            }
        }
    }

    fn on_malformed_pkt(&mut self, hdr: &PktHeader) {
        if hdr.src_cid != self.cfg.guest_cid || hdr.dst_cid != VSOCK_HOST_CID {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            husk_bounds::ratelimited!(
                warn,
                ?key,
                "malformed packet on a live connection; resetting it"
            );
            self.reset_conn(key);
        }
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        let tokens: Vec<u64> = self.handshakes.keys().copied().collect();
        for token in tokens {
            self.drop_handshake(token);
        }
        self.rx_queue.clear();
        self.rst_queue.clear();
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // The socket file is ours: leaving it would make the next bind think it is stale at
        // best, and clients would connect to nothing.
        let _ = std::fs::remove_file(&self.cfg.uds_path);
    }
}
