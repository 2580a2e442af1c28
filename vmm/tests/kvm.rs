//! KVM tests with small guest programs the tests generate. They run on any /dev/kvm,
//! including nested PVM hosts where a stock Linux guest cannot boot.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use husk_vmm::builder::{BootSource, VmConfig, VmExit, Vmm};
use husk_vmm::devices::virtio::transport::mmio::*;
use vm_memory::{Bytes, GuestAddress};

use common::{elf_for, Asm};

const LOAD_ADDR: u64 = 0x10_0000;

fn config(code: Vec<u8>, dir: &Path) -> VmConfig {
    let mut cfg = VmConfig::new(BootSource::Program {
        code,
        addr: LOAD_ADDR,
    });
    cfg.memory_mib = 64;
    cfg.console_log = Some(dir.join("console.log"));
    // The filter would stay on the test thread after run(); the binary test covers seccomp.
    cfg.seccomp = false;
    cfg
}

/// Runs the VM with a watchdog so a broken guest fails the test instead of hanging it.
fn run_with_deadline(vmm: &mut Vmm, secs: u64) -> VmExit {
    let exit = vmm.exit_notifier();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(secs)).is_err() {
            exit.notify(VmExit::Error("test watchdog: guest did not finish".into()));
        }
    });
    let res = vmm.run().expect("run");
    let _ = tx.send(());
    let _ = watchdog.join();
    res
}

#[test]
fn long_mode_program_writes_serial_and_resets() {
    require_kvm!("long_mode_program_writes_serial_and_resets");
    let dir = tempfile::tempdir().expect("tempdir");
    let code = Asm::new()
        .serial_write(b"hello from long mode\n")
        .i8042_reset()
        .build();
    let mut vmm = Vmm::build(config(code, dir.path())).expect("build");
    let exit = run_with_deadline(&mut vmm, 30);
    assert_eq!(exit, VmExit::PowerOff("i8042 reset".into()));
    let log = std::fs::read_to_string(dir.path().join("console.log")).expect("log");
    assert_eq!(log, "hello from long mode\n");
}

#[test]
fn triple_fault_ends_the_vm_cleanly() {
    require_kvm!("triple_fault_ends_the_vm_cleanly");
    let dir = tempfile::tempdir().expect("tempdir");
    let code = Asm::new().serial_write(b"x").ud2().build();
    let mut vmm = Vmm::build(config(code, dir.path())).expect("build");
    let exit = run_with_deadline(&mut vmm, 30);
    assert_eq!(exit, VmExit::Reset("triple fault".into()));
    assert!(exit.is_clean());
}

#[test]
fn several_vcpus_boot_processor_runs() {
    require_kvm!("several_vcpus_boot_processor_runs");
    let dir = tempfile::tempdir().expect("tempdir");
    let code = Asm::new().serial_write(b"bsp\n").i8042_reset().build();
    let mut cfg = config(code, dir.path());
    cfg.vcpus = 4;
    let mut vmm = Vmm::build(cfg).expect("build");
    // The MP table lists all four processors.
    let mut sig = [0u8; 4];
    vmm.memory()
        .read_slice(&mut sig, GuestAddress(0x9_fc00))
        .expect("read");
    assert_eq!(&sig, b"_MP_");
    let exit = run_with_deadline(&mut vmm, 30);
    assert_eq!(exit, VmExit::PowerOff("i8042 reset".into()));
    let log = std::fs::read_to_string(dir.path().join("console.log")).expect("log");
    assert_eq!(log, "bsp\n");
}

