//! Pod networking through CRI: CNI's bridge plugin puts a veth in each pod's
//! network namespace, husk's shim redirects it to a tap its VM's virtio-net
//! device uses, and the agent gives the guest NIC the pod IP. A server in
//! one husk pod answers a client in another husk pod and one on the host,
//! by pod IP; the pod's hostname and DNS reach its containers; teardown
//! leaves no tap or tc redirect. CNI's portmap plugin publishes a pod's
//! port on the host (CRI port mappings), and its iptables rules go with
//! the pod.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use husk_tests::{
    cri::{start_container, test_runtime, CriContainerd, RuntimeClient, HANDLER},
    husk_containerd::tail,
};
use k8s_cri::v1::{
    DnsConfig, ExecSyncRequest, PodSandboxConfig, PodSandboxStatusRequest, PortMapping, Protocol,
    RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};

/// The shim's tap in each pod namespace (husk_shim::network::TAP_NAME).
const TAP: &str = "tap0_husk";

/// One test at a time: each boots VMs under TCG on a 2-core host.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

async fn run_pod(
    client: &mut RuntimeClient,
    cri: &CriContainerd,
    config: PodSandboxConfig,
) -> String {
    client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: HANDLER.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", tail(&cri.containerd.log())))
        .into_inner()
        .pod_sandbox_id
}

async fn pod_ip(client: &mut RuntimeClient, pod: &str) -> String {
    client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_string(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .filter(|ip| !ip.is_empty())
        .expect("the pod has an IP")
}

/// Runs `script` in container `id`; (exit code, stdout, stderr).
async fn sh(client: &mut RuntimeClient, id: &str, script: &str) -> (i32, String, String) {
    let r = client
        .exec_sync(ExecSyncRequest {
            container_id: id.to_string(),
            cmd: ["sh", "-c", script].map(String::from).to_vec(),
            timeout: 90,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync {script:?}: {e}"))
        .into_inner();
    (
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).trim().to_string(),
        String::from_utf8_lossy(&r.stderr).trim().to_string(),
    )
}

/// An HTTP GET from the host, retried until `deadline` (the server may
/// still be starting); the response body.
fn host_get(ip: &str, port: u16, deadline: Instant) -> String {
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("pod IP");
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(b) if b.contains("200") => return b,
            Ok(b) => last = b,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("GET http://{addr}/ from the host never answered: {last}");
}

/// Network namespaces under /var/run/netns that hold husk's tap.
fn namespaces_with_tap() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|ns| {
            Command::new("ip")
                .args(["-n", ns, "link", "show", TAP])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect()
}

/// Whether the namespace's eth0 has `ip` (its CNI address).
fn holds_ip(ns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "-o", "-4", "addr", "show", "dev", "eth0"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("inet {ip}/")))
}

