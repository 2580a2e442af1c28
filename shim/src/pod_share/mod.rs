//! Every host path of the pod share, in one place, so that one rule can be
//! checked here: **the shim never follows, creates in, renames or deletes a
//! path the guest can write.**
//!
//! ```text
//! /run/husk/<pod>/            0700, the shim's alone
//!   mounts.json               what the shim mounted (relative paths, in order)
//!   mounts/                   shim-private: every mount the shim makes is made here
//!     <ctr>/rootfs            the container's rootfs (containerd's overlay), nosuid,nodev
//!     <ctr>/mounts/<n>        CRI bind mounts (/etc/hosts, volumes), nosuid,nodev
//!   shared/                   the guest's view: a recursive bind of mounts/, read-only
//! ```
//!
//! `mounts/` is bound onto itself and made a shared mount; `shared/` is a
//! recursive bind of it made a slave (mounts made under `mounts/` later appear
//! in `shared/`, nothing done in `shared/` reaches `mounts/`) and then shared
//! again, so husk-vmm's jail, which binds `shared/` as a slave of its own,
//! sees later mounts too. `shared/` is remounted read-only, nosuid, nodev and
//! noexec: virtio-fs exports it, so the guest can write inside each container's
//! rootfs (a mount of its own, writable) and inside writable volumes, but never
//! in the share's root or a container's directory, where the shim's mount
//! points live. Names the guest picks therefore never reach a path the shim
//! uses, by construction; the paths the shim does use are resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the pod directory all
//! the same, and mounts are made on descriptors (`/proc/self/fd/N`).
//!
//! Teardown unmounts what `mounts.json` records, newest first, then checks
//! `/proc/self/mountinfo` (as bytes) for anything still mounted below the pod
//! directory; what is left there is reported and left in place, and the
//! directories are removed without crossing into any mount
//! ([`crate::hostfs::remove`]). `delete` after a shim crash does the same from
//! the record on disk.

mod record;
pub mod rootfs;

use std::{
    fs, io,
    os::{fd::OwnedFd, unix::fs::DirBuilderExt},
    path::{Path, PathBuf},
    sync::Mutex,
};

use nix::{
    fcntl::OFlag,
    mount::{mount, umount2, MntFlags, MsFlags},
};
use tracing::{info, warn};

use self::record::Record;
pub use self::rootfs::RootfsMount;
use crate::{
    hostfs::{detached, mountinfo, remove, resolve},
    ids,
};

/// The shim-private directory every mount is made in.
const MOUNTS: &str = "mounts";
/// The guest's read-only view of [`MOUNTS`], exported by virtio-fs.
const VIEW: &str = "shared";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error(transparent)]
    Id(#[from] ids::BadId),
    #[error("pod share {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        source: io::Error,
    },
    #[error("container {container} rootfs: {source}")]
    Rootfs {
        container: String,
        source: rootfs::MountError,
    },
}

fn io_err(path: &Path, what: impl Into<String>) -> impl FnOnce(io::Error) -> ShareError {
    let path = path.to_path_buf();
    let what = what.into();
    move |source| ShareError::Io { path, what, source }
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// What teardown could not undo, for the log (and tests).
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Recorded mounts that would not unmount.
    pub unmount_errors: Vec<(PathBuf, io::Error)>,
    /// Mount points still below the directory after the unmounts.
    pub still_mounted: Vec<PathBuf>,
    /// What removing the directory left.
    pub removal: remove::Leftovers,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.unmount_errors.is_empty() && self.still_mounted.is_empty() && self.removal.is_empty()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (p, e) in &self.unmount_errors {
            writeln!(f, "{}: unmount failed: {e}", p.display())?;
        }
        for p in &self.still_mounted {
            writeln!(f, "{}: still mounted, left in place", p.display())?;
        }
        write!(f, "{}", self.removal)
    }
}

