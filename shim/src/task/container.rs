//! Creating and deleting a container of the pod: the bundle, the VM (booted by
//! the pod's first container), the rootfs mount, the agent's container and
//! the init process's stdio. Each step is undone if a later one fails.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use containerd_shim_protos::{
    api::CreateTaskRequest,
    events::task::{TaskCreate, TaskIO},
};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{
    errors::{agent as agent_err, internal, invalid, precondition, status, Result},
    process::{Exit, Process},
    stdio, Inner,
};
use crate::{
    bundle::{Bundle, PodRole},
    config::Config,
    guest_spec, ids,
    io::ProcessIo,
    options,
    pod_share::{PodShare, RootfsMount},
    sandbox::Sandbox,
};

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    pub paused: bool,
}

/// Runs with the pod's lifecycle lock held (creates and deletes one at a
/// time), never the state lock across an await.
pub async fn create(inner: &Inner, req: &CreateTaskRequest) -> Result<u32> {
    ids::check("container", &req.id).map_err(invalid)?;
    if !req.checkpoint.is_empty() {
        return Err(status(
            ttrpc::Code::UNIMPLEMENTED,
            "restoring from a checkpoint is not supported by husk",
        ));
    }
    let running = {
        let pod = inner.pod();
        if pod.containers.contains_key(&req.id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        pod.sandbox.clone()
    };
    let bundle = Bundle::read(req.bundle.as_ref()).map_err(invalid)?;
    let role = bundle.role(&req.id).map_err(invalid)?;

    let (sandbox, booted_here) = match (&role, running) {
        (PodRole::Sandbox(sb), None) => {
            let config = Config::load(options::config_path(req.options.as_ref()).as_deref())
                .map_err(invalid)?;
            crate::logging::set_level(config.log_level);
            let hostname = if bundle.hostname.is_empty() {
                sb.as_str()
            } else {
                bundle.hostname.as_str()
            };
            let spec: Option<serde_json::Value> = serde_json::from_slice(&bundle.spec_json).ok();
            let netns = spec.as_ref().and_then(crate::network::netns_path_of);
            // Set by CRI when kubelet gives the pod a cgroup (cgroup_parent).
            let cgroups_path = spec
                .as_ref()
                .and_then(|v| v.pointer("/linux/cgroupsPath"))
                .and_then(serde_json::Value::as_str)
                .filter(|p| !p.is_empty());
            let sandbox = Sandbox::boot(
                sb,
                hostname,
                netns.as_deref(),
                cgroups_path,
                &config,
                inner.events.clone(),
            )
            .await
            .map_err(|e| status(ttrpc::Code::UNAVAILABLE, e))?;
            info!(
                sandbox = %sb,
                ready_ms = sandbox.timings.sandbox_ready.as_millis() as u64,
                "pod VM booted"
            );
            let sandbox = Arc::new(sandbox);
            inner.pod().sandbox = Some(sandbox.clone());
            (sandbox, true)
        }
        (PodRole::Sandbox(sb), Some(running)) => {
            return Err(precondition(format!(
                "this shim runs pod {}; container {} (pod {sb}) is not part of it",
                running.id(),
                req.id
            )))
        }
        (PodRole::Member(sb), Some(running)) if running.id() == sb.as_str() => (running, false),
        (PodRole::Member(sb), _) => {
            return Err(precondition(format!(
                "container {} names sandbox {sb}, which is not running in this shim",
                req.id
            )))
        }
    };

    // The spec names the pause container's namespaces by host pid: they are
    // pointed at its process in the guest.
    let sandbox_guest_pid = inner
        .pod()
        .containers
        .get(sandbox.id())
        .map(|c| c.init.guest_pid)
        .filter(|&pid| pid > 0);
    let result = create_in_sandbox(&sandbox, sandbox_guest_pid, inner, req, &bundle).await;
    match result {
        Ok(c) => {
            sandbox.known_containers().insert(&c.id);
            inner.pod().containers.insert(c.id.clone(), c);
            Ok(sandbox.vm_pid())
        }
        Err(e) => {
            if booted_here {
                inner.pod().sandbox = None;
                sandbox.shutdown(std::time::Duration::from_secs(2)).await;
            }
            Err(e)
        }
    }
}

async fn create_in_sandbox(
    sandbox: &Sandbox,
    sandbox_guest_pid: Option<u32>,
    inner: &Inner,
    req: &CreateTaskRequest,
    bundle: &Bundle,
) -> Result<Container> {
    let agent = sandbox.agent().clone();
    let share = sandbox.share();
    let mounts: Vec<RootfsMount> = req
        .rootfs
        .iter()
        .map(|m| RootfsMount {
            kind: m.type_.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        })
        .collect();
    // Without rootfs mounts the bundle has a prepared rootfs (`ctr run --rootfs`).
    share
        .mount_rootfs(&req.id, &mounts, &bundle.root)
        .map_err(|e| internal(e.to_string()))?;

    // The spec names host paths (bind sources, the pause container's
    // namespaces) that the guest must see under other names.
    let undo_mount = || remove_share(share, &req.id);
    let guest = match guest_spec::adapt(&bundle.spec_json, &req.id, sandbox_guest_pid) {
        Ok(g) => g,
        Err(e) => {
            undo_mount();
            return Err(invalid(format!("container {}: {e}", req.id)));
        }
    };
    for b in &guest.binds {
        if let Err(e) = share.bind_host(&req.id, b) {
            undo_mount();
            return Err(internal(format!("container {}: {e}", req.id)));
        }
    }

    let guest_pid = match agent
        .create_container(
            &req.id,
            &guest.json,
            &PodShare::guest_rootfs(&req.id),
            req.terminal,
        )
        .await
    {
        Ok(pid) => pid,
        Err(e) => {
            undo_mount();
            return Err(agent_err(e));
        }
    };
    let spec = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
    let io = match ProcessIo::start(&agent, &req.id, "", &inner.namespace, &spec).await {
        Ok(io) => io,
        Err(e) => {
            let _ = agent.remove_container(&req.id, true).await;
            undo_mount();
            return Err(invalid(format!("container {} stdio: {e}", req.id)));
        }
    };
    let mut init = Process::new("", spec, None);
    init.guest_pid = guest_pid;
    init.io = Some(Arc::new(Mutex::new(io)));
    inner.events.send(TaskCreate {
        container_id: req.id.clone(),
        bundle: req.bundle.clone(),
        rootfs: req.rootfs.clone(),
        io: Some(TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        })
        .into(),
        checkpoint: req.checkpoint.clone(),
        pid: sandbox.vm_pid(),
        ..Default::default()
    });
    Ok(Container {
        id: req.id.clone(),
        bundle: PathBuf::from(&req.bundle),
        init,
        execs: HashMap::new(),
        paused: false,
    })
}

