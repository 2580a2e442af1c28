//! One hybrid-vsock connection: a host Unix stream on one side, a guest vsock stream on the
//! other, with the virtio credit accounting for both directions.
//!
//! The connection never touches virtqueues or the muxer's tables: the muxer feeds it guest
//! packets ([`Connection::on_guest_pkt`]) and host readiness ([`Connection::on_host_event`]),
//! asks it to fill RX packets ([`Connection::fill_rx`]), and acts on the returned [`Verdict`].
//!
//! Naming: "recv" counts bytes that came from the guest (and go to the host stream), "sent"
//! counts bytes that went to the guest (read from the host stream).

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::vsock::defs::*;

/// What the muxer must do with a connection after an operation on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep the connection.
    Keep,
    /// Remove the connection and send RST to the guest. This is both the error path and the
    /// last step of an orderly close (Linux waits for an RST after a full SHUTDOWN).
    Reset,
    /// Remove the connection without telling the guest (it sent RST itself).
    Drop,
}

/// The header fields of a guest (TX) packet that matter to a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuestPkt {
    pub op: u16,
    pub flags: u32,
    pub len: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// A packet the connection wants the muxer to put in the RX queue; the muxer adds addressing
/// and the credit fields ([`Connection::buf_alloc`], [`Connection::fwd_cnt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RxOutcome {
    /// A packet was produced; `len` payload bytes were already written to the data buffer.
    Packet { op: u16, flags: u32, len: u32 },
    /// Nothing to send right now.
    Nothing,
    /// The connection failed: the muxer sends RST instead and drops it.
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated: waiting for the guest's RESPONSE to our REQUEST.
    LocalInit,
    Established,
    /// The host stream is gone and we sent a full SHUTDOWN: waiting for the guest's RST.
    Closing,
}

pub(crate) struct Connection {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: State,
    /// Our receive buffer size, advertised to the guest in every packet.
    buf_alloc: u32,
    shutdown_timeout: Duration,
    deadline: Option<Instant>,

    // Control packets waiting for an RX buffer.
    pending_request: bool,
    pending_response: bool,
    pending_credit_update: bool,
    pending_shutdown: u32,

    // Guest -> host direction.
    /// Bytes waiting for the host stream to become writable.
    host_buf: VecDeque<u8>,
    /// Leading bytes of `host_buf` that are ours (the `OK <port>` line), not guest data, so
    /// they do not count against the guest's credit.
    host_buf_local: usize,
    recv_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_told: Wrapping<u32>,
    guest_shut_send: bool,
    guest_shut_recv: bool,

    // Host -> guest direction.
    sent_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// We asked the guest for credit and have not heard from it since.
    credit_requested: bool,
    /// The host stream has data (or EOF) we have not read yet.
    host_readable: bool,
    /// The host stream returned EOF: we sent (or will send) SHUTDOWN(SEND).
    host_eof: bool,
    /// The host peer closed its end entirely (EPOLLHUP).
    host_hup: bool,
}

