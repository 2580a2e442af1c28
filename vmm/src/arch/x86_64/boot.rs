//! Boot parameters: the e820 memory map and the structures that hand it, the command line and
//! the initrd to the kernel, for both direct-boot protocols husk-vmm speaks:
//!
//! - the Linux boot protocol (`Documentation/arch/x86/boot.rst`): a `struct boot_params`
//!   ("zero page") for a bzImage or an ELF vmlinux entered in 64-bit mode;
//! - PVH (`xen/include/public/arch-x86/hvm/start_info.h`): an `hvm_start_info` with a memory
//!   map and one module (the initrd), for an ELF vmlinux with a PVH entry note.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{
    memory_regions, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
    ZERO_PAGE_START,
};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// `boot_params` holds at most this many e820 entries.
const E820_MAX: usize = 128;
/// "HdrS": a setup header is present.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Boot loader type "undefined" (0xff): we have no registered id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Linux's default kernel alignment (CONFIG_PHYSICAL_ALIGN).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot write {what} to guest memory: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("too many e820 entries ({0})")]
    TooManyE820Entries(usize),
    #[error("{what} at {addr:#x} does not fit the 32-bit field the boot protocol has for it")]
    Above4G { what: &'static str, addr: u64 },
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map for `mem_size` bytes of RAM: low memory up to the MP table, the MP table's
/// KiB reserved, the legacy hole (VGA and BIOS area, 640 KiB to 1 MiB) left out, then RAM up
/// to the MMIO hole and above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa_0000 - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in memory_regions(mem_size) {
        let (start, end) = (start.max(HIMEM_START), start + size);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where an initrd and a command line are in guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInputs {
    pub cmdline_addr: u64,
    /// Length of the command line without its NUL.
    pub cmdline_len: u32,
    /// `(address, size)` of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
}

fn write_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::Write { what, source }
}

fn low32(what: &'static str, addr: u64) -> Result<u32, BootError> {
    u32::try_from(addr).map_err(|_| BootError::Above4G { what, addr })
}

/// Writes the Linux zero page at [`ZERO_PAGE_START`]. `header` is the bzImage's setup header,
/// or `None` for an ELF vmlinux (then a minimal header is made up).
pub fn write_boot_params<M: GuestMemory>(
    mem: &M,
    header: Option<setup_header>,
    inputs: &BootInputs,
    mem_size: u64,
) -> Result<GuestAddress, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.cmd_line_ptr = low32("the command line", inputs.cmdline_addr)?;
    params.hdr.cmdline_size = inputs.cmdline_len;
    if let Some((addr, size)) = inputs.initrd {
        params.hdr.ramdisk_image = low32("the initrd", addr)?;
        params.hdr.ramdisk_size = low32("the initrd size", size)?;
    }
    let map = e820_map(mem_size);
    if map.len() > E820_MAX {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    let at = GuestAddress(ZERO_PAGE_START);
    mem.write_obj(params, at)
        .map_err(write_err("boot_params"))?;
    Ok(at)
}

/// Writes the PVH `hvm_start_info` (version 1, with the memory map) at [`PVH_INFO_START`].
pub fn write_pvh_start_info<M: GuestMemory>(
    mem: &M,
    inputs: &BootInputs,
    mem_size: u64,
) -> Result<GuestAddress, BootError> {
    let map = e820_map(mem_size);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: inputs.cmdline_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = inputs.initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(write_err("the PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(PVH_MEMMAP_START + i as u64 * entry_size),
        )
        .map_err(write_err("the PVH memory map"))?;
    }
    let at = GuestAddress(PVH_INFO_START);
    mem.write_obj(info, at)
        .map_err(write_err("hvm_start_info"))?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::{MMIO_GAP_END, MMIO_GAP_START};
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("guest memory")
    }

    #[test]
    fn e820_small_and_large() {
        let small = e820_map(128 << 20);
        assert_eq!(small.len(), 3);
        assert_eq!(
            small[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(small[1].kind, E820_RESERVED);
        assert_eq!(
            small[2],
            E820Entry {
                addr: HIMEM_START,
                size: (128 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
        let big = e820_map(5 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, MMIO_GAP_START);
        assert_eq!(big[3].addr, MMIO_GAP_END);
        assert_eq!(big[3].size, (5 << 30) - MMIO_GAP_START);
    }

    #[test]
    fn zero_page_has_cmdline_initrd_and_e820() {
        let mem = mem();
        let inputs = BootInputs {
            cmdline_addr: 0x2_0000,
            cmdline_len: 13,
            initrd: Some((0x700_0000, 0x1234)),
        };
        let at = write_boot_params(&mem, None, &inputs, 128 << 20).expect("boot params");
        let p: boot_params = mem.read_obj(at).expect("read");
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ p.hdr.cmdline_size }, 13);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let mem = mem();
        let hdr = setup_header {
            setup_sects: 27,
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let at = write_boot_params(&mem, Some(hdr), &BootInputs::default(), 64 << 20)
            .expect("boot params");
        let p: boot_params = mem.read_obj(at).expect("read");
        assert_eq!(p.hdr.setup_sects, 27);
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!(p.hdr.type_of_loader, KERNEL_LOADER_OTHER);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn pvh_start_info_has_memmap_and_module() {
        let mem = mem();
        let inputs = BootInputs {
            cmdline_addr: 0x2_0000,
            cmdline_len: 5,
            initrd: Some((0x800_0000, 4096)),
        };
        let at = write_pvh_start_info(&mem, &inputs, 256 << 20).expect("start info");
        let info: hvm_start_info = mem.read_obj(at).expect("read");
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, 0x2_0000);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        let module: hvm_modlist_entry = mem
            .read_obj(GuestAddress(info.modlist_paddr))
            .expect("read");
        assert_eq!((module.paddr, module.size), (0x800_0000, 4096));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .expect("read");
        assert_eq!(last.addr, HIMEM_START);
        assert_eq!(last.size, (256 << 20) - HIMEM_START);
        assert_eq!(last.type_, E820_RAM);
        // The memory map must not run into the start info's neighbours.
        const { assert!(PVH_MEMMAP_START + 8 * 24 <= ZERO_PAGE_START) };
    }
}
