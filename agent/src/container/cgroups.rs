//! A container's cgroup v2 directory (`/sys/fs/cgroup/husk/<id>`): stats,
//! the freezer, its process list, resource updates and the OOM-kill counter.
//!
//! Files of a controller that is not enabled (or a kernel without it) are
//! reported as unavailable rather than failing the whole call: stats are
//! best effort by nature, and a host-side test without cgroup v2 controllers
//! should still see what there is.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
use oci_spec::runtime::LinuxResources;

use super::error::{chain, Error, Result};

/// Longest wait for the kernel to report a cgroup frozen or thawed.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
const FREEZE_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub memory_usage_bytes: u64,
    /// 0: no limit.
    pub memory_limit_bytes: u64,
    pub memory_max_usage_bytes: u64,
    pub oom_kill_count: u64,
    pub pids_current: u64,
    /// 0: no limit.
    pub pids_limit: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    /// "<file>: <reason>" for each file that could not be read.
    pub unavailable: Vec<String>,
}

/// One container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// Below the cgroup2 root, as in the spec's `linux.cgroupsPath`.
    path: PathBuf,
    dir: PathBuf,
    id: String,
}

impl Cgroup {
    pub fn new(cgroup_root: &Path, cgroups_path: &Path, id: &str) -> Self {
        let relative = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
        Self {
            path: cgroups_path.to_path_buf(),
            dir: cgroup_root.join(relative),
            id: id.to_string(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read(&self, file: &str) -> io::Result<String> {
        fs::read_to_string(self.dir.join(file))
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        let mut missing = Vec::new();

        match self.read("cpu.stat") {
            Ok(t) => {
                let kv = parse_flat_keyed(&t);
                let us = |k: &str| kv.get(k).copied().unwrap_or(0).saturating_mul(1000);
                s.cpu_usage_ns = us("usage_usec");
                s.cpu_user_ns = us("user_usec");
                s.cpu_system_ns = us("system_usec");
            }
            Err(e) => missing.push(unavailable("cpu.stat", &e)),
        }
        match self.read("memory.current") {
            Ok(t) => s.memory_usage_bytes = parse_limit(&t).unwrap_or(0),
            Err(e) => missing.push(unavailable("memory.current", &e)),
        }
        match self.read("memory.max") {
            Ok(t) => s.memory_limit_bytes = parse_limit(&t).unwrap_or(0),
            Err(e) => missing.push(unavailable("memory.max", &e)),
        }
        // memory.peak appeared in Linux 5.19; the guest's 6.1 has it.
        match self.read("memory.peak") {
            Ok(t) => s.memory_max_usage_bytes = parse_limit(&t).unwrap_or(0),
            Err(e) => missing.push(unavailable("memory.peak", &e)),
        }
        match self.read("memory.events") {
            Ok(t) => s.oom_kill_count = parse_flat_keyed(&t).get("oom_kill").copied().unwrap_or(0),
            Err(e) => missing.push(unavailable("memory.events", &e)),
        }
        match self.read("pids.current") {
            Ok(t) => s.pids_current = parse_limit(&t).unwrap_or(0),
            Err(e) => missing.push(unavailable("pids.current", &e)),
        }
        match self.read("pids.max") {
            Ok(t) => s.pids_limit = parse_limit(&t).unwrap_or(0),
            Err(e) => missing.push(unavailable("pids.max", &e)),
        }
        match self.read("io.stat") {
            Ok(t) => (s.io_read_bytes, s.io_write_bytes) = parse_io_stat(&t),
            Err(e) => missing.push(unavailable("io.stat", &e)),
        }
        s.unavailable = missing;
        s
    }

    /// memory.events' oom_kill counter, if the memory controller is there.
    pub fn oom_kills(&self) -> Option<u64> {
        let t = self.read("memory.events").ok()?;
        parse_flat_keyed(&t).get("oom_kill").copied()
    }

    /// Pids in the cgroup (cgroup.procs), as the guest sees them.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let t = self.read("cgroup.procs").map_err(|e| {
            Error::internal(format!("reading {}/cgroup.procs: {e}", self.dir.display()))
        })?;
        Ok(t.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Freezes or thaws every process, and waits until the kernel says so
    /// (cgroup.events `frozen`), since freezing is asynchronous.
    pub async fn set_frozen(&self, frozen: bool) -> Result<()> {
        let want = if frozen { "1" } else { "0" };
        fs::write(self.dir.join("cgroup.freeze"), want).map_err(|e| {
            Error::internal(format!(
                "writing {}/cgroup.freeze (is this cgroup v2?): {e}",
                self.dir.display()
            ))
        })?;
        let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
        loop {
            let events = self
                .read("cgroup.events")
                .map_err(|e| Error::internal(format!("reading cgroup.events: {e}")))?;
            let state = parse_flat_keyed(&events).get("frozen").copied();
            if state == Some(u64::from(frozen)) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::DeadlineExceeded(format!(
                    "the cgroup did not become {} within {FREEZE_TIMEOUT:?}",
                    if frozen { "frozen" } else { "thawed" }
                )));
            }
            tokio::time::sleep(FREEZE_POLL).await;
        }
    }

