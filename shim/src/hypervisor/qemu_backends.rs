//! The QEMU path's device backends: one husk-vmm process per vhost-user device.
//!
//! Only QEMU needs them (husk-vmm on KVM serves every device itself), and they must be
//! listening before QEMU starts, since QEMU connects to each vhost-user socket at start-up
//! and fails without it.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

use super::{
    pod_vm::{LaunchError, PodVm},
    process::{spawn, tail, unix_socket_listening},
};

/// A husk-vmm process serving one vhost-user device to QEMU.
pub(super) struct Backend {
    pub(super) what: &'static str,
    pub(super) child: Child,
    pub(super) log: PathBuf,
    socket: PathBuf,
}

impl PodVm {
    /// Starts one husk-vmm per vhost-user device and waits until each listens.
    pub(super) async fn start_backends(&mut self) -> Result<(), LaunchError> {
        // husk-vmm binds its hybrid vsock socket before the vhost-user one, so
        // the vhost-user socket listening means both are ready.
        let mut wanted: Vec<(&'static str, PathBuf, Vec<std::ffi::OsString>)> = vec![(
            "husk-vmm vsock",
            self.paths.vhost_vsock.clone(),
            vec![
                "vhost-user-vsock".into(),
                "--socket".into(),
                self.paths.vhost_vsock.clone().into(),
                "--uds".into(),
                self.paths.vsock_uds.clone().into(),
                "--guest-cid".into(),
                self.spec.guest_cid.to_string().into(),
            ],
        )];
        if let Some(share) = &self.spec.share {
            wanted.push((
                "husk-vmm virtio-fs",
                self.paths.vhost_fs.clone(),
                vec![
                    "vhost-user-fs".into(),
                    "--socket".into(),
                    self.paths.vhost_fs.clone().into(),
                    "--shared-dir".into(),
                    share.dir.clone().into(),
                    "--tag".into(),
                    share.tag.clone().into(),
                ],
            ));
        }
        for (what, socket, mut args) in wanted {
            if self.spec.jail {
                args.push("--jail".into());
            }
            let log_path = self
                .paths
                .dir
                .join(format!("{}.log", what.replace([' ', '-'], "_")));
            let mut cmd = Command::new(&self.spec.vmm_binary);
            cmd.args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = spawn(cmd, what, &self.spec.vmm_binary, self.cgroup_fds())?;
            self.pipe_logs(&mut child, &log_path)?;
            self.backends.push(Backend {
                what,
                child,
                log: log_path,
                socket,
            });
        }
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        // Backing off from 1 ms to 50 ms: a backend is usually up within a few
        // ms, and a slow one is not worth re-reading /proc/net/unix for.
        let mut pause = Duration::from_millis(1);
        for b in self.backends.iter_mut() {
            // Not a probe connection: a backend serves exactly one front
            // end, so a test connect would use it up.
            while !unix_socket_listening(&b.socket) {
                if let Some(status) = b.child.try_wait().map_err(LaunchError::Wait)? {
                    return Err(LaunchError::Exited {
                        what: b.what,
                        status,
                        console: String::new(),
                        log: tail(&b.log),
                    });
                }
                if Instant::now() > deadline {
                    return Err(LaunchError::VmmNotReady {
                        what: b.what,
                        timeout,
                        log: tail(&b.log),
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}
