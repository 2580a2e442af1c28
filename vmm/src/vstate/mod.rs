//! The KVM VM and its vCPUs, and how they tell the rest of the VMM that the guest is done.

pub mod vcpu;
pub mod vm;

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

pub use self::vcpu::{Vcpu, VcpuControl, VcpuError, VcpuHandle};
pub use self::vm::{Vm, VmError};

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked to end: an i8042 reset (how a husk guest powers off with `reboot=k`,
    /// since it has no ACPI; a guest panic with `panic=-1` ends the same way) or a KVM
    /// system event.
    PowerOff(String),
    /// A vCPU triple-faulted: the guest crashed (or, with `reboot=t`, rebooted that way).
    /// Reported apart from [`VmExit::PowerOff`] so a crash never reads as a clean stop.
    Reset(String),
    /// The guest halted a vCPU with interrupts off and no in-kernel irqchip to wake it.
    Halt,
    /// Stopped from the host: API `shutdown`, SIGTERM or SIGINT.
    Stopped(String),
    /// Something went wrong: a failed ioctl, an exit we cannot handle.
    Error(String),
}

impl VmExit {
    /// Guest-initiated ends and host-requested stops are clean; errors are not.
    pub fn is_clean(&self) -> bool {
        !matches!(self, VmExit::Error(_))
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::PowerOff(why) => write!(f, "guest powered off ({why})"),
            VmExit::Reset(why) => write!(f, "guest reset ({why})"),
            VmExit::Halt => write!(f, "guest halted"),
            VmExit::Stopped(why) => write!(f, "stopped ({why})"),
            VmExit::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// How vCPUs and devices report that the VM must end: the first reason is kept, and an
/// eventfd wakes the event loop.
#[derive(Clone)]
pub struct ExitNotifier {
    evt: Arc<EventFd>,
    reason: Arc<Mutex<Option<VmExit>>>,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitNotifier {
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            reason: Arc::new(Mutex::new(None)),
        })
    }

    pub fn notify(&self, exit: VmExit) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                *r = Some(exit);
            }
        }
        // The event loop also polls the reason, so a failed wake-up only delays it.
        let _ = self.evt.write(1);
    }

    /// The reason, once someone notified.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
