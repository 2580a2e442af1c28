//! The KVM VM: guest memory, the in-kernel interrupt controllers and PIT, and the host's
//! supported CPUID.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::{memory_regions, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0}, need 12")]
    ApiVersion(i32),
    #[error("KVM lacks a capability husk-vmm needs: {0:?}")]
    MissingCap(Cap),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot allocate {size} MiB of guest memory: {source}")]
    Memory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM_SET_USER_MEMORY_REGION (slot {slot}): {source}")]
    SetMemory {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_TSS_ADDR: {0}")]
    SetTss(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR: {0}")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2: {0}")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// A KVM VM with its guest memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemoryMmap,
    mem_size: u64,
    supported_cpuid: CpuId,
}

impl Vm {
    /// Opens /dev/kvm, creates the VM with `mem_size` bytes of RAM laid out around the MMIO
    /// hole, and the in-kernel PIC, IOAPIC and PIT.
    pub fn new(mem_size: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(version));
        }
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::SetTssAddr,
            Cap::Pit2,
            Cap::PitState2,
            Cap::AdjustClock,
            Cap::ExtCpuid,
            Cap::ImmediateExit,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;

        let ranges: Vec<(GuestAddress, usize)> = memory_regions(mem_size)
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory {
            size: mem_size >> 20,
            source,
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which lives as long as the
            // VM (both are fields of `Vm`, and the VM fd is closed first on drop).
            unsafe { fd.set_user_memory_region(desc) }
                .map_err(|source| VmError::SetMemory { slot, source })?;
        }

        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTss)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetIdentityMap)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        // The speaker port is emulated as a dummy so that guests probing it do not exit to us.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        Ok(Vm {
            kvm,
            fd,
            mem,
            mem_size,
            supported_cpuid,
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn memory_size(&self) -> u64 {
        self.mem_size
    }

    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }
}
