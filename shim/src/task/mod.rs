//! containerd's Task API (runtime v2) for a husk pod: every container of the
//! pod runs inside the pod's one VM, so each call becomes agent calls on the
//! sandbox's connection, plus host-side rootfs mounts and stdio copies.
//!
//! Task pids: containerd sees the pod VM's host pid (QEMU) for every task, as
//! a guest pid means nothing on the host (and may name an unrelated host
//! process); the guest pids are listed by Pids.

mod container;
mod errors;
mod process;
pub mod stats;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use containerd_shim::{ExitSignal, TtrpcContext};
use containerd_shim_protos::{
    api::{
        CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
        CreateTaskResponse, DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest,
        PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
        StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
        Status, UpdateTaskRequest, WaitRequest, WaitResponse,
    },
    events::task::{
        TaskDelete, TaskExecAdded, TaskExecStarted, TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::well_known_types::empty::Empty,
    shim::oci::ProcessDetails,
    shim_async::Task,
    types::task::ProcessInfo,
};
use tokio::sync::Mutex;
use tracing::{info, warn};

use self::{
    container::Container,
    errors::{agent as agent_err, internal, invalid, not_found, precondition, Result},
    process::Process,
};
use crate::{events::Events, io::StdioSpec, sandbox::Sandbox};

/// How long a VM gets to power off cleanly at shim shutdown.
const VM_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    events: Events,
    exit: Arc<ExitSignal>,
    pod: Mutex<Pod>,
}

#[derive(Default)]
struct Pod {
    sandbox: Option<Sandbox>,
    containers: HashMap<String, Container>,
}

impl Pod {
    fn container(&self, id: &str) -> Result<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }

    fn container_mut(&mut self, id: &str) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }

    fn sandbox(&self) -> Result<&Sandbox> {
        self.sandbox
            .as_ref()
            .ok_or_else(|| precondition("the pod VM is not running"))
    }

    fn vm_pid(&self) -> u32 {
        self.sandbox.as_ref().map(Sandbox::vm_pid).unwrap_or(0)
    }
}

impl TaskService {
    pub fn new(namespace: &str, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                events,
                exit,
                pod: Mutex::new(Pod::default()),
            }),
        }
    }
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioSpec {
    StdioSpec {
        stdin: stdin.into(),
        stdout: stdout.into(),
        stderr: stderr.into(),
        terminal,
    }
}

