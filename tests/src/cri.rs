//! A private containerd with its CRI plugin on and husk registered as the
//! runtime handler `husk`, for tests that play kubelet over CRI gRPC.
//!
//! What kubelet's node would have, made here: a pause image (the static
//! `husk-pause` from `src/bin/`, built with a bare rustc so it runs in an
//! image with nothing else in it) and a busybox image in CRI's `k8s.io`
//! namespace; a CNI config (a bridge on a per-run name and subnet, so runs
//! and other tests on the host do not collide) because CRI will not run a
//! pod without pod networking; and `restrict_oom_score_adj`, since this
//! host's bounding set lacks CAP_SYS_RESOURCE.
//!
//! Two handlers: `husk`, with a good shim configuration, and `husk-bad`,
//! whose configuration has an unknown key (for the rejected-sandbox test).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, KeyValue,
    LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata, StartContainerRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    containerd::Containerd,
    husk_containerd::{shim_binary, write_shim_config},
    oci_image::{write_oci_archive, write_oci_archive_with_cmd},
    rootfs::build_busybox_rootfs,
    workspace_root,
};

/// CRI's containerd namespace: the only one whose images it sees.
pub const K8S_NAMESPACE: &str = "k8s.io";
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:husk";
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:husk";
/// The runtime handler (RuntimeClass `handler`) that runs pods in husk VMs.
pub const HANDLER: &str = "husk";
/// A handler whose husk configuration is invalid.
pub const BAD_HANDLER: &str = "husk-bad";

pub type RuntimeClient = RuntimeServiceClient<Channel>;
pub type ImageClient = ImageServiceClient<Channel>;

pub struct CriContainerd {
    pub containerd: Containerd,
    /// The `husk` handler's shim configuration.
    pub shim_config: PathBuf,
    /// Where pods' CRI logs go (each pod gets a directory below).
    pub log_root: PathBuf,
    /// The CNI bridge this run's pods attach to (removed on drop).
    pub bridge: String,
    tmp: tempfile::TempDir,
}

impl CriContainerd {
    /// Builds the images, writes the configs, starts containerd with CRI
    /// and imports the images into `k8s.io`.
    pub fn start() -> Result<Self> {
        let shim = shim_binary()?;
        let shim_dir = shim.parent().context("shim binary has no directory")?;
        let tmp = tempfile::Builder::new()
            .prefix("husk-cri-test-")
            .tempdir_in("/var/tmp")?;
        let shim_config = tmp.path().join("configuration.toml");
        write_shim_config(&shim_config, "")?;
        let bad_config = tmp.path().join("bad-configuration.toml");
        // Appended to the [shim] table: an unknown key `shim.no_such_key`.
        write_shim_config(&bad_config, "no_such_key = true\n")?;

        let busybox = tmp.path().join("busybox.tar");
        write_oci_archive(
            &build_busybox_rootfs(&tmp.path().join("busybox"))?,
            BUSYBOX_IMAGE,
            &busybox,
        )?;
        let pause_root = tmp.path().join("pause");
        std::fs::create_dir_all(&pause_root)?;
        build_pause(&pause_root.join("pause"))?;
        let pause = tmp.path().join("pause.tar");
        write_oci_archive_with_cmd(&pause_root, PAUSE_IMAGE, &["/pause"], &pause)?;

        let (bridge, subnet) = bridge_for(std::process::id());
        let cni_conf = tmp.path().join("cni/net.d");
        std::fs::create_dir_all(&cni_conf)?;
        std::fs::write(
            cni_conf.join("10-husk-test.conflist"),
            cni_config(&bridge, &subnet, &tmp.path().join("cni/ipam")),
        )?;

        let config = cri_config(&shim_config, &bad_config, &cni_conf);
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let containerd = Containerd::start_with_cri(&config, &[("PATH", path.as_str())])?;
        containerd.import_in(K8S_NAMESPACE, &pause)?;
        containerd.import_in(K8S_NAMESPACE, &busybox)?;
        let log_root = tmp.path().join("pods");
        std::fs::create_dir_all(&log_root)?;
        Ok(Self {
            containerd,
            shim_config,
            log_root,
            bridge,
            tmp,
        })
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub async fn runtime(&self) -> Result<RuntimeClient> {
        Ok(RuntimeServiceClient::new(
            connect(self.containerd.socket()).await?,
        ))
    }

    pub async fn images(&self) -> Result<ImageClient> {
        Ok(ImageServiceClient::new(
            connect(self.containerd.socket()).await?,
        ))
    }

    /// A pod config as kubelet writes one, logging under `log_root/<name>`.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let log_directory = self.log_root.join(name);
        let _ = std::fs::create_dir_all(&log_directory);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: format!("uid-{name}"),
                namespace: "default".to_string(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_directory.to_string_lossy().into_owned(),
            labels: HashMap::from([("app".to_string(), name.to_string())]),
            annotations: HashMap::from([("husk.test/pod".to_string(), name.to_string())]),
            linux: Some(LinuxPodSandboxConfig::default()),
            ..Default::default()
        }
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        // Pods a failed test left: CRI stops and removes them (and so their
        // shims and VMs, which outlive containerd by design). Best effort,
        // on a runtime of our own as the test's may be gone.
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                let Ok(mut client) = self.runtime().await else {
                    return;
                };
                let Ok(pods) = client
                    .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest::default())
                    .await
                else {
                    return;
                };
                for pod in pods.into_inner().items {
                    let _ = client
                        .stop_pod_sandbox(k8s_cri::v1::StopPodSandboxRequest {
                            pod_sandbox_id: pod.id.clone(),
                        })
                        .await;
                    let _ = client
                        .remove_pod_sandbox(k8s_cri::v1::RemovePodSandboxRequest {
                            pod_sandbox_id: pod.id,
                        })
                        .await;
                }
            });
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// The pod-level cgroup kubelet (cgroupfs driver) makes before RunPodSandbox
/// and passes as `linux.cgroup_parent`; CRI reads PodSandboxStats from it.
/// Removed on drop, as kubelet does once the pod is gone.
pub struct KubeletPodCgroup {
    /// The `cgroup_parent` value: `/<name>`.
    pub parent: String,
    dirs: Vec<PathBuf>,
}

