//! Which failures in the emulated host are its own doing, and may be run again.
//!
//! The emulated host does two things now and then that are not husk's: it resets a guest
//! with a triple fault in the middle of its boot, without a kernel message (about 7% of
//! husk-vmm boots in it; the same kernel never did so under QEMU TCG), and it stops as a
//! whole (seen with QEMU-KVM inside it too). Only a host with hardware virtualization can
//! tell whether the resets are the emulator's or husk-vmm's; until then they are retried,
//! loudly, and nothing else is:
//! - a failed test is retried only when its own output (from its `test NAME ...` line to
//!   the next test's) shows [`SPURIOUS_RESET`], and only when every failed test does; one
//!   failure of another kind fails the run at once, with nothing retried;
//! - husk's guests power off through the i8042 (`reboot=k`), which husk-vmm reports apart
//!   from a triple fault, so a normal power-off never carries the signature;
//! - a host killed at its deadline is retried only when its heartbeat (COM2) had stopped:
//!   a test that hangs in a live host is a failure;
//! - every retry is printed and recorded (`husk_skip::retried`), so `make test`'s closing
//!   line counts it.

use std::path::Path;
use std::time::Duration;

use crate::{run_once, tail, NestedHost, NestedRun, Payload};

/// What husk-vmm prints when a vCPU triple-faults (never for a power-off).
pub(crate) const SPURIOUS_RESET: &str = "guest reset (triple fault)";

/// The outcome of [`run_tests`]: the attempts made, the last one first.
pub struct TestsRun {
    pub attempts: Vec<NestedRun>,
    /// Why each retry was made.
    pub retries: Vec<String>,
}

/// What one attempt means for the run.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Passed,
    /// Run these tests again, for this reason.
    Retry(Vec<String>, String),
    Failed(String),
}

/// Runs `tests` (exact names) of this test binary in the emulated host, `payload.test_args`
/// being ignored. Failures that are the emulated host's own (see the module doc) are run
/// again, up to `retries` more times, each retry reported under `name`; any other failure
/// fails at once. Ok when every test passed in some attempt.
pub fn run_tests(
    name: &str,
    host: &NestedHost,
    payload: &Payload,
    work: &Path,
    tests: &[&str],
    deadline: Duration,
    retries: usize,
) -> Result<TestsRun, String> {
    let mut out = TestsRun {
        attempts: Vec::new(),
        retries: Vec::new(),
    };
    let mut remaining: Vec<String> = tests.iter().map(|t| t.to_string()).collect();
    for attempt in 0..=retries {
        let mut args = vec!["--exact"];
        args.extend(remaining.iter().map(String::as_str));
        let p = Payload {
            test_args: &args,
            ..*payload
        };
        let run = run_once(host, &p, work, deadline)?;
        let names: Vec<&str> = remaining.iter().map(String::as_str).collect();
        let verdict = judge(&run, &names);
        out.attempts.insert(0, run);
        match verdict {
            Verdict::Passed => return Ok(out),
            Verdict::Retry(again, why) if attempt < retries => {
                husk_skip::retried(name, &why);
                out.retries.push(why);
                remaining = again;
            }
            Verdict::Retry(_, why) | Verdict::Failed(why) => {
                let earlier = if out.retries.is_empty() {
                    String::new()
                } else {
                    format!("\n(after retries: {})", out.retries.join("; "))
                };
                return Err(format!("{why}{earlier}"));
            }
        }
    }
    Err(format!("no attempt completed: {}", out.retries.join("; ")))
}

fn judge(run: &NestedRun, remaining: &[&str]) -> Verdict {
    if let Some(hang) = run.hang {
        let why = hang.describe();
        return if hang.host_stopped() {
            Verdict::Retry(remaining.iter().map(|t| t.to_string()).collect(), why)
        } else {
            Verdict::Failed(format!(
                "{why}\n--- its console ---\n{}",
                tail(&run.console)
            ))
        };
    }
    let Err(e) = run.check(remaining.len()) else {
        return Verdict::Passed;
    };
    match spurious_failures(&run.console, remaining) {
        Some(failed) => {
            let why = format!(
                "{} hit a spurious guest reset in the emulated host",
                failed.join(", ")
            );
            Verdict::Retry(failed, why)
        }
        None => Verdict::Failed(e),
    }
}

