//! The pod's network inside the guest: the virtio-net interface gets the pod
//! IP, MTU and routes the shim read from the CNI interface on the host.
//!
//! Done with the classic ioctls (`SIOCSIFADDR`, `SIOCSIFNETMASK`,
//! `SIOCSIFMTU`, `SIOCSIFFLAGS`, `SIOCADDRT`) on a datagram socket rather
//! than rtnetlink: they need no extra crate in the static agent, and a pod
//! needs only the handful of settings they cover. Their limits: one IPv4
//! address per interface label (further ones go on `<if>:<n>` aliases, as
//! ifconfig does) and no preferred source on routes.

use std::{
    ffi::CString,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

/// Why a network call failed; `NotFound` and `Invalid` are the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no guest interface has MAC {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Sys { what, source }
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IfAddr {
    pub fn parse(addr: &str, prefix_len: u32) -> Result<Self, NetError> {
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| NetError::Invalid(format!("{addr:?} is not an IP address")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(NetError::Invalid(format!(
                "prefix length {prefix_len} is too long for {addr}"
            )));
        }
        Ok(Self {
            addr,
            prefix_len: prefix_len as u8,
        })
    }
}

/// A route to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// `None`: the default route.
    pub dest: Option<IfAddr>,
    pub gateway: Option<IpAddr>,
    pub device: String,
}

impl RouteSpec {
    pub fn parse(dest: &str, gateway: &str, device: &str, source: &str) -> Result<Self, NetError> {
        if !source.is_empty() {
            return Err(NetError::Invalid(format!(
                "route to {dest:?}: a preferred source ({source}) is not supported by this agent"
            )));
        }
        let dest = match dest {
            "" | "default" => None,
            d => {
                let (a, p) = d.split_once('/').unwrap_or((d, ""));
                let p: u32 = if p.is_empty() {
                    if a.contains(':') {
                        128
                    } else {
                        32
                    }
                } else {
                    p.parse()
                        .map_err(|_| NetError::Invalid(format!("bad prefix in {d:?}")))?
                };
                Some(IfAddr::parse(a, p)?)
            }
        };
        let gateway =
            match gateway {
                "" => None,
                g => Some(g.parse::<IpAddr>().map_err(|_| {
                    NetError::Invalid(format!("gateway {g:?} is not an IP address"))
                })?),
            };
        if dest.is_none() && gateway.is_none() && device.is_empty() {
            return Err(NetError::Invalid(
                "a default route needs a gateway or a device".into(),
            ));
        }
        if let (Some(d), Some(g)) = (dest, gateway) {
            if d.addr.is_ipv4() != g.is_ipv4() {
                return Err(NetError::Invalid(format!(
                    "route to {}: gateway {g} is of another address family",
                    d.addr
                )));
            }
        }
        if device.len() >= libc::IFNAMSIZ {
            return Err(NetError::Invalid(format!(
                "device name {device:?} is too long"
            )));
        }
        Ok(Self {
            dest,
            gateway,
            device: device.to_string(),
        })
    }

    fn is_ipv4(&self) -> bool {
        match (self.dest, self.gateway) {
            (Some(d), _) => d.addr.is_ipv4(),
            (None, Some(g)) => g.is_ipv4(),
            (None, None) => true,
        }
    }
}

/// Parses "aa:bb:cc:dd:ee:ff" (either case).
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    s.parse::<macaddr::MacAddr6>()
        .map(macaddr::MacAddr6::into_array)
        .map_err(|_| NetError::Invalid(format!("{s:?} is not a MAC address")))
}

