//! The pod share against a hostile guest's moves, on real mounts (root only).
//! Test code: an unwrap is the assertion that the step worked.

use std::{
    fs,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt},
    path::Path,
};

use super::*;

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    husk_skip::missing("pod_share tests", "mounts need root");
    false
}

fn mount_options(path: &Path) -> String {
    let m = mountinfo::read().unwrap();
    m.iter()
        .rev()
        .find(|e| e.mount_point == path)
        .unwrap_or_else(|| panic!("{} not mounted", path.display()))
        .options
        .clone()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    pod: PathBuf,
    image: PathBuf,
    volume: PathBuf,
    hosts: PathBuf,
}

impl Drop for Fixture {
    /// A failed test's mounts go with it, not onto the host for good.
    fn drop(&mut self) {
        for m in mountinfo::current_mounts_under(self._tmp.path()).unwrap_or_default() {
            let _ = nix::mount::umount2(&m, MntFlags::MNT_DETACH);
        }
    }
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let pod = tmp.path().join("pod");
    fs::DirBuilder::new().mode(0o700).create(&pod).unwrap();
    let image = tmp.path().join("image");
    fs::create_dir_all(image.join("bin")).unwrap();
    fs::write(image.join("bin/sh"), "#!").unwrap();
    let volume = tmp.path().join("volume");
    fs::create_dir(&volume).unwrap();
    fs::write(volume.join("data"), "precious").unwrap();
    let hosts = tmp.path().join("hosts");
    fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    Fixture {
        _tmp: tmp,
        pod,
        image,
        volume,
        hosts,
    }
}

fn populate(share: &PodShare, f: &Fixture, id: &str) {
    share.mount_rootfs(id, &[], &f.image).unwrap();
    share
        .bind_host(
            id,
            &HostBind {
                source: f.hosts.clone(),
                index: 0,
                readonly: true,
            },
        )
        .unwrap();
    share
        .bind_host(
            id,
            &HostBind {
                source: f.volume.clone(),
                index: 1,
                readonly: false,
            },
        )
        .unwrap();
}

#[test]
fn the_guest_view_is_read_only_where_the_shim_keeps_its_mount_points() {
    if !root() {
        return;
    }
    let f = fixture();
    let share = PodShare::create(&f.pod).unwrap();
    populate(&share, &f, "c1");
    let view = share.view();
    // What the guest sees, through the view.
    assert!(view.join("c1/rootfs/bin/sh").is_file());
    assert_eq!(
        fs::read_to_string(view.join("c1/mounts/0")).unwrap(),
        "127.0.0.1 localhost\n"
    );
    // The share's root and a container's directory refuse every change: no
    // symlink named like the next container, no rename, no filling.
    for attempt in [
        std::os::unix::fs::symlink("/etc", view.join("c2")),
        std::os::unix::fs::symlink("/etc", view.join("c1/mounts/2")),
        fs::write(view.join("fill"), vec![0u8; 4096]),
        fs::rename(
            view.join("c1"),
            view.join(std::ffi::OsStr::from_bytes(b"c\xff")),
        ),
        fs::remove_dir(view.join("c1/rootfs")),
    ] {
        let e = attempt.unwrap_err();
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::EROFS) | Some(libc::EINVAL) | Some(libc::EBUSY)
            ),
            "{e}"
        );
    }
    // Inside its rootfs and its writable volume the guest writes as usual.
    fs::write(view.join("c1/rootfs/new"), "x").unwrap();
    assert!(f.image.join("new").is_file());
    fs::write(view.join("c1/mounts/1/more"), "y").unwrap();
    assert!(f.volume.join("more").is_file());
    assert!(fs::write(view.join("c1/mounts/0"), "z").is_err(), "ro bind");
    // Host-side flags.
    for p in [
        share.rootfs_host_path("c1"),
        f.pod.join("mounts/c1/mounts/1"),
        view.clone(),
        view.join("c1/rootfs"),
        view.join("c1/mounts/0"),
        view.join("c1/mounts/1"),
    ] {
        let o = mount_options(&p);
        assert!(
            o.contains("nosuid") && o.contains("nodev"),
            "{}: {o}",
            p.display()
        );
    }
    assert!(mount_options(&view).starts_with("ro"));
    assert!(mount_options(&view.join("c1/mounts/0")).starts_with("ro"));
    assert!(mount_options(&view.join("c1/mounts/1")).starts_with("rw"));
    // The guest's view sees mounts made after it was created (propagation).
    share.mount_rootfs("c2", &[], &f.image).unwrap();
    assert!(view.join("c2/rootfs/bin/sh").is_file());

    let left = share.teardown();
    assert!(left.is_empty(), "{left}");
    assert!(mountinfo::current_mounts_under(&f.pod).unwrap().is_empty());
    assert!(!f.pod.join("mounts").exists() && !f.pod.join("shared").exists());
    assert_eq!(
        fs::read_to_string(f.volume.join("data")).unwrap(),
        "precious"
    );
    assert!(f.image.join("bin/sh").is_file());
}

