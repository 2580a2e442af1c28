//! What the guest is: kernel identity, online CPUs and memory, read from
//! uname(2), sysfs and procfs for `GetGuestDetails`.
//!
//! The parsers take text rather than paths so they are tested on sample
//! files without a VM.

use std::{fs, io, path::Path};

use nix::unistd::{sysconf, SysconfVar};
use thiserror::Error;

pub const PROC_MEMINFO: &str = "/proc/meminfo";
pub const SYS_CPU_ONLINE: &str = "/sys/devices/system/cpu/online";

#[derive(Debug, Error)]
pub enum GuestInfoError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("uname: {0}")]
    Uname(#[source] nix::Error),
    #[error("meminfo has no {0} line")]
    MissingMeminfoField(&'static str),
    #[error("meminfo line {line:?}: {reason}")]
    BadMeminfoLine { line: String, reason: String },
    #[error("CPU list {list:?}: {reason}")]
    BadCpuList { list: String, reason: String },
    #[error("sysconf(_SC_NPROCESSORS_ONLN) gave no answer")]
    NoCpuCount,
}

/// uname(2) fields that identify the guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    pub release: String,
    pub version: String,
    pub machine: String,
}

impl KernelInfo {
    pub fn read() -> Result<Self, GuestInfoError> {
        let uts = nix::sys::utsname::uname().map_err(GuestInfoError::Uname)?;
        Ok(Self {
            release: uts.release().to_string_lossy().into_owned(),
            version: uts.version().to_string_lossy().into_owned(),
            machine: uts.machine().to_string_lossy().into_owned(),
        })
    }
}

/// The two /proc/meminfo figures the agent reports, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

impl MemInfo {
    pub fn read() -> Result<Self, GuestInfoError> {
        parse_meminfo(&read_text(Path::new(PROC_MEMINFO))?)
    }
}

/// Extracts MemTotal and MemAvailable from /proc/meminfo text.
///
/// Only those two lines are checked: a malformed line about some other
/// counter (new kernels add them) must not hide the memory size.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, GuestInfoError> {
    let mut total = None;
    let mut available = None;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        *slot = Some(parse_meminfo_value(line, rest)?);
    }
    Ok(MemInfo {
        total_bytes: total.ok_or(GuestInfoError::MissingMeminfoField("MemTotal"))?,
        available_bytes: available.ok_or(GuestInfoError::MissingMeminfoField("MemAvailable"))?,
    })
}

fn parse_meminfo_value(line: &str, rest: &str) -> Result<u64, GuestInfoError> {
    let bad = |reason: String| GuestInfoError::BadMeminfoLine {
        line: line.to_string(),
        reason,
    };
    let mut fields = rest.split_whitespace();
    let number = fields.next().ok_or_else(|| bad("no value".into()))?;
    let value: u64 = number
        .parse()
        .map_err(|e| bad(format!("value {number:?}: {e}")))?;
    // The kernel prints "kB" and means KiB (fs/proc/meminfo.c shifts by 10);
    // counters without a unit are plain numbers.
    let multiplier = match fields.next() {
        None => 1,
        Some("kB") => 1024,
        Some(unit) => return Err(bad(format!("unknown unit {unit:?}"))),
    };
    if let Some(extra) = fields.next() {
        return Err(bad(format!("unexpected trailing {extra:?}")));
    }
    value
        .checked_mul(multiplier)
        .ok_or_else(|| bad("value overflows 64 bits in bytes".into()))
}

/// Number of online CPUs: the sysfs list, or sysconf if sysfs is missing
/// (e.g. /sys not mounted yet).
pub fn online_cpus() -> Result<u32, GuestInfoError> {
    match read_text(Path::new(SYS_CPU_ONLINE)) {
        Ok(list) => parse_cpu_list(&list),
        Err(sysfs_err) => {
            tracing::debug!(error = %sysfs_err, "falling back to sysconf for the CPU count");
            let n = sysconf(SysconfVar::_NPROCESSORS_ONLN)
                .ok()
                .flatten()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0);
            n.ok_or(GuestInfoError::NoCpuCount)
        }
    }
}

