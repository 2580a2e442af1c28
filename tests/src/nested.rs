//! Runs tests of the calling test binary on husk-vmm inside an emulated KVM host
//! (`husk_nested_svm`): the shim's husk-vmm backend (one process, every device in it) is only
//! used where KVM can run a stock guest, which this project's PVM hosts cannot offer.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use husk_nested_svm::{run, NestedHost, Payload};

use crate::{guest_artifacts, vmm_binary};

/// Runs `tests` (exact names in this test binary) with `HUSK_HYPERVISOR=husk-vmm` inside the
/// emulated host, and fails unless every one of them passes there. Prints the inner tests'
/// result lines and the timings, prefixed with `name`.
pub fn run_on_husk_vmm(name: &str, tests: &[&str], deadline: Duration) -> Result<()> {
    let (kernel, initrd) = guest_artifacts()?;
    let guest_dir = kernel
        .parent()
        .context("guest kernel path has no directory")?;
    let host = NestedHost::load(&guest_dir.join("nested-host")).map_err(|e| anyhow!(e))?;
    let vmm = vmm_binary()?;
    let work = tempfile::tempdir()?;
    let mut args = vec!["--exact"];
    args.extend_from_slice(tests);
    let payload = Payload {
        husk_vmm: &vmm,
        guest_kernel: &kernel,
        guest_initrd: &initrd,
        extra_guest_files: &[],
        test_env: &[("HUSK_HYPERVISOR", "husk-vmm")],
        test_args: &args,
    };
    let result = run(&host, &payload, work.path(), deadline).map_err(|e| anyhow!(e))?;
    for line in result.lines_starting_with(&["test ", "husk-nested:", "husk-vmm ", "hypervisor:"]) {
        eprintln!("{name}: inside: {line}");
    }
    result.check(tests.len()).map_err(|e| anyhow!(e))?;
    eprintln!(
        "{name}: {} tests passed on husk-vmm in the emulated KVM host; {:?} in all",
        tests.len(),
        result.elapsed
    );
    Ok(())
}
