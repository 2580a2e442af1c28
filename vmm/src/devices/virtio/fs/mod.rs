//! The virtio-fs device: one host directory shared with the guest as a FUSE file system.
//!
//! What it is for: every container of a pod gets its root file system from the host through
//! this device. The shim mounts each container's rootfs under the pod's shared directory
//! (`<shared>/<container>/rootfs`), one virtio-fs device exports that directory under a tag,
//! and the agent mounts it in the guest with `mount -t virtiofs <tag> <dir>`.
//!
//! The guest's requests are FUSE messages in virtqueue buffers. They are decoded and answered
//! by [fuse-backend-rs]'s `Server` over its passthrough file system (`PassthroughFs`), which
//! keeps an `O_PATH` fd per inode the guest knows and performs every operation relative to
//! those fds, never through a path built from guest names.
//!
//! - [`device::FsDevice`] is the transport-independent part: hand it guest memory and a
//!   `virtio_queue::Queue` and it serves what the guest queued and says whether to interrupt.
//!   The vhost-user front end (`crate::vhost_user::fs`) uses it today; husk-vmm's own
//!   virtio-mmio transport will drive it the same way.
//! - [`request`] checks each request before fuse-backend-rs sees it (sizes, lengths).
//! - [`share::SharedFs`] is `PassthroughFs` with the FUSE_INIT options a share needs.
//! - [`defs`] holds the protocol constants.
//!
//! # Security
//!
//! The guest kernel is untrusted; it controls everything *inside* the share (it can send any
//! uid in a request), and nothing outside it:
//!
//! - Names never carry a path: `LOOKUP` of a name with `/` fails (so no absolute names), the
//!   other name-taking operations also refuse `.` and `..`, and `..` looked up at the root
//!   resolves to the root itself. The last component is opened with `O_NOFOLLOW`, and names
//!   are resolved against `O_PATH` fds of directories, so a symlink in the share is never
//!   followed on the host: looking up through a symlink fails with `ENOTDIR`.
//! - Only regular files and directories are ever opened for I/O; device nodes, FIFOs and
//!   sockets the guest creates stay inert on the host (`EBADF` on open).
//! - Request sizes are capped (see [`request`]), every length in a request is checked against
//!   the buffers that carry it, descriptor addresses are checked against guest memory, and a
//!   malformed request gets an error reply or is dropped; it never stops the device.
//! - Open inodes and handles each hold one host fd until the guest forgets or releases them,
//!   so the process's `RLIMIT_NOFILE` bounds them ([`crate::limits::limit_open_files`],
//!   `--max-open-files`); past it the guest gets `EMFILE`.
//! - Disk space is not bounded here: put the shared directory on a file system with a quota
//!   if a pod must not fill the host's disk.
//!
//! # Cache and attributes
//!
//! The default is [`CacheMode::Auto`] (close-to-open consistency, 1 s attribute and entry
//! timeouts): a container rootfs is used by one pod at a time, but the host may still update
//! files in the share (`/etc/hosts`, `resolv.conf`), which the guest then sees on next open.
//! Writeback caching stays off because it needs read access to files the guest opened
//! write-only and breaks `O_APPEND` when the host writes too. Extended attributes are off by
//! default (each write would otherwise cost an extra round trip to drop setuid bits and file
//! capabilities); turn them on with [`FsConfig::xattr`] where images rely on file capabilities
//! (`security.capability`) or ACLs.
//!
//! # Credentials
//!
//! fuse-backend-rs creates files, directories, nodes and symlinks with the thread's effective
//! uid/gid switched to the requester's (`setresuid`/`setresgid` on the serving thread only, so
//! the process's other threads keep theirs), so new files get the owner the guest expects;
//! every other operation runs with the process's own credentials. The backend therefore runs
//! as root (`CAP_SETUID`, `CAP_SETGID`, `CAP_DAC_OVERRIDE`, `CAP_FOWNER`, `CAP_CHOWN`) to serve
//! a rootfs whose files belong to many uids. Supplementary groups of the requester are not
//! applied on the host (FUSE does not carry them). Note that `PassthroughFs` clears the
//! process umask (the guest applies its own).
//!
//! [fuse-backend-rs]: https://docs.rs/fuse-backend-rs

pub mod defs;
pub mod device;
pub mod request;
pub mod share;
pub mod virtio;

#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

pub use self::device::FsDevice;

/// Errors of the virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("tag {0:?}: must be 1 to 36 bytes, without NUL bytes")]
    BadTag(String),
    #[error("cannot open shared directory {}", path.display())]
    SharedDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("shared directory {}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("shared directory {}: the path must be valid UTF-8", .0.display())]
    NonUtf8Path(PathBuf),
    #[error("the device needs at least one request queue")]
    NoRequestQueues,
    #[error("cannot set up the passthrough file system: {0}")]
    Passthrough(#[source] io::Error),
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// How much the guest may cache (FUSE's cache policy and attribute/entry timeouts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// No data caching, no attribute or entry caching: for directories the host changes a lot.
    Never,
    /// Close-to-open consistency, attributes and entries valid for 1 s.
    #[default]
    Auto,
    /// Cache everything for a day: only when nothing but this guest changes the share.
    Always,
}

impl FromStr for CacheMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" | "none" => Ok(CacheMode::Never),
            "auto" => Ok(CacheMode::Auto),
            "always" => Ok(CacheMode::Always),
            other => Err(format!(
                "unknown cache mode {other:?} (never, auto or always)"
            )),
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::Never => "never",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        })
    }
}

/// What one virtio-fs device exports and how.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// The host directory the guest sees as the file system root.
    pub shared_dir: PathBuf,
    /// The name the guest mounts (`mount -t virtiofs <tag> ...`): 1 to 36 bytes.
    pub tag: String,
    /// Request queues besides the high-priority queue (at least 1).
    pub num_request_queues: u16,
    pub cache: CacheMode,
    /// Pass extended attributes through (`getxattr` and friends); off by default.
    pub xattr: bool,
}

impl FsConfig {
    pub fn new(shared_dir: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        FsConfig {
            shared_dir: shared_dir.into(),
            tag: tag.into(),
            num_request_queues: 1,
            cache: CacheMode::default(),
            xattr: false,
        }
    }

    /// Checks the tag and the directory without touching any process-wide state, so that a
    /// front end can report a bad argument before it binds sockets. Returns the shared
    /// directory in canonical form.
    pub fn validate(&self) -> Result<PathBuf, FsError> {
        validate_tag(&self.tag)?;
        if self.num_request_queues == 0 {
            return Err(FsError::NoRequestQueues);
        }
        let dir = std::fs::canonicalize(&self.shared_dir).map_err(|source| FsError::SharedDir {
            path: self.shared_dir.clone(),
            source,
        })?;
        let md = std::fs::metadata(&dir).map_err(|source| FsError::SharedDir {
            path: self.shared_dir.clone(),
            source,
        })?;
        if !md.is_dir() {
            return Err(FsError::NotADirectory(self.shared_dir.clone()));
        }
        if dir.to_str().is_none() {
            return Err(FsError::NonUtf8Path(dir));
        }
        Ok(dir)
    }
}

/// A tag is what the guest names in `mount`; the config space holds 36 bytes of it.
pub fn validate_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > defs::TAG_LEN || tag.as_bytes().contains(&0) {
        return Err(FsError::BadTag(tag.to_string()));
    }
    Ok(())
}
