//! Shared helpers for the KVM tests: a tiny x86-64 assembler for the guest programs the tests
//! generate, and host checks.

#![allow(dead_code)]

use std::fs::OpenOptions;

/// Whether /dev/kvm can be opened at all (small guest programs need nothing more).
pub fn kvm_available() -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// Skips (with the reason printed) when KVM is missing.
#[macro_export]
macro_rules! require_kvm {
    ($name:expr) => {
        if let Err(reason) = common::kvm_available() {
            husk_skip::missing($name, &reason);
            return;
        }
    };
}

/// Just enough of an x86-64 assembler to write test programs: long mode, flat memory.
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
}

impl Asm {
    pub fn new() -> Self {
        Asm::default()
    }
    fn b(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
    /// `out imm8, al` with `al` = `val`.
    pub fn outb_imm(&mut self, port: u8, val: u8) -> &mut Self {
        self.b(&[0xb0, val, 0xe6, port])
    }
    /// `mov dx, port; mov al, byte; out dx, al` for each byte.
    pub fn serial_write(&mut self, text: &[u8]) -> &mut Self {
        self.b(&[0x66, 0xba, 0xf8, 0x03]);
        for &c in text {
            self.b(&[0xb0, c, 0xee]);
        }
        self
    }
    /// `mov edi, imm32` (zero-extends into rdi).
    pub fn mov_edi(&mut self, v: u32) -> &mut Self {
        self.b(&[0xbf]);
        self.b(&v.to_le_bytes())
    }
    /// `mov eax, imm32`.
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.b(&[0xb8]);
        self.b(&v.to_le_bytes())
    }
    /// `mov dword [rdi + off], imm32` (through eax).
    pub fn store32(&mut self, off: u32, v: u32) -> &mut Self {
        self.mov_eax(v);
        self.b(&[0x89, 0x87]);
        self.b(&off.to_le_bytes())
    }
    /// `mov eax, dword [rdi + off]`.
    pub fn load32(&mut self, off: u32) -> &mut Self {
        self.b(&[0x8b, 0x87]);
        self.b(&off.to_le_bytes())
    }
    /// `movzx eax, word [rdi + off]`.
    pub fn load16(&mut self, off: u32) -> &mut Self {
        self.b(&[0x0f, 0xb7, 0x87]);
        self.b(&off.to_le_bytes())
    }
    /// Writes the low byte of eax, plus `add`, to the serial port.
    pub fn serial_al(&mut self, add: u8) -> &mut Self {
        self.b(&[0x04, add]); // add al, imm8
        self.b(&[0x66, 0xba, 0xf8, 0x03, 0xee])
    }
    /// Spins (bounded by `limit` iterations) until `word [rdi+off]` is non-zero.
    pub fn wait_nonzero16(&mut self, off: u32, limit: u32) -> &mut Self {
        self.b(&[0xb9]); // mov ecx, limit
        self.b(&limit.to_le_bytes());
        let top = self.code.len();
        self.load16(off);
        self.b(&[0x85, 0xc0]); // test eax, eax
        self.b(&[0x75, 0x08]); // jnz +8 (past dec + jnz rel32)
        self.b(&[0xff, 0xc9]); // dec ecx
        let rel = top as i32 - (self.code.len() as i32 + 6);
        self.b(&[0x0f, 0x85]); // jnz top
        self.b(&rel.to_le_bytes())
    }
    /// i8042 "pulse reset line": the VMM ends with a reset.
    pub fn i8042_reset(&mut self) -> &mut Self {
        self.outb_imm(0x64, 0xfe)
    }
    /// `hlt` in a loop.
    pub fn halt_forever(&mut self) -> &mut Self {
        self.b(&[0xf4, 0xeb, 0xfd])
    }
    /// `ud2`: with the boot IDT empty this becomes a triple fault.
    pub fn ud2(&mut self) -> &mut Self {
        self.b(&[0x0f, 0x0b])
    }
    pub fn build(&self) -> Vec<u8> {
        self.code.clone()
    }
}

/// A minimal x86-64 ELF with one PT_LOAD of `code` at `paddr` (no PVH note: 64-bit entry).
pub fn elf_for(code: &[u8], paddr: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&62u16.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&paddr.to_le_bytes());
    out.extend_from_slice(&64u64.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&56u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    let off = 64u64 + 56;
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&5u32.to_le_bytes());
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&paddr.to_le_bytes());
    out.extend_from_slice(&paddr.to_le_bytes());
    out.extend_from_slice(&(code.len() as u64).to_le_bytes());
    out.extend_from_slice(&(code.len() as u64).to_le_bytes());
    out.extend_from_slice(&0x1000u64.to_le_bytes());
    out.extend_from_slice(code);
    out
}
