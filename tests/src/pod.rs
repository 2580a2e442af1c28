//! A pod VM with a virtio-fs share and helpers to run containers in it
//! through the agent: shared by the container tests and the container bench.
//! The helpers panic with a message naming the step and container: they are
//! for tests and benchmarks, where that is the clearest failure.

use std::{path::PathBuf, time::Duration};

use husk_shim::{
    agent_client::{AgentClient, AgentError, ExitStatus},
    hypervisor::{PodVm, Share, ShutdownOutcome},
    pod_share::PodShare,
};
use serde_json::Value;

use crate::{init_tracing, oci_spec, rootfs::build_busybox_rootfs, vm_spec};

pub const SHARE_TAG: &str = "husk";
pub const SHARE_IN_GUEST: &str = "/run/husk/shared";

/// A pod VM driven through the agent directly, with a plain writable share the
/// tests fill themselves. (The shim's own share, read-only to the guest, is
/// `husk_shim::pod_share`, tested through containerd in hostile_guest.rs.)
pub struct Pod {
    vm: Option<PodVm>,
    pub agent: AgentClient,
    /// The pod's shared directory on the host (the guest sees it at [`SHARE_IN_GUEST`]).
    pub shared: PathBuf,
    /// `shared` bound onto itself as a shared mount (root only).
    self_bind: bool,
    _tmp: tempfile::TempDir,
}

pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Pod {
    /// The running VM (until [`Pod::shutdown`]).
    pub fn vm(&self) -> Option<&PodVm> {
        self.vm.as_ref()
    }

    pub async fn boot(name: &str) -> Pod {
        Self::boot_with(name, None).await
    }

    /// A pod whose share is the shim's own pod share (a read-only view of
    /// shim-private mounts), as containerd's pods get: containers need
    /// [`PodShare::mount_rootfs`] before [`Pod::create`]. Needs root.
    pub async fn boot_on_pod_share(name: &str) -> (Pod, PodShare) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pod-share");
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&dir)
            .unwrap();
        let share = PodShare::create(&dir).expect("pod share");
        (
            Self::boot_with(name, Some((tmp, share.view()))).await,
            share,
        )
    }

    async fn boot_with(name: &str, view: Option<(tempfile::TempDir, PathBuf)>) -> Pod {
        init_tracing();
        let (tmp, shared, plain) = match view {
            Some((tmp, view)) => (tmp, view, false),
            None => {
                let tmp = tempfile::tempdir().unwrap();
                let shared = tmp.path().join("shared");
                std::fs::create_dir(&shared).unwrap();
                (tmp, shared, true)
            }
        };
        // As the shim's pod share is: a shared mount, so that mounts made
        // below it after boot reach husk-vmm's jail (a slave of it).
        let self_bind = plain && nix::unistd::geteuid().is_root();
        if self_bind {
            use nix::mount::{mount, MsFlags};
            mount(
                Some(&shared),
                &shared,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("binding the share onto itself");
            mount(
                None::<&str>,
                &shared,
                None::<&str>,
                MsFlags::MS_SHARED,
                None::<&str>,
            )
            .expect("making the share a shared mount");
        }
        let mut spec = vm_spec(name, tmp.path()).unwrap();
        spec.memory_mib = 512;
        // HUSK_GUEST_LOG=debug turns up the agent's log for a failing test.
        if let Ok(level) = std::env::var("HUSK_GUEST_LOG") {
            spec.extra_cmdline = format!("husk.log={level}");
        }
        spec.share = Some(Share {
            dir: shared.clone(),
            tag: SHARE_TAG.into(),
        });
        let vm = PodVm::launch(spec).await.expect("pod VM boots");
        let agent = vm.agent().unwrap().clone();
        agent
            .create_sandbox(name, "nameserver 192.0.2.53\n", SHARE_TAG, SHARE_IN_GUEST)
            .await
            .expect("sandbox set-up");
        Pod {
            vm: Some(vm),
            agent,
            shared,
            self_bind,
            _tmp: tmp,
        }
    }

    /// Puts a fresh busybox rootfs at `<share>/<id>/rootfs`.
    pub fn rootfs(&self, id: &str) -> PathBuf {
        build_busybox_rootfs(&self.shared.join(id).join("rootfs")).unwrap()
    }

    /// Creates container `id` from `<share>/<id>/rootfs`, building a busybox
    /// rootfs there unless the caller put one.
    pub async fn create(&self, id: &str, spec: &Value, terminal: bool) -> Result<u32, AgentError> {
        if !self.shared.join(id).join("rootfs").exists() {
            self.rootfs(id);
        }
        let bytes = serde_json::to_vec(spec).unwrap();
        self.agent
            .create_container(id, &bytes, &format!("{id}/rootfs"), terminal)
            .await
    }

    /// Runs a container to completion and removes it.
    pub async fn run(&self, id: &str, spec: &Value) -> Output {
        if let Err(e) = self.create(id, spec, false).await {
            panic!("creating container {id}: {e}");
        }
        if let Err(e) = self.agent.start_container(id).await {
            panic!("starting container {id}: {e}");
        }
        let out = self.collect(id, "").await;
        self.agent
            .remove_container(id, false)
            .await
            .expect("remove");
        out
    }

    /// Reads stdout and stderr to EOF, then waits for the exit status.
    pub async fn collect(&self, id: &str, exec_id: &str) -> Output {
        let (stdout, stderr) = tokio::join!(
            drain(&self.agent, id, exec_id, false),
            drain(&self.agent, id, exec_id, true)
        );
        let status = tokio::time::timeout(
            Duration::from_secs(60),
            self.agent.wait_process(id, exec_id),
        )
        .await
        .expect("process ends within 60 s")
        .expect("wait");
        Output {
            stdout,
            stderr,
            status,
        }
    }

    pub async fn shutdown(mut self) {
        let vm = self.vm.take().expect("VM still running");
        assert_eq!(
            vm.shutdown(Duration::from_secs(20)).await,
            ShutdownOutcome::Clean
        );
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // A failing test shows what the guest said (the agent's log stream
        // and the serial console) and what the VM process logged.
        if let (true, Some(vm)) = (std::thread::panicking(), &self.vm) {
            let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
            eprintln!(
                "---- agent log ----\n{}\n---- console ----\n{}\n---- {} log ----\n{}",
                read(vm.agent_log_path()),
                read(vm.console_log_path()),
                vm.hypervisor(),
                read(vm.vm_log_path())
            );
        }
        self.vm = None;
        if self.self_bind {
            let _ = nix::mount::umount2(&self.shared, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub async fn drain(agent: &AgentClient, id: &str, exec_id: &str, stderr: bool) -> String {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream of {id}/{exec_id} did not end"
        );
        let chunk = if stderr {
            agent.read_stderr(id, exec_id, Duration::from_secs(1)).await
        } else {
            agent.read_stdout(id, exec_id, Duration::from_secs(1)).await
        };
        match chunk.expect("read stream") {
            Some(data) => all.extend_from_slice(&data),
            None => return String::from_utf8_lossy(&all).into_owned(),
        }
    }
}

pub fn sh(script: &str) -> Value {
    oci_spec::default_spec(&["sh", "-c", script])
}
