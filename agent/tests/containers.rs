//! Runs real containers through the agent: the agent binary as PID 1 of
//! fresh PID, mount, UTS and cgroup namespaces (as in a VM), serving a Unix
//! socket, with busybox containers on a tempdir "share".
//!
//! cgroup v2: the test makes a cgroup of its own in the host's cgroup2
//! hierarchy (pure v2, or the `unified` mount of a hybrid host), and mounts
//! cgroup2 in the namespace with that cgroup as its root, so the agent's
//! /sys/fs/cgroup/husk/<id> land inside it and the host's cgroups are never
//! touched. On a hybrid host that hierarchy has no memory/pids/io
//! controllers: stats report those as unavailable, which is checked; the
//! freezer and process lists are core cgroup v2 and are tested.
//!
//! Needs root (namespaces, mounts, cgroups) and busybox; without them it
//! says SKIPPED and why.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use husk_protocol::{
    agent::{
        CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest, ListProcessesRequest,
        PauseContainerRequest, ReadStreamRequest, RemoveContainerRequest, ResumeContainerRequest,
        ShutdownRequest, SignalProcessRequest, StartContainerRequest, StatsContainerRequest,
        TtyWinResizeRequest, WaitProcessRequest, WaitProcessResponse, WriteStdinRequest,
    },
    agent_ttrpc::AgentServiceClient,
};
use serde_json::json;
use ttrpc::context;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "mkdir", "ls", "stty", "tty", "id", "true",
];

struct Namespace {
    child: Child,
    cgroup: PathBuf,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Every process goes with the namespace (unshare --kill-child), if
        // not at once; then the test's cgroups are removed bottom-up (rmdir
        // only: cgroupfs has no files to delete).
        let deadline = Instant::now() + Duration::from_secs(5);
        while remove_cgroup_tree(&self.cgroup).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_cgroup_tree(&e.path())?;
        }
    }
    fs::remove_dir(dir)
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

/// The host's cgroup2 hierarchy, if it has one.
fn cgroup2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
}

fn skip(reason: &str) {
    husk_skip::missing("runs_containers_through_the_agent", reason);
}

