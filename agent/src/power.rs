//! Ending the VM from inside, and the rule that PID 1 never simply exits.
//!
//! If PID 1 exits or dies, the kernel panics ("Attempted to kill init"),
//! which leaves the VMM waiting on a wedged guest and a console full of
//! backtrace instead of the agent's error. So every way out of the agent in
//! PID 1 mode (fatal error, panic, `Shutdown`) goes through [`power_off`].

use std::{io::Write, time::Duration};

use nix::sys::reboot::{reboot, RebootMode};

/// Syncs filesystems and ends the VM. Never returns.
///
/// The guest boots with `reboot=k` (husk-vmm: the i8042 reset, its power-off)
/// or `reboot=t` (QEMU: a triple fault, with `-no-reboot`), and the VMM exits
/// on that reboot, so a *reboot* is what ends the VM: it needs no ACPI or
/// other power-off hardware in the lean guest kernel. A real power-off is
/// the fallback for VMMs that do emulate it.
pub fn power_off() -> ! {
    tracing::info!("syncing filesystems and ending the VM");
    // virtio-fs/blk writes that are still in the page cache would be lost.
    nix::unistd::sync();

    // reboot(2) only ever returns an error.
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    tracing::error!(error = %e, "reboot(RB_AUTOBOOT) failed; trying RB_POWER_OFF");
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    tracing::error!(error = %e, "reboot(RB_POWER_OFF) failed");
    // Both failed (no CAP_SYS_BOOT?): say so on the console by every means,
    // then idle rather than exit and panic the kernel.
    let _ = writeln!(
        std::io::stderr(),
        "husk-agent: FATAL: could not reboot or power off the VM; halting in place"
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Makes a panic anywhere in PID 1 end the VM cleanly instead of panicking
/// the kernel (with `panic = "abort"` in the release profile, the hook is the
/// last code that runs).
pub fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The default hook prints the message and location to stderr, which
        // is the console.
        default_hook(info);
        tracing::error!("husk-agent panicked: {info}");
        power_off();
    }));
}
