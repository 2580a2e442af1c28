//! Kubernetes pods through containerd's CRI plugin and husk's shim, with the
//! test playing kubelet over CRI gRPC: one VM per pod, two containers in it,
//! ExecSync, logs in CRI's format, stats from the guest, clean teardown, a
//! rejected bad configuration, and pods in a loop with nothing leaked.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use husk_tests::{
    cri::{
        exec_stream, start_container, test_runtime, CriContainerd, KubeletPodCgroup, RuntimeClient,
        BAD_HANDLER, HANDLER,
    },
    husk_containerd::{mounts_under, processes_matching, tail},
};
use k8s_cri::v1::{
    ContainerStatsRequest, ExecRequest, ExecSyncRequest, ExecSyncResponse, PodSandboxConfig,
    PodSandboxStatsRequest, PodSandboxStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StopContainerRequest, StopPodSandboxRequest,
};

/// One test at a time: each boots VMs under TCG on a 2-core host.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn setup(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, CriContainerd)> {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing(test, "containerd's CRI plugin and the shim need root");
        return None;
    }
    husk_tests::init_tracing();
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some((
        guard,
        CriContainerd::start().expect("CRI containerd set-up"),
    ))
}

/// The processes of pod VM `id`: its shim, QEMU and husk-vmm backends.
fn vm_processes(id: &str) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    (
        processes_matching(&format!("-id {id} ")),
        processes_matching(&format!("husk-{id},")),
        processes_matching(&format!("/run/husk/{id}/")),
    )
}

/// Waits until nothing of sandbox `id` is left on the host: processes,
/// /run/husk/<id>, mounts (husk's and containerd's for the pod).
fn wait_gone(cri: &CriContainerd, id: &str) {
    let dir = Path::new("/run/husk").join(id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (shims, qemu, vmm) = vm_processes(id);
        let mounts: Vec<String> = mounts_under(&dir)
            .into_iter()
            .chain(
                mounts_under(cri.containerd.dir())
                    .into_iter()
                    .filter(|m| m.contains(id)),
            )
            .collect();
        if shims.is_empty()
            && qemu.is_empty()
            && vmm.is_empty()
            && mounts.is_empty()
            && !dir.exists()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pod {id} left behind: shims {shims:?}, QEMU {qemu:?}, husk-vmm {vmm:?}, \
             mounts {mounts:?}, {} exists: {}",
            dir.display(),
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn run_pod(
    client: &mut RuntimeClient,
    config: PodSandboxConfig,
    handler: &str,
) -> Result<String, tonic::Status> {
    let resp = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.to_string(),
        })
        .await?;
    Ok(resp.into_inner().pod_sandbox_id)
}

