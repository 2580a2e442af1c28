//! Command-line arguments.
//!
//! Hand-rolled rather than clap: as /init the agent receives whatever
//! unrecognised words are on the kernel command line as argv, and must
//! tolerate them (an argument error must not stop PID 1); and every KiB of
//! the static binary is in every guest's initrd.

use std::{ffi::OsString, fmt, path::PathBuf, str::FromStr};

use husk_protocol::AGENT_VSOCK_PORT;
use thiserror::Error;

pub const USAGE: &str = "\
usage: husk-agent [--listen ADDR] [--state-dir DIR]

Runs as the guest's /init (PID 1) and serves the husk agent API over ttrpc.

  --listen ADDR     where to serve: vsock://CID:PORT (CID may be -1 or 'any')
                    or unix:///path/to/socket [default: vsock://-1:1024]
  --state-dir DIR   container state, bundles, console sockets
                    [default: /run/husk; always /run/husk as /init]
  -h, --help      print this help
  -V, --version   print the version
";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("bad listen address {addr:?}: {reason}")]
    BadAddr { addr: String, reason: &'static str },
}

/// An address the agent's RPC server listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK; the production transport from host to guest.
    Vsock { cid: u32, port: u32 },
    /// A Unix socket, to run the service on a host without a VM (tests,
    /// development).
    Unix(PathBuf),
}

impl Default for ListenAddr {
    fn default() -> Self {
        ListenAddr::Vsock {
            cid: libc::VMADDR_CID_ANY,
            port: AGENT_VSOCK_PORT,
        }
    }
}

impl ListenAddr {
    /// The address in the form `ttrpc`'s listener takes.
    pub fn ttrpc_addr(&self) -> String {
        match self {
            ListenAddr::Vsock { cid, port } => format!("vsock://{cid}:{port}"),
            ListenAddr::Unix(path) => format!("unix://{}", path.display()),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Vsock { port, .. } => write!(f, "vsock port {port}"),
            ListenAddr::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = CliError;

    fn from_str(s: &str) -> Result<Self, CliError> {
        let bad = |reason| CliError::BadAddr {
            addr: s.to_string(),
            reason,
        };
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected CID:PORT"))?;
            let cid = match cid {
                "-1" | "any" => libc::VMADDR_CID_ANY,
                n => n.parse().map_err(|_| bad("CID is not a number"))?,
            };
            let port = port.parse().map_err(|_| bad("port is not a number"))?;
            Ok(ListenAddr::Vsock { cid, port })
        } else if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else {
            Err(bad("expected vsock:// or unix://"))
        }
    }
}

/// What the agent was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run(Options),
    Help,
    Version,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub listen: ListenAddr,
    /// Where the container runtime keeps its state (ordinary process only).
    pub state_dir: Option<PathBuf>,
}

/// Parses arguments for an ordinary process: anything unknown is an error.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, CliError> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = into_string(arg)?;
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--listen" => {
                let value = args.next().ok_or(CliError::MissingValue("--listen"))?;
                options.listen = into_string(value)?.parse()?;
            }
            "--state-dir" => {
                let value = args.next().ok_or(CliError::MissingValue("--state-dir"))?;
                options.state_dir = Some(PathBuf::from(value));
            }
            _ => {
                if let Some(value) = arg.strip_prefix("--listen=") {
                    options.listen = value.parse()?;
                } else if let Some(value) = arg.strip_prefix("--state-dir=") {
                    options.state_dir = Some(PathBuf::from(value));
                } else {
                    return Err(CliError::Unknown(arg));
                }
            }
        }
    }
    Ok(Command::Run(options))
}

/// Parses arguments as /init: only `--listen` is honoured, anything else
/// (stray kernel parameters, `--help`) is skipped and reported, so that the
/// agent always runs.
pub fn parse_as_init(args: impl IntoIterator<Item = OsString>) -> (Options, Vec<CliError>) {
    let mut options = Options::default();
    let mut skipped = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let listen = match arg.to_str() {
            Some("--listen") => match args.next() {
                Some(value) => into_string(value),
                None => Err(CliError::MissingValue("--listen")),
            },
            Some(a) => match a.strip_prefix("--listen=") {
                Some(value) => Ok(value.to_string()),
                None => {
                    skipped.push(CliError::Unknown(a.to_string()));
                    continue;
                }
            },
            None => Err(CliError::NotUtf8(arg.to_string_lossy().into_owned())),
        };
        match listen.and_then(|value| value.parse()) {
            Ok(addr) => options.listen = addr,
            Err(e) => skipped.push(e),
        }
    }
    (options, skipped)
}

fn into_string(arg: OsString) -> Result<String, CliError> {
    arg.into_string()
        .map_err(|a| CliError::NotUtf8(a.to_string_lossy().into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn default_is_vsock_any_on_the_agent_port() {
        let Command::Run(o) = parse(args(&[])).unwrap() else {
            panic!("expected Run");
        };
        assert_eq!(o.listen.ttrpc_addr(), "vsock://4294967295:1024");
        assert_eq!(o.listen.to_string(), "vsock port 1024");
    }

    #[test]
    fn listen_forms() {
        for a in [
            args(&["--listen", "unix:///tmp/a.sock"]),
            args(&["--listen=unix:///tmp/a.sock"]),
        ] {
            assert_eq!(
                parse(a).unwrap(),
                Command::Run(Options {
                    listen: ListenAddr::Unix("/tmp/a.sock".into()),
                    state_dir: None,
                })
            );
        }
        assert_eq!(
            "vsock://3:5000".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock { cid: 3, port: 5000 }
        );
        assert_eq!(
            "vsock://any:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::default()
        );
    }

    #[test]
    fn state_dir_forms() {
        for a in [args(&["--state-dir", "/s"]), args(&["--state-dir=/s"])] {
            let Command::Run(o) = parse(a).unwrap() else {
                panic!("expected Run");
            };
            assert_eq!(o.state_dir, Some(PathBuf::from("/s")));
        }
        assert_eq!(
            parse(args(&["--state-dir"])).unwrap_err(),
            CliError::MissingValue("--state-dir")
        );
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(args(&["-h"])).unwrap(), Command::Help);
        assert_eq!(parse(args(&["--version"])).unwrap(), Command::Version);
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse(args(&["--listen"])).unwrap_err(),
            CliError::MissingValue("--listen")
        );
        assert_eq!(
            parse(args(&["quiet"])).unwrap_err(),
            CliError::Unknown("quiet".into())
        );
        for bad in [
            "tcp://1.2.3.4:5",
            "unix://",
            "vsock://1024",
            "vsock://x:1",
            "vsock://3:port",
            "vsock://3:99999999999",
        ] {
            assert!(
                matches!(bad.parse::<ListenAddr>(), Err(CliError::BadAddr { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn init_mode_skips_what_it_does_not_know() {
        let (o, skipped) = parse_as_init(args(&[
            "quiet",
            "--help",
            "--listen=tcp://x",
            "--listen",
            "vsock://-1:2000",
        ]));
        assert_eq!(
            o.listen,
            ListenAddr::Vsock {
                cid: u32::MAX,
                port: 2000
            }
        );
        assert_eq!(skipped.len(), 3);

        let (o, skipped) = parse_as_init(args(&["--listen"]));
        assert_eq!(o.listen, ListenAddr::default());
        assert_eq!(skipped, vec![CliError::MissingValue("--listen")]);
    }
}
