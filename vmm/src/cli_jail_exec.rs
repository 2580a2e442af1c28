//! `husk-vmm jail-exec`: runs another program in husk-vmm's jail, as an unprivileged user.
//!
//! On hosts without usable KVM the pod VM is QEMU's, and QEMU is the process a guest attacks
//! first (its device emulation and TCG). The shim starts it through this subcommand so that
//! it gets the same jail as `husk-vmm run` and the vhost-user backends (one implementation,
//! `husk_vmm::jail`): its own mount, network, IPC and UTS namespaces, an empty read-only
//! root holding only what QEMU opens by path (its program and libraries read-only, the
//! guest kernel and initrd read-only, the pod's vhost-user and console sockets, a few device
//! nodes), and a uid and gid of its own with no capabilities and no_new_privs. QEMU's own
//! `-sandbox` seccomp filter then goes on top.
//!
//! An exec rather than a spawn: the program keeps this process's pid, parent and cgroup, so
//! the shim's child handle, kill-on-drop and cgroup placement stay what they were.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use husk_vmm::jail::{self, JailConfig, JailUser};

#[derive(Args, Debug)]
pub struct JailExecArgs {
    /// A single file the program reaches by path (a Unix socket it connects to, a device
    /// node), bound read-write at the same path. Repeatable.
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// A file or directory bound read-only at the same path (the program, its libraries and
    /// data, what it loads). Repeatable.
    #[arg(long = "ro", value_name = "PATH")]
    read_only: Vec<PathBuf>,
    /// A host symbolic link recreated in the jail (`/lib64` on a merged-/usr host).
    /// Repeatable.
    #[arg(long = "link", value_name = "PATH")]
    links: Vec<PathBuf>,
    /// A writable directory for the jail's temporary mount point (it stays outside the
    /// jail).
    #[arg(long, value_name = "DIR")]
    scratch: PathBuf,
    /// The user and group the program runs as, `UID:GID`; neither may be 0.
    #[arg(long, value_name = "UID:GID", value_parser = parse_user)]
    user: (u32, u32),
    /// One supplementary group (the group of a device node the program opens, `/dev/kvm`).
    #[arg(long, value_name = "GID")]
    extra_group: Option<u32>,
    /// The program (an absolute path visible in the jail) and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    command: Vec<OsString>,
}

fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected UID:GID"))?;
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{s:?}: {v:?} is not a number"))
    };
    Ok((num(u)?, num(g)?))
}

pub fn run(args: JailExecArgs) -> Result<()> {
    let program = PathBuf::from(&args.command[0]);
    if !program.is_absolute() {
        bail!(
            "{}: the program must be an absolute path (there is no PATH in the jail)",
            program.display()
        );
    }
    let parent = nix::unistd::getppid();
    jail::enter(&JailConfig {
        visible_files: args.files,
        read_only: args.read_only,
        links: args.links,
        scratch: Some(args.scratch),
        user: Some(JailUser {
            uid: args.user.0,
            gid: args.user.1,
            extra_group: args.extra_group,
        }),
        ..Default::default()
    })
    .context("jail-exec")?;
    // A change of credentials clears the parent-death signal the launcher set: set it again,
    // and go no further if the launcher is already gone.
    // SAFETY: prctl(2) with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error()).context("PR_SET_PDEATHSIG");
    }
    if nix::unistd::getppid() != parent {
        bail!("the launching process went away");
    }
    let err = std::process::Command::new(&program)
        .args(&args.command[1..])
        .exec();
    Err(err).with_context(|| format!("cannot run {} in the jail", program.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_is_uid_colon_gid() {
        assert_eq!(parse_user("1000:1001"), Ok((1000, 1001)));
        for bad in ["1000", "a:1", "1:", "1:2:3"] {
            assert!(parse_user(bad).is_err(), "{bad}");
        }
    }
}
