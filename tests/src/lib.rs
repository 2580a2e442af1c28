//! Shared set-up for husk's end-to-end tests and benchmarks: where the guest
//! kernel, initrd and host binaries are, and VM specs that use them.
//!
//! `make test` and `make bench` build everything first and point here with
//! `HUSK_GUEST_DIR` (kernel + initrd) and `HUSK_VMM_BIN`; without them the
//! workspace's `target/` is used. A missing artefact is an error that says how
//! to build it, never a silent skip.
//!
//! `HUSK_HYPERVISOR` (auto, qemu or husk-vmm) picks the test VMs' hypervisor;
//! auto, the default, is what the shim does: husk-vmm where KVM can run a
//! stock guest, QEMU with TCG elsewhere. `HUSK_GUEST_CMDLINE` adds kernel
//! parameters to the test VMs' command line (debugging). [`nested`] runs tests on husk-vmm
//! inside an emulated KVM host where the real one cannot.

use std::{
    env,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Result};
use husk_shim::hypervisor::{HypervisorChoice, VmSpec};

pub mod containerd;
pub mod cri;
pub mod husk_containerd;
pub mod nested;
pub mod netns;
pub mod oci_image;
pub mod oci_spec;
pub mod pod;
pub mod rootfs;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn existing(what: &str, p: PathBuf, hint: &str) -> Result<PathBuf> {
    if p.is_file() {
        Ok(p)
    } else {
        bail!("{what} not found at {} ({hint})", p.display())
    }
}

/// The guest kernel and initrd built by `make guest`.
pub fn guest_artifacts() -> Result<(PathBuf, PathBuf)> {
    let dir = env::var_os("HUSK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"));
    let hint = "run `make guest` first, or set HUSK_GUEST_DIR";
    Ok((
        existing("guest kernel", dir.join("vmlinux"), hint)?,
        existing("guest initrd", dir.join("initrd.img"), hint)?,
    ))
}

/// The husk-vmm binary the VM's device backends run from.
pub fn vmm_binary() -> Result<PathBuf> {
    if let Some(p) = env::var_os("HUSK_VMM_BIN") {
        return existing("husk-vmm", PathBuf::from(p), "HUSK_VMM_BIN points at it");
    }
    let root = workspace_root();
    for profile in ["debug", "release"] {
        let p = root.join("target").join(profile).join("husk-vmm");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("husk-vmm binary not found under target/ (run `cargo build -p husk-vmm`, or set HUSK_VMM_BIN)")
}

/// `HUSK_HYPERVISOR`, or auto.
pub fn hypervisor_choice() -> Result<HypervisorChoice> {
    match env::var("HUSK_HYPERVISOR").as_deref() {
        Err(_) | Ok("") | Ok("auto") => Ok(HypervisorChoice::Auto),
        Ok("qemu") => Ok(HypervisorChoice::Qemu),
        Ok("husk-vmm") => Ok(HypervisorChoice::HuskVmm),
        Ok(other) => bail!("HUSK_HYPERVISOR={other:?}: expected auto, qemu or husk-vmm"),
    }
}

/// A spec for a test VM whose state lives in `state_parent/<id>`.
pub fn vm_spec(id: &str, state_parent: &Path) -> Result<VmSpec> {
    let (kernel, initrd) = guest_artifacts()?;
    let mut spec = VmSpec::new(id, kernel, initrd, state_parent.join(id));
    spec.vmm_binary = vmm_binary()?;
    spec.hypervisor = hypervisor_choice()?;
    // A debugging knob: more kernel parameters (say `loglevel=8` against `quiet`).
    if let Ok(extra) = env::var("HUSK_GUEST_CMDLINE") {
        spec.extra_cmdline = extra;
    }
    spec.memory_mib = 256;
    spec.vcpus = 1;
    // TCG boots take a few seconds, but a loaded 2-core CI host running
    // several test VMs at once can stretch that.
    spec.boot_timeout = Duration::from_secs(90);
    // Container calls run libcontainer under TCG emulation: seconds when
    // several test VMs share two cores.
    spec.call_timeout = Duration::from_secs(60);
    Ok(spec)
}

/// Whether a process still exists (a zombie counts as gone: it no longer runs).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state letter follows the ")" that closes the command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// Logs to stderr, shown for failing tests.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
