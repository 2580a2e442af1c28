//! The shim never stalls a pod: one container's slow create does not hold up
//! State of another (nor anything else the shim answers itself), and a
//! process's TaskStart/TaskExecStarted always reaches containerd before its
//! TaskExit.
//!
//! Test code: an unwrap is the assertion that the step worked.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use husk_tests::husk_containerd::{
    describe, processes_matching, setup, wait_pod_gone, HuskContainerd,
};
use nix::{sys::signal, unistd::Pid};

const UP: Duration = Duration::from_secs(120);

fn remove(h: &HuskContainerd, name: &str) {
    h.ctr_ok(&["task", "kill", "-s", "SIGKILL", name]);
    h.wait_status(name, "STOPPED", UP).unwrap();
    h.ctr_ok(&["task", "delete", name]);
    h.ctr_ok(&["containers", "rm", name]);
}

fn sandbox(h: &HuskContainerd, id: &str) {
    let annotation = format!("io.kubernetes.cri.sandbox-id={id}");
    let flags = [
        "-d",
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        annotation.as_str(),
    ];
    let out = h.run(&flags, id, &["sleep", "1000"]).unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    h.wait_running(id, UP).unwrap();
}

/// How long `ctr args` took, asserting it succeeded.
fn timed(h: &HuskContainerd, args: &[&str]) -> Duration {
    let start = Instant::now();
    h.ctr_ok(args);
    start.elapsed()
}

#[test]
fn a_slow_create_does_not_stall_the_other_containers() {
    let Some((_g, h)) = setup("a_slow_create_does_not_stall_the_other_containers") else {
        return;
    };
    sandbox(&h, "stall");
    // Freeze the pod's virtio-fs server: the member's create then hangs in the
    // guest (libcontainer enters its rootfs) for as long as we like.
    let fs = processes_matching("vhost-user-fs --socket /run/husk/stall/");
    let vmm_run = processes_matching("husk-vmm run");
    if fs.len() != 1 {
        assert!(
            !vmm_run.is_empty(),
            "no virtio-fs backend of pod stall found: {fs:?}"
        );
        husk_skip::not_here(
            "a_slow_create_does_not_stall_the_other_containers",
            "the VM serves virtio-fs in-process (husk-vmm run); its fs cannot be frozen alone",
        );
        remove(&h, "stall");
        return;
    }
    let fs = Pid::from_raw(fs[0] as i32);
    signal::kill(fs, signal::Signal::SIGSTOP).unwrap();
    let member = std::thread::spawn({
        let config = h.config.clone();
        let ctr = h.containerd.ctr_command(&[]);
        let program = ctr.get_program().to_owned();
        let base: Vec<_> = ctr.get_args().map(|a| a.to_owned()).collect();
        move || {
            std::process::Command::new(program)
                .args(base)
                .args([
                    "run",
                    "-d",
                    "--runtime",
                    husk_tests::husk_containerd::RUNTIME,
                ])
                .arg("--runtime-config-path")
                .arg(config)
                .args([
                    "--annotation",
                    "io.kubernetes.cri.container-type=container",
                    "--annotation",
                    "io.kubernetes.cri.sandbox-id=stall",
                    husk_tests::husk_containerd::IMAGE,
                    "slow",
                    "sleep",
                    "1000",
                ])
                .output()
                .unwrap()
        }
    });
    // The member's create is in the guest now (give it time to get there).
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !member.is_finished(),
        "the create did not stall: the test proves nothing"
    );
    // State of every task (ctr task ls): what the shim answers by itself.
    // (Kill and Pids go to the agent, and a guest whose file server is frozen
    // may not answer them.) With the pod lock held across the create, this
    // took 4.0 s here; 16 ms without.
    let list = timed(&h, &["task", "ls"]);
    println!("while another create hangs: task ls {list:?}");
    signal::kill(fs, signal::Signal::SIGCONT).unwrap();
    let out = member.join().unwrap();
    println!(
        "the member's create, once the file server ran again: {}",
        describe(&out)
    );
    assert!(
        list < Duration::from_secs(2),
        "State took {list:?} while another container's create hung"
    );
    // A guest whose file server was frozen mid-request is not trusted to come
    // back: the pod goes the crash way (kill -9 of its shim, containerd's
    // `delete`), which must leave nothing behind either.
    for pid in processes_matching("containerd-shim-husk-v2 -namespace husk-test -id stall ") {
        let _ = signal::kill(Pid::from_raw(pid as i32), signal::Signal::SIGKILL);
    }
    wait_pod_gone("stall");
    let _ = h.containerd.ctr(&["task", "delete", "slow"]);
    let _ = h.containerd.ctr(&["task", "delete", "stall"]);
    let _ = h.containerd.ctr(&["containers", "rm", "slow", "stall"]);
}

#[test]
fn every_exit_event_follows_its_start_event() {
    let Some((_g, h)) = setup("every_exit_event_follows_its_start_event") else {
        return;
    };
    let mut events = h
        .containerd
        .ctr_command(&["events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(events.stdout.take().unwrap());
    let collected = std::thread::spawn(move || {
        lines
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.contains("\"order-done\""))
            .collect::<Vec<String>>()
    });
    sandbox(&h, "order");
    const EXECS: usize = 50;
    for i in 0..EXECS {
        let id = format!("e{i}");
        h.ctr_ok(&["task", "exec", "--exec-id", &id, "order", "true"]);
    }
    // A marker the collector stops at.
    h.ctr_ok(&["task", "exec", "--exec-id", "order-done", "order", "true"]);
    let lines = collected.join().unwrap();
    let _ = events.kill();
    let _ = events.wait();
    let mut checked = 0;
    for i in 0..EXECS {
        let tag = format!("\"e{i}\"");
        let at = |topic: &str| {
            lines
                .iter()
                .position(|l| l.contains(topic) && l.contains(&tag))
        };
        let started =
            at("/tasks/exec-started").unwrap_or_else(|| panic!("no exec-started for e{i}"));
        let exited = at("/tasks/exit").unwrap_or_else(|| panic!("no exit for e{i}"));
        assert!(
            started < exited,
            "e{i}: exit (line {exited}) before exec-started (line {started})"
        );
        checked += 1;
    }
    let init_start = lines
        .iter()
        .position(|l| l.contains("/tasks/start") && l.contains("\"order\""));
    assert!(init_start.is_some(), "no TaskStart for the pod's init");
    println!("{checked} execs: every TaskExecStarted before its TaskExit");
    remove(&h, "order");
    wait_pod_gone("order");
}