/// The guest program is the virtio driver: it negotiates features with virtio-rng over its
/// MMIO registers, sets up a queue the test laid out in guest memory, notifies (through the
/// ioeventfd), waits for the used ring, and reports the interrupt status on the console.
#[test]
fn guest_drives_virtio_mmio_rng_queue() {
    require_kvm!("guest_drives_virtio_mmio_rng_queue");
    let dir = tempfile::tempdir().expect("tempdir");
    const DESC: u64 = 0x20_0000;
    const AVAIL: u64 = 0x20_1000;
    const USED: u64 = 0x20_2000;
    const BUF: u64 = 0x30_0000;
    let base = VIRTIO_MMIO_BASE;
    let mut asm = Asm::new();
    asm.mov_edi(base)
        .load32(MAGIC_VALUE as u32)
        .b_check_magic()
        .store32(STATUS as u32, 1)
        .store32(STATUS as u32, 3)
        .store32(DRIVER_FEATURES_SEL as u32, 1)
        .store32(DRIVER_FEATURES as u32, 1)
        .store32(STATUS as u32, 0xb)
        .load32(STATUS as u32)
        .serial_al(0) // 0x0b + 0 = '\x0b': checked below as a raw byte
        .store32(QUEUE_SEL as u32, 0)
        .store32(QUEUE_NUM as u32, 16)
        .store32(QUEUE_DESC_LOW as u32, DESC as u32)
        .store32(QUEUE_DRIVER_LOW as u32, AVAIL as u32)
        .store32(QUEUE_DEVICE_LOW as u32, USED as u32)
        .store32(QUEUE_READY as u32, 1)
        .store32(STATUS as u32, 0xf)
        .store32(QUEUE_NOTIFY as u32, 0)
        .mov_edi(USED as u32)
        .wait_nonzero16(2, 5_000_000)
        .mov_edi(base)
        .load32(INTERRUPT_STATUS as u32)
        .serial_al(b'0')
        .serial_write(b"\n")
        .i8042_reset();
    let mut cfg = config(asm.build(), dir.path());
    cfg.rng = true;
    let mut vmm = Vmm::build(cfg).expect("build");
    let mem = vmm.memory().clone();
    // One 64-byte device-writable descriptor, published in the avail ring.
    mem.write_obj(BUF, GuestAddress(DESC)).expect("desc addr");
    mem.write_obj(64u32, GuestAddress(DESC + 8))
        .expect("desc len");
    mem.write_obj(2u16, GuestAddress(DESC + 12))
        .expect("desc flags: WRITE");
    mem.write_obj(0u16, GuestAddress(AVAIL + 4))
        .expect("avail ring[0]");
    mem.write_obj(1u16, GuestAddress(AVAIL + 2))
        .expect("avail idx");

    let exit = run_with_deadline(&mut vmm, 60);
    assert_eq!(exit, VmExit::PowerOff("i8042 reset".into()));
    let log = std::fs::read(dir.path().join("console.log")).expect("log");
    assert_eq!(
        log, b"\x0b1\n",
        "FEATURES_OK accepted, then INT_VRING after the queue ran"
    );
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
    let used_len: u32 = mem.read_obj(GuestAddress(USED + 8)).expect("used len");
    assert_eq!((used_idx, used_len), (1, 64));
    let mut buf = [0u8; 64];
    mem.read_slice(&mut buf, GuestAddress(BUF)).expect("buf");
    assert_ne!(buf, [0u8; 64]);
    let t = vmm.transport(0).expect("transport");
    let t = t.lock().expect("lock");
    assert_eq!(t.device_type(), 4);
    assert!(t.is_active());
}

const VIRTIO_MMIO_BASE: u32 = 0xd000_0000;

trait CheckMagic {
    fn b_check_magic(&mut self) -> &mut Self;
}
impl CheckMagic for Asm {
    /// Nothing to branch on in a test program: the magic is checked on the host side by the
    /// transport tests; here we only read it so the register path is exercised.
    fn b_check_magic(&mut self) -> &mut Self {
        self
    }
}