fn process<'a>(c: &'a Container, exec_id: &str) -> Result<&'a Process> {
    if exec_id.is_empty() {
        return Ok(&c.init);
    }
    c.execs
        .get(exec_id)
        .ok_or_else(|| not_found(format!("exec {exec_id} not found in container {}", c.id)))
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse> {
        info!(id = %req.id, bundle = %req.bundle, "create");
        let mut pod = self.inner.pod.lock().await;
        let pid = container::create(&mut pod, &self.inner, &req).await?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> Result<StartResponse> {
        info!(id = %req.id, exec = %req.exec_id, "start");
        let mut pod = self.inner.pod.lock().await;
        let vm_pid = pod.vm_pid();
        let agent = pod.sandbox()?.agent().clone();
        let c = pod.container_mut(&req.id)?;
        if req.exec_id.is_empty() {
            if c.init.started {
                return Err(precondition(format!("container {} already started", c.id)));
            }
            agent.start_container(&c.id).await.map_err(agent_err)?;
            c.init.started = true;
            c.init
                .watch_exit(agent, &c.id, vm_pid, self.inner.events.clone());
            self.inner
                .events
                .send(TaskStart {
                    container_id: c.id.clone(),
                    pid: vm_pid,
                    ..Default::default()
                })
                .await;
        } else {
            if !c.init.running() {
                return Err(precondition(format!("container {} is not running", c.id)));
            }
            let cid = c.id.clone();
            let p = c
                .execs
                .get_mut(&req.exec_id)
                .ok_or_else(|| not_found(format!("exec {} not found", req.exec_id)))?;
            if p.started {
                return Err(precondition(format!("exec {} already started", p.exec_id)));
            }
            let spec = p.exec_spec.clone().unwrap_or_default();
            p.guest_pid = agent
                .exec_process(&cid, &p.exec_id, &spec, p.stdio.terminal)
                .await
                .map_err(agent_err)?;
            let io = crate::io::ProcessIo::start(
                &agent,
                &cid,
                &p.exec_id,
                &self.inner.namespace,
                &p.stdio,
            )
            .await
            .map_err(|e| internal(format!("exec {} stdio: {e}", p.exec_id)))?;
            p.io = Some(Arc::new(Mutex::new(io)));
            p.started = true;
            p.watch_exit(agent, &cid, vm_pid, self.inner.events.clone());
            self.inner
                .events
                .send(TaskExecStarted {
                    container_id: cid,
                    exec_id: req.exec_id.clone(),
                    pid: vm_pid,
                    ..Default::default()
                })
                .await;
        }
        Ok(StartResponse {
            pid: vm_pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> Result<DeleteResponse> {
        info!(id = %req.id, exec = %req.exec_id, "delete");
        let mut pod = self.inner.pod.lock().await;
        let vm_pid = pod.vm_pid();
        let exit = if req.exec_id.is_empty() {
            let exit = container::delete(&mut pod, &req.id).await?;
            self.inner
                .events
                .send(TaskDelete {
                    container_id: req.id.clone(),
                    id: req.id.clone(),
                    pid: vm_pid,
                    exit_status: exit.code,
                    exited_at: Some(exit.at.clone()).into(),
                    ..Default::default()
                })
                .await;
            exit
        } else {
            let agent = pod.sandbox()?.agent().clone();
            let c = pod.container_mut(&req.id)?;
            let p = process(c, &req.exec_id)?;
            if p.running() {
                return Err(precondition(format!(
                    "exec {} is still running",
                    req.exec_id
                )));
            }
            if p.started {
                if let Err(e) = agent.remove_process(&req.id, &req.exec_id).await {
                    warn!(id = %req.id, exec = %req.exec_id, "removing exec: {e}");
                }
            }
            p.set_exit_if_unset(0);
            let exit = p.exit().unwrap_or_else(|| process::Exit {
                code: 0,
                at: crate::events::now(),
            });
            c.execs.remove(&req.exec_id);
            exit
        };
        Ok(DeleteResponse {
            pid: vm_pid,
            exit_status: exit.code,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> Result<PidsResponse> {
        let pod = self.inner.pod.lock().await;
        let agent = pod.sandbox()?.agent().clone();
        let c = pod.container(&req.id)?;
        let execs: HashMap<u32, String> = c
            .execs
            .values()
            .filter(|p| p.running())
            .map(|p| (p.guest_pid, p.exec_id.clone()))
            .collect();
        let id = c.id.clone();
        drop(pod);
        let pids = agent.list_processes(&id).await.map_err(agent_err)?;
        let processes = pids
            .into_iter()
            .map(|pid| {
                let info = execs.get(&pid).and_then(|exec_id| {
                    stats::to_any(&ProcessDetails {
                        exec_id: exec_id.clone(),
                        ..Default::default()
                    })
                    .ok()
                });
                ProcessInfo {
                    pid,
                    info: info.into(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> Result<Empty> {
        let mut pod = self.inner.pod.lock().await;
        let agent = pod.sandbox()?.agent().clone();
        let c = pod.container_mut(&req.id)?;
        if !c.init.running() {
            return Err(precondition(format!("container {} is not running", c.id)));
        }
        agent.pause_container(&c.id).await.map_err(agent_err)?;
        c.paused = true;
        self.inner
            .events
            .send(TaskPaused {
                container_id: req.id,
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> Result<Empty> {
        let mut pod = self.inner.pod.lock().await;
        let agent = pod.sandbox()?.agent().clone();
        let c = pod.container_mut(&req.id)?;
        if !c.paused {
            return Err(precondition(format!("container {} is not paused", c.id)));
        }
        agent.resume_container(&c.id).await.map_err(agent_err)?;
        c.paused = false;
        self.inner
            .events
            .send(TaskResumed {
                container_id: req.id,
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, req: CheckpointTaskRequest) -> Result<Empty> {
        Err(errors::status(
            ttrpc::Code::UNIMPLEMENTED,
            format!(
                "checkpoint of {} is not supported by husk: its processes live inside a microVM",
                req.id
            ),
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> Result<Empty> {
        info!(id = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all, "kill");
        let pod = self.inner.pod.lock().await;
        let agent = pod.sandbox()?.agent().clone();
        let c = pod.container(&req.id)?;
        let p = process(c, &req.exec_id)?;
        if p.exited() {
            return Err(not_found("process already finished"));
        }
        if !req.exec_id.is_empty() && !p.started {
            return Err(not_found(format!("exec {} has not started", req.exec_id)));
        }
        drop(pod);
        agent
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> Result<Empty> {
        info!(id = %req.id, exec = %req.exec_id, "exec");
        crate::ids::check("exec", &req.exec_id).map_err(invalid)?;
        let mut pod = self.inner.pod.lock().await;
        let c = pod.container_mut(&req.id)?;
        if !c.init.running() {
            return Err(precondition(format!("container {} is not running", c.id)));
        }
        if c.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
            return Err(errors::status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("exec id {:?} already exists or is empty", req.exec_id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| invalid("exec request carries no process spec"))?;
        let v: serde_json::Value = serde_json::from_slice(&spec)
            .map_err(|e| invalid(format!("exec process spec is not JSON: {e}")))?;
        if v.pointer("/args")
            .and_then(|a| a.as_array())
            .is_none_or(|a| a.is_empty())
        {
            return Err(invalid("exec process spec has no args"));
        }
        let p = Process::new(
            &req.exec_id,
            stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            Some(spec),
        );
        c.execs.insert(req.exec_id.clone(), p);
        self.inner
            .events
            .send(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> Result<Empty> {
        let pod = self.inner.pod.lock().await;
        let agent = pod.sandbox()?.agent().clone();
        let c = pod.container(&req.id)?;
        process(c, &req.exec_id)?;
        drop(pod);
        agent
            .tty_resize(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> Result<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let pod = self.inner.pod.lock().await;
        let c = pod.container(&req.id)?;
        let io = process(c, &req.exec_id)?.io.clone();
        drop(pod);
        if let Some(io) = io {
            io.lock().await.close_stdin().await;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> Result<Empty> {
        let pod = self.inner.pod.lock().await;
        let agent = pod.sandbox()?.agent().clone();
        pod.container(&req.id)?;
        drop(pod);
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| invalid("update request carries no resources"))?;
        serde_json::from_slice::<serde_json::Value>(&resources)
            .map_err(|e| invalid(format!("resources are not JSON LinuxResources: {e}")))?;
        agent
            .update_container(&req.id, &resources)
            .await
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> Result<WaitResponse> {
        let mut rx = {
            let pod = self.inner.pod.lock().await;
            let c = pod.container(&req.id)?;
            process(c, &req.exec_id)?.subscribe()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| internal("process record went away while waiting"))?
            .clone()
            .ok_or_else(|| internal("no exit recorded"))?;
        Ok(WaitResponse {
            exit_status: exit.code,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> Result<StatsResponse> {
        let pod = self.inner.pod.lock().await;
        let agent = pod.sandbox()?.agent().clone();
        pod.container(&req.id)?;
        drop(pod);
        let s = agent.stats(&req.id).await.map_err(agent_err)?;
        let any = stats::to_any(&stats::to_metrics(&s))
            .map_err(|e| internal(format!("encoding metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> Result<StateResponse> {
        let pod = self.inner.pod.lock().await;
        let vm_pid = pod.vm_pid();
        let c = pod.container(&req.id)?;
        let p = process(c, &req.exec_id)?;
        let exit = p.exit();
        let status = match (&exit, p.started, c.paused) {
            (Some(_), _, _) => Status::STOPPED,
            (None, false, _) => Status::CREATED,
            (None, true, true) if req.exec_id.is_empty() => Status::PAUSED,
            (None, true, _) => Status::RUNNING,
        };
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: vm_pid,
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.code).unwrap_or(0),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> Result<ConnectResponse> {
        let pod = self.inner.pod.lock().await;
        pod.container(&req.id)?;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pod.vm_pid(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> Result<Empty> {
        let mut pod = self.inner.pod.lock().await;
        if !pod.containers.is_empty() {
            // Other containers of the pod still run in this shim.
            return Ok(Empty::new());
        }
        info!(id = %req.id, "shutting down: no containers left");
        let sandbox = pod.sandbox.take();
        let exit = self.inner.exit.clone();
        // Answer first; the shim exits once the VM is down.
        tokio::spawn(async move {
            if let Some(sb) = sandbox {
                sb.shutdown(VM_SHUTDOWN_GRACE).await;
            }
            exit.signal();
        });
        Ok(Empty::new())
    }
}
