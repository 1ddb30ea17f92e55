//! The 8250 UART on 0x3f8 (COM1), a thin adapter over vm-superio's model.

use std::io::Write;
use std::sync::Arc;

use vm_superio::{serial::NoEvents, Serial, Trigger};

use crate::bus::PioDevice;
use crate::Interrupt;

/// COM1's base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's legacy interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Eight registers.
pub const SERIAL_LEN: u16 = 8;

/// Raises the UART's interrupt line.
pub struct IrqTrigger(pub Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger();
        Ok(())
    }
}

/// A UART whose transmitter writes to `W` (the VMM's console).
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<IrqTrigger, NoEvents, W>,
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `irq` and writing guest output to `out`.
    pub fn new(irq: Arc<dyn Interrupt>, out: W) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues host input for the guest to read; returns how many bytes fit
    /// in the receive FIFO (the rest must be offered again later).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        // An error means the FIFO is full: nothing was queued.
        self.uart.enqueue_raw_bytes(bytes).unwrap_or_default()
    }

    /// The console writer.
    pub fn writer_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
    }
}

impl<W: Write + Send> PioDevice for SerialDevice<W> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.uart.read(o));
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, value) {
            log::warn!("serial: write to register {offset}: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Count(AtomicU32);

    impl Interrupt for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn transmits_to_writer_and_receives_input() {
        let irq = Arc::new(Count::default());
        let mut dev = SerialDevice::new(irq.clone(), Vec::new());
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(dev.writer_mut().as_slice(), b"hi");
        // Enable the received-data interrupt, then feed input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert!(irq.0.load(Ordering::Relaxed) >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }
}
