//! Port I/O from the guest to the legacy devices husk-vmm puts on the PIO bus: the 8250
//! serial port (the guest console, whose output lands in a capped log) and the i8042 (only
//! its reset command, how husk's guests power off). Each step is (device, offset, read or
//! write, value); offsets run past the devices' windows and accesses may be wider than a byte.
//!
//! Checked beyond "no panic": the console never gets more bytes than the guest wrote to the
//! transmit register, and the VM is asked to end exactly when the guest sent 0xFE to the
//! i8042's command port, as a power-off.
#![no_main]
// Test code: an unwrap on the harness's own set-up (temporary files, guest memory) is an
// assertion; a panic anywhere is the finding libFuzzer reports.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use husk_fuzz::Input;
use husk_vmm::devices::bus::BusDevice;
use husk_vmm::devices::legacy::{Serial, I8042};
use husk_vmm::vstate::{ExitNotifier, VmExit};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// What the serial port wrote, shared with the test.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = self.0.lock().unwrap();
        // A capped log in husk-vmm; here a bound keeps one input from growing memory.
        if out.len() < 1 << 20 {
            out.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let console = Console::default();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut serial = Serial::new(irq, Box::new(console.clone()));
    let exit = ExitNotifier::new().unwrap();
    let mut i8042 = I8042::new(exit.clone());
    let mut thr_writes = 0usize;
    let mut reset_sent = false;
    let mut steps = 0;
    while !inp.is_empty() && steps < 4096 {
        steps += 1;
        let op = inp.u8();
        // Offsets 0-15: the serial window is 8 ports, the i8042's 5; the rest must be ignored.
        let offset = u64::from(inp.u8() & 0x0f);
        let width = [1usize, 1, 1, 2, 4, 0][usize::from(op >> 5) % 6];
        let value = inp.u8();
        let write = op & 1 == 1;
        let to_serial = op & 2 == 0;
        let mut buf = vec![value; width];
        match (to_serial, write) {
            (true, true) => {
                // The transmit register is offset 0 when the divisor latch is off; counted
                // whatever the line control says, as an upper bound.
                if offset == 0 && width == 1 {
                    thr_writes += 1;
                }
                serial.write(offset, &buf);
            }
            (true, false) => serial.read(offset, &mut buf),
            (false, true) => {
                if offset == 4 && width == 1 && value == 0xfe {
                    reset_sent = true;
                }
                i8042.write(offset, &buf);
            }
            (false, false) => i8042.read(offset, &mut buf),
        }
        assert_eq!(
            exit.reason().is_some(),
            reset_sent,
            "the VM's end must follow exactly the guest's 0xFE to the i8042 command port"
        );
    }
    if reset_sent {
        assert_eq!(exit.reason(), Some(VmExit::PowerOff("i8042 reset".into())));
    }
    let written = console.0.lock().unwrap().len();
    assert!(
        written <= thr_writes,
        "the console got {written} bytes for {thr_writes} transmit writes"
    );
});
