//! The container runtime inside the guest: the registry of containers and
//! their processes, and the operations the agent API exposes on them.
//!
//! libcontainer (youki) does the actual work of creating, starting, exec'ing
//! into and deleting containers, in a helper process ([`helper`] says why
//! and how the processes it forks come back to the agent's reaper). This
//! module keeps what outlives a single call: each container's state, its
//! processes' exit statuses and buffered stdio ([`stdio`]), its cgroup
//! ([`cgroups`]), and the OOM-kill watch.
//!
//! Locking: the registry map is a plain mutex held only to look things up;
//! each container has an async `op` lock that serializes its lifecycle calls
//! (start, exec, pause, resume, remove), so that, say, a pause cannot
//! interleave with an exec. Stdio, waits and signals take no op lock.

pub mod cgroups;
pub mod error;
pub mod helper;
pub mod sandbox;
pub mod spec;
pub mod stdio;
pub mod sysctl;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fs,
    path::{Path, PathBuf},
    pin::pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
    time::Duration,
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::sync::{watch, Notify};

use self::{
    cgroups::{Cgroup, Stats},
    error::{Error, Result},
    helper::Op,
    sandbox::{Sandbox, SandboxConfig},
    stdio::{Chunk, PendingIo, ProcessIo},
};
use crate::reaper::{ExitStatus, ExitWatch, Reaper};

/// How long one libcontainer operation (including the spec's hooks) may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `RemoveContainer` waits for a killed init to be reaped.
const REMOVE_WAIT: Duration = Duration::from_secs(10);
/// How often memory.events is checked for new OOM kills. Polling (rather
/// than inotify) keeps this simple; a read of a small cgroup file per
/// container twice a second costs nothing noticeable.
const OOM_POLL: Duration = Duration::from_millis(500);
/// OOM events kept for the shim; more are dropped (oldest first).
const OOM_QUEUE_MAX: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the runtime keeps things, and how it runs.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The agent's state directory: /run/husk in the guest.
    pub state_dir: PathBuf,
    /// The cgroup2 mount: /sys/fs/cgroup.
    pub cgroup_root: PathBuf,
    /// True as the guest's PID 1; false on a host (tests), where the
    /// sandbox set-up leaves the machine's hostname and /etc alone.
    pub guest: bool,
}

impl RuntimeConfig {
    pub fn guest() -> Self {
        Self {
            state_dir: PathBuf::from("/run/husk"),
            cgroup_root: PathBuf::from(crate::init::CGROUP_ROOT),
            guest: true,
        }
    }

    fn bundles(&self) -> PathBuf {
        self.state_dir.join("bundles")
    }

    /// libcontainer's own state (state.json, notify sockets).
    fn libcontainer_root(&self) -> PathBuf {
        self.state_dir.join("libcontainer")
    }

    fn tty_dir(&self) -> PathBuf {
        self.state_dir.join("tty")
    }
}

/// A container's lifecycle state, as far as the agent drives it; `Stopped`
/// is derived from the init process having exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// A process the agent started in a container (its init or an exec).
pub struct Process {
    pub pid: Pid,
    pub io: ProcessIo,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Process {
    fn new(pid: Pid, io: ProcessIo, watch: ExitWatch) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            match watch.wait().await {
                Ok(status) => {
                    tracing::debug!(%pid, ?status, "container process exited");
                    let _ = tx.send(Some(status));
                }
                // Only if the reaper task died; the status is then unknown.
                Err(e) => tracing::error!("{e}"),
            }
        });
        Arc::new(Self { pid, io, exit: rx })
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> Result<ExitStatus> {
        let mut rx = self.exit.clone();
        let status = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::internal("the process's exit status was lost"))?;
        status.ok_or_else(|| Error::internal("no exit status"))
    }
}

pub struct Container {
    pub id: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    cgroup: Cgroup,
    op: tokio::sync::Mutex<()>,
    state: Mutex<Status>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn status(&self) -> Status {
        if self.init.exit_status().is_some() {
            return Status::Stopped;
        }
        *lock(&self.state)
    }

    fn set_status(&self, s: Status) {
        *lock(&self.state) = s;
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            Error::NotFound(format!(
                "container {:?} has no exec process {exec_id:?}",
                self.id
            ))
        })
    }

    fn expect(&self, allowed: &[Status], doing: &str) -> Result<Status> {
        let status = self.status();
        if allowed.contains(&status) {
            Ok(status)
        } else {
            Err(Error::precondition(format!(
                "cannot {doing} container {:?}: it is {status:?}",
                self.id
            )))
        }
    }
}

#[derive(Default)]
struct Registry {
    containers: HashMap<String, Arc<Container>>,
    /// Ids being created: taken, but not yet usable.
    creating: HashSet<String>,
}

