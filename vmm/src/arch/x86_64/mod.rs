//! x86_64: guest memory layout, CPUID, MSRs, boot registers, boot parameters and the MP table.
//!
//! The layout follows what a directly booted Linux expects from a PC without firmware: the
//! first MiB holds the boot structures (GDT, page tables, zero page / PVH start info,
//! command line, MP table), the kernel goes at 1 MiB or its own physical address, and the
//! 3-4 GiB hole is left for MMIO (virtio-mmio devices, the IOAPIC and the local APICs).

pub mod boot;
pub mod cpuid;
pub mod mptable;
pub mod msrs;
pub mod regs;

/// Where the boot GDT lives (4 entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) boot IDT lives: any exception before the kernel loads its own IDT is a
/// triple fault, which ends the VM instead of running off into garbage.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry (Linux sets up its own right away).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for 64-bit entry: one PML4, one PDPT, four page directories
/// with 2 MiB pages, so the whole first 4 GiB (RAM below the hole and the MMIO hole) is mapped.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Linux's x86 `COMMAND_LINE_SIZE`.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of usable low memory: the MP table sits in the last KiB below 640 KiB, where Linux
/// looks for it (the "EBDA"), and that KiB is reported reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of "high" memory, where kernels and everything big go.
pub const HIMEM_START: u64 = 0x10_0000;
/// The MMIO hole below 4 GiB: guest RAM skips it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI for virtio-mmio devices (below are the ISA legacy ones: 4 is COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last GSI the IOAPIC has (24 pins).
pub const IRQ_MAX: u32 = 23;
/// KVM on Intel needs three pages for the real-mode TSS and one for the EPT identity map;
/// both go at the top of the hole, where no device lives.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 controller's data and command/status ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// The guest-physical RAM regions for `mem_size` bytes of guest memory: one below the MMIO
/// hole and, for big guests, one above 4 GiB.
pub fn memory_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_hole() {
        assert_eq!(memory_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(memory_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            memory_regions(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
