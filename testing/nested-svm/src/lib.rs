//! husk-nested-svm: a KVM host made of software, for hosts whose own /dev/kvm cannot run
//! Linux (this project's PVM hosts). Test support only.
//!
//! QEMU's TCG emulates AMD's SVM (with nested paging), so a Debian kernel booted in QEMU TCG
//! with an emulated EPYC CPU loads kvm_amd and gets a /dev/kvm on which a stock Linux guest
//! runs. This module boots such a machine with an initramfs holding husk-vmm, husk's guest,
//! and this very test binary, and runs one test of the binary in there. Everything inside is
//! emulated, so it is slow (tens of seconds), but it is husk-vmm driving real KVM ioctls to
//! boot a real kernel, which no PVM host can offer.
//!
//! The nested host's kernel and KVM modules come from `kernel-config/fetch-nested-host.sh`
//! (`make guest` runs it).

mod initramfs;
mod retry;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use initramfs::build_initramfs;
pub use retry::{run_tests, TestsRun};

/// Where the emulated host prints `husk-nested: exit=<status>` once the inner test is done.
const EXIT_MARK: &str = "husk-nested: exit=";

/// The emulated host writes its uptime to COM2 this often...
pub(crate) const HEARTBEAT_EVERY_SECS: u32 = 2;
/// ...and counts as stopped (rather than running a hung test) when silent for longer.
const HEARTBEAT_STALE: Duration = Duration::from_secs(30);

pub struct NestedRun {
    /// Everything the nested host's serial console printed.
    pub console: String,
    /// The inner test's exit status, if the nested host got that far.
    pub exit: Option<i32>,
    pub elapsed: Duration,
    /// Set when the host was still running at its deadline and was killed.
    pub hang: Option<Hang>,
}

/// A host killed at its deadline, and what its heartbeat said about it.
#[derive(Clone, Copy, Debug)]
pub struct Hang {
    /// Time since the last heartbeat when the deadline came (None: no heartbeat at all).
    pub heartbeat_age: Option<Duration>,
}

impl Hang {
    /// The host itself stopped (its heartbeat went silent), rather than a test in a live host.
    pub fn host_stopped(&self) -> bool {
        self.heartbeat_age.is_none_or(|age| age > HEARTBEAT_STALE)
    }

    pub fn describe(&self) -> String {
        match self.heartbeat_age {
            None => "the emulated host never wrote a heartbeat".into(),
            Some(age) if self.host_stopped() => {
                format!("the emulated host's heartbeat stopped {age:.0?} before the deadline")
            }
            Some(age) => format!(
                "the emulated host was alive (heartbeat {age:.0?} before the deadline): a test hung"
            ),
        }
    }
}

/// The files of the nested host's kernel (see the module doc).
pub struct NestedHost {
    pub vmlinuz: PathBuf,
    /// Modules in load order.
    pub modules: Vec<PathBuf>,
}

impl NestedHost {
    pub fn load(dir: &Path) -> Result<Self, String> {
        let order = dir.join("modules.order");
        let text = std::fs::read_to_string(&order).map_err(|e| {
            format!(
                "{}: {e}; fetch the nested host kernel with `make nested-host` or \
                 kernel-config/fetch-nested-host.sh",
                order.display()
            )
        })?;
        let modules = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|m| dir.join("modules").join(format!("{}.ko", m.trim())))
            .collect::<Vec<_>>();
        let vmlinuz = dir.join("vmlinuz");
        for p in modules.iter().chain([&vmlinuz]) {
            if !p.is_file() {
                return Err(format!("{} missing", p.display()));
            }
        }
        Ok(Self { vmlinuz, modules })
    }
}

/// What goes into the nested host besides busybox and the modules.
pub struct Payload<'a> {
    pub husk_vmm: &'a Path,
    pub guest_kernel: &'a Path,
    pub guest_initrd: &'a Path,
    /// More files for `/guest/<name>`.
    pub extra_guest_files: &'a [(&'a str, &'a Path)],
    /// Environment for the test binary inside the nested host.
    pub test_env: &'a [(&'a str, &'a str)],
    /// Arguments for this test binary inside the nested host.
    pub test_args: &'a [&'a str],
}

/// Boots the nested host in QEMU TCG and runs this test binary there with `payload.test_args`.
/// A host still running at `deadline` is killed and is an error.
pub fn run(
    host: &NestedHost,
    payload: &Payload,
    work: &Path,
    deadline: Duration,
) -> Result<NestedRun, String> {
    let run = run_once(host, payload, work, deadline)?;
    match run.hang {
        Some(hang) => Err(format!(
            "nested host still running after {deadline:?}; killed ({})\n--- its console ---\n{}",
            hang.describe(),
            tail(&run.console)
        )),
        None => Ok(run),
    }
}

