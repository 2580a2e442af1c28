//! `make bench-net`: TCP throughput between two pods through containerd's
//! CRI plugin, two husk pods next to two runc pods in the same run and the
//! same private containerd (CNI bridge from `cri.rs`). One `name: value unit`
//! line each; medians of RUNS transfers per runtime (`HUSK_NET_BENCH_RUNS`,
//! default 3) of MIB MiB (`HUSK_NET_BENCH_MIB`, default 64).
//!
//! The server pod runs busybox `nc -l` into /dev/null in a loop (its stdin a
//! FIFO held open: busybox nc half-closes the connection when its stdin ends,
//! and the client then stops sending); the client pod's ExecSync runs
//! `dd if=/dev/zero | nc <server pod IP>`. Time is taken on the host around
//! the ExecSync, less the median ExecSync of `true` in the same container
//! (the exec's own cost, which differs between runtimes).
//!
//! - net_tcp_<runtime>: MiB/s, client pod to server pod by pod IP.
//! - net_tcp_husk_over_runc: the ratio of the two.
//!
//! Every pod is stopped and removed; every CRI call has a deadline.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use husk_tests::{
    cri::{busybox_container, CriContainerd, RuntimeClient, HANDLER},
    husk_containerd::tail,
};
use k8s_cri::v1::{
    CreateContainerRequest, ExecSyncRequest, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};

/// containerd's runc handler in `cri.rs`'s config.
const RUNC: &str = "runc";
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const PORT: u16 = 5001;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn env_num<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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

/// RunPodSandbox of `handler` with one busybox container running `script`;
/// (pod id, container id, pod IP). The pod id goes into `pods` first, so
/// the caller removes it whatever fails after.
async fn pod_with(
    cri: &CriContainerd,
    client: &mut RuntimeClient,
    pods: &mut Vec<String>,
    name: &str,
    handler: &str,
    script: &str,
) -> Result<(String, String, String)> {
    let config = cri.pod_config(name);
    let pod = within(
        &format!("RunPodSandbox {name} ({handler})"),
        CALL_TIMEOUT,
        client.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        }),
    )
    .await
    .map_err(|e| anyhow!("{e}\n{}", tail(&cri.containerd.log())))?
    .into_inner()
    .pod_sandbox_id;
    pods.push(pod.clone());
    let ip = within(
        "PodSandboxStatus",
        CALL_TIMEOUT,
        client.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        }),
    )
    .await?
    .into_inner()
    .status
    .and_then(|s| s.network)
    .map(|n| n.ip)
    .filter(|ip| !ip.is_empty())
    .with_context(|| format!("pod {name} has no IP"))?;
    let id = within(
        &format!("CreateContainer in {name}"),
        CALL_TIMEOUT,
        client.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(busybox_container("main", &["sh", "-c", script])),
            sandbox_config: Some(config),
        }),
    )
    .await?
    .into_inner()
    .container_id;
    within(
        &format!("StartContainer in {name}"),
        CALL_TIMEOUT,
        client.start_container(StartContainerRequest {
            container_id: id.clone(),
        }),
    )
    .await?;
    Ok((pod, id, ip))
}

/// ExecSync of `sh -c script`: (exit code, stderr, host-side duration).
async fn sh(client: &mut RuntimeClient, id: &str, script: &str) -> Result<(i32, String, Duration)> {
    let t = Instant::now();
    let r = within(
        &format!("ExecSync {script:?}"),
        CALL_TIMEOUT,
        client.exec_sync(ExecSyncRequest {
            container_id: id.to_string(),
            cmd: ["sh", "-c", script].map(String::from).to_vec(),
            timeout: CALL_TIMEOUT.as_secs() as i64 - 10,
        }),
    )
    .await?
    .into_inner();
    Ok((
        r.exit_code,
        String::from_utf8_lossy(&r.stderr).trim().to_string(),
        t.elapsed(),
    ))
}

