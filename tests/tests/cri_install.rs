//! scripts/install.sh on a scratch root (`--root`): it installs, a rerun
//! changes nothing, a containerd config's own settings survive, and a `husk`
//! runtime it did not write is refused rather than clobbered.

use std::{fs, path::Path, process::Command};

use husk_tests::workspace_root;

fn install(root: &Path, inputs: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(workspace_root().join("scripts/install.sh"))
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

#[test]
fn install_is_idempotent_and_refuses_to_clobber() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, src) = (tmp.path().join("root"), tmp.path().join("src"));
    inputs(&src);
    let cfg = root.join("etc/containerd/config.toml");
    fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    let original =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"p\"\n";
    fs::write(&cfg, original).unwrap();

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
