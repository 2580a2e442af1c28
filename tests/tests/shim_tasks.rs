//! Task calls on a running husk container through containerd: exec, kill
//! (SIGTERM with a handler, SIGKILL, all), pause/resume, ps, metrics.
//!
//! Each container runs under a `ctr run --rm` in the background, whose exit
//! code is the container's exit status once another ctr has acted on it.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use husk_tests::husk_containerd::{describe, setup, tail, HuskContainerd, IMAGE, RUNTIME};

const UP: Duration = Duration::from_secs(120);

fn spawn_run(h: &HuskContainerd, name: &str, cmd: &[&str]) -> Child {
    let config = h.config.to_string_lossy().into_owned();
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        &config,
        IMAGE,
        name,
    ];
    args.extend_from_slice(cmd);
    let mut child = h
        .containerd
        .ctr_command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Err(e) = h.wait_running(name, UP) {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("{e}\nctr run: {}", describe(&out));
    }
    child
}

/// The exit code of the background `ctr run`, once the task ended.
fn exit_code(h: &HuskContainerd, child: Child) -> Option<i32> {
    let deadline = Instant::now() + UP;
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "ctr run did not end; containerd log:\n{}",
                tail(&h.containerd.log())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    out.status.code()
}

/// Runs `sh -c <script>` in the container until it succeeds.
fn wait_exec(h: &HuskContainerd, name: &str, script: &str) {
    let deadline = Instant::now() + UP;
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("probe{n}");
        let out = h
            .containerd
            .ctr(&["task", "exec", "--exec-id", &id, name, "sh", "-c", script])
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{script:?} never succeeded: {}",
            describe(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn exec_runs_in_the_container_and_reports_its_exit_code() {
    let Some((_g, h)) = setup("exec_runs_in_the_container_and_reports_its_exit_code") else {
        return;
    };
    let run = spawn_run(
        &h,
        "execd",
        &["sh", "-c", "echo marker > /tmp/m; exec sleep 1000"],
    );
    wait_exec(&h, "execd", "test -f /tmp/m");
    let out = h
        .containerd
        .ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "execd",
            "sh",
            "-c",
            "cat /tmp/m; exit 7",
        ])
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("marker"));

    h.ctr_ok(&["task", "kill", "-s", "SIGKILL", "execd"]);
    assert_eq!(exit_code(&h, run), Some(137));
}

#[test]
fn kill_delivers_sigterm_and_kill_all_ends_everything() {
    let Some((_g, h)) = setup("kill_delivers_sigterm_and_kill_all_ends_everything") else {
        return;
    };
    let run = spawn_run(
        &h,
        "killme",
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; touch /tmp/ready; while true; do sleep 0.1; done",
        ],
    );
    // The trap must be set before the signal, or PID 1 ignores SIGTERM.
    wait_exec(&h, "killme", "test -f /tmp/ready");
    h.ctr_ok(&["task", "kill", "killme"]);
    assert_eq!(exit_code(&h, run), Some(42));

    let run = spawn_run(&h, "killall", &["sh", "-c", "sleep 1000 & sleep 1000"]);
    h.ctr_ok(&["task", "kill", "--all", "-s", "SIGKILL", "killall"]);
    assert_eq!(exit_code(&h, run), Some(137));
}

#[test]
fn pause_resume_ps_and_metrics() {
    let Some((_g, h)) = setup("pause_resume_ps_and_metrics") else {
        return;
    };
    let run = spawn_run(&h, "obs", &["sh", "-c", "sleep 1000 & exec sleep 1001"]);
    wait_exec(&h, "obs", "test $(pidof sleep | wc -w) -ge 2");

    let ps = h.ctr_ok(&["task", "ps", "obs"]);
    let pids: Vec<&str> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| p.parse::<u32>().is_ok())
        .collect();
    assert!(pids.len() >= 2, "ctr task ps: {ps}");

    let metrics = h.ctr_ok(&["task", "metrics", "obs"]);
    assert!(
        metrics.contains("pids") && metrics.contains("memory"),
        "ctr task metrics: {metrics}"
    );

    h.ctr_ok(&["task", "pause", "obs"]);
    assert_eq!(h.task_status("obs").as_deref(), Some("PAUSED"));
    h.ctr_ok(&["task", "resume", "obs"]);
    assert_eq!(h.task_status("obs").as_deref(), Some("RUNNING"));

    h.ctr_ok(&["task", "kill", "-s", "SIGKILL", "obs"]);
    assert_eq!(exit_code(&h, run), Some(137));
}
