//! Boot-time vCPU state: general registers, segments from a boot GDT, identity page tables for
//! 64-bit entry, FPU and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

/// How the vCPU starts executing the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMode {
    /// 64-bit long mode with identity-mapped page tables (Linux 64-bit boot protocol and
    /// test programs): `rsi` points at `boot_params`.
    LongMode,
    /// 32-bit protected mode, paging off (PVH boot protocol): `rbx` points at
    /// `hvm_start_info`.
    Pvh,
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_LAPIC: {0}")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
    #[error("cannot write boot tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Builds a GDT descriptor from its fields (Intel SDM vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM view of the segment that GDT slot `index` describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // KVM takes the limit in bytes; with G set the descriptor counts 4 KiB units.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// The boot GDT for a mode: null, code, data, TSS.
pub fn boot_gdt(mode: BootMode) -> [u64; 4] {
    let code = match mode {
        // 64-bit code: L set, D clear.
        BootMode::LongMode => gdt_entry(0xa09b, 0, 0xfffff),
        // 32-bit flat code: D set.
        BootMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0xfffff),
    ]
}

/// Writes the identity page tables that map the first 4 GiB with 2 MiB pages.
pub fn setup_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    // PML4[0] -> PDPT, present + writable.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    for i in 0..4u64 {
        let pd = PDE_START + i * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + i * 8))?;
        for j in 0..512u64 {
            // present + writable + 2 MiB page.
            let addr = ((i * 512 + j) << 21) | 0x83;
            mem.write_obj(addr, GuestAddress(pd + j * 8))?;
        }
    }
    Ok(())
}

/// Sets the special registers for `mode`, writing the GDT, IDT and (for long mode) the page
/// tables into guest memory.
pub fn setup_sregs<M: GuestMemory>(
    mem: &M,
    vcpu: &VcpuFd,
    mode: BootMode,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    let gdt = boot_gdt(mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match mode {
        BootMode::LongMode => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootMode::Pvh => {
            // The PVH ABI: protected mode, paging off, flat segments.
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// Sets the general registers: entry point, stack and the boot-structure pointer the mode
/// passes (`rsi` for `boot_params`, `rbx` for `hvm_start_info`).
pub fn setup_regs(
    vcpu: &VcpuFd,
    mode: BootMode,
    entry: GuestAddress,
    boot_info: GuestAddress,
) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        // Bit 1 of RFLAGS is reserved and always set.
        rflags: 0x2,
        rip: entry.raw_value(),
        ..Default::default()
    };
    match mode {
        BootMode::LongMode => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot_info.raw_value();
        }
        BootMode::Pvh => {
            regs.rbx = boot_info.raw_value();
        }
    }
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// x87 and SSE in their reset state, as firmware would leave them.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b = |i: usize| regs.get(off + i).map_or(0, |&c| c as u8);
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, val: u32) {
    for (i, byte) in val.to_le_bytes().iter().enumerate() {
        if let Some(slot) = regs.get_mut(off + i) {
            *slot = *byte as std::os::raw::c_char;
        }
    }
}

/// Wires LINT0 to ExtINT (the 8259 PIC) and LINT1 to NMI, as a PC BIOS does: Linux relies on
/// it for the timer check and for legacy interrupts before the IOAPIC is set up.
pub fn setup_lints(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_segments_decode() {
        let gdt = boot_gdt(BootMode::LongMode);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.present, 1);
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!(ds.selector, 16);
        assert_eq!(ds.db, 1);
        assert_eq!(ds.type_, 3);
        let cs32 = segment_from_gdt(boot_gdt(BootMode::Pvh)[1], 1);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
        setup_page_tables(&mem).expect("page tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("read");
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).expect("read");
        assert_eq!(pdpte3, (PDE_START + 0x3000) | 3);
        // The last 2 MiB page below 4 GiB maps itself.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 0x3000 + 511 * 8))
            .expect("read");
        assert_eq!(last, (0xffe0_0000) | 0x83);
    }
}