async fn exec_sync(
    client: &mut RuntimeClient,
    id: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<ExecSyncResponse, tonic::Status> {
    client
        .exec_sync(ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn out(client: &mut RuntimeClient, id: &str, script: &str) -> String {
    let r = exec_sync(client, id, &["sh", "-c", script], 60)
        .await
        .unwrap_or_else(|e| panic!("ExecSync {script:?} in {id}: {e}"));
    assert_eq!(
        r.exit_code,
        0,
        "{script:?}: stderr {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

async fn stop_and_remove(client: &mut RuntimeClient, pod: &str, containers: &[&str]) {
    for c in containers {
        client
            .stop_container(StopContainerRequest {
                container_id: c.to_string(),
                timeout: 2,
            })
            .await
            .unwrap_or_else(|e| panic!("StopContainer {c}: {e}"));
        client
            .remove_container(RemoveContainerRequest {
                container_id: c.to_string(),
            })
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer {c}: {e}"));
    }
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        })
        .await
        .expect("StopPodSandbox");
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        })
        .await
        .expect("RemovePodSandbox");
}

/// A line of CRI's log format: `<RFC 3339 nano time> <stream> <P|F> <text>`.
/// CPU time (ns) and memory working set (bytes) from CRI stats.
fn cpu_and_working_set(
    cpu: Option<k8s_cri::v1::CpuUsage>,
    memory: Option<k8s_cri::v1::MemoryUsage>,
) -> (Option<u64>, Option<u64>) {
    (
        cpu.and_then(|c| c.usage_core_nano_seconds).map(|v| v.value),
        memory.and_then(|m| m.working_set_bytes).map(|v| v.value),
    )
}

fn parse_cri_log_line(line: &str) -> Option<(&str, &str, &str)> {
    let mut parts = line.splitn(4, ' ');
    let (time, stream, tag, text) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let rfc3339 = time.len() >= 20
        && time.as_bytes()[4] == b'-'
        && time.as_bytes()[10] == b'T'
        && (time.ends_with('Z') || time[19..].contains(['+', '-']));
    (rfc3339 && matches!(stream, "stdout" | "stderr") && matches!(tag, "P" | "F"))
        .then_some((stream, tag, text))
}

/// Script for a container that logs, then idles until SIGTERM.
const IDLE: &str = "trap 'exit 0' TERM; while true; do sleep 1; done";

#[test]
fn pod_with_two_containers_through_cri() {
    let Some((_g, cri)) = setup("pod_with_two_containers_through_cri") else {
        return;
    };
    let (pod, pod_cgroup) = test_runtime().block_on(async {
        let mut client = cri.runtime().await.unwrap();
        let mut pod_config = cri.pod_config("web");
        // As kubelet does: a pod cgroup, which CRI reads PodSandboxStats from.
        let pod_cgroup =
            KubeletPodCgroup::create(&format!("husk-test-{}/pod-web", std::process::id()))
                .expect("pod cgroup");
        if let Some(linux) = pod_config.linux.as_mut() {
            linux.cgroup_parent = pod_cgroup.parent.clone();
        }

        let t0 = Instant::now();
        let pod = run_pod(&mut client, pod_config.clone(), HANDLER)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&cri.containerd.log())));
        let ready = t0.elapsed();
        eprintln!("RunPodSandbox to ready: {} ms", ready.as_millis());
        let status = client
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner();
        assert_eq!(
            status.status.as_ref().map(|s| s.state),
            Some(k8s_cri::v1::PodSandboxState::SandboxReady as i32)
        );
        let (shims, qemu, _) = vm_processes(&pod);
        assert_eq!((shims.len(), qemu.len()), (1, 1), "one shim and one VM");
        // The VM's processes run in the sandbox's cgroup under the pod's.
        let (_, _, backends) = vm_processes(&pod);
        let want = format!("{}/{pod}", pod_cgroup.parent);
        for pid in qemu.iter().chain(&backends) {
            let cgroups =
                std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            assert!(
                cgroups.lines().any(|l| l.ends_with(&want)),
                "VM process {pid} is not in {want}:\n{cgroups}"
            );
        }

        let c1_script = format!("echo hello-from-c1; echo oops >&2; {IDLE}");
        let c1 = start_container(
            &mut client,
            &pod,
            &pod_config,
            "c1",
            &["sh", "-c", &c1_script],
        )
        .await;
        let c2 = start_container(&mut client, &pod, &pod_config, "c2", &["sh", "-c", IDLE]).await;
        let (shims, qemu, _) = vm_processes(&pod);
        assert_eq!(
            (shims.len(), qemu.len()),
            (1, 1),
            "the containers joined the pod's VM"
        );

        // Both in one kernel, not the host's; separate root filesystems.
        let boot = "cat /proc/sys/kernel/random/boot_id";
        let b1 = out(&mut client, &c1, boot).await;
        assert_eq!(b1, out(&mut client, &c2, boot).await);
        assert_ne!(
            b1,
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap()
                .trim()
        );
        out(&mut client, &c1, "touch /only-in-c1").await;
        assert_eq!(
            out(
                &mut client,
                &c2,
                "test -e /only-in-c1 && echo yes || echo no"
            )
            .await,
            "no"
        );
        // CRI's hostname, /etc/hostname and /etc/hosts reach the guest; the
        // members share the pod's UTS namespace.
        assert_eq!(out(&mut client, &c1, "hostname").await, "web");
        assert_eq!(out(&mut client, &c2, "hostname").await, "web");
        assert_eq!(out(&mut client, &c2, "cat /etc/hostname").await, "web");
        assert!(out(&mut client, &c1, "cat /etc/hosts")
            .await
            .contains("localhost"));
        assert_eq!(out(&mut client, &c1, "echo $HUSK_CONTAINER").await, "c1");

        // ExecSync: exit codes, both streams, and a timeout.
        let r = exec_sync(
            &mut client,
            &c1,
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            30,
        )
        .await
        .expect("ExecSync");
        assert_eq!(r.exit_code, 3);
        assert_eq!(r.stdout, b"out\n");
        assert_eq!(r.stderr, b"err\n");
        assert_eq!(
            exec_sync(&mut client, &c2, &["true"], 30)
                .await
                .unwrap()
                .exit_code,
            0
        );
        let t = Instant::now();
        let timed_out = exec_sync(&mut client, &c1, &["sleep", "60"], 2).await;
        eprintln!(
            "ExecSync with a 2 s timeout: {timed_out:?} after {:?}",
            t.elapsed()
        );
        assert!(
            timed_out
                .as_ref()
                .is_err_and(|e| e.message().contains("timeout")),
            "{timed_out:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(30));
        assert!(
            !out(&mut client, &c1, "ps -o args")
                .await
                .contains("sleep 60"),
            "the timed-out exec still runs"
        );

        // Exec (streaming): CRI hands out a URL on its stream server.
        let url = client
            .exec(ExecRequest {
                container_id: c1.clone(),
                cmd: ["sh", "-c", "echo streamed; echo err >&2; exit 5"]
                    .map(String::from)
                    .to_vec(),
                stdout: true,
                stderr: true,
                ..Default::default()
            })
            .await
            .expect("Exec")
            .into_inner()
            .url;
        assert!(
            url.starts_with("http://127.0.0.1:") && url.contains("/exec/"),
            "{url}"
        );
        let streamed = exec_stream(&url)
            .await
            .expect("attaching to the exec stream");
        eprintln!("Exec (streaming): {streamed:?}");
        assert_eq!(streamed.stdout, b"streamed\n");
        assert_eq!(streamed.stderr, b"err\n");
        assert!(
            streamed.status.contains("NonZeroExitCode") && streamed.status.contains("\"5\""),
            "{}",
            streamed.status
        );

        // Logs in the CRI log path, in the CRI log format.
        let log = Path::new(&pod_config.log_directory).join("c1.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("oops") || Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let lines: Vec<_> = text
            .lines()
            .map(|l| parse_cri_log_line(l).unwrap_or_else(|| panic!("not CRI format: {l:?}")))
            .collect();
        assert!(lines.contains(&("stdout", "F", "hello-from-c1")), "{text}");
        assert!(lines.contains(&("stderr", "F", "oops")), "{text}");

        // Stats from the guest's cgroups.
        let stats = client
            .container_stats(ContainerStatsRequest {
                container_id: c1.clone(),
            })
            .await
            .expect("ContainerStats")
            .into_inner()
            .stats
            .expect("stats");
        let (cpu, mem) = cpu_and_working_set(stats.cpu, stats.memory);
        eprintln!("ContainerStats c1: cpu {cpu:?} ns, working set {mem:?} bytes");
        assert!(cpu.is_some_and(|v| v > 0), "cpu {cpu:?}");
        assert!(mem.is_some_and(|v| v > 0), "memory {mem:?}");
        // Pod stats: containerd reads the pod's host cgroup, where the VM runs,
        // so they show what the pod costs the host (guest memory included).
        let stats = client
            .pod_sandbox_stats(PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("PodSandboxStats: {e}"))
            .into_inner()
            .stats
            .and_then(|s| s.linux)
            .expect("linux pod stats");
        let (pod_cpu, pod_mem) = cpu_and_working_set(stats.cpu, stats.memory);
        eprintln!("PodSandboxStats: cpu {pod_cpu:?} ns, working set {pod_mem:?} bytes");
        // Booting the guest alone takes far more than a second of CPU (TCG) or
        // touches tens of MiB of guest memory (either accelerator).
        assert!(
            pod_cpu.is_some_and(|v| v > 100_000_000),
            "pod cpu {pod_cpu:?}"
        );
        assert!(
            pod_mem.is_some_and(|v| v > 32 << 20),
            "pod memory {pod_mem:?}"
        );

        stop_and_remove(&mut client, &pod, &[&c1, &c2]).await;
        (pod, pod_cgroup)
    });
    wait_gone(&cri, &pod);
    for dir in pod_cgroup.child_dirs(&pod) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    drop(pod_cgroup);
    let logs = std::fs::read_dir(cri.log_root.join("web")).unwrap().count();
    assert_eq!(logs, 2, "both containers' logs stay after removal");
}

