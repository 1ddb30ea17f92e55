//! The serial console on the host side: guest output to stdout, host input
//! from stdin, and the terminal mode while a VM runs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nmvm_devices::bus::lock;
use nmvm_devices::serial::SerialDevice;

use crate::monitor::{ConsoleEvent, ConsoleMonitor};

/// Where guest console output goes: stdout, a log file, and the monitor
/// that watches it for verdicts.
pub struct ConsoleOut {
    stdout: Option<std::io::Stdout>,
    log: Option<File>,
    monitor: Arc<Mutex<ConsoleMonitor>>,
    on_event: Box<dyn FnMut(ConsoleEvent) + Send>,
}

impl ConsoleOut {
    /// Console output to stdout (if `stdout`), to `log` (if any), and
    /// through `monitor`, whose conclusions go to `on_event`.
    pub fn new(
        stdout: bool,
        log: Option<File>,
        monitor: Arc<Mutex<ConsoleMonitor>>,
        on_event: Box<dyn FnMut(ConsoleEvent) + Send>,
    ) -> Self {
        Self {
            stdout: stdout.then(std::io::stdout),
            log,
            monitor,
            on_event,
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Unbuffered, straight to the file descriptors: the guest's output
        // must be visible as it arrives and survive nmvm being killed.
        if let Some(out) = &self.stdout {
            let mut out = out.lock();
            // A closed stdout must not stop the guest or the log.
            let _ = out.write_all(buf).and_then(|()| out.flush());
        }
        if let Some(log) = &mut self.log {
            if let Err(e) = log.write_all(buf) {
                log::warn!("serial log: {e}; no longer writing it");
                self.log = None;
            }
        }
        let events = lock(&self.monitor).feed(buf);
        for event in events {
            (self.on_event)(event);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART type nmvm wires to the console.
pub type ConsoleSerial = SerialDevice<ConsoleOut>;

/// Forwards stdin to the guest's UART from a background thread. End of
/// input (a closed pipe, `/dev/null` in CI) just stops forwarding: it does
/// not end the VM.
pub fn forward_stdin(serial: Arc<Mutex<ConsoleSerial>>) {
    let spawned = std::thread::Builder::new()
        .name("nmvm-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::debug!("stdin: {e}; no more console input");
                        return;
                    }
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = lock(&serial).enqueue_input(pending);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        // The guest has not drained its receive FIFO yet.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the console input thread: {e}");
    }
}

/// Puts the terminal on stdin into raw mode (keeping signal keys, so Ctrl-C
/// still stops nmvm) for as long as it lives; a no-op when stdin is not a
/// terminal.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enable() -> Self {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: termios is plain data; an all-zero value is valid and is
        // overwritten by tcgetattr before use.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Self { saved: None };
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep ISIG so that Ctrl-C and Ctrl-\ reach nmvm, and OPOST so that
        // guest newlines still return the carriage on the host terminal.
        raw.c_lflag |= libc::ISIG;
        raw.c_oflag |= libc::OPOST;
        // SAFETY: fd is a terminal and `raw` a fully initialised termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            let fd = std::io::stdin().as_raw_fd();
            // SAFETY: restores the attributes tcgetattr returned for the
            // same terminal.
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
        }
    }
}
