//! A tenant that owns its guest attacks the host side of its pod: a
//! privileged container (standing in for a guest kernel exploit) mounts the
//! pod's virtio-fs share and tries, at every level it can see, to make the shim
//! follow a name it planted, to break the host's mountinfo with non-UTF-8
//! names, to fill the share and flood the console; then a bundle names
//! `../..` as its sandbox. After each: no host mount outside the pod's
//! directory, no host file outside it touched, the next container and a
//! second pod start, the logs stay under their cap, and after delete nothing
//! of the pod is left.
//!
//! Test code: an unwrap is the assertion that the step worked.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use husk_tests::husk_containerd::{
    all_mounts, describe, setup, tail, wait_pod_gone, write_shim_config, HuskContainerd,
};

const UP: Duration = Duration::from_secs(120);
/// The log cap this test configures (`limits.log_max_kib`).
const LOG_CAP: u64 = 64 << 10;

fn exec(h: &HuskContainerd, name: &str, id: &str, script: &str) -> std::process::Output {
    h.containerd
        .ctr(&["task", "exec", "--exec-id", id, name, "sh", "-c", script])
        .expect("running ctr")
}

/// Mounts outside `/run/husk/<pod>` that were not there before.
fn new_mounts_outside(before: &[PathBuf], pod_dir: &Path) -> Vec<PathBuf> {
    all_mounts()
        .into_iter()
        .filter(|m| !before.contains(m) && !m.starts_with(pod_dir))
        // containerd's own snapshot and task mounts for the test's containers.
        .filter(|m| !m.to_string_lossy().contains("husk-shim-test-"))
        .collect()
}

const ATTACKS: &str = r#"
t=/tmp/husk-hostile-target
s=/mnt/share
mkdir -p $s && mount -t virtiofs husk $s || { echo NO-MOUNT; exit 0; }
ls $s >/dev/null && echo SHARE-VISIBLE
# A symlink named like the next container, and like its bind mounts.
ln -s $t $s/app1 2>/dev/null && echo PLANTED-NEXT-CONTAINER
mkdir $s/app1 2>/dev/null && echo MKDIR-NEXT-CONTAINER
ln -s $t $s/hg/mounts 2>/dev/null && echo PLANTED-BIND-DIR
# Renames of a container directory (with its rootfs mount below it).
mv $s/hg "$s/$(printf 'x\377\376')" 2>/dev/null && echo RENAMED-NON-UTF8
mv $s/hg "$s/a b
c" 2>/dev/null && echo RENAMED-NEWLINE
rm -rf $s/hg/rootfs 2>/dev/null; [ -d $s/hg/rootfs ] || echo REMOVED-ROOTFS-DIR
# Filling the share's root.
dd if=/dev/zero of=$s/fill bs=1M count=32 2>/dev/null && echo FILLED-ROOT
# Inside its own rootfs the tenant writes as usual, odd names included.
mkdir "$s/hg/rootfs/$(printf 'y\377')" && echo > $s/hg/rootfs/ok && echo ROOTFS-WRITABLE
ln -s / "$s/hg/rootfs/escape" && echo ROOTFS-SYMLINK
# Flooding the console: 1 MiB of kernel messages (printed on ttyS0), 16x the cap.
i=0; line=$(head -c 800 /dev/zero | tr '\0' F)
while [ $i -lt 1300 ]; do echo "<0>$line" > /dev/kmsg || exit 1; i=$((i+1)); done && echo FLOODED
"#;

/// What [`ATTACKS`] prints when an attack that must fail succeeded.
const REFUSED: [&str; 7] = [
    "PLANTED-NEXT-CONTAINER",
    "MKDIR-NEXT-CONTAINER",
    "PLANTED-BIND-DIR",
    "RENAMED-NON-UTF8",
    "RENAMED-NEWLINE",
    "REMOVED-ROOTFS-DIR",
    "FILLED-ROOT",
];

