//! Runs the built agent as an ordinary process serving a Unix socket and
//! drives its API the way the shim will, over a real ttrpc connection.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use husk_protocol::{
    agent::{health_response, GuestDetailsRequest, HealthRequest, ShutdownRequest, VersionRequest},
    agent_ttrpc::AgentServiceClient,
    API_VERSION,
};
use ttrpc::context;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Kills the agent if the test fails before it exits by itself.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the agent and waits for its ready line on stderr.
fn start_agent(sock: &Path) -> Agent {
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning husk-agent");
    let stderr = child.stderr.take().unwrap();
    let agent = Agent(child);

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            // Echo so a failing test shows the agent's log.
            eprintln!("agent: {line}");
            if line.contains("husk-agent: ready on") {
                let _ = tx.send(line);
            }
        }
    });
    let ready = rx
        .recv_timeout(START_TIMEOUT)
        .expect("agent did not report ready");
    assert!(
        ready.contains(&format!("ready on unix socket {}", sock.display())),
        "{ready}"
    );
    assert!(ready.contains("boot\u{2192}init") && ready.contains("init\u{2192}ready"));
    agent
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(5).as_nanos() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_agent_api_and_exits_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let mut agent = start_agent(&sock);

    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
        .await
        .expect("connecting to the agent");
    let client = AgentServiceClient::new(client);

    let health = client.health(ctx(), &HealthRequest::new()).await.unwrap();
    assert_eq!(
        health.status.enum_value(),
        Ok(health_response::Status::SERVING)
    );

    let version = client.version(ctx(), &VersionRequest::new()).await.unwrap();
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, API_VERSION);

    let details = client
        .get_guest_details(ctx(), &GuestDetailsRequest::new())
        .await
        .unwrap();
    let uts = nix::sys::utsname::uname().unwrap();
    assert_eq!(details.kernel_release, uts.release().to_str().unwrap());
    assert_eq!(details.kernel_version, uts.version().to_str().unwrap());
    assert_eq!(details.machine, uts.machine().to_str().unwrap());
    assert!(details.cpus >= 1);
    assert!(details.memory_available_bytes > 0);
    assert!(details.memory_total_bytes > details.memory_available_bytes);
    assert!(details.init_started_ns > 0);
    assert!(details.init_started_ns <= details.agent_ready_ns);
    assert!(details.agent_ready_ns <= details.uptime_ns);

    // A second call: uptime moves on, the stamps do not.
    let again = client
        .get_guest_details(ctx(), &GuestDetailsRequest::new())
        .await
        .unwrap();
    assert_eq!(again.init_started_ns, details.init_started_ns);
    assert_eq!(again.agent_ready_ns, details.agent_ready_ns);
    assert!(again.uptime_ns >= details.uptime_ns);

    // The reply arrives before the agent goes away.
    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .expect("Shutdown reply");
    let status = wait_exit(&mut agent.0, EXIT_TIMEOUT).expect("agent did not exit after Shutdown");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!sock.exists(), "socket file left behind");
}

#[test]
fn exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let mut agent = start_agent(&sock);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_exit(&mut agent.0, EXIT_TIMEOUT).expect("agent did not exit on SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .args(["--listen", "tcp://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad listen address"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("husk-agent {}", env!("CARGO_PKG_VERSION"))
    );
}
