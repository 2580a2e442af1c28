//! Runs tests of the calling test binary on husk-vmm inside an emulated KVM host
//! (`husk_nested_svm`): the shim's husk-vmm backend (one process, every device in it) is only
//! used where KVM can run a stock guest, which this project's PVM hosts cannot offer.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use husk_nested_svm::{run_tests, NestedHost, Payload};

/// Each test gets this many more attempts after a spurious guest reset in the emulated host
/// (see `husk_nested_svm::run_tests`); other failures fail at once.
const RETRIES: usize = 2;

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
    // HUSK_NESTED_TESTS=a,b runs only those of `tests` (debugging).
    let only = std::env::var("HUSK_NESTED_TESTS").ok();
    let tests: Vec<&str> = tests
        .iter()
        .copied()
        .filter(|t| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *t))
        })
        .collect();
    // The debugging knobs reach the tests inside too.
    let knobs: Vec<(&str, String)> = ["HUSK_GUEST_CMDLINE", "HUSK_GUEST_LOG", "RUST_LOG"]
        .into_iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k, v)))
        .collect();
    let mut env: Vec<(&str, &str)> = vec![("HUSK_HYPERVISOR", "husk-vmm")];
    env.extend(knobs.iter().map(|(k, v)| (*k, v.as_str())));
    let payload = Payload {
        husk_vmm: &vmm,
        guest_kernel: &kernel,
        guest_initrd: &initrd,
        extra_guest_files: &[],
        test_env: &env,
        test_args: &[],
    };
    let result = run_tests(
        name,
        &host,
        &payload,
        work.path(),
        &tests,
        deadline,
        RETRIES,
    );
    let run = match result {
        Ok(run) => run,
        Err(e) => bail!("{e}"),
    };
    if let Some(last) = run.attempts.first() {
        for line in last.lines_starting_with(&["test ", "husk-nested:", "husk-vmm ", "hypervisor:"])
        {
            eprintln!("{name}: inside: {line}");
        }
        eprintln!(
            "{name}: {} tests passed on husk-vmm in the emulated KVM host; {:?} in the last attempt, {} attempts",
            tests.len(),
            last.elapsed,
            run.retries.len() + 1
        );
    }
    Ok(())
}