/// `tc` ingress filters on the namespace's eth0, if the namespace is there.
fn ingress_filters(ns: &str) -> String {
    Command::new("tc")
        .args(["-n", ns, "filter", "show", "dev", "eth0", "ingress"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn husk_pods_reach_each_other_and_the_host_by_pod_ip() {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing(
            "husk_pods_reach_each_other_and_the_host_by_pod_ip",
            "CRI, CNI and the shim need root",
        );
        return;
    }
    husk_tests::init_tracing();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cri = CriContainerd::start().expect("CRI containerd set-up");
    let before = namespaces_with_tap();
    test_runtime().block_on(async {
        let mut client = cri.runtime().await.unwrap();

        let mut a_config = cri.pod_config("net-a");
        a_config.dns_config = Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.husk.test".into()],
            options: vec!["ndots:5".into()],
        });
        let t0 = Instant::now();
        let pod_a = run_pod(&mut client, &cri, a_config.clone()).await;
        eprintln!("pod A ready in {} ms", t0.elapsed().as_millis());
        let ip_a = pod_ip(&mut client, &pod_a).await;
        // Only namespaces holding this pod's IP: other pods (of a concurrent
        // run on the same host) may have taps of their own.
        let taps: Vec<String> = namespaces_with_tap()
            .into_iter()
            .filter(|n| !before.contains(n) && holds_ip(n, &ip_a))
            .collect();
        assert_eq!(taps.len(), 1, "one tap for the pod: {taps:?}");
        assert!(
            ingress_filters(&taps[0]).contains("mirred"),
            "eth0 is redirected: {}",
            ingress_filters(&taps[0])
        );

        let server = start_container(
            &mut client,
            &pod_a,
            &a_config,
            "server",
            &["sh", "-c", "mkdir -p /www && echo hi-from-a > /www/index.html && exec httpd -f -p 8080 -h /www"],
        )
        .await;
        // The guest NIC has the pod IP; the pod's hostname and DNS are there.
        let (_, addrs, _) = sh(&mut client, &server, "ip -o -4 addr show").await;
        assert!(
            addrs.contains(&format!("{ip_a}/24")),
            "guest addresses: {addrs}"
        );
        let (_, route, _) = sh(&mut client, &server, "ip route show default").await;
        assert!(route.contains("via 10.203."), "default route: {route}");
        assert_eq!(sh(&mut client, &server, "hostname").await.1, "net-a");
        let (_, resolv, _) = sh(&mut client, &server, "cat /etc/resolv.conf").await;
        assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
        assert!(resolv.contains("search default.svc.husk.test"), "{resolv}");
        assert!(resolv.contains("ndots:5"), "{resolv}");

        // A client on the host, through the CNI bridge.
        let t = Instant::now();
        let body = host_get(&ip_a, 8080, Instant::now() + Duration::from_secs(90));
        assert!(body.contains("hi-from-a"), "{body}");
        eprintln!("host -> pod A: answered in {} ms", t.elapsed().as_millis());

        // A client in another husk pod.
        let b_config = cri.pod_config("net-b");
        let pod_b = run_pod(&mut client, &cri, b_config.clone()).await;
        let ip_b = pod_ip(&mut client, &pod_b).await;
        assert_ne!(ip_a, ip_b);
        let ours: Vec<String> = namespaces_with_tap()
            .into_iter()
            .filter(|n| holds_ip(n, &ip_a) || holds_ip(n, &ip_b))
            .collect();
        assert_eq!(ours.len(), 2, "a tap in each pod's namespace: {ours:?}");
        let cl = start_container(
            &mut client,
            &pod_b,
            &b_config,
            "client",
            &["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
        )
        .await;
        let t = Instant::now();
        let (code, body, err) = sh(
            &mut client,
            &cl,
            // nc, not wget: busybox-static's wget crashes in glibc's NSS
            // lookups in an image without NSS modules.
            &format!(
                "for i in 1 2 3 4 5; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {ip_a} 8080 \
                 | grep hi-from-a && exit 0; sleep 1; done; exit 1"
            ),
        )
        .await;
        assert_eq!(
            (code, body.as_str()),
            (0, "hi-from-a"),
            "pod B -> pod A: {err}"
        );
        eprintln!("pod B -> pod A: answered in {} ms", t.elapsed().as_millis());
        let (code, _, err) = sh(&mut client, &cl, &format!("ping -c 1 -W 10 {ip_a}")).await;
        assert_eq!(code, 0, "ping pod A from pod B: {err}");

        for pod in [&pod_a, &pod_b] {
            client
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: pod.to_string(),
                })
                .await
                .expect("StopPodSandbox");
            client
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: pod.to_string(),
                })
                .await
                .expect("RemovePodSandbox");
        }
        // Nothing of ours left in any namespace still there.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left: Vec<String> = namespaces_with_tap()
                .into_iter()
                .filter(|n| ours.contains(n))
                .collect();
            let filters: Vec<String> = taps
                .iter()
                .map(|n| ingress_filters(n))
                .filter(|f| f.contains("mirred"))
                .collect();
            if left.is_empty() && filters.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: taps in {left:?}, filters {filters:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

/// The host's iptables rules (all tables) that mention `needle`.
fn iptables_rules_with(needle: &str) -> Vec<String> {
    let out = Command::new("iptables-save")
        .output()
        .expect("running iptables-save");
    assert!(
        out.status.success(),
        "iptables-save: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

#[test]
fn husk_pod_port_mapping_reaches_the_vm_from_the_host() {
    if !nix::unistd::geteuid().is_root() {
        husk_skip::missing(
            "husk_pod_port_mapping_reaches_the_vm_from_the_host",
            "CRI, CNI and the shim need root",
        );
        return;
    }
    husk_tests::init_tracing();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cri = CriContainerd::start().expect("CRI containerd set-up");
    // A host port unique to this process: runs on the host may overlap.
    let host_port = 18080 + (std::process::id() % 1000) as u16;
    test_runtime().block_on(async {
        let mut client = cri.runtime().await.unwrap();
        let mut config = cri.pod_config("net-pm");
        config.port_mappings = vec![PortMapping {
            protocol: Protocol::Tcp as i32,
            container_port: 8080,
            host_port: i32::from(host_port),
            // 127.0.0.1: portmap DNATs locally sent packets in OUTPUT and
            // sets route_localnet on the bridge (and masquerades them), so
            // a host client on loopback reaches the pod.
            host_ip: "127.0.0.1".to_string(),
        }];
        let pod = run_pod(&mut client, &cri, config.clone()).await;
        let ip = pod_ip(&mut client, &pod).await;
        let rules = iptables_rules_with(&pod);
        assert!(
            rules
                .iter()
                .any(|r| r.contains("DNAT") || r.contains(&format!("--dport {host_port}"))),
            "portmap's rules for the pod: {rules:?}"
        );
        start_container(
            &mut client,
            &pod,
            &config,
            "server",
            &["sh", "-c", "mkdir -p /www && echo hi-from-pm > /www/index.html && exec httpd -f -p 8080 -h /www"],
        )
        .await;

        // The host port, not the pod IP: portmap's DNAT to the pod IP, then
        // the bridge, the veth and the shim's redirect into the VM.
        let t = Instant::now();
        let body = host_get(
            "127.0.0.1",
            host_port,
            Instant::now() + Duration::from_secs(90),
        );
        assert!(body.contains("hi-from-pm"), "{body}");
        eprintln!(
            "host 127.0.0.1:{host_port} -> pod {ip}:8080: answered in {} ms",
            t.elapsed().as_millis()
        );

        client
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("StopPodSandbox");
        client
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("RemovePodSandbox");
        // CNI DEL took portmap's rules with it.
        let left = iptables_rules_with(&pod);
        assert!(left.is_empty(), "iptables rules left for {pod}: {left:?}");
    });
}