#[test]
fn api_state_pause_resume_shutdown() {
    require_kvm!("api_state_pause_resume_shutdown");
    let dir = tempfile::tempdir().expect("tempdir");
    let api = dir.path().join("api.sock");
    let code = Asm::new().serial_write(b"up\n").halt_forever().build();
    let mut cfg = config(code, dir.path());
    cfg.api_sock = Some(api.clone());
    cfg.vcpus = 2;
    let mut vmm = Vmm::build(cfg).expect("build");
    let client = thread::spawn(move || {
        let stream = UnixStream::connect(&api).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut w = stream;
        let mut ask = |req: &str| {
            w.write_all(req.as_bytes()).expect("write");
            w.write_all(b"\n").expect("write");
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            line
        };
        let answers = vec![
            ask(r#"{"action":"state"}"#),
            ask(r#"{"action":"pause"}"#),
            ask(r#"{"action":"state"}"#),
            ask(r#"{"action":"resume"}"#),
            ask(r#"{"action":"fly"}"#),
            ask(r#"{"action":"shutdown"}"#),
        ];
        answers
    });
    let exit = run_with_deadline(&mut vmm, 60);
    let answers = client.join().expect("client");
    assert_eq!(exit, VmExit::Stopped("API shutdown".into()));
    assert_eq!(answers[0].trim(), r#"{"ok":true,"state":"running"}"#);
    assert_eq!(answers[1].trim(), r#"{"ok":true,"state":"paused"}"#);
    assert_eq!(answers[2].trim(), r#"{"ok":true,"state":"paused"}"#);
    assert_eq!(answers[3].trim(), r#"{"ok":true,"state":"running"}"#);
    assert!(answers[4].contains("unknown action"), "{}", answers[4]);
    assert_eq!(answers[5].trim(), r#"{"ok":true,"state":"stopping"}"#);
    assert!(!dir.path().join("api.sock").exists(), "API socket removed");
}

/// The binary end to end, seccomp on: an ELF "kernel" that prints and resets.
#[test]
fn binary_runs_elf_under_seccomp_and_exits_zero() {
    require_kvm!("binary_runs_elf_under_seccomp_and_exits_zero");
    let dir = tempfile::tempdir().expect("tempdir");
    let code = Asm::new().serial_write(b"elf ok\n").i8042_reset().build();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, elf_for(&code, 0x20_0000)).expect("write kernel");
    let log = dir.path().join("console.log");
    let uds = dir.path().join("vsock.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--vcpus")
        .arg("2")
        .arg("--memory")
        .arg("64")
        .arg("--console-log")
        .arg(&log)
        .arg("--vsock-uds")
        .arg(&uds)
        .output()
        .expect("spawn husk-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "husk-vmm failed: {stderr}");
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "elf ok\n");
    assert!(!uds.exists(), "vsock socket removed at exit");
}

/// A guest that crashes (an undefined instruction with no IDT: a triple fault) under seccomp,
/// jailed when root: husk-vmm ends cleanly and logs where the guest was.
#[test]
fn binary_logs_where_a_guest_triple_faulted_jailed_under_seccomp() {
    require_kvm!("binary_logs_where_a_guest_triple_faulted_jailed_under_seccomp");
    let dir = tempfile::tempdir().expect("tempdir");
    let code = Asm::new().serial_write(b"crash\n").ud2().build();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, elf_for(&code, 0x20_0000)).expect("write kernel");
    let log = dir.path().join("console.log");
    let uds = dir.path().join("vsock.sock");
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let out = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64", "--console-log"])
        .arg(&log)
        .arg("--vsock-uds")
        .arg(&uds)
        .args(root.then_some("--jail"))
        .output()
        .expect("spawn husk-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "husk-vmm failed: {stderr}");
    assert!(
        stderr.contains("guest reset (triple fault)") && stderr.contains("rip=0x"),
        "{stderr}"
    );
    if root {
        assert!(stderr.contains("entered the jail"), "{stderr}");
    } else {
        println!("binary_logs_where...: not root, ran without --jail");
    }
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "crash\n");
    assert!(!uds.exists(), "vsock socket removed at exit");
}

/// A guest that floods its console, jailed and under seccomp: the log never grows past
/// --console-log-max-bytes and keeps the newest output.
#[test]
fn binary_caps_the_console_log_of_a_flooding_guest() {
    require_kvm!("binary_caps_the_console_log_of_a_flooding_guest");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut flood = Vec::new();
    for i in 0..400 {
        flood.extend_from_slice(
            format!("flood line {i:04} .............................\n").as_bytes(),
        );
    }
    flood.extend_from_slice(b"LAST LINE\n");
    let code = Asm::new().serial_write(&flood).i8042_reset().build();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, elf_for(&code, 0x20_0000)).expect("write kernel");
    let log = dir.path().join("console.log");
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let out = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args([
            "--memory",
            "64",
            "--console-log-max-bytes",
            "4096",
            "--console-log",
        ])
        .arg(&log)
        .args(["--max-open-files", "64"])
        // The jail keeps the vsock socket's directory visible: it needs one.
        .arg("--vsock-uds")
        .arg(dir.path().join("vsock.sock"))
        .args(root.then_some("--jail"))
        .output()
        .expect("spawn husk-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "husk-vmm failed: {stderr}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(flood.len() > 4 * 4096);
    assert!(text.len() <= 4096, "{} bytes", text.len());
    assert!(
        text.starts_with("[log reached its cap of 4096 bytes"),
        "{text:.100}"
    );
    assert!(text.ends_with("LAST LINE\n"), "{text}");
}

/// Spawns husk-vmm with `args`, waits for `ready` to appear, and returns the "Max open
/// files" soft and hard limits from its /proc/<pid>/limits (the child is killed after).
fn open_file_limits(args: &[&std::ffi::OsStr], ready: &Path) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .args(args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn husk-vmm");
    let limits = format!("/proc/{}/limits", child.id());
    let mut line = String::new();
    for _ in 0..2000 {
        if ready.exists() {
            line = std::fs::read_to_string(&limits)
                .expect("limits")
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .unwrap_or_default()
                .to_string();
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("husk-vmm {args:?} exited early: {status}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    // "Max open files  <soft>  <hard>  files"
    line.split_whitespace()
        .skip(3)
        .take(2)
        .map(str::to_string)
        .collect()
}

/// Every subcommand caps its open files (--max-open-files, soft and hard): what a guest can
/// make it hold (virtio-fs inodes it never forgets, vsock connections).
#[test]
fn backends_cap_their_open_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let vhost = dir.path().join("vsock.vhost");
    let uds = dir.path().join("vsock.sock");
    let vsock = open_file_limits(
        &[
            os("vhost-user-vsock"),
            os("--socket"),
            vhost.as_os_str(),
            os("--uds"),
            uds.as_os_str(),
            os("--max-open-files"),
            os("77"),
        ],
        &vhost,
    );
    assert_eq!(vsock, ["77", "77"], "vhost-user-vsock");

    let share = dir.path().join("share");
    std::fs::create_dir(&share).expect("share dir");
    let fs_sock = dir.path().join("fs.vhost");
    let fs = open_file_limits(
        &[
            os("vhost-user-fs"),
            os("--socket"),
            fs_sock.as_os_str(),
            os("--shared-dir"),
            share.as_os_str(),
            os("--tag"),
            os("t"),
        ],
        &fs_sock,
    );
    // The default, unless the hard limit it inherits from us is lower still.
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) },
        0
    );
    let want = husk_vmm::limits::DEFAULT_MAX_OPEN_FILES_FS
        .min(ours.rlim_max)
        .to_string();
    assert_eq!(fs, [want.clone(), want], "vhost-user-fs (the default)");
}

/// Spins until the TSC has advanced by `ticks` (a pause measured in time, not in loop
/// iterations, which some nested hosts run very slowly).
fn spin_tsc(asm: &mut Asm, ticks: u32) {
    assert!(ticks < 1 << 31, "cmp rax, imm32 sign-extends");
    let read_tsc: &[u8] = &[
        0x0f, 0x31, // rdtsc
        0x48, 0xc1, 0xe2, 0x20, // shl rdx, 32
        0x48, 0x09, 0xd0, // or rax, rdx
    ];
    asm.code.extend_from_slice(read_tsc);
    asm.code.extend_from_slice(&[0x48, 0x89, 0xc6]); // mov rsi, rax
    let top = asm.code.len();
    asm.code.extend_from_slice(read_tsc);
    asm.code.extend_from_slice(&[0x48, 0x29, 0xf0]); // sub rax, rsi
    asm.code.extend_from_slice(&[0x48, 0x3d]); // cmp rax, imm32
    asm.code.extend_from_slice(&ticks.to_le_bytes());
    let rel = top as isize - (asm.code.len() as isize + 2);
    asm.code.extend_from_slice(&[0x72, rel as i8 as u8]); // jb top
}

/// `husk-vmm run` sets RLIMIT_NOFILE before it builds the VM.
#[test]
fn binary_run_caps_its_open_files() {
    require_kvm!("binary_run_caps_its_open_files");
    let dir = tempfile::tempdir().expect("tempdir");
    let code = Asm::new().serial_write(b"idle\n").halt_forever().build();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, elf_for(&code, 0x20_0000)).expect("write kernel");
    let api = dir.path().join("api.sock");
    let os = std::ffi::OsStr::new;
    let got = open_file_limits(
        &[
            os("run"),
            os("--kernel"),
            kernel.as_os_str(),
            os("--memory"),
            os("64"),
            os("--api-sock"),
            api.as_os_str(),
            os("--max-open-files"),
            os("99"),
        ],
        &api,
    );
    assert_eq!(got, ["99", "99"]);
}

/// CPU time (user + system, in clock ticks) a process has used: fields 14 and 15 of
/// /proc/<pid>/stat, counted after the command name (which may hold spaces).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat
        .iter()
        .rposition(|&b| b == b')')
        .expect("stat has the command in parentheses");
    let fields: Vec<u64> = String::from_utf8_lossy(&stat[after + 2..])
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    fields[11] + fields[12]
}

/// Host clients that pile up past husk-vmm's fd limit (a guest's vsock connections and
/// file-server inodes can use the fds up; here the clients do) must not make a listener spin:
/// accept fails with EMFILE on a level-triggered fd that stays readable. The pending clients
/// are shed (accepted and closed) and husk-vmm sits idle; the API still answers once fds
/// come back.
#[test]
fn binary_at_its_fd_limit_sheds_clients_and_stays_idle() {
    require_kvm!("binary_at_its_fd_limit_sheds_clients_and_stays_idle");
    let dir = tempfile::tempdir().expect("tempdir");
    let code = Asm::new().serial_write(b"idle\n").halt_forever().build();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, elf_for(&code, 0x20_0000)).expect("write kernel");
    let api = dir.path().join("api.sock");
    let uds = dir.path().join("vsock.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64", "--max-open-files", "48"])
        .arg("--api-sock")
        .arg(&api)
        .arg("--vsock-uds")
        .arg(&uds)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn husk-vmm");
    for _ in 0..2000 {
        if api.exists() && uds.exists() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    // More clients than fds, fewer than a listen backlog holds (a full backlog would block
    // connect). Handshakes that never send CONNECT hold an fd each until they time out.
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(UnixStream::connect(&uds).expect("connect to the vsock socket"));
    }
    for _ in 0..30 {
        clients.push(UnixStream::connect(&api).expect("connect to the API socket"));
    }
    thread::sleep(Duration::from_millis(500));
    let pid = child.id();
    let (t0, c0) = (std::time::Instant::now(), cpu_ticks(pid));
    thread::sleep(Duration::from_secs(2));
    let (secs, used) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid) - c0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = used as f64 / hz / secs;
    assert!(
        child.try_wait().expect("wait").is_none(),
        "husk-vmm exited at its fd limit"
    );
    drop(clients);
    thread::sleep(Duration::from_millis(200));
    let mut api_conn = UnixStream::connect(&api).expect("API after the clients left");
    api_conn
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    api_conn
        .write_all(b"{\"action\":\"state\"}\n")
        .expect("write");
    let mut answer = String::new();
    let _ = BufReader::new(&api_conn).read_line(&mut answer);
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "husk-vmm used {:.1}% of a CPU for {secs:.1} s at its fd limit",
        share * 100.0
    );
    assert!(
        share < 0.2,
        "husk-vmm spun at its fd limit: {:.0}% of a CPU",
        share * 100.0
    );
    assert!(
        !answer.is_empty(),
        "the API did not answer once fds came back"
    );
}

/// A guest that makes husk-vmm log the same complaint thousands of times, under seccomp: its
/// own lines (a queue register written before FEATURES_OK) and a dependency's (virtio-queue's
/// "invalid size", through the log bridge) come out at most a burst and a few a second, with
/// the count of the rest.
#[test]
fn binary_rate_limits_the_log_lines_a_guest_triggers() {
    require_kvm!("binary_rate_limits_the_log_lines_a_guest_triggers");
    const TIMES: usize = 2000;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut asm = Asm::new();
    // virtio-rng is the only device: window 0.
    asm.mov_edi(VIRTIO_MMIO_BASE)
        .store32(STATUS as u32, 1)
        .store32(STATUS as u32, 3)
        .store32(QUEUE_SEL as u32, 0);
    for _ in 0..TIMES {
        // Out of order (no FEATURES_OK yet): husk-vmm's own warning.
        asm.store32(QUEUE_NUM as u32, 16);
    }
    asm.store32(DRIVER_FEATURES_SEL as u32, 1)
        .store32(DRIVER_FEATURES as u32, 1)
        .store32(STATUS as u32, 0xb);
    for _ in 0..TIMES {
        // Not a power of two: virtio-queue's error, a `log` record.
        asm.store32(QUEUE_NUM as u32, 3);
    }
    // A pause (a billion TSC ticks: 0.2 to 1 s), then each once more after a device reset:
    // a token is back, and the line says how many were held back.
    spin_tsc(&mut asm, 1_000_000_000);
    asm.store32(STATUS as u32, 0)
        .store32(STATUS as u32, 1)
        .store32(STATUS as u32, 3)
        .store32(QUEUE_SEL as u32, 0)
        .store32(QUEUE_NUM as u32, 16)
        .store32(DRIVER_FEATURES_SEL as u32, 1)
        .store32(DRIVER_FEATURES as u32, 1)
        .store32(STATUS as u32, 0xb)
        .store32(QUEUE_NUM as u32, 3);
    asm.serial_write(b"done\n").i8042_reset();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, elf_for(&asm.build(), 0x20_0000)).expect("write kernel");
    let log = dir.path().join("console.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .env("RUST_LOG", "info")
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64", "--console-log"])
        .arg(&log)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn husk-vmm");
    let mut pipe = child.stderr.take().expect("stderr");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().expect("stderr reader");
    let Some(status) = status else {
        panic!("the guest did not finish in 60 s: {stderr}");
    };
    assert!(status.success(), "husk-vmm failed: {stderr}");
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "done\n");
    // The number right after `key` in a line, if there is one.
    let number_after = |line: &str, key: &str| -> Option<usize> {
        let rest = line.split(key).nth(1)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    // husk-vmm's own line: shown, or counted in `suppressed=` on the next one shown.
    let own: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("queue register written out of order"))
        .collect();
    let own_held: usize = own
        .iter()
        .filter_map(|l| number_after(l, "suppressed="))
        .sum();
    // virtio-queue's: shown, or counted in a line of its own before the next one shown.
    let dep = stderr
        .lines()
        .filter(|l| l.contains("virtio queue with invalid size: 3"))
        .count();
    let dep_held: usize = stderr
        .lines()
        .filter(|l| l.contains("earlier lines from") && l.contains("virtio-queue"))
        .filter_map(|l| number_after(l, "virtio_queue::queue: "))
        .sum();
    // A burst of 20, a few more if the guest was slow, and the one after the pause.
    assert!(
        (21..=60).contains(&own.len()),
        "{} own lines: {stderr}",
        own.len()
    );
    assert!((21..=60).contains(&dep), "{dep} dependency lines: {stderr}");
    assert!(stderr.lines().count() < 200, "{stderr}");
    // Every one of the TIMES + 1 is either shown or counted: the last comes after the pause.
    assert_eq!(own.len() + own_held, TIMES + 1, "own: {stderr}");
    assert_eq!(dep + dep_held, TIMES + 1, "virtio-queue: {stderr}");
}

#[test]
fn binary_names_the_bad_argument() {
    let out = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .args(["run", "--kernel", "/nonexistent/k", "--memory", "64"])
        .output()
        .expect("spawn husk-vmm");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--kernel /nonexistent/k"), "{stderr}");
}

/// The binary under seccomp with the event loop's host-side paths exercised: a host client
/// connects to the hybrid vsock socket and sends CONNECT (the muxer accepts, reads and
/// queues the request for a guest that never reads it), the API answers, and `shutdown`
/// ends husk-vmm with status 0 and its sockets removed.
#[test]
fn binary_vsock_and_api_under_seccomp() {
    require_kvm!("binary_vsock_and_api_under_seccomp");
    let dir = tempfile::tempdir().expect("tempdir");
    let code = Asm::new().serial_write(b"idle\n").halt_forever().build();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, elf_for(&code, 0x20_0000)).expect("write kernel");
    let uds = dir.path().join("vsock.sock");
    let api = dir.path().join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--api-sock")
        .arg(&api)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn husk-vmm");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !api.exists() && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let mut v = UnixStream::connect(&uds).expect("vsock connect");
    v.write_all(b"CONNECT 1024\n").expect("CONNECT");
    thread::sleep(Duration::from_millis(200));
    let s = UnixStream::connect(&api).expect("api connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut line = String::new();
    w.write_all(b"{\"action\":\"state\"}\n").expect("write");
    r.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), r#"{"ok":true,"state":"running"}"#);
    w.write_all(b"{\"action\":\"shutdown\"}\n").expect("write");
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert!(status.success(), "husk-vmm: {status}: {stderr}");
    assert!(!uds.exists() && !api.exists(), "sockets removed");
}
