//! Transports: how a guest finds and drives a [`VirtioDevice`](super::device::VirtioDevice).

pub mod mmio;

pub use self::mmio::{IrqTrigger, MmioTransport};
