//! `mounts.json`: the mounts the shim made for a pod, in the order it made
//! them, so that teardown (and `delete` after a crash) unmounts exactly those.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use tracing::warn;

const FILE: &str = "mounts.json";
/// A record is a few entries per container; anything this large was not
/// written by the shim.
const MAX_RECORD_BYTES: u64 = 1 << 20;

pub struct Record {
    pod_dir: PathBuf,
    /// Relative to the pod directory.
    mounts: Vec<PathBuf>,
}

impl Record {
    pub fn new(pod_dir: &Path) -> Record {
        Record {
            pod_dir: pod_dir.to_path_buf(),
            mounts: Vec::new(),
        }
    }

    /// The record a dead shim left; an unreadable one is empty (and logged):
    /// nothing is unmounted then, and teardown leaves any mount it finds.
    pub fn load(pod_dir: &Path) -> Record {
        let mut rec = Record::new(pod_dir);
        let path = pod_dir.join(FILE);
        let read = || -> io::Result<Vec<PathBuf>> {
            let bytes = husk_bounds::read_tail(&path, MAX_RECORD_BYTES + 1)?;
            if bytes.len() as u64 > MAX_RECORD_BYTES {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "too large"));
            }
            serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        };
        match read() {
            Ok(m) => rec.mounts = m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!("pod share record {}: {e}", path.display()),
        }
        // Only plain relative paths below the pod directory are acted on.
        rec.mounts.retain(|p| {
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        });
        rec
    }

    pub fn len(&self) -> usize {
        self.mounts.len()
    }

    fn save(&self) -> io::Result<()> {
        let tmp = self.pod_dir.join(format!("{FILE}.tmp"));
        fs::write(&tmp, serde_json::to_vec(&self.mounts)?)?;
        fs::rename(&tmp, self.pod_dir.join(FILE))
    }

    pub fn push(&mut self, rel: PathBuf) -> io::Result<()> {
        self.mounts.push(rel);
        self.save()
    }

    /// Forgets the newest entry for `rel`.
    pub fn pop(&mut self, rel: &Path) -> io::Result<()> {
        if let Some(i) = self.mounts.iter().rposition(|m| m == rel) {
            self.mounts.remove(i);
        }
        self.save()
    }

    /// Unmounts the recorded mounts at or below `prefix`, newest first, and
    /// forgets those that are gone. Returns the ones that would not go.
    pub fn unmount_under(&mut self, prefix: &Path) -> Vec<(PathBuf, io::Error)> {
        let mut failed = Vec::new();
        let mut kept = Vec::new();
        for rel in std::mem::take(&mut self.mounts).into_iter().rev() {
            if !rel.starts_with(prefix) {
                kept.push(rel);
                continue;
            }
            let path = self.pod_dir.join(&rel);
            if let Err(e) = super::unmount(&path) {
                failed.push((path, e));
                kept.push(rel);
            }
        }
        kept.reverse();
        self.mounts = kept;
        if let Err(e) = self.save() {
            warn!(
                "saving the pod share record in {}: {e}",
                self.pod_dir.display()
            );
        }
        failed
    }

    pub fn remove_file(&self) {
        let _ = fs::remove_file(self.pod_dir.join(FILE));
    }
}
