//! What a pod leaves on the host, and how to remove it after a crash.
//!
//! Each sandbox owns `/run/husk/<sandbox-id>/` (mode 0700):
//!
//! ```text
//! state.json            who runs the pod: the shim's and the VM processes' pids
//! vm/                   the VM's sockets and logs (owned by `PodVm`)
//! mounts.json, mounts/, shared/   the pod share (owned by `crate::pod_share`)
//! ```
//!
//! A shim that exits normally removes all of it. After a crash (`kill -9` of
//! the shim) containerd runs `containerd-shim-husk-v2 delete`, which reads
//! state.json, kills what is left of the VM, undoes the share's recorded
//! mounts and removes the directory, never across a mount that stayed. Pids
//! are stored with their start time so that a recycled pid is never killed by
//! mistake.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{hostfs::remove, ids::SandboxId, pod_share};

/// Root of every sandbox's host state.
pub const STATE_ROOT: &str = "/run/husk";

/// `/run/husk/<id>`: only a checked id names it.
pub fn sandbox_dir(sandbox_id: &SandboxId) -> PathBuf {
    Path::new(STATE_ROOT).join(sandbox_id.as_str())
}

/// Creates the sandbox's directory, 0700 (and `/run/husk`, 0711: each pod's
/// directory is its own shim's alone).
pub fn create_sandbox_dir(sandbox_id: &SandboxId) -> io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let root = Path::new(STATE_ROOT);
    match fs::DirBuilder::new().mode(0o711).create(root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let dir = sandbox_dir(sandbox_id);
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    // The umask may have taken bits off; never added any.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    Ok(dir)
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
    // Bytes: the command name (between the parentheses) is whatever the
    // process set, not necessarily UTF-8.
    let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Fields after the ")" that closes the command name: state is field 3,
/// starttime field 22.
fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
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

/// Removes a sandbox whose shim is gone: SIGKILLs its VM processes, undoes
/// its share's mounts and deletes the directory (see the module docs).
pub fn cleanup_sandbox(sandbox_id: &SandboxId) -> io::Result<Cleanup> {
    let dir = sandbox_dir(sandbox_id);
    if fs::symlink_metadata(&dir).is_err() {
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
        Err(e) => warn!(sandbox = %sandbox_id, "reading state: {e}"),
    }
    remove_sandbox_dir(&dir)?;
    info!(sandbox = %sandbox_id, "removed sandbox leftovers");
    Ok(Cleanup::Removed)
}

/// Undoes the share's recorded mounts, then removes `dir` without crossing
/// into a mount; an error lists what was left in place.
pub fn remove_sandbox_dir(dir: &Path) -> io::Result<()> {
    let share = pod_share::cleanup(dir);
    let left = remove::remove_tree(dir)?;
    if share.is_empty() && left.is_empty() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "left in place under {}:\n{share}{left}",
        dir.display()
    )))
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

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
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
    fn stat_with_a_hostile_command_name_parses() {
        let mut stat = b"42 (a) b\xff) ".to_vec();
        stat.extend_from_slice(b"S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0");
        assert_eq!(parse_start_time(&stat), Some(12345));
        assert_eq!(
            parse_start_time(b"42 (x) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9"),
            None
        );
    }
}
