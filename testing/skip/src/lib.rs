//! How a husk test says it cannot run here.
//!
//! Two kinds of skip:
//! - [`missing`]: a precondition CI provides (root, `/dev/kvm`, containerd, a
//!   tool `make setup` installs) is absent. Under `CI=true`, or with
//!   `HUSK_REQUIRE=all` (or a comma list naming the test), that is a failure:
//!   a test that silently passes where it was meant to run hides a broken
//!   set-up.
//! - [`not_here`]: the test does not apply to this host by design (no hardware
//!   virtualization, so the emulated host runs it instead; or the host's KVM
//!   runs the emulated-host variant's tests directly). Never a failure.
//!
//! Either way the test prints `SKIPPED <test>: <why>` (the emulated host's
//! harness looks for that prefix) and, when `HUSK_SKIP_LOG` names a file, appends
//! a line to it, from which `make test` prints its closing `skipped: N (...)`.
//!
//! A test that passed only after a retry (the emulated host's own faults, see
//! husk-nested-svm) says so with [`retried`]: a `RETRIED <test>: <why>` line, and
//! a line in `HUSK_RETRY_LOG`, counted in the same closing line.

use std::io::Write;

/// The precondition is one CI provides: fails under CI, else skips.
pub fn missing(test: &str, what: &str) {
    if required(test) {
        panic!(
            "{test} cannot run: {what}. CI provides this (CI=true / HUSK_REQUIRE), so it is a \
             failure here, not a skip; fix the set-up (make setup, run as root)"
        );
    }
    record(test, what);
}

/// The test does not apply to this host: skips, always.
pub fn not_here(test: &str, why: &str) {
    record(test, why);
}

/// The test ran part of its work again (why): printed, and recorded for the summary.
pub fn retried(test: &str, why: &str) {
    let why = why.replace('\n', " ");
    eprintln!("RETRIED {test}: {why}");
    append("HUSK_RETRY_LOG", &format!("{test}: {why}\n"));
}

fn required(test: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        return true;
    }
    std::env::var("HUSK_REQUIRE").is_ok_and(|v| v.split(',').any(|t| t == "all" || t == test))
}

fn record(test: &str, why: &str) {
    let why = why.replace('\n', " ");
    println!("SKIPPED {test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
    append("HUSK_SKIP_LOG", &format!("{test}: {why}\n"));
}

fn append(log_var: &str, line: &str) {
    let Some(path) = std::env::var_os(log_var) else {
        return;
    };
    // One short O_APPEND write per line: lines from parallel tests never interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    // One test: the environment is process-wide.
    #[test]
    fn skips_are_recorded_and_fail_when_required() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skipped.log");
        std::env::remove_var("CI");
        std::env::remove_var("HUSK_REQUIRE");
        std::env::set_var("HUSK_SKIP_LOG", &log);
        let retries = dir.path().join("retried.log");
        std::env::set_var("HUSK_RETRY_LOG", &retries);
        retried("r", "a reset\nin the host");
        assert_eq!(
            std::fs::read_to_string(&retries).unwrap(),
            "r: a reset in the host\n"
        );
        missing("a", "needs root");
        not_here("b", "no vmx/svm");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "a: needs root\nb: no vmx/svm\n"
        );
        std::env::set_var("HUSK_REQUIRE", "x,c");
        assert!(std::panic::catch_unwind(|| missing("c", "needs root")).is_err());
        missing("d", "needs root");
        std::env::set_var("CI", "true");
        assert!(std::panic::catch_unwind(|| missing("e", "needs root")).is_err());
        not_here("f", "by design");
        std::env::remove_var("CI");
        std::env::remove_var("HUSK_REQUIRE");
        let lines = std::fs::read_to_string(&log).unwrap();
        assert!(lines.contains("d: needs root") && lines.contains("f: by design"));
        assert!(!lines.contains("c:") && !lines.contains("e:"));
    }
}
