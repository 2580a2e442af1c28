//! A writer for the cpio "newc" format, the one the Linux kernel unpacks as an
//! initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Only what an initrd needs: directories, regular files, symlinks and device
//! nodes. Nothing is read from the host's file metadata: owners, modes and
//! times come from the caller, so the same inputs always give the same bytes.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::CharDev { path, .. } => path,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("invalid archive path {0:?}: must be relative, without '..' or empty components")]
    BadPath(String),
    #[error("{0:?} is larger than the 4 GiB a newc member can hold")]
    TooLarge(String),
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    #[error("writing archive: {0}")]
    Io(#[from] io::Error),
}

fn check_path(path: &str) -> Result<(), CpioError> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(CpioError::BadPath(path.to_string()))
    }
}

/// Writes `entries` as a newc archive, sorted by path so that the order the
/// caller listed them in does not change the output. Parents are not created
/// implicitly: list them.
pub fn write_archive<W: Write>(out: &mut W, entries: &[Entry]) -> Result<u64, CpioError> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path().cmp(b.path()));
    for pair in sorted.windows(2) {
        if pair[0].path() == pair[1].path() {
            return Err(CpioError::Duplicate(pair[0].path().to_string()));
        }
    }
    let mut w = CountingWriter {
        inner: out,
        count: 0,
    };
    for (i, entry) in sorted.iter().enumerate() {
        check_path(entry.path())?;
        // Inode numbers only need to be unique within the archive.
        let ino = i as u32 + 1;
        let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir { mode, .. } => (S_IFDIR | (mode & 0o7777), 2, &[], (0, 0)),
            Entry::File { mode, data, .. } => (S_IFREG | (mode & 0o7777), 1, data, (0, 0)),
            Entry::Symlink { target, .. } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
            Entry::CharDev {
                mode, major, minor, ..
            } => (S_IFCHR | (mode & 0o7777), 1, &[], (*major, *minor)),
        };
        let size =
            u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(entry.path().into()))?;
        write_member(&mut w, entry.path(), ino, mode, nlink, size, rdev)?;
        w.write_all(data)?;
        pad4(&mut w)?;
    }
    write_member(&mut w, TRAILER, 0, 0, 1, 0, (0, 0))?;
    Ok(w.count)
}

fn write_member<W: Write>(
    w: &mut CountingWriter<W>,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    (rmaj, rmin): (u32, u32),
) -> Result<(), CpioError> {
    let namesize = name.len() as u32 + 1;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, namesize, 0,
    ];
    let mut header = String::with_capacity(110);
    header.push_str(MAGIC);
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w)?;
    Ok(())
}

fn pad4<W: Write>(w: &mut CountingWriter<W>) -> io::Result<()> {
    let pad = (4 - (w.count % 4) as usize) % 4;
    w.write_all(&[0u8; 3][..pad])
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::File {
                path: "init".into(),
                mode: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
            Entry::Dir {
                path: "dev".into(),
                mode: 0o755,
            },
            Entry::CharDev {
                path: "dev/console".into(),
                mode: 0o600,
                major: 5,
                minor: 1,
            },
            Entry::Symlink {
                path: "sbin".into(),
                target: "bin".into(),
            },
        ]
    }

    #[test]
    fn output_is_independent_of_input_order() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_archive(&mut a, &sample()).unwrap();
        let mut rev = sample();
        rev.reverse();
        write_archive(&mut b, &rev).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn bad_paths_and_duplicates_are_rejected() {
        for p in ["/init", "a/../b", "", "a//b", "./x"] {
            let e = [Entry::Dir {
                path: p.into(),
                mode: 0o755,
            }];
            assert!(
                matches!(
                    write_archive(&mut Vec::new(), &e),
                    Err(CpioError::BadPath(_))
                ),
                "{p}"
            );
        }
        let e = [
            Entry::Dir {
                path: "a".into(),
                mode: 0o755,
            },
            Entry::Dir {
                path: "a".into(),
                mode: 0o700,
            },
        ];
        assert!(matches!(
            write_archive(&mut Vec::new(), &e),
            Err(CpioError::Duplicate(_))
        ));
    }

    /// Cross-checks the archive with GNU cpio, an independent reader, where it is installed.
    #[test]
    fn gnu_cpio_lists_what_was_written() {
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            husk_skip::missing(
                "gnu_cpio_lists_what_was_written",
                "cpio(1) is not installed",
            );
            return;
        };
        assert!(out.status.success());
        let mut buf = Vec::new();
        write_archive(&mut buf, &sample()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, &buf).unwrap();
        let run = |flags: &str| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("cpio {flags} < {}", path.display()))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let names = run("-it");
        assert_eq!(
            names.lines().collect::<Vec<_>>(),
            ["dev", "dev/console", "init", "sbin"]
        );
        let text = run("-itv");
        assert!(text.contains("crw-------"), "{text}");
        assert!(text.contains("sbin -> bin"), "{text}");
    }
}
