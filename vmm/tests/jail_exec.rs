//! `husk-vmm jail-exec` (how the shim starts QEMU) from the outside: a program escaped into
//! the jail, as a guest that took over QEMU would be, tries to reach the host.

// Test code: an unwrap is the assertion that the step worked.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;

/// An unprivileged uid no account on a test host has.
const UID: u32 = 1_800_099_999;

fn jail_exec(scratch: &Path, files: &[&Path], script: &str) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_husk-vmm"));
    cmd.arg("jail-exec").arg("--scratch").arg(scratch);
    for f in files {
        cmd.arg("--file").arg(f);
    }
    cmd.args(["--ro", "/usr"]);
    for top in ["/bin", "/sbin", "/lib", "/lib64"] {
        match std::fs::symlink_metadata(top) {
            Ok(md) if md.file_type().is_symlink() => cmd.args(["--link", top]),
            Ok(_) => cmd.args(["--ro", top]),
            Err(_) => &mut cmd,
        };
    }
    cmd.args([
        "--user",
        &format!("{UID}:{UID}"),
        "--",
        "/usr/bin/bash",
        "-c",
        script,
    ]);
    cmd.output().unwrap()
}

#[test]
fn a_program_in_the_jail_cannot_reach_the_host() {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing("a_program_in_the_jail_cannot_reach_the_host", "needs root");
        return;
    }
    if !Path::new("/usr/bin/bash").exists() {
        husk_skip::missing(
            "a_program_in_the_jail_cannot_reach_the_host",
            "needs /usr/bin/bash",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("console.sock");
    let _unix = UnixListener::bind(&sock).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let me = std::process::id();
    // Each probe prints a word when it reaches what it must not; `ok` at the end says the
    // script itself ran to completion inside the jail.
    let script = format!(
        r#"
        [ "$(id -u):$(id -g)" = "{UID}:{UID}" ] || echo NOT-THE-USER
        [ -S {sock} ] || echo SOCKET-HIDDEN
        for f in /etc/passwd /etc/shadow /root /home /proc/1 /sys/kernel /run /var; do
            [ -e "$f" ] && echo "SEES:$f"
        done
        # The socket's directories are the jail's own, holding nothing else.
        [ "$(ls -A {parent})" = "console.sock" ] || echo "SEES-BESIDE-THE-SOCKET:$(ls -A {parent})"
        [ "$(ls -A /dev)" = "null" ] || echo "SEES-DEVICES:$(ls -A /dev)"
        kill -0 {me} 2>/dev/null && echo SIGNALS-THE-HOST
        kill -0 1 2>/dev/null && echo SIGNALS-INIT
        (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo REACHES-HOST-TCP
        mknod /dev-node c 1 3 2>/dev/null && echo MADE-A-DEVICE
        mkfifo /usr/fifo 2>/dev/null && echo WROTE-/usr
        touch /new 2>/dev/null && echo WROTE-ROOT
        echo ok
        "#,
        sock = sock.display(),
        parent = dir.path().display(),
    );
    let out = jail_exec(dir.path(), &[&sock, Path::new("/dev/null")], &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "jail-exec failed: {stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "ok", "escapes: {stdout}\nstderr: {stderr}");
    drop(tcp);
}

#[test]
fn bad_requests_are_refused_with_what_was_wrong() {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing("bad_requests_are_refused_with_what_was_wrong", "needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
            .arg("jail-exec")
            .arg("--scratch")
            .arg(dir.path())
            .args(["--ro", "/usr"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--user", "0:0", "--", "/usr/bin/true"]);
    assert!(e.contains("must not be root"), "{e}");
    let e = run(&["--user", "5000:5000", "--", "true"]);
    assert!(e.contains("absolute path"), "{e}");
    let e = run(&[
        "--user",
        "5000:5000",
        "--ro",
        "/no/such/path",
        "--",
        "/usr/bin/true",
    ]);
    assert!(e.contains("/no/such/path"), "{e}");
    let e = run(&["--user", "5000", "--", "/usr/bin/true"]);
    assert!(e.contains("UID:GID"), "{e}");
}
