//! The QEMU command line for a pod VM.

use std::{ffi::OsString, os::fd::AsRawFd, path::Path};

use super::{kernel_cmdline, Accel, Reboot, VmSpec};
use crate::network::format_mac;

/// Paths the QEMU process uses inside the VM's state directory.
pub struct QemuPaths<'a> {
    pub vhost_vsock_socket: &'a Path,
    /// husk-vmm's vhost-user-fs socket, when the VM has a share.
    pub vhost_fs_socket: Option<&'a Path>,
    /// The shim's listener for the serial console (QEMU connects at start).
    pub console_sock: &'a Path,
}

/// QEMU's `-sandbox` setting (every group it can deny, denied).
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Arguments for `qemu-system-x86_64`.
pub fn args(spec: &VmSpec, accel: Accel, paths: &QemuPaths<'_>) -> Vec<OsString> {
    let mem = spec.memory_mib;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: String| a.push(s.into());
    push("-name".into());
    push(format!("husk-{},debug-threads=on", spec.id));
    // Guest RAM must be a shareable memfd so the vhost-user backend (husk-vmm)
    // can map it. No ACPI: devices are announced on the kernel command line,
    // which QEMU's microvm adds itself.
    push("-M".into());
    push("microvm,memory-backend=mem,acpi=off,x-option-roms=off".into());
    push("-object".into());
    push(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"));
    push("-m".into());
    push(format!("{mem}M"));
    push("-smp".into());
    push(spec.vcpus.to_string());
    match accel {
        Accel::Kvm => {
            push("-accel".into());
            push("kvm".into());
            push("-cpu".into());
            push("host".into());
        }
        Accel::Tcg => {
            push("-accel".into());
            push("tcg".into());
            push("-cpu".into());
            push("max".into());
        }
    }
    for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
        push(flag.into());
    }
    // QEMU's own seccomp filter: a device-emulation bug the guest exploits
    // cannot exec, fork, raise privileges, change scheduling or resource
    // limits, or use obsolete syscalls. Everything QEMU needs is set up
    // before the filter goes on.
    push("-sandbox".into());
    push(QEMU_SANDBOX.into());
    // The console goes to the shim, which caps the file it lands in: QEMU's
    // own file: backend would grow without bound with a chatty guest.
    push("-chardev".into());
    a.push(prefixed("socket,id=con0,path=", paths.console_sock));
    let mut push = |s: String| a.push(s.into());
    push("-serial".into());
    push("chardev:con0".into());
    push("-kernel".into());
    a.push(spec.kernel.clone().into());
    a.push("-initrd".into());
    a.push(spec.initrd.clone().into());
    a.push("-append".into());
    a.push(kernel_cmdline(spec, Reboot::TripleFault).into());
    a.push("-chardev".into());
    let mut chardev = OsString::from("socket,id=vsock0,path=");
    chardev.push(paths.vhost_vsock_socket);
    a.push(chardev);
    a.push("-device".into());
    a.push("vhost-user-vsock-device,chardev=vsock0".into());
    if let (Some(socket), Some(share)) = (paths.vhost_fs_socket, &spec.share) {
        a.push("-chardev".into());
        a.push(prefixed("socket,id=fs0,path=", socket));
        a.push("-device".into());
        a.push(format!("vhost-user-fs-device,chardev=fs0,tag={}", share.tag).into());
    }
    if let Some(net) = &spec.network {
        // QEMU's own tap backend on the inherited fd: vhost-user-net does not
        // work with QEMU 7.2's microvm, and there is no /dev/vhost-net here
        // (vhost=off). With fd= QEMU reads the vnet header setting from the
        // tap itself (IFF_VNET_HDR) and refuses a vnet_hdr= option.
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,fd={},vhost=off", net.tap.as_raw_fd()).into());
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={}", format_mac(net.mac)).into());
    }
    a
}

