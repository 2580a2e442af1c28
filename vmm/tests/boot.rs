//! Full Linux boot: husk's guest kernel and initrd on husk-vmm, with the agent answering a
//! ttrpc Health call over the hybrid vsock, then powering the guest off (husk-vmm exits 0).
//!
//! `full_linux_boot_agent_answers` runs where KVM can run a stock guest: hardware VMX/SVM,
//! not a nested PVM /dev/kvm (whose instruction emulator cannot run Linux). Elsewhere it
//! prints `SKIPPED full_linux_boot_agent_answers: <reason>` and returns.
//!
//! `full_linux_boot_on_emulated_svm_host` runs that same test everywhere, inside a KVM host
//! that QEMU TCG emulates (an AMD CPU with SVM, Debian's kernel with kvm_amd): see
//! `husk_nested_svm`. Slow, but husk-vmm boots Linux on real KVM ioctls even on a PVM host.
//!
//! The guest comes from `$HUSK_GUEST_DIR` (default `<workspace>/target/guest`):
//! `vmlinux` (ELF with PVH note), `initrd.img` and `nested-host/` (`make guest`).
//! `$HUSK_VMM_BIN` overrides the husk-vmm binary.
//!
//!     cargo test -p husk-vmm --test boot -- --nocapture

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_nested_svm as nested_svm;
use husk_protocol::{agent, agent_ttrpc::AgentServiceClient, AGENT_VSOCK_PORT};
use ttrpc::r#async::{transport::Socket, Client};

const TEST: &str = "full_linux_boot_agent_answers";
const BZ_TEST: &str = "bzimage_boot_runs_init";
const BOOT_DEADLINE: Duration = Duration::from_secs(60);
/// The emulated host boots in ~5 s and the guest in it in ~3 s on a 2-core host; the rest is
/// headroom for a loaded CI machine.
const NESTED_DEADLINE: Duration = Duration::from_secs(150);

/// Why this host cannot run a stock Linux guest on KVM, if it cannot.
/// No hardware virtualization (or only PVM) is this host's nature, and the
/// emulated-host variants run the boot there; anything else is a broken set-up.
fn skip(test: &str, reason: &str) {
    if reason.starts_with("no vmx/svm") || reason.contains("kvm_pvm") {
        husk_skip::not_here(test, reason);
    } else {
        husk_skip::missing(test, reason);
    }
}

fn stock_guest_unsupported() -> Option<String> {
    let cpuinfo = match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(c) => c,
        Err(e) => return Some(format!("cannot read /proc/cpuinfo: {e}")),
    };
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Some("no vmx/svm in /proc/cpuinfo: no hardware virtualization".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "/dev/kvm is the nested PVM hypervisor (kvm_pvm), which cannot run a stock Linux \
             guest"
                .into(),
        );
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("cannot open /dev/kvm: {e}"));
    }
    None
}

fn nix_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn husk_vmm() -> PathBuf {
    std::env::var_os("HUSK_VMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_husk-vmm")))
}

/// The guest kernel and initrd in `dir`, which must be there.
fn guest_files(dir: &Path) -> (PathBuf, PathBuf) {
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initrd.img"));
    for p in [&kernel, &initrd] {
        assert!(
            p.exists(),
            "{} missing: build the guest (make guest) or set HUSK_GUEST_DIR",
            p.display()
        );
    }
    (kernel, initrd)
}

fn guest_dir() -> PathBuf {
    std::env::var_os("HUSK_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"))
}

/// Kills husk-vmm if the test fails half-way.
struct Vmm(Child);

impl Vmm {
    /// What husk-vmm logged, once it has ended.
    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}
impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `CONNECT 1024\n` until the agent listens (the device closes the stream before that).
/// Gives up early if husk-vmm ends.
fn connect_agent(uds: &Path, deadline: Instant, vmm: &mut Vmm) -> Result<UnixStream, String> {
    let mut last = String::from("never tried");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = vmm.0.try_wait() {
            return Err(format!("husk-vmm exited ({status}): {}", vmm.stderr()));
        }
        match try_connect(uds) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("agent never answered CONNECT: {last}"))
}

fn try_connect(uds: &Path) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    // Byte by byte: what follows the newline is ttrpc.
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => return Err("closed (agent not listening yet)".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 32 => line.push(b[0]),
            Ok(_) => return Err("reply too long".into()),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    if !reply.starts_with("OK ") {
        return Err(format!("bad reply {reply:?}"));
    }
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(s)
}

