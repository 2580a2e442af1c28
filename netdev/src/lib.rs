//! The tun/tap ioctls husk uses, written once: the shim creates each pod's tap with
//! [`open_tap`] (in the pod's network namespace; the tap lives as long as the fd), and
//! husk-vmm attaches to it by name with the same call, or checks an fd it inherited with
//! [`tap_info`].
//!
//! Hand-written over the `tun` crates: husk needs exactly two ioctls with `IFF_VNET_HDR`,
//! and those crates wrap them in device abstractions (addresses, MTU, async) husk does not use.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How every husk tap is opened: a tap (ethernet frames), no packet-info prefix, and a
/// virtio-net header on each frame, so checksum and segmentation offloads pass through.
pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// `struct ifreq` as the tun ioctls use it: the name, then `ifr_flags` (a short) at the
/// start of the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Opens /dev/net/tun (close-on-exec, blocking) and attaches it to tap `name` with
/// [`TAP_FLAGS`] in the calling thread's network namespace. As TUNSETIFF does, this creates
/// the tap when it does not exist; a tap created so vanishes with the returned fd.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?}: must be 1 to 15 bytes"),
        ));
    }
    // SAFETY: open(2) of a fixed path; the fd is owned right after.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("opening /dev/net/tun: {e}"),
        ));
    }
    // SAFETY: fd is fresh and owned by nobody else.
    let tap = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new();
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req.flags = TAP_FLAGS as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
    if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tap)
}

/// The interface name and `IFF_*` flags of an fd attached to a tun/tap (TUNGETIFF); an
/// error for any other fd.
pub fn tap_info(fd: &impl AsRawFd) -> io::Result<(String, libc::c_int)> {
    let mut req = IfReq::new();
    // SAFETY: TUNGETIFF writes one `struct ifreq`; on a non-tun fd it fails cleanly.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((req.name(), libc::c_int::from(req.flags)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_ioctl() {
        for bad in ["", "a-name-longer-than-15", "nul\0"] {
            let e = open_tap(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_tap_has_no_tap_info() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(tap_info(&f).is_err());
    }
}