#[derive(Default)]
struct OomEvents {
    queue: Mutex<VecDeque<String>>,
    notify: Notify,
    /// Last oom_kill count seen per container.
    seen: Mutex<HashMap<String, u64>>,
}

pub struct Runtime {
    cfg: RuntimeConfig,
    reaper: Reaper,
    registry: Mutex<Registry>,
    sandbox: Mutex<Option<Sandbox>>,
    oom: OomEvents,
    console_seq: AtomicU64,
}

/// Releases an id reserved for a container being created, unless the
/// creation completed.
struct Reservation<'a> {
    rt: &'a Runtime,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.rt.registry).creating.remove(&self.id);
    }
}

impl Runtime {
    /// Must run inside a tokio runtime: it starts the OOM watch.
    pub fn new(cfg: RuntimeConfig, reaper: Reaper) -> Arc<Self> {
        let rt = Arc::new(Self {
            cfg,
            reaper,
            registry: Mutex::new(Registry::default()),
            sandbox: Mutex::new(None),
            oom: OomEvents::default(),
            console_seq: AtomicU64::new(0),
        });
        tokio::spawn(watch_oom(Arc::downgrade(&rt)));
        rt
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.registry)
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no container {id:?}")))
    }

    fn share(&self) -> Option<PathBuf> {
        lock(&self.sandbox).as_ref().map(|s| s.share.clone())
    }

    fn mkdir(path: &Path) -> Result<()> {
        fs::create_dir_all(path)
            .map_err(|e| Error::internal(format!("creating {}: {e}", path.display())))
    }

    pub fn create_sandbox(&self, cfg: &SandboxConfig) -> Result<()> {
        let mut sandbox = lock(&self.sandbox);
        if sandbox.is_some() {
            return Err(Error::AlreadyExists("the sandbox is already set up".into()));
        }
        *sandbox = Some(sandbox::create(cfg, self.cfg.guest, &self.cfg.state_dir)?);
        Ok(())
    }

    /// Creates stdio for a new process: pipes, or a console socket to
    /// receive a pty master on.
    fn pending_io(&self, terminal: bool) -> Result<PendingIo> {
        if terminal {
            let dir = self.cfg.tty_dir();
            Self::mkdir(&dir)?;
            let n = self.console_seq.fetch_add(1, Ordering::Relaxed);
            PendingIo::tty(stdio::console_socket_path(&dir, n))
        } else {
            PendingIo::pipes()
        }
    }

    pub async fn create_container(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: &str,
        terminal: bool,
    ) -> Result<u32> {
        spec::validate_id("container_id", id)?;
        {
            let mut reg = lock(&self.registry);
            if reg.containers.contains_key(id) || reg.creating.contains(id) {
                return Err(Error::AlreadyExists(format!(
                    "container {id:?} already exists"
                )));
            }
            reg.creating.insert(id.to_string());
        }
        let reservation = Reservation {
            rt: self,
            id: id.to_string(),
        };

        // The spec first: a malformed one is the likelier mistake.
        let spec = spec::parse_spec(spec_json)?;
        let share = self.share();
        let rootfs = spec::resolve_rootfs(rootfs, id, share.as_deref())?;
        let mut spec = spec::prepare_spec(
            spec,
            &spec::SpecContext {
                id,
                rootfs: &rootfs,
                terminal,
                share: share.as_deref(),
            },
        )?;
        let net_sysctls = spec
            .linux_mut()
            .as_mut()
            .and_then(|l| l.sysctl_mut().as_mut())
            .map(sysctl::take_network)
            .unwrap_or_default();
        sysctl::apply(Path::new("/proc/sys"), &net_sysctls)?;
        let cgroups_path = spec::cgroups_path(id);

        let bundle = self.cfg.bundles().join(id);
        // Left over from an earlier container with this id that failed
        // half-way: nothing in it is wanted.
        let _ = fs::remove_dir_all(&bundle);
        Self::mkdir(&bundle)?;
        Self::mkdir(&self.cfg.libcontainer_root())?;
        let config = serde_json::to_vec(&spec)
            .map_err(|e| Error::internal(format!("encoding the spec: {e}")))?;
        fs::write(bundle.join("config.json"), config)
            .map_err(|e| Error::internal(format!("writing the bundle: {e}")))?;

        let created = self.create_init(id, &bundle, terminal).await;
        let (pid, io, exit) = match created {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };

        let container = Arc::new(Container {
            id: id.to_string(),
            bundle,
            rootfs,
            cgroup: Cgroup::new(&self.cfg.cgroup_root, &cgroups_path, id),
            op: tokio::sync::Mutex::new(()),
            state: Mutex::new(Status::Created),
            init: Process::new(pid, io, exit),
            execs: Mutex::new(HashMap::new()),
        });
        let baseline = container.cgroup.oom_kills().unwrap_or(0);
        lock(&self.oom.seen).insert(id.to_string(), baseline);
        {
            let mut reg = lock(&self.registry);
            reg.containers.insert(id.to_string(), container);
        }
        drop(reservation);
        tracing::info!(id, %pid, terminal, "container created");
        Ok(pid.as_raw() as u32)
    }

    async fn create_init(
        &self,
        id: &str,
        bundle: &Path,
        terminal: bool,
    ) -> Result<(Pid, ProcessIo, ExitWatch)> {
        let mut io = self.pending_io(terminal)?;
        let (fds, console_socket) = io.take_child_side();
        let op = Op::Create {
            id: id.to_string(),
            root: self.cfg.libcontainer_root(),
            bundle: bundle.to_path_buf(),
            console_socket,
            stdio: fds.is_some(),
        };
        let mark = self.reaper.mark();
        let pid = helper::run(&self.reaper, &op, fds, HELPER_TIMEOUT)
            .await?
            .ok_or_else(|| Error::internal("the runtime reported no init pid"))?;
        let pid = Pid::from_raw(pid);
        let exit = self.reaper.claim(pid, mark);
        match io.finish().await {
            Ok(io) => Ok((pid, io, exit)),
            Err(e) => {
                // The container exists but is unusable without its stdio.
                self.delete_quietly(id).await;
                Err(e)
            }
        }
    }

    async fn delete_quietly(&self, id: &str) {
        let op = Op::Delete {
            id: id.to_string(),
            root: self.cfg.libcontainer_root(),
            force: true,
        };
        if let Err(e) = helper::run(&self.reaper, &op, None, HELPER_TIMEOUT).await {
            tracing::warn!(id, "cleaning up: {e}");
        }
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let _op = c.op.lock().await;
        c.expect(&[Status::Created], "start")?;
        let op = Op::Start {
            id: id.to_string(),
            root: self.cfg.libcontainer_root(),
        };
        helper::run(&self.reaper, &op, None, HELPER_TIMEOUT).await?;
        c.set_status(Status::Running);
        tracing::info!(id, "container started");
        Ok(())
    }

    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        terminal: bool,
    ) -> Result<u32> {
        let c = self.container(id)?;
        spec::validate_id("exec_id", exec_id)?;
        let _op = c.op.lock().await;
        c.expect(&[Status::Running], "exec in")?;
        if lock(&c.execs).contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!(
                "container {id:?} already has an exec process {exec_id:?}"
            )));
        }
        let process = spec::parse_process(process_json, terminal, &c.rootfs)?;
        let process_file = c.bundle.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&process)
            .map_err(|e| Error::internal(format!("encoding the process: {e}")))?;
        fs::write(&process_file, json)
            .map_err(|e| Error::internal(format!("writing {}: {e}", process_file.display())))?;

        let mut io = self.pending_io(terminal)?;
        let (fds, console_socket) = io.take_child_side();
        let op = Op::Exec {
            id: id.to_string(),
            root: self.cfg.libcontainer_root(),
            bundle: c.bundle.clone(),
            process: process_file.clone(),
            console_socket,
            stdio: fds.is_some(),
        };
        let mark = self.reaper.mark();
        let result = helper::run(&self.reaper, &op, fds, HELPER_TIMEOUT).await;
        let _ = fs::remove_file(&process_file);
        let pid = Pid::from_raw(
            result?.ok_or_else(|| Error::internal("the runtime reported no exec pid"))?,
        );
        let exit = self.reaper.claim(pid, mark);
        let io = match io.finish().await {
            Ok(io) => io,
            Err(e) => {
                let _ = kill(pid, Signal::SIGKILL);
                return Err(e);
            }
        };
        lock(&c.execs).insert(exec_id.to_string(), Process::new(pid, io, exit));
        tracing::info!(id, exec_id, %pid, "exec process started");
        Ok(pid.as_raw() as u32)
    }

    pub fn signal_process(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let c = self.container(id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| Error::invalid(format!("signal {signal} is not a valid signal")))?;
        let p = c.process(exec_id)?;
        if p.exit_status().is_some() {
            return Err(Error::NotFound(format!(
                "process {} of container {id:?} has already exited",
                describe(exec_id)
            )));
        }
        if all && exec_id.is_empty() {
            for pid in c.cgroup.pids()? {
                // A process may exit between the listing and the signal.
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        kill(p.pid, sig).map_err(|e| Error::internal(format!("kill({}, {sig}): {e}", p.pid)))
    }

    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<(Pid, ExitStatus)> {
        let p = self.container(id)?.process(exec_id)?;
        Ok((p.pid, p.wait().await?))
    }

    pub fn remove_process(&self, id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(Error::invalid(
                "exec_id is empty; the init process goes with RemoveContainer",
            ));
        }
        let c = self.container(id)?;
        let mut execs = lock(&c.execs);
        match execs.get(exec_id) {
            None => Err(Error::NotFound(format!(
                "container {id:?} has no exec process {exec_id:?}"
            ))),
            Some(p) if p.exit_status().is_none() => Err(Error::precondition(format!(
                "exec process {exec_id:?} is still running"
            ))),
            Some(_) => {
                execs.remove(exec_id);
                Ok(())
            }
        }
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        self.container(id)?.process(exec_id)
    }

    pub async fn read_output(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max: usize,
        wait: Duration,
    ) -> Result<Chunk> {
        let p = self.process(id, exec_id)?;
        let buf = if stderr { &p.io.stderr } else { &p.io.stdout };
        Ok(buf.read(max, wait).await)
    }

    pub async fn remove_container(&self, id: &str, force: bool) -> Result<()> {
        let c = self.container(id)?;
        let _op = c.op.lock().await;
        let status = if force {
            c.status()
        } else {
            c.expect(
                &[Status::Created, Status::Stopped],
                "remove (without force)",
            )?
        };
        if status == Status::Paused {
            // Killed tasks die frozen too (cgroup v2), but thawed the exit
            // path (and the hooks) run as usual.
            if let Err(e) = c.cgroup.set_frozen(false).await {
                tracing::warn!(id, "thawing before removal: {e}");
            }
        }
        let op = Op::Delete {
            id: id.to_string(),
            root: self.cfg.libcontainer_root(),
            force: true,
        };
        match helper::run(&self.reaper, &op, None, HELPER_TIMEOUT).await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        if tokio::time::timeout(REMOVE_WAIT, c.init.wait())
            .await
            .is_err()
        {
            return Err(Error::DeadlineExceeded(format!(
                "container {id:?}'s init (pid {}) did not exit within {REMOVE_WAIT:?}",
                c.init.pid
            )));
        }
        if let Err(e) = fs::remove_dir_all(&c.bundle) {
            tracing::warn!(id, "removing {}: {e}", c.bundle.display());
        }
        lock(&self.registry).containers.remove(id);
        lock(&self.oom.seen).remove(id);
        tracing::info!(id, "container removed");
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<Stats> {
        Ok(self.container(id)?.cgroup.stats())
    }

    pub fn update(&self, id: &str, resources: &[u8]) -> Result<()> {
        let c = self.container(id)?;
        c.expect(
            &[Status::Created, Status::Running, Status::Paused],
            "update",
        )?;
        c.cgroup.update(resources)
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let _op = c.op.lock().await;
        c.expect(&[Status::Running], "pause")?;
        c.cgroup.set_frozen(true).await?;
        c.set_status(Status::Paused);
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        let _op = c.op.lock().await;
        c.expect(&[Status::Paused], "resume")?;
        c.cgroup.set_frozen(false).await?;
        c.set_status(Status::Running);
        Ok(())
    }

    pub fn list_processes(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.container(id)?;
        c.cgroup.pids()
    }

    /// The next OOM event's container id, or None after `wait`.
    pub async fn oom_event(&self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut notified = pin!(self.oom.notify.notified());
            notified.as_mut().enable();
            if let Some(id) = lock(&self.oom.queue).pop_front() {
                return Some(id);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    fn check_oom(&self) {
        let containers: Vec<Arc<Container>> =
            lock(&self.registry).containers.values().cloned().collect();
        for c in containers {
            let Some(count) = c.cgroup.oom_kills() else {
                continue;
            };
            let mut seen = lock(&self.oom.seen);
            let last = seen.entry(c.id.clone()).or_insert(0);
            if count > *last {
                *last = count;
                drop(seen);
                tracing::warn!(id = c.id, count, "OOM kill in container");
                let mut q = lock(&self.oom.queue);
                if q.len() >= OOM_QUEUE_MAX {
                    q.pop_front();
                }
                q.push_back(c.id.clone());
                drop(q);
                self.oom.notify.notify_waiters();
            }
        }
    }
}

fn describe(exec_id: &str) -> String {
    if exec_id.is_empty() {
        "init".to_string()
    } else {
        format!("{exec_id:?}")
    }
}

async fn watch_oom(rt: Weak<Runtime>) {
    let mut tick = tokio::time::interval(OOM_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(rt) = rt.upgrade() else { return };
        rt.check_oom();
    }
}