#[test]
fn a_hostile_guest_cannot_reach_the_host_through_its_share() {
    let Some((_g, h)) = setup("a_hostile_guest_cannot_reach_the_host_through_its_share") else {
        return;
    };
    write_shim_config(
        &h.config,
        &format!("[limits]\nlog_max_kib = {}\n", LOG_CAP >> 10),
    )
    .unwrap();
    let target = Path::new("/tmp/husk-hostile-target");
    let _ = std::fs::remove_dir_all(target);
    std::fs::create_dir_all(target).unwrap();
    let pod_dir = Path::new("/run/husk/hg");
    let before = all_mounts();

    let sandbox = [
        "-d",
        "--privileged",
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=hg",
    ];
    let out = h.run(&sandbox, "hg", &["sleep", "1000"]).unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    h.wait_running("hg", UP).unwrap();

    let out = exec(&h, "hg", "attack", ATTACKS);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("SHARE-VISIBLE"),
        "the attack could not start: {}",
        describe(&out)
    );
    for refused in REFUSED {
        assert!(!said.contains(refused), "{refused} succeeded:\n{said}");
    }
    for allowed in ["ROOTFS-WRITABLE", "ROOTFS-SYMLINK", "FLOODED"] {
        assert!(
            said.contains(allowed),
            "{allowed} missing:\n{said}\n{}",
            describe(&out)
        );
    }

    // The next container of the pod, with a CRI-style bind mount of a host
    // file: it starts, and nothing of it lands outside the pod directory.
    let hosts = h.config.with_file_name("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/etc/hosts,options=rbind:ro",
        hosts.display()
    );
    let member = [
        "-d",
        "--mount",
        mount.as_str(),
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=hg",
    ];
    let out = h.run(&member, "app1", &["sleep", "1000"]).unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        tail(&h.containerd.log())
    );
    h.wait_running("app1", UP).unwrap();
    let out = exec(
        &h,
        "app1",
        "hosts",
        "cat /etc/hosts; echo x > /etc/hosts && echo WROTE",
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("127.0.0.1 localhost") && !said.contains("WROTE"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_dir(target).unwrap().count(),
        0,
        "the planted target stays empty"
    );
    let outside = new_mounts_outside(&before, pod_dir);
    assert!(
        outside.is_empty(),
        "host mounts outside the pod directory: {outside:?}"
    );
    // Every husk mount is nosuid,nodev on the host.
    for m in husk_shim::hostfs::mountinfo::read().unwrap() {
        if m.mount_point.starts_with(pod_dir.join("mounts"))
            || m.mount_point.starts_with(pod_dir.join("shared"))
        {
            assert!(
                m.options.contains("nosuid") && m.options.contains("nodev"),
                "{}: {}",
                m.mount_point.display(),
                m.options
            );
        }
    }

    // The host's logs of this pod stay under their cap.
    for log in [
        "console.log",
        "agent.log",
        "qemu.log",
        "husk-vmm.log",
        "husk_vmm_vsock.log",
        "husk_vmm_virtio_fs.log",
    ] {
        let p = pod_dir.join("vm").join(log);
        if let Ok(m) = std::fs::metadata(&p) {
            println!("host bytes: {log}: {} (cap {LOG_CAP})", m.len());
            assert!(
                m.len() <= LOG_CAP,
                "{} is {} bytes, over {LOG_CAP}",
                p.display(),
                m.len()
            );
        }
    }
    let console = std::fs::read(pod_dir.join("vm/console.log")).unwrap();
    assert!(
        String::from_utf8_lossy(&console).contains("log reached its cap"),
        "the flood reached the console log"
    );

    // A second pod on the node starts and runs.
    let out = h.run(&["--rm"], "second", &["echo", "second pod"]).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("second pod"),
        "{}",
        describe(&out)
    );

    // A bundle that names `../..` as its sandbox is refused, and touches nothing.
    let out = h
        .run(
            &[
                "--rm",
                "--annotation",
                "io.kubernetes.cri.container-type=container",
                "--annotation",
                "io.kubernetes.cri.sandbox-id=../..",
            ],
            "climb",
            &["true"],
        )
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        describe(&out).contains("sandbox id \"../..\""),
        "the error names the bad id: {}",
        describe(&out)
    );
    assert!(Path::new("/run/husk").is_dir() && Path::new("/run").is_dir());
    assert!(
        pod_dir.join("state.json").is_file(),
        "the running pod is untouched"
    );
    let _ = h.containerd.ctr(&["containers", "rm", "climb"]);

    // Teardown: nothing of the pod is left, and the volume-like host file is intact.
    for c in ["app1", "hg"] {
        h.ctr_ok(&["task", "kill", "-s", "SIGKILL", c]);
        h.wait_status(c, "STOPPED", UP).unwrap();
        h.ctr_ok(&["task", "delete", c]);
        h.ctr_ok(&["containers", "rm", c]);
    }
    wait_pod_gone("hg");
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        "127.0.0.1 localhost\n"
    );
    assert_eq!(std::fs::read_dir(target).unwrap().count(), 0);
    let outside = new_mounts_outside(&before, pod_dir);
    assert!(outside.is_empty(), "host mounts left: {outside:?}");
    std::fs::remove_dir_all(target).unwrap();
}

