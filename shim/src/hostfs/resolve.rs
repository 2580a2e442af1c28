//! Paths below a directory the shim holds open, resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a symlink anywhere on the
//! way, or a `..` that leaves the directory, is an error instead of a path the
//! shim did not mean.

use std::{
    ffi::OsStr,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{openat2, OFlag, OpenHow, ResolveFlag},
    sys::stat::Mode,
};

fn how(flags: OFlag, mode: u32) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
}

fn io_err(e: Errno, what: &str, path: &Path) -> io::Error {
    let kind = io::Error::from_raw_os_error(e as i32);
    let hint = match e {
        Errno::ELOOP => " (a symlink is on the way: refused)",
        Errno::EXDEV => " (it leaves the directory: refused)",
        Errno::ENOTDIR => " (a symlink or file is in the way: refused)",
        _ => "",
    };
    io::Error::new(
        kind.kind(),
        format!("{what} {}: {kind}{hint}", path.display()),
    )
}

/// A path made only of normal components (no `..`, `.`, root).
fn check_relative(rel: &Path) -> io::Result<()> {
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a plain relative path", rel.display()),
        ));
    }
    Ok(())
}

/// Opens `rel` below `dir` as an `O_PATH` descriptor.
pub fn open_path(dir: &impl AsRawFd, rel: &Path) -> io::Result<OwnedFd> {
    open(dir, rel, OFlag::O_PATH)
}

/// Opens `rel` below `dir` with `flags` (O_NOFOLLOW and O_CLOEXEC are added).
pub fn open(dir: &impl AsRawFd, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    check_relative(rel)?;
    let fd = openat2(dir.as_raw_fd(), rel, how(flags, 0)).map_err(|e| io_err(e, "opening", rel))?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates every missing directory of `rel` below `dir` (mode `mode`) and
/// returns the last one, opened `O_PATH | O_DIRECTORY`.
pub fn mkdirs(dir: &impl AsRawFd, rel: &Path, mode: u32) -> io::Result<OwnedFd> {
    check_relative(rel)?;
    let mut built = PathBuf::new();
    for c in rel.components() {
        built.push(c);
        let parent = built.parent().filter(|p| !p.as_os_str().is_empty());
        let parent_fd = match parent {
            Some(p) => Some(open(dir, p, OFlag::O_PATH | OFlag::O_DIRECTORY)?),
            None => None,
        };
        let at = parent_fd
            .as_ref()
            .map_or(dir.as_raw_fd(), |f| f.as_raw_fd());
        match nix::sys::stat::mkdirat(Some(at), c.as_os_str(), Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io_err(e, "creating", &built)),
        }
    }
    open(dir, rel, OFlag::O_PATH | OFlag::O_DIRECTORY)
}

/// Creates an empty regular file at `rel` below `dir` if none is there (a mount
/// point for a file bind) and returns it opened `O_PATH`.
pub fn create_file(dir: &impl AsRawFd, rel: &Path, mode: u32) -> io::Result<OwnedFd> {
    check_relative(rel)?;
    let fd = openat2(
        dir.as_raw_fd(),
        rel,
        how(OFlag::O_CREAT | OFlag::O_WRONLY, mode),
    )
    .map_err(|e| io_err(e, "creating", rel))?;
    // SAFETY: as in `open`.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    open_path(dir, rel)
}

/// The `/proc/self/fd/N` name of a descriptor: what mount(2) takes to act on
/// exactly the object the descriptor holds.
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `name` as one path component, or an error naming it.
pub fn component(name: &str) -> io::Result<&OsStr> {
    let p = Path::new(name);
    match p.components().collect::<Vec<_>>().as_slice() {
        [Component::Normal(c)] if !c.as_bytes().contains(&b'/') => Ok(c),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single path component"),
        )),
    }
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use std::fs;

    use super::*;

    fn dir_fd(p: &Path) -> OwnedFd {
        OwnedFd::from(fs::File::open(p).unwrap())
    }

    #[test]
    fn symlinks_and_dotdot_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("a")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("a/link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("f")).unwrap();
        let d = dir_fd(t.path());
        let e = mkdirs(&d, Path::new("a/link/rootfs"), 0o755).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert!(
            !outside.path().join("rootfs").exists(),
            "nothing created outside"
        );
        assert!(create_file(&d, Path::new("f"), 0o600).is_err());
        assert!(open_path(&d, Path::new("../x")).is_err());
        assert!(open_path(&d, Path::new("/etc")).is_err());
        let made = mkdirs(&d, Path::new("a/b/c"), 0o700).unwrap();
        assert!(t.path().join("a/b/c").is_dir());
        assert!(fd_path(&made).starts_with("/proc/self/fd/"));
        create_file(&d, Path::new("a/b/c/file"), 0o600).unwrap();
        assert!(t.path().join("a/b/c/file").is_file());
    }

    #[test]
    fn components() {
        assert!(component("abc").is_ok());
        assert!(component("a/b").is_err());
        assert!(component("..").is_err());
        assert!(component("").is_err());
    }
}