/// The interface under `sys_class_net` (normally /sys/class/net) whose
/// `address` is `mac`.
pub fn find_by_mac(sys_class_net: &Path, mac: [u8; 6]) -> Result<String, NetError> {
    let text = macaddr::MacAddr6::from(mac).to_string();
    let entries =
        fs::read_dir(sys_class_net).map_err(sys(format!("listing {}", sys_class_net.display())))?;
    for e in entries.flatten() {
        let Ok(addr) = fs::read_to_string(e.path().join("address")) else {
            continue;
        };
        if addr.trim().eq_ignore_ascii_case(&text) {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(NetError::NotFound(text))
}

/// The IPv4 netmask of a prefix length.
pub fn netmask_v4(prefix_len: u8) -> Ipv4Addr {
    let bits = if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    };
    Ipv4Addr::from(bits)
}

/// Configures the interface with MAC `mac`: MTU, addresses, up; and brings
/// `lo` up, which a pod's containers expect and nothing else in the guest
/// does. Returns the interface's name.
pub fn update_interface(mac: [u8; 6], addrs: &[IfAddr], mtu: u32) -> Result<String, NetError> {
    let name = find_by_mac(Path::new("/sys/class/net"), mac)?;
    let sock4 = socket(libc::AF_INET)?;
    set_up(&sock4, "lo")?;
    if mtu != 0 {
        let mut req = ifreq(&name)?;
        req.ifr_ifru.ifru_mtu = i32::try_from(mtu)
            .map_err(|_| NetError::Invalid(format!("MTU {mtu} is out of range")))?;
        ioctl(&sock4, libc::SIOCSIFMTU, &mut req)
            .map_err(sys(format!("setting MTU {mtu} on {name}")))?;
    }
    let mut v4_count = 0;
    for a in addrs {
        match a.addr {
            IpAddr::V4(ip) => {
                // The first IPv4 address goes on the interface itself, the
                // others on aliases: SIOCSIFADDR replaces rather than adds.
                let label = if v4_count == 0 {
                    name.clone()
                } else {
                    format!("{name}:{v4_count}")
                };
                v4_count += 1;
                let mut req = ifreq(&label)?;
                req.ifr_ifru.ifru_addr = sockaddr_v4(ip);
                ioctl(&sock4, libc::SIOCSIFADDR, &mut req)
                    .map_err(sys(format!("adding {ip} to {label}")))?;
                let mut req = ifreq(&label)?;
                req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask_v4(a.prefix_len));
                ioctl(&sock4, libc::SIOCSIFNETMASK, &mut req)
                    .map_err(sys(format!("setting /{} on {label}", a.prefix_len)))?;
            }
            IpAddr::V6(ip) => add_v6(&name, ip, a.prefix_len)?,
        }
    }
    set_up(&sock4, &name)?;
    tracing::info!(interface = %name, ?addrs, mtu, "configured the pod interface");
    Ok(name)
}

/// Adds routes in order (a gateway must be reachable by an earlier route or
/// an interface address).
pub fn update_routes(routes: &[RouteSpec]) -> Result<(), NetError> {
    for r in routes {
        if r.is_ipv4() {
            add_route_v4(r)?;
        } else {
            add_route_v6(r)?;
        }
        tracing::info!(route = ?r, "added route");
    }
    Ok(())
}

fn socket(family: libc::c_int) -> Result<OwnedFd, NetError> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("opening a control socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(NetError::Invalid(format!("bad interface name {name:?}")));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn ioctl<T>(sock: &OwnedFd, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the argument type the request expects.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_up(sock: &OwnedFd, name: &str) -> Result<(), NetError> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req).map_err(sys(format!("reading {name}'s flags")))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req).map_err(sys(format!("bringing {name} up")))
}

fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; this is the
    // kernel's own way of passing an IPv4 address in a sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn if_index(name: &str) -> Result<libc::c_int, NetError> {
    let c = CString::new(name).map_err(|_| NetError::Invalid(format!("bad name {name:?}")))?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(sys(format!("looking up interface {name}"))(
            io::Error::last_os_error(),
        ));
    }
    libc::c_int::try_from(idx)
        .map_err(|_| NetError::Invalid(format!("index of {name} out of range")))
}

fn add_v6(name: &str, ip: Ipv6Addr, prefix_len: u8) -> Result<(), NetError> {
    let sock6 = socket(libc::AF_INET6)?;
    let mut req = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        ifr6_prefixlen: u32::from(prefix_len),
        ifr6_ifindex: if_index(name)?,
    };
    ioctl(&sock6, libc::SIOCSIFADDR, &mut req)
        .map_err(sys(format!("adding {ip}/{prefix_len} to {name}")))
}

/// `struct rtentry` from <net/route.h> (libc has it only for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// `struct in6_rtmsg` from <linux/ipv6_route.h> (libc's has private fields).
#[repr(C)]
struct In6RtMsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

const RTF_UP: u16 = 0x0001;
const RTF_GATEWAY: u16 = 0x0002;
const RTF_HOST: u16 = 0x0004;

