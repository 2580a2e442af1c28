//! The MSRs a vCPU gets at boot: the values a BIOS would leave behind that Linux relies on.

use kvm_bindings::{kvm_msr_entry, Msrs};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// `IA32_MISC_ENABLE.FAST_STRING`: BIOSes enable it and Linux warns when it is off.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs on, default memory type write-back: without it Linux maps all RAM uncached.
const MTRR_ENABLE_WB_DEFAULT: u64 = (1 << 11) | 6;

/// The boot MSR values.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB_DEFAULT),
    ]
}

/// The boot MSRs as the KVM_SET_MSRS argument.
pub fn boot_msr_list() -> Result<Msrs, vmm_sys_util::fam::Error> {
    Msrs::from_entries(&boot_msrs())
}
