//! A log file with a byte cap that holds however fast the writer is.
//!
//! When a write would take the file past its cap, the file is truncated and
//! starts again with a marker line; the newest output is what a reader wants
//! (the tail of a console that ends in a panic). Truncating in place, rather than
//! rotating to a second file, works from inside a jail that cannot see the
//! file's directory, and needs nothing but the open file. Writes append
//! (O_APPEND), so a write is one `write(2)` and a restart one `ftruncate(2)`:
//! nothing else for a seccomp filter to allow.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::Path,
};

/// What a pod's log files are capped at unless configured otherwise.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 4 << 20;

pub struct BoundedLog {
    file: File,
    max: u64,
    len: u64,
    dropped: u64,
}

impl BoundedLog {
    /// Creates (or truncates) `path`, capped at `max` bytes (at least 4 KiB).
    pub fn create(path: &Path, max: u64) -> io::Result<BoundedLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        file.set_len(0)?;
        Self::from_file(file, max)
    }

    /// Takes a file opened for writing, empty or not (it is switched to
    /// O_APPEND); its current length counts.
    pub fn from_file(file: File, max: u64) -> io::Result<BoundedLog> {
        // SAFETY: fcntl on a descriptor this function owns, no pointers.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_APPEND) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        let len = file.metadata()?.len();
        Ok(BoundedLog {
            file,
            max: max.max(4096),
            len,
            dropped: 0,
        })
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Bytes thrown away so far to keep the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn start_over(&mut self) -> io::Result<()> {
        self.dropped += self.len;
        self.file.set_len(0)?;
        let marker = format!(
            "[log reached its cap of {} bytes: {} earlier bytes dropped]\n",
            self.max, self.dropped
        );
        self.file.write_all(marker.as_bytes())?;
        self.len = marker.len() as u64;
        Ok(())
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Room for the marker line after a restart.
        let room = self.max.saturating_sub(128).max(1);
        let mut take = buf;
        if take.len() as u64 > room {
            // More than the whole cap in one write: only its end is kept.
            self.dropped += (take.len() as u64) - room;
            take = &take[take.len() - room as usize..];
        }
        if self.len + take.len() as u64 > self.max {
            self.start_over()?;
        }
        self.file.write_all(take)?;
        self.len += take.len() as u64;
        // The whole buffer counts as written: the part cut off was dropped
        // on purpose, not left for the caller to retry.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Reads at most the last `max` bytes of a file (a log a guest fed).
pub fn read_tail(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn the_cap_holds_and_the_newest_output_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = BoundedLog::create(&path, 8192).unwrap();
        for i in 0..100_000u32 {
            writeln!(log, "line {i:06} of a guest that never stops").unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 8192);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("[log reached its cap of 8192 bytes"),
            "{text:.80}"
        );
        assert!(text.ends_with("line 099999 of a guest that never stops\n"));
        assert!(log.dropped() > 3_000_000);
    }

    #[test]
    fn one_write_larger_than_the_cap_keeps_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let mut log = BoundedLog::create(&path, 4096).unwrap();
        let mut big = vec![b'a'; 1 << 20];
        big.extend_from_slice(b"END\n");
        assert_eq!(log.write(&big).unwrap(), big.len());
        let data = std::fs::read(&path).unwrap();
        assert!(data.len() <= 4096);
        assert!(data.ends_with(b"END\n"));
    }

    #[test]
    fn read_tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        std::fs::write(&path, vec![b'x'; 100_000]).unwrap();
        assert_eq!(read_tail(&path, 3000).unwrap().len(), 3000);
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(read_tail(&path, 3000).unwrap(), b"short");
    }
}
