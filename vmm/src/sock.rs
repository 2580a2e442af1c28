//! Unix socket helpers shared by the devices and the binary.

use std::fs;
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("the socket is in use by another process")]
    InUse,
    #[error("the path exists and is not a socket")]
    NotASocket,
    #[error("directory {} does not exist", .0.display())]
    NoDirectory(PathBuf),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Binds a listening Unix socket at `path`.
///
/// A socket file left behind by a process that died is replaced; a socket somebody still
/// listens on, or a path that is not a socket, is an error rather than something to clobber.
pub fn bind_unix_listener(path: &Path) -> Result<UnixListener, BindError> {
    match fs::symlink_metadata(path) {
        Ok(md) => {
            if !md.file_type().is_socket() {
                return Err(BindError::NotASocket);
            }
            if is_listening(path) {
                return Err(BindError::InUse);
            }
            fs::remove_file(path)?;
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            return Err(BindError::NoDirectory(dir.to_path_buf()));
        }
    }
    Ok(UnixListener::bind(path)?)
}

/// Whether some process listens on the socket file at `path`.
///
/// Looked up in `/proc/net/unix` rather than by connecting: a test connection would be taken as
/// *the* client by a server that serves exactly one (as husk-vmm's vhost-user side does), and
/// would end it. Paths are compared as given and in absolute form; without `/proc` we fall back
/// to connecting.
fn is_listening(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return UnixStream::connect(path).is_ok();
    };
    let absolute = path
        .parent()
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }
        })
        .and_then(|dir| fs::canonicalize(dir).ok())
        .zip(path.file_name())
        .map(|(dir, name)| dir.join(name));
    table
        .lines()
        .skip(1)
        .filter_map(bound_path)
        .any(|bound| Path::new(bound) == path || absolute.as_deref() == Some(Path::new(bound)))
}

/// The path column of a `/proc/net/unix` line: everything after the first seven fields (a
/// path may contain spaces).
fn bound_path(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    for _ in 0..7 {
        let end = rest.find(char::is_whitespace)?;
        rest = rest[end..].trim_start();
    }
    (!rest.is_empty()).then_some(rest)
}

/// One fd held back so a listener at the process's fd limit can still take a pending
/// connection off its queue. A level-triggered listener whose accept fails with EMFILE stays
/// readable, and the event loop would wake on it forever at full CPU: with the spare given
/// up for a moment, the connection is accepted and closed at once (the client sees it
/// refused) and the spare taken back, so the listener quiets down until fds come back.
pub struct AcceptReserve {
    spare: Option<OwnedFd>,
}

impl AcceptReserve {
    /// Holds a duplicate of `fd` (any fd will do; a dup needs no path, so this works in
    /// the jail too).
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(AcceptReserve {
            spare: Some(fd.try_clone_to_owned()?),
        })
    }

    /// Whether `e` (from accept) is the fd limit, which [`AcceptReserve::shed`] handles.
    pub fn is_fd_limit(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
    }

    /// Accepts one pending connection on `listener` and closes it, using the spare fd.
    /// True when one was shed; false when nothing was pending or there is no spare (another
    /// thread took the freed slot; the spare is taken again once fds come back).
    pub fn shed(&mut self, listener: &UnixListener) -> bool {
        if self.spare.is_none() {
            self.spare = listener.as_fd().try_clone_to_owned().ok();
        }
        if self.spare.take().is_none() {
            return false;
        }
        // The freed slot is the lowest free fd: accept takes it, and the stream closes here.
        let shed = listener.accept().is_ok();
        self.spare = listener.as_fd().try_clone_to_owned().ok();
        shed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = bind_unix_listener(&path).unwrap();
        assert!(matches!(bind_unix_listener(&path), Err(BindError::InUse)));
        drop(l);
        // A stale socket file is replaced.
        let _l = bind_unix_listener(&path).unwrap();

        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            bind_unix_listener(&file),
            Err(BindError::NotASocket)
        ));

        // A stale socket is recognised without connecting to anything.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(!is_listening(&stale));
        let _l2 = bind_unix_listener(&stale).unwrap();
        assert!(is_listening(&stale));

        let missing = dir.path().join("nope").join("s.sock");
        assert!(matches!(
            bind_unix_listener(&missing),
            Err(BindError::NoDirectory(_))
        ));
    }

    #[test]
    fn proc_net_unix_path_column() {
        let line = "0000000000000000: 00000002 00000000 00010000 0001 01 12345 /run/a b.sock";
        assert_eq!(bound_path(line), Some("/run/a b.sock"));
        let unnamed = "0000000000000000: 00000002 00000000 00000000 0001 03 12346";
        assert_eq!(bound_path(unnamed), None);
    }
}
