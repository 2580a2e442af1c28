//! The shim's configuration file: `/etc/husk/configuration.toml`, or the file
//! named by containerd's runtime option `ConfigPath`.
//!
//! Every key is optional; a missing file means "all defaults", and the defaults
//! find the guest kernel, initrd and husk-vmm that `make build guest` (or
//! `make demo`) produced next to the shim binary. Unknown keys and values of
//! the wrong type are errors that name the key, so a typo never silently falls
//! back to a default.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::hypervisor::AccelChoice;

/// Where the shim looks when containerd names no config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/configuration.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading husk configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("husk configuration {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    /// husk-vmm where the host's KVM can run a stock guest, QEMU with TCG
    /// emulation elsewhere.
    #[default]
    Auto,
    /// husk-vmm runs the whole VM on KVM.
    HuskVmm,
    /// QEMU `-M microvm` for the vCPUs, husk-vmm's device backends over vhost-user.
    Qemu,
}

impl From<HypervisorKind> for crate::hypervisor::HypervisorChoice {
    fn from(k: HypervisorKind) -> Self {
        match k {
            HypervisorKind::Auto => Self::Auto,
            HypervisorKind::HuskVmm => Self::HuskVmm,
            HypervisorKind::Qemu => Self::Qemu,
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorKind::Auto => "auto",
            HypervisorKind::HuskVmm => "husk-vmm",
            HypervisorKind::Qemu => "qemu",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// The file as written. `deny_unknown_fields` everywhere: a misspelt key is an
/// error naming it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    hypervisor: HypervisorSection,
    #[serde(default)]
    shim: ShimSection,
    #[serde(default)]
    limits: LimitsSection,
}

/// Bounds on what one pod's guest can make the host hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    log_max_kib: Option<u64>,
    agent_log_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HypervisorSection {
    #[serde(default)]
    kind: HypervisorKind,
    #[serde(default)]
    accel: Accel,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    vcpus: Option<u32>,
    memory_mib: Option<u32>,
    qemu_path: Option<PathBuf>,
    vmm_path: Option<PathBuf>,
    boot_timeout_secs: Option<u64>,
    agent_timeout_secs: Option<u64>,
    kernel_params: Option<String>,
    console_log: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShimSection {
    log_level: Option<LogLevel>,
}

/// The resolved configuration the shim runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, or `None` for built-in defaults.
    pub source: Option<PathBuf>,
    pub hypervisor: HypervisorKind,
    pub accel: AccelChoice,
    /// Explicit paths; `None` means "search the default places" (see [`Config::kernel`]).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub qemu_path: Option<PathBuf>,
    pub vmm_path: Option<PathBuf>,
    pub boot_timeout: Duration,
    /// The deadline of each agent call once the VM is up.
    pub agent_timeout: Duration,
    pub kernel_params: String,
    /// Where to keep a copy of the guest console (and agent log) when the VM
    /// stops; `{id}` is replaced by the sandbox id.
    pub console_log: Option<PathBuf>,
    pub log_level: LogLevel,
    /// The cap on each guest-fed log file of a pod (console, agent log, VM
    /// process logs), in bytes.
    pub log_max_bytes: u64,
    /// How many agent-log connections a guest may hold open at once.
    pub agent_log_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            source: None,
            hypervisor: HypervisorKind::Auto,
            accel: AccelChoice::Auto,
            kernel: None,
            initrd: None,
            vcpus: 1,
            memory_mib: 256,
            qemu_path: None,
            vmm_path: None,
            boot_timeout: Duration::from_secs(60),
            agent_timeout: Duration::from_secs(10),
            kernel_params: String::new(),
            console_log: None,
            log_level: LogLevel::Info,
            log_max_bytes: husk_bounds::DEFAULT_LOG_MAX_BYTES,
            agent_log_connections: crate::hypervisor::DEFAULT_AGENT_LOG_CONNECTIONS,
        }
    }
}