/// A bind of a host file or directory into a container's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub source: PathBuf,
    /// The mount's index in the spec: its name below `<ctr>/mounts/`.
    pub index: usize,
    pub readonly: bool,
}

impl HostBind {
    /// Where the guest finds it, relative to the share.
    pub fn guest_path(&self, container: &str) -> String {
        format!("{container}/mounts/{}", self.index)
    }
}

/// The pod share of one sandbox.
pub struct PodShare {
    pod_dir: PathBuf,
    /// The pod directory, held open: every path below it is resolved from here.
    dir: OwnedFd,
    record: Mutex<Record>,
}

impl PodShare {
    /// Makes `mounts/` and the guest's view `shared/` in `pod_dir` (which the
    /// caller created, 0700).
    pub fn create(pod_dir: &Path) -> Result<PodShare, ShareError> {
        let dir = nix::fcntl::open(
            pod_dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io_err(pod_dir, "opening the pod directory")(errno(e)))?;
        // SAFETY: a new descriptor nothing else owns.
        let dir = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dir) };
        let share = PodShare {
            pod_dir: pod_dir.to_path_buf(),
            dir,
            record: Mutex::new(Record::new(pod_dir)),
        };
        share.make_view()?;
        Ok(share)
    }

    fn make_view(&self) -> Result<(), ShareError> {
        let mounts = self.pod_dir.join(MOUNTS);
        let view = self.pod_dir.join(VIEW);
        for d in [&mounts, &view] {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(d)
                .map_err(io_err(d, "creating"))?;
        }
        let m =
            resolve::open_path(&self.dir, Path::new(MOUNTS)).map_err(io_err(&mounts, "opening"))?;
        self.recorded(Path::new(MOUNTS), || {
            bind(&m, &m, MsFlags::empty())?;
            // It holds mount points only: nothing on it is executed or opened
            // as a device.
            remount(
                &mounts,
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            )?;
            propagation(&mounts, MsFlags::MS_SHARED)
        })
        .map_err(io_err(&mounts, "binding it onto itself as a shared mount"))?;
        // Re-open: the descriptor above is the directory under the new mount.
        let m =
            resolve::open_path(&self.dir, Path::new(MOUNTS)).map_err(io_err(&mounts, "opening"))?;
        let v = resolve::open_path(&self.dir, Path::new(VIEW)).map_err(io_err(&view, "opening"))?;
        self.recorded(Path::new(VIEW), || {
            bind(&m, &v, MsFlags::MS_REC)?;
            propagation(&view, MsFlags::MS_SLAVE)?;
            propagation(&view, MsFlags::MS_SHARED)?;
            remount(
                &view,
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            )
        })
        .map_err(io_err(&view, "making the guest's read-only view"))?;
        Ok(())
    }

    /// Records `rel` as mounted (on disk, before the mount is made, so a crash
    /// in between still finds it), then runs `mount_it`; on error the mount is
    /// undone and forgotten.
    fn recorded<E: From<io::Error>>(
        &self,
        rel: &Path,
        mount_it: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        rec.push(rel.to_path_buf())?;
        if let Err(e) = mount_it() {
            // Nothing mounted (EINVAL) is the usual case; a bind whose remount
            // failed is undone here.
            let _ = unmount(&self.pod_dir.join(rel));
            rec.pop(rel)?;
            return Err(e);
        }
        Ok(())
    }

    /// The directory virtio-fs exports: the guest's read-only view.
    pub fn view(&self) -> PathBuf {
        self.pod_dir.join(VIEW)
    }

    /// `<ctr>/rootfs` below the share, as the guest finds it.
    pub fn guest_rootfs(container: &str) -> String {
        format!("{container}/rootfs")
    }

    /// The host path of a container's rootfs mount (shim-private).
    pub fn rootfs_host_path(&self, container: &str) -> PathBuf {
        self.pod_dir.join(MOUNTS).join(container).join("rootfs")
    }

    /// Mounts containerd's rootfs mounts for `container` (each on top of the
    /// last), or binds `prepared` (a bundle's own rootfs directory) when there
    /// are none. Host-side flags nosuid,nodev are always added.
    pub fn mount_rootfs(
        &self,
        container: &str,
        mounts: &[RootfsMount],
        prepared: &Path,
    ) -> Result<(), ShareError> {
        ids::check("container", container)?;
        let rel = Path::new(MOUNTS).join(container).join("rootfs");
        let host = self.pod_dir.join(&rel);
        resolve::mkdirs(&self.dir, &rel, 0o755).map_err(io_err(&host, "creating"))?;
        let result = if mounts.is_empty() {
            let bind = RootfsMount {
                kind: "rbind".into(),
                source: prepared.to_string_lossy().into_owned(),
                options: vec!["rbind".into()],
            };
            self.mount_layers(&rel, std::slice::from_ref(&bind))
        } else {
            self.mount_layers(&rel, mounts)
        };
        result.map_err(|source| ShareError::Rootfs {
            container: container.to_string(),
            source,
        })
    }

    fn mount_layers(&self, rel: &Path, mounts: &[RootfsMount]) -> Result<(), rootfs::MountError> {
        for (index, m) in mounts.iter().enumerate() {
            // Each layer goes on whatever is at the path now: resolve it again.
            let target =
                resolve::open_path(&self.dir, rel).map_err(|e| rootfs::MountError::Target {
                    path: self.pod_dir.join(rel),
                    source: e,
                })?;
            let host = self.pod_dir.join(rel);
            let result = self.recorded(rel, || rootfs::mount_one(index, m, &target, &host));
            if let Err(e) = result {
                self.unmount_recorded_under(rel);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Binds a host file or directory (a CRI bind mount's source) at
    /// `<ctr>/mounts/<index>`, read-only if asked, always nosuid,nodev.
    pub fn bind_host(&self, container: &str, b: &HostBind) -> Result<(), ShareError> {
        ids::check("container", container)?;
        let dir_rel = Path::new(MOUNTS).join(container).join("mounts");
        let rel = dir_rel.join(b.index.to_string());
        let host = self.pod_dir.join(&rel);
        let err = |what: &str| io_err(&host, format!("{what} (for {})", b.source.display()));
        // The source is containerd's or kubelet's path, outside anything the
        // guest writes; it is opened once and bound by descriptor.
        let source = nix::fcntl::open(
            &b.source,
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| err("opening the source")(errno(e)))?;
        // SAFETY: a new descriptor nothing else owns.
        let source = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(source) };
        let is_dir = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&source))
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .map_err(|e| err("inspecting the source")(errno(e)))?;
        resolve::mkdirs(&self.dir, &dir_rel, 0o755).map_err(err("creating"))?;
        let target = if is_dir {
            resolve::mkdirs(&self.dir, &rel, 0o755)
        } else {
            resolve::create_file(&self.dir, &rel, 0o600)
        }
        .map_err(err("creating the mount point"))?;
        // Flags are set before the bind is attached (see hostfs::detached):
        // read-only (submounts too) even to a guest that ignores the spec's "ro".
        let mut attrs = detached::ATTR_NOSUID | detached::ATTR_NODEV;
        if b.readonly {
            attrs |= detached::ATTR_RDONLY;
        }
        self.recorded(&rel, || detached::bind(&source, &target, true, attrs))
            .map_err(err("binding"))
    }

    /// Unmounts everything recorded for `container` and removes its directory
    /// (never across a mount that stayed).
    pub fn remove_container(&self, container: &str) -> Leftovers {
        let mut left = Leftovers::default();
        if ids::check("container", container).is_err() {
            return left;
        }
        let rel = Path::new(MOUNTS).join(container);
        left.unmount_errors = self.unmount_recorded_under(&rel);
        self.finish(&rel, &mut left);
        left
    }

    fn unmount_recorded_under(&self, rel: &Path) -> Vec<(PathBuf, io::Error)> {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        rec.unmount_under(rel)
    }

    /// Checks that nothing is mounted below `rel` any more, then removes it.
    fn finish(&self, rel: &Path, left: &mut Leftovers) {
        let path = self.pod_dir.join(rel);
        match mountinfo::current_mounts_under(&path) {
            Ok(m) if m.is_empty() => match remove::remove_tree(&path) {
                Ok(r) => left.removal = r,
                Err(e) => left.removal.errors.push((path, e)),
            },
            Ok(m) => left.still_mounted = m,
            Err(e) => left.removal.errors.push((
                path,
                io::Error::new(e.kind(), format!("reading mountinfo: {e}")),
            )),
        }
    }

    /// Unmounts everything the share mounted (containers, the view, `mounts/`)
    /// and removes the share's directories and record.
    /// Idempotent: the record forgets what it unmounted.
    pub fn teardown(&self) -> Leftovers {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        teardown_recorded(&self.pod_dir, &mut rec)
    }
}

