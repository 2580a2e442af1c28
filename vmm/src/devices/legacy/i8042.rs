//! The i8042 keyboard controller, there for one command: 0xFE on the command port pulses the
//! CPU reset line. Linux uses it with `reboot=k` (and as a fallback); husk-vmm treats it as the
//! guest powering off, which is how husk's guests end.

use std::io;

use vm_superio::Trigger;

use crate::devices::bus::BusDevice;
use crate::vstate::{ExitNotifier, VmExit};

/// Ends the VM with [`VmExit::PowerOff`] when triggered.
pub struct ResetTrigger(pub ExitNotifier);

impl Trigger for ResetTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.notify(VmExit::PowerOff("i8042 reset".into()));
        Ok(())
    }
}

/// The controller on ports 0x60-0x64 (offsets 0 and 4).
pub struct I8042 {
    dev: vm_superio::I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: ExitNotifier) -> Self {
        I8042 {
            dev: vm_superio::I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(off)) => *byte = self.dev.read(off),
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(off)) = (data, u8::try_from(offset)) {
            // ResetTrigger cannot fail.
            let _ = self.dev.write(off, *byte);
        }
    }
}
