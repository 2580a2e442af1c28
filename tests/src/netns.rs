//! A private network namespace for a test, held by a thread of its own: closures sent to it
//! run inside the namespace, and so do the commands they start (a child inherits the
//! namespaces of the thread that forks it). The namespace ends with the thread.

use std::{
    io,
    os::fd::OwnedFd,
    process::{Command, Output},
    sync::mpsc,
    thread::JoinHandle,
};

use anyhow::{bail, Context, Result};

type Job = Box<dyn FnOnce() + Send>;

pub struct Netns {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Netns {
    /// Needs root (CAP_SYS_ADMIN).
    pub fn new() -> Result<Netns> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("test-netns".into())
            .spawn(move || {
                // SAFETY: unshare(2) with CLONE_NEWNET changes this thread only.
                let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                let _ = ready_tx.send(if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                });
                if r != 0 {
                    return;
                }
                for job in rx {
                    job();
                }
            })?;
        ready_rx
            .recv()
            .context("netns thread ended")?
            .context("unshare(CLONE_NEWNET)")?;
        Ok(Netns {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` inside the namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .context("netns closed")?
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()
            .context("netns thread ended")?;
        rx.recv().context("netns job did not finish")
    }

    /// Runs a command inside the namespace; fails unless it exits 0.
    pub fn command(&self, program: &str, args: &[&str]) -> Result<Output> {
        let (program, args) = (
            program.to_string(),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        let shown = format!("{program} {}", args.join(" "));
        let out = self
            .run(move || Command::new(&program).args(&args).output())?
            .with_context(|| format!("running {shown}"))?;
        if !out.status.success() {
            bail!(
                "{shown}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Creates tap `name` in the namespace, as the shim makes a pod's; it goes away when the
    /// returned fd is closed.
    pub fn tap(&self, name: &str) -> Result<OwnedFd> {
        let name = name.to_string();
        self.run(move || husk_netdev::open_tap(&name))?
            .context("creating the tap")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