fn prefixed(prefix: &str, p: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(p);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec() -> VmSpec {
        let mut s = VmSpec::new(
            "t1",
            "/k/vmlinux".into(),
            "/k/initrd.img".into(),
            "/run/husk/t1".into(),
        );
        s.vcpus = 2;
        s.memory_mib = 128;
        s
    }

    #[test]
    fn command_line_carries_memory_cpus_and_devices() {
        let vhost = PathBuf::from("/run/husk/t1/vsock.vhost");
        let console = PathBuf::from("/run/husk/t1/console.sock");
        let a: Vec<String> = args(
            &spec(),
            Accel::Tcg,
            &QemuPaths {
                vhost_vsock_socket: &vhost,
                vhost_fs_socket: None,
                console_sock: &console,
            },
        )
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
        let joined = a.join(" ");
        assert!(
            joined.contains("memory-backend-memfd,id=mem,size=128M,share=on"),
            "{joined}"
        );
        assert!(joined.contains("-smp 2"), "{joined}");
        assert!(joined.contains("-accel tcg -cpu max"), "{joined}");
        assert!(
            joined.contains(
                "-chardev socket,id=con0,path=/run/husk/t1/console.sock -serial chardev:con0"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("socket,id=vsock0,path=/run/husk/t1/vsock.vhost"),
            "{joined}"
        );
        assert!(joined.contains("-no-reboot"), "{joined}");
        assert!(
            joined.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{joined}"
        );
        let kvm = args(
            &spec(),
            Accel::Kvm,
            &QemuPaths {
                vhost_vsock_socket: &vhost,
                vhost_fs_socket: None,
                console_sock: &console,
            },
        );
        assert!(kvm.iter().any(|s| s == "host"));
        assert!(
            !joined.contains("vhost-user-fs"),
            "no share, no fs device: {joined}"
        );

        let mut shared = spec();
        shared.share = Some(crate::hypervisor::Share {
            dir: "/run/husk/t1/shared".into(),
            tag: "husk".into(),
        });
        let fs_sock = PathBuf::from("/run/husk/t1/fs.vhost");
        let joined: String = args(
            &shared,
            Accel::Tcg,
            &QemuPaths {
                vhost_vsock_socket: &vhost,
                vhost_fs_socket: Some(&fs_sock),
                console_sock: &console,
            },
        )
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
        assert!(joined.contains("-chardev socket,id=fs0,path=/run/husk/t1/fs.vhost -device vhost-user-fs-device,chardev=fs0,tag=husk"), "{joined}");
    }

    #[test]
    fn network_adds_a_tap_netdev_with_the_pod_mac() {
        let vhost = PathBuf::from("/run/husk/t1/vsock.vhost");
        let console = PathBuf::from("/run/husk/t1/console.sock");
        let paths = QemuPaths {
            vhost_vsock_socket: &vhost,
            vhost_fs_socket: None,
            console_sock: &console,
        };
        let joined = |s: &VmSpec| {
            args(s, Accel::Tcg, &paths)
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(!joined(&spec()).contains("-netdev"));
        let tap: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let fd = tap.as_raw_fd();
        let mut s = spec();
        s.network = Some(crate::hypervisor::NetDevice {
            tap: std::sync::Arc::new(tap),
            mac: [0x0a, 0x58, 0x0a, 0xcb, 0x01, 0x05],
        });
        let j = joined(&s);
        assert!(
            j.contains(&format!(
                "-netdev tap,id=net0,fd={fd},vhost=off -device virtio-net-device,netdev=net0,mac=0a:58:0a:cb:01:05"
            )),
            "{j}"
        );
    }

    #[test]
    fn cmdline_has_power_off_and_log_port() {
        let mut s = spec();
        s.extra_cmdline = " husk.log=debug ".into();
        let c = kernel_cmdline(&s, Reboot::TripleFault);
        assert!(c.starts_with("console=ttyS0 reboot=t panic=-1"), "{c}");
        assert!(c.contains("husk.log_port=1025"), "{c}");
        assert!(c.ends_with(" husk.log=debug"), "{c}");
        s.agent_log_port = None;
        assert!(!kernel_cmdline(&s, Reboot::TripleFault).contains("log_port"));
    }
}
