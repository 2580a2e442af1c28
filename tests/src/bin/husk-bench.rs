//! `make bench`: husk's pod VM numbers, one `name: value unit` line each.
//!
//! - Guest artefacts: kernel build time (as measured when the cached kernel
//!   was built), vmlinux and initrd sizes.
//! - Launch to agent ready, split into VMM start (host: until the guest's
//!   clock starts), kernel boot to /init and agent start (guest clock).
//! - Host memory of the VM's processes (RSS and PSS of QEMU and husk-vmm).
//! - Baseline, in the same run: the same kernel under the same QEMU with no
//!   husk parts at all, from spawn until it has booted to the point of running
//!   init (it finds none, panics and exits). husk's launch is shown as a ratio
//!   to it.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use husk_shim::hypervisor::{detect, qemu, Accel, AccelChoice, PodVm, VmSpec};
use husk_tests::{guest_artifacts, vm_spec};

const RUNS: usize = 5;

fn line(name: &str, value: f64, unit: &str) {
    println!("{name}: {value:.2} {unit}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn kib_field(text: &str, key: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// (RSS, PSS) in KiB of one process.
fn memory_kib(pid: u32) -> Result<(f64, f64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok((kib_field(&status, "VmRSS:"), kib_field(&rollup, "Pss:")))
}

/// Same kernel, same QEMU machine, no husk device, no init: spawn to exit.
fn baseline_boot(spec: &VmSpec, accel: Accel, dir: &Path) -> Result<Duration> {
    let mut s = spec.clone();
    s.extra_cmdline = "rdinit=/no-init".into();
    s.agent_log_port = None;
    let console = dir.join("baseline-console.log");
    let mut args: Vec<_> = qemu::args(
        &s,
        accel,
        &qemu::QemuPaths {
            vhost_vsock_socket: Path::new("/unused"),
            vhost_fs_socket: None,
            console_sock: Path::new("/unused"),
        },
    );
    // The console straight to a file (no shim reads it here), and no vsock
    // device: the baseline has nothing of husk's.
    for a in args.iter_mut() {
        if a.to_string_lossy().starts_with("socket,id=con0,") {
            let mut file = std::ffi::OsString::from("file,id=con0,path=");
            file.push(&console);
            *a = file;
        }
    }
    let cut = args
        .iter()
        .position(|a| a.to_string_lossy().starts_with("socket,id=vsock0,"))
        .map(|i| i - 1)
        .unwrap_or(args.len());
    let start = Instant::now();
    let status = Command::new(&spec.qemu_binary)
        .args(&args[..cut])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running baseline QEMU")?;
    let took = start.elapsed();
    let text = fs::read_to_string(&console).unwrap_or_default();
    if !text.contains("Kernel panic") {
        bail!("baseline boot did not reach init (QEMU {status}); console:\n{text}");
    }
    Ok(took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (kernel, initrd) = guest_artifacts()?;
    let guest_dir = kernel.parent().map(Path::to_path_buf).unwrap_or_default();
    if let Ok(s) = fs::read_to_string(guest_dir.join("kernel-build-seconds")) {
        if let Ok(v) = s.trim().parse::<f64>() {
            line("kernel_build_time", v, "s");
        }
    }
    line(
        "vmlinux_size",
        fs::metadata(&kernel)?.len() as f64 / 1048576.0,
        "MiB",
    );
    line(
        "initrd_size",
        fs::metadata(&initrd)?.len() as f64 / 1024.0,
        "KiB",
    );

    let tmp = tempfile::tempdir()?;
    let mut total = Vec::new();
    let mut vmm_start = Vec::new();
    let mut kernel_boot = Vec::new();
    let mut agent_start = Vec::new();
    let mut backend_ready = Vec::new();
    let mut baseline = Vec::new();
    let (mut rss_qemu, mut rss_vmm, mut pss_total) = (Vec::new(), Vec::new(), Vec::new());
    let mut accel = None;
    for i in 0..RUNS {
        let mut spec = vm_spec(&format!("bench{i}"), tmp.path())?;
        spec.accel = AccelChoice::Auto;
        let host_accel = if detect::detect().kvm_usable {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        baseline.push(ms(baseline_boot(&spec, host_accel, tmp.path())?));

        let launch_start = Instant::now();
        let vm = PodVm::launch(spec).await?;
        let t = vm.timings();
        accel = Some(vm.accel());
        let agent = vm.agent().context("no agent connection")?.clone();
        let before = launch_start.elapsed();
        let d = agent.guest_details().await?;
        let after = launch_start.elapsed();
        // The guest's clock started when its kernel did: place that on the
        // host's timeline using the uptime read mid-call.
        let host_now = (before + after) / 2;
        let guest_start = host_now.saturating_sub(Duration::from_nanos(d.uptime_ns));
        total.push(ms(t.agent_ready));
        backend_ready.push(ms(t.vmm_ready));
        vmm_start.push(ms(guest_start));
        kernel_boot.push(d.init_started_ns as f64 / 1e6);
        agent_start.push((d.agent_ready_ns - d.init_started_ns) as f64 / 1e6);

        let pids = vm.pids();
        let mut pss = 0.0;
        for (n, pid) in pids.iter().enumerate() {
            let (rss, p) = memory_kib(*pid)?;
            pss += p;
            if n == 0 {
                rss_qemu.push(rss);
            } else {
                rss_vmm.push(rss);
            }
        }
        pss_total.push(pss);
        vm.shutdown(Duration::from_secs(20)).await;
    }
    println!("accelerator: {:?}", accel.unwrap_or(Accel::Tcg));
    println!("runs: {RUNS} (medians)");
    let total_m = median(total);
    let base_m = median(baseline);
    line("launch_to_agent_ready", total_m, "ms");
    line("  vmm_start_until_guest_runs", median(vmm_start), "ms");
    line(
        "  husk_vmm_vsock_backend_ready",
        median(backend_ready),
        "ms",
    );
    line("  kernel_boot_to_init", median(kernel_boot), "ms");
    line("  agent_init_to_ready", median(agent_start), "ms");
    line("baseline_bare_qemu_boot_to_init", base_m, "ms");
    line("launch_vs_baseline", total_m / base_m, "x");
    line("rss_qemu", median(rss_qemu) / 1024.0, "MiB");
    line("rss_husk_vmm", median(rss_vmm) / 1024.0, "MiB");
    line("pss_vm_processes", median(pss_total) / 1024.0, "MiB");
    Ok(())
}