impl Connection {
    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        state: State,
        buf_alloc: u32,
        shutdown_timeout: Duration,
    ) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            buf_alloc,
            shutdown_timeout,
            deadline: None,
            pending_request: false,
            pending_response: false,
            pending_credit_update: false,
            pending_shutdown: 0,
            host_buf: VecDeque::new(),
            host_buf_local: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            guest_shut_send: false,
            guest_shut_recv: false,
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_readable: false,
            host_eof: false,
            host_hup: false,
        }
    }

    /// A host client completed `CONNECT <peer_port>`: we owe the guest a REQUEST.
    pub(crate) fn new_host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        buf_alloc: u32,
        connect_timeout: Duration,
        shutdown_timeout: Duration,
        now: Instant,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            local_port,
            peer_port,
            State::LocalInit,
            buf_alloc,
            shutdown_timeout,
        );
        conn.pending_request = true;
        conn.deadline = Some(now + connect_timeout);
        conn
    }

    /// The guest's REQUEST reached a host listener: we owe the guest a RESPONSE.
    pub(crate) fn new_guest_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        buf_alloc: u32,
        shutdown_timeout: Duration,
        request: &GuestPkt,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            local_port,
            peer_port,
            State::Established,
            buf_alloc,
            shutdown_timeout,
        );
        conn.update_peer_credit(request);
        conn.pending_response = true;
        conn
    }

    pub(crate) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.state
    }

    pub(crate) fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    pub(crate) fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Bytes the guest may still send before overrunning what it was told.
    fn peer_free(&self) -> u32 {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        // A guest reporting fwd_cnt beyond what we sent makes `in_flight` wrap to a huge value:
        // that reads as "no credit", which is the safe answer.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest data we hold but have not yet written to the host stream.
    fn guest_bytes_buffered(&self) -> u32 {
        (self.recv_cnt - self.fwd_cnt).0
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && !self.guest_shut_recv
    }

    /// The guest believes our buffer is getting full, but we have drained it since we last
    /// told it: without an update it would stall.
    fn need_credit_update(&self) -> bool {
        if self.state != State::Established || self.guest_shut_send {
            return false;
        }
        let guest_view_used = (self.recv_cnt - self.fwd_cnt_told).0;
        let guest_view_free = self.buf_alloc.saturating_sub(guest_view_used);
        guest_view_free < self.buf_alloc / 2 && self.fwd_cnt != self.fwd_cnt_told
    }

    pub(crate) fn has_pending_rx(&self) -> bool {
        self.pending_request
            || self.pending_response
            || self.pending_shutdown != 0
            || self.pending_credit_update
            || self.need_credit_update()
            || (self.can_read_host() && (self.peer_free() > 0 || !self.credit_requested))
    }

    /// Events to poll the host stream for; `None` once the host end is gone (HUP is reported
    /// whatever the interest, so keeping the fd registered would spin).
    pub(crate) fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut ev = EventSet::empty();
        // Don't poll for input we could not forward yet: the pending read happens in
        // `fill_rx` when the guest has an RX buffer and credit.
        if self.state == State::Established
            && !self.host_readable
            && !self.host_eof
            && !self.guest_shut_recv
        {
            ev |= EventSet::IN;
        }
        if !self.host_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        Some(ev)
    }

    /// Whether both directions are finished, so the connection should end with an RST.
    pub(crate) fn is_finished(&self) -> bool {
        if !self.host_buf.is_empty() || self.pending_shutdown != 0 {
            return false;
        }
        self.guest_shut_send && (self.guest_shut_recv || self.host_eof)
    }

    fn update_peer_credit(&mut self, pkt: &GuestPkt) {
        let changed =
            pkt.buf_alloc != self.peer_buf_alloc || Wrapping(pkt.fwd_cnt) != self.peer_fwd_cnt;
        self.peer_buf_alloc = pkt.buf_alloc;
        self.peer_fwd_cnt = Wrapping(pkt.fwd_cnt);
        if changed {
            self.credit_requested = false;
        }
    }

    /// Handles one packet the guest sent on this connection.
    pub(crate) fn on_guest_pkt<B: BitmapSlice>(
        &mut self,
        pkt: &GuestPkt,
        data: Option<&VolatileSlice<B>>,
        now: Instant,
    ) -> Verdict {
        // Every packet carries the guest's current credit, whatever its op.
        self.update_peer_credit(pkt);

        match pkt.op {
            VIRTIO_VSOCK_OP_RST => Verdict::Drop,
            VIRTIO_VSOCK_OP_RESPONSE => {
                if self.state != State::LocalInit {
                    husk_bounds::ratelimited!(
                        warn,
                        local = self.local_port,
                        peer = self.peer_port,
                        "unexpected RESPONSE from guest; resetting"
                    );
                    return Verdict::Reset;
                }
                self.state = State::Established;
                self.deadline = None;
                // The host client learns that the guest accepted; data it sent after its
                // CONNECT line is still unread in the socket and follows normally.
                let ok = format!("OK {}\n", self.local_port);
                self.host_buf.extend(ok.as_bytes());
                self.host_buf_local += ok.len();
                self.flush_host_buf()
            }
            VIRTIO_VSOCK_OP_RW => self.on_guest_data(pkt, data),
            VIRTIO_VSOCK_OP_CREDIT_UPDATE => Verdict::Keep,
            VIRTIO_VSOCK_OP_CREDIT_REQUEST => {
                self.pending_credit_update = true;
                Verdict::Keep
            }
            VIRTIO_VSOCK_OP_SHUTDOWN => self.on_guest_shutdown(pkt.flags, now),
            op => {
                husk_bounds::ratelimited!(warn, local = self.local_port,
                    peer = self.peer_port,
                    op,
                    state = ?self.state,
                    "unexpected op on connection; resetting"
                );
                Verdict::Reset
            }
        }
    }

    fn on_guest_data<B: BitmapSlice>(
        &mut self,
        pkt: &GuestPkt,
        data: Option<&VolatileSlice<B>>,
    ) -> Verdict {
        if self.state != State::Established || self.guest_shut_send {
            husk_bounds::ratelimited!(debug, local = self.local_port,
                peer = self.peer_port,
                state = ?self.state,
                "data from guest on a connection that cannot take it; resetting"
            );
            return Verdict::Reset;
        }
        let Some(data) = data else {
            // A zero-length RW: only the credit fields mattered.
            return Verdict::Keep;
        };
        let len = data.len();
        if u64::from(self.guest_bytes_buffered()) + len as u64 > u64::from(self.buf_alloc) {
            husk_bounds::ratelimited!(
                warn,
                local = self.local_port,
                peer = self.peer_port,
                len,
                hdr_len = pkt.len,
                buffered = self.guest_bytes_buffered(),
                buf_alloc = self.buf_alloc,
                "guest overran its credit; resetting"
            );
            return Verdict::Reset;
        }
        self.recv_cnt += Wrapping(len as u32);

        let mut written = 0;
        if self.host_buf.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(e) if io_kind(&e) == Some(ErrorKind::WouldBlock) => {}
                Err(e) if io_kind(&e) == Some(ErrorKind::Interrupted) => {}
                Err(e) => {
                    husk_bounds::ratelimited!(debug, local = self.local_port, peer = self.peer_port, error = %e,
                        "host stream write failed; resetting");
                    return Verdict::Reset;
                }
            }
            self.fwd_cnt += Wrapping(written as u32);
        }
        if written < len {
            let rest = match data.offset(written) {
                Ok(rest) => rest,
                Err(e) => {
                    husk_bounds::ratelimited!(warn, error = %e, "guest data slice error; resetting");
                    return Verdict::Reset;
                }
            };
            let mut tmp = vec![0u8; rest.len()];
            let copied = rest.copy_to(&mut tmp[..]);
            self.host_buf.extend(&tmp[..copied]);
        }
        Verdict::Keep
    }

    fn on_guest_shutdown(&mut self, flags: u32, now: Instant) -> Verdict {
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV != 0 {
            self.guest_shut_recv = true;
        }
        if flags & VIRTIO_VSOCK_SHUTDOWN_SEND != 0 {
            self.guest_shut_send = true;
        }
        if self.state == State::LocalInit {
            // A SHUTDOWN instead of a RESPONSE: the guest refused.
            return Verdict::Reset;
        }
        if self.guest_shut_send && self.host_buf.is_empty() && !self.host_hup {
            // Give the host client its EOF. ENOTCONN just means it is gone already.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.is_finished() {
            return Verdict::Reset;
        }
        if self.guest_shut_send && self.guest_shut_recv {
            // The guest closed while we still hold data for the host: give the host a bounded
            // time to take it.
            self.deadline = Some(now + self.shutdown_timeout);
        }
        Verdict::Keep
    }

    /// Writes buffered guest data to the host stream.
    fn flush_host_buf(&mut self) -> Verdict {
        while !self.host_buf.is_empty() {
            let (front, _) = self.host_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.host_buf.drain(..n);
                    let local = n.min(self.host_buf_local);
                    self.host_buf_local -= local;
                    self.fwd_cnt += Wrapping((n - local) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Verdict::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    husk_bounds::ratelimited!(debug, local = self.local_port, peer = self.peer_port, error = %e,
                        "host stream write failed; resetting");
                    return Verdict::Reset;
                }
            }
        }
        if self.guest_shut_send && !self.host_hup {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.is_finished() {
            Verdict::Reset
        } else {
            Verdict::Keep
        }
    }

    /// Handles readiness of the host stream.
    pub(crate) fn on_host_event(&mut self, evset: EventSet) -> Verdict {
        if evset.contains(EventSet::ERROR) {
            husk_bounds::ratelimited!(
                debug,
                local = self.local_port,
                peer = self.peer_port,
                "host stream error; resetting"
            );
            return Verdict::Reset;
        }
        if evset.contains(EventSet::HANG_UP) {
            if self.state == State::LocalInit {
                // The client gave up before the guest answered.
                return Verdict::Reset;
            }
            self.host_hup = true;
            // Nobody will read what we hold for the host any more.
            self.host_buf.clear();
            self.host_buf_local = 0;
            if self.guest_shut_recv || self.host_eof {
                self.host_eof = true;
                self.pending_shutdown |= VIRTIO_VSOCK_SHUTDOWN_ALL;
            } else {
                // Forward what the host wrote before closing, then SHUTDOWN (see fill_rx).
                self.host_readable = true;
            }
            return Verdict::Keep;
        }
        if evset.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if evset.contains(EventSet::OUT) {
            return self.flush_host_buf();
        }
        Verdict::Keep
    }

    /// Produces the next packet for the guest, reading host data into `data` when that is the
    /// next thing to send.
    pub(crate) fn fill_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<B>>,
        now: Instant,
    ) -> RxOutcome {
        let out = self.next_rx(data, now);
        if matches!(out, RxOutcome::Packet { .. }) {
            // Every packet carries fwd_cnt, so each one is also a credit update.
            self.fwd_cnt_told = self.fwd_cnt;
            self.pending_credit_update = false;
        }
        out
    }

    fn next_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<B>>,
        now: Instant,
    ) -> RxOutcome {
        let ctrl = |op| RxOutcome::Packet {
            op,
            flags: 0,
            len: 0,
        };
        if self.state == State::LocalInit {
            if self.pending_request {
                self.pending_request = false;
                return ctrl(VIRTIO_VSOCK_OP_REQUEST);
            }
            return RxOutcome::Nothing;
        }
        if self.pending_response {
            self.pending_response = false;
            return ctrl(VIRTIO_VSOCK_OP_RESPONSE);
        }
        if self.can_read_host() {
            let credit = self.peer_free().min(MAX_PKT_PAYLOAD);
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return ctrl(VIRTIO_VSOCK_OP_CREDIT_REQUEST);
                }
            } else if let Some(buf) = data.filter(|d| !d.is_empty()) {
                let want = buf.len().min(credit as usize);
                let read = match buf.subslice(0, want) {
                    Ok(mut dst) => self.stream.read_volatile(&mut dst),
                    Err(e) => Err(e),
                };
                match read {
                    Ok(0) => {
                        self.host_readable = false;
                        self.host_eof = true;
                        self.pending_shutdown |= if self.host_hup {
                            VIRTIO_VSOCK_SHUTDOWN_ALL
                        } else {
                            VIRTIO_VSOCK_SHUTDOWN_SEND
                        };
                    }
                    Ok(n) => {
                        self.sent_cnt += Wrapping(n as u32);
                        return RxOutcome::Packet {
                            op: VIRTIO_VSOCK_OP_RW,
                            flags: 0,
                            len: n as u32,
                        };
                    }
                    Err(e) if io_kind(&e) == Some(ErrorKind::WouldBlock) => {
                        self.host_readable = false;
                    }
                    Err(e) if io_kind(&e) == Some(ErrorKind::Interrupted) => {}
                    Err(e) => {
                        husk_bounds::ratelimited!(debug, local = self.local_port, peer = self.peer_port, error = %e,
                            "host stream read failed; resetting");
                        return RxOutcome::Reset;
                    }
                }
            }
        }
        if self.pending_shutdown != 0 {
            let flags = self.pending_shutdown;
            self.pending_shutdown = 0;
            if flags & VIRTIO_VSOCK_SHUTDOWN_RCV != 0 {
                // We told the guest we are gone for good: it should answer RST soon.
                self.state = State::Closing;
                self.deadline = Some(now + self.shutdown_timeout);
            }
            return RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_SHUTDOWN,
                flags,
                len: 0,
            };
        }
        if self.pending_credit_update || self.need_credit_update() {
            return ctrl(VIRTIO_VSOCK_OP_CREDIT_UPDATE);
        }
        RxOutcome::Nothing
    }
}