/// A busybox root filesystem.
fn make_rootfs(dir: &Path) {
    for d in ["bin", "proc", "dev", "tmp", "etc"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::copy(BUSYBOX, dir.join("bin/busybox")).unwrap();
    for a in APPLETS {
        symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
}

fn spec(args: &[&str], terminal: bool, seccomp: bool) -> Vec<u8> {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    let mut s = json!({
        "ociVersion": "1.0.2",
        "root": {"path": "ignored-the-agent-sets-it", "readonly": false},
        "hostname": "c",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
        ],
        "linux": {
            // Rewritten to /husk/<id> by the agent.
            "cgroupsPath": "/host/view/of/things",
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                // The host's network namespace path means nothing in a guest.
                {"type": "network", "path": "/var/run/netns/cni-test"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    if seccomp {
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
    }
    serde_json::to_vec(&s).unwrap()
}

fn process(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/"
    }))
    .unwrap()
}

struct Client(AgentServiceClient);

impl Client {
    async fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let req = ReadStreamRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                wait_ms: 1000,
                ..Default::default()
            };
            let r = if stderr {
                self.0.read_stderr(ctx(), &req).await
            } else {
                self.0.read_stdout(ctx(), &req).await
            }
            .unwrap();
            out.extend(r.data);
            if r.eof {
                break;
            }
            assert!(Instant::now() < deadline, "no EOF; so far {out:?}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn read_until(&self, id: &str, exec_id: &str, want: &str) -> String {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&out).contains(want) {
            assert!(
                Instant::now() < deadline,
                "{want:?} never came; got {:?}",
                String::from_utf8_lossy(&out)
            );
            let r = self
                .0
                .read_stdout(
                    ctx(),
                    &ReadStreamRequest {
                        container_id: id.into(),
                        exec_id: exec_id.into(),
                        wait_ms: 1000,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            out.extend(r.data);
            assert!(
                !r.eof || String::from_utf8_lossy(&out).contains(want),
                "EOF before {want:?}: {out:?}"
            );
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn wait(&self, id: &str, exec_id: &str) -> WaitProcessResponse {
        self.0
            .wait_process(
                ctx(),
                &WaitProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }

    async fn create(&self, id: &str, spec: Vec<u8>, terminal: bool) -> ttrpc::Result<u32> {
        self.0
            .create_container(
                ctx(),
                &CreateContainerRequest {
                    container_id: id.into(),
                    oci_spec: spec,
                    rootfs: String::new(),
                    terminal,
                    ..Default::default()
                },
            )
            .await
            .map(|r| r.pid)
    }

    async fn start(&self, id: &str) -> ttrpc::Result<()> {
        self.0
            .start_container(
                ctx(),
                &StartContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
            .map(|_| ())
    }

    async fn remove(&self, id: &str, force: bool) -> ttrpc::Result<()> {
        self.0
            .remove_container(
                ctx(),
                &RemoveContainerRequest {
                    container_id: id.into(),
                    force,
                    ..Default::default()
                },
            )
            .await
            .map(|_| ())
    }
}

fn code(r: ttrpc::Result<impl std::fmt::Debug>) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_containers_through_the_agent() {
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root (namespaces, mounts, cgroups)");
    }
    if !Path::new(BUSYBOX).exists() {
        return skip("needs a static /bin/busybox (Debian's busybox-static)");
    }
    let Some(cgroup2) = cgroup2_mount() else {
        return skip("the host has no cgroup2 hierarchy to mount in the namespace");
    };
    // Not under /tmp or /run: the agent, as PID 1, may mount over those.
    // The target directory itself may be under /tmp (a CI checkout).
    let dir = tempfile::Builder::new()
        .prefix("husk-agent-containers-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let share = dir.path().join("share");
    for id in ["c1", "c2", "c3"] {
        make_rootfs(&share.join(id).join("rootfs"));
    }
    let sock = dir.path().join("agent.sock");
    let cgroup = cgroup2.join(format!("husk-test-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&cgroup) {
        return skip(&format!("cannot create cgroup {}: {e}", cgroup.display()));
    }

    // As PID 1 of the new namespaces: /proc is unmounted for the agent to
    // mount afresh (this PID namespace's), /run gets a private tmpfs (the
    // agent's state), and cgroup2 is mounted with the test's cgroup as root.
    let script = r#"
        set -e
        echo $$ > "$CG/cgroup.procs"
        exec unshare --cgroup sh -c '
            set -e
            mount -t tmpfs -o mode=755 run /run
            umount -l /sys/fs/cgroup
            mount -t cgroup2 cgroup2 /sys/fs/cgroup
            mkdir /sys/fs/cgroup/agent
            echo $$ > /sys/fs/cgroup/agent/cgroup.procs
            # Last: umount(8) reads /proc/self/mountinfo.
            umount -l /proc
            exec "$AGENT" "--listen=unix://$SOCK"
        '
    "#;
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", script])
        .env("CG", &cgroup)
        .env("AGENT", env!("CARGO_BIN_EXE_husk-agent"))
        .env("SOCK", &sock)
        .env("RUST_LOG", "info,husk_agent=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning unshare");
    let stderr = child.stderr.take().unwrap();
    let ns = Namespace { child, cgroup };

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("agent: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("husk-agent: ready on") => break,
            Ok(_) => {}
            Err(_) => panic!("agent did not report ready"),
        }
    }

    let c = Client(AgentServiceClient::new(
        ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap(),
    ));
    c.0.create_sandbox(
        ctx(),
        &CreateSandboxRequest {
            hostname: "husk-test".into(),
            share_mount_point: share.to_str().unwrap().into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // --- Malformed requests are refused with the right code. ---
    let (code_, msg) = code(c.create("bad", b"{".to_vec(), false).await);
    assert_eq!(code_, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.starts_with("oci_spec: "), "{msg}");
    let (code_, msg) = code(c.create("c/1", spec(&["true"], false, false), false).await);
    assert_eq!(code_, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    let (code_, _) = code(c.start("nope").await);
    assert_eq!(code_, ttrpc::Code::NOT_FOUND);

    // --- c1: output, stderr and an exit code. ---
    let pid = c
        .create(
            "c1",
            spec(
                &["sh", "-c", "echo hello; echo oops >&2; exit 3"],
                false,
                false,
            ),
            false,
        )
        .await
        .unwrap();
    assert!(pid > 1);
    let (code_, _) = code(c.create("c1", spec(&["true"], false, false), false).await);
    assert_eq!(code_, ttrpc::Code::ALREADY_EXISTS);
    c.start("c1").await.unwrap();
    let w = c.wait("c1", "").await;
    assert_eq!((w.exit_status, w.signal, w.pid), (3, 0, pid));
    assert_eq!(c.read_all("c1", "", false).await, "hello\n");
    assert_eq!(c.read_all("c1", "", true).await, "oops\n");
    let (code_, _) = code(c.start("c1").await);
    assert_eq!(code_, ttrpc::Code::FAILED_PRECONDITION);
    c.remove("c1", false).await.unwrap();
    let (code_, _) = code(c.start("c1").await);
    assert_eq!(code_, ttrpc::Code::NOT_FOUND);

    // --- c2: stdin, exec, seccomp, pause/resume, stats, kill. ---
    let init = c
        .create(
            "c2",
            spec(
                &["sh", "-c", "read line; echo got:$line; exec sleep 1000"],
                false,
                true,
            ),
            false,
        )
        .await
        .unwrap();
    c.start("c2").await.unwrap();
    c.0.write_stdin(
        ctx(),
        &WriteStdinRequest {
            container_id: "c2".into(),
            data: b"ping\n".to_vec(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.read_until("c2", "", "got:ping\n").await;

    // The spec's seccomp profile is enforced, in exec'ed processes too.
    let exec = |exec_id: &'static str, args: &'static [&'static str]| ExecProcessRequest {
        container_id: "c2".into(),
        exec_id: exec_id.into(),
        process: process(args),
        terminal: false,
        ..Default::default()
    };
    c.0.exec_process(
        ctx(),
        &exec("e1", &["sh", "-c", "echo from-exec; mkdir /tmp/x"]),
    )
    .await
    .unwrap();
    let w = c.wait("c2", "e1").await;
    assert_eq!(w.exit_status, 1, "mkdir should fail under seccomp");
    assert_eq!(c.read_all("c2", "e1", false).await, "from-exec\n");
    let err = c.read_all("c2", "e1", true).await;
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code_, _) = code(c.0.exec_process(ctx(), &exec("e1", &["true"])).await);
    assert_eq!(code_, ttrpc::Code::ALREADY_EXISTS);
    let (code_, msg) = code(
        c.0.exec_process(ctx(), &exec("e2", &["/no/such/binary"]))
            .await,
    );
    assert_ne!(code_, ttrpc::Code::OK, "{msg}");

    let procs =
        c.0.list_processes(
            ctx(),
            &ListProcessesRequest {
                container_id: "c2".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(procs.pids.contains(&init), "{:?} lacks {init}", procs.pids);

    c.0.pause_container(
        ctx(),
        &PauseContainerRequest {
            container_id: "c2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (code_, _) = code(c.0.exec_process(ctx(), &exec("e3", &["true"])).await);
    assert_eq!(code_, ttrpc::Code::FAILED_PRECONDITION);
    c.0.resume_container(
        ctx(),
        &ResumeContainerRequest {
            container_id: "c2".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let stats =
        c.0.stats_container(
            ctx(),
            &StatsContainerRequest {
                container_id: "c2".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eprintln!("stats: {stats:?}");
    assert!(stats.cpu.usage_ns > 0 || stats.unavailable.iter().any(|u| u.starts_with("cpu.stat")));

    let (code_, _) = code(c.remove("c2", false).await);
    assert_eq!(code_, ttrpc::Code::FAILED_PRECONDITION);
    c.0.signal_process(
        ctx(),
        &SignalProcessRequest {
            container_id: "c2".into(),
            signal: libc::SIGKILL as u32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let w = c.wait("c2", "").await;
    assert_eq!((w.exit_status, w.signal), (137, libc::SIGKILL as u32));
    c.remove("c2", false).await.unwrap();

    // --- c3: a terminal. ---
    c.create(
        "c3",
        spec(&["sh", "-c", "tty; stty size"], true, false),
        true,
    )
    .await
    .unwrap();
    c.0.tty_win_resize(
        ctx(),
        &TtyWinResizeRequest {
            container_id: "c3".into(),
            rows: 30,
            columns: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.start("c3").await.unwrap();
    let out = c.read_all("c3", "", false).await;
    assert!(
        out.contains("/dev/pts/0") && out.contains("30 100"),
        "{out:?}"
    );
    assert_eq!(c.wait("c3", "").await.exit_status, 0);
    c.remove("c3", false).await.unwrap();

    c.0.shutdown(ctx(), &ShutdownRequest::new()).await.unwrap();
    drop(ns);
}
