//! The netmap backend: netmap's ABI, port names, rings, and two transports
//! behind one [`Port`] type.
//!
//! - `abi`: `#[repr(C)]` netmap structures, constants and ioctl numbers.
//! - `name`: port names (`netmap:eth0^`, `vale0:vm1`, `shm:demo{0`, …) to a
//!   typed [`PortSpec`].
//! - `ring`: the fast-path [`Ring`] handle (head/cur/tail, slots, buffers by
//!   index, all bounds-checked; no allocation, lock or syscall per packet).
//! - `shm`: the userspace transport (memfd + eventfds, zero-copy pipes).
//! - `kernel`: the `/dev/netmap` transport.
//!
//! This module knows nothing about virtio. The peer (kernel or another
//! process) is untrusted: bad indices, lengths and buffer numbers are
//! counted ([`PortStats`]) and ignored, never followed.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use nmvm_devices::netmap::{Port, PortOptions, Slot, NS_BUF_CHANGED};
//!
//! # let dir = std::env::temp_dir().join(format!("nmvm-doc-{}", std::process::id()));
//! let opts = PortOptions { run_dir: Some(dir), ..PortOptions::default() };
//! let mut a = Port::open("shm:doc{0", &opts)?; // end A: creates the pipe
//! let mut b = Port::open("shm:doc}0", &opts)?; // end B: attaches by name
//!
//! // Send: `send` copies a frame into the slots at `cur` and moves
//! // cur/head past it; txsync hands everything before head to the peer.
//! assert!(a.tx_ring().send(b"hello, netmap"));
//! a.txsync()?;
//!
//! // Receive: wait (sleeps on an eventfd if nothing is there), then read.
//! assert!(b.wait_rx(Some(Duration::from_secs(5)))?);
//! let mut frame = [0u8; 2048];
//! let len = b.rx_ring().recv(&mut frame).unwrap();
//! assert_eq!(&frame[..len], b"hello, netmap");
//!
//! // The netmap_user.h way, slot by slot, without copies on the receive
//! // side: fill buffers in place, publish with head, sync.
//! let tx = a.tx_ring();
//! let mut i = tx.cur();
//! for n in 0..4u8 {
//!     let buf = tx.tx_buf(i).unwrap(); // bounds-checked buffer of slot i
//!     buf[..60].fill(n);
//!     tx.set_len_flags(i, 60, 0);
//!     i = tx.next(i);
//! }
//! tx.advance(i); // cur = head = i
//! a.txsync()?;
//! b.rxsync()?;
//! let rx = b.rx_ring();
//! let mut i = rx.head();
//! while i != rx.tail() {
//!     let (data, _flags) = rx.frag(i).unwrap(); // validated slot + buffer
//!     assert_eq!(data.len(), 60);
//!     i = rx.next(i);
//! }
//! rx.advance(i); // release the slots
//! b.rxsync()?;
//! # let _ = (Slot::default(), NS_BUF_CHANGED);
//! # Ok::<(), nmvm_devices::netmap::NetmapError>(())
//! ```

pub mod abi;
pub mod kernel;
pub mod name;
mod port;
pub mod ring;
pub mod shm;
mod sys;

use std::io;

pub use abi::{NETMAP_MAX_FRAGS, NS_BUF_CHANGED, NS_MOREFRAG};
pub use kernel::KernelError;
pub use name::{parse as parse_port_name, NameError, PipeEnd, PortSpec};
pub use port::{Port, PortOptions, PortStats};
pub use ring::{Ring, RingError, RingStats, Slot};
pub use shm::ShmError;

/// Errors of the netmap module.
#[derive(Debug, thiserror::Error)]
pub enum NetmapError {
    /// The port name is malformed.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The userspace transport failed.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// The kernel transport failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A ring could not be set up.
    #[error("{name}: {err}")]
    Ring {
        /// Port name.
        name: String,
        /// Cause.
        err: RingError,
    },
    /// A kernel port without a tx or rx ring.
    #[error("{name} binds {tx} tx and {rx} rx rings; a port needs at least one of each")]
    NoRings {
        /// Port name.
        name: String,
        /// tx rings bound.
        tx: usize,
        /// rx rings bound.
        rx: usize,
    },
    /// Waiting for the ring failed.
    #[error("{name}: waiting failed: {err}")]
    Wait {
        /// Port name.
        name: String,
        /// Cause.
        err: io::Error,
    },
}
