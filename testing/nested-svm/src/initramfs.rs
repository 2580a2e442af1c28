//! The emulated host's initramfs: busybox, the KVM modules, husk-vmm, husk's guest and the
//! calling test binary, with an init that loads the modules and runs the asked-for tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use husk_images::cpio::{self, Entry};

use crate::{NestedHost, Payload, EXIT_MARK, HEARTBEAT_EVERY_SECS};

pub(crate) fn build_initramfs(
    host: &NestedHost,
    payload: &Payload,
    work: &Path,
    out: &Path,
) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = |p: &str| Entry::Dir {
        path: p.into(),
        mode: 0o755,
    };
    let mut entries = vec![
        dir("bin"),
        dir("dev"),
        Entry::CharDev {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        dir("proc"),
        dir("sys"),
        dir("tmp"),
        dir("run"),
        dir("guest"),
        dir("modules"),
    ];
    entries.push(file(
        "bin/busybox",
        &read(Path::new("/bin/busybox"))?,
        0o755,
    ));
    // Every applet, so tests that run host tools (pgrep, ps, ...) find them.
    for applet in busybox_applets()? {
        entries.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    let mut libs = Vec::new();
    for (name, bin) in [("husk-vmm", payload.husk_vmm), ("husk-test", me.as_path())] {
        entries.push(file(&format!("bin/{name}"), &stripped(bin, work)?, 0o755));
        for lib in shared_libraries(bin)? {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    let mut lib_dirs: Vec<String> = Vec::new();
    for lib in &libs {
        let rel = lib
            .strip_prefix("/")
            .map_err(|_| format!("library path {} is not absolute", lib.display()))?;
        let mut parent = rel.parent();
        let mut new_dirs = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            let s = p.to_string_lossy().into_owned();
            if !lib_dirs.contains(&s) {
                lib_dirs.push(s.clone());
                new_dirs.push(s);
            }
            parent = p.parent();
        }
        new_dirs.reverse();
        entries.extend(new_dirs.iter().map(|d| dir(d)));
        // Follow symlinks: the loader asks for the soname, the archive holds the file there.
        entries.push(file(&rel.to_string_lossy(), &read(lib)?, 0o755));
    }
    entries.push(file("guest/vmlinux", &read(payload.guest_kernel)?, 0o644));
    entries.push(file(
        "guest/initrd.img",
        &read(payload.guest_initrd)?,
        0o644,
    ));
    for (name, path) in payload.extra_guest_files {
        entries.push(file(&format!("guest/{name}"), &read(path)?, 0o644));
    }
    let env: String = payload
        .test_env
        .iter()
        .map(|(k, v)| format!("{k}={} ", shell_quote(v)))
        .collect();
    let mut insmods = String::new();
    for m in &host.modules {
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{}: no file name", m.display()))?;
        entries.push(file(&format!("modules/{name}"), &read(m)?, 0o644));
        insmods.push_str(&format!(
            "insmod /modules/{name} || echo \"husk-nested: insmod {name} failed\"\n"
        ));
    }
    let args = payload
        .test_args
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let init = format!(
        "#!/bin/sh\n\
         if [ \"$1\" != stage2 ]; then\n\
         mkdir /newroot\n\
         mount -t tmpfs -o size=95% newroot /newroot\n\
         for d in /*; do case $d in /dev|/proc|/sys|/newroot) ;; *) cp -a $d /newroot/ ;; esac; done\n\
         mkdir -p /newroot/dev /newroot/proc /newroot/sys\n\
         exec switch_root /newroot /init stage2\n\
         fi\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tmpfs run /run\n\
         (while :; do cat /proc/uptime > /dev/ttyS1; sleep {HEARTBEAT_EVERY_SECS}; done) &\n\
         {insmods}\
         echo \"husk-nested: $(busybox grep -c -w svm /proc/cpuinfo) vCPUs with svm\"\n\
         HUSK_GUEST_DIR=/guest HUSK_VMM_BIN=/bin/husk-vmm RUST_BACKTRACE=1 {env}\
         /bin/husk-test {args} --nocapture --test-threads=1\n\
         echo \"{EXIT_MARK}$?\"\n\
         poweroff -f\n"
    );
    // The tests run from a tmpfs, not from the initramfs itself: pivot_root(2), which
    // husk-vmm's jail uses, refuses to move the initial rootfs, as on any real host.
    entries.push(file("init", init.as_bytes(), 0o755));
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(out).map_err(|e| format!("creating {}: {e}", out.display()))?,
    );
    cpio::write_archive(&mut f, &entries).map_err(|e| format!("writing initramfs: {e}"))?;
    std::io::Write::flush(&mut f).map_err(|e| format!("writing initramfs: {e}"))?;
    Ok(())
}

fn busybox_applets() -> Result<Vec<String>, String> {
    let out = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .map_err(|e| format!("/bin/busybox --list: {e}"))?;
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(String::from)
        .collect();
    for needed in ["sh", "mount", "insmod", "poweroff", "grep"] {
        if !applets.iter().any(|a| a == needed) {
            return Err(format!("/bin/busybox has no {needed} applet"));
        }
    }
    applets.sort();
    applets.dedup();
    Ok(applets)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn file(path: &str, data: &[u8], mode: u32) -> Entry {
    Entry::File {
        path: path.into(),
        mode,
        data: data.to_vec(),
    }
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))
}

/// The binary without debug info when `strip` is there (a debug test binary is mostly
/// DWARF, which the emulated machine would unpack for nothing), else as it is.
fn stripped(bin: &Path, work: &Path) -> Result<Vec<u8>, String> {
    let name = bin
        .file_name()
        .ok_or_else(|| format!("{}: no file name", bin.display()))?;
    let out = work.join(name).with_extension("stripped");
    match Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => read(&out),
        _ => read(bin),
    }
}

/// The shared libraries `ldd` says the binary loads (none for a static binary).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| format!("running ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable"
        return Ok(Vec::new());
    }
    // Lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
    // "linux-vdso.so.1 (0x...)" (in the kernel, nothing to copy).
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