/// Counts the CPUs in a kernel CPU list such as `0-3,8,10-11` (the format of
/// /sys/devices/system/cpu/online, see Documentation/admin-guide/cputopology).
pub fn parse_cpu_list(text: &str) -> Result<u32, GuestInfoError> {
    let list = text.trim();
    let bad = |reason: String| GuestInfoError::BadCpuList {
        list: list.to_string(),
        reason,
    };
    if list.is_empty() {
        return Err(bad("empty".into()));
    }
    let mut count: u64 = 0;
    for item in list.split(',') {
        let parse = |s: &str| {
            s.parse::<u32>()
                .map_err(|e| bad(format!("CPU number {s:?}: {e}")))
        };
        let n = match item.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (parse(first)?, parse(last)?);
                if first > last {
                    return Err(bad(format!("range {item:?} runs backwards")));
                }
                u64::from(last - first) + 1
            }
            None => {
                parse(item)?;
                1
            }
        };
        count += n;
    }
    u32::try_from(count).map_err(|_| bad("more CPUs than fit in 32 bits".into()))
}

fn read_text(path: &Path) -> Result<String, GuestInfoError> {
    fs::read_to_string(path).map_err(|source| GuestInfoError::Read {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "\
MemTotal:        2014560 kB
MemFree:         1843392 kB
MemAvailable:    1880144 kB
Buffers:               0 kB
Cached:            73220 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
";

    #[test]
    fn meminfo_sample() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total_bytes, 2_014_560 * 1024);
        assert_eq!(m.available_bytes, 1_880_144 * 1024);
    }

    #[test]
    fn meminfo_ignores_malformed_unrelated_lines() {
        let text = format!("garbage line\nWeird:   x y z\n{MEMINFO}");
        assert!(parse_meminfo(&text).is_ok());
    }

    #[test]
    fn meminfo_missing_available() {
        let err = parse_meminfo("MemTotal: 1024 kB\nMemFree: 512 kB\n").unwrap_err();
        assert!(matches!(
            err,
            GuestInfoError::MissingMeminfoField("MemAvailable")
        ));
        assert_eq!(err.to_string(), "meminfo has no MemAvailable line");
    }

    #[test]
    fn meminfo_empty() {
        assert!(matches!(
            parse_meminfo("").unwrap_err(),
            GuestInfoError::MissingMeminfoField("MemTotal")
        ));
    }

    #[test]
    fn meminfo_bad_values() {
        for text in [
            "MemTotal: lots kB\nMemAvailable: 1 kB",
            "MemTotal: -5 kB\nMemAvailable: 1 kB",
            "MemTotal:\nMemAvailable: 1 kB",
            "MemTotal: 5 MB\nMemAvailable: 1 kB",
            "MemTotal: 5 kB extra\nMemAvailable: 1 kB",
            "MemTotal: 18446744073709551615 kB\nMemAvailable: 1 kB",
        ] {
            let err = parse_meminfo(text).unwrap_err();
            assert!(
                matches!(err, GuestInfoError::BadMeminfoLine { ref line, .. } if line.starts_with("MemTotal")),
                "{text:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn meminfo_without_unit_is_bytes() {
        let m = parse_meminfo("MemTotal: 4096\nMemAvailable: 100").unwrap();
        assert_eq!(m.total_bytes, 4096);
        assert_eq!(m.available_bytes, 100);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n").unwrap(), 1);
        assert_eq!(parse_cpu_list("0-3").unwrap(), 4);
        assert_eq!(parse_cpu_list("0-3,8,10-11\n").unwrap(), 7);
        assert_eq!(parse_cpu_list("5-5").unwrap(), 1);
        assert_eq!(
            parse_cpu_list("0-4294967295").unwrap_err().to_string(),
            "CPU list \"0-4294967295\": more CPUs than fit in 32 bits"
        );
    }

    #[test]
    fn malformed_cpu_lists() {
        for list in [
            "", "\n", "a", "0-", "-3", "3-1", "0,,1", "0-1-2", "1 2", "0x1",
        ] {
            let err = parse_cpu_list(list).unwrap_err();
            assert!(
                matches!(err, GuestInfoError::BadCpuList { .. }),
                "{list:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn reads_this_machine() {
        let k = KernelInfo::read().unwrap();
        assert!(!k.release.is_empty());
        assert!(online_cpus().unwrap() >= 1);
        let m = MemInfo::read().unwrap();
        assert!(m.total_bytes > m.available_bytes);
    }
}
