//! Loading what the guest boots: an ELF vmlinux (PVH entry if its note has one, else the
//! 64-bit Linux entry), a bzImage (64-bit entry of the Linux boot protocol), or a raw
//! 64-bit program (tests, the bench); plus the command line, the initrd and the boot
//! parameters that point at them.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, ReadVolatile};

use crate::arch::x86_64::boot::{self, BootInputs};
use crate::arch::x86_64::regs::BootMode;
use crate::arch::x86_64::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use crate::vstate::vcpu::BootEntry;

/// The bzImage's 64-bit entry point is 0x200 past where its protected-mode code is loaded.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "not a kernel husk-vmm can boot (neither ELF nor bzImage): ELF: {elf}; bzImage: {bzimage}"
    )]
    UnknownFormat {
        elf: loader::Error,
        bzimage: loader::Error,
    },
    #[error("cannot load the kernel: {0}")]
    Kernel(#[source] loader::Error),
    #[error("cannot read the kernel file: {0}")]
    Io(#[source] std::io::Error),
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("initrd of {size} bytes does not fit in guest memory above the kernel (ends at {kernel_end:#x}); add memory")]
    InitrdTooBig { size: u64, kernel_end: u64 },
    #[error("cannot read the initrd into guest memory: {0}")]
    InitrdRead(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("program of {len} bytes at {addr:#x} does not fit in guest memory")]
    Program { addr: u64, len: usize },
}

/// What the kernel loader found.
#[derive(Clone, Copy, Debug)]
struct LoadedKernel {
    mode: BootMode,
    entry: GuestAddress,
    end: u64,
    header: Option<setup_header>,
}

