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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_images::cpio::{self, Entry};

/// Where the emulated host prints `husk-nested: exit=<status>` once the inner test is done.
const EXIT_MARK: &str = "husk-nested: exit=";

pub struct NestedRun {
    /// Everything the nested host's serial console printed.
    pub console: String,
    /// The inner test's exit status, if the nested host got that far.
    pub exit: Option<i32>,
    pub elapsed: Duration,
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
pub fn run(
    host: &NestedHost,
    payload: &Payload,
    work: &Path,
    deadline: Duration,
) -> Result<NestedRun, String> {
    let initramfs = work.join("nested-host.cpio");
    build_initramfs(host, payload, work, &initramfs)?;
    let console = work.join("nested-console.log");
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "q35", "-accel", "tcg", "-smp", "2", "-m", "1024"])
        // An AMD model: kvm_amd refuses other vendors. TCG lacks some of EPYC's features and
        // says so on stderr; SVM and nested paging are among those it has.
        .args(["-cpu", "EPYC,+svm"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&host.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        // loglevel=2: the emulated host's own kernel messages would cut into the test
        // output that is read back from the same console.
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;
    let status = loop {
        match qemu.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() > deadline => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("waiting for QEMU: {e}")),
        }
    };
    let elapsed = started.elapsed();
    let console =
        String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    let exit = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARK))
        .and_then(|s| s.trim().parse().ok());
    if status.is_none() {
        return Err(format!(
            "nested host still running after {deadline:?}; killed\n--- its console ---\n{}",
            tail(&console)
        ));
    }
    Ok(NestedRun {
        console,
        exit,
        elapsed,
    })
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

/// What the emulated host does now and then: reset a guest with a triple fault in the middle
/// of its boot, without a kernel message (about 7% of husk-vmm boots in it; the same kernel
/// never did so under QEMU TCG), or hang as a whole (seen with QEMU-KVM inside it too). Only a
/// host with hardware virtualization can tell whether the resets are the emulator's or
/// husk-vmm's; until then they are retried, loudly, rather than hidden or fatal.
const SPURIOUS_RESET: &str = "guest reset (triple fault)";

/// The outcome of [`run_tests`]: the attempts made, the last one first.
pub struct TestsRun {
    pub attempts: Vec<NestedRun>,
    /// Why each retry was made.
    pub retries: Vec<String>,
}

/// Runs `tests` (exact names) of this test binary in the emulated host, `payload.test_args`
/// being ignored. A test that fails only with [`SPURIOUS_RESET`] in its output, or a run
/// whose host hangs, is run again, up to `retries` more times, and each retry is reported;
/// any other failure fails at once. Ok when every test passed in some attempt.
pub fn run_tests(
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
    let mut remaining: Vec<&str> = tests.to_vec();
    for attempt in 0..=retries {
        let mut args = vec!["--exact"];
        args.extend_from_slice(&remaining);
        let p = Payload {
            test_args: &args,
            ..*payload
        };
        let run = match run(host, &p, work, deadline) {
            Ok(r) => r,
            Err(e) if attempt < retries && e.contains("still running after") => {
                out.retries
                    .push(format!("the emulated host hung: {}", first_line(&e)));
                continue;
            }
            Err(e) => return Err(e),
        };
        if run.check(remaining.len()).is_ok() {
            out.attempts.insert(0, run);
            return Ok(out);
        }
        let spurious = spurious_failures(&run.console, &remaining);
        let Some(failed) = spurious.filter(|_| attempt < retries) else {
            let e = run.check(remaining.len()).err().unwrap_or_default();
            out.attempts.insert(0, run);
            let earlier = if out.retries.is_empty() {
                String::new()
            } else {
                format!("\n(after retries: {})", out.retries.join("; "))
            };
            return Err(format!("{e}{earlier}"));
        };
        out.retries.push(format!(
            "{} hit a spurious guest reset in the emulated host",
            failed.join(", ")
        ));
        remaining.retain(|t| failed.iter().any(|f| f == t));
        out.attempts.insert(0, run);
    }
    Err(format!("no attempt completed: {}", out.retries.join("; ")))
}

