//! Pod-wide set-up (`CreateSandbox`): the pod's hostname and DNS, and the
//! virtio-fs share that carries every container's rootfs from the host.

use std::{
    fs,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use nix::mount::{mount, MsFlags};

use super::error::{Error, Result};

/// Longest resolv.conf accepted.
const MAX_DNS_BYTES: usize = 64 * 1024;
/// HOST_NAME_MAX.
const MAX_HOSTNAME: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    pub hostname: String,
    pub dns: String,
    pub share_tag: String,
    pub share_mount_point: String,
}

/// What later calls need from the sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Where the share is; relative rootfs and bind sources resolve here.
    pub share: PathBuf,
    /// The pod's resolv.conf in the guest, if DNS was given.
    pub resolv_conf: Option<PathBuf>,
}

/// Sets the sandbox up. `guest` is false for an agent running on a host
/// (tests): it then leaves the machine's hostname and /etc alone and writes
/// only below `state_dir`.
pub fn create(cfg: &SandboxConfig, guest: bool, state_dir: &Path) -> Result<Sandbox> {
    validate_hostname(&cfg.hostname)?;
    if cfg.dns.len() > MAX_DNS_BYTES {
        return Err(Error::invalid(format!(
            "dns is {} bytes; at most {MAX_DNS_BYTES}",
            cfg.dns.len()
        )));
    }
    let share = if cfg.share_mount_point.is_empty() {
        state_dir.join("shared")
    } else {
        PathBuf::from(&cfg.share_mount_point)
    };
    if !share.is_absolute() {
        return Err(Error::invalid(format!(
            "share_mount_point {:?} is not absolute",
            cfg.share_mount_point
        )));
    }

    let dir = state_dir.join("sandbox");
    mkdir(&dir)?;
    if !cfg.hostname.is_empty() {
        write(
            &dir.join("hostname"),
            format!("{}\n", cfg.hostname).as_bytes(),
        )?;
        if guest {
            nix::unistd::sethostname(&cfg.hostname)
                .map_err(|e| Error::internal(format!("setting hostname: {e}")))?;
        }
    }
    let resolv_conf = if cfg.dns.is_empty() {
        None
    } else {
        let path = dir.join("resolv.conf");
        write(&path, cfg.dns.as_bytes())?;
        if guest {
            // The guest's own lookups (none today) use the pod's DNS too.
            mkdir(Path::new("/etc"))?;
            write(Path::new("/etc/resolv.conf"), cfg.dns.as_bytes())?;
        }
        Some(path)
    };

    if cfg.share_tag.is_empty() {
        if !share.is_dir() {
            return Err(Error::invalid(format!(
                "share_mount_point {} is not a directory (and no share_tag to mount there)",
                share.display()
            )));
        }
    } else {
        mkdir(&share)?;
        mount(
            Some(cfg.share_tag.as_str()),
            &share,
            Some("virtiofs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| {
            Error::internal(format!(
                "mounting virtio-fs tag {:?} on {}: {e}",
                cfg.share_tag,
                share.display()
            ))
        })?;
        tracing::info!(tag = cfg.share_tag, at = %share.display(), "mounted the sandbox share");
    }
    Ok(Sandbox { share, resolv_conf })
}

fn validate_hostname(name: &str) -> Result<()> {
    if name.len() > MAX_HOSTNAME {
        return Err(Error::invalid(format!(
            "hostname is longer than {MAX_HOSTNAME} bytes"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(Error::invalid(format!("hostname {name:?} contains {c:?}")));
    }
    Ok(())
}

fn mkdir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| Error::internal(format!("creating {}: {e}", path.display())))
}

fn write(path: &Path, data: &[u8]) -> Result<()> {
    fs::write(path, data).map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mode_writes_only_below_the_state_dir() {
        let state = tempfile::tempdir().unwrap();
        let share = state.path().join("share");
        fs::create_dir(&share).unwrap();
        let sb = create(
            &SandboxConfig {
                hostname: "pod-1".into(),
                dns: "nameserver 10.0.0.1\n".into(),
                share_tag: String::new(),
                share_mount_point: share.to_str().unwrap().into(),
            },
            false,
            state.path(),
        )
        .unwrap();
        assert_eq!(sb.share, share);
        assert_eq!(
            fs::read_to_string(sb.resolv_conf.unwrap()).unwrap(),
            "nameserver 10.0.0.1\n"
        );
        assert_eq!(
            fs::read_to_string(state.path().join("sandbox/hostname")).unwrap(),
            "pod-1\n"
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        let state = tempfile::tempdir().unwrap();
        for (cfg, says) in [
            (
                SandboxConfig {
                    hostname: "a/b".into(),
                    ..Default::default()
                },
                "hostname",
            ),
            (
                SandboxConfig {
                    share_mount_point: "rel".into(),
                    ..Default::default()
                },
                "share_mount_point",
            ),
            (
                SandboxConfig {
                    share_mount_point: "/nonexistent/share".into(),
                    ..Default::default()
                },
                "share_mount_point",
            ),
            (
                SandboxConfig {
                    dns: "x".repeat(MAX_DNS_BYTES + 1),
                    ..Default::default()
                },
                "dns",
            ),
        ] {
            let e = create(&cfg, false, state.path()).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(e.to_string().starts_with(says), "{e}");
        }
    }
}
