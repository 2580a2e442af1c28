//! containerd-shim-husk-v2: the containerd runtime v2 shim for
//! `io.containerd.husk.v2`. One shim, and one microVM, per pod.
//!
//! `start` finds or spawns the pod's shim and prints its address; `delete`
//! cleans up after a shim that died; without an action it is that shim,
//! serving the Task API.

use std::process::ExitCode;

use husk_shim::{
    cli::{serve, start_delete, RUNTIME_ID},
    logging,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Go's flag package accepts one or two dashes.
    if args
        .iter()
        .skip(1)
        .any(|a| matches!(a.as_str(), "-v" | "--v" | "-version" | "--version"))
    {
        println!(
            "containerd-shim-husk-v2:\n  Version: {}\n  Runtime: {RUNTIME_ID}",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = flags.action.is_empty();
    let sink = match flags.action.as_str() {
        "" => logging::Sink::LogFifo,
        "start" => logging::Sink::Silent,
        _ => logging::Sink::Stderr,
    };
    logging::init(sink, flags.debug);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match flags.action.as_str() {
        "start" => rt.block_on(start_delete::start_command(&flags)),
        "delete" => start_delete::delete_command(&flags),
        "" => rt.block_on(serve::serve(&flags)),
        other => Err(containerd_shim::Error::InvalidArgument(format!(
            "unknown action {other:?} (expected start or delete)"
        ))),
    };
    // Do not wait for stray blocking tasks (a FIFO open nobody answers).
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let action = if server {
                "serve"
            } else {
                flags.action.as_str()
            };
            tracing::error!("{action}: {e}");
            eprintln!("containerd-shim-husk-v2 {action}: {e}");
            ExitCode::FAILURE
        }
    }
}
