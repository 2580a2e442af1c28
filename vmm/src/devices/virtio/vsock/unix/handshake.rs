//! The hybrid-vsock handshake: a host client opens the Unix socket and writes
//! `CONNECT <port>\n` to reach guest vsock port `<port>`.
//!
//! The line is read without consuming anything after the newline, so a client may send its
//! first payload right behind the handshake without waiting for `OK`.

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};

/// Longest accepted handshake line, newline included.
pub(crate) const MAX_HANDSHAKE_LINE: usize = 64;

/// Where a handshake stands after reading what the client has sent so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// No complete line yet.
    Incomplete,
    /// A valid `CONNECT <port>` line.
    Connect(u32),
    /// The client closed, failed, or sent something that is not a handshake.
    Failed(&'static str),
}

pub(crate) struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

impl Handshake {
    pub(crate) fn new(stream: UnixStream, deadline: Instant) -> Self {
        Handshake {
            stream,
            line: Vec::with_capacity(MAX_HANDSHAKE_LINE),
            deadline,
        }
    }

    pub(crate) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub(crate) fn into_stream(self) -> UnixStream {
        self.stream
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Reads what is available of the handshake line. Never blocks.
    pub(crate) fn read(&mut self) -> Progress {
        let room = MAX_HANDSHAKE_LINE - self.line.len();
        let mut peek = [0u8; MAX_HANDSHAKE_LINE];
        // Peek first so that bytes after the newline stay in the socket for the connection.
        let n = match recv(
            self.stream.as_raw_fd(),
            &mut peek[..room],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => return Progress::Failed("closed before completing the handshake"),
            Ok(n) => n,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => return Progress::Incomplete,
            Err(_) => return Progress::Failed("read error during the handshake"),
        };
        let take = match peek[..n].iter().position(|&b| b == b'\n') {
            Some(pos) => pos + 1,
            None => n,
        };
        // The bytes are already queued in the socket, so this read returns them at once.
        let got = match self.stream.read(&mut peek[..take]) {
            Ok(got) => got,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return Progress::Incomplete
            }
            Err(_) => return Progress::Failed("read error during the handshake"),
        };
        self.line.extend_from_slice(&peek[..got]);
        if self.line.last() == Some(&b'\n') {
            match parse_connect_line(&self.line) {
                Some(port) => Progress::Connect(port),
                None => Progress::Failed("malformed handshake line"),
            }
        } else if self.line.len() >= MAX_HANDSHAKE_LINE {
            Progress::Failed("handshake line too long")
        } else {
            Progress::Incomplete
        }
    }
}

/// Parses `CONNECT <port>\n` (a `\r` before the newline is tolerated).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn parses_valid_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024\n"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 0\r\n"), Some(0));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\n"), Some(u32::MAX));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b"CONNECT 1024"[..],
            b"CONNECT\n",
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT 1 2\n",
            b"CONNECT 4294967296\n",
            b"connect 1024\n",
            b"GET / HTTP/1.1\n",
            b"CONNECT \xff\n",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }

    fn handshake() -> (Handshake, UnixStream) {
        let (ours, client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        (Handshake::new(ours, deadline), client)
    }

    #[test]
    fn line_split_across_reads_and_trailing_data_kept() {
        let (mut hs, mut client) = handshake();
        assert_eq!(hs.read(), Progress::Incomplete);
        client.write_all(b"CONN").unwrap();
        assert_eq!(hs.read(), Progress::Incomplete);
        client.write_all(b"ECT 52\npayload").unwrap();
        assert_eq!(hs.read(), Progress::Connect(52));
        let mut stream = hs.into_stream();
        let mut rest = [0u8; 7];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"payload");
    }

    #[test]
    fn overlong_line_fails() {
        let (mut hs, mut client) = handshake();
        client.write_all(&[b'A'; 200]).unwrap();
        assert_eq!(hs.read(), Progress::Failed("handshake line too long"));
    }

    #[test]
    fn close_fails() {
        let (mut hs, client) = handshake();
        drop(client);
        assert!(matches!(hs.read(), Progress::Failed(_)));
    }
}
