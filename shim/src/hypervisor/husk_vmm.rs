//! The `husk-vmm run` command line for a pod VM: the whole VM in one process
//! on KVM.

use std::{ffi::OsString, os::fd::AsRawFd, path::Path};

use super::{kernel_cmdline, Reboot, VmSpec};
use crate::network::format_mac;

/// Paths the husk-vmm process uses inside the VM's state directory.
pub struct HuskVmmPaths<'a> {
    /// The hybrid vsock socket the shim connects to the agent through.
    pub vsock_uds: &'a Path,
    pub api_sock: &'a Path,
    pub console_log: &'a Path,
}

/// Arguments for `husk-vmm`. The pod's tap, if any, is passed as an inherited
/// fd (the caller clears its close-on-exec flag).
pub fn args(spec: &VmSpec, paths: &HuskVmmPaths<'_>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["run".into()];
    let mut arg = |k: &str, v: OsString| {
        a.push(k.into());
        a.push(v);
    };
    arg("--kernel", spec.kernel.clone().into());
    arg("--initrd", spec.initrd.clone().into());
    arg("--cmdline", kernel_cmdline(spec, Reboot::Keyboard).into());
    arg("--vcpus", spec.vcpus.to_string().into());
    arg("--memory", spec.memory_mib.to_string().into());
    arg("--vsock-uds", paths.vsock_uds.into());
    arg("--guest-cid", spec.guest_cid.to_string().into());
    arg("--api-sock", paths.api_sock.into());
    arg("--console-log", paths.console_log.into());
    arg(
        "--console-log-max-bytes",
        spec.log_max_bytes.to_string().into(),
    );
    if let Some(share) = &spec.share {
        arg("--shared-dir", share.dir.clone().into());
        arg("--fs-tag", share.tag.clone().into());
    }
    if let Some(net) = &spec.network {
        arg("--net-tap-fd", net.tap.as_raw_fd().to_string().into());
        arg("--net-mac", format_mac(net.mac).into());
    }
    if spec.jail {
        a.push("--jail".into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Share;

    #[test]
    fn command_line_carries_the_guest_devices_and_sockets() {
        let mut s = VmSpec::new(
            "t1",
            "/k/vmlinux".into(),
            "/k/initrd.img".into(),
            "/run/husk/t1".into(),
        );
        s.vcpus = 2;
        s.memory_mib = 512;
        s.extra_cmdline = "husk.log=debug".into();
        s.share = Some(Share {
            dir: "/run/husk/t1/shared".into(),
            tag: "husk-share".into(),
        });
        let a: Vec<String> = args(
            &s,
            &HuskVmmPaths {
                vsock_uds: Path::new("/run/husk/t1/vm/vsock.sock"),
                api_sock: Path::new("/run/husk/t1/vm/api.sock"),
                console_log: Path::new("/run/husk/t1/vm/console.log"),
            },
        )
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
        let joined = a.join(" ");
        assert_eq!(a[0], "run");
        for want in [
            "--kernel /k/vmlinux",
            "--initrd /k/initrd.img",
            "--vcpus 2",
            "--memory 512",
            "--vsock-uds /run/husk/t1/vm/vsock.sock",
            "--guest-cid 3",
            "--api-sock /run/husk/t1/vm/api.sock",
            "--console-log /run/husk/t1/vm/console.log",
            "--shared-dir /run/husk/t1/shared --fs-tag husk-share",
        ] {
            assert!(joined.contains(want), "{want:?} missing in {joined}");
        }
        let cmdline = &a[a.iter().position(|x| x == "--cmdline").unwrap() + 1];
        assert!(
            cmdline.contains("reboot=k") && cmdline.contains("husk.log=debug"),
            "{cmdline}"
        );
        assert!(!joined.contains("--net-tap-fd"), "no network, no tap");
        assert_eq!(a.last().map(String::as_str), Some("--jail"));
        s.jail = false;
        let paths = HuskVmmPaths {
            vsock_uds: Path::new("/v"),
            api_sock: Path::new("/a"),
            console_log: Path::new("/c"),
        };
        assert!(!args(&s, &paths).contains(&"--jail".into()));
    }
}