impl KubeletPodCgroup {
    /// `name`: a relative path such as `husk-test-1/pod-web`.
    pub fn create(name: &str) -> Result<Self> {
        let roots = husk_shim::hypervisor::cgroup::hierarchy_roots()?;
        let mut cg = KubeletPodCgroup {
            parent: format!("/{name}"),
            dirs: Vec::new(),
        };
        for root in roots {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            // Deepest first, for removal.
            let mut d = dir.as_path();
            while d != root {
                cg.dirs.push(d.to_path_buf());
                d = d.parent().context("cgroup path outside its hierarchy")?;
            }
        }
        Ok(cg)
    }

    /// `<hierarchy>/<parent>/<child>` in every hierarchy.
    pub fn child_dirs(&self, child: &str) -> Vec<PathBuf> {
        let leaf = self.parent.trim_start_matches('/');
        self.dirs
            .iter()
            .filter(|d| d.ends_with(leaf))
            .map(|d| d.join(child))
            .collect()
    }
}

impl Drop for KubeletPodCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("removing test cgroup {}: {e}", dir.display());
            }
        }
    }
}

/// A container config for the busybox image, logging to `<name>.log` in the
/// pod's log directory.
pub fn busybox_container(name: &str, cmd: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX_IMAGE.to_string(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        envs: vec![KeyValue {
            key: "HUSK_CONTAINER".to_string(),
            value: name.to_string(),
        }],
        log_path: format!("{name}.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..Default::default()
    }
}
/// The runtime CRI tests drive their calls on: two workers, as the host has two cores.
pub fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

/// CreateContainer + StartContainer of a busybox container running `cmd` in `pod`;
/// panics naming the step and container (a test helper).
pub async fn start_container(
    client: &mut RuntimeClient,
    pod: &str,
    pod_config: &PodSandboxConfig,
    name: &str,
    cmd: &[&str],
) -> String {
    let id = client
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(busybox_container(name, cmd)),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
        .into_inner()
        .container_id;
    client
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
    id
}

/// A gRPC channel over containerd's Unix socket (tonic dials a URI; the
/// connector ignores it and connects the socket).
pub async fn connect(socket: &Path) -> Result<Channel> {
    let socket = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .context("connecting to containerd's CRI socket")
}

/// Builds `src/bin/husk-pause.rs` as a static binary at `out`. A bare rustc
/// (not cargo): the workspace's dev build links glibc dynamically, and the
/// pause image holds nothing but this one file.
pub fn build_pause(out: &Path) -> Result<()> {
    let src = workspace_root().join("tests/src/bin/husk-pause.rs");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
        ])
        .args(["-C", "target-feature=+crt-static", "-o"])
        .arg(out)
        .arg(&src)
        .output()
        .context("running rustc for the pause binary")?;
    if !output.status.success() {
        bail!(
            "building {}: {}",
            src.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A bridge name (at most 15 bytes) and /24 subnet unique to this process.
fn bridge_for(pid: u32) -> (String, String) {
    (
        format!("hcri{}", pid % 100_000),
        format!("10.203.{}.0/24", pid % 250),
    )
}

fn cni_config(bridge: &str, subnet: &str, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "husk-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{ "subnet": subnet }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            // CRI's port mappings (PodSandboxConfig.port_mappings): DNAT
            // from the host port to the pod IP, which the shim's veth->tap
            // redirect carries into the VM.
            { "type": "portmap", "capabilities": { "portMappings": true } },
            { "type": "loopback" }
        ]
    })
    .to_string()
}

