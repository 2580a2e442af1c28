//! Pods, crashes and bad input: two containers sharing one pod VM (CRI
//! annotations), `kill -9` of the shim followed by containerd's cleanup
//! leaving nothing behind, and a malformed bundle answered with a clear error.

use std::time::Duration;

use husk_tests::husk_containerd::{
    describe, mounts_under, processes_matching, setup, tail, wait_pod_gone, HuskContainerd,
};

const UP: Duration = Duration::from_secs(120);

fn exec_out(h: &HuskContainerd, name: &str, id: &str, script: &str) -> String {
    h.ctr_ok(&["task", "exec", "--exec-id", id, name, "sh", "-c", script])
}

fn shim_pids(id: &str) -> Vec<u32> {
    processes_matching(&format!(
        "containerd-shim-husk-v2 -namespace husk-test -id {id} "
    ))
}

#[test]
fn containers_annotated_into_one_pod_share_its_vm() {
    let Some((_g, h)) = setup("containers_annotated_into_one_pod_share_its_vm") else {
        return;
    };
    let sandbox = [
        "-d",
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let out = h.run(&sandbox, "pod1", &["sleep", "1000"]).unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    h.wait_running("pod1", UP).unwrap();
    let member = [
        "-d",
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let out = h.run(&member, "app1", &["sleep", "1000"]).unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        tail(&h.containerd.log())
    );
    h.wait_running("app1", UP).unwrap();

    // One kernel (the same boot id), one shim, one QEMU.
    let boot = "cat /proc/sys/kernel/random/boot_id";
    assert_eq!(
        exec_out(&h, "pod1", "b1", boot),
        exec_out(&h, "app1", "b2", boot)
    );
    assert_eq!(
        shim_pids("app1"),
        Vec::<u32>::new(),
        "app1 got its own shim"
    );
    assert_eq!(shim_pids("pod1").len(), 1);
    assert_eq!(processes_matching("husk-pod1,").len(), 1, "one QEMU");
    // Separate containers all the same: separate root filesystems.
    exec_out(&h, "app1", "w", "echo app > /only-in-app1");
    let seen = h
        .containerd
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "r",
            "pod1",
            "test",
            "-e",
            "/only-in-app1",
        ])
        .unwrap();
    assert!(!seen.status.success(), "app1's file is visible in pod1");

    // The member goes; the pod (and its VM) stays.
    h.ctr_ok(&["task", "kill", "-s", "SIGKILL", "app1"]);
    h.wait_status("app1", "STOPPED", UP).unwrap();
    h.ctr_ok(&["task", "delete", "app1"]);
    h.ctr_ok(&["containers", "rm", "app1"]);
    assert_eq!(h.task_status("pod1").as_deref(), Some("RUNNING"));
    exec_out(&h, "pod1", "alive", "true");

    h.ctr_ok(&["task", "kill", "-s", "SIGKILL", "pod1"]);
    h.wait_status("pod1", "STOPPED", UP).unwrap();
    h.ctr_ok(&["task", "delete", "pod1"]);
    h.ctr_ok(&["containers", "rm", "pod1"]);
    wait_pod_gone("pod1");
}

#[test]
fn killed_shim_is_cleaned_up_by_delete() {
    let Some((_g, h)) = setup("killed_shim_is_cleaned_up_by_delete") else {
        return;
    };
    let out = h.run(&["-d"], "crash", &["sleep", "1000"]).unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    h.wait_running("crash", UP).unwrap();
    let dir = std::path::Path::new("/run/husk/crash");
    assert!(dir.join("state.json").is_file());
    assert!(!mounts_under(dir).is_empty(), "rootfs is not mounted");
    let shims = shim_pids("crash");
    assert_eq!(shims.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd notices the dead shim and runs `containerd-shim-husk-v2 delete`.
    wait_pod_gone("crash");
    // containerd reports the task stopped (or has dropped it already).
    assert_ne!(h.task_status("crash").as_deref(), Some("RUNNING"));
    let _ = h.containerd.ctr(&["task", "delete", "crash"]);
    h.ctr_ok(&["containers", "rm", "crash"]);
}

#[test]
fn malformed_bundle_gets_a_clear_error() {
    let Some((_g, h)) = setup("malformed_bundle_gets_a_clear_error") else {
        return;
    };
    // containerd writes the spec it is given as the bundle's config.json;
    // this one has no process args.
    let spec = h.config.with_file_name("bad-spec.json");
    std::fs::write(
        &spec,
        r#"{"ociVersion":"1.0.2","process":{"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"},"linux":{}}"#,
    )
    .unwrap();
    let spec_arg = spec.to_string_lossy().into_owned();
    let config = h.config.to_string_lossy().into_owned();
    let out = h
        .containerd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            husk_tests::husk_containerd::RUNTIME,
            "--runtime-config-path",
            &config,
            "--config",
            &spec_arg,
            "bad",
        ])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("config.json") && stderr.contains("process"),
        "{}\n{}",
        describe(&out),
        tail(&h.containerd.log())
    );
    wait_pod_gone("bad");
}
