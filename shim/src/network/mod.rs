//! Pod networking on the host: bridging the CNI interface in the pod's
//! network namespace to the VM's virtio-net device (the tc-redirect model).
//!
//! CNI (driven by containerd's CRI plugin) has put a veth, normally `eth0`,
//! with the pod IP into the pod's network namespace. The shim adds a tap
//! there and has tc hand every frame arriving on one of the two to the
//! other's transmit side (an ingress qdisc on each with a match-all `u32`
//! filter and a `mirred egress redirect` action). The namespace's own IP
//! stack never sees the pod's traffic; the guest's interface, given the
//! veth's MAC and IP, answers for the pod, so the CNI bridge's ARP and
//! forwarding work unchanged.
//!
//! The tap is created non-persistent: it lives exactly as long as a file
//! descriptor is open on it (QEMU's and the shim's), so a crashed shim or VM
//! cannot leave one behind. tc is driven with iproute2's `tc` and `ip`
//! commands, run inside the namespace by `setns(2)` in the child before exec.
//! The namespace itself is CNI's and containerd's, never removed here.

pub mod discover;

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use serde_json::Value;
use tracing::{debug, info, warn};

pub use discover::{format_mac, CniInterface, CniRoute};

/// The tap's name in the pod's namespace (one pod per namespace).
pub const TAP_NAME: &str = "tap0_husk";
/// The interface CRI asks CNI to create.
pub const CNI_IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("opening network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    #[error("creating tap {TAP_NAME} in {netns}: {source}")]
    Tap { netns: PathBuf, source: io::Error },
    #[error("running `{command}` in {netns}: {message}")]
    Command {
        command: String,
        netns: PathBuf,
        message: String,
    },
    #[error("reading the pod's network in {netns}: {message}")]
    Discover { netns: PathBuf, message: String },
}

/// The network namespace path in an OCI spec's `linux.namespaces`, if the
/// container joins an existing one (CRI's sandbox container does).
pub fn netns_path_of(spec: &Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some("network"))?
        .get("path")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The pod network as set up on the host: what the VM and the agent need,
/// and what to undo.
#[derive(Debug)]
pub struct PodNetwork {
    netns_path: PathBuf,
    /// Held so the commands at teardown still reach the namespace even after
    /// containerd has unmounted its path.
    netns: File,
    pub interface: CniInterface,
    pub routes: Vec<CniRoute>,
    /// The tap's queue; QEMU gets it as `-netdev tap,fd=N`.
    pub tap: Arc<OwnedFd>,
    torn_down: bool,
}

impl PodNetwork {
    /// Sets the pod's network up in the namespace at `netns_path`. `Ok(None)`
    /// when the namespace has no interface for the pod (no networking).
    /// Blocking (runs `ip` and `tc`): call it off the async reactor.
    pub fn setup(netns_path: &Path) -> Result<Option<PodNetwork>, NetworkError> {
        let netns = File::open(netns_path).map_err(|source| NetworkError::Netns {
            path: netns_path.to_path_buf(),
            source,
        })?;
        let discover_err = |message: String| NetworkError::Discover {
            netns: netns_path.to_path_buf(),
            message,
        };
        let addrs = run_in(&netns, netns_path, "ip", &["-j", "addr", "show"])?;
        let Some(interface) = discover::pick_interface(&addrs, CNI_IFNAME).map_err(discover_err)?
        else {
            info!(netns = %netns_path.display(), "no pod interface in the network namespace; the VM gets no NIC");
            return Ok(None);
        };
        let mut routes = Vec::new();
        for family in ["-4", "-6"] {
            let json = run_in(&netns, netns_path, "ip", &[family, "-j", "route", "show"])?;
            routes.extend(discover::routes_via(&json, &interface.name).map_err(discover_err)?);
        }
        let tap = create_tap(&netns, TAP_NAME).map_err(|source| NetworkError::Tap {
            netns: netns_path.to_path_buf(),
            source,
        })?;
        let net = PodNetwork {
            netns_path: netns_path.to_path_buf(),
            netns,
            interface,
            routes,
            tap: Arc::new(tap),
            torn_down: false,
        };
        // On an error from here on, dropping `net` removes what was added.
        net.redirect()?;
        info!(
            netns = %net.netns_path.display(),
            interface = %net.interface.name,
            mac = %format_mac(net.interface.mac),
            addresses = ?net.interface.addresses,
            "pod network: {} <-> {TAP_NAME} redirected with tc",
            net.interface.name
        );
        Ok(Some(net))
    }