fn load_kernel_image(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
) -> Result<LoadedKernel, LoaderError> {
    let elf_err = match Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))) {
        Ok(res) => {
            let (mode, entry) = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (BootMode::Pvh, addr),
                _ => (BootMode::LongMode, res.kernel_load),
            };
            return Ok(LoadedKernel {
                mode,
                entry,
                end: res.kernel_end,
                header: None,
            });
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)
        }
        // An ELF that fails to load is an error in itself, not a bzImage.
        Err(e) => return Err(LoaderError::Kernel(e)),
    };
    kernel.seek(SeekFrom::Start(0)).map_err(LoaderError::Io)?;
    match BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))) {
        Ok(res) => Ok(LoadedKernel {
            mode: BootMode::LongMode,
            entry: res
                .kernel_load
                .checked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
                .ok_or(LoaderError::Kernel(loader::Error::MemoryOverflow))?,
            end: res.kernel_end,
            header: res.setup_header,
        }),
        Err(bzimage) => Err(LoaderError::UnknownFormat {
            elf: elf_err,
            bzimage,
        }),
    }
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`]; returns its length.
pub fn load_cmdline<M: GuestMemory>(mem: &M, cmdline: &str) -> Result<u32, LoaderError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(LoaderError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(LoaderError::CmdlineNul);
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;
    Ok(cmdline.len() as u32)
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible in the RAM below
/// the MMIO hole (and below `addr_max`), above `kernel_end`.
pub fn initrd_address(mem_size: u64, size: u64, kernel_end: u64, addr_max: u64) -> Option<u64> {
    let top = mem_size.min(MMIO_GAP_START).min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: &mut File,
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Result<(u64, u64), LoaderError> {
    let size = initrd.seek(SeekFrom::End(0)).map_err(LoaderError::Io)?;
    initrd.seek(SeekFrom::Start(0)).map_err(LoaderError::Io)?;
    // bzImages say how high their initrd may go; PVH and ELF kernels take any address.
    let addr_max = header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(u64::MAX);
    let addr = initrd_address(mem_size, size, kernel_end, addr_max)
        .ok_or(LoaderError::InitrdTooBig { size, kernel_end })?;
    let len = usize::try_from(size).map_err(|_| LoaderError::InitrdTooBig { size, kernel_end })?;
    read_into(mem, GuestAddress(addr), initrd, len).map_err(LoaderError::InitrdRead)?;
    Ok((addr, size))
}

fn read_into<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    src: &mut F,
    len: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.read_exact_volatile_from(addr, src, len)
}

/// Loads a kernel, its initrd and command line, writes the boot parameters, and returns how
/// the boot vCPU must start.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
) -> Result<BootEntry, LoaderError> {
    let k = load_kernel_image(mem, kernel)?;
    let cmdline_len = load_cmdline(mem, cmdline)?;
    let initrd = match initrd {
        Some(f) => Some(load_initrd(mem, mem_size, f, k.end, k.header.as_ref())?),
        None => None,
    };
    let inputs = BootInputs {
        cmdline_addr: CMDLINE_START,
        cmdline_len,
        initrd,
    };
    let boot_info = match k.mode {
        BootMode::Pvh => boot::write_pvh_start_info(mem, &inputs, mem_size)?,
        BootMode::LongMode => boot::write_boot_params(mem, k.header, &inputs, mem_size)?,
    };
    Ok(BootEntry {
        mode: k.mode,
        entry: k.entry,
        boot_info,
    })
}

/// Loads a raw 64-bit program at `addr` and enters it in long mode (identity-mapped low
/// 4 GiB, `rsi` at a zero page with the e820 map).
pub fn load_program(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    code: &[u8],
    addr: u64,
) -> Result<BootEntry, LoaderError> {
    let fits = addr
        .checked_add(code.len() as u64)
        .is_some_and(|end| end <= mem_size.min(MMIO_GAP_START));
    if !fits {
        return Err(LoaderError::Program {
            addr,
            len: code.len(),
        });
    }
    mem.write_slice(code, GuestAddress(addr))?;
    let boot_info = boot::write_boot_params(mem, None, &BootInputs::default(), mem_size)?;
    Ok(BootEntry {
        mode: BootMode::LongMode,
        entry: GuestAddress(addr),
        boot_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::hvm_start_info;
    use std::io::Write;

    const MEM: u64 = 64 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory")
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(bytes).expect("write");
        f.seek(SeekFrom::Start(0)).expect("seek");
        f
    }

    /// A minimal x86_64 ELF: one PT_LOAD of `code` at `paddr`, and optionally a PT_NOTE with
    /// a Xen PHYS32_ENTRY note pointing at `pvh_entry`.
    fn tiny_elf(code: &[u8], paddr: u64, pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let ehsize = 64u64;
        let phentsize = 56u64;
        let data_off = ehsize + phentsize * u64::from(phnum);
        let mut note = Vec::new();
        if let Some(entry) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
            note.extend_from_slice(&4u32.to_le_bytes()); // descsz
            note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
        }
        let code_off = data_off + note.len() as u64;
        let mut out = Vec::new();
        out.extend_from_slice(b"\x7fELF");
        out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes()); // e_entry
        out.extend_from_slice(&ehsize.to_le_bytes()); // e_phoff
        out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        out.extend_from_slice(&(ehsize as u16).to_le_bytes());
        out.extend_from_slice(&(phentsize as u16).to_le_bytes());
        out.extend_from_slice(&phnum.to_le_bytes());
        out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        let phdr = |out: &mut Vec<u8>, p_type: u32, off: u64, addr: u64, size: u64| {
            out.extend_from_slice(&p_type.to_le_bytes());
            out.extend_from_slice(&5u32.to_le_bytes()); // R+X
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&4u64.to_le_bytes());
        };
        phdr(&mut out, 1, code_off, paddr, code.len() as u64);
        if pvh_entry.is_some() {
            phdr(&mut out, 4, data_off, 0, note.len() as u64);
        }
        out.extend_from_slice(&note);
        out.extend_from_slice(code);
        out
    }

    #[test]
    fn elf_with_pvh_note_boots_pvh() {
        let mem = mem();
        let code = [0xf4u8; 32];
        let mut kernel = file_with(&tiny_elf(&code, 0x100_0000, Some(0x100_0010)));
        let mut initrd = file_with(&[0xabu8; 5000]);
        let entry =
            load_linux(&mem, MEM, &mut kernel, Some(&mut initrd), "console=ttyS0").expect("load");
        assert_eq!(entry.mode, BootMode::Pvh);
        assert_eq!(entry.entry, GuestAddress(0x100_0010));
        let mut loaded = [0u8; 32];
        mem.read_slice(&mut loaded, GuestAddress(0x100_0000))
            .expect("read");
        assert_eq!(loaded, code);
        let info: hvm_start_info = mem.read_obj(entry.boot_info).expect("read");
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .expect("read");
        assert_eq!(&cmdline, b"console=ttyS0\0");
        assert_eq!(info.nr_modules, 1);
        // The initrd is page-aligned at the top of RAM.
        let expected = (MEM - 5000) & !4095;
        let first: u8 = mem.read_obj(GuestAddress(expected)).expect("read");
        assert_eq!(first, 0xab);
    }

    #[test]
    fn elf_without_note_boots_64bit() {
        let mem = mem();
        let mut kernel = file_with(&tiny_elf(&[0x90; 16], 0x20_0000, None));
        let entry = load_linux(&mem, MEM, &mut kernel, None, "").expect("load");
        assert_eq!(entry.mode, BootMode::LongMode);
        assert_eq!(entry.entry, GuestAddress(0x20_0000));
        let params: boot_params = mem.read_obj(entry.boot_info).expect("read");
        assert_eq!({ params.hdr.cmd_line_ptr } as u64, CMDLINE_START);
        assert_eq!({ params.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn bzimage_boots_64bit_entry() {
        let mem = mem();
        // One setup sector after the boot sector, then the "protected-mode kernel".
        let mut image = vec![0u8; 1024];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe] = 0x55;
        image[0x1ff] = 0xaa;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        image.extend_from_slice(&[0xccu8; 4096]);
        let mut kernel = file_with(&image);
        let mut initrd = file_with(&[1u8; 100]);
        let entry = load_linux(&mem, MEM, &mut kernel, Some(&mut initrd), "quiet").expect("load");
        assert_eq!(entry.mode, BootMode::LongMode);
        assert_eq!(entry.entry, GuestAddress(0x10_0200));
        let byte: u8 = mem.read_obj(GuestAddress(0x10_0000)).expect("read");
        assert_eq!(byte, 0xcc);
        let params: boot_params = mem.read_obj(entry.boot_info).expect("read");
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.cmdline_size }, 5);
        assert_eq!({ params.hdr.ramdisk_size }, 100);
        assert_eq!({ params.hdr.ramdisk_image } as u64, (MEM - 100) & !4095);
    }

    #[test]
    fn garbage_and_limits_are_errors() {
        let mem = mem();
        let mut junk = file_with(&[0x11u8; 4096]);
        let err = load_linux(&mem, MEM, &mut junk, None, "").expect_err("junk");
        assert!(matches!(err, LoaderError::UnknownFormat { .. }), "{err}");
        assert!(load_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
        assert!(load_cmdline(&mem, "a\0b").is_err());
        assert_eq!(
            initrd_address(64 << 20, 4096, 1 << 20, u64::MAX),
            Some((64 << 20) - 4096)
        );
        assert_eq!(initrd_address(64 << 20, 63 << 20, 2 << 20, u64::MAX), None);
        assert_eq!(
            initrd_address(64 << 20, 4096, 0, (32 << 20) - 1),
            Some((32 << 20) - 4096)
        );
        assert!(load_program(&mem, MEM, &[0; 16], MEM - 8).is_err());
    }
}
