//! Runs the agent as PID 1 of fresh PID, mount, UTS and cgroup namespaces
//! (via unshare(1)), so its init duties and its reboot path run for real
//! without a VM: the mounts land in a private mount namespace, and reboot(2)
//! from a non-initial PID namespace only kills that namespace's init (with
//! SIGHUP for a restart), which is what the test checks for.
//!
//! Inside the namespace /proc and /dev are lazily unmounted first, so the
//! agent mounts them afresh as in a VM; /sys is left alone (the agent then
//! skips it and cgroup2, as already-mounted), because a fresh cgroup2 mount
//! here would be the host's own root cgroup, whose controllers a test must
//! not change. The VM end-to-end tests cover those two.
//!
//! Needs root: without it the test says SKIPPED and why.
//!
//! Test code: an unwrap is the assertion that the step worked.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use husk_protocol::{
    agent::{GuestDetailsRequest, HealthRequest, ShutdownRequest},
    agent_ttrpc::AgentServiceClient,
};
use ttrpc::context;

struct Unshare(Child);

impl Drop for Unshare {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(5).as_nanos() as i64)
}

/// The agent's pid as the host sees it: unshare's only child.
fn agent_host_pid(unshare_pid: u32) -> u32 {
    let children = fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
        .expect("reading unshare's children");
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("unshare has no child")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_pid1_and_reboots_its_namespace_on_shutdown() {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing(
            "runs_as_pid1_and_reboots_its_namespace_on_shutdown",
            "needs root (unshare of PID and mount namespaces)",
        );
        return;
    }
    // Not under /tmp or /run: the agent mounts fresh tmpfs over those inside
    // its namespace, which would hide the socket from this side. The target
    // directory itself may be under /tmp (a CI checkout), so use /var/tmp.
    let dir = tempfile::Builder::new()
        .prefix("husk-agent-pid1-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let sock = dir.path().join("agent.sock");

    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--cgroup",
            "--propagation",
            "private",
        ])
        .arg(env!("CARGO_BIN_EXE_husk-agent"))
        // Stray words, as the kernel passes unknown parameters to /init.
        .arg("quiet")
        .arg(format!("--listen=unix://{}", sock.display()))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        // Not inherited: an agent outliving a failed test would hold this
        // process's stdout open.
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning unshare");
    let stderr = child.stderr.take().unwrap();
    let mut unshare = Unshare(child);

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("agent: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = Vec::new();
    while !log
        .iter()
        .any(|l: &String| l.contains("husk-agent: ready on"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        log.push(rx.recv_timeout(left).expect("agent did not report ready"));
    }
    assert!(
        log.iter()
            .any(|l| l.contains("ignoring argument") && l.contains("quiet")),
        "stray argument not reported: {log:?}"
    );

    // Bytes, read lossily: a mount point elsewhere on the host may have any name.
    let mountinfo = String::from_utf8_lossy(
        &fs::read(format!(
            "/proc/{}/mountinfo",
            agent_host_pid(unshare.0.id())
        ))
        .unwrap(),
    )
    .into_owned();
    for (target, fstype) in [
        ("/proc", "proc"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/run", "tmpfs"),
        ("/tmp", "tmpfs"),
    ] {
        let found = mountinfo.lines().rev().any(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-");
            fields.get(4) == Some(&target) && sep.and_then(|s| fields.get(s + 1)) == Some(&fstype)
        });
        assert!(found, "no {fstype} on {target} in:\n{mountinfo}");
    }

    let client = AgentServiceClient::new(
        ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap(),
    );
    client.health(ctx(), &HealthRequest::new()).await.unwrap();
    let details = client
        .get_guest_details(ctx(), &GuestDetailsRequest::new())
        .await
        .unwrap();
    assert!(details.cpus >= 1 && details.memory_total_bytes > 0);
    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = unshare.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not reboot its namespace"
        );
        thread::sleep(Duration::from_millis(20));
    };
    // unshare(1) passes on its child's death by signal either by dying of the
    // same signal or as 128 + signal, depending on its version.
    assert!(
        status.signal() == Some(libc::SIGHUP) || status.code() == Some(128 + libc::SIGHUP),
        "expected the namespace's init to be ended by a restart (SIGHUP): {status}"
    );
    assert!(
        Path::new(&sock).exists(),
        "PID 1 does not clean up; the VM ends"
    );
}
