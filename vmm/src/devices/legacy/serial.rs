//! The 8250 UART at COM1, written by the guest console to a log file.
//!
//! vm-superio models the registers; we put it on the port bus and raise its interrupt through
//! an irqfd. There is no input: the console is write-only for the host.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// An interrupt line backed by an eventfd (registered with KVM as an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 and where its output goes.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    write_failed: bool,
}

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(EventFdTrigger(irq), out),
            write_failed: false,
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(off)) => *byte = self.uart.read(off),
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([byte], Ok(off)) = (data, u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(off, *byte) {
            // A full disk must not stop the guest; say so once.
            if !self.write_failed {
                husk_bounds::ratelimited!(warn, error = ?e, "console log write failed; further output may be lost");
                self.write_failed = true;
            }
        }
        if self.uart.writer_mut().flush().is_err() && !self.write_failed {
            husk_bounds::ratelimited!(warn, "console log flush failed");
            self.write_failed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_log() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut serial = Serial::new(irq, Box::new(sink.clone()));
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().expect("lock"), b"hi\n");
        // Line status: transmitter empty.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Wide accesses are not UART accesses.
        let mut wide = [0u8; 2];
        serial.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    /// A guest that writes its console without end, into the capped log husk-vmm run uses:
    /// the file never passes the cap, and it ends with the newest output.
    #[test]
    fn a_flooded_console_log_stays_under_its_cap() {
        const CAP: u64 = 64 << 10;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        let log = husk_bounds::BoundedLog::from_file(file, CAP).expect("log");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut serial = Serial::new(irq, Box::new(log));
        let line = b"[ 1234.567890] a guest console that never stops talking .........\n";
        let mut fed = 0u64;
        let mut peak = 0u64;
        while fed < 6 << 20 {
            for b in line {
                serial.write(0, &[*b]);
            }
            fed += line.len() as u64;
            if fed % (256 << 10) < line.len() as u64 {
                peak = peak.max(std::fs::metadata(&path).expect("stat").len());
            }
        }
        for b in b"THE END\n" {
            serial.write(0, &[*b]);
        }
        let data = std::fs::read(&path).expect("read");
        assert!(
            peak <= CAP && data.len() as u64 <= CAP,
            "peak {peak}, now {}",
            data.len()
        );
        assert!(
            data.starts_with(b"[log reached its cap of 65536 bytes"),
            "{:?}",
            String::from_utf8_lossy(&data[..80])
        );
        assert!(data.ends_with(b"THE END\n"));
        assert!(!serial.write_failed);
    }
}
