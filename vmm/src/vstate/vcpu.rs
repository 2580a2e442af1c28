//! vCPUs: their boot configuration and the thread that runs `KVM_RUN` and dispatches exits to
//! the port-I/O and MMIO buses.
//!
//! Pausing: the event loop asks [`VcpuControl`] to pause and kicks every vCPU thread with a
//! real-time signal. The signal handler sets `kvm_run.immediate_exit`, so the vCPU leaves
//! `KVM_RUN` (or never enters it, if the signal came between two runs) and parks on a condvar
//! until resumed.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, error, info, warn};
use vm_memory::GuestAddress;

use super::{ExitNotifier, Vm, VmExit};
use crate::arch::x86_64::{cpuid, msrs, regs, regs::BootMode};
use crate::devices::bus::Bus;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {id}: {source}")]
    Create {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set only {set} of {wanted} MSRs")]
    PartialMsrs { set: usize, wanted: usize },
    #[error("cannot build the MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("cannot spawn vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub mode: BootMode,
    pub entry: GuestAddress,
    /// `boot_params` (long mode) or `hvm_start_info` (PVH).
    pub boot_info: GuestAddress,
}

/// Reports when the vCPU first enters the guest: wall time since `t0_ns` (CLOCK_MONOTONIC)
/// and the process's CPU time so far. Used by the bench.
#[derive(Clone, Copy, Debug)]
pub struct BootTimer {
    pub t0_ns: u64,
}

impl BootTimer {
    fn report(&self) {
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let cpu = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
        eprintln!(
            "husk-vmm: boot-timer: first KVM_RUN wall_us={} cpu_us={}",
            now.saturating_sub(self.t0_ns) / 1000,
            cpu / 1000
        );
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// One vCPU, configured and ready to run on its own thread.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitNotifier,
    boot_timer: Option<BootTimer>,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and sets its CPUID, MSRs, FPU and LAPIC. The boot vCPU
    /// (id 0) also gets its entry registers; the others wait for the guest's INIT/SIPI.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &Vm,
        id: u8,
        count: u8,
        boot: Option<&BootEntry>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: ExitNotifier,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let mut cpuid: CpuId = vm.supported_cpuid().clone();
        cpuid::filter_cpuid(&mut cpuid, id, count);
        fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;
        let msrs = msrs::boot_msr_list().map_err(VcpuError::MsrList)?;
        let set = fd.set_msrs(&msrs).map_err(VcpuError::SetMsrs)?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::PartialMsrs {
                set,
                wanted: msrs.as_slice().len(),
            });
        }
        regs::setup_fpu(&fd)?;
        regs::setup_lints(&fd)?;
        if let Some(boot) = boot {
            regs::setup_sregs(vm.memory(), &fd, boot.mode)?;
            regs::setup_regs(&fd, boot.mode, boot.entry, boot.boot_info)?;
        }
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            exit,
            boot_timer: None,
        })
    }

    pub fn set_boot_timer(&mut self, timer: BootTimer) {
        self.boot_timer = Some(timer);
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// The vCPU file descriptor (for tests that inspect registers).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the vCPU until the VM ends or a stop is requested, on the calling thread.
    /// Returns why this vCPU stopped (also reported through the exit notifier).
    pub fn run(&mut self, control: &VcpuControl) -> Option<VmExit> {
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let res = self.run_loop(control);
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        if let Some(exit) = &res {
            self.exit.notify(exit.clone());
        }
        res
    }

    fn run_loop(&mut self, control: &VcpuControl) -> Option<VmExit> {
        let id = self.id;
        loop {
            if control.checkpoint() {
                return None;
            }
            if let Some(timer) = self.boot_timer.take() {
                timer.report();
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: clear the flag and look at what the event loop wants.
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => return Some(VmExit::Error(format!("vCPU {id}: KVM_RUN: {e}"))),
            };
            match exit {
                VcpuExit::IoIn(port, data) => {
                    // Nothing there reads as zeros, which probing drivers take as "absent".
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0);
                    }
                }
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                }
                VcpuExit::Hlt => {
                    info!(vcpu = id, "guest halted");
                    return Some(VmExit::Halt);
                }
                VcpuExit::Shutdown => {
                    // husk's guests power off through the i8042 (reboot=k), so this is a
                    // crash or a guest booted with reboot=t; where it happened says which.
                    let regs = self.fd.get_regs().ok();
                    let sregs = self.fd.get_sregs().ok();
                    warn!(
                        vcpu = id,
                        rip = format_args!("{:#x}", regs.map_or(0, |r| r.rip)),
                        rsp = format_args!("{:#x}", regs.map_or(0, |r| r.rsp)),
                        cr0 = format_args!("{:#x}", sregs.map_or(0, |s| s.cr0)),
                        cr3 = format_args!("{:#x}", sregs.map_or(0, |s| s.cr3)),
                        cr4 = format_args!("{:#x}", sregs.map_or(0, |s| s.cr4)),
                        idt = format_args!("{:#x}", sregs.map_or(0, |s| s.idt.base)),
                        "guest reset (triple fault)"
                    );
                    return Some(VmExit::Reset("triple fault".into()));
                }
                VcpuExit::SystemEvent(kind, _) => {
                    info!(vcpu = id, kind, "guest system event");
                    return Some(VmExit::PowerOff(format!("system event {kind}")));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Some(VmExit::Error(format!(
                        "vCPU {id}: KVM_RUN entry failed (hardware reason {reason:#x}, cpu {cpu})"
                    )));
                }
                VcpuExit::InternalError => {
                    let (suberror, rip) = self.internal_error_info();
                    return Some(VmExit::Error(format!(
                        "vCPU {id}: KVM internal error (suberror {suberror}, rip {rip:#x}); \
                         this KVM may be unable to run this guest (an emulation failure on a \
                         nested PVM host is one cause)"
                    )));
                }
                VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
                other => {
                    let what = format!("{other:?}");
                    let rip = self.rip();
                    return Some(VmExit::Error(format!(
                        "vCPU {id}: unexpected exit {what} at rip {rip:#x}"
                    )));
                }
            }
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn internal_error_info(&mut self) -> (u32, u64) {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        (suberror, self.rip())
    }

    /// Spawns the vCPU thread. `on_start` runs first on the new thread (the seccomp filter).
    pub fn spawn<F>(
        mut self,
        control: Arc<VcpuControl>,
        on_start: F,
    ) -> Result<VcpuHandle, VcpuError>
    where
        F: FnOnce() -> Result<(), String> + Send + 'static,
    {
        install_kick_handler()?;
        let id = self.id;
        let exit = self.exit.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if let Err(e) = on_start() {
                    error!(vcpu = id, error = %e, "vCPU thread set-up failed");
                    exit.notify(VmExit::Error(format!("vCPU {id} thread: {e}")));
                    return;
                }
                debug!(vcpu = id, "vCPU running");
                self.run(&control);
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { handle })
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    handle: JoinHandle<()>,
}