#[test]
fn hostile_names_inside_a_rootfs_do_not_disturb_teardown() {
    if !root() {
        return;
    }
    let f = fixture();
    let odd = std::ffi::OsStr::from_bytes(b"\xff\xfe dir\nwith newline");
    // A mount inside the volume (as kubelet may have) under a hostile name.
    let sub = f.volume.join(odd);
    fs::create_dir(&sub).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=64k"),
    )
    .unwrap();
    // Unmounted however the test ends: a leaked mount with this name would break
    // every later reader of the host's mountinfo that expects UTF-8.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(sub.clone());
    fs::write(sub.join("inner"), "mounted data").unwrap();
    let share = PodShare::create(&f.pod).unwrap();
    populate(&share, &f, "c1");
    let view = share.view();
    // What a guest can do where it may write: non-UTF-8 names, names with
    // spaces and newlines, symlinks to host paths.
    let rootfs = view.join("c1/rootfs");
    fs::create_dir(rootfs.join(odd)).unwrap();
    std::os::unix::fs::symlink("/etc", rootfs.join("rootfs")).unwrap();
    std::os::unix::fs::symlink("/", f.volume.join("escape")).unwrap();
    let mounted_sub = f.pod.join("mounts/c1/mounts/1").join(odd);
    assert!(mountinfo::current_mounts_under(&f.pod)
        .unwrap()
        .contains(&mounted_sub));

    // The container goes: its binds are unmounted with what is below them,
    // and nothing is deleted through them.
    let left = share.remove_container("c1");
    assert!(left.is_empty(), "{left}");
    assert!(!f.pod.join("mounts/c1").exists());
    assert!(sub.join("inner").is_file(), "data below a mount survives");
    assert!(f.volume.join("data").is_file());
    assert!(Path::new("/etc/passwd").is_file());
    nix::mount::umount2(&sub, MntFlags::MNT_DETACH).unwrap();
    let left = share.teardown();
    assert!(left.is_empty(), "{left}");
    assert!(
        f.image.join(odd).is_dir(),
        "the guest's files are the image's business"
    );
}

#[test]
fn a_dead_shims_mounts_are_undone_from_its_record() {
    if !root() {
        return;
    }
    let f = fixture();
    let share = PodShare::create(&f.pod).unwrap();
    populate(&share, &f, "c1");
    fs::write(f.pod.join("state.json"), "{}").unwrap();
    // kill -9: nothing of the shim's memory survives, only mounts.json.
    std::mem::forget(share);
    assert!(!mountinfo::current_mounts_under(&f.pod).unwrap().is_empty());
    crate::state::remove_sandbox_dir(&f.pod).unwrap();
    assert!(!f.pod.exists());
    assert!(mountinfo::current_mounts_under(&f.pod).unwrap().is_empty());
    assert_eq!(
        fs::read_to_string(f.volume.join("data")).unwrap(),
        "precious"
    );
}

#[test]
fn a_mount_the_record_does_not_know_stops_deletion_there() {
    if !root() {
        return;
    }
    let f = fixture();
    let share = PodShare::create(&f.pod).unwrap();
    populate(&share, &f, "c1");
    std::mem::forget(share);
    // The record is lost: nothing is unmounted, so nothing is deleted through.
    fs::write(f.pod.join("mounts.json"), b"\xff not json").unwrap();
    let e = crate::state::remove_sandbox_dir(&f.pod)
        .unwrap_err()
        .to_string();
    assert!(e.contains("left in place"), "{e}");
    assert_eq!(
        fs::read_to_string(f.volume.join("data")).unwrap(),
        "precious"
    );
    assert!(f.image.join("bin/sh").is_file());
    // Clean up by hand for the next test run.
    for m in mountinfo::current_mounts_under(&f.pod).unwrap() {
        let _ = nix::mount::umount2(&m, MntFlags::MNT_DETACH);
    }
    assert!(remove::remove_tree(&f.pod).unwrap().is_empty());
}

#[test]
fn ids_that_are_paths_name_nothing() {
    if !root() {
        return;
    }
    let f = fixture();
    let share = PodShare::create(&f.pod).unwrap();
    for bad in ["..", "../..", "a/b", ""] {
        assert!(share.mount_rootfs(bad, &[], &f.image).is_err(), "{bad:?}");
    }
    assert!(share.remove_container("..").is_empty());
    assert!(f.pod.join("mounts").is_dir());
    let mode = fs::metadata(&f.pod).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(share.teardown().is_empty());
}
