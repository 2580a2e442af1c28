//! What this host's KVM can do.
//!
//! `/dev/kvm` alone does not mean a stock Linux guest can run: on a nested
//! PVM host (the `kvm_pvm` module, no VMX/SVM in the CPU flags) KVM runs guest
//! kernel code through its instruction emulator, which is far slower than
//! QEMU's TCG and fails on common instructions. Only hardware virtualization
//! counts as "KVM usable".

use std::{fs, path::Path};

/// The host's virtualization, with the reason in words for logs and errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVirt {
    pub kvm_usable: bool,
    pub reason: String,
}

/// Probes the running host.
pub fn detect() -> HostVirt {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    classify(
        &cpuinfo,
        kvm_dev.map_err(|e| e.to_string()),
        Path::new("/sys/module/kvm_pvm").exists(),
    )
}

/// The decision, separated from the probing so it can be tested.
pub fn classify(cpuinfo: &str, kvm_dev: Result<fs::File, String>, pvm_loaded: bool) -> HostVirt {
    let no = |reason: String| HostVirt {
        kvm_usable: false,
        reason,
    };
    if let Err(e) = kvm_dev {
        return no(format!("/dev/kvm cannot be opened ({e})"));
    }
    if pvm_loaded {
        return no(
            "/dev/kvm is the nested PVM hypervisor (kvm_pvm), which cannot run a stock Linux guest"
                .into(),
        );
    }
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find(|f| *f == "vmx" || *f == "svm");
    match hw {
        Some(flag) => HostVirt {
            kvm_usable: true,
            reason: format!("/dev/kvm with hardware virtualization ({flag})"),
        },
        None => no(
            "the CPU flags show neither vmx nor svm: KVM would emulate the guest in software"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm() -> Result<fs::File, String> {
        // Any open file stands in for /dev/kvm: only success or failure matters.
        fs::File::open("/proc/self/status").map_err(|e| e.to_string())
    }

    #[test]
    fn hardware_flags_make_kvm_usable() {
        let v = classify("processor: 0\nflags\t: fpu vmx sse\n", kvm(), false);
        assert!(v.kvm_usable, "{v:?}");
        assert!(v.reason.contains("vmx"));
        assert!(classify("flags : svm\n", kvm(), false).kvm_usable);
    }

    #[test]
    fn pvm_missing_device_or_flags_fall_back() {
        assert!(!classify("flags : vmx\n", kvm(), true).kvm_usable);
        assert!(!classify("flags : fpu sse\n", kvm(), false).kvm_usable);
        let v = classify("flags : vmx\n", Err("No such file".into()), false);
        assert!(!v.kvm_usable && v.reason.contains("/dev/kvm"), "{v:?}");
    }
}