/// [`run`], with a host killed at its deadline given back as a run with [`NestedRun::hang`].
pub(crate) fn run_once(
    host: &NestedHost,
    payload: &Payload,
    work: &Path,
    deadline: Duration,
) -> Result<NestedRun, String> {
    let initramfs = work.join("nested-host.cpio");
    build_initramfs(host, payload, work, &initramfs)?;
    let console = work.join("nested-console.log");
    let heartbeat = work.join("nested-heartbeat.log");
    let qemu_log = work.join("nested-qemu.log");
    for f in [&console, &heartbeat] {
        let _ = std::fs::remove_file(f);
    }
    let qemu_stderr = std::fs::File::create(&qemu_log)
        .map_err(|e| format!("creating {}: {e}", qemu_log.display()))?;
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "q35", "-accel", "tcg", "-smp", "2", "-m", "1024"])
        // An AMD model: kvm_amd refuses other vendors. TCG lacks some of EPYC's features and
        // says so on stderr; SVM and nested paging are among those it has.
        .args(["-cpu", "EPYC,+svm"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        // COM2 carries the heartbeat, apart from the test output.
        .arg("-serial")
        .arg(format!("file:{}", heartbeat.display()))
        .arg("-kernel")
        .arg(&host.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        // loglevel=2: the emulated host's own kernel messages would cut into the test
        // output that is read back from the same console.
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=2"])
        .stdout(Stdio::null())
        // A file, not a pipe nobody reads: a pipe that filled would stop QEMU.
        .stderr(qemu_stderr)
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
    let mut hang = None;
    loop {
        match qemu.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > deadline => {
                // Read before the kill: the age that counts is the host's while it ran.
                hang = Some(Hang {
                    heartbeat_age: heartbeat_age(&heartbeat),
                });
                let _ = qemu.kill();
                let _ = qemu.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("waiting for QEMU: {e}")),
        }
    }
    let elapsed = started.elapsed();
    let mut console =
        String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    let qemu_said = std::fs::read_to_string(&qemu_log).unwrap_or_default();
    if !qemu_said.trim().is_empty() {
        console.push_str("\n--- qemu-system-x86_64 stderr ---\n");
        console.push_str(tail(&qemu_said));
    }
    let exit = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARK))
        .and_then(|s| s.trim().parse().ok());
    Ok(NestedRun {
        console,
        exit,
        elapsed,
        hang,
    })
}

/// How long ago the emulated host last wrote its heartbeat (None: it never did).
fn heartbeat_age(path: &Path) -> Option<Duration> {
    let meta = std::fs::metadata(path).ok().filter(|m| m.len() > 0)?;
    let written = meta.modified().ok()?;
    Some(
        SystemTime::now()
            .duration_since(written)
            .unwrap_or_default(),
    )
}

impl NestedRun {
    /// Ok when the inner test binary ran `expect_passed` tests, all passed, none skipped
    /// (inside, KVM can run anything, so a skip is a failure of the emulated host).
    pub fn check(&self, expect_passed: usize) -> Result<(), String> {
        let tail = tail(&self.console);
        if let Some(l) = self.console.lines().find(|l| l.contains("SKIPPED ")) {
            return Err(format!(
                "a test skipped inside the emulated SVM host: {l}\n--- its console ---\n{tail}"
            ));
        }
        if self.exit != Some(0) {
            return Err(format!(
                "the tests failed inside the emulated SVM host (exit {:?})\n--- its console ---\n{tail}",
                self.exit
            ));
        }
        // The nested kernel's messages share the console, so a test's own line can be
        // split; the summary is printed alone.
        let want = format!("test result: ok. {expect_passed} passed");
        if !self.console.contains(&want) {
            return Err(format!(
                "expected {want:?} from the emulated SVM host\n--- its console ---\n{tail}"
            ));
        }
        Ok(())
    }

    /// The console lines that start with one of `prefixes`.
    pub fn lines_starting_with<'a>(
        &'a self,
        prefixes: &'a [&str],
    ) -> impl Iterator<Item = &'a str> {
        self.console
            .lines()
            .map(str::trim_end)
            .filter(move |l| prefixes.iter().any(|p| l.starts_with(p)))
    }
}

pub fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(6000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
