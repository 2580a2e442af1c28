//! What a pod leaves on the host, and how to remove it after a crash.
//!
//! Each sandbox owns `/run/husk/<sandbox-id>/`:
//!
//! ```text
//! state.json            who runs the pod: the shim's and the VM processes' pids
//! vm/                   the VM's sockets and logs (owned by `PodVm`)
//! shared/<ctr>/rootfs   each container's rootfs mount, exported by virtio-fs
//! ```
//!
//! A shim that exits normally removes all of it. After a crash (`kill -9` of
//! the shim) containerd runs `containerd-shim-husk-v2 delete`, which reads
//! state.json, kills what is left of the VM, unmounts and removes the
//! directory. Pids are stored with their start time so that a recycled pid is
//! never killed by mistake.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Root of every sandbox's host state.
pub const STATE_ROOT: &str = "/run/husk";

pub fn sandbox_dir(sandbox_id: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(sandbox_id)
}

/// A process identified beyond its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    /// Field 22 of /proc/<pid>/stat (clock ticks since boot).
    pub start_time: u64,
}

impl ProcessRef {
    pub fn of(pid: u32) -> Option<ProcessRef> {
        Some(ProcessRef {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// The same process still runs (not a zombie, not a recycled pid).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxState {
    pub sandbox_id: String,
    pub shim: ProcessRef,
    /// QEMU and the husk-vmm device backends.
    pub vm: Vec<ProcessRef>,
    /// The VM's host cgroup directories, removed once its processes are gone.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
}

impl SandboxState {
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join("state.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(tmp, dir.join("state.json"))
    }

    pub fn read(dir: &Path) -> io::Result<SandboxState> {
        let bytes = fs::read(dir.join("state.json"))?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that closes the command name: state is field 3,
    // starttime field 22.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// What [`cleanup_sandbox`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing was there.
    #[default]
    Nothing,
    /// The shim still runs: it owns the sandbox, nothing was touched.
    ShimAlive,
    /// Leftovers were removed.
    Removed,
}

/// Removes a sandbox whose shim is gone: SIGKILLs its VM processes, unmounts
/// everything under its directory and deletes the directory.
pub fn cleanup_sandbox(sandbox_id: &str) -> io::Result<Cleanup> {
    let dir = sandbox_dir(sandbox_id);
    if !dir.exists() {
        return Ok(Cleanup::Nothing);
    }
    match SandboxState::read(&dir) {
        Ok(state) => {
            if state.shim.alive() && state.shim.pid != std::process::id() {
                return Ok(Cleanup::ShimAlive);
            }
            for p in &state.vm {
                kill_and_wait(p);
            }
            crate::hypervisor::cgroup::remove_dirs(&state.cgroups);
        }
        // No state file: the shim died before the VM was started (or wrote
        // it); there are no VM processes to find, only mounts and files.
        Err(e) => warn!(sandbox = sandbox_id, "reading state: {e}"),
    }
    unmount_under(&dir);
    fs::remove_dir_all(&dir)?;
    info!(sandbox = sandbox_id, "removed sandbox leftovers");
    Ok(Cleanup::Removed)
}

fn kill_and_wait(p: &ProcessRef) {
    if !p.alive() {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    // Not our child: wait for it to disappear (init reaps it).
    for _ in 0..200 {
        if !p.alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    warn!(pid = p.pid, "VM process still present after SIGKILL");
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// Lazily unmounts every mount at or below `dir`.
pub fn unmount_under(dir: &Path) {
    for m in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            warn!("unmounting {}: {e}", m.display());
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_recycled_pid_is_not() {
        let me = ProcessRef::of(std::process::id()).unwrap();
        assert!(me.alive());
        let other = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.alive());
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = SandboxState {
            sandbox_id: "sb".into(),
            shim: ProcessRef::of(std::process::id()).unwrap(),
            vm: vec![],
            cgroups: vec![PathBuf::from("/sys/fs/cgroup/memory/pod/sb")],
        };
        s.write(dir.path()).unwrap();
        let r = SandboxState::read(dir.path()).unwrap();
        assert_eq!(r.sandbox_id, "sb");
        assert_eq!(r.shim, s.shim);
        assert_eq!(r.cgroups, s.cgroups);
        // A state file written before cgroups were recorded still reads.
        std::fs::write(
            dir.path().join("state.json"),
            serde_json::json!({"sandbox_id": "old", "shim": s.shim, "vm": []}).to_string(),
        )
        .unwrap();
        assert!(SandboxState::read(dir.path()).unwrap().cgroups.is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
