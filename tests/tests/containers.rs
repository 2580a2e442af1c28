//! OCI containers inside a real pod VM (husk's kernel, initrd and agent; the
//! rootfs reaches the guest over husk-vmm's virtio-fs), checked for the
//! behaviour runc gives on a host: output, exit codes, signals, exec, stdin,
//! tty, users, mounts, capabilities, seccomp, cgroup limits. The VM is the
//! shim's pick for this host (QEMU TCG here); the last test runs the others
//! on husk-vmm (in-process virtio-fs) inside an emulated KVM host.

use std::time::Duration;

use husk_shim::agent_client::ExitStatus;
use husk_tests::{
    oci_spec,
    pod::{sh, Pod, SHARE_IN_GUEST},
    rootfs::build_busybox_rootfs,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_behave_as_under_runc() {
    let pod = Pod::boot("procs").await;

    // The shim mounts each container's rootfs under the share after the VM
    // booted: such a mount must reach the guest (through husk-vmm's jail too).
    if nix::unistd::geteuid().is_root() {
        let elsewhere = tempfile::tempdir().unwrap();
        let built = build_busybox_rootfs(&elsewhere.path().join("rootfs")).unwrap();
        std::fs::write(built.join("late-marker"), "mounted after boot\n").unwrap();
        let target = pod.shared.join("late").join("rootfs");
        std::fs::create_dir_all(&target).unwrap();
        nix::mount::mount(
            Some(&built),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let out = pod.run("late", &sh("cat /late-marker")).await;
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(out.stdout, "mounted after boot\n", "stderr: {}", out.stderr);
    } else {
        husk_skip::missing(
            "processes_behave_as_under_runc (the rootfs mounted after boot)",
            "needs root to mount",
        );
    }

    let out = pod.run("echo", &sh("echo out; echo err >&2; exit 7")).await;
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(out.status, ExitStatus { code: 7, signal: 0 });

    let mut spec = sh("echo $FOO $(pwd)");
    spec["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!("FOO=bar"));
    spec["process"]["cwd"] = json!("/tmp");
    assert_eq!(pod.run("envcwd", &spec).await.stdout, "bar /tmp\n");

    let mut spec = oci_spec::default_spec(&["id"]);
    spec["process"]["user"] = json!({ "uid": 1000, "gid": 1000, "additionalGids": [2000] });
    let id = pod.run("user", &spec).await.stdout;
    assert!(
        id.contains("uid=1000(husk)")
            && id.contains("gid=1000(husk)")
            && id.contains("2000(extra)"),
        "{id}"
    );

    let mut spec = oci_spec::default_spec(&["hostname"]);
    spec["hostname"] = json!("pod-a");
    assert_eq!(pod.run("host", &spec).await.stdout, "pod-a\n");

    // SIGTERM reaches a handler; SIGKILL cannot be caught.
    pod.create(
        "term",
        &sh("trap 'echo got TERM; exit 42' TERM; echo ready; while true; do sleep 0.1; done"),
        false,
    )
    .await
    .unwrap();
    pod.agent.start_container("term").await.unwrap();
    let first = pod
        .agent
        .read_stdout("term", "", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(String::from_utf8_lossy(&first).contains("ready"));
    pod.agent
        .signal_process("term", "", 15, false)
        .await
        .unwrap();
    let out = pod.collect("term", "").await;
    assert!(out.stdout.contains("got TERM"), "{}", out.stdout);
    assert_eq!(out.status.code, 42);
    pod.agent.remove_container("term", false).await.unwrap();

    pod.create(
        "sleeper",
        &oci_spec::default_spec(&["sleep", "1000"]),
        false,
    )
    .await
    .unwrap();
    pod.agent.start_container("sleeper").await.unwrap();

    // exec into the running container, with its own stdio and exit code.
    let p =
        serde_json::to_vec(&oci_spec::process(&["sh", "-c", "echo from-exec; exit 3"])).unwrap();
    pod.agent
        .exec_process("sleeper", "e1", &p, false)
        .await
        .unwrap();
    let out = pod.collect("sleeper", "e1").await;
    assert_eq!(out.stdout, "from-exec\n");
    assert_eq!(out.status.code, 3);
    pod.agent.remove_process("sleeper", "e1").await.unwrap();

    // Death by signal. (Not the container's init: PID 1 of a PID namespace
    // ignores signals it has no handler for, under runc too.)
    let p = serde_json::to_vec(&oci_spec::process(&["sh", "-c", "kill -KILL $$"])).unwrap();
    pod.agent
        .exec_process("sleeper", "selfkill", &p, false)
        .await
        .unwrap();
    let out = pod.collect("sleeper", "selfkill").await;
    assert_eq!(
        out.status,
        ExitStatus {
            code: 137,
            signal: 9
        }
    );

    // stdin to an exec'ed cat, then EOF.
    let p = serde_json::to_vec(&oci_spec::process(&["cat"])).unwrap();
    pod.agent
        .exec_process("sleeper", "cat", &p, false)
        .await
        .unwrap();
    pod.agent
        .write_stdin("sleeper", "cat", b"hello stdin\n")
        .await
        .unwrap();
    pod.agent.close_stdin("sleeper", "cat").await.unwrap();
    let out = pod.collect("sleeper", "cat").await;
    assert_eq!(out.stdout, "hello stdin\n");
    assert_eq!(out.status.code, 0);

    pod.agent
        .signal_process("sleeper", "", 9, false)
        .await
        .unwrap();
    let out = pod.collect("sleeper", "").await;
    assert_eq!(
        out.status,
        ExitStatus {
            code: 137,
            signal: 9
        }
    );
    pod.agent.remove_container("sleeper", false).await.unwrap();
    pod.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_mounts_capabilities_and_seccomp() {
    let pod = Pod::boot("isolation").await;

    let mut spec = sh("touch /newfile");
    spec["root"]["readonly"] = json!(true);
    let out = pod.run("rofs", &spec).await;
    assert_ne!(out.status.code, 0);
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );

    // A tmpfs and a read-only bind mount of a directory from the pod share.
    let data = pod.shared.join("bind-src");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hello"), "from the host\n").unwrap();
    let mut spec = sh(
        "echo scratch > /scratch/f && cat /scratch/f /data/hello && ! touch /data/x 2>/dev/null",
    );
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.push(json!({ "destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=1m"] }));
    mounts.push(json!({ "destination": "/data", "type": "bind", "source": format!("{SHARE_IN_GUEST}/bind-src"), "options": ["rbind", "ro"] }));
    let out = pod.run("mounts", &spec).await;
    assert_eq!(
        out.stdout, "scratch\nfrom the host\n",
        "stderr: {}",
        out.stderr
    );
    assert_eq!(out.status.code, 0);

    // CAP_NET_ADMIN is not in the default set.
    let out = pod.run("caps", &sh("ip link set lo mtu 1400")).await;
    assert_ne!(out.status.code, 0);
    assert!(out.stderr.contains("not permitted"), "{}", out.stderr);

    // A seccomp profile that denies mkdir must be enforced, not ignored.
    let mut spec = sh("mkdir /tmp/denied");
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{ "names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }]
    });
    let out = pod.run("seccomp", &spec).await;
    assert_ne!(out.status.code, 0);
    assert!(out.stderr.contains("not permitted"), "{}", out.stderr);
    pod.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_limits_stats_updates_and_freezing() {
    let pod = Pod::boot("cgroups").await;

    // A memory limit that the container exceeds: OOM kill and OOM event.
    let mut spec = sh("x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done");
    spec["linux"]["resources"]["memory"] =
        json!({ "limit": 32 * 1024 * 1024, "swap": 32 * 1024 * 1024 });
    pod.create("oom", &spec, false).await.unwrap();
    pod.agent.start_container("oom").await.unwrap();
    let event = pod.agent.oom_event(Duration::from_secs(60)).await.unwrap();
    assert_eq!(event.as_deref(), Some("oom"));
    let out = pod.collect("oom", "").await;
    assert_eq!(out.status.signal, 9, "OOM-killed: {:?}", out.status);
    let stats = pod.agent.stats("oom").await.unwrap();
    assert!(stats.memory.oom_kill_count >= 1, "{stats:?}");
    pod.agent.remove_container("oom", false).await.unwrap();

    // Its limits where workloads look for them (its own cgroup namespace, even when the
    // spec asks for none), and the pod's network sysctls applied in the guest's namespace.
    let mut spec = sh("cat /sys/fs/cgroup/memory.max /proc/sys/net/ipv4/ping_group_range");
    spec["linux"]["resources"]["memory"] = json!({ "limit": 48 * 1024 * 1024 });
    spec["linux"]["sysctl"] = json!({ "net.ipv4.ping_group_range": "0 2147483647" });
    spec["linux"]["namespaces"] =
        json!([{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }]);
    pod.create("limits", &spec, false).await.unwrap();
    pod.agent.start_container("limits").await.unwrap();
    let out = pod.collect("limits", "").await;
    assert_eq!(
        out.stdout.split_whitespace().collect::<Vec<_>>(),
        ["50331648", "0", "2147483647"],
        "stderr: {}",
        out.stderr
    );
    pod.agent.remove_container("limits", false).await.unwrap();

    // A ticking container: stats, process list, update, pause and resume.
    pod.create(
        "tick",
        &sh("while true; do echo tick; sleep 0.1; done"),
        false,
    )
    .await
    .unwrap();
    let init_pid = {
        pod.agent.start_container("tick").await.unwrap();
        let pids = pod.agent.list_processes("tick").await.unwrap();
        assert!(!pids.is_empty(), "processes of a running container");
        pids[0]
    };
    assert!(init_pid > 0);
    let stats = pod.agent.stats("tick").await.unwrap();
    assert!(
        stats.memory.usage_bytes > 0 && stats.pids.current >= 1,
        "{stats:?}"
    );

    let resources = serde_json::to_vec(
        &json!({ "memory": { "limit": 64 * 1024 * 1024 }, "pids": { "limit": 50 } }),
    )
    .unwrap();
    pod.agent
        .update_container("tick", &resources)
        .await
        .unwrap();
    let stats = pod.agent.stats("tick").await.unwrap();
    assert_eq!(stats.memory.limit_bytes, 64 * 1024 * 1024);
    assert_eq!(stats.pids.limit, 50);

    pod.agent.pause_container("tick").await.unwrap();
    // Drain what was written before the freeze, then expect silence.
    while let Some(d) = pod
        .agent
        .read_stdout("tick", "", Duration::from_millis(300))
        .await
        .unwrap()
    {
        if d.is_empty() {
            break;
        }
    }
    let quiet = pod
        .agent
        .read_stdout("tick", "", Duration::from_millis(800))
        .await
        .unwrap();
    assert_eq!(
        quiet.as_deref(),
        Some(&b""[..]),
        "a frozen container printed"
    );
    pod.agent.resume_container("tick").await.unwrap();
    let more = pod
        .agent
        .read_stdout("tick", "", Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&more).contains("tick"),
        "resumed container is silent"
    );

    pod.agent.signal_process("tick", "", 9, true).await.unwrap();
    pod.collect("tick", "").await;
    pod.agent.remove_container("tick", false).await.unwrap();
    pod.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containers_tty_removal_and_bad_specs() {
    let pod = Pod::boot("lifecycle").await;

    pod.create("a", &sh("sleep 1000"), false).await.unwrap();
    pod.create("b", &sh("sleep 1000"), false).await.unwrap();
    pod.agent.start_container("a").await.unwrap();
    pod.agent.start_container("b").await.unwrap();
    let pa = pod.agent.list_processes("a").await.unwrap();
    let pb = pod.agent.list_processes("b").await.unwrap();
    assert!(
        !pa.is_empty() && !pb.is_empty() && pa != pb,
        "{pa:?} {pb:?}"
    );
    for id in ["a", "b"] {
        pod.agent.signal_process(id, "", 9, true).await.unwrap();
        pod.collect(id, "").await;
        pod.agent.remove_container(id, false).await.unwrap();
        let gone = pod.agent.list_processes(id).await.unwrap_err();
        assert_eq!(gone.code(), Some(ttrpc::Code::NOT_FOUND), "{gone}");
        // Nothing in the guest still holds the rootfs: the host can delete it.
        std::fs::remove_dir_all(pod.shared.join(id)).unwrap();
    }
    // The same id can be used again: the removal left nothing behind. The
    // host just deleted and is about to recreate `<share>/a` behind the
    // guest's back; with virtio-fs cache=auto the guest trusts its cached
    // entries for up to 1 s, so give them that long to expire.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(pod.run("a", &sh("echo again")).await.stdout, "again\n");

    // A tty with a window size set before the process looks at it.
    let mut spec = sh("stty size");
    spec["process"]["terminal"] = json!(true);
    pod.create("tty", &spec, true).await.unwrap();
    pod.agent.tty_resize("tty", "", 40, 100).await.unwrap();
    pod.agent.start_container("tty").await.unwrap();
    let out = pod.collect("tty", "").await;
    assert_eq!(out.stdout.trim(), "40 100");
    pod.agent.remove_container("tty", false).await.unwrap();

    // Malformed specs: a clear error, and the VM keeps serving.
    for (id, bad) in [
        ("bad1", &b"{\"ociVersion\": "[..]),
        ("bad2", &b"{\"ociVersion\":\"1.0.2\"}"[..]),
    ] {
        pod.rootfs(id);
        let err = pod
            .agent
            .create_container(id, bad, &format!("{id}/rootfs"), false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ttrpc::Code::INVALID_ARGUMENT), "{err}");
    }
    let err = pod
        .agent
        .start_container("never-created")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ttrpc::Code::NOT_FOUND), "{err}");
    assert_eq!(
        pod.run("after", &sh("echo still fine")).await.stdout,
        "still fine\n"
    );
    pod.shutdown().await;
}

/// The tests above on husk-vmm, where this host cannot run them there itself.
#[test]
fn containers_on_husk_vmm_in_an_emulated_kvm_host() {
    const NAME: &str = "containers_on_husk_vmm_in_an_emulated_kvm_host";
    if husk_shim::hypervisor::detect::detect().kvm_usable {
        husk_skip::not_here(
            NAME,
            "this host's KVM runs the tests above on husk-vmm itself",
        );
        return;
    }
    husk_tests::nested::run_on_husk_vmm(
        NAME,
        &[
            "processes_behave_as_under_runc",
            "isolation_mounts_capabilities_and_seccomp",
            "cgroup_limits_stats_updates_and_freezing",
            "two_containers_tty_removal_and_bad_specs",
        ],
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
}
