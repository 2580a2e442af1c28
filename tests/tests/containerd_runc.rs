//! The test harness itself, checked against containerd's own runc runtime:
//! a private containerd, the busybox image built from busybox-static, and a
//! container that runs. The husk shim tests use the same pieces, and the
//! bench uses runc as the baseline next to husk.

use husk_tests::{
    containerd::Containerd, oci_image::write_oci_archive, rootfs::build_busybox_rootfs,
};

#[test]
fn runc_runs_the_busybox_image_in_a_private_containerd() {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing(
            "runc_runs_the_busybox_image_in_a_private_containerd",
            "containerd needs root",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = build_busybox_rootfs(&tmp.path().join("rootfs")).unwrap();
    let archive = tmp.path().join("busybox.tar");
    let image = "docker.io/library/busybox:husk";
    write_oci_archive(&rootfs, image, &archive).unwrap();

    let containerd = Containerd::start("").unwrap();
    containerd.import(&archive).unwrap();
    let out = containerd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.runc.v2",
            image,
            "runc-echo",
            "sh",
            "-c",
            "echo hello from $(cat /etc/hostname); exit 3",
        ])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello from busybox"),
        "stdout: {stdout}\nstderr: {}\nlog: {}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log()
    );
    assert_eq!(out.status.code(), Some(3), "exit code propagates");
}