    fn redirect(&self) -> Result<(), NetworkError> {
        let eth = self.interface.name.as_str();
        let mtu = self.interface.mtu.to_string();
        let steps: [&[&str]; 5] = [
            &["ip", "link", "set", TAP_NAME, "mtu", &mtu, "up"],
            &["tc", "qdisc", "add", "dev", eth, "ingress"],
            &["tc", "qdisc", "add", "dev", TAP_NAME, "ingress"],
            &[
                "tc", "filter", "add", "dev", eth, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev",
                TAP_NAME,
            ],
            &[
                "tc", "filter", "add", "dev", TAP_NAME, "parent", "ffff:", "protocol", "all",
                "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev",
                eth,
            ],
        ];
        for step in steps {
            run_in(&self.netns, &self.netns_path, step[0], &step[1..])?;
        }
        Ok(())
    }

    /// Removes the redirect from the CNI interface. The tap goes by itself
    /// once QEMU and this struct have closed it; call after the VM is down.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        // Deleting the ingress qdisc takes its filters with it. The
        // interface may already be gone (CNI DEL ran first): nothing to undo.
        if let Err(e) = run_in(
            &self.netns,
            &self.netns_path,
            "tc",
            &["qdisc", "del", "dev", &self.interface.name, "ingress"],
        ) {
            debug!("removing the redirect: {e}");
        }
        info!(netns = %self.netns_path.display(), "pod network torn down");
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Runs `program args` inside the namespace and returns its stdout.
fn run_in(
    netns: &File,
    netns_path: &Path,
    program: &str,
    args: &[&str],
) -> Result<String, NetworkError> {
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(tool(program));
    cmd.args(args);
    // SAFETY: setns(2) is async-signal-safe; the child is single-threaded
    // between fork and exec, so switching its namespace affects only it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let command = format!("{program} {}", args.join(" "));
    let out = cmd.output().map_err(|e| NetworkError::Command {
        command: command.clone(),
        netns: netns_path.to_path_buf(),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            command,
            netns: netns_path.to_path_buf(),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    debug!(%command, "ran in the pod's network namespace");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// iproute2's tools live in sbin, which containerd's PATH (and so the
/// shim's) may lack.
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Creates tap `name` in the namespace and returns its queue (close-on-exec;
/// the VM launch passes it on explicitly).
///
/// A tap belongs to the namespace of the thread that opened /dev/net/tun, so
/// this runs on a thread of its own that enters the namespace and then ends:
/// never on a shared (tokio) thread, which would stay in the pod's namespace.
fn create_tap(netns: &File, name: &str) -> io::Result<OwnedFd> {
    let netns = netns.try_clone()?;
    let name = name.to_string();
    let thread = std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || -> io::Result<OwnedFd> {
            // SAFETY: setns on this thread only; the fd is a namespace file.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            husk_netdev::open_tap(&name)
        })?;
    thread.join().unwrap_or_else(|_| {
        warn!("the tap thread panicked");
        Err(io::Error::other("the tap thread panicked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_path_from_cri_sandbox_spec() {
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
        ]}});
        assert_eq!(
            netns_path_of(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        let own = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(netns_path_of(&own), None);
        assert_eq!(netns_path_of(&serde_json::json!({})), None);
    }
}
