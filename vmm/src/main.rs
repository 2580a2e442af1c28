//! The `husk-vmm` binary.
//!
//! One subcommand per way husk-vmm runs: `run` (the whole VM on KVM), the vhost-user device
//! backends QEMU drives, and `jail-exec` (QEMU itself in the jail). Each subcommand parses
//! into its own args struct and runs in its own function.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info};

mod cli_jail_exec;
mod cli_run;

use husk_vmm::devices::virtio::fs::{CacheMode, FsConfig, FsDevice};
use husk_vmm::devices::virtio::net::{parse_mac, tap::tap_from_raw_fd, NetDevice, Tap};
use husk_vmm::devices::virtio::vsock::{MuxerConfig, VsockMuxer};
use husk_vmm::limits::{limit_open_files, DEFAULT_MAX_OPEN_FILES, DEFAULT_MAX_OPEN_FILES_FS};
use husk_vmm::sock::bind_unix_listener;
use husk_vmm::vhost_user::serve_fs;
use husk_vmm::vhost_user::serve_net;
use husk_vmm::vhost_user::serve_vsock;

#[derive(Parser, Debug)]
#[command(
    name = "husk-vmm",
    version,
    about = "husk's microVM monitor and device backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a virtio-vsock device with a hybrid vsock host side to one vhost-user front end
    /// (QEMU's vhost-user-vsock-device), until it disconnects.
    VhostUserVsock(VhostUserVsockArgs),
    /// Serve a virtio-fs device exporting one host directory to one vhost-user front end
    /// (QEMU's vhost-user-fs-device), until it disconnects.
    VhostUserFs(VhostUserFsArgs),
    /// Serve a virtio-net device over an existing tap to one vhost-user front end (QEMU's
    /// -netdev vhost-user with virtio-net-device), until it disconnects.
    VhostUserNet(VhostUserNetArgs),
    /// Boot a microVM on KVM (husk's own VMM): kernel, initrd, serial console, vsock, rng.
    Run(cli_run::RunArgs),
    /// Run another program (QEMU) in husk-vmm's jail as an unprivileged user: own
    /// namespaces, an empty read-only root with only the paths named, no capabilities.
    /// Needs root.
    JailExec(cli_jail_exec::JailExecArgs),
}

/// `--jail`, shared by the vhost-user backends.
#[derive(Args, Debug)]
struct JailArg {
    /// Enter the jail once the device is set up: own mount, network, IPC and UTS
    /// namespaces, an empty read-only root with only the directories still reached by path,
    /// capabilities dropped, then a seccomp filter for every thread (see
    /// `husk_vmm::vhost_user::confine`). Needs root.
    #[arg(long)]
    jail: bool,
}

#[derive(Args, Debug)]
struct VhostUserFsArgs {
    /// vhost-user socket to listen on (QEMU's -chardev socket,path=...).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Host directory the guest sees as the file system root.
    #[arg(long, value_name = "DIR")]
    shared_dir: PathBuf,
    /// Name the guest mounts (mount -t virtiofs <TAG> ...): 1 to 36 bytes.
    #[arg(long)]
    tag: String,
    /// Guest caching: never, auto (close-to-open, 1 s timeouts) or always.
    #[arg(long, default_value_t = CacheMode::Auto)]
    cache: CacheMode,
    /// Pass extended attributes through (file capabilities, ACLs).
    #[arg(long)]
    xattr: bool,
    /// Most fds the process may hold (RLIMIT_NOFILE, soft and hard): the file server keeps
    /// one per inode the guest looked up until the guest forgets it, and one per open file;
    /// past the limit the guest gets EMFILE.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_OPEN_FILES_FS)]
    max_open_files: u64,
    #[command(flatten)]
    jail: JailArg,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("tap_source").required(true).args(["tap", "tap_fd"]))]
struct VhostUserNetArgs {
    /// vhost-user socket to listen on (QEMU's -chardev socket,path=...).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Existing tap interface in this process's network namespace.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// An inherited fd already attached to a tap with IFF_VNET_HDR and IFF_NO_PI.
    #[arg(long, value_name = "N")]
    tap_fd: Option<i32>,
    /// The guest's MAC address (aa:bb:cc:dd:ee:ff). QEMU's -device mac= is what the guest
    /// sees; this one is offered too when QEMU asks for the config space.
    #[arg(long, value_name = "MAC")]
    mac: Option<String>,
    /// Most fds the process may hold (RLIMIT_NOFILE, soft and hard).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_OPEN_FILES)]
    max_open_files: u64,
    #[command(flatten)]
    jail: JailArg,
}

