//! husk-agent: the first and only process the husk guest kernel starts.
//!
//! The guest's initrd holds just this static binary as `/init`. The agent
//! owns everything inside the VM:
//!
//! - **Init duties** (PID 1 only): mounting /proc, /sys, /dev and friends and
//!   cgroup v2, stdio on the console, the hostname ([`init`]); reaping every
//!   orphan while handing exit statuses of the agent's own children to whoever
//!   started them ([`reaper`]); and ending the VM, never exiting, when told to
//!   or when something goes fatally wrong ([`power`]).
//! - **The agent API**: a ttrpc server on vsock port 1024 that the shim on the
//!   host drives ([`rpc`]): health, version, guest details, shutdown, and
//!   the container runtime ([`container`]: sandbox set-up, container
//!   lifecycle, stdio, stats, resources, OOM events); next networking.
//! - **Boot timing**: CLOCK_BOOTTIME stamps of /init starting and the listener
//!   being ready ([`clock`]), reported over the API and on the console.
//!
//! Run as an ordinary process (`--listen unix:///path`), it skips the init
//! duties and serves the same API on a Unix socket, so the service can be
//! tested on a host without a VM; there, `Shutdown` exits the process with 0.
//!
//! [`init`]: husk_agent::init
//! [`reaper`]: husk_agent::reaper
//! [`power`]: husk_agent::power
//! [`rpc`]: husk_agent::rpc
//! [`clock`]: husk_agent::clock
//! [`container`]: husk_agent::container
//!
//! The same binary also serves as the container runtime's short-lived
//! helper process (`husk-agent __husk-runtime ...`, see
//! `husk_agent::container::helper`).

use std::{ffi::OsString, io::Write as _, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use husk_agent::{
    cli::{self, Command},
    clock,
    cmdline::{self, KernelCmdline},
    container::{helper, Runtime, RuntimeConfig},
    init, log_stream, logging, power,
    reaper::Reaper,
    rpc::{self, Mode, ServeOptions},
    switch_root,
};

/// How long tasks get to finish once the server has stopped.
const RUNTIME_STOP_TIMEOUT: Duration = Duration::from_millis(500);

fn main() -> ExitCode {
    // Before anything else, so the stamp is the moment the kernel handed over.
    let init_started_ns = clock::boottime_ns();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == helper::HELPER_ARG) {
        return helper::main(&args);
    }
    if nix::unistd::getpid().as_raw() == 1 {
        // First run on the initramfs: move to a tmpfs root and re-exec (see
        // switch_root). The re-executed agent keeps the first boot stamp.
        let Some(started) = switch_root::inherited_start() else {
            if !switch_root::on_initramfs() {
                run_as_init(init_started_ns, args)
            }
            let err = switch_root::leave_initramfs(init_started_ns, &args);
            // Still on the initramfs: the API works, containers cannot
            // pivot_root. Say so loudly and carry on.
            let _ = writeln!(std::io::stderr(), "husk-agent: {err}");
            run_as_init(init_started_ns, args)
        };
        std::env::remove_var(switch_root::STARTED_ENV);
        run_as_init(started, args)
    }
    run_as_process(init_started_ns, args)
}

/// PID 1: set up the guest, serve, then end the VM; never returns.
fn run_as_init(init_started_ns: u64, args: Vec<OsString>) -> ! {
    power::install_panic_hook();
    // Whatever directory init was started in may be covered by the mounts
    // below, and runtimes resolve relative paths against it.
    let _ = std::env::set_current_dir("/");

    let early_errors = init::early();
    let cmdline = KernelCmdline::read();
    let log_filter = cmdline
        .as_ref()
        .ok()
        .and_then(|c| c.value(cmdline::LOG_PARAM));
    // Before the logger, so that its first lines are kept for the stream.
    let log_port = cmdline
        .as_ref()
        .ok()
        .and_then(|c| c.value(log_stream::LOG_PORT_PARAM))
        .map(|p| {
            p.parse::<u32>()
                .map_err(|e| format!("{}={p:?}: {e}", log_stream::LOG_PORT_PARAM))
        });
    if let Some(Ok(port)) = log_port {
        log_stream::start(port);
    }
    let log_warnings = logging::init(log_filter);
    if let Some(Err(e)) = &log_port {
        tracing::warn!("ignoring {e}");
    }
    for e in &early_errors {
        tracing::warn!("{e}");
    }
    if let Err(e) = &cmdline {
        tracing::warn!("{e}");
    }
    for w in &log_warnings {
        tracing::warn!("{w}");
    }
    let (options, skipped) = cli::parse_as_init(args);
    for e in &skipped {
        tracing::warn!("ignoring argument: {e}");
    }

    init::setup();

    match run(options, init_started_ns, Mode::Init) {
        Ok(stopped) => tracing::info!(reason = ?stopped.reason, "agent stopped"),
        Err(e) => tracing::error!("husk-agent failed: {e:#}"),
    }
    power::power_off()
}

/// An ordinary process: serve until `Shutdown` or a signal, exit 0.
fn run_as_process(init_started_ns: u64, args: Vec<OsString>) -> ExitCode {
    let mut stderr = std::io::stderr();
    let options = match cli::parse(args) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            let _ = std::io::stdout().write_all(cli::USAGE.as_bytes());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            let _ = writeln!(
                std::io::stdout(),
                "husk-agent {}",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = write!(stderr, "husk-agent: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };

    for w in logging::init(None) {
        tracing::warn!("{w}");
    }
    // Orphans of the agent's children then come to the agent, as they do to
    // PID 1 in the guest, so the reaper behaves the same in both modes.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("becoming a child subreaper: {e}");
    }

    match run(options, init_started_ns, Mode::Process) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("husk-agent failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: cli::Options, init_started_ns: u64, mode: Mode) -> Result<rpc::Stopped> {
    // Two workers: a slow call must not stall Health, and a guest with many
    // vCPUs should not get one idle thread per vCPU.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = runtime.block_on(async {
        // Held for the agent's lifetime; the container runtime starts its
        // processes through it.
        let reaper = Reaper::start().context("starting the child reaper")?;
        let mut config = RuntimeConfig::guest();
        if mode == Mode::Process {
            config.guest = false;
            if let Some(dir) = options.state_dir {
                config.state_dir = dir;
            }
        }
        let runtime = Runtime::new(config, reaper);
        rpc::serve(ServeOptions {
            listen: options.listen,
            init_started_ns,
            mode,
            runtime,
        })
        .await
    });
    runtime.shutdown_timeout(RUNTIME_STOP_TIMEOUT);
    result
}