#[test]
fn sandbox_with_bad_config_is_rejected() {
    let Some((_g, cri)) = setup("sandbox_with_bad_config_is_rejected") else {
        return;
    };
    test_runtime().block_on(async {
        let mut client = cri.runtime().await.unwrap();
        let err = run_pod(&mut client, cri.pod_config("bad"), BAD_HANDLER)
            .await
            .expect_err("a sandbox with a bad husk config must fail");
        eprintln!("bad config: {}", err.message());
        assert!(
            err.message().contains("no_such_key"),
            "the error names the key: {}",
            err.message()
        );
        // CRI removed what it had made; no pod is listed.
        let pods = client
            .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items;
        assert!(pods.is_empty(), "{pods:?}");
    });
}

#[test]
fn pods_in_a_loop_leave_nothing_behind() {
    let Some((_g, cri)) = setup("pods_in_a_loop_leave_nothing_behind") else {
        return;
    };
    let n: usize = std::env::var("HUSK_CRI_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    test_runtime().block_on(async {
        let mut client = cri.runtime().await.unwrap();
        let mut times = Vec::new();
        for i in 0..n {
            let name = format!("loop{i}");
            let mut config = cri.pod_config(&name);
            let pod_cgroup =
                KubeletPodCgroup::create(&format!("husk-test-{}/pod-{name}", std::process::id()))
                    .expect("pod cgroup");
            if let Some(linux) = config.linux.as_mut() {
                linux.cgroup_parent = pod_cgroup.parent.clone();
            }
            let t0 = Instant::now();
            let pod = run_pod(&mut client, config.clone(), HANDLER)
                .await
                .unwrap_or_else(|e| {
                    panic!("RunPodSandbox {name}: {e}\n{}", tail(&cri.containerd.log()))
                });
            times.push(t0.elapsed());
            let c = start_container(&mut client, &pod, &config, "app", &["sh", "-c", IDLE]).await;
            assert_eq!(out(&mut client, &c, "hostname").await, name);
            stop_and_remove(&mut client, &pod, &[&c]).await;
            wait_gone(&cri, &pod);
            for dir in pod_cgroup.child_dirs(&pod) {
                assert!(!dir.exists(), "{} left behind", dir.display());
            }
        }
        let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
        eprintln!("RunPodSandbox to ready, {n} pods: {ms:?} ms");
    });
    // Every pod was checked as it went; no shim of this containerd (they
    // are given its socket) is left either. (Other husk VMs on the host may
    // belong to other tests.)
    let socket = cri.containerd.socket().to_string_lossy().into_owned();
    assert_eq!(
        processes_matching(&format!("-address {socket}")),
        Vec::<u32>::new(),
        "shims leaked"
    );
    // CNI: every pod's veth went with it (only the bridge is left).
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", &cri.bridge])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&links.stdout).trim(),
        "",
        "veths leaked"
    );
}
