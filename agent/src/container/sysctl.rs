//! A pod's network sysctls, set by the agent in the guest's network namespace.
//!
//! Kubernetes treats `net.*` sysctls as the pod's (CRI puts them on every container's
//! spec; containerd 2.x adds `net.ipv4.ping_group_range` to every sandbox by default). In
//! husk the pod's network namespace is the guest's own, which containers join (their spec
//! loses its network namespace, see [`super::spec`]), and libcontainer refuses a `net.*`
//! sysctl for a container without a network namespace of its own. So they are taken out of
//! the spec and written here, to the one namespace they belong to. Other sysctls (`kernel.*`
//! ones in the container's IPC/UTS namespaces) stay for libcontainer.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::error::{Error, Result};

/// Removes the `net.*` sysctls from `sysctl` and returns them, sorted by name.
pub fn take_network(sysctl: &mut HashMap<String, String>) -> Vec<(String, String)> {
    let names: Vec<String> = sysctl
        .keys()
        .filter(|k| k.starts_with("net."))
        .cloned()
        .collect();
    let mut taken: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|k| sysctl.remove_entry(&k))
        .collect();
    taken.sort();
    taken
}

/// The file under /proc/sys of sysctl `name` ("net.ipv4.ping_group_range"). As sysctl(8)
/// has it, '.' separates components and '/' stands for a '.' inside one (a VLAN's
/// interface name: "net.ipv4.conf.eth0/100.forwarding").
pub fn proc_path(name: &str) -> Result<PathBuf> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "oci_spec.linux.sysctl[{name:?}]: {why}; a sysctl name is like net.ipv4.ip_forward"
        ))
    };
    if name.is_empty() || name.len() > 256 {
        return Err(bad("empty or longer than 256 bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
    {
        return Err(bad(
            "only letters, digits, '_', '-', '.' and '/' may appear",
        ));
    }
    let mut path = PathBuf::new();
    for part in name.split('.') {
        let part = part.replace('/', ".");
        if part.is_empty() || part == "." || part == ".." {
            return Err(bad("empty or dot-only component"));
        }
        path.push(part);
    }
    Ok(path)
}

/// Writes each sysctl below `proc_sys` (the guest's /proc/sys). A name the kernel does not
/// have, or a value it refuses, fails the create with both named, as runc's would.
pub fn apply(proc_sys: &Path, sysctls: &[(String, String)]) -> Result<()> {
    for (name, value) in sysctls {
        let path = proc_sys.join(proc_path(name)?);
        fs::write(&path, value.as_bytes()).map_err(|e| {
            Error::invalid(format!(
                "oci_spec.linux.sysctl[{name:?}] = {value:?}: writing {}: {e}",
                path.display()
            ))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn network_sysctls_are_taken_the_rest_stay() {
        let mut s: HashMap<String, String> = [
            ("net.ipv4.ping_group_range", "0 2147483647"),
            ("kernel.shm_rmid_forced", "1"),
            ("net.core.somaxconn", "1024"),
            ("network.not", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let taken = take_network(&mut s);
        assert_eq!(
            taken,
            vec![
                ("net.core.somaxconn".to_string(), "1024".to_string()),
                (
                    "net.ipv4.ping_group_range".to_string(),
                    "0 2147483647".to_string()
                ),
            ]
        );
        assert_eq!(s.len(), 2);
        assert!(s.contains_key("kernel.shm_rmid_forced") && s.contains_key("network.not"));
    }

    #[test]
    fn names_map_to_paths_below_proc_sys_only() {
        assert_eq!(
            proc_path("net.ipv4.ping_group_range").unwrap(),
            PathBuf::from("net/ipv4/ping_group_range")
        );
        assert_eq!(
            proc_path("net.ipv4.conf.eth0/100.forwarding").unwrap(),
            PathBuf::from("net/ipv4/conf/eth0.100/forwarding")
        );
        for bad in [
            "",
            "net..x",
            "net./.x",
            "net.//.x",
            "net.ipv4/../../x",
            "net.a b",
            "net.\u{e9}",
            ".net",
        ] {
            let e = proc_path(bad).unwrap_err().to_string();
            assert!(e.contains("oci_spec.linux.sysctl"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn apply_writes_each_value_and_names_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        fs::write(dir.path().join("net/ipv4/ping_group_range"), "1 0").unwrap();
        let ok = vec![(
            "net.ipv4.ping_group_range".to_string(),
            "0 2147483647".to_string(),
        )];
        apply(dir.path(), &ok).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("net/ipv4/ping_group_range")).unwrap(),
            "0 2147483647"
        );
        let missing = vec![("net.nope.x".to_string(), "1".to_string())];
        let e = apply(dir.path(), &missing).unwrap_err().to_string();
        assert!(e.contains("net.nope.x") && e.contains("writing"), "{e}");
    }
}