fn teardown_recorded(pod_dir: &Path, rec: &mut Record) -> Leftovers {
    let mut left = Leftovers {
        unmount_errors: rec.unmount_under(Path::new("")),
        ..Default::default()
    };
    match mountinfo::current_mounts_under(pod_dir) {
        Ok(m) if m.is_empty() => {
            for d in [MOUNTS, VIEW] {
                let path = pod_dir.join(d);
                match remove::remove_tree(&path) {
                    Ok(r) => {
                        left.removal.mounts.extend(r.mounts);
                        left.removal.errors.extend(r.errors);
                    }
                    Err(e) => left.removal.errors.push((path, e)),
                }
            }
            if left.removal.is_empty() {
                rec.remove_file();
            }
        }
        Ok(m) => left.still_mounted = m,
        Err(e) => left.removal.errors.push((
            pod_dir.to_path_buf(),
            io::Error::new(e.kind(), format!("reading mountinfo: {e}")),
        )),
    }
    if !left.is_empty() {
        warn!(pod = %pod_dir.display(), "pod share teardown left:\n{left}");
    }
    left
}

/// `delete` after a shim crash: undoes what the record on disk says the dead
/// shim mounted, with the same rules as [`PodShare::teardown`].
pub fn cleanup(pod_dir: &Path) -> Leftovers {
    let mut rec = Record::load(pod_dir);
    info!(pod = %pod_dir.display(), mounts = rec.len(), "cleaning up a pod share from its record");
    teardown_recorded(pod_dir, &mut rec)
}

/// A classic bind: it joins `source`'s peer group, which the view needs to
/// become its slave (a detached clone would be private).
fn bind(source: &OwnedFd, target: &OwnedFd, extra: MsFlags) -> io::Result<()> {
    mount(
        Some(&resolve::fd_path(source)),
        &resolve::fd_path(target),
        None::<&str>,
        MsFlags::MS_BIND | extra,
        None::<&str>,
    )
    .map_err(errno)
}

/// Applies `flags` to the mount now at `path` (a shim-private path, so naming it
/// is safe: nothing on the way is the guest's). Only for the view's own root:
/// a remount does not reach copies that propagation already made.
fn remount(path: &Path, flags: MsFlags) -> io::Result<()> {
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(errno)
}

fn propagation(path: &Path, kind: MsFlags) -> io::Result<()> {
    mount(None::<&str>, path, None::<&str>, kind, None::<&str>).map_err(errno)
}

/// Unmounts the mount at `path`, detaching it if busy (a late reader through
/// virtio-fs). `EINVAL` (nothing mounted there any more) counts as done.
fn unmount(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            match umount2(path, MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
                Err(e) => Err(errno(e)),
            }
        }
        Err(e) => Err(errno(e)),
    }
}

#[cfg(test)]
mod tests;
