//! Architecture support: the guest physical memory layout, boot-time CPU state and firmware
//! tables a directly booted guest expects. Only x86_64 today.

pub mod x86_64;