#[test]
fn full_linux_boot_agent_answers() {
    if let Some(reason) = stock_guest_unsupported() {
        skip(TEST, &reason);
        return;
    }
    let dir = guest_dir();
    let (kernel, initrd) = guest_files(&dir);
    let tmp = tempfile::tempdir().expect("tempdir");
    let uds = tmp.path().join("vsock.sock");
    let api = tmp.path().join("api.sock");
    let console = tmp.path().join("console.log");
    let started = Instant::now();
    let child = Command::new(husk_vmm())
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--vcpus", "2", "--memory", "256"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--api-sock")
        .arg(&api)
        .arg("--console-log")
        .arg(&console)
        // As the shim runs it: jailed (needs root, which KVM hosts give the tests).
        .args(nix_root().then_some("--jail"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn husk-vmm");
    let mut vmm = Vmm(child);
    let console_tail = || {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        let start = log.len().saturating_sub(3000);
        log.get(start..).unwrap_or("").to_string()
    };

    let deadline = started + BOOT_DEADLINE;
    while !uds.exists() && Instant::now() < deadline {
        if let Some(status) = vmm.0.try_wait().expect("wait") {
            panic!(
                "husk-vmm exited ({status}) before the guest ran: {}",
                vmm.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stream = match connect_agent(&uds, deadline, &mut vmm) {
        Ok(s) => s,
        Err(e) => panic!("{e}\n--- console ---\n{}", console_tail()),
    };
    println!(
        "{TEST}: agent reachable {:?} after start",
        started.elapsed()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        stream.set_nonblocking(true).expect("nonblocking");
        let stream = tokio::net::UnixStream::from_std(stream).expect("tokio stream");
        let client = AgentServiceClient::new(Client::new(Socket::new(stream)));
        let ctx = || ttrpc::context::with_timeout(10_000_000_000);
        client
            .health(ctx(), &agent::HealthRequest::new())
            .await
            .unwrap_or_else(|e| panic!("Health: {e}\n--- console ---\n{}", console_tail()));
        // The agent powers the guest off; with reboot=k that is an i8042 reset, which ends
        // husk-vmm with status 0.
        let _ = client.shutdown(ctx(), &agent::ShutdownRequest::new()).await;
    });
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        log.contains("husk-agent: ready on vsock port 1024"),
        "agent banner missing\n--- console ---\n{}",
        console_tail()
    );

    let exit_deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = vmm.0.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > exit_deadline {
            panic!(
                "husk-vmm still running 20 s after the agent's Shutdown\n--- console ---\n{}",
                console_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = vmm.stderr();
    assert!(status.success(), "husk-vmm exit {status}: {stderr}");
    // A power-off is told apart from a triple fault (the emulated host's retries rely on it).
    assert!(
        stderr.contains("guest powered off (i8042 reset)") && !stderr.contains("triple fault"),
        "the agent's power-off must end the VM through the i8042: {stderr}"
    );
    assert!(!uds.exists() && !api.exists(), "sockets removed at exit");
    println!(
        "{TEST}: booted, answered Health and powered off in {:?}",
        started.elapsed()
    );
}

#[test]
fn full_linux_boot_on_emulated_svm_host() {
    const NAME: &str = "full_linux_boot_on_emulated_svm_host";
    let dir = guest_dir();
    let (kernel, initrd) = guest_files(&dir);
    let host =
        nested_svm::NestedHost::load(&dir.join("nested-host")).unwrap_or_else(|e| panic!("{e}"));
    let vmm = husk_vmm();
    let tmp = tempfile::tempdir().expect("tempdir");
    let payload = nested_svm::Payload {
        husk_vmm: &vmm,
        guest_kernel: &kernel,
        guest_initrd: &initrd,
        extra_guest_files: &[("bzImage", &host.vmlinuz)],
        test_env: &[("HUSK_BZIMAGE", "/guest/bzImage")],
        test_args: &[],
    };
    // Retried only after the emulated host's own spurious guest resets (see run_tests).
    let run = nested_svm::run_tests(
        NAME,
        &host,
        &payload,
        tmp.path(),
        &[TEST, BZ_TEST],
        NESTED_DEADLINE,
        2,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let run = run.attempts.first().expect("an attempt");
    for line in run.lines_starting_with(&[TEST, BZ_TEST, "test ", "husk-nested:"]) {
        println!("{NAME}: inside: {line}");
    }
    println!(
        "{NAME}: emulated host booted, ran {TEST} and {BZ_TEST}, powered off in {:?}",
        run.elapsed
    );
}

/// The bzImage path of the loader (Linux boot protocol, 64-bit entry, setup header limits on
/// the initrd): a distribution kernel, `$HUSK_BZIMAGE` (default: the nested host's Debian
/// kernel), with husk's initrd. That kernel has no built-in virtio-mmio or vsock, so the agent
/// cannot serve; the test asks only that the kernel boots, runs the agent as /init, and that
/// the agent's exit ends husk-vmm cleanly (panic=-1, reboot=k: an i8042 reset, status 0).
#[test]
fn bzimage_boot_runs_init() {
    if let Some(reason) = stock_guest_unsupported() {
        skip(BZ_TEST, &reason);
        return;
    }
    let bzimage = std::env::var_os("HUSK_BZIMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| guest_dir().join("nested-host/vmlinuz"));
    let initrd = guest_dir().join("initrd.img");
    for p in [&bzimage, &initrd] {
        assert!(p.exists(), "{} missing: make guest", p.display());
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let console = tmp.path().join("console.log");
    let started = Instant::now();
    let child = Command::new(husk_vmm())
        .arg("run")
        .arg("--kernel")
        .arg(&bzimage)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--vcpus", "1", "--memory", "256"])
        .arg("--vsock-uds")
        .arg(tmp.path().join("vsock.sock"))
        .arg("--console-log")
        .arg(&console)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn husk-vmm");
    let mut vmm = Vmm(child);
    let deadline = started + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = vmm.0.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            panic!(
                "bzImage guest still running after 120 s\n--- console ---\n{}",
                nested_svm::tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = vmm.stderr();
    let tail = nested_svm::tail(&log);
    assert!(
        status.success(),
        "husk-vmm exit {status}: {stderr}\n--- console ---\n{tail}"
    );
    for want in ["Linux version ", "Run /init as init process", "husk-agent"] {
        assert!(
            log.contains(want),
            "console lacks {want:?}; husk-vmm: {stderr}\n--- console ---\n{tail}"
        );
    }
    let version = log
        .lines()
        .find_map(|l| l.split_once("Linux version ").map(|(_, v)| v))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("?");
    println!(
        "{BZ_TEST}: bzImage {version} booted, ran the agent and ended husk-vmm in {:?}",
        started.elapsed()
    );
}
