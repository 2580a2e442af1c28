//! scripts/install.sh on a scratch root (`--root`): it installs, a rerun
//! changes nothing, a containerd config's own settings survive, and a `husk`
//! runtime it did not write is refused rather than clobbered.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use husk_tests::workspace_root;

fn install(root: &Path, inputs: &Path) -> std::process::Output {
    install_with(root, inputs, &[])
}

fn install_with(root: &Path, inputs: &Path, extra: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(workspace_root().join("scripts/install.sh"))
        .args(extra)
        .arg("--root")
        .arg(root)
        .arg("--bin-dir")
        .arg(inputs.join("bin"))
        .arg("--guest-dir")
        .arg(inputs.join("guest"))
        .output()
        .unwrap()
}

/// Stand-ins for the binaries and the guest: the script only copies them.
fn inputs(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("guest")).unwrap();
    for b in ["containerd-shim-husk-v2", "husk-vmm"] {
        let p = dir.join("bin").join(b);
        fs::write(&p, format!("#!/bin/sh\necho {b}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::write(dir.join("guest/vmlinux"), "kernel").unwrap();
    fs::write(dir.join("guest/initrd.img"), "initrd").unwrap();
}

/// A scratch root holding `original` as containerd's config, and the stand-in inputs:
/// (the temporary directory, the root, the inputs, the config's path).
fn scratch(original: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (root, src) = (tmp.path().join("root"), tmp.path().join("src"));
    inputs(&src);
    let cfg = root.join("etc/containerd/config.toml");
    fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    fs::write(&cfg, original).unwrap();
    (tmp, root, src, cfg)
}

#[test]
fn install_is_idempotent_and_refuses_to_clobber() {
    let original =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"p\"\n";
    let (_tmp, root, src, cfg) = scratch(original);

    let out = install(&root, &src);
    assert!(out.status.success(), "{out:?}");
    assert!(root.join("usr/local/bin/containerd-shim-husk-v2").is_file());
    assert!(root.join("usr/local/share/husk/initrd.img").is_file());
    let husk = fs::read_to_string(root.join("etc/husk/configuration.toml")).unwrap();
    assert!(
        husk.contains("kernel = \"/usr/local/share/husk/vmlinux\""),
        "{husk}"
    );
    let registered = fs::read_to_string(&cfg).unwrap();
    assert!(registered.starts_with(original), "{registered}");
    assert!(registered.contains("runtime_type = \"io.containerd.husk.v2\""));

    // A rerun changes nothing.
    let out = install(&root, &src);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read_to_string(&cfg).unwrap(), registered);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("already registers the husk handler"),
        "{text}"
    );

    // An operator's own husk configuration is kept.
    fs::write(root.join("etc/husk/configuration.toml"), "[shim]\n").unwrap();
    assert!(install(&root, &src).status.success());
    assert_eq!(
        fs::read_to_string(root.join("etc/husk/configuration.toml")).unwrap(),
        "[shim]\n"
    );

    // A husk runtime someone else defined: refused, file untouched.
    let foreign =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]\n  runtime_type = \"x\"\n";
    fs::write(&cfg, foreign).unwrap();
    let out = install(&root, &src);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outside husk's block"),
        "{out:?}"
    );
    assert_eq!(fs::read_to_string(&cfg).unwrap(), foreign);
}

/// containerd 2.x's version 3 config gets the handler in its own spelling (the CRI runtime
/// plugin, `io.containerd.cri.v1.runtime`), and containerd 2.3 reads it back as husk's.
#[test]
fn install_writes_a_version_3_handler_that_containerd_2_reads() {
    let original =
        "version = 3\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = \"overlayfs\"\n";
    let (_tmp, root, src, cfg) = scratch(original);
    let out = install(&root, &src);
    assert!(out.status.success(), "{out:?}");
    let registered = fs::read_to_string(&cfg).unwrap();
    assert!(registered.starts_with(original), "{registered}");
    assert!(
        registered.contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.husk]"),
        "{registered}"
    );
    assert!(
        !registered.contains("io.containerd.grpc.v1.cri"),
        "{registered}"
    );
    let out = install(&root, &src);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::read_to_string(&cfg).unwrap(),
        registered,
        "a rerun changes nothing"
    );

    // A husk runtime someone else defined in the version 3 spelling: refused.
    let foreign = "version = 3\n[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.husk]\n  runtime_type = \"x\"\n";
    fs::write(&cfg, foreign).unwrap();
    let out = install(&root, &src);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(fs::read_to_string(&cfg).unwrap(), foreign);

    // A config of a version husk does not know, or asked for against the file's: refused.
    fs::write(&cfg, "version = 4\n").unwrap();
    assert!(!install(&root, &src).status.success());
    fs::write(&cfg, original).unwrap();
    let out = install_with(&root, &src, &["--config-version", "2"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is version 3"),
        "{out:?}"
    );

    // What containerd 2.3 makes of it.
    let dir = husk_tests::containerd::chosen_dir()
        .unwrap_or_else(|| Path::new("/opt/containerd-2.3/bin").to_path_buf());
    let containerd = dir.join("containerd");
    if !containerd.is_file() {
        husk_skip::missing(
            "install_writes_a_version_3_handler_that_containerd_2_reads",
            "no containerd 2.3 in /opt/containerd-2.3/bin (make test-deps)",
        );
        return;
    }
    fs::write(&cfg, original).unwrap();
    assert!(install(&root, &src).status.success());
    let dump = Command::new(&containerd)
        .arg("--config")
        .arg(&cfg)
        .args(["config", "dump"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.status.success(), "{dump:?}");
    let husk = text
        .split("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.husk]")
        .nth(1)
        .unwrap_or_else(|| panic!("containerd 2.3 did not read the husk handler:\n{text}"));
    assert!(
        husk.contains("runtime_type = 'io.containerd.husk.v2'")
            || husk.contains("runtime_type = \"io.containerd.husk.v2\""),
        "{husk}"
    );
    assert!(husk.contains("/etc/husk/configuration.toml"), "{husk}");
}
