//! Containers inside a pod VM, each number next to the same work on the host
//! in the same run (`name: value unit` lines):
//! - create+start to first output of a container in a running VM, next to
//!   `runc run` of the same rootfs and spec on the host;
//! - exec latency (exec of `true` to its exit status), next to `runc exec`;
//! - virtio-fs read and write throughput and the small-file create+unlink
//!   rate, next to the same busybox commands on the host directory the share
//!   exports. Guest figures are exec time minus the exec of `true`.
//!
//! Under TCG (hosts without VMX/SVM) the guest runs emulated: guest numbers
//! then measure QEMU's TCG as much as husk.

use std::{
    fs,
    io::Read,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use husk_tests::{
    oci_spec,
    pod::{sh, Pod, SHARE_IN_GUEST},
};
use serde_json::json;

const RUNS: usize = 5;
const MIB: usize = 32;

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

/// `runc run` of the busybox rootfs with `args`, spawn to first stdout byte.
fn runc_first_output(dir: &Path, id: &str, args: &[&str]) -> Result<Duration> {
    let bundle = dir.join(id);
    let rootfs = husk_tests::rootfs::build_busybox_rootfs(&bundle.join("rootfs"))?;
    let mut spec = oci_spec::default_spec(args);
    spec["root"]["path"] = json!(rootfs);
    fs::write(bundle.join("config.json"), serde_json::to_vec(&spec)?)?;
    let start = Instant::now();
    let mut child = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running runc (install Debian's runc)")?;
    let mut first = [0u8; 1];
    let got = child
        .stdout
        .as_mut()
        .map(|o| o.read(&mut first))
        .transpose()?;
    let took = start.elapsed();
    let status = child.wait()?;
    if got != Some(1) || !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("runc run {id} failed ({status}): {err}");
    }
    Ok(took)
}

/// `runc exec <id> true` against a running host container.
fn runc_exec_true(id: &str) -> Result<Duration> {
    let start = Instant::now();
    let status = Command::new("runc").args(["exec", id, "true"]).status()?;
    if !status.success() {
        bail!("runc exec {id} true failed: {status}");
    }
    Ok(start.elapsed())
}

fn host_sh(script: &str) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new(husk_tests::rootfs::BUSYBOX)
        .args(["sh", "-c", script])
        .output()?;
    if !out.status.success() {
        bail!("host: {script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(start.elapsed())
}

async fn guest_exec(pod: &Pod, cid: &str, n: usize, script: &str) -> Result<Duration> {
    let exec_id = format!("b{n}");
    let p = serde_json::to_vec(&oci_spec::process(&["sh", "-c", script]))?;
    let start = Instant::now();
    pod.agent.exec_process(cid, &exec_id, &p, false).await?;
    let out = pod.collect(cid, &exec_id).await;
    let took = start.elapsed();
    pod.agent.remove_process(cid, &exec_id).await?;
    if out.status.code != 0 {
        bail!("guest: {script}: exit {:?}: {}", out.status, out.stderr);
    }
    Ok(took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let pod = Pod::boot("cbench").await;
    let host_dir = tempfile::Builder::new()
        .prefix("husk-cbench-")
        .tempdir_in("/var/tmp")?;

    // Create+start to first output, husk vs runc on the host.
    let (mut husk, mut runc) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let id = format!("first{i}");
        pod.rootfs(&id);
        let spec = serde_json::to_vec(&sh("echo hi"))?;
        let start = Instant::now();
        pod.agent
            .create_container(&id, &spec, &format!("{id}/rootfs"), false)
            .await?;
        pod.agent.start_container(&id).await?;
        let first = pod
            .agent
            .read_stdout(&id, "", Duration::from_secs(30))
            .await?;
        husk.push(ms(start.elapsed()));
        if first.as_deref().unwrap_or_default().is_empty() {
            bail!("container {id} printed nothing");
        }
        pod.collect(&id, "").await;
        pod.agent.remove_container(&id, false).await?;
        runc.push(ms(runc_first_output(
            host_dir.path(),
            &format!("husk-bench-{i}"),
            &["echo", "hi"],
        )?));
    }
    let (h, r) = (median(husk), median(runc));
    line("container_create_start_to_first_output", h, "ms");
    line("  runc_on_host", r, "ms");
    line("  husk_vs_runc", h / r, "x");

    // A long-running container for exec and file system work, with the
    // share's data directory bound at /data.
    let data = pod.shared.join("data");
    fs::create_dir_all(&data)?;
    for i in 0..RUNS {
        let mut f = fs::File::create(data.join(format!("big{i}")))?;
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..MIB {
            std::io::Write::write_all(&mut f, &chunk)?;
        }
    }
    let mut spec = oci_spec::default_spec(&["sleep", "100000"]);
    spec["mounts"].as_array_mut().context("mounts")?.push(json!({
        "destination": "/data", "type": "bind", "source": format!("{SHARE_IN_GUEST}/data"), "options": ["rbind", "rw"]
    }));
    pod.rootfs("runner");
    pod.agent
        .create_container(
            "runner",
            &serde_json::to_vec(&spec)?,
            "runner/rootfs",
            false,
        )
        .await?;
    pod.agent.start_container("runner").await?;

    // The same for runc on the host: a detached container to exec into.
    let bundle = host_dir.path().join("runner");
    let rootfs = husk_tests::rootfs::build_busybox_rootfs(&bundle.join("rootfs"))?;
    let mut hspec = oci_spec::default_spec(&["sleep", "100000"]);
    hspec["root"]["path"] = json!(rootfs);
    fs::write(bundle.join("config.json"), serde_json::to_vec(&hspec)?)?;
    let status = Command::new("runc")
        .args(["run", "--detach", "--bundle"])
        .arg(&bundle)
        .arg("husk-bench-runner")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("runc run --detach failed: {status}");
    }

    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    let (mut husk, mut runc) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        husk.push(ms(guest_exec(&pod, "runner", next(), "true").await?));
        runc.push(ms(runc_exec_true("husk-bench-runner")?));
    }
    let exec_true = median(husk);
    let runc_exec = median(runc);
    line("exec_latency", exec_true, "ms");
    line("  runc_exec_on_host", runc_exec, "ms");
    line("  husk_vs_runc", exec_true / runc_exec, "x");

    let mib = MIB as f64;
    let host = data.to_string_lossy().into_owned();
    let (mut g, mut hst) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let t = ms(guest_exec(
            &pod,
            "runner",
            next(),
            &format!("dd if=/data/big{i} of=/dev/null bs=1M 2>/dev/null"),
        )
        .await?);
        g.push(mib / ((t - exec_true).max(1.0) / 1000.0));
        let t = ms(host_sh(&format!(
            "dd if={host}/big{i} of=/dev/null bs=1M 2>/dev/null"
        ))?);
        hst.push(mib / (t / 1000.0));
    }
    let (gr, hr) = (median(g), median(hst));
    line("virtiofs_read", gr, "MiB/s");
    line("  host_read", hr, "MiB/s");
    line("  virtiofs_vs_host", gr / hr, "x");

    let (mut g, mut hst) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let t = ms(guest_exec(
            &pod,
            "runner",
            next(),
            &format!("dd if=/dev/zero of=/data/out{i} bs=1M count={MIB} conv=fsync 2>/dev/null"),
        )
        .await?);
        g.push(mib / ((t - exec_true).max(1.0) / 1000.0));
        let t = ms(host_sh(&format!(
            "dd if=/dev/zero of={host}/hout{i} bs=1M count={MIB} conv=fsync 2>/dev/null"
        ))?);
        hst.push(mib / (t / 1000.0));
    }
    let (gw, hw) = (median(g), median(hst));
    line("virtiofs_write_fsync", gw, "MiB/s");
    line("  host_write_fsync", hw, "MiB/s");
    line("  virtiofs_vs_host", gw / hw, "x");

    const FILES: usize = 200;
    let churn = |dir: &str| {
        format!("mkdir -p {dir} && cd {dir} && i=0; while [ $i -lt {FILES} ]; do : > f$i; rm f$i; i=$((i+1)); done")
    };
    let (mut g, mut gt, mut hst) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let t = ms(guest_exec(&pod, "runner", next(), &churn(&format!("/data/m{i}"))).await?);
        g.push(FILES as f64 / ((t - exec_true).max(1.0) / 1000.0));
        let t = ms(guest_exec(&pod, "runner", next(), &churn(&format!("/tmp/m{i}"))).await?);
        gt.push(FILES as f64 / ((t - exec_true).max(1.0) / 1000.0));
        let t = ms(host_sh(&churn(&format!("{host}/hm{i}")))?);
        hst.push(FILES as f64 / (t / 1000.0));
    }
    let (gm, gtm, hm) = (median(g), median(gt), median(hst));
    line("virtiofs_create_unlink", gm, "pairs/s");
    line("  guest_tmpfs_create_unlink", gtm, "pairs/s");
    line("  host_create_unlink", hm, "pairs/s");
    line("  virtiofs_vs_host", gm / hm, "x");

    let _ = Command::new("runc")
        .args(["delete", "--force", "husk-bench-runner"])
        .status();
    pod.agent.signal_process("runner", "", 9, true).await?;
    pod.collect("runner", "").await;
    pod.agent.remove_container("runner", false).await?;
    pod.shutdown().await;
    Ok(())
}