impl Config {
    /// Loads `path` if given (it must exist), else [`DEFAULT_CONFIG_PATH`] if it
    /// exists, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Self::from_file(p),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.map(Path::to_path_buf).unwrap_or_default(),
            message,
        };
        // toml's messages name the key and quote the line: "unknown field
        // `vcpu`, expected one of ..." or "invalid type ... for key `hypervisor.vcpus`".
        let file: File = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let d = Config::default();
        let h = file.hypervisor;
        let vcpus = h.vcpus.unwrap_or(d.vcpus);
        if !(1..=64).contains(&vcpus) {
            return Err(invalid(format!(
                "key `hypervisor.vcpus`: must be 1..=64, got {vcpus}"
            )));
        }
        let memory_mib = h.memory_mib.unwrap_or(d.memory_mib);
        if memory_mib < 64 {
            return Err(invalid(format!(
                "key `hypervisor.memory_mib`: must be at least 64, got {memory_mib}"
            )));
        }
        let boot_timeout = match h.boot_timeout_secs {
            Some(0) => {
                return Err(invalid(
                    "key `hypervisor.boot_timeout_secs`: must be at least 1".into(),
                ))
            }
            Some(s) => Duration::from_secs(s),
            None => d.boot_timeout,
        };
        let agent_timeout = match h.agent_timeout_secs {
            Some(0) => {
                return Err(invalid(
                    "key `hypervisor.agent_timeout_secs`: must be at least 1".into(),
                ))
            }
            Some(s) => Duration::from_secs(s),
            None => d.agent_timeout,
        };
        let l = file.limits;
        let log_max_bytes = match l.log_max_kib {
            Some(k) if !(4..=1 << 20).contains(&k) => {
                return Err(invalid(format!(
                    "key `limits.log_max_kib`: must be 4..=1048576 (4 KiB to 1 GiB), got {k}"
                )))
            }
            Some(k) => k << 10,
            None => d.log_max_bytes,
        };
        let agent_log_connections = match l.agent_log_connections {
            Some(n) if !(1..=64).contains(&n) => {
                return Err(invalid(format!(
                    "key `limits.agent_log_connections`: must be 1..=64, got {n}"
                )))
            }
            Some(n) => n,
            None => d.agent_log_connections,
        };
        Ok(Config {
            source: path.map(Path::to_path_buf),
            hypervisor: h.kind,
            accel: match h.accel {
                Accel::Auto => AccelChoice::Auto,
                Accel::Kvm => AccelChoice::Kvm,
                Accel::Tcg => AccelChoice::Tcg,
            },
            kernel: h.kernel,
            initrd: h.initrd,
            vcpus,
            memory_mib,
            qemu_path: h.qemu_path,
            vmm_path: h.vmm_path,
            boot_timeout,
            agent_timeout,
            kernel_params: h.kernel_params.unwrap_or_default(),
            console_log: h.console_log,
            log_level: file.shim.log_level.unwrap_or(d.log_level),
            log_max_bytes,
            agent_log_connections,
        })
    }

    /// The guest kernel: the configured path, else the first that exists of
    /// `<shim dir>/../guest/vmlinux` (a build tree: target/debug/../guest),
    /// `/usr/local/share/husk/vmlinux`, `/usr/share/husk/vmlinux`.
    pub fn kernel(&self) -> Result<PathBuf, String> {
        guest_file(self.kernel.as_deref(), "vmlinux", "hypervisor.kernel")
    }

    pub fn initrd(&self) -> Result<PathBuf, String> {
        guest_file(self.initrd.as_deref(), "initrd.img", "hypervisor.initrd")
    }

    /// husk-vmm: the configured path, else next to the shim binary, else on PATH.
    pub fn vmm_binary(&self) -> Result<PathBuf, String> {
        binary(self.vmm_path.as_deref(), "husk-vmm", "hypervisor.vmm_path")
    }

    /// QEMU: the configured path, else `qemu-system-x86_64` next to the shim or on PATH.
    pub fn qemu_binary(&self) -> Result<PathBuf, String> {
        binary(
            self.qemu_path.as_deref(),
            "qemu-system-x86_64",
            "hypervisor.qemu_path",
        )
    }
}

fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

fn guest_file(configured: Option<&Path>, name: &str, key: &str) -> Result<PathBuf, String> {
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("{key} = {}: no such file", p.display()))
        };
    }
    let mut tried = Vec::new();
    if let Some(dir) = exe_dir() {
        tried.push(dir.join("../guest").join(name));
    }
    tried.push(Path::new("/usr/local/share/husk").join(name));
    tried.push(Path::new("/usr/share/husk").join(name));
    for p in &tried {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    Err(format!(
        "guest {name} not found (set {key}, or build it with `make guest`); tried {}",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn binary(configured: Option<&Path>, name: &str, key: &str) -> Result<PathBuf, String> {
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("{key} = {}: no such file", p.display()))
        };
    }
    if let Some(p) = exe_dir().map(|d| d.join(name)).filter(|p| p.is_file()) {
        return Ok(p);
    }
    if let Some(p) = search_path(name) {
        return Ok(p);
    }
    Err(format!(
        "{name} not found next to the shim binary or on PATH (set {key})"
    ))
}

fn search_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", None).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.hypervisor, HypervisorKind::Auto);
    }

    #[test]
    fn every_key_parses() {
        let c = Config::parse(
            r#"
            [hypervisor]
            kind = "qemu"
            accel = "tcg"
            kernel = "/k"
            initrd = "/i"
            vcpus = 2
            memory_mib = 512
            qemu_path = "/q"
            vmm_path = "/v"
            boot_timeout_secs = 30
            agent_timeout_secs = 20
            kernel_params = "quiet"
            console_log = "/var/log/husk/{id}.log"
            [shim]
            log_level = "debug"
            [limits]
            log_max_kib = 1024
            agent_log_connections = 2
            "#,
            None,
        )
        .unwrap();
        assert_eq!(c.log_max_bytes, 1 << 20);
        assert_eq!(c.agent_log_connections, 2);
        let e = Config::parse("[limits]\nlog_max_kib = 0\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.log_max_kib"), "{e}");
        assert_eq!(c.hypervisor, HypervisorKind::Qemu);
        assert_eq!(c.accel, AccelChoice::Tcg);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.boot_timeout, Duration::from_secs(30));
        assert_eq!(c.agent_timeout, Duration::from_secs(20));
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let e = Config::parse("[hypervisor]\nvcpu = 2\n", Some(Path::new("/x.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vcpu") && e.contains("/x.toml"), "{e}");
        let e = Config::parse("[hypervisor]\nvcpus = \"two\"\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vcpus"), "{e}");
        let e = Config::parse("[hypervisor]\nkind = \"xen\"\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("xen") && e.contains("kind"), "{e}");
        let e = Config::parse("[hypervisor]\nmemory_mib = 8\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hypervisor.memory_mib"), "{e}");
        let e = Config::parse("[vm]\n", None).unwrap_err().to_string();
        assert!(e.contains("vm"), "{e}");
    }

    #[test]
    fn missing_explicit_paths_name_their_key() {
        let c = Config::parse("[hypervisor]\nkernel = \"/no/such/vmlinux\"\n", None).unwrap();
        let e = c.kernel().unwrap_err();
        assert!(e.contains("hypervisor.kernel"), "{e}");
    }
}
