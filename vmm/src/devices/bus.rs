//! Address buses: which device answers a port-I/O or MMIO access from a vCPU.
//!
//! A vCPU thread looks the address up and calls the device with the offset into its window.
//! Devices sit behind a mutex because vCPUs and the event loop may both reach them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device window {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// Non-overlapping device windows, keyed by base address.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must be inside the window.
        if offset.checked_add(size as u64)? <= *len {
            Some((offset, dev))
        } else {
            None
        }
    }

    /// Reads from the device at `addr`. Returns false if no device answers there (then the
    /// caller decides what the guest sees).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                // A poisoned lock means a device panicked; there is nothing sane to answer.
                match dev.lock() {
                    Ok(mut d) => d.read(offset, data),
                    Err(_) => data.fill(0xff),
                }
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                if let Ok(mut d) = dev.lock() {
                    d.write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn windows_and_overlaps() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x100, 0x10).expect("insert");
        assert!(bus.insert(dev.clone(), 0x108, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0xf8, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0x200, 0).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev.clone(), 0x110, 0x10).expect("adjacent");
        let mut b = [0u8; 2];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b, [3, 3]);
        assert!(!bus.read(0x1f0, &mut b));
        // An access straddling the window's end is not the device's.
        assert!(!bus.read(0x11f, &mut [0u8; 4]));
        assert!(bus.write(0x100, &[7]));
        assert_eq!(dev.lock().expect("lock").0, vec![7]);
    }
}
