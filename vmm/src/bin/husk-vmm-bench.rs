//! husk-vmm start-up bench: start to first KVM_RUN (CPU and wall time) and the VMM's resident
//! memory without guest memory, printed as `name: value unit` lines next to Firecracker's
//! published bounds.
//!
//! It runs the real `husk-vmm run` (found next to this binary, or at `$HUSK_VMM`) with the
//! devices a pod VM has (vsock, rng, API socket, serial log, seccomp) and a tiny guest: a
//! 64-bit ELF "kernel" that either resets at once (timing runs) or halts (RSS run). Use a
//! release build: `cargo run --release -p husk-vmm --bin husk-vmm-bench`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

const RUNS: usize = 15;
const GUEST_MIB: u64 = 128;
/// Firecracker's published bounds (its SPECIFICATION.md): API ready within 8 CPU-ms, VMM
/// memory overhead at most 5 MiB.
const FC_CPU_MS: f64 = 8.0;
const FC_OVERHEAD_MIB: f64 = 5.0;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// A 64-bit ELF with one PT_LOAD of `code` at 2 MiB.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let paddr: u64 = 0x20_0000;
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    out.extend_from_slice(&[0; 8]);
    for v in [2u16, 62] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&1u32.to_le_bytes());
    for v in [paddr, 64, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&5u32.to_le_bytes());
    let len = code.len() as u64;
    for v in [120u64, paddr, paddr, len, len, 0x1000] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(code);
    out
}

fn husk_vmm() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HUSK_VMM") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().context("cannot find this executable")?;
    let p = me.with_file_name("husk-vmm");
    if !p.exists() {
        bail!("{} not found: build husk-vmm or set HUSK_VMM", p.display());
    }
    Ok(p)
}

struct Sample {
    wall_us: u64,
    cpu_us: u64,
}

/// A started husk-vmm, its boot-timer sample and its guest memory host ranges.
type Started = (std::process::Child, Sample, Vec<(u64, u64)>);

/// Starts husk-vmm and reads stderr until the boot-timer line. Returns the child, the
/// sample and the guest memory host ranges.
fn start(vmm: &PathBuf, kernel: &PathBuf, dir: &std::path::Path, run: usize) -> Result<Started> {
    let t0 = monotonic_ns();
    let mut child = Command::new(vmm)
        .env("HUSK_BOOT_T0_NS", t0.to_string())
        .env("RUST_LOG", "warn")
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", &GUEST_MIB.to_string(), "--boot-timer"])
        .arg("--vsock-uds")
        .arg(dir.join(format!("v{run}.sock")))
        .arg("--api-sock")
        .arg(dir.join(format!("a{run}.sock")))
        .arg("--console-log")
        .arg(dir.join("console.log"))
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", vmm.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut ranges = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading husk-vmm stderr")?;
        if let Some(r) = line.strip_prefix("husk-vmm: boot-timer: guest memory ") {
            let (a, b) = r.split_once('-').context("bad range")?;
            let p = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16);
            ranges.push((p(a)?, p(b)?));
        } else if let Some(r) = line.strip_prefix("husk-vmm: boot-timer: first KVM_RUN ") {
            let mut wall_us = 0;
            let mut cpu_us = 0;
            for kv in r.split_whitespace() {
                match kv.split_once('=') {
                    Some(("wall_us", v)) => wall_us = v.parse()?,
                    Some(("cpu_us", v)) => cpu_us = v.parse()?,
                    _ => {}
                }
            }
            return Ok((child, Sample { wall_us, cpu_us }, ranges));
        } else {
            eprintln!("husk-vmm: {line}");
        }
    }
    let status = child.wait()?;
    bail!("husk-vmm ended ({status}) before its first KVM_RUN")
}

/// Rss of the process in KiB: total, and without mappings inside the guest memory ranges.
fn rss_kib(pid: u32, guest: &[(u64, u64)]) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut total, mut outside) = (0u64, 0u64);
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_guest = guest.iter().any(|&(s, e)| a < e && b > s);
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if !in_guest {
                outside += kib;
            }
        }
    }
    Ok((total, outside))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let vmm = husk_vmm()?;
    let dir = tempfile::tempdir().context("tempdir")?;
    // out 0x64, 0xfe: i8042 reset, the VM ends at its first instruction.
    let reset = dir.path().join("reset.elf");
    std::fs::write(&reset, tiny_elf(&[0xb0, 0xfe, 0xe6, 0x64]))?;
    // hlt with interrupts off: the vCPU sleeps in the kernel for good.
    let halt = dir.path().join("halt.elf");
    std::fs::write(&halt, tiny_elf(&[0xf4, 0xeb, 0xfd]))?;

    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let (mut child, s, _) = start(&vmm, &reset, dir.path(), run)?;
        let status = child.wait()?;
        if !status.success() {
            bail!("husk-vmm run {run} exited with {status}");
        }
        walls.push(s.wall_us as f64 / 1000.0);
        cpus.push(s.cpu_us as f64 / 1000.0);
    }

    let (mut child, _, ranges) = start(&vmm, &halt, dir.path(), RUNS)?;
    std::thread::sleep(Duration::from_millis(300));
    let (total, outside) = rss_kib(child.id(), &ranges)?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait()?;
    if !status.success() {
        bail!("husk-vmm did not exit cleanly on SIGTERM: {status}");
    }

    let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (nested)"
    } else {
        "kvm"
    };
    println!("host_kvm: {kvm}");
    println!("runs: {RUNS} count");
    println!(
        "husk_vmm_start_to_first_kvm_run_cpu_median: {:.2} ms",
        median(cpus.clone())
    );
    println!(
        "husk_vmm_start_to_first_kvm_run_cpu_max: {:.2} ms",
        cpus.iter().cloned().fold(0.0, f64::max)
    );
    println!("firecracker_bound_start_to_api_ready_cpu: {FC_CPU_MS:.2} ms");
    println!(
        "husk_vmm_start_to_first_kvm_run_wall_median: {:.2} ms",
        median(walls.clone())
    );
    println!(
        "husk_vmm_start_to_first_kvm_run_wall_max: {:.2} ms",
        walls.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "husk_vmm_rss_without_guest_memory: {:.2} MiB",
        outside as f64 / 1024.0
    );
    println!("husk_vmm_rss_total: {:.2} MiB", total as f64 / 1024.0);
    println!("firecracker_bound_vmm_memory_overhead: {FC_OVERHEAD_MIB:.2} MiB");
    Ok(())
}