/// The failed tests when every failure may be the emulated host's own doing (its console
/// shows [`SPURIOUS_RESET`]), or None when some failure is of another kind.
fn spurious_failures(console: &str, remaining: &[&str]) -> Option<Vec<String>> {
    let failed = failed_tests(console);
    // Every failure must be accounted for: a name lost in the console's noise would
    // otherwise drop out of the retry unnoticed.
    let counted = failed_count(console);
    let ok = !failed.is_empty()
        && counted == Some(failed.len())
        && failed.iter().all(|t| remaining.contains(&t.as_str()))
        && console.contains(SPURIOUS_RESET)
        && !console.contains("SKIPPED ");
    ok.then_some(failed)
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

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

pub fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(6000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn build_initramfs(
    host: &NestedHost,
    payload: &Payload,
    work: &Path,
    out: &Path,
) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = |p: &str| Entry::Dir {
        path: p.into(),
        mode: 0o755,
    };
    let mut entries = vec![
        dir("bin"),
        dir("dev"),
        Entry::CharDev {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        dir("proc"),
        dir("sys"),
        dir("tmp"),
        dir("run"),
        dir("guest"),
        dir("modules"),
    ];
    entries.push(file(
        "bin/busybox",
        &read(Path::new("/bin/busybox"))?,
        0o755,
    ));
    // Every applet, so tests that run host tools (pgrep, ps, ...) find them.
    for applet in busybox_applets()? {
        entries.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    let mut libs = Vec::new();
    for (name, bin) in [("husk-vmm", payload.husk_vmm), ("husk-test", me.as_path())] {
        entries.push(file(&format!("bin/{name}"), &stripped(bin, work)?, 0o755));
        for lib in shared_libraries(bin)? {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    let mut lib_dirs: Vec<String> = Vec::new();
    for lib in &libs {
        let rel = lib
            .strip_prefix("/")
            .map_err(|_| format!("library path {} is not absolute", lib.display()))?;
        let mut parent = rel.parent();
        let mut new_dirs = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let s = p.to_string_lossy().into_owned();
            if !lib_dirs.contains(&s) {
                lib_dirs.push(s.clone());
                new_dirs.push(s);
            }
            parent = p.parent();
        }
        new_dirs.reverse();
        entries.extend(new_dirs.iter().map(|d| dir(d)));
        // Follow symlinks: the loader asks for the soname, the archive holds the file there.
        entries.push(file(&rel.to_string_lossy(), &read(lib)?, 0o755));
    }
    entries.push(file("guest/vmlinux", &read(payload.guest_kernel)?, 0o644));
    entries.push(file(
        "guest/initrd.img",
        &read(payload.guest_initrd)?,
        0o644,
    ));
    for (name, path) in payload.extra_guest_files {
        entries.push(file(&format!("guest/{name}"), &read(path)?, 0o644));
    }
    let env: String = payload
        .test_env
        .iter()
        .map(|(k, v)| format!("{k}={} ", shell_quote(v)))
        .collect();
    let mut insmods = String::new();
    for m in &host.modules {
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{}: no file name", m.display()))?;
        entries.push(file(&format!("modules/{name}"), &read(m)?, 0o644));
        insmods.push_str(&format!(
            "insmod /modules/{name} || echo \"husk-nested: insmod {name} failed\"\n"
        ));
    }
    let args = payload
        .test_args
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let init = format!(
        "#!/bin/sh\n\
         if [ \"$1\" != stage2 ]; then\n\
         mkdir /newroot\n\
         mount -t tmpfs -o size=95% newroot /newroot\n\
         for d in /*; do case $d in /dev|/proc|/sys|/newroot) ;; *) cp -a $d /newroot/ ;; esac; done\n\
         mkdir -p /newroot/dev /newroot/proc /newroot/sys\n\
         exec switch_root /newroot /init stage2\n\
         fi\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tmpfs run /run\n\
         {insmods}\
         echo \"husk-nested: $(busybox grep -c -w svm /proc/cpuinfo) vCPUs with svm\"\n\
         HUSK_GUEST_DIR=/guest HUSK_VMM_BIN=/bin/husk-vmm RUST_BACKTRACE=1 {env}\
         /bin/husk-test {args} --nocapture --test-threads=1\n\
         echo \"{EXIT_MARK}$?\"\n\
         poweroff -f\n"
    );
    // The tests run from a tmpfs, not from the initramfs itself: pivot_root(2), which
    // husk-vmm's jail uses, refuses to move the initial rootfs, as on any real host.
    entries.push(file("init", init.as_bytes(), 0o755));
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(out).map_err(|e| format!("creating {}: {e}", out.display()))?,
    );
    cpio::write_archive(&mut f, &entries).map_err(|e| format!("writing initramfs: {e}"))?;
    std::io::Write::flush(&mut f).map_err(|e| format!("writing initramfs: {e}"))?;
    Ok(())
}

fn busybox_applets() -> Result<Vec<String>, String> {
    let out = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .map_err(|e| format!("/bin/busybox --list: {e}"))?;
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(String::from)
        .collect();
    for needed in ["sh", "mount", "insmod", "poweroff", "grep"] {
        if !applets.iter().any(|a| a == needed) {
            return Err(format!("/bin/busybox has no {needed} applet"));
        }
    }
    applets.sort();
    applets.dedup();
    Ok(applets)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn file(path: &str, data: &[u8], mode: u32) -> Entry {
    Entry::File {
        path: path.into(),
        mode,
        data: data.to_vec(),
    }
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))
}

/// The binary without debug info when `strip` is there (a debug test binary is mostly
/// DWARF, which the emulated machine would unpack for nothing), else as it is.
fn stripped(bin: &Path, work: &Path) -> Result<Vec<u8>, String> {
    let name = bin
        .file_name()
        .ok_or_else(|| format!("{}: no file name", bin.display()))?;
    let out = work.join(name).with_extension("stripped");
    match Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => read(&out),
        _ => read(bin),
    }
}

/// The shared libraries `ldd` says the binary loads (none for a static binary).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| format!("running ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable"
        return Ok(Vec::new());
    }
    // Lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
    // "linux-vdso.so.1 (0x...)" (in the kernel, nothing to copy).
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_tests_come_from_the_last_failures_list() {
        let console = "\
running 3 tests
test a ... ok
test b ... FAILED

failures:

---- b stdout ----
thread 'b' panicked at x.rs:1:1:
boom

failures:
    b
    c

test result: FAILED. 1 passed; 2 failed; 0 ignored
";
        assert_eq!(
            failed_tests(console),
            vec!["b".to_string(), "c".to_string()]
        );
        assert!(failed_tests("test result: ok. 3 passed").is_empty());
    }

    #[test]
    fn only_failures_beside_a_spurious_reset_are_retried() {
        let failed = "failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed; 0 ignored";
        let reset = format!("husk-vmm: {SPURIOUS_RESET}\n{failed}");
        assert_eq!(
            spurious_failures(&reset, &["a", "b"]),
            Some(vec!["b".to_string()])
        );
        // A failure without the signature is a real one.
        assert_eq!(spurious_failures(failed, &["a", "b"]), None);
        // So is a skip (the emulated host could not run KVM guests at all).
        assert_eq!(
            spurious_failures(&format!("SKIPPED b: no kvm\n{reset}"), &["a", "b"]),
            None
        );
        // And a failure of a test that was not asked for.
        assert_eq!(spurious_failures(&reset, &["a"]), None);
        // And a list that lost a name (2 failed, 1 listed).
        let lost = reset.replace("1 passed; 1 failed", "0 passed; 2 failed");
        assert_eq!(spurious_failures(&lost, &["a", "b"]), None);
    }
}
