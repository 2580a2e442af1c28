//! `make bench-cri`: Kubernetes pods through containerd's CRI plugin, husk
//! next to runc in the same run and the same private containerd (handlers
//! `husk` and `runc`), the bench playing kubelet over CRI gRPC. One
//! `name: value unit` line each; times are medians of RUNS pods per runtime
//! (`HUSK_CRI_BENCH_RUNS`, default 5), runc and husk pods alternating, after
//! one warm-up pod of each.
//!
//! - cri_run_pod_ready: RunPodSandbox sent until PodSandboxStatus says
//!   SANDBOX_READY.
//! - cri_pod_first_output: RunPodSandbox sent, then CreateContainer +
//!   StartContainer of `echo <marker>`, until the marker's line is in the
//!   container's CRI log file (what `kubectl logs` reads). Same pods as the
//!   line above: it is the next step of kubelet's sequence.
//! - cri_idle_pod_*: host memory of one idle pod (the pause sandbox and one
//!   `sleep` container), `HUSK_CRI_BENCH_SETTLE_SECS` (default 5) after the
//!   container started: RSS (VmRSS) and PSS (smaps_rollup) summed over the
//!   pod's shim and every process below it (husk: QEMU and the husk-vmm
//!   backends; runc: pause and the container), also per kind of process.
//!   husk's pods use the node's shim configuration (`scripts/install.sh`:
//!   1 vCPU, `memory_mib` 256; `HUSK_CRI_BENCH_MEMORY_MIB` changes it).
//! - cri_idle_pod_*_cpu: CPU the same idle pod's processes use over the next
//!   `HUSK_CRI_BENCH_CPU_SECS` (default 10) seconds, in millicores.
//! - cri_idle_pod_*_anon: RssAnon of the pod's processes: memory the host
//!   cannot reclaim without swap, apart from the guest RAM (a memfd, counted
//!   as RssShmem). File pages (binaries, libraries) are left out: the host
//!   reclaims them under pressure, and they are mostly shared between pods.
//! - cri_runtimeclass_overhead_memory_idle: husk's idle pod minus runc's
//!   (RSS, the larger and so the safer of the two), rounded up to 16 MiB.
//! - cri_runtimeclass_overhead_memory: the RuntimeClass
//!   `overhead.podFixed.memory` these numbers call for. The VM runs in the
//!   pod's host cgroup, whose limit kubelet sets to the containers' limits
//!   plus this overhead; the guest may fill all its RAM (page cache), which
//!   the host cannot reclaim (no swap, no balloon yet), so the overhead covers
//!   the whole guest RAM plus the pod's processes' anonymous memory, minus
//!   runc's pod's, rounded up to 16 MiB: a pod is not OOM-killed on the host
//!   for its guest using the RAM it was given.
//! - cri_runtimeclass_overhead_cpu: husk's idle pod CPU minus runc's, rounded
//!   up to 10 millicores (at least 10).
//!
//! Every pod is stopped and removed, and its shim waited for, before the
//! next; every CRI call and wait has a deadline.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    future::Future,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use husk_shim::hypervisor::detect;
use husk_tests::{
    cri::{busybox_container, CriContainerd, RuntimeClient, HANDLER},
    husk_containerd::{processes_matching, tail},
};
use k8s_cri::v1::{
    CreateContainerRequest, PodSandboxConfig, PodSandboxState, PodSandboxStatusRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};

/// containerd's runc handler in `cri.rs`'s config (`io.containerd.runc.v2`).
const RUNC: &str = "runc";
/// Deadline of each CRI call (RunPodSandbox boots a VM: seconds under TCG).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for a container's first log line, and for a pod's shim to exit.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

fn line(name: &str, value: f64, unit: &str) {
    println!("{name}: {value:.2} {unit}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn env_num<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `fut` within `limit`, or an error naming `what`.
async fn within<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("{what}: {e}")),
        Err(_) => bail!("{what}: no answer within {limit:?}"),
    }
}

/// Runs pod sandboxes and containers as kubelet would, and removes them.
struct Kubelet<'a> {
    cri: &'a CriContainerd,
    client: RuntimeClient,
}

/// A pod and its containers, as started.
struct Pod {
    id: String,
    config: PodSandboxConfig,
    containers: Vec<String>,
}

