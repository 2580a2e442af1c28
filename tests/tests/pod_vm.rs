//! A real pod VM end to end: QEMU (`-M microvm`) with husk's guest kernel and
//! initrd, husk-vmm serving the vsock device over vhost-user, and husk-agent as
//! the guest's PID 1, reached with ttrpc over hybrid vsock.

use std::time::Duration;

use husk_protocol::agent::health_response::Status;
use husk_shim::hypervisor::{LaunchError, PodVm, ShutdownOutcome};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_serves_the_agent_api_and_powers_off() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = vm_spec("boot", tmp.path()).unwrap();
    spec.vcpus = 2;
    let vm = PodVm::launch(spec)
        .await
        .expect("VM should boot to the agent");
    eprintln!("accelerator: {:?}, timings: {:?}", vm.accel(), vm.timings());
    let pids = vm.pids();
    assert_eq!(pids.len(), 2, "QEMU and husk-vmm");
    let state_dir = vm.state_dir().to_path_buf();

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
    // No init: the kernel panics, and panic=-1 + -no-reboot end QEMU.
    spec.extra_cmdline = "rdinit=/no-such-init".into();
    let state_dir = spec.state_dir.clone();
    let err = PodVm::launch(spec).await.err().expect("launch must fail");
    match &err {
        LaunchError::Exited { what, console, .. } => {
            assert_eq!(*what, "QEMU");
            assert!(
                console.contains("Kernel panic"),
                "console should show the panic: {console}"
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
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", &state_dir.to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "leftover processes: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );
}