/// Median MiB/s of `runs` transfers of `mib` MiB from a client pod to a
/// server pod, both of `handler`.
async fn throughput(
    cri: &CriContainerd,
    client: &mut RuntimeClient,
    pods: &mut Vec<String>,
    handler: &str,
    runs: usize,
    mib: u32,
) -> Result<f64> {
    let server_script = format!(
        "mkfifo /hold && exec 3<>/hold && while true; do nc -l -p {PORT} <&3 >/dev/null; done"
    );
    let (_, server, server_ip) = pod_with(
        cri,
        client,
        pods,
        &format!("netb-srv-{handler}"),
        handler,
        &server_script,
    )
    .await?;
    let (_, cl, _) = pod_with(
        cri,
        client,
        pods,
        &format!("netb-cli-{handler}"),
        handler,
        "trap 'exit 0' TERM; while true; do sleep 1; done",
    )
    .await?;
    let mut overhead = Vec::new();
    for _ in 0..3 {
        overhead.push(sh(client, &cl, "true").await?.2.as_secs_f64());
    }
    let overhead = median(overhead);
    let mut rates = Vec::new();
    // One warm-up transfer, then the measured ones.
    for run in 0..=runs {
        // The listener is back (the loop restarts nc after each transfer).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, _, _) = sh(
                client,
                &server,
                &format!("netstat -ltn | grep -q ':{PORT} '"),
            )
            .await?;
            if code == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{handler}: the server's nc never listened on {PORT}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (code, err, took) = sh(
            client,
            &cl,
            &format!("dd if=/dev/zero bs=1M count={mib} 2>/dev/null | nc {server_ip} {PORT}"),
        )
        .await?;
        if code != 0 {
            bail!("{handler}: transfer exited {code}: {err}");
        }
        let secs = (took.as_secs_f64() - overhead).max(1e-6);
        if run > 0 {
            rates.push(f64::from(mib) / secs);
        }
    }
    Ok(median(rates))
}

async fn remove_pods(client: &mut RuntimeClient, pods: &[String]) -> Result<()> {
    let mut errors = Vec::new();
    for pod in pods {
        if let Err(e) = within(
            "StopPodSandbox",
            CALL_TIMEOUT,
            client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }),
        )
        .await
        {
            errors.push(e.to_string());
        }
        if let Err(e) = within(
            "RemovePodSandbox",
            CALL_TIMEOUT,
            client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            }),
        )
        .await
        {
            errors.push(e.to_string());
        }
    }
    if !errors.is_empty() {
        bail!("removing pods: {}", errors.join("; "));
    }
    Ok(())
}

async fn bench(cri: &CriContainerd, runs: usize, mib: u32) -> Result<()> {
    let mut client = cri.runtime().await?;
    let mut results = Vec::new();
    for handler in [RUNC, HANDLER] {
        let mut pods = Vec::new();
        let r = throughput(cri, &mut client, &mut pods, handler, runs, mib).await;
        let removed = remove_pods(&mut client, &pods).await;
        let rate = r?;
        removed?;
        println!("net_tcp_{handler}: {rate:.2} MiB/s");
        results.push(rate);
    }
    println!(
        "net_tcp_husk_over_runc: {:.2} ratio",
        results[1] / results[0]
    );
    Ok(())
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("husk-net-bench needs root (containerd's CRI plugin, CNI and the shim)");
    }
    let runs: usize = env_num("HUSK_NET_BENCH_RUNS", 3).max(1);
    let mib: u32 = env_num("HUSK_NET_BENCH_MIB", 64).max(1);
    println!("runs: {runs} per runtime (medians), {mib} MiB each");
    let cri = CriContainerd::start().context("starting containerd with CRI")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(bench(&cri, runs, mib));
    drop(rt);
    // Whatever a failed step left: CriContainerd's drop stops and removes
    // every pod, then containerd and the bridge go.
    drop(cri);
    result
}