impl Kubelet<'_> {
    /// RunPodSandbox, then PodSandboxStatus until SANDBOX_READY.
    async fn run_pod(&mut self, name: &str, handler: &str) -> Result<Pod> {
        let config = self.cri.pod_config(name);
        let id = within(
            &format!("RunPodSandbox {name} ({handler})"),
            CALL_TIMEOUT,
            self.client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_string(),
            }),
        )
        .await
        .map_err(|e| anyhow!("{e}\n{}", tail(&self.cri.containerd.log())))?
        .into_inner()
        .pod_sandbox_id;
        let pod = Pod {
            id,
            config,
            containers: Vec::new(),
        };
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let state = within(
                "PodSandboxStatus",
                CALL_TIMEOUT,
                self.client.pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: pod.id.clone(),
                    verbose: false,
                }),
            )
            .await
            .map(|r| r.into_inner().status.map(|s| s.state));
            match state {
                Ok(Some(s)) if s == PodSandboxState::SandboxReady as i32 => return Ok(pod),
                Err(e) => {
                    self.remove(&pod).await;
                    return Err(e);
                }
                _ if Instant::now() > deadline => {
                    self.remove(&pod).await;
                    bail!("pod {name} not ready within {WAIT_TIMEOUT:?}: {state:?}");
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// CreateContainer + StartContainer of busybox `cmd` in `pod`.
    async fn start_container(&mut self, pod: &mut Pod, name: &str, cmd: &[&str]) -> Result<()> {
        let id = within(
            &format!("CreateContainer {name}"),
            CALL_TIMEOUT,
            self.client.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(busybox_container(name, cmd)),
                sandbox_config: Some(pod.config.clone()),
            }),
        )
        .await?
        .into_inner()
        .container_id;
        pod.containers.push(id.clone());
        within(
            &format!("StartContainer {name}"),
            CALL_TIMEOUT,
            self.client
                .start_container(StartContainerRequest { container_id: id }),
        )
        .await?;
        Ok(())
    }

    /// Stops and removes the pod's containers and the pod, then waits for
    /// its shim (and so everything under it) to exit. Best effort on the
    /// CRI calls, so that a failed step still removes the rest; the error
    /// says what is left.
    async fn remove(&mut self, pod: &Pod) -> Option<String> {
        let mut errors = Vec::new();
        for c in &pod.containers {
            // A container that has just exited by itself (the `echo`) can
            // be between containerd deleting its task and CRI recording the
            // exit: StopContainer then returns at once and RemoveContainer
            // says it "is still running". Kubelet retries; so does this.
            let deadline = Instant::now() + WAIT_TIMEOUT;
            loop {
                if let Err(e) = within(
                    "StopContainer",
                    CALL_TIMEOUT,
                    self.client.stop_container(StopContainerRequest {
                        container_id: c.clone(),
                        timeout: 2,
                    }),
                )
                .await
                {
                    errors.push(e.to_string());
                    break;
                }
                match within(
                    "RemoveContainer",
                    CALL_TIMEOUT,
                    self.client.remove_container(RemoveContainerRequest {
                        container_id: c.clone(),
                    }),
                )
                .await
                {
                    Ok(_) => break,
                    Err(e)
                        if e.to_string().contains("still running") && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => {
                        errors.push(e.to_string());
                        break;
                    }
                }
            }
        }
        if let Err(e) = within(
            "StopPodSandbox",
            CALL_TIMEOUT,
            self.client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }),
        )
        .await
        {
            errors.push(e.to_string());
        }
        if let Err(e) = within(
            "RemovePodSandbox",
            CALL_TIMEOUT,
            self.client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }),
        )
        .await
        {
            errors.push(e.to_string());
        }
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let shims = shim_pids(&pod.id);
            let state_dir = Path::new("/run/husk").join(&pod.id);
            if shims.is_empty() && !state_dir.exists() {
                break;
            }
            if Instant::now() > deadline {
                errors.push(format!(
                    "pod {}: shims {shims:?} still run, {} exists: {}",
                    pod.id,
                    state_dir.display(),
                    state_dir.exists()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (!errors.is_empty()).then(|| errors.join("; "))
    }

    /// One pod of `handler`: (RunPodSandbox to ready, RunPodSandbox to the
    /// first line of an `echo` container in its CRI log), then removed.
    async fn ready_and_first_output(&mut self, name: &str, handler: &str) -> Result<(f64, f64)> {
        let t0 = Instant::now();
        let mut pod = self.run_pod(name, handler).await?;
        let ready = t0.elapsed();
        let marker = format!("first-output-{name}");
        let result = async {
            self.start_container(&mut pod, "echo", &["echo", &marker])
                .await?;
            let log = Path::new(&pod.config.log_directory).join("echo.log");
            let deadline = Instant::now() + WAIT_TIMEOUT;
            loop {
                // CRI's format: `<time> stdout F <text>`.
                let text = fs::read_to_string(&log).unwrap_or_default();
                if text.lines().any(|l| l.ends_with(&format!(" F {marker}"))) {
                    return Ok(t0.elapsed());
                }
                if Instant::now() > deadline {
                    bail!(
                        "{}: no `{marker}` line within {WAIT_TIMEOUT:?}: {text:?}",
                        log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        .await;
        let left = self.remove(&pod).await;
        let output = result?;
        if let Some(left) = left {
            bail!("removing pod {name}: {left}");
        }
        Ok((ms(ready), ms(output)))
    }

    /// Host memory of an idle pod of `handler`: the pause sandbox and one
    /// `sleep` container, `settle` after the container started.
    async fn idle_pod_memory(
        &mut self,
        name: &str,
        handler: &str,
        settle: Duration,
        cpu_window: Duration,
    ) -> Result<PodMemory> {
        let mut pod = self.run_pod(name, handler).await?;
        let result = async {
            self.start_container(&mut pod, "idle", &["sleep", "3600"])
                .await?;
            tokio::time::sleep(settle).await;
            let mut memory = pod_memory(&pod.id)?;
            let pids = pod_pids(&pod.id);
            let before = cpu_ticks(&pids);
            let t0 = Instant::now();
            tokio::time::sleep(cpu_window).await;
            let after = cpu_ticks(&pids);
            let secs = t0.elapsed().as_secs_f64();
            // Only processes alive at both ends: a process that ends in the
            // window is not part of an idle pod's steady cost.
            let ticks: u64 = after
                .iter()
                .filter_map(|(pid, a)| before.get(pid).map(|b| a.saturating_sub(*b)))
                .sum();
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            memory.idle_millicores = ticks as f64 / hz / secs * 1000.0;
            Ok::<_, anyhow::Error>(memory)
        }
        .await;
        let left = self.remove(&pod).await;
        let memory = result?;
        if let Some(left) = left {
            bail!("removing pod {name}: {left}");
        }
        Ok(memory)
    }
}

/// The pod's shim processes: containerd starts both husk's and runc's shim
/// with `-id <sandbox id>` (containers of a pod share the sandbox's shim).
fn shim_pids(sandbox_id: &str) -> Vec<u32> {
    processes_matching(&format!("-id {sandbox_id} "))
        .into_iter()
        .filter(|pid| {
            argv(*pid)
                .first()
                .is_some_and(|a| a.contains("containerd-shim"))
        })
        .collect()
}

fn argv(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every process below `pid` (any thread's children, recursively).
fn descendants(pid: u32, out: &mut BTreeSet<u32>) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            if out.insert(child) {
                descendants(child, out);
            }
        }
    }
}

/// husk's shim records its own and the VM processes' pids in
/// /run/husk/<sandbox id>/state.json (`shim/src/state.rs`).
fn husk_state_pids(sandbox_id: &str) -> Vec<u32> {
    let Ok(bytes) = fs::read(Path::new("/run/husk").join(sandbox_id).join("state.json")) else {
        return Vec::new();
    };
    let Ok(state) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Vec::new();
    };
    let pid = |v: &serde_json::Value| v.get("pid").and_then(|p| p.as_u64()).map(|p| p as u32);
    state
        .get("shim")
        .and_then(pid)
        .into_iter()
        .chain(
            state
                .get("vm")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(pid),
        )
        .collect()
}

/// What a process of a pod is: `shim`, `qemu`, `husk_vmm_<subcommand>`,
/// `pause` or (anything else, under runc) `container`.
fn kind(pid: u32) -> String {
    let argv = argv(pid);
    let exe = argv
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .unwrap_or_default();
    if exe.starts_with("containerd-shim") {
        "shim".into()
    } else if exe.starts_with("qemu-system") {
        "qemu".into()
    } else if exe == "husk-vmm" {
        let sub = argv.get(1).map(String::as_str).unwrap_or("run");
        format!("husk_vmm_{}", sub.replace(['-', ' '], "_"))
    } else if exe == "pause" {
        "pause".into()
    } else {
        "container".into()
    }
}

fn kib_field(text: &str, key: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// RSS and PSS in KiB, per kind of process and in all.
#[derive(Default)]
struct PodMemory {
    /// kind -> (processes, RSS KiB, PSS KiB)
    kinds: BTreeMap<String, (usize, f64, f64)>,
    /// RssAnon, KiB: without the guest RAM's shared memory or file pages.
    anon_kib: f64,
    /// CPU used while idle, millicores (see `idle_pod`).
    idle_millicores: f64,
}

impl PodMemory {
    fn total(&self) -> (usize, f64, f64) {
        self.kinds
            .values()
            .fold((0, 0.0, 0.0), |(n, r, p), (kn, kr, kp)| {
                (n + kn, r + kr, p + kp)
            })
    }
}

fn pod_memory(sandbox_id: &str) -> Result<PodMemory> {
    let shims = shim_pids(sandbox_id);
    if shims.len() != 1 {
        bail!("pod {sandbox_id}: expected one shim, found {shims:?}");
    }
    let mut pids = BTreeSet::from([shims[0]]);
    descendants(shims[0], &mut pids);
    // husk's record of its VM processes, in case one was not spawned by
    // the serving shim (none is today: they are its children).
    for pid in husk_state_pids(sandbox_id) {
        if husk_tests::process_alive(pid) && pids.insert(pid) {
            descendants(pid, &mut pids);
        }
    }
    let mut memory = PodMemory::default();
    for pid in pids {
        let (Ok(status), Ok(rollup)) = (
            fs::read_to_string(format!("/proc/{pid}/status")),
            fs::read_to_string(format!("/proc/{pid}/smaps_rollup")),
        ) else {
            // Exited meanwhile (a short-lived helper such as runc init).
            continue;
        };
        let e = memory.kinds.entry(kind(pid)).or_default();
        e.0 += 1;
        e.1 += kib_field(&status, "VmRSS:");
        e.2 += kib_field(&rollup, "Pss:");
        memory.anon_kib += kib_field(&status, "RssAnon:");
    }
    Ok(memory)
}

/// The pod's processes: its shim and everything below it.
fn pod_pids(sandbox_id: &str) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for shim in shim_pids(sandbox_id) {
        pids.insert(shim);
        descendants(shim, &mut pids);
    }
    pids
}

/// utime + stime of each process, in clock ticks.
fn cpu_ticks(pids: &BTreeSet<u32>) -> BTreeMap<u32, u64> {
    pids.iter()
        .filter_map(|&pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the ")" closing the command name start at field 3;
            // utime and stime are fields 14 and 15.
            let mut f = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
            let utime: u64 = f.next()?.parse().ok()?;
            let stime: u64 = f.next()?.parse().ok()?;
            Some((pid, utime + stime))
        })
        .collect()
}

fn print_memory(runtime: &str, m: &PodMemory) {
    let (n, rss, pss) = m.total();
    line(
        &format!("cri_idle_pod_{runtime}_processes"),
        n as f64,
        "count",
    );
    line(&format!("cri_idle_pod_{runtime}_rss"), rss / 1024.0, "MiB");
    line(&format!("cri_idle_pod_{runtime}_pss"), pss / 1024.0, "MiB");
    line(
        &format!("cri_idle_pod_{runtime}_anon"),
        m.anon_kib / 1024.0,
        "MiB",
    );
    line(
        &format!("cri_idle_pod_{runtime}_cpu"),
        m.idle_millicores,
        "millicores",
    );
    for (kind, (n, rss, pss)) in &m.kinds {
        line(
            &format!("cri_idle_pod_{runtime}_{kind}_processes"),
            *n as f64,
            "count",
        );
        line(
            &format!("cri_idle_pod_{runtime}_{kind}_rss"),
            rss / 1024.0,
            "MiB",
        );
        line(
            &format!("cri_idle_pod_{runtime}_{kind}_pss"),
            pss / 1024.0,
            "MiB",
        );
    }
}

async fn bench(cri: &CriContainerd, memory_mib: u32) -> Result<()> {
    let runs: usize = env_num("HUSK_CRI_BENCH_RUNS", 5).max(1);
    let settle = Duration::from_secs(env_num("HUSK_CRI_BENCH_SETTLE_SECS", 5));
    let mut k = Kubelet {
        cri,
        client: cri.runtime().await?,
    };
    // Warm-up: page cache, snapshots, CNI, the first QEMU start.
    k.ready_and_first_output("warm-runc", RUNC).await?;
    k.ready_and_first_output("warm-husk", HANDLER).await?;

    let (mut ready, mut output) = (BTreeMap::new(), BTreeMap::new());
    for i in 0..runs {
        for handler in [RUNC, HANDLER] {
            let (r, o) = k
                .ready_and_first_output(&format!("{handler}-{i}"), handler)
                .await?;
            ready.entry(handler).or_insert_with(Vec::new).push(r);
            output.entry(handler).or_insert_with(Vec::new).push(o);
        }
    }
    for (what, samples) in [("run_pod_ready", ready), ("pod_first_output", output)] {
        let runc = median(samples[RUNC].clone());
        let husk = median(samples[HANDLER].clone());
        line(&format!("cri_{what}_runc"), runc, "ms");
        line(&format!("cri_{what}_husk"), husk, "ms");
        line(&format!("cri_{what}_husk_over_runc"), husk / runc, "x");
    }

    let cpu_window = Duration::from_secs(env_num("HUSK_CRI_BENCH_CPU_SECS", 10).max(1));
    let husk = k
        .idle_pod_memory("idle-husk", HANDLER, settle, cpu_window)
        .await?;
    let runc = k
        .idle_pod_memory("idle-runc", RUNC, settle, cpu_window)
        .await?;
    print_memory("husk", &husk);
    print_memory("runc", &runc);
    let (_, husk_rss, husk_pss) = husk.total();
    let (_, runc_rss, runc_pss) = runc.total();
    let rss_diff = (husk_rss - runc_rss) / 1024.0;
    line("cri_idle_pod_husk_minus_runc_rss", rss_diff, "MiB");
    line(
        "cri_idle_pod_husk_minus_runc_pss",
        (husk_pss - runc_pss) / 1024.0,
        "MiB",
    );
    let round16 = |mib: f64| ((mib.max(0.0) / 16.0).ceil() * 16.0).max(16.0);
    line(
        "cri_runtimeclass_overhead_memory_idle",
        round16(rss_diff),
        "MiB",
    );
    let bound = memory_mib as f64 + (husk.anon_kib - runc.anon_kib) / 1024.0;
    line("cri_pod_memory_bound_husk_minus_runc", bound, "MiB");
    line("cri_runtimeclass_overhead_memory", round16(bound), "MiB");
    let cpu = husk.idle_millicores - runc.idle_millicores;
    line("cri_idle_pod_husk_minus_runc_cpu", cpu, "millicores");
    line(
        "cri_runtimeclass_overhead_cpu",
        ((cpu.max(0.0) / 10.0).ceil() * 10.0).max(10.0),
        "millicores",
    );
    Ok(())
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("husk-cri-bench needs root (containerd's CRI plugin and the shim)");
    }
    let cri = CriContainerd::start().context("starting containerd with CRI")?;
    // The node's guest size (scripts/install.sh; 1 vCPU is the default),
    // not the tests' larger one: that is what a RuntimeClass overhead is for.
    let memory_mib: u32 = env_num("HUSK_CRI_BENCH_MEMORY_MIB", 256);
    let config = fs::read_to_string(&cri.shim_config)?;
    let config: String = config
        .lines()
        .map(|l| {
            if l.starts_with("memory_mib") {
                format!("memory_mib = {memory_mib}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&cri.shim_config, config)?;

    let accel = if detect::detect().kvm_usable {
        "kvm"
    } else {
        "tcg"
    };
    println!("accelerator: {accel}");
    println!("husk guest: {memory_mib} MiB, 1 vCPU");
    let runs: usize = env_num("HUSK_CRI_BENCH_RUNS", 5).max(1);
    println!("runs: {runs} per runtime (medians)");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(bench(&cri, memory_mib));
    drop(rt);
    // Whatever a failed step left: CriContainerd's drop stops and removes
    // every pod, then containerd and the bridge go.
    let socket = cri.containerd.socket().to_string_lossy().into_owned();
    drop(cri);
    let shims = processes_matching(&format!("-address {socket}"));
    if !shims.is_empty() {
        eprintln!("husk-cri-bench: shims left behind: {shims:?}");
        if result.is_ok() {
            bail!("shims left behind: {shims:?}");
        }
    }
    result
}
