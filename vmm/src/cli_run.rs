//! `husk-vmm run`: boot a microVM on KVM.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tracing::{error, info};

use husk_vmm::builder::{
    boot_timer_now, BootSource, NetConfig, TapSource, VmConfig, VmExit, Vmm, VsockConfig,
};
use husk_vmm::devices::virtio::fs::FsConfig;
use husk_vmm::jail::JailConfig;

/// The command line husk's guest needs: the console on COM1, reboot through the i8042 (how
/// the VMM learns the guest is done: there is no ACPI; reported apart from a triple fault,
/// which is a crash), and reboot right away on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux (PVH entry used when present) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line; virtio_mmio.device= entries are appended for each device.
    #[arg(long, value_name = "CMDLINE", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    memory: u64,
    /// Hybrid vsock socket: host clients connect here and send "CONNECT <port>\n"; guest
    /// connections to host port P go to "<PATH>_P". Without it the VM has no vsock device.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    #[arg(long, value_name = "CID", default_value_t = 3)]
    guest_cid: u64,
    /// Control API socket (line-based JSON: state, pause, resume, shutdown).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// File the guest console (COM1) is appended to.
    #[arg(long, value_name = "PATH")]
    console_log: Option<PathBuf>,
    /// The console log's cap in bytes (at least 4096): when it is reached the file starts
    /// over with a line saying how much was dropped (so it holds the newest output).
    #[arg(long, value_name = "BYTES", default_value_t = husk_bounds::DEFAULT_LOG_MAX_BYTES)]
    console_log_max_bytes: u64,
    /// Leave out the virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Export this host directory to the guest with an in-process virtio-fs device.
    #[arg(long, value_name = "DIR", requires = "fs_tag")]
    shared_dir: Option<PathBuf>,
    /// The virtio-fs tag the guest mounts (`mount -t virtiofs <TAG> <dir>`), at most 36 bytes.
    #[arg(long, value_name = "TAG", requires = "shared_dir")]
    fs_tag: Option<String>,
    /// Give the guest a virtio-net device over this existing tap (in husk-vmm's network
    /// namespace).
    #[arg(long, value_name = "NAME", group = "net_source")]
    net_tap: Option<String>,
    /// Give the guest a virtio-net device over this inherited fd, already attached to a tap
    /// with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR (a tap made in another network namespace).
    #[arg(long, value_name = "FD", group = "net_source")]
    net_tap_fd: Option<i32>,
    /// The guest's MAC address (aa:bb:cc:dd:ee:ff) on --net-tap or --net-tap-fd.
    #[arg(long, value_name = "MAC", requires = "net_source")]
    net_mac: Option<String>,
    /// Once the VM is built, enter a jail: own mount, network, IPC and UTS namespaces with an
    /// empty read-only root holding only the directories of --vsock-uds, --api-sock and
    /// --shared-dir, no capabilities (but the file server's with --shared-dir), no_new_privs.
    /// Needs root.
    #[arg(long)]
    jail: bool,
    /// Most fds the process may hold (RLIMIT_NOFILE, soft and hard): bounds the vsock
    /// connections (1024 at most at once) and, with --shared-dir, the inodes and open files
    /// the guest can make the file server keep (one fd each, until the guest forgets them: a
    /// guest that never does would otherwise hold host fds without bound).
    #[arg(long, value_name = "N", default_value_t = husk_vmm::limits::DEFAULT_MAX_OPEN_FILES_FS)]
    max_open_files: u64,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Print "husk-vmm: boot-timer: ..." lines to stderr when vCPU 0 first enters the guest,
    /// timed from $HUSK_BOOT_T0_NS (CLOCK_MONOTONIC ns) if set, else from process start.
    #[arg(long)]
    boot_timer: bool,
}

/// Runs the VM; `Ok` when it ended cleanly (guest reset/power-off, API shutdown, signal).
pub fn run(args: RunArgs, t0_ns: u64) -> Result<()> {
    let t0 = match std::env::var("HUSK_BOOT_T0_NS") {
        Ok(v) => v
            .parse::<u64>()
            .with_context(|| format!("HUSK_BOOT_T0_NS={v:?}: not a number"))?,
        Err(_) => t0_ns,
    };
    // Before anything is opened: the guest can make the VM hold fds without bound
    // otherwise (husk_vmm::limits).
    crate::open_file_limit(args.max_open_files)?;
    let mut cfg = VmConfig::new(BootSource::Linux {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
    });
    cfg.vcpus = args.vcpus;
    cfg.memory_mib = args.memory;
    cfg.console_log = args.console_log;
    cfg.console_log_max_bytes = args.console_log_max_bytes;
    cfg.vsock = args.vsock_uds.map(|uds| VsockConfig {
        guest_cid: args.guest_cid,
        uds,
    });
    cfg.rng = !args.no_rng;
    let tap = match (args.net_tap, args.net_tap_fd) {
        (Some(name), _) => Some(TapSource::Name(name)),
        (None, Some(fd)) => Some(TapSource::Fd(fd)),
        (None, None) => None,
    };
    if let Some(tap) = tap {
        let mac = match &args.net_mac {
            Some(m) => Some(husk_vmm::devices::virtio::net::parse_mac(m).context("--net-mac")?),
            None => None,
        };
        cfg.net = Some(NetConfig { tap, mac });
    }
    if let (Some(dir), Some(tag)) = (args.shared_dir, args.fs_tag) {
        let fs = FsConfig::new(dir, tag);
        fs.validate().with_context(|| {
            format!(
                "--shared-dir {} --fs-tag {}",
                fs.shared_dir.display(),
                fs.tag
            )
        })?;
        cfg.fs = Some(fs);
    }
    cfg.api_sock = args.api_sock;
    cfg.seccomp = !args.no_seccomp;
    cfg.handle_signals = true;
    cfg.boot_timer_t0_ns = args.boot_timer.then_some(t0);

    let jail = args.jail.then(|| {
        let parent = |p: &PathBuf| p.parent().map(PathBuf::from);
        JailConfig {
            visible_dirs: cfg
                .vsock
                .as_ref()
                .and_then(|v| parent(&v.uds))
                .into_iter()
                .chain(cfg.api_sock.as_ref().and_then(parent))
                .chain(cfg.fs.as_ref().map(|f| f.shared_dir.clone()))
                .collect(),
            fs_server: cfg.fs.is_some(),
            ..Default::default()
        }
    });

    let mut vmm = Vmm::build(cfg).context("cannot build the VM")?;
    if let Some(jail) = jail {
        // Everything the VM needs is open; no thread runs yet.
        husk_vmm::jail::enter(&jail).context("--jail")?;
        info!(dirs = ?jail.visible_dirs, "entered the jail");
    }
    info!(cmdline = vmm.cmdline(), "starting the guest");
    match vmm.run().context("VM run failed")? {
        exit if exit.is_clean() => {
            info!(reason = %exit, "VM ended");
            Ok(())
        }
        VmExit::Error(e) => {
            error!(error = %e, "VM failed");
            bail!("VM failed: {e}")
        }
        other => bail!("VM ended: {other}"),
    }
}

/// The process's start time for the boot timer.
pub fn now_ns() -> u64 {
    boot_timer_now()
}