    /// Applies OCI LinuxResources (JSON) with libcgroups, which knows the
    /// conversions (shares to weight, swap accounting, ...).
    pub fn update(&self, resources_json: &[u8]) -> Result<()> {
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| Error::invalid(format!("resources: {e}")))?;
        let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: self.path.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| Error::internal(format!("cgroup manager: {}", chain(&e))))?;
        manager
            .apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| Error::internal(format!("applying resources: {}", chain(&e))))
    }
}

fn unavailable(file: &str, e: &dyn std::fmt::Display) -> String {
    format!("{file}: {e}")
}

/// "key value" lines (cpu.stat, memory.events, cgroup.events).
pub fn parse_flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

/// A single value, or None for "max" (no limit) or garbage.
pub fn parse_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        v => v.parse().ok(),
    }
}

/// io.stat: "MAJ:MIN rbytes=.. wbytes=.. rios=.. ..." per device; summed.
pub fn parse_io_stat(text: &str) -> (u64, u64) {
    let mut read = 0u64;
    let mut write = 0u64;
    for line in text.lines() {
        for field in line.split_whitespace().skip(1) {
            let Some((k, v)) = field.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse::<u64>() else { continue };
            match k {
                "rbytes" => read = read.saturating_add(v),
                "wbytes" => write = write.saturating_add(v),
                _ => {}
            }
        }
    }
    (read, write)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup directory as cgroup v2 would show it, in a tempdir.
    fn fake_cgroup(files: &[(&str, &str)]) -> (tempfile::TempDir, Cgroup) {
        let root = tempfile::tempdir().unwrap();
        let cg = Cgroup::new(root.path(), Path::new("/husk/c1"), "c1");
        fs::create_dir_all(cg.dir()).unwrap();
        for (name, content) in files {
            fs::write(cg.dir().join(name), content).unwrap();
        }
        (root, cg)
    }

    #[test]
    fn stats_from_cgroup_v2_files() {
        let (_root, cg) = fake_cgroup(&[
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n\
                 nr_throttled 0\nthrottled_usec 0\n",
            ),
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.peak", "8192\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n",
            ),
            ("pids.current", "3\n"),
            ("pids.max", "100\n"),
            (
                "io.stat",
                "254:0 rbytes=1024 wbytes=2048 rios=1 wios=2 dbytes=0 dios=0\n\
                 254:16 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n",
            ),
        ]);
        let s = cg.stats();
        assert_eq!(
            s,
            Stats {
                cpu_usage_ns: 1_500_000,
                cpu_user_ns: 1_000_000,
                cpu_system_ns: 500_000,
                memory_usage_bytes: 4096,
                memory_limit_bytes: 0,
                memory_max_usage_bytes: 8192,
                oom_kill_count: 1,
                pids_current: 3,
                pids_limit: 100,
                io_read_bytes: 1025,
                io_write_bytes: 2050,
                unavailable: vec![],
            }
        );
        assert_eq!(cg.oom_kills(), Some(1));
    }

    #[test]
    fn missing_controllers_are_reported_not_fatal() {
        // A cgroup with only the core files and cpu.stat (no memory, pids or
        // io controller enabled).
        let (_root, cg) = fake_cgroup(&[("cpu.stat", "usage_usec 7\n")]);
        let s = cg.stats();
        assert_eq!(s.cpu_usage_ns, 7000);
        let files: Vec<&str> = s
            .unavailable
            .iter()
            .map(|u| u.split(':').next().unwrap())
            .collect();
        assert_eq!(
            files,
            [
                "memory.current",
                "memory.max",
                "memory.peak",
                "memory.events",
                "pids.current",
                "pids.max",
                "io.stat"
            ]
        );
        assert_eq!(cg.oom_kills(), None);
    }

    #[test]
    fn parsers_tolerate_odd_input() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit(" 42 \n"), Some(42));
        assert_eq!(parse_limit("-1"), None);
        let kv = parse_flat_keyed("a 1\nb x\nnovalue\nc  2\n");
        assert_eq!(kv.get("a"), Some(&1));
        assert_eq!(kv.get("b"), None);
        assert_eq!(kv.get("c"), Some(&2));
        assert_eq!(parse_io_stat(""), (0, 0));
        assert_eq!(parse_io_stat("8:0 rbytes=x wbytes=5 junk\n"), (0, 5));
    }

    #[test]
    fn pids_and_freezer_files() {
        let (_root, cg) = fake_cgroup(&[
            ("cgroup.procs", "12\n34\n"),
            ("cgroup.events", "populated 1\nfrozen 1\n"),
        ]);
        assert_eq!(cg.pids().unwrap(), [12, 34]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(cg.set_frozen(true)).unwrap();
        assert_eq!(
            fs::read_to_string(cg.dir().join("cgroup.freeze")).unwrap(),
            "1"
        );
    }

    #[test]
    fn update_rejects_malformed_resources() {
        let (_root, cg) = fake_cgroup(&[]);
        let e = cg.update(br#"{"memory": {"limit": "lots"}}"#).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().starts_with("resources: "), "{e}");
    }
}
