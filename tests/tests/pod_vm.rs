//! A real pod VM end to end with husk's guest kernel and initrd and husk-agent
//! as the guest's PID 1, reached with ttrpc over hybrid vsock: QEMU
//! (`-M microvm`) with husk-vmm serving the vsock device over vhost-user, or
//! husk-vmm alone on KVM (`HUSK_HYPERVISOR`, see husk_tests). Where this
//! host's KVM cannot run Linux, the last test runs the others on husk-vmm
//! inside an emulated KVM host.

// Test code: an unwrap is the assertion that the step worked.

use std::time::Duration;

use husk_protocol::agent::health_response::Status;
use husk_shim::hypervisor::{self, Hypervisor, LaunchError, PodVm, ShutdownOutcome};
use husk_tests::{init_tracing, process_alive, vm_spec};

fn assert_gone(pids: &[u32], state_dir: &std::path::Path) {
    for pid in pids {
        assert!(
            !process_alive(*pid),
            "VM process {pid} still running after teardown"
        );
    }
    assert!(
        !state_dir.exists(),
        "state directory {} left behind",
        state_dir.display()
    );
}

/// A field of /proc/<pid>/status ("CapEff:"), trimmed.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or_default()
        .to_string()
}

/// husk-vmm, one of its backends or QEMU as the shim runs them: in their own mount and network namespaces,
/// without CAP_SYS_ADMIN, with no_new_privs.
fn assert_jailed(pid: u32) {
    let ns = |p: &str, kind: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).unwrap();
    for kind in ["mnt", "net"] {
        assert_ne!(
            ns("self", kind),
            ns(&pid.to_string(), kind),
            "husk-vmm shares the host's {kind} namespace"
        );
    }
    let field = |name: &str| status_field(pid, name);
    assert_eq!(field("NoNewPrivs:"), "1", "pid {pid}");
    let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    let bnd = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_NET_ADMIN: u64 = 1 << 12;
    assert_eq!(eff & (CAP_SYS_ADMIN | CAP_NET_ADMIN), 0, "CapEff {eff:x}");
    assert_eq!(bnd & (CAP_SYS_ADMIN | CAP_NET_ADMIN), 0, "CapBnd {bnd:x}");
    eprintln!("pid {pid} is jailed: CapEff {eff:x}, CapBnd {bnd:x}");
}

