//! Small legacy port devices: the exit port and the i8042 reset line.

use crate::bus::PioDevice;
use crate::{GuestStop, StopHandle};

/// The exit port: the guest writes one status byte and the VM ends with it
/// as the process exit status. Port 0xf4, where QEMU's isa-debug-exit sits.
pub const EXIT_PORT: u16 = 0xf4;

/// The exit device (see [`EXIT_PORT`]).
pub struct ExitDevice {
    stop: StopHandle,
}

impl ExitDevice {
    /// An exit device that ends the VM through `stop`.
    pub fn new(stop: StopHandle) -> Self {
        Self { stop }
    }
}

impl PioDevice for ExitDevice {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        // Any access width is accepted; the status is the low byte.
        if let Some(&status) = data.first() {
            self.stop.stop(GuestStop::ExitStatus(status));
        }
    }
}

/// First port of the i8042 keyboard controller (data port 0x60; status and
/// command at 0x64).
pub const I8042_BASE: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u16 = 5;
const I8042_COMMAND: u16 = 0x64 - I8042_BASE;
const I8042_CMD_PULSE_RESET: u8 = 0xfe;

/// Just enough of an i8042 for a guest to reset the machine, which is how
/// Linux reboots with `reboot=k` and how a guest without ACPI says "done".
/// It reports no keyboard, so guest drivers find nothing to drive.
pub struct I8042 {
    stop: StopHandle,
}

impl I8042 {
    /// An i8042 that ends the VM through `stop` on a reset pulse.
    pub fn new(stop: StopHandle) -> Self {
        Self { stop }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status 0: no data, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == I8042_COMMAND && data.first() == Some(&I8042_CMD_PULSE_RESET) {
            self.stop.stop(GuestStop::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Recorder(Mutex<Vec<GuestStop>>);

    impl crate::StopVm for Recorder {
        fn stop(&self, why: GuestStop) {
            self.0.lock().unwrap().push(why);
        }
    }

    #[test]
    fn exit_port_stops_with_low_byte() {
        let rec = Arc::new(Recorder::default());
        let mut dev = ExitDevice::new(rec.clone());
        dev.write(0, &[7, 1]);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestStop::ExitStatus(7)]);
    }

    #[test]
    fn i8042_resets_only_on_pulse_command() {
        let rec = Arc::new(Recorder::default());
        let mut dev = I8042::new(rec.clone());
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(I8042_COMMAND, &[0xd1]);
        assert!(rec.0.lock().unwrap().is_empty());
        dev.write(I8042_COMMAND, &[0xfe]);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestStop::Reset]);
    }
}
