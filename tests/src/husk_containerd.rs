//! A private containerd with the husk runtime registered and the busybox image
//! imported: the set-up of every shim test and of the shim bench.
//!
//! containerd finds `io.containerd.husk.v2` as `containerd-shim-husk-v2` on
//! its PATH, so the shim's directory goes first on the PATH containerd runs
//! with. The shim is given a configuration file (through ctr's
//! `--runtime-config-path`, i.e. containerd's `ConfigPath` runtime option)
//! naming the guest kernel, initrd and husk-vmm the tests use.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    containerd::Containerd, guest_artifacts, oci_image::write_oci_archive,
    rootfs::build_busybox_rootfs, vmm_binary, workspace_root,
};

/// One shim test at a time per test binary: several TCG guests at once
/// overload a 2-core host.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The common start of a shim test: `None` (after printing SKIPPED) when not
/// root; otherwise the serial lock and a ready containerd.
pub fn setup(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, HuskContainerd)> {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing(test, "containerd and the shim need root");
        return None;
    }
    crate::init_tracing();
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some((
        guard,
        HuskContainerd::start().expect("husk containerd set-up"),
    ))
}

pub const IMAGE: &str = "docker.io/library/busybox:husk";
pub const RUNTIME: &str = "io.containerd.husk.v2";

/// The shim binary `make build` produced (or `HUSK_SHIM_BIN`).
pub fn shim_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HUSK_SHIM_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("HUSK_SHIM_BIN={} does not exist", p.display());
    }
    for profile in ["debug", "release"] {
        let p = workspace_root()
            .join("target")
            .join(profile)
            .join("containerd-shim-husk-v2");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("containerd-shim-husk-v2 not found under target/ (run `cargo build -p husk-shim`, or set HUSK_SHIM_BIN)")
}

/// Writes a shim configuration naming the test guest kernel, initrd and
/// husk-vmm, with `extra` appended (TOML).
pub fn write_shim_config(path: &Path, extra: &str) -> Result<()> {
    let (kernel, initrd) = guest_artifacts()?;
    std::fs::write(
        path,
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\nvmm_path = \"{}\"\nmemory_mib = 512\n\
             boot_timeout_secs = 90\nagent_timeout_secs = 60\n[shim]\nlog_level = \"debug\"\n{extra}",
            kernel.display(),
            initrd.display(),
            vmm_binary()?.display()
        ),
    )
    .with_context(|| format!("writing {}", path.display()))
}

pub struct HuskContainerd {
    pub containerd: Containerd,
    pub config: PathBuf,
    _tmp: tempfile::TempDir,
}

impl HuskContainerd {
    /// Starts containerd, writes the shim's config and imports busybox.
    pub fn start() -> Result<Self> {
        let shim = shim_binary()?;
        let shim_dir = shim.parent().context("shim binary has no directory")?;
        let tmp = tempfile::Builder::new()
            .prefix("husk-shim-test-")
            .tempdir_in("/var/tmp")?;
        let config = tmp.path().join("configuration.toml");
        write_shim_config(&config, "")?;
        let rootfs = build_busybox_rootfs(&tmp.path().join("rootfs"))?;
        let archive = tmp.path().join("busybox.tar");
        write_oci_archive(&rootfs, IMAGE, &archive)?;
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let containerd = Containerd::start_with_env("", &[("PATH", path.as_str())])?;
        containerd.import(&archive)?;
        Ok(Self {
            containerd,
            config,
            _tmp: tmp,
        })
    }

    /// `ctr run --rm --runtime husk <args before the image> IMAGE <name> <cmd>`.
    pub fn run(&self, flags: &[&str], name: &str, cmd: &[&str]) -> Result<Output> {
        let config = self.config.to_string_lossy().into_owned();
        let mut args = vec![
            "run",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            config.as_str(),
        ];
        args.extend_from_slice(flags);
        args.push(IMAGE);
        args.push(name);
        args.extend_from_slice(cmd);
        self.containerd.ctr(&args)
    }

    /// `ctr <args>`, asserting success; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.containerd.ctr(args).expect("running ctr");
        assert!(
            out.status.success(),
            "ctr {}: {}\ncontainerd log:\n{}",
            args.join(" "),
            describe(&out),
            tail(&self.containerd.log())
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The STATUS column of `ctr task ls` for `name`.
    pub fn task_status(&self, name: &str) -> Option<String> {
        let out = self.containerd.ctr(&["task", "ls"]).ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    }

    /// Waits until `ctr task ls` shows the task RUNNING.
    pub fn wait_running(&self, name: &str, timeout: Duration) -> Result<()> {
        self.wait_status(name, "RUNNING", timeout)
    }

    pub fn wait_status(&self, name: &str, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.task_status(name);
            if status.as_deref() == Some(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "task {name} not {want} within {timeout:?} (status {status:?})\ncontainerd log:\n{}",
                    tail(&self.containerd.log())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for HuskContainerd {
    /// A failed test may leave tasks running: end them through containerd so
    /// that their shims and VMs go too (shims outlive containerd by design).
    fn drop(&mut self) {
        let Ok(out) = self.containerd.ctr(&["task", "ls", "-q"]) else {
            return;
        };
        for task in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = self
                .containerd
                .ctr(&["task", "kill", "-a", "-s", "SIGKILL", task]);
            let _ = self.containerd.ctr(&["task", "delete", "-f", task]);
        }
        if let Ok(out) = self.containerd.ctr(&["containers", "ls", "-q"]) {
            for c in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.containerd.ctr(&["containers", "rm", c]);
            }
        }
    }
}

/// Text of an output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn tail(s: &str) -> &str {
    let n = s.len().saturating_sub(6000);
    let mut i = n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && crate::process_alive(pid) {
                found.push(pid);
            }
        }
    }
    found
}

/// Mount points below `dir` (mountinfo read as bytes: a hostile guest can put
/// non-UTF-8 names in it).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    husk_shim::hostfs::mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|m| m.starts_with(dir))
        .map(|m| m.to_string_lossy().into_owned())
        .collect()
}

/// Every mount point of the host mount namespace, for before/after comparisons.
pub fn all_mounts() -> Vec<std::path::PathBuf> {
    husk_shim::hostfs::mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.mount_point)
        .collect()
}

/// Waits until nothing of sandbox `id` is left on the host: its shim, VM
/// processes, mounts and `/run/husk/<id>`.
pub fn wait_pod_gone(id: &str) {
    let dir = Path::new("/run/husk").join(id);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shims = processes_matching(&format!(
            "containerd-shim-husk-v2 -namespace husk-test -id {id} "
        ));
        let qemu = processes_matching(&format!("husk-{id},"));
        let vmm = processes_matching(&format!("/run/husk/{id}/"));
        let mounts = mounts_under(&dir);
        if shims.is_empty()
            && qemu.is_empty()
            && vmm.is_empty()
            && mounts.is_empty()
            && !dir.exists()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pod {id} left: shims {shims:?}, QEMU {qemu:?}, husk-vmm {vmm:?}, mounts {mounts:?}, dir exists {}",
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