/// A process that is no root in any sense: every uid and gid non-zero, no capability in any
/// set, and it sees none of the host's files (its root holds only what it was given).
fn assert_unprivileged(pid: u32) {
    for field in ["Uid:", "Gid:"] {
        let ids = status_field(pid, field);
        assert!(
            ids.split_whitespace().all(|id| id != "0"),
            "pid {pid} {field} {ids}"
        );
    }
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(
            u64::from_str_radix(&status_field(pid, set), 16).unwrap(),
            0,
            "pid {pid} {set}"
        );
    }
    // Its root holds only what it opens (the guest kernel's and the sockets' paths, so parts
    // of /var or /tmp may be there); none of the host's own files.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    for host_path in [
        "etc/passwd",
        "etc/shadow",
        "root",
        "home",
        "run/containerd",
        "proc/1",
        "sys/kernel",
        "var/lib",
        "var/log",
    ] {
        assert!(
            !root.join(host_path).exists(),
            "pid {pid} sees /{host_path}"
        );
    }
    let names = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("etc"), ["ld.so.cache"], "pid {pid}'s /etc");
    assert_eq!(names("dev"), ["null", "urandom"], "pid {pid}'s /dev");
    eprintln!("QEMU {pid} runs as {}", status_field(pid, "Uid:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_serves_the_agent_api_and_powers_off() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = vm_spec("boot", tmp.path()).unwrap();
    spec.vcpus = 2;
    let vm = PodVm::launch(spec)
        .await
        .expect("VM should boot to the agent");
    eprintln!(
        "hypervisor: {}, accelerator: {:?}, timings: {:?}",
        vm.hypervisor(),
        vm.accel(),
        vm.timings()
    );
    let pids = vm.pids();
    match vm.hypervisor() {
        Hypervisor::Qemu => assert_eq!(pids.len(), 2, "QEMU and husk-vmm's vsock backend"),
        Hypervisor::HuskVmm => assert_eq!(pids.len(), 1, "husk-vmm alone"),
    }
    let state_dir = vm.state_dir().to_path_buf();
    if nix::unistd::geteuid().is_root() {
        match vm.hypervisor() {
            Hypervisor::HuskVmm => assert_jailed(pids[0]),
            Hypervisor::Qemu => {
                // QEMU under its own seccomp filter, in husk-vmm's jail as a uid of its own
                // with nothing at all of root's; its vsock backend in the jail too.
                assert_eq!(
                    status_field(pids[0], "Seccomp:"),
                    "2",
                    "QEMU without -sandbox"
                );
                assert_jailed(pids[0]);
                assert_unprivileged(pids[0]);
                assert_jailed(pids[1]);
            }
        }
    }

    let agent = vm.agent().expect("connected during launch").clone();
    assert_eq!(
        agent.health().await.unwrap().status.enum_value(),
        Ok(Status::SERVING)
    );
    let v = agent.version().await.unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.api_version, husk_protocol::API_VERSION);

    let d = agent.guest_details().await.unwrap();
    assert!(
        d.kernel_release.starts_with("6.1."),
        "guest kernel {}",
        d.kernel_release
    );
    assert_eq!(d.machine, "x86_64");
    assert_eq!(d.cpus, 2, "guest sees the vCPUs it was given");
    let mib = d.memory_total_bytes / (1024 * 1024);
    assert!(
        (200..=256).contains(&mib),
        "guest memory {mib} MiB for a 256 MiB VM"
    );
    assert!(d.memory_available_bytes > 0 && d.memory_available_bytes < d.memory_total_bytes);
    assert!(
        d.init_started_ns > 0
            && d.init_started_ns <= d.agent_ready_ns
            && d.agent_ready_ns <= d.uptime_ns
    );

    // Independent connections through the hybrid vsock socket, all at once.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let c = vm.connect_agent().await.expect("second connection");
        calls.push(tokio::spawn(async move {
            for _ in 0..5 {
                c.health().await.unwrap();
            }
            c.guest_details().await.unwrap().kernel_release
        }));
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), d.kernel_release);
    }

    // The agent's own connection to the host (guest-initiated vsock) carried
    // its log to the listener the launcher put at `<uds>_1025`.
    let log_path = vm.agent_log_path().to_path_buf();
    let mut log = String::new();
    for _ in 0..200 {
        log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("ready") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(log.contains("ready"), "agent log over vsock: {log:?}");

    let outcome = vm.shutdown(Duration::from_secs(20)).await;
    assert_eq!(outcome, ShutdownOutcome::Clean);
    assert_gone(&pids, &state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_crashes_at_boot_is_reported_with_its_console() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = vm_spec("crash", tmp.path()).unwrap();
    // No init: the kernel panics, and panic=-1 (+ QEMU's -no-reboot) end the VM.
    spec.extra_cmdline = "rdinit=/no-such-init".into();
    let state_dir = spec.state_dir.clone();
    let (hypervisor, _, _) = hypervisor::select(&spec).expect("a hypervisor for this host");
    let err = PodVm::launch(spec).await.err().expect("launch must fail");
    match &err {
        LaunchError::Exited { what, console, .. } => {
            assert_eq!(*what, hypervisor.name());
            // The whole error (with the VMM's log) so a failure shows how the VM ended.
            assert!(
                console.contains("Kernel panic"),
                "console should show the panic: {err}"
            );
        }
        other => panic!("expected the VM to exit, got: {other}"),
    }
    assert!(!state_dir.exists(), "state directory left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_guest_is_killed_and_cleaned_up() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let spec = vm_spec("hang", tmp.path()).unwrap();
    let vm = PodVm::launch(spec).await.expect("VM should boot");
    let pids = vm.pids();
    let state_dir = vm.state_dir().to_path_buf();
    // Freeze the whole VM: the agent can no longer answer anything.
    for pid in &pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
    }
    let started = std::time::Instant::now();
    let outcome = vm.shutdown(Duration::from_secs(2)).await;
    assert!(matches!(outcome, ShutdownOutcome::Forced(_)), "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "teardown of a hung guest took {:?}",
        started.elapsed()
    );
    assert_gone(&pids, &state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_deadline_gives_a_clear_error_and_leaves_nothing() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = vm_spec("deadline", tmp.path()).unwrap();
    spec.boot_timeout = Duration::from_millis(300);
    let state_dir = spec.state_dir.clone();
    let err = PodVm::launch(spec)
        .await
        .err()
        .expect("300 ms is too short to boot");
    assert!(matches!(err, LaunchError::BootTimeout { .. }), "{err}");
    assert!(err.to_string().contains("did not answer within"), "{err}");
    assert!(!state_dir.exists(), "state directory left behind");
    // The processes were reaped by the drop: no husk-vmm for this VM remains.
    let leftover = husk_tests::husk_containerd::processes_matching(&state_dir.to_string_lossy());
    assert!(leftover.is_empty(), "leftover processes: {leftover:?}");
}

/// The pod's NIC: a tap (in a namespace of the test's own, as the shim makes
/// one in the pod's) handed to the VM as an fd, the guest interface set up by
/// the agent, and packets both ways (ping from the tap's side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_nic_carries_packets_both_ways() {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing(
            "the_pod_nic_carries_packets_both_ways",
            "needs root (a network namespace, a tap)",
        );
        return;
    }
    init_tracing();
    let ns = husk_tests::netns::Netns::new().expect("network namespace");
    let tap = ns.tap("husk-t0").expect("tap");
    for args in [
        &["ip", "addr", "add", "10.203.0.1/24", "dev", "husk-t0"][..],
        &["ip", "link", "set", "husk-t0", "up"][..],
    ] {
        ns.command("/bin/busybox", args)
            .expect("configuring the tap");
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = vm_spec("nic", tmp.path()).unwrap();
    let mac = [0x02, 0x00, 0x0a, 0xcb, 0x00, 0x02];
    spec.network = Some(hypervisor::NetDevice {
        tap: std::sync::Arc::new(tap),
        mac,
    });
    let vm = PodVm::launch(spec).await.expect("VM with a NIC boots");
    let agent = vm.agent().expect("agent").clone();
    let name = agent
        .update_interface("02:00:0a:cb:00:02", &[("10.203.0.2".into(), 24)], 1500)
        .await
        .expect("guest interface configured");
    eprintln!("{} NIC {name} up with 10.203.0.2/24", vm.hypervisor());
    let out = ns
        .command(
            "/bin/busybox",
            &["ping", "-c", "3", "-W", "10", "10.203.0.2"],
        )
        .unwrap_or_else(|e| panic!("ping to the guest: {e:#}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 packets received"), "{text}");
    eprintln!("{}", text.lines().last().unwrap_or_default());
    assert_eq!(
        vm.shutdown(Duration::from_secs(20)).await,
        ShutdownOutcome::Clean
    );
}

/// The tests above on husk-vmm, where this host cannot run them there itself.
#[test]
fn pod_vms_on_husk_vmm_in_an_emulated_kvm_host() {
    const NAME: &str = "pod_vms_on_husk_vmm_in_an_emulated_kvm_host";
    let host = husk_shim::hypervisor::detect::detect();
    if host.kvm_usable {
        husk_skip::not_here(
            NAME,
            "this host's KVM runs the tests above on husk-vmm itself",
        );
        return;
    }
    husk_tests::nested::run_on_husk_vmm(
        NAME,
        &[
            "boots_serves_the_agent_api_and_powers_off",
            "a_guest_that_crashes_at_boot_is_reported_with_its_console",
            "a_hung_guest_is_killed_and_cleaned_up",
            "a_boot_deadline_gives_a_clear_error_and_leaves_nothing",
            "the_pod_nic_carries_packets_both_ways",
        ],
        Duration::from_secs(180),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
}