fn add_route_v4(r: &RouteSpec) -> Result<(), NetError> {
    let (dst, prefix) = match r.dest {
        Some(IfAddr {
            addr: IpAddr::V4(a),
            prefix_len,
        }) => (a, prefix_len),
        _ => (Ipv4Addr::UNSPECIFIED, 0),
    };
    let mut flags = RTF_UP;
    if prefix == 32 {
        flags |= RTF_HOST;
    }
    let gw = match r.gateway {
        Some(IpAddr::V4(g)) => {
            flags |= RTF_GATEWAY;
            g
        }
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let dev = if r.device.is_empty() {
        None
    } else {
        Some(CString::new(r.device.as_str()).map_err(|_| NetError::Invalid("bad device".into()))?)
    };
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(dst),
        rt_gateway: sockaddr_v4(gw),
        rt_genmask: sockaddr_v4(netmask_v4(prefix)),
        rt_flags: flags,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        // The kernel stores rt_metric - 1: 1 gives iproute2's default 0.
        rt_metric: 1,
        // The kernel only reads the name (copy_from_user).
        rt_dev: dev
            .as_ref()
            .map_or(std::ptr::null_mut(), |d| d.as_ptr() as *mut libc::c_char),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    let sock = socket(libc::AF_INET)?;
    match ioctl(&sock, libc::SIOCADDRT, &mut rt) {
        Ok(()) => Ok(()),
        // The kernel adds the subnet route of an address itself: an equal
        // route asked for again is already there.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(sys(format!("adding route {r:?}"))(e)),
    }
}

fn add_route_v6(r: &RouteSpec) -> Result<(), NetError> {
    let (dst, prefix) = match r.dest {
        Some(IfAddr {
            addr: IpAddr::V6(a),
            prefix_len,
        }) => (a, prefix_len),
        _ => (Ipv6Addr::UNSPECIFIED, 0),
    };
    let mut flags = u32::from(RTF_UP);
    let gw = match r.gateway {
        Some(IpAddr::V6(g)) => {
            flags |= u32::from(RTF_GATEWAY);
            g
        }
        _ => Ipv6Addr::UNSPECIFIED,
    };
    let mut rt = In6RtMsg {
        rtmsg_dst: libc::in6_addr {
            s6_addr: dst.octets(),
        },
        rtmsg_src: libc::in6_addr { s6_addr: [0; 16] },
        rtmsg_gateway: libc::in6_addr {
            s6_addr: gw.octets(),
        },
        rtmsg_type: 0,
        rtmsg_dst_len: u16::from(prefix),
        rtmsg_src_len: 0,
        rtmsg_metric: 1,
        rtmsg_info: 0,
        rtmsg_flags: flags,
        rtmsg_ifindex: if r.device.is_empty() {
            0
        } else {
            if_index(&r.device)?
        },
    };
    let sock = socket(libc::AF_INET6)?;
    match ioctl(&sock, libc::SIOCADDRT, &mut rt) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(sys(format!("adding route {r:?}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_reject_junk() {
        assert_eq!(
            parse_mac("0A:58:0a:cb:01:02").unwrap(),
            [0x0a, 0x58, 0x0a, 0xcb, 0x01, 0x02]
        );
        for bad in [
            "",
            "0a:58:0a:cb:01",
            "0a:58:0a:cb:01:02:03",
            "0a:58:0a:cb:01:zz",
            "a:58:0a:cb:01:022",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn netmasks_from_prefixes() {
        assert_eq!(netmask_v4(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask_v4(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask_v4(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask_v4(17), Ipv4Addr::new(255, 255, 128, 0));
    }

    #[test]
    fn routes_parse() {
        let r = RouteSpec::parse("", "10.0.0.1", "eth0", "").unwrap();
        assert_eq!(r.dest, None);
        assert!(r.is_ipv4());
        let r = RouteSpec::parse("fd00::/64", "", "eth0", "").unwrap();
        assert!(!r.is_ipv4());
        assert_eq!(r.dest.unwrap().prefix_len, 64);
        let r = RouteSpec::parse("10.1.2.3", "", "eth0", "").unwrap();
        assert_eq!(r.dest.unwrap().prefix_len, 32);
        assert!(RouteSpec::parse("10.0.0.0/33", "", "eth0", "").is_err());
        assert!(RouteSpec::parse("10.0.0.0/8", "fd00::1", "eth0", "").is_err());
        assert!(RouteSpec::parse("10.0.0.0/8", "", "eth0", "10.0.0.2").is_err());
        assert!(RouteSpec::parse("", "", "", "").is_err());
    }

    #[test]
    fn interface_found_by_mac_case_blind() {
        let dir = tempfile::tempdir().unwrap();
        for (name, mac) in [("lo", "00:00:00:00:00:00"), ("eth0", "0A:58:0A:CB:01:02")] {
            fs::create_dir(dir.path().join(name)).unwrap();
            fs::write(dir.path().join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        let mac = parse_mac("0a:58:0a:cb:01:02").unwrap();
        assert_eq!(find_by_mac(dir.path(), mac).unwrap(), "eth0");
        assert!(matches!(
            find_by_mac(dir.path(), [1, 2, 3, 4, 5, 6]),
            Err(NetError::NotFound(_))
        ));
    }

    #[test]
    fn struct_layouts_match_the_kernel() {
        // x86_64 sizes of struct rtentry and struct in6_rtmsg.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::size_of::<In6RtMsg>(), 80);
    }
}
