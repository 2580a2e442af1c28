//! Legacy PC devices: the 8250 serial port (the guest console) and the i8042 controller
//! (only for its "reset the CPU" command).

pub mod i8042;
pub mod serial;

pub use self::i8042::I8042;
pub use self::serial::{EventFdTrigger, Serial};
