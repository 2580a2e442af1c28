//! containerd's Task API (runtime v2) for a husk pod: every container of the
//! pod runs inside the pod's one VM, so each call becomes agent calls on the
//! sandbox's connection, plus host-side rootfs mounts and stdio copies.
//!
//! Task pids: containerd sees the pod VM's host pid (QEMU) for every task, as
//! a guest pid means nothing on the host (and may name an unrelated host
//! process); the guest pids are listed by Pids.
//!
//! Locking: the pod's state sits behind a `std::sync::Mutex`, held only for
//! state checks and transitions, never across an await (the compiler holds us
//! to that: its guard is not `Send`). A VM boot, an agent call or an event is
//! never waited for under it, so one slow guest call never stalls State, Kill
//! or Wait of another container. Creates and deletes, which mount and unmount
//! in the pod share, are serialized among themselves by a separate async lock.

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
use tokio::sync::Mutex as AsyncMutex;
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
    pod: std::sync::Mutex<Pod>,
    /// Serializes creates and deletes (VM boot, share mounts).
    lifecycle: AsyncMutex<()>,
}

impl Inner {
    fn pod(&self) -> std::sync::MutexGuard<'_, Pod> {
        // A panic under the lock left plain data behind: still usable.
        self.pod.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Pod {
    sandbox: Option<Arc<Sandbox>>,
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

    fn sandbox(&self) -> Result<Arc<Sandbox>> {
        self.sandbox
            .clone()
            .ok_or_else(|| precondition("the pod VM is not running"))
    }

    fn agent(&self) -> Result<crate::agent_client::AgentClient> {
        Ok(self.sandbox()?.agent().clone())
    }

    fn vm_pid(&self) -> u32 {
        self.sandbox.as_ref().map(|s| s.vm_pid()).unwrap_or(0)
    }
}

impl TaskService {
    pub fn new(namespace: &str, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                events,
                exit,
                pod: std::sync::Mutex::new(Pod::default()),
                lifecycle: AsyncMutex::new(()),
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
        let _serial = self.inner.lifecycle.lock().await;
        let pid = container::create(&self.inner, &req).await?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> Result<StartResponse> {
        info!(id = %req.id, exec = %req.exec_id, "start");
        let events = &self.inner.events;
        if req.exec_id.is_empty() {
            let (agent, vm_pid) = {
                let mut pod = self.inner.pod();
                let (agent, vm_pid) = (pod.agent()?, pod.vm_pid());
                let c = pod.container_mut(&req.id)?;
                if c.init.started || c.init.starting {
                    return Err(precondition(format!("container {} already started", c.id)));
                }
                c.init.starting = true;
                (agent, vm_pid)
            };
            let result = agent.start_container(&req.id).await;
            let mut pod = self.inner.pod();
            let c = pod.container_mut(&req.id)?;
            c.init.starting = false;
            result.map_err(agent_err)?;
            c.init.started = true;
            // Queued before the exit watcher exists: TaskStart precedes TaskExit.
            events.send(TaskStart {
                container_id: c.id.clone(),
                pid: vm_pid,
                ..Default::default()
            });
            c.init.watch_exit(agent, &c.id, vm_pid, events.clone());
            return Ok(StartResponse {
                pid: vm_pid,
                ..Default::default()
            });
        }
        let (agent, vm_pid, spec, stdio) = {
            let mut pod = self.inner.pod();
            let (agent, vm_pid) = (pod.agent()?, pod.vm_pid());
            let c = pod.container_mut(&req.id)?;
            if !c.init.running() {
                return Err(precondition(format!("container {} is not running", c.id)));
            }
            let p = c
                .execs
                .get_mut(&req.exec_id)
                .ok_or_else(|| not_found(format!("exec {} not found", req.exec_id)))?;
            if p.started || p.starting {
                return Err(precondition(format!("exec {} already started", p.exec_id)));
            }
            p.starting = true;
            (
                agent,
                vm_pid,
                p.exec_spec.clone().unwrap_or_default(),
                p.stdio.clone(),
            )
        };
        let started = async {
            let guest_pid = agent
                .exec_process(&req.id, &req.exec_id, &spec, stdio.terminal)
                .await
                .map_err(agent_err)?;
            let io = crate::io::ProcessIo::start(
                &agent,
                &req.id,
                &req.exec_id,
                &self.inner.namespace,
                &stdio,
            )
            .await
            .map_err(|e| internal(format!("exec {} stdio: {e}", req.exec_id)))?;
            Ok::<_, ttrpc::Error>((guest_pid, io))
        }
        .await;
        let mut pod = self.inner.pod();
        let c = pod.container_mut(&req.id)?;
        let p = c
            .execs
            .get_mut(&req.exec_id)
            .ok_or_else(|| not_found(format!("exec {} was deleted while starting", req.exec_id)))?;
        p.starting = false;
        let (guest_pid, io) = started?;
        p.guest_pid = guest_pid;
        p.io = Some(Arc::new(AsyncMutex::new(io)));
        p.started = true;
        events.send(TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid: vm_pid,
            ..Default::default()
        });
        p.watch_exit(agent, &req.id, vm_pid, events.clone());
        Ok(StartResponse {
            pid: vm_pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> Result<DeleteResponse> {
        info!(id = %req.id, exec = %req.exec_id, "delete");
        let vm_pid = self.inner.pod().vm_pid();
        let exit = if req.exec_id.is_empty() {
            let _serial = self.inner.lifecycle.lock().await;
            let exit = container::delete(&self.inner, &req.id).await?;
            self.inner.events.send(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: vm_pid,
                exit_status: exit.code,
                exited_at: Some(exit.at.clone()).into(),
                ..Default::default()
            });
            exit
        } else {
            let (agent, started) = {
                let pod = self.inner.pod();
                let agent = pod.agent()?;
                let p = process(pod.container(&req.id)?, &req.exec_id)?;
                if p.running() || p.starting {
                    return Err(precondition(format!(
                        "exec {} is still running",
                        req.exec_id
                    )));
                }
                (agent, p.started)
            };
            if started {
                if let Err(e) = agent.remove_process(&req.id, &req.exec_id).await {
                    warn!(id = %req.id, exec = %req.exec_id, "removing exec: {e}");
                }
            }
            let mut pod = self.inner.pod();
            let c = pod.container_mut(&req.id)?;
            let p = c
                .execs
                .remove(&req.exec_id)
                .ok_or_else(|| not_found(format!("exec {} not found", req.exec_id)))?;
            p.set_exit_if_unset(0);
            p.exit().unwrap_or_else(|| process::Exit {
                code: 0,
                at: crate::events::now(),
            })
        };
        Ok(DeleteResponse {
            pid: vm_pid,
            exit_status: exit.code,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> Result<PidsResponse> {
        let (agent, execs, id) = {
            let pod = self.inner.pod();
            let agent = pod.agent()?;
            let c = pod.container(&req.id)?;
            let execs: HashMap<u32, String> = c
                .execs
                .values()
                .filter(|p| p.running())
                .map(|p| (p.guest_pid, p.exec_id.clone()))
                .collect();
            (agent, execs, c.id.clone())
        };
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
        let agent = {
            let pod = self.inner.pod();
            let agent = pod.agent()?;
            let c = pod.container(&req.id)?;
            if !c.init.running() {
                return Err(precondition(format!("container {} is not running", c.id)));
            }
            agent
        };
        agent.pause_container(&req.id).await.map_err(agent_err)?;
        self.inner.pod().container_mut(&req.id)?.paused = true;
        self.inner.events.send(TaskPaused {
            container_id: req.id,
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> Result<Empty> {
        let agent = {
            let pod = self.inner.pod();
            let agent = pod.agent()?;
            let c = pod.container(&req.id)?;
            if !c.paused {
                return Err(precondition(format!("container {} is not paused", c.id)));
            }
            agent
        };
        agent.resume_container(&req.id).await.map_err(agent_err)?;
        self.inner.pod().container_mut(&req.id)?.paused = false;
        self.inner.events.send(TaskResumed {
            container_id: req.id,
            ..Default::default()
        });
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
        let agent = {
            let pod = self.inner.pod();
            let agent = pod.agent()?;
            let p = process(pod.container(&req.id)?, &req.exec_id)?;
            if p.exited() {
                return Err(not_found("process already finished"));
            }
            if !req.exec_id.is_empty() && !p.started {
                return Err(not_found(format!("exec {} has not started", req.exec_id)));
            }
            agent
        };
        agent
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(agent_err)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> Result<Empty> {
        info!(id = %req.id, exec = %req.exec_id, "exec");
        crate::ids::check("exec", &req.exec_id).map_err(invalid)?;
        let mut pod = self.inner.pod();
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
        drop(pod);
        self.inner.events.send(TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> Result<Empty> {
        let agent = {
            let pod = self.inner.pod();
            process(pod.container(&req.id)?, &req.exec_id)?;
            pod.agent()?
        };
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
        let io = {
            let pod = self.inner.pod();
            process(pod.container(&req.id)?, &req.exec_id)?.io.clone()
        };
        if let Some(io) = io {
            io.lock().await.close_stdin().await;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> Result<Empty> {
        let agent = {
            let pod = self.inner.pod();
            pod.container(&req.id)?;
            pod.agent()?
        };
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
            let pod = self.inner.pod();
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
        let agent = {
            let pod = self.inner.pod();
            pod.container(&req.id)?;
            pod.agent()?
        };
        let s = agent.stats(&req.id).await.map_err(agent_err)?;
        let any = stats::to_any(&stats::to_metrics(&s))
            .map_err(|e| internal(format!("encoding metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> Result<StateResponse> {
        let pod = self.inner.pod();
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
        let pod = self.inner.pod();
        pod.container(&req.id)?;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pod.vm_pid(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> Result<Empty> {
        let sandbox = {
            let mut pod = self.inner.pod();
            if !pod.containers.is_empty() {
                // Other containers of the pod still run in this shim.
                return Ok(Empty::new());
            }
            pod.sandbox.take()
        };
        info!(id = %req.id, "shutting down: no containers left");
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
