//! Which program runs a pod VM, and how: husk-vmm where the host's KVM can run a
//! stock guest, QEMU with TCG elsewhere, as the configuration allows.

use super::{
    detect, pod_vm::LaunchError, Accel, AccelChoice, Hypervisor, HypervisorChoice, VmSpec,
};

/// The hypervisor and accelerator a launch of `spec` uses on this host, and
/// what the host's KVM can do (for logs).
pub fn select(spec: &VmSpec) -> Result<(Hypervisor, Accel, String), LaunchError> {
    let host = detect::detect();
    let (h, a) = choose(spec.hypervisor, spec.accel, host.kvm_usable).map_err(|e| match e {
        Choice::NeedsKvm(what) => LaunchError::KvmUnavailable(format!("{what}: {}", host.reason)),
        Choice::Invalid(m) => LaunchError::InvalidSpec(m),
    })?;
    Ok((h, a, host.reason))
}

/// Why a hypervisor/accelerator pair cannot be used.
#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// This choice needs KVM that can run a stock guest.
    NeedsKvm(&'static str),
    Invalid(String),
}

/// Which program runs the VM, and how. `Auto` takes husk-vmm where KVM can
/// run a stock guest (it starts faster and leaner than QEMU), QEMU with TCG
/// elsewhere; husk-vmm has no emulator, so it never takes TCG.
fn choose(
    hypervisor: HypervisorChoice,
    accel: AccelChoice,
    kvm_usable: bool,
) -> Result<(Hypervisor, Accel), Choice> {
    use AccelChoice as A;
    use HypervisorChoice as H;
    match (hypervisor, accel, kvm_usable) {
        (H::HuskVmm, A::Tcg, _) => Err(Choice::Invalid(
            "hypervisor husk-vmm runs on KVM only; accel tcg needs hypervisor qemu".into(),
        )),
        (H::HuskVmm, _, false) => Err(Choice::NeedsKvm("husk-vmm needs KVM")),
        (H::HuskVmm, _, true) | (H::Auto, A::Auto | A::Kvm, true) => {
            Ok((Hypervisor::HuskVmm, Accel::Kvm))
        }
        (H::Auto | H::Qemu, A::Kvm, false) => Err(Choice::NeedsKvm("accel kvm was requested")),
        (H::Qemu, A::Auto | A::Kvm, true) => Ok((Hypervisor::Qemu, Accel::Kvm)),
        (H::Auto | H::Qemu, A::Tcg, _) | (H::Auto | H::Qemu, A::Auto, false) => {
            Ok((Hypervisor::Qemu, Accel::Tcg))
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: an unwrap is the assertion that the step worked.
    use super::*;

    #[test]
    fn auto_takes_husk_vmm_on_kvm_and_qemu_tcg_elsewhere() {
        use AccelChoice as A;
        use HypervisorChoice as H;
        let ok = |h, a, k| choose(h, a, k).unwrap();
        assert_eq!(
            ok(H::Auto, A::Auto, true),
            (Hypervisor::HuskVmm, Accel::Kvm)
        );
        assert_eq!(ok(H::Auto, A::Auto, false), (Hypervisor::Qemu, Accel::Tcg));
        assert_eq!(ok(H::Auto, A::Tcg, true), (Hypervisor::Qemu, Accel::Tcg));
        assert_eq!(ok(H::Qemu, A::Auto, true), (Hypervisor::Qemu, Accel::Kvm));
        assert_eq!(ok(H::Qemu, A::Auto, false), (Hypervisor::Qemu, Accel::Tcg));
        assert_eq!(
            ok(H::HuskVmm, A::Kvm, true),
            (Hypervisor::HuskVmm, Accel::Kvm)
        );
        assert_eq!(
            choose(H::HuskVmm, A::Auto, false),
            Err(Choice::NeedsKvm("husk-vmm needs KVM"))
        );
        assert!(
            matches!(choose(H::HuskVmm, A::Tcg, true), Err(Choice::Invalid(m)) if m.contains("tcg"))
        );
        assert!(matches!(
            choose(H::Qemu, A::Kvm, false),
            Err(Choice::NeedsKvm(_))
        ));
    }
}