/// The failed tests when every one of them failed beside a triple fault in its own output,
/// or None when some failure is of another kind.
fn spurious_failures(console: &str, remaining: &[&str]) -> Option<Vec<String>> {
    let failed = failed_tests(console);
    // Every failure must be accounted for: a name lost in the console's noise would
    // otherwise drop out of the retry unnoticed.
    let counted = failed_count(console);
    let ok = !failed.is_empty()
        && counted == Some(failed.len())
        && !console.contains("SKIPPED ")
        && failed.iter().all(|t| {
            remaining.contains(&t.as_str())
                && test_output(console, t, remaining).is_some_and(|o| o.contains(SPURIOUS_RESET))
        });
    ok.then_some(failed)
}

/// What `test` printed, with `--nocapture --test-threads=1`: from its `test NAME ... ` line
/// to the next of `tests` to start, or to the closing failure list.
fn test_output<'a>(console: &'a str, test: &str, tests: &[&str]) -> Option<&'a str> {
    let start = console.find(&format!("test {test} ... "))?;
    let rest = &console[start..];
    let mut end = rest.len();
    for next in tests.iter().filter(|t| **t != test) {
        if let Some(i) = rest.find(&format!("\ntest {next} ... ")) {
            end = end.min(i);
        }
    }
    if let Some(i) = rest.find("\nfailures:\n") {
        end = end.min(i);
    }
    Some(&rest[..end])
}

/// `N` of the last "test result: FAILED. M passed; N failed" line.
fn failed_count(console: &str) -> Option<usize> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.contains("test result: FAILED."))?;
    let (before, _) = line.split_once(" failed")?;
    before.rsplit(' ').next()?.parse().ok()
}

