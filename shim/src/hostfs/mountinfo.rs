//! `/proc/self/mountinfo`, parsed as bytes.
//!
//! Mount points are whatever names their directories have, and some of those
//! names a guest can choose (a directory below a volume it can rename): they are
//! not UTF-8, may hold spaces or newlines (which the kernel writes as `\ooo`
//! octal escapes), and must never make the parse fail for the other mounts.

use std::{
    ffi::OsString,
    io,
    os::unix::ffi::OsStringExt,
    path::{Path, PathBuf},
};

/// One line of mountinfo (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u64,
    pub parent_id: u64,
    /// The root of the mount within its filesystem.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev,...`).
    pub options: String,
    pub fs_type: String,
    pub source: PathBuf,
    /// Filesystem-wide options (for cgroup v1: the controllers).
    pub super_options: String,
    /// Optional fields: `shared:N`, `master:N`, ...
    pub propagation: Vec<String>,
}

/// The calling process's mounts. A line that does not parse is skipped (the
/// kernel writes well-formed lines; the skip only guards against a future format).
pub fn read() -> io::Result<Vec<MountEntry>> {
    let bytes = std::fs::read("/proc/self/mountinfo")?;
    Ok(parse(&bytes))
}

pub fn parse(bytes: &[u8]) -> Vec<MountEntry> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let sep = fields.iter().position(|f| *f == b"-")?;
    if sep < 6 || fields.len() < sep + 3 {
        return None;
    }
    let num = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u64>().ok();
    Some(MountEntry {
        mount_id: num(fields[0])?,
        parent_id: num(fields[1])?,
        root: path(fields[3]),
        mount_point: path(fields[4]),
        options: String::from_utf8_lossy(fields[5]).into_owned(),
        propagation: fields[6..sep]
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect(),
        fs_type: String::from_utf8_lossy(&unescape(fields[sep + 1])).into_owned(),
        source: path(fields[sep + 2]),
        super_options: fields
            .get(sep + 3)
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .unwrap_or_default(),
    })
}

fn path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

/// Undoes the kernel's `\ooo` escapes (space, tab, newline, backslash).
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = oct.iter().fold(0u32, |a, d| a * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Mount points at or below `dir`, deepest first (byte-exact comparison).
pub fn mounts_under(entries: &[MountEntry], dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = entries
        .iter()
        .map(|e| e.mount_point.clone())
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// [`mounts_under`] for the calling process; an unreadable mountinfo is an error,
/// never "no mounts" (teardown would then delete through them).
pub fn current_mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(mounts_under(&read()?, dir))
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    #[test]
    fn lines_with_hostile_names_parse_byte_exact() {
        let text = b"22 1 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw\n\
            90 22 0:44 / /run/husk/p/mounts/c\\040d\\012e/rootfs rw - overlay overlay rw,lowerdir=/a\n\
            91 22 0:45 /sub\xff /run/husk/p/mounts/\xff\xfe/rootfs rw master:3 shared:9 - overlay ov\\134x rw\n\
            garbage line\n";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, Path::new("/run"));
        assert_eq!(m[0].propagation, vec!["shared:5"]);
        assert_eq!(
            m[1].mount_point.as_os_str().as_bytes(),
            b"/run/husk/p/mounts/c d\ne/rootfs"
        );
        assert_eq!(
            m[2].mount_point.as_os_str().as_bytes(),
            b"/run/husk/p/mounts/\xff\xfe/rootfs"
        );
        assert_eq!(m[2].root.as_os_str().as_bytes(), b"/sub\xff");
        assert_eq!(m[2].source, Path::new("ov\\x"));
        assert_eq!(m[2].propagation, vec!["master:3", "shared:9"]);
        let under = mounts_under(&m, Path::new("/run/husk/p"));
        assert_eq!(under.len(), 2);
        assert!(mounts_under(&m, Path::new("/run/husk/other")).is_empty());
        // A prefix that is not a path component does not match.
        assert!(mounts_under(&m, Path::new("/run/hu")).is_empty());
    }

    #[test]
    fn escapes_at_the_end_and_invalid_ones_stay_literal() {
        assert_eq!(unescape(br"a\040"), b"a ");
        assert_eq!(unescape(br"a\04"), br"a\04");
        assert_eq!(unescape(br"a\999"), br"a\999");
        assert_eq!(unescape(br"\777"), br"\777", "over 255: not an escape");
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let m = read().unwrap();
        assert!(m.iter().any(|e| e.mount_point == Path::new("/")));
    }
}
