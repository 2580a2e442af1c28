//! A busybox container root filesystem, built from Debian's busybox-static,
//! for tests and benchmarks that run real containers.

use std::{
    fs,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Fills `root` (created if missing) with busybox, a link per applet, the
/// usual top-level directories, and /etc files with a root and a `nobody`
/// user plus a `husk` user (1000:1000, supplementary group 2000 `extra`), so
/// tests can check user and group resolution.
pub fn build_busybox_rootfs(root: &Path) -> Result<PathBuf> {
    let busybox = Path::new(BUSYBOX);
    if !busybox.is_file() {
        bail!("{BUSYBOX} not found: install Debian's busybox-static (make setup)");
    }
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    if !out.status.success() {
        bail!(
            "busybox --list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "root",
        "var/tmp",
        "run",
        "home/husk",
    ] {
        fs::create_dir_all(root.join(d)).with_context(|| format!("creating {d}"))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::copy(busybox, root.join("bin/busybox")).context("copying busybox")?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = root.join("bin").join(applet);
        if !link.exists() {
            symlink("busybox", &link).with_context(|| format!("linking {applet}"))?;
        }
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nhusk:x:1000:1000:husk:/home/husk:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(
        root.join("etc/group"),
        "root:x:0:\nhusk:x:1000:\nextra:x:2000:husk\nnogroup:x:65534:\n",
    )?;
    fs::write(root.join("etc/hostname"), "busybox\n")?;
    Ok(root.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_has_a_shell_and_users() {
        let dir = tempfile::tempdir().unwrap();
        let root = build_busybox_rootfs(&dir.path().join("rootfs")).unwrap();
        assert!(root.join("bin/busybox").is_file());
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(fs::read_to_string(root.join("etc/passwd"))
            .unwrap()
            .contains("husk:x:1000:1000"));
        // The copy really runs: a static binary needs nothing else in the rootfs.
        let out = Command::new(root.join("bin/busybox"))
            .args(["echo", "hi"])
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }
}