/// The share attacks above through the agent alone (no containerd), so that
/// they also run on husk-vmm, whose jail sees the share through one more
/// level of mount propagation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_attacks_fail_on_the_pod_share() {
    use husk_tests::{
        oci_spec::{default_spec, DEFAULT_CAPS},
        pod::Pod,
        rootfs::build_busybox_rootfs,
    };
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing(
            "share_attacks_fail_on_the_pod_share",
            "the pod share needs root",
        );
        return;
    }
    let (pod, share) = Pod::boot_on_pod_share("hostile").await;
    let images = tempfile::tempdir().unwrap();
    for id in ["hg", "next"] {
        let image = build_busybox_rootfs(&images.path().join(id)).unwrap();
        share.mount_rootfs(id, &[], &image).unwrap();
    }
    // Privileged: every capability, no seccomp, nothing masked.
    let mut spec = default_spec(&["sh", "-c", ATTACKS]);
    let mut caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    caps.extend(["CAP_SYS_ADMIN", "CAP_SYSLOG", "CAP_SYS_RESOURCE"]);
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set] = serde_json::json!(caps);
    }
    spec["linux"]["maskedPaths"] = serde_json::json!([]);
    spec["linux"]["readonlyPaths"] = serde_json::json!([]);
    spec["linux"]["resources"]["devices"] = serde_json::json!([{ "allow": true, "access": "rwm" }]);
    let out = pod.run("hg", &spec).await;
    let said = out.stdout.clone();
    assert!(
        said.contains("SHARE-VISIBLE"),
        "the attack could not start: {said}\n{}",
        out.stderr
    );
    for refused in REFUSED {
        assert!(!said.contains(refused), "{refused} succeeded:\n{said}");
    }
    assert!(said.contains("ROOTFS-WRITABLE"), "{said}\n{}", out.stderr);
    // The next container, mounted after the attack, runs from its own rootfs.
    let next = pod
        .run("next", &husk_tests::pod::sh("echo next runs"))
        .await;
    assert_eq!(next.stdout, "next runs\n", "{}", next.stderr);
    pod.shutdown().await;
    let left = share.teardown();
    assert!(left.is_empty(), "{left}");
}

#[test]
fn share_attacks_on_husk_vmm_in_an_emulated_kvm_host() {
    const NAME: &str = "share_attacks_on_husk_vmm_in_an_emulated_kvm_host";
    if husk_shim::hypervisor::detect::detect().kvm_usable {
        husk_skip::not_here(
            NAME,
            "this host's KVM runs share_attacks_fail_on_the_pod_share on husk-vmm itself",
        );
        return;
    }
    husk_tests::nested::run_on_husk_vmm(
        NAME,
        &["share_attacks_fail_on_the_pod_share"],
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
}
