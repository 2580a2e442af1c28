//! The tap backend: an existing tap interface, opened by name in the network namespace the
//! process runs in, or adopted as an fd someone else opened (`--tap-fd`).
//!
//! The tap is never created here: the shim creates it in the pod's network namespace and
//! owns its lifetime. We attach with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking, and
//! set the header length to 12 bytes (`virtio_net_hdr_v1`) and no RX offloads until the
//! guest says what it can take.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::defs::HDR_LEN_V1;
use super::NetBackend;

/// The OS error is part of each message rather than a `#[source]`, so `{:#}` chains print
/// it once.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?}: must be 1 to 15 bytes, without '/', ':' or whitespace")]
    Name(String),
    #[error("cannot attach to tap {name:?} (it must exist in this network namespace, be a tap, and not be in use): {error}")]
    Attach { name: String, error: io::Error },
    #[error("fd {fd}: not an open tun/tap fd: {error}")]
    NotTunFd { fd: RawFd, error: io::Error },
    #[error("fd {fd}: {what}")]
    BadTapFd { fd: RawFd, what: &'static str },
    #[error("tap {name:?}: {what}: {error}")]
    Setup {
        name: String,
        what: &'static str,
        error: io::Error,
    },
}

/// An attached tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::Name(name.to_string()))
    }
}

impl Tap {
    /// Attaches to the existing tap `name` in the current thread's network namespace.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        // TUNSETIFF would create a missing tap, one that vanishes with our fd and is outside
        // the shim's tc redirect: refuse a name that does not exist here instead.
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::Name(name.into()))?;
        // SAFETY: a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                error: io::Error::from_raw_os_error(libc::ENODEV),
            });
        }
        let fd = husk_netdev::open_tap(name).map_err(|error| TapError::Attach {
            name: name.to_string(),
            error,
        })?;
        Tap::from_fd(fd)
    }

    /// Adopts an fd already attached to a tap (TUNSETIFF done by the caller) with
    /// `IFF_VNET_HDR` set. The fd is made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let (name, flags) =
            husk_netdev::tap_info(&fd).map_err(|error| TapError::NotTunFd { fd: raw, error })?;
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::BadTapFd {
                fd: raw,
                what: "a tun device, not a tap (IFF_TAP)",
            });
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(TapError::BadTapFd {
                fd: raw,
                what: "attached without IFF_VNET_HDR",
            });
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::BadTapFd {
                fd: raw,
                what: "attached without IFF_NO_PI",
            });
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(TapError::Setup {
                name,
                what: "cannot make the fd non-blocking",
                error: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file: File::from(fd),
            name,
        };
        tap.setup()?;
        Ok(tap)
    }

    fn setup(&self) -> Result<(), TapError> {
        self.set_hdr_len(HDR_LEN_V1)
            .map_err(|error| TapError::Setup {
                name: self.name.clone(),
                what: "TUNSETVNETHDRSZ",
                error,
            })?;
        // No offloaded frames towards the guest until it negotiates them.
        self.offload(0).map_err(|error| TapError::Setup {
            name: self.name.clone(),
            what: "TUNSETOFFLOAD",
            error,
        })
    }

    /// The interface name the kernel reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_hdr_len(&self, len: usize) -> io::Result<()> {
        let len = libc::c_int::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn set_vnet_hdr_len(&mut self, len: usize) -> io::Result<()> {
        self.set_hdr_len(len)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload(flags)
    }
}

/// Adopts `fd` as a tap (`--tap-fd`): checks that it is open before taking ownership.
pub fn tap_from_raw_fd(fd: RawFd) -> Result<Tap, TapError> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(TapError::NotTunFd {
            fd,
            error: io::Error::from_raw_os_error(libc::EBADF),
        });
    }
    // SAFETY: the fd is open, and the caller hands it to us (nothing else in the process
    // uses it: it came from our parent).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on an fd we own: do not leak it into anything we exec.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Tap::from_fd(owned)
}
