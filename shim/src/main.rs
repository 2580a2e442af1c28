//! containerd-shim-husk-v2: the containerd runtime v2 shim for
//! `io.containerd.husk.v2`.
//!
//! The Task service arrives with the shim issue; until then this binary only
//! reports its version and refuses to pretend it can run containers.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-v" || a == "--version") {
        println!(
            "containerd-shim-husk-v2 {} (runtime io.containerd.husk.v2)",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "containerd-shim-husk-v2: the containerd Task service is not built yet; \
         this build can boot pod VMs through the husk_shim library only"
    );
    ExitCode::FAILURE
}
