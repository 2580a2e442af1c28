//! containerd-shim-husk-v2 through a real containerd: `ctr run` of the busybox
//! image in a husk microVM, checked for what runc gives on a host: output,
//! exit codes, environment, stdin, a terminal.

use std::{
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Stdio,
    time::{Duration, Instant},
};

use husk_tests::husk_containerd::{describe, setup, tail};

#[test]
fn run_rm_echo_prints_from_the_guest() {
    let Some((_g, h)) = setup("run_rm_echo_prints_from_the_guest") else {
        return;
    };
    let out = h
        .run(
            &["--rm"],
            "echo",
            &["sh", "-c", "echo hello from $(uname -r)"],
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let host_kernel = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    assert!(
        out.status.success() && stdout.contains("hello from 6.1"),
        "{}\ncontainerd log:\n{}",
        describe(&out),
        tail(&h.containerd.log())
    );
    assert!(
        !stdout.contains(&host_kernel) || host_kernel.starts_with("6.1"),
        "ran on the host kernel: {stdout}"
    );
    // --rm removed the container.
    let ls = h.ctr_ok(&["containers", "ls", "-q"]);
    assert!(ls.trim().is_empty(), "{ls}");
}

#[test]
fn exit_code_env_and_stderr_propagate() {
    let Some((_g, h)) = setup("exit_code_env_and_stderr_propagate") else {
        return;
    };
    let out = h
        .run(
            &["--rm", "--env", "HUSK_GREETING=hi there"],
            "exitcode",
            &[
                "sh",
                "-c",
                "echo \"$HUSK_GREETING\"; echo to-stderr >&2; exit 42",
            ],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(42), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hi there"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));
}

#[test]
fn stdin_reaches_the_container_and_eof_ends_it() {
    let Some((_g, h)) = setup("stdin_reaches_the_container_and_eof_ends_it") else {
        return;
    };
    let config = h.config.to_string_lossy().into_owned();
    let mut child = h
        .containerd
        .ctr_command(&[
            "run",
            // ctr 1.6 has no -i: `ctr run` always attaches its stdin.
            "--rm",
            "--runtime",
            husk_tests::husk_containerd::RUNTIME,
            "--runtime-config-path",
            &config,
            husk_tests::husk_containerd::IMAGE,
            "stdin",
            "sh",
            "-c",
            "wc -l; echo done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"one\ntwo\nthree\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains('3') && stdout.contains("done"),
        "{}\ncontainerd log:\n{}",
        describe(&out),
        tail(&h.containerd.log())
    );
}

#[test]
fn tty_gives_the_container_a_terminal() {
    let Some((_g, h)) = setup("tty_gives_the_container_a_terminal") else {
        return;
    };
    // ctr -t wants a terminal of its own: give it a pty.
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
    let config = h.config.to_string_lossy().into_owned();
    let mut child = h
        .containerd
        .ctr_command(&[
            "run",
            "--rm",
            "-t",
            "--runtime",
            husk_tests::husk_containerd::RUNTIME,
            "--runtime-config-path",
            &config,
            husk_tests::husk_containerd::IMAGE,
            "tty",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo is-a-tty; stty size",
        ])
        .stdin(slave(&pty.slave))
        .stdout(slave(&pty.slave))
        .stderr(slave(&pty.slave))
        .spawn()
        .unwrap();
    drop(pty.slave);
    // SAFETY: the master fd is ours alone from here on.
    let mut master = unsafe { std::fs::File::from_raw_fd(pty.master.as_raw_fd()) };
    std::mem::forget(pty.master);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once ctr (the last slave holder) exits.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "ctr run -t did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(
        status.success() && output.contains("is-a-tty"),
        "status {status}, output {output:?}\ncontainerd log:\n{}",
        tail(&h.containerd.log())
    );
}
