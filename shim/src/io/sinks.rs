//! Where a process's output goes on the host, from the URIs containerd sends:
//! a FIFO path (plain, or `fifo://`), `file:///path` (appended), or
//! `binary:///path?k=v` (a logging binary that reads stdout on fd 3 and stderr
//! on fd 4, and closes fd 5 once it is ready: containerd's binary log driver).

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{io::AsyncWrite, net::unix::pipe};

use super::IoError;

pub type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// The two output streams, and the logging binary if one serves them.
pub struct Outputs {
    pub stdout: Option<Sink>,
    pub stderr: Option<Sink>,
    pub logger: Option<tokio::process::Child>,
}

#[derive(Debug)]
enum Target {
    None,
    Fifo(PathBuf),
    File(PathBuf),
    Binary { path: PathBuf, args: Vec<String> },
}

fn parse(uri: &str) -> Result<Target, IoError> {
    let bad = |why: &str| IoError::BadUri {
        uri: uri.to_string(),
        why: why.to_string(),
    };
    if uri.is_empty() {
        return Ok(Target::None);
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(Target::Fifo(PathBuf::from(uri)));
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = percent_decode(path);
    if !path.starts_with('/') {
        return Err(bad("the path must be absolute"));
    }
    match scheme {
        "fifo" => Ok(Target::Fifo(path.into())),
        "file" => Ok(Target::File(path.into())),
        "binary" => {
            let mut args = Vec::new();
            for kv in query.split('&').filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                args.push(percent_decode(k));
                if !v.is_empty() {
                    args.push(percent_decode(v));
                }
            }
            Ok(Target::Binary {
                path: path.into(),
                args,
            })
        }
        other => Err(bad(&format!("unsupported scheme {other:?}"))),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens the output targets of one process.
pub async fn open(
    stdout: &str,
    stderr: &str,
    container_id: &str,
    namespace: &str,
) -> Result<Outputs, IoError> {
    let out = parse(stdout)?;
    let err = parse(stderr)?;
    if let Target::Binary { path, args } = &out {
        // One logging binary serves both streams.
        return spawn_logger(path, args, container_id, namespace).await;
    }
    Ok(Outputs {
        stdout: open_one(out).await?,
        stderr: open_one(err).await?,
        logger: None,
    })
}

async fn open_one(t: Target) -> Result<Option<Sink>, IoError> {
    match t {
        Target::None => Ok(None),
        Target::Fifo(p) => {
            // Read-write: opening never blocks, even before containerd's
            // client has opened its end, and the client still sees EOF when
            // we close, as we are the only writer.
            let s = pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(&p)
                .map_err(|source| IoError::Open { path: p, source })?;
            Ok(Some(Box::new(s)))
        }
        Target::File(p) => {
            if let Some(dir) = p.parent() {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|source| IoError::Open {
                        path: dir.to_path_buf(),
                        source,
                    })?;
            }
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .await
                .map_err(|source| IoError::Open { path: p, source })?;
            Ok(Some(Box::new(f)))
        }
        Target::Binary { path, .. } => Err(IoError::BadUri {
            uri: path.display().to_string(),
            why: "a logging binary must serve stdout".into(),
        }),
    }
}

async fn spawn_logger(
    path: &Path,
    args: &[String],
    container_id: &str,
    namespace: &str,
) -> Result<Outputs, IoError> {
    let pipe_err = |source: nix::Error| IoError::Logger {
        path: path.to_path_buf(),
        why: format!("creating pipes: {source}"),
    };
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (out_r, out_w) = nix::unistd::pipe2(cloexec).map_err(pipe_err)?;
    let (err_r, err_w) = nix::unistd::pipe2(cloexec).map_err(pipe_err)?;
    let (ready_r, ready_w) = nix::unistd::pipe2(cloexec).map_err(pipe_err)?;
    let child_fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", container_id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in child_fds.iter().enumerate() {
                // dup2 clears O_CLOEXEC on the new descriptor.
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| IoError::Logger {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    drop((out_r, err_r, ready_w));
    // The logger closes fd 5 (or writes a byte) once it is ready.
    let ready = tokio::task::spawn_blocking(move || {
        let mut b = [0u8; 1];
        let _ = nix::unistd::read(ready_r.as_raw_fd(), &mut b);
    });
    if tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .is_err()
    {
        return Err(IoError::Logger {
            path: path.to_path_buf(),
            why: "did not signal readiness on fd 5 within 10 s".into(),
        });
    }
    Ok(Outputs {
        stdout: Some(sender(out_w, path)?),
        stderr: Some(sender(err_w, path)?),
        logger: Some(child),
    })
}

fn sender(fd: OwnedFd, path: &Path) -> Result<Sink, IoError> {
    let s = pipe::Sender::from_owned_fd(fd).map_err(|e| IoError::Logger {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    Ok(Box::new(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        assert!(matches!(parse("").unwrap(), Target::None));
        assert!(
            matches!(parse("/run/x/stdout").unwrap(), Target::Fifo(p) if p == Path::new("/run/x/stdout"))
        );
        assert!(
            matches!(parse("file:///var/log/a%20b.log").unwrap(), Target::File(p) if p == Path::new("/var/log/a b.log"))
        );
        match parse("binary:///usr/bin/logger?id=abc&flag").unwrap() {
            Target::Binary { path, args } => {
                assert_eq!(path, Path::new("/usr/bin/logger"));
                assert_eq!(args, ["id", "abc", "flag"]);
            }
            _ => panic!("not binary"),
        }
        assert!(parse("http://x/y")
            .unwrap_err()
            .to_string()
            .contains("http"));
        assert!(parse("file://relative").is_err());
    }
}