impl VcpuHandle {
    /// Makes the vCPU leave `KVM_RUN` (it then checks [`VcpuControl`]).
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        if self.handle.is_finished() {
            return;
        }
        // SAFETY: the pthread_t belongs to a thread we spawned and have not joined.
        unsafe {
            libc::pthread_kill(self.handle.as_pthread_t(), kick_signal());
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPUs out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn kick_handler(_: libc::c_int) {
    // Only async-signal-safe work here: one volatile store through a pointer that this thread
    // set up before entering its run loop and clears after leaving it.
    let p = IMMEDIATE_EXIT.with(|p| p.get());
    if !p.is_null() {
        // SAFETY: p points into this thread's kvm_run mapping, which outlives the run loop.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a plain sigaction with a handler that only does a volatile store.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = kick_handler as *const () as usize;
            act.sa_flags = 0;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) != 0 {
                res = Err(VcpuError::Signal(std::io::Error::last_os_error()));
            }
        }
    });
    res
}

#[derive(Debug, Default)]
struct ControlState {
    pause: bool,
    stop: bool,
    parked: usize,
}

/// Pause, resume and stop requests for all vCPUs.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cv: Condvar,
}

impl VcpuControl {
    pub fn new() -> Self {
        VcpuControl::default()
    }

    /// Called by a vCPU between runs: parks while paused. Returns true when it must stop.
    fn checkpoint(&self) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return true;
        };
        while st.pause && !st.stop {
            st.parked += 1;
            self.cv.notify_all();
            st = match self.cv.wait(st) {
                Ok(st) => st,
                Err(_) => return true,
            };
            st.parked -= 1;
        }
        st.stop
    }

    /// Pauses every vCPU and waits (bounded) until they are parked. Returns whether all of
    /// `vcpus` parked in time.
    pub fn pause(&self, vcpus: &[VcpuHandle]) -> bool {
        if let Ok(mut st) = self.state.lock() {
            st.pause = true;
        }
        for v in vcpus {
            v.kick();
        }
        let running = vcpus.iter().filter(|v| !v.is_finished()).count();
        let Ok(st) = self.state.lock() else {
            return false;
        };
        match self
            .cv
            .wait_timeout_while(st, Duration::from_secs(2), |st| st.parked < running)
        {
            Ok((_, timeout)) => !timeout.timed_out(),
            Err(_) => false,
        }
    }

    pub fn resume(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.pause = false;
        }
        self.cv.notify_all();
    }

    /// Makes every vCPU thread return at its next checkpoint.
    pub fn stop(&self, vcpus: &[VcpuHandle]) {
        if let Ok(mut st) = self.state.lock() {
            st.stop = true;
        }
        self.cv.notify_all();
        for v in vcpus {
            v.kick();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.state.lock().map(|s| s.pause).unwrap_or(false)
    }
}