/// The CRI plugin's section of containerd's config.
fn cri_config(shim_config: &Path, bad_config: &Path, cni_conf: &Path) -> String {
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  # A random port: several test containerds may run at once.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
      runtime_type = "io.containerd.husk.v2"
      pod_annotations = ["*"]
      container_annotations = ["*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}.options]
        ConfigPath = "{good}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{BAD_HANDLER}]
      runtime_type = "io.containerd.husk.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{BAD_HANDLER}.options]
        ConfigPath = "{bad}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
    max_conf_num = 1
"#,
        good = shim_config.display(),
        bad = bad_config.display(),
        cni = cni_conf.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_fit_linux_limits() {
        let (name, subnet) = bridge_for(4_194_303);
        assert!(name.len() <= 15, "{name}");
        assert!(subnet.starts_with("10.203."), "{subnet}");
    }
}

/// What a streaming exec sent back, by channel.
#[derive(Debug, Default)]
pub struct StreamedExec {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The status on the error channel: JSON, `"status":"Success"` or a
    /// failure naming the exit code.
    pub status: String,
}

/// Attaches to the URL a CRI `Exec` answered with, as kubectl's apiserver
/// would: a WebSocket with Kubernetes' `v4.channel.k8s.io` protocol (each
/// binary message starts with its channel: 1 stdout, 2 stderr, 3 status).
/// Output only; no stdin or tty.
pub async fn exec_stream(url: &str) -> Result<StreamedExec> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .context("exec URL is not http://")?;
    let (host, path) = rest.split_once('/').context("exec URL has no path")?;
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let request = format!(
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: aHVzay1jcmktdGVzdC1rZXk=\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    // The handshake answer, up to its blank line.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.context("reading the upgrade answer")?);
        if head.len() > 16 << 10 {
            bail!("upgrade answer too long");
        }
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 101") {
        bail!("exec stream refused: {head}");
    }
    let mut out = StreamedExec::default();
    // Until the server closes the connection (or sends a close frame).
    while let Ok(b0) = s.read_u8().await {
        let b1 = s.read_u8().await?;
        let len = match b1 & 0x7f {
            126 => u64::from(s.read_u16().await?),
            127 => s.read_u64().await?,
            n => u64::from(n),
        };
        if b1 & 0x80 != 0 {
            bail!("the server masked a frame");
        }
        if len > 1 << 24 {
            bail!("frame of {len} bytes");
        }
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).await?;
        match b0 & 0x0f {
            0x8 => break,
            0x2 | 0x0 => match payload.split_first() {
                Some((1, data)) => out.stdout.extend_from_slice(data),
                Some((2, data)) => out.stderr.extend_from_slice(data),
                Some((3, data)) => out.status.push_str(&String::from_utf8_lossy(data)),
                _ => {}
            },
            _ => {}
        }
    }
    Ok(out)
}
