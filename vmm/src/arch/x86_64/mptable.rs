//! The Intel MultiProcessor Specification (v1.4) table.
//!
//! husk's guest kernel has no ACPI, so this table is how Linux learns about the vCPUs beyond
//! the first, the IOAPIC and how ISA interrupts reach it. It sits in the last KiB below
//! 640 KiB ([`EBDA_START`]), one of the places Linux scans for the floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature, FPU and APIC feature flags, as real tables carry.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LOCALINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// The whole table must fit the reserved KiB.
const MAX_TABLE_SIZE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit the MP table (at most {max})", max = max_cpus())]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;

/// The largest vCPU count whose table still fits [`MAX_TABLE_SIZE`].
pub const fn max_cpus() -> usize {
    let fixed = FLOATING_SIZE + HEADER_SIZE + SMALL_ENTRY_SIZE * (2 + (IRQ_MAX as usize + 1) + 2);
    (MAX_TABLE_SIZE - fixed) / PROCESSOR_SIZE
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

/// Builds the table bytes: the floating pointer, then the configuration table it points at.
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || usize::from(num_cpus) > max_cpus() {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let config_addr = EBDA_START as u32 + FLOATING_SIZE as u32;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.push(ENTRY_BUS);
    entries.push(ISA_BUS_ID);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.push(ENTRY_IOAPIC);
    entries.push(ioapic_id);
    entries.push(IOAPIC_VERSION);
    entries.push(1); // enabled
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // Every ISA IRQ goes to the IOAPIC pin of the same number, which is how KVM's default
    // GSI routing wires its in-kernel IOAPIC (and what our irqfds assume).
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[
            ENTRY_IOINT,
            INT_TYPE_INT,
            0,
            0, // flags: conforming polarity and trigger mode
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 is the 8259's ExtINT, LINT1 NMI, on every local APIC (0xff).
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCALINT, kind, 0, 0, ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = (HEADER_SIZE + entries.len()) as u16;
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(MPC_SIGNATURE);
    header.extend_from_slice(&table_len.to_le_bytes());
    header.push(MP_SPEC_REV);
    header.push(0); // checksum, below
    header.extend_from_slice(b"HUSK    ");
    header.extend_from_slice(b"husk-vmm    ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0);
    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = 0u8.wrapping_sub(checksum(&config));

    let mut floating = Vec::with_capacity(FLOATING_SIZE);
    floating.extend_from_slice(MPF_SIGNATURE);
    floating.extend_from_slice(&config_addr.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(MP_SPEC_REV);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: 0 = the table above is present
    floating[10] = 0u8.wrapping_sub(checksum(&floating));

    let mut out = floating;
    out.extend_from_slice(&config);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs at [`EBDA_START`].
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let table = build(num_cpus)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 8] {
            let t = build(cpus).expect("table");
            assert!(t.len() <= MAX_TABLE_SIZE);
            assert_eq!(&t[..4], MPF_SIGNATURE);
            assert_eq!(checksum(&t[..FLOATING_SIZE]), 0);
            let cfg = &t[FLOATING_SIZE..];
            assert_eq!(&cfg[..4], MPC_SIGNATURE);
            assert_eq!(usize::from(u16::from_le_bytes([cfg[4], cfg[5]])), cfg.len());
            assert_eq!(checksum(cfg), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(usize::from(count), usize::from(cpus) + 2 + 24 + 2);
            // The first processor entry is the BSP with APIC id 0.
            assert_eq!(cfg[HEADER_SIZE], ENTRY_PROCESSOR);
            assert_eq!(cfg[HEADER_SIZE + 3], CPU_ENABLED | CPU_BSP);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(build(0).is_err());
        assert!(build(u8::try_from(max_cpus() + 1).unwrap_or(u8::MAX)).is_err());
        assert!(build(u8::try_from(max_cpus()).unwrap_or(u8::MAX)).is_ok());
    }
}