fn io_kind(e: &VolatileMemoryError) -> Option<ErrorKind> {
    match e {
        VolatileMemoryError::IOError(e) => Some(e.kind()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const BUF: u32 = 4096;

    fn pkt(op: u16, flags: u32, len: u32, buf_alloc: u32, fwd_cnt: u32) -> GuestPkt {
        GuestPkt {
            op,
            flags,
            len,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn slice(buf: &mut [u8]) -> VolatileSlice<'_, ()> {
        VolatileSlice::from(buf)
    }

    fn established() -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let req = pkt(VIRTIO_VSOCK_OP_REQUEST, 0, 0, BUF, 0);
        let mut c =
            Connection::new_guest_initiated(ours, 1024, 5000, BUF, Duration::from_secs(1), &req);
        let out = c.fill_rx::<()>(None, Instant::now());
        assert_eq!(
            out,
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_RESPONSE,
                flags: 0,
                len: 0
            }
        );
        (c, host)
    }

    #[test]
    fn host_data_is_bounded_by_guest_credit() {
        let (mut c, mut host) = established();
        // The guest advertised only 10 bytes.
        c.update_peer_credit(&pkt(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 0, 10, 0));
        host.write_all(&[7u8; 100]).unwrap();
        assert_eq!(c.on_host_event(EventSet::IN), Verdict::Keep);
        let mut rx = [0u8; 64];
        let now = Instant::now();
        let out = c.fill_rx(Some(&slice(&mut rx)), now);
        assert_eq!(
            out,
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_RW,
                flags: 0,
                len: 10
            }
        );
        // Out of credit: one CREDIT_REQUEST, then silence until the guest updates.
        let out = c.fill_rx(Some(&slice(&mut rx)), now);
        assert!(matches!(
            out,
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_CREDIT_REQUEST,
                ..
            }
        ));
        assert!(!c.has_pending_rx());
        assert_eq!(c.fill_rx(Some(&slice(&mut rx)), now), RxOutcome::Nothing);
        // The guest consumed the 10 bytes.
        let v = c.on_guest_pkt::<()>(&pkt(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 0, 10, 10), None, now);
        assert_eq!(v, Verdict::Keep);
        assert!(c.has_pending_rx());
        let out = c.fill_rx(Some(&slice(&mut rx)), now);
        assert!(matches!(
            out,
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_RW,
                len: 10,
                ..
            }
        ));
    }

    #[test]
    fn guest_overrun_resets() {
        let (mut c, host) = established();
        // The host never reads, so everything the guest sends is buffered by us... but a Unix
        // socket buffer absorbs a lot first; fill it so our own buffer is what overflows.
        let fill = [0u8; 4096];
        let mut ours = c.stream.try_clone().unwrap();
        while ours.write(&fill).is_ok() {}
        let now = Instant::now();
        let mut data = vec![1u8; BUF as usize];
        let p = pkt(VIRTIO_VSOCK_OP_RW, 0, BUF, BUF, 0);
        assert_eq!(
            c.on_guest_pkt(&p, Some(&slice(&mut data)), now),
            Verdict::Keep
        );
        assert_eq!(c.guest_bytes_buffered(), BUF);
        let mut one = [1u8; 1];
        let p = pkt(VIRTIO_VSOCK_OP_RW, 0, 1, BUF, 0);
        assert_eq!(
            c.on_guest_pkt(&p, Some(&slice(&mut one)), now),
            Verdict::Reset
        );
        drop(host);
    }

    #[test]
    fn credit_update_sent_when_guest_view_is_low() {
        let (mut c, mut host) = established();
        let now = Instant::now();
        let mut data = vec![1u8; (BUF / 2 + 1) as usize];
        let p = pkt(VIRTIO_VSOCK_OP_RW, 0, data.len() as u32, BUF, 0);
        assert_eq!(
            c.on_guest_pkt(&p, Some(&slice(&mut data)), now),
            Verdict::Keep
        );
        let mut got = vec![0u8; data.len()];
        host.read_exact(&mut got).unwrap();
        assert!(c.has_pending_rx());
        let out = c.fill_rx::<()>(None, now);
        assert!(matches!(
            out,
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_CREDIT_UPDATE,
                ..
            }
        ));
        assert_eq!(c.fwd_cnt(), data.len() as u32);
        assert!(!c.has_pending_rx());
    }

    #[test]
    fn guest_full_shutdown_waits_for_flush_then_resets() {
        let (mut c, host) = established();
        let fill = [0u8; 4096];
        let mut ours = c.stream.try_clone().unwrap();
        while ours.write(&fill).is_ok() {}
        let now = Instant::now();
        let mut data = vec![1u8; 100];
        let p = pkt(VIRTIO_VSOCK_OP_RW, 0, 100, BUF, 0);
        assert_eq!(
            c.on_guest_pkt(&p, Some(&slice(&mut data)), now),
            Verdict::Keep
        );
        let p = pkt(
            VIRTIO_VSOCK_OP_SHUTDOWN,
            VIRTIO_VSOCK_SHUTDOWN_ALL,
            0,
            BUF,
            0,
        );
        assert_eq!(c.on_guest_pkt::<()>(&p, None, now), Verdict::Keep);
        assert!(c.deadline().is_some());
        assert_eq!(c.interest(), Some(EventSet::OUT));
        // The host drains its socket: our buffer flushes and the close completes.
        let mut host = host;
        host.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        while host.read(&mut sink).is_ok() {}
        assert_eq!(c.on_host_event(EventSet::OUT), Verdict::Reset);
    }

    #[test]
    fn host_half_close_sends_shutdown_send_and_keeps_guest_to_host() {
        let (mut c, mut host) = established();
        host.shutdown(Shutdown::Write).unwrap();
        assert_eq!(c.on_host_event(EventSet::IN), Verdict::Keep);
        let mut rx = [0u8; 64];
        let now = Instant::now();
        let out = c.fill_rx(Some(&slice(&mut rx)), now);
        assert_eq!(
            out,
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_SHUTDOWN,
                flags: VIRTIO_VSOCK_SHUTDOWN_SEND,
                len: 0
            }
        );
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.interest(), Some(EventSet::empty()));
        // Guest -> host still works.
        let mut data = *b"reply";
        let p = pkt(VIRTIO_VSOCK_OP_RW, 0, 5, BUF, 0);
        assert_eq!(
            c.on_guest_pkt(&p, Some(&slice(&mut data)), now),
            Verdict::Keep
        );
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"reply");
        // The guest finishes its side: both directions done -> RST.
        let p = pkt(
            VIRTIO_VSOCK_OP_SHUTDOWN,
            VIRTIO_VSOCK_SHUTDOWN_SEND,
            0,
            BUF,
            0,
        );
        assert_eq!(c.on_guest_pkt::<()>(&p, None, now), Verdict::Reset);
    }

    #[test]
    fn host_close_drains_then_shutdown_all() {
        let (mut c, mut host) = established();
        host.write_all(b"last words").unwrap();
        drop(host);
        assert_eq!(
            c.on_host_event(EventSet::IN | EventSet::HANG_UP),
            Verdict::Keep
        );
        assert_eq!(c.interest(), None);
        let mut rx = [0u8; 64];
        let now = Instant::now();
        let out = c.fill_rx(Some(&slice(&mut rx)), now);
        assert_eq!(
            out,
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_RW,
                flags: 0,
                len: 10
            }
        );
        assert_eq!(&rx[..10], b"last words");
        let out = c.fill_rx(Some(&slice(&mut rx)), now);
        assert_eq!(
            out,
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_SHUTDOWN,
                flags: VIRTIO_VSOCK_SHUTDOWN_ALL,
                len: 0
            }
        );
        assert_eq!(c.state(), State::Closing);
        assert!(c.deadline().is_some());
        let p = pkt(VIRTIO_VSOCK_OP_RST, 0, 0, BUF, 0);
        assert_eq!(c.on_guest_pkt::<()>(&p, None, now), Verdict::Drop);
    }

    #[test]
    fn response_writes_ok_line_not_counted_as_credit() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let mut c = Connection::new_host_initiated(
            ours,
            1 << 30,
            1024,
            BUF,
            Duration::from_secs(1),
            Duration::from_secs(1),
            now,
        );
        assert!(matches!(
            c.fill_rx::<()>(None, now),
            RxOutcome::Packet {
                op: VIRTIO_VSOCK_OP_REQUEST,
                ..
            }
        ));
        // No host reads before the guest accepts.
        assert_eq!(c.interest(), Some(EventSet::empty()));
        let p = pkt(VIRTIO_VSOCK_OP_RESPONSE, 0, 0, BUF, 0);
        assert_eq!(c.on_guest_pkt::<()>(&p, None, now), Verdict::Keep);
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.deadline(), None);
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        assert_eq!(c.fwd_cnt(), 0);
    }
}
