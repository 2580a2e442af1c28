//! The CPUID a vCPU reports: what KVM supports on this host, filtered so the guest sees a
//! consistent virtual CPU (its own APIC id and topology, a hypervisor, no host power or
//! performance-monitoring details).

use kvm_bindings::CpuId;

/// CPUID leaf 1 ECX bit 31: "running under a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 ECX bit 24: TSC-deadline timer, which KVM's in-kernel LAPIC emulates.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID leaf 1 EDX bit 28: HTT, "EBX[23:16] is valid".
const EDX_HTT: u32 = 1 << 28;

/// Adjusts the host-supported CPUID for vCPU `cpu_id` of `cpu_count`.
///
/// Topology: every vCPU is one core of one package with one thread per core, so APIC ids are
/// the vCPU indices, which is what the MP table says too.
pub fn filter_cpuid(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            0x1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package,
                // EBX[15:8] CLFLUSH line size in quadwords (64 bytes).
                entry.ebx = (u32::from(cpu_id) << 24) | (u32::from(cpu_count) << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1; keep the cache description.
                entry.eax &= 0x03ff_ffff;
                entry.eax |= (u32::from(cpu_count.saturating_sub(1)) & 0x3f) << 26;
            }
            0x6 => {
                // Thermal and power management are the host's business.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xa => {
                // No architectural PMU: the guest has no use for host counters.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 is SMT (1 thread), level 1 is core.
                entry.edx = u32::from(cpu_id);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = bits_for(cpu_count);
                        entry.ebx = u32::from(cpu_count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Number of APIC-id bits needed for `count` cores.
fn bits_for(count: u8) -> u32 {
    let count = u32::from(count.max(1));
    32 - (count - 1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn sets_apic_id_and_topology() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(6, 0), entry(0xb, 0), entry(0xb, 1)])
                .expect("cpuid");
        filter_cpuid(&mut cpuid, 2, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].eax, 0);
        assert_eq!(e[2].edx, 2);
        assert_eq!(e[3].eax, 2);
        assert_eq!(e[3].ebx, 4);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(3), 2);
    }
}