/// Deletes a stopped (or never started) container: in the guest, then its
/// rootfs mount. Returns its init's exit. Runs with the lifecycle lock held.
pub async fn delete(inner: &Inner, id: &str) -> Result<Exit> {
    let sandbox = {
        let pod = inner.pod();
        let c = pod.container(id)?;
        if c.init.running() || c.init.starting {
            return Err(precondition(format!(
                "container {id} is still running: kill it first"
            )));
        }
        pod.sandbox.clone()
    };
    if let Some(sb) = &sandbox {
        if let Err(e) = sb.agent().remove_container(id, true).await {
            // The guest may be gone (VM crash); the host side is still ours
            // to clean.
            if e.code() != Some(ttrpc::Code::NOT_FOUND) {
                warn!(container = id, "removing container in the guest: {e}");
            }
        }
    }
    let Some(c) = inner.pod().containers.remove(id) else {
        return Err(internal(format!("container {id} vanished during delete")));
    };
    if let Some(io) = &c.init.io {
        // Never started: nothing will finish its stdio otherwise.
        if !c.init.started {
            io.lock().await.finish(std::time::Duration::ZERO).await;
        }
    }
    if let Some(sb) = &sandbox {
        sb.known_containers().remove(id);
        remove_share(sb.share(), id);
    }
    // Never started: containerd still wants an exit.
    c.init.set_exit_if_unset(0);
    Ok(c.init.exit().unwrap_or_else(|| Exit {
        code: 0,
        at: crate::events::now(),
    }))
}

/// Unmounts the container's rootfs and binds and removes its directory; what
/// would not go is logged and left in place.
fn remove_share(share: &PodShare, id: &str) {
    let left = share.remove_container(id);
    if !left.is_empty() {
        warn!(container = id, "removing the container's share:\n{left}");
    }
}