/// The names libtest lists under "failures:" at the end of a run.
fn failed_tests(console: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_list = false;
    for line in console.lines().map(str::trim_end) {
        if line == "failures:" {
            in_list = true;
            names.clear();
            continue;
        }
        if in_list {
            match line.strip_prefix("    ") {
                Some(name) if !name.trim().is_empty() && !name.contains(' ') => {
                    names.push(name.trim().to_string())
                }
                _ if line.trim().is_empty() && names.is_empty() => {}
                _ => in_list = false,
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Hang;

    /// What libtest prints with `--nocapture --test-threads=1` when `b` fails after printing
    /// `b_said` and `a`, `c` pass.
    fn console(b_said: &str, a_said: &str) -> String {
        format!(
            "running 3 tests\n\
             test a ... {a_said}\nok\n\
             test b ... {b_said}\nthread 'b' panicked at x.rs:1:1:\nboom\nFAILED\n\
             test c ... ok\n\n\
             failures:\n\nfailures:\n    b\n\n\
             test result: FAILED. 2 passed; 1 failed; 0 ignored\n"
        )
    }

    fn run(console: String, hang: Option<Hang>) -> NestedRun {
        NestedRun {
            console,
            exit: Some(101),
            elapsed: Duration::from_secs(1),
            hang,
        }
    }

    const ABC: &[&str] = &["a", "b", "c"];

    #[test]
    fn failed_tests_come_from_the_last_failures_list() {
        let c = console("", "");
        assert_eq!(failed_tests(&c), vec!["b".to_string()]);
        assert_eq!(failed_count(&c), Some(1));
        assert!(failed_tests("test result: ok. 3 passed").is_empty());
    }

    #[test]
    fn a_test_output_runs_to_the_next_test() {
        let c = console("husk-vmm: boot", "a's line");
        let b = test_output(&c, "b", ABC).unwrap();
        assert!(b.starts_with("test b ... husk-vmm: boot") && b.contains("boom"));
        assert!(!b.contains("test c") && !b.contains("a's line"));
        let c_out = test_output(&c, "c", ABC).unwrap();
        assert!(!c_out.contains("failures"), "{c_out}");
        assert_eq!(test_output(&c, "d", ABC), None);
    }

    #[test]
    fn a_failure_with_a_reset_in_its_own_output_is_retried() {
        let c = console(&format!("vcpu 0: {SPURIOUS_RESET}"), "");
        assert_eq!(
            judge(&run(c, None), ABC),
            Verdict::Retry(
                vec!["b".into()],
                "b hit a spurious guest reset in the emulated host".into()
            )
        );
    }

    #[test]
    fn a_reset_in_another_test_does_not_make_a_failure_retryable() {
        // a passed after a reset of its own (a retry inside the test, say); b failed for
        // its own reason.
        let c = console("no agent", &format!("vcpu 0: {SPURIOUS_RESET}"));
        assert!(matches!(judge(&run(c, None), ABC), Verdict::Failed(_)));
    }

    #[test]
    fn a_power_off_is_not_the_reset_signature() {
        let c = console("VM ended reason=guest powered off (i8042 reset)", "");
        assert!(matches!(judge(&run(c, None), ABC), Verdict::Failed(_)));
    }

    #[test]
    fn one_failure_of_another_kind_retries_nothing() {
        let reset = format!("vcpu 0: {SPURIOUS_RESET}");
        let c = console(&reset, "")
            .replace("test c ... ok", "test c ... assertion failed\nFAILED")
            .replace("    b\n", "    b\n    c\n")
            .replace("2 passed; 1 failed", "1 passed; 2 failed");
        assert_eq!(failed_tests(&c), vec!["b".to_string(), "c".to_string()]);
        assert!(matches!(judge(&run(c, None), ABC), Verdict::Failed(_)));
    }

    #[test]
    fn skips_unasked_tests_and_lost_names_are_failures() {
        let reset = console(&format!("vcpu 0: {SPURIOUS_RESET}"), "");
        // A skip: the emulated host could not run KVM guests at all.
        let skipped = format!("SKIPPED a: no kvm\n{reset}");
        assert!(matches!(
            judge(&run(skipped, None), ABC),
            Verdict::Failed(_)
        ));
        // A failure of a test that was not asked for.
        assert_eq!(spurious_failures(&reset, &["a", "c"]), None);
        // A list that lost a name (2 failed, 1 listed).
        let lost = reset.replace("2 passed; 1 failed", "1 passed; 2 failed");
        assert_eq!(spurious_failures(&lost, ABC), None);
    }

    #[test]
    fn only_a_host_whose_heartbeat_stopped_counts_as_hung() {
        let stopped = Hang {
            heartbeat_age: Some(Duration::from_secs(300)),
        };
        let never = Hang {
            heartbeat_age: None,
        };
        let alive = Hang {
            heartbeat_age: Some(Duration::from_secs(1)),
        };
        for hang in [stopped, never] {
            assert!(
                matches!(judge(&run(String::new(), Some(hang)), ABC), Verdict::Retry(ref t, _) if t.len() == 3)
            );
        }
        let Verdict::Failed(why) = judge(&run("test a ... ".into(), Some(alive)), ABC) else {
            panic!("a test hung in a live host is a failure");
        };
        assert!(why.contains("a test hung"), "{why}");
    }

    #[test]
    fn a_clean_run_passes() {
        let mut r = run("test result: ok. 3 passed; 0 failed".into(), None);
        r.exit = Some(0);
        assert_eq!(judge(&r, ABC), Verdict::Passed);
        // The same output with one test fewer than asked is not a pass.
        assert!(matches!(
            judge(&r, &["a", "b", "c", "d"]),
            Verdict::Failed(_)
        ));
    }
}
