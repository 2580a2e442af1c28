//! A private containerd for tests: its own root, state, socket and config,
//! started by the test and stopped when dropped, so tests never touch a
//! system containerd.
//!
//! Which containerd: the one on PATH (Debian's 1.6), or the one whose binaries
//! (`containerd`, `ctr`, `containerd-shim-runc-v2`) are in `$HUSK_CONTAINERD_DIR`
//! (`make test` runs the containerd tests again with containerd 2.3 there). Both
//! read the version 2 config written here; 2.x migrates it to its own.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub const NAMESPACE: &str = "husk-test";

pub struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd with `extra_config` appended to its config (TOML,
    /// version 2) and waits until it answers.
    pub fn start(extra_config: &str) -> Result<Self> {
        Self::start_with_env(extra_config, &[])
    }

    /// As [`Containerd::start`], with extra environment for containerd (and
    /// so for the shims it starts), e.g. a PATH that finds a runtime's shim.
    pub fn start_with_env(extra_config: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::launch(extra_config, env, false)
    }

    /// As [`Containerd::start_with_env`], with the CRI plugin enabled:
    /// `extra_config` configures it (see [`crate::cri`]).
    pub fn start_with_cri(extra_config: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::launch(extra_config, env, true)
    }

    fn launch(extra_config: &str, env: &[(&str, &str)], cri: bool) -> Result<Self> {
        let containerd = binary("containerd")?;
        binary("ctr")?;
        let dir = tempfile::Builder::new()
            .prefix("husk-containerd-")
            .tempdir_in("/var/tmp")?;
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        // Tests that do not speak CRI leave it off: it starts a stream
        // server, watches CNI config and would want a pause image.
        let disabled = if cri {
            ""
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        };
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{disabled}\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n{extra_config}\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )?;
        let log = fs::File::create(dir.path().join("containerd.log"))?;
        // The chosen containerd's own runc shim goes first on its PATH (after the
        // caller's additions: a PATH in `env` is extended, not replaced).
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(dir) = chosen_dir() {
            let path = match env.iter_mut().find(|(k, _)| k == "PATH") {
                Some((_, v)) => v,
                None => {
                    env.push(("PATH".into(), std::env::var("PATH").unwrap_or_default()));
                    &mut env.last_mut().expect("just pushed").1
                }
            };
            *path = format!("{}:{path}", dir.display());
        }
        let child = Command::new(&containerd)
            .envs(env)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let mut c = Containerd {
            dir,
            socket,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(out) = c.ctr(&["version"]) {
                if out.status.success() {
                    return Ok(c);
                }
            }
            if let Some(status) = c.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten()) {
                bail!("containerd exited ({status}); log:\n{}", c.log());
            }
            if Instant::now() > deadline {
                bail!("containerd did not answer within 30 s; log:\n{}", c.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// A `ctr` command against this containerd, in the test namespace.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        self.ctr_command_in(NAMESPACE, args)
    }

    /// A `ctr` command in `namespace` (CRI's is `k8s.io`).
    pub fn ctr_command_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary("ctr").unwrap_or_else(|_| PathBuf::from("ctr")));
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace)
            .args(args);
        cmd
    }

    /// The directory containerd's root, state, socket and log live in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_command(args)
            .output()
            .with_context(|| format!("running ctr {}", args.join(" ")))
    }

    /// Imports an OCI archive written by [`crate::oci_image::write_oci_archive`].
    pub fn import(&self, archive: &Path) -> Result<()> {
        self.import_in(NAMESPACE, archive)
    }

    /// Imports an OCI archive into `namespace`.
    pub fn import_in(&self, namespace: &str, archive: &Path) -> Result<()> {
        let out = self
            .ctr_command_in(namespace, &["images", "import", &archive.to_string_lossy()])
            .output()
            .context("running ctr images import")?;
        if !out.status.success() {
            bail!(
                "ctr images import failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Snapshot mounts of containers that a failed test left running (and
        // CRI's pod /dev/shm mounts under the state directory).
        let root = self.dir.path();
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let mut targets: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|t| t.starts_with(&*root.to_string_lossy()))
                .collect();
            targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
            for t in targets {
                let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// `$HUSK_CONTAINERD_DIR`, when set: the containerd under test is that one.
pub fn chosen_dir() -> Option<PathBuf> {
    std::env::var_os("HUSK_CONTAINERD_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// The version the chosen `containerd` reports ("v2.3.4", "1.6.20~ds1").
pub fn version() -> Result<String> {
    let out = Command::new(binary("containerd")?)
        .arg("--version")
        .output()
        .context("running containerd --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "containerd github.com/containerd/containerd/v2 v2.3.4 <commit>"
    text.split_whitespace()
        .nth(2)
        .map(str::to_string)
        .with_context(|| format!("containerd --version said {text:?}"))
}

/// Where the chosen containerd's `name` binary is.
pub fn binary(name: &str) -> Result<PathBuf> {
    match chosen_dir() {
        Some(dir) => {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} missing: HUSK_CONTAINERD_DIR names a containerd without {name} \
                     (../shared/tools/containerd-2.3/install.sh puts containerd 2.3 there)",
                    p.display()
                )
            }
        }
        None => which(name).with_context(|| {
            format!("{name} is not installed (make setup installs Debian's containerd)")
        }),
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}
