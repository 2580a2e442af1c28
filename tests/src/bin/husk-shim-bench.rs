//! `make bench-shim`: `ctr run --rm <busybox> echo` wall time through a real
//! containerd with husk and, in the same run, with runc; then where husk's
//! time goes, one `name: value unit` line each (medians of RUNS runs).
//!
//! The split comes from the shim's own log (containerd copies it into its
//! log, with the shim's UTC timestamps), measured from the moment `ctr run`
//! was started:
//! - shim_start: ctr, containerd and `containerd-shim-husk-v2 start` until
//!   the shim serves the Task API;
//! - vm_boot: QEMU + husk-vmm started until the agent answers;
//! - agent_sandbox: the agent's sandbox set-up (hostname, virtio-fs mount);
//! - container_create: rootfs mount and the agent creating the container;
//! - container_start: Start until the container runs;
//! - run_to_exit: the container's run until its exit was reported;
//! - exit_to_ctr_done: delete, shutdown and ctr returning.

use std::{
    process::Output,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Result};
use husk_tests::husk_containerd::{describe, HuskContainerd, IMAGE, RUNTIME};

const RUNS: usize = 5;

fn line(name: &str, value: f64, unit: &str) {
    println!("{name}: {value:.2} {unit}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Seconds since the Unix epoch of a tracing timestamp
/// (`2026-11-26T01:10:18.673644Z`), or `None`.
fn log_time(line: &str, day_start: f64) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let time = ts.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(day_start + h * 3600.0 + m * 60.0 + s)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn run(h: &HuskContainerd, runtime: &str, name: &str) -> Result<(Output, Duration)> {
    let config = h.config.to_string_lossy().into_owned();
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    if runtime == RUNTIME {
        args.extend(["--runtime-config-path", config.as_str()]);
    }
    args.extend([IMAGE, name, "echo", "hi"]);
    let start = Instant::now();
    let out = h.containerd.ctr(&args)?;
    let took = start.elapsed();
    if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("hi") {
        bail!("ctr run with {runtime}: {}", describe(&out));
    }
    Ok((out, took))
}

/// Milestones of one husk run, in seconds after `t0`, from the log lines
/// added since `from`.
fn split(log: &str, t0: f64) -> Option<[f64; 7]> {
    let day_start = (t0 / 86400.0).floor() * 86400.0;
    let at = |needle: &str| -> Option<f64> {
        log.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| log_time(l, day_start))
            .map(|t| t - t0)
    };
    Some([
        at("shim serving")?,
        at("launching pod VM")?,
        at("pod VM ready")?,
        at("sandbox ready")?,
        at("topic=/tasks/create")?,
        at("topic=/tasks/start")?,
        at("process exited")?,
    ])
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("husk-shim-bench needs root (containerd)");
    }
    let h = HuskContainerd::start()?;
    // Warm-up: page cache, image unpack, first QEMU start.
    run(&h, "io.containerd.runc.v2", "warm-runc")?;
    run(&h, RUNTIME, "warm-husk")?;

    let mut runc = Vec::new();
    let mut husk = Vec::new();
    let mut parts: Vec<[f64; 8]> = Vec::new();
    for i in 0..RUNS {
        let (_, t) = run(&h, "io.containerd.runc.v2", &format!("runc{i}"))?;
        runc.push(t.as_secs_f64() * 1000.0);

        let before = h.containerd.log().len();
        let t0 = now_secs();
        let (_, t) = run(&h, RUNTIME, &format!("husk{i}"))?;
        let total = t.as_secs_f64();
        husk.push(total * 1000.0);
        let log = h.containerd.log();
        if let Some(m) = split(log.get(before..).unwrap_or(""), t0) {
            parts.push([m[0], m[1], m[2], m[3], m[4], m[5], m[6], total]);
        }
    }
    let runc_ms = median(runc);
    let husk_ms = median(husk);
    line("ctr_run_echo_runc", runc_ms, "ms");
    line("ctr_run_echo_husk", husk_ms, "ms");
    line("ctr_run_echo_husk_over_runc", husk_ms / runc_ms, "x");
    if parts.is_empty() {
        bail!("no husk run left a complete log split (shim log level must be debug)");
    }
    let col = |f: &dyn Fn(&[f64; 8]) -> f64| median(parts.iter().map(f).collect()) * 1000.0;
    line("husk_split_shim_start", col(&|p| p[0]), "ms");
    line("husk_split_vm_boot", col(&|p| p[2] - p[1]), "ms");
    line("husk_split_agent_sandbox", col(&|p| p[3] - p[2]), "ms");
    line("husk_split_container_create", col(&|p| p[4] - p[3]), "ms");
    line("husk_split_container_start", col(&|p| p[5] - p[4]), "ms");
    line("husk_split_run_to_exit", col(&|p| p[6] - p[5]), "ms");
    line("husk_split_exit_to_ctr_done", col(&|p| p[7] - p[6]), "ms");
    Ok(())
}