#[derive(Args, Debug)]
struct VhostUserVsockArgs {
    /// vhost-user socket to listen on (QEMU's -chardev socket,path=...).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Hybrid vsock socket: host clients connect here and send "CONNECT <port>\n"; guest
    /// connections to host port P go to "<PATH>_P".
    #[arg(long, value_name = "PATH")]
    uds: PathBuf,
    /// The guest's context id (3 or more).
    #[arg(long, value_name = "CID", default_value_t = 3)]
    guest_cid: u64,
    /// Most fds the process may hold (RLIMIT_NOFILE, soft and hard): bounds the host
    /// connections a guest can make it keep (the device itself allows 1024 at once).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_OPEN_FILES)]
    max_open_files: u64,
    #[command(flatten)]
    jail: JailArg,
}

fn main() -> ExitCode {
    let t0_ns = cli_run::now_ns();
    husk_vmm::logging::init();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::VhostUserVsock(args) => vhost_user_vsock(args),
        Command::VhostUserFs(args) => vhost_user_fs(args),
        Command::VhostUserNet(args) => vhost_user_net(args),
        Command::Run(args) => cli_run::run(args, t0_ns),
        Command::JailExec(args) => cli_jail_exec::run(args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("husk-vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn vhost_user_vsock(args: VhostUserVsockArgs) -> Result<()> {
    // 0 and 1 are reserved, 2 is the host, and Linux treats CIDs as 32-bit with -1 meaning
    // "any".
    if args.guest_cid < 3 || args.guest_cid >= u64::from(u32::MAX) {
        bail!(
            "--guest-cid {}: must be between 3 and {}",
            args.guest_cid,
            u32::MAX - 1
        );
    }
    open_file_limit(args.max_open_files)?;
    let sockets = vec![args.uds.clone(), args.socket.clone()];

    // The hybrid socket first: the launcher takes the vhost-user socket's appearance to mean
    // both are ready.
    let muxer = VsockMuxer::bind(MuxerConfig::new(args.guest_cid, &args.uds))
        .with_context(|| format!("--uds {}", args.uds.display()))?;
    let listener = bind_unix_listener(&args.socket)
        .with_context(|| format!("--socket {}: cannot listen", args.socket.display()))?;
    // Guest connections to host port P go to "<uds>_P", beside the hybrid socket.
    if let Err(e) = jail_if(args.jail.jail, &[&args.uds, &args.socket], None) {
        remove_sockets(&sockets);
        return Err(e);
    }
    exit_on_signals(sockets.clone()).context("cannot set up signal handling")?;
    info!(
        socket = %args.socket.display(),
        uds = %args.uds.display(),
        guest_cid = args.guest_cid,
        "vhost-user-vsock backend listening"
    );

    let res = serve_vsock(listener.into(), args.guest_cid, muxer)
        .context("vhost-user-vsock backend failed");
    remove_sockets(&sockets);
    info!("vhost-user front end disconnected; exiting");
    res
}

fn vhost_user_fs(args: VhostUserFsArgs) -> Result<()> {
    let mut cfg = FsConfig::new(&args.shared_dir, &args.tag);
    cfg.cache = args.cache;
    cfg.xattr = args.xattr;
    // Argument errors first, before anything is bound or changed in the process.
    husk_vmm::devices::virtio::fs::validate_tag(&args.tag).context("--tag")?;
    let shared_dir = cfg
        .validate()
        .with_context(|| format!("--shared-dir {}", args.shared_dir.display()))?;
    let max_open_files = open_file_limit(args.max_open_files)?;
    let sockets = vec![args.socket.clone()];

    // Bind before the device exists: setting up the passthrough file system clears the
    // process umask, and the socket should get the caller's.
    let listener = bind_unix_listener(&args.socket)
        .with_context(|| format!("--socket {}: cannot listen", args.socket.display()))?;
    let device = match FsDevice::new(cfg)
        .with_context(|| format!("--shared-dir {}", args.shared_dir.display()))
    {
        Ok(device) => device,
        Err(e) => {
            remove_sockets(&sockets);
            return Err(e);
        }
    };
    if let Err(e) = jail_if(args.jail.jail, &[&args.socket], Some(&shared_dir)) {
        remove_sockets(&sockets);
        return Err(e);
    }
    exit_on_signals(sockets.clone()).context("cannot set up signal handling")?;
    info!(
        socket = %args.socket.display(),
        shared_dir = %shared_dir.display(),
        tag = %args.tag,
        cache = %args.cache,
        xattr = args.xattr,
        max_open_files,
        "vhost-user-fs backend listening"
    );

    let res = serve_fs(listener.into(), device).context("vhost-user-fs backend failed");
    remove_sockets(&sockets);
    info!("vhost-user front end disconnected; exiting");
    res
}

fn vhost_user_net(args: VhostUserNetArgs) -> Result<()> {
    // Argument errors first, before anything is bound.
    let mac = match &args.mac {
        Some(m) => Some(parse_mac(m).context("--mac")?),
        None => None,
    };
    let tap = match (&args.tap, args.tap_fd) {
        (Some(name), _) => Tap::open(name).with_context(|| format!("--tap {name}"))?,
        (None, Some(fd)) => tap_from_raw_fd(fd).with_context(|| format!("--tap-fd {fd}"))?,
        (None, None) => bail!("one of --tap or --tap-fd is required"),
    };
    open_file_limit(args.max_open_files)?;
    let tap_name = tap.name().to_string();
    let device = NetDevice::new(tap, mac).context("cannot set up the net device")?;
    let sockets = vec![args.socket.clone()];
    let listener = bind_unix_listener(&args.socket)
        .with_context(|| format!("--socket {}: cannot listen", args.socket.display()))?;
    // The tap is an fd by now.
    if let Err(e) = jail_if(args.jail.jail, &[&args.socket], None) {
        remove_sockets(&sockets);
        return Err(e);
    }
    exit_on_signals(sockets.clone()).context("cannot set up signal handling")?;
    info!(
        socket = %args.socket.display(),
        tap = %tap_name,
        mac = args.mac.as_deref().unwrap_or("-"),
        "vhost-user-net backend listening"
    );
    let res = serve_net(listener.into(), device).context("vhost-user-net backend failed");
    remove_sockets(&sockets);
    info!("vhost-user front end disconnected; exiting");
    res
}

/// Caps the fds this process may hold (see `husk_vmm::limits`): a guest can make every
/// backend keep host fds for as long as it likes (virtio-fs inodes until it sends FORGET,
/// vsock connections until it closes them), so each one sets RLIMIT_NOFILE first thing.
pub(crate) fn open_file_limit(max: u64) -> Result<u64> {
    limit_open_files(max)
        .with_context(|| format!("--max-open-files {max}: cannot set RLIMIT_NOFILE"))
}

/// Confines the backend when `--jail` asked for it, keeping visible the directories of
/// `sockets` (removed by path at exit; vsock's guest connections go beside its socket) and
/// the file server's share (which also keeps the file server's capabilities and calls).
/// Everything else the backend uses is an fd by now, and no thread runs yet.
fn jail_if(jail: bool, sockets: &[&Path], share: Option<&Path>) -> Result<()> {
    if !jail {
        return Ok(());
    }
    let mut visible_dirs: Vec<PathBuf> = sockets
        .iter()
        .map(|s| match s.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .map(|d| std::path::absolute(&d).unwrap_or(d))
        .collect();
    visible_dirs.extend(share.map(Path::to_path_buf));
    husk_vmm::vhost_user::confine::confine(visible_dirs.clone(), share.is_some())
        .context("--jail")?;
    info!(dirs = ?visible_dirs, "entered the jail, under seccomp");
    Ok(())
}

/// SIGINT and SIGTERM end the process cleanly: sockets removed, exit status 0.
///
/// The signals are blocked in this thread before any other thread exists, so every thread
/// inherits the mask and only the waiting thread ever sees them.
fn exit_on_signals(sockets: Vec<PathBuf>) -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("cannot block SIGINT/SIGTERM")?;
    thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || match set.wait() {
            Ok(sig) => {
                info!(signal = %sig, "exiting on signal");
                remove_sockets(&sockets);
                std::process::exit(0);
            }
            Err(e) => error!(error = %e, "waiting for signals failed"),
        })
        .context("cannot spawn the signal thread")?;
    Ok(())
}

fn remove_sockets(paths: &[PathBuf]) {
    for path in paths {
        remove_socket(path);
    }
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            error!(path = %path.display(), error = %e, "cannot remove socket");
        }
    }
}
