//! PCI configuration space and the MSI-X table under arbitrary guest
//! accesses: any offset, any width, any value, in any order (the guest's
//! conf1 and BAR accesses). Nothing may panic; the table must keep its
//! size; reads outside it read as ones or zeros, never another vector.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nmvm_devices::pci::config::ConfigSpace;
use nmvm_devices::pci::msix::{MsiMessage, MsiVector, MsixTable};

struct Vector;

impl MsiVector for Vector {
    fn set_route(&self, _msg: Option<MsiMessage>) {}
    fn trigger(&self) {}
}

fuzz_target!(|data: &[u8]| {
    let mut cfg = ConfigSpace::new(0x1af4, 0x1041, 0x02_0000, 0x1af4, 1);
    cfg.add_mem64_bar(0, 0xc000_0000, 0x4000);
    cfg.add_capability(
        0x11,
        &[0x02, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00],
        &[(3, 0xc0)],
    );
    let vectors: Vec<Arc<dyn MsiVector>> = (0..3)
        .map(|_| Arc::new(Vector) as Arc<dyn MsiVector>)
        .collect();
    let mut msix = MsixTable::new(vectors);
    for op in data.chunks_exact(8) {
        let width = [1usize, 2, 4, 8][usize::from(op[0] & 3)];
        let offset = u16::from_le_bytes([op[1], op[2]]);
        let value = [op[3], op[4], op[5], op[6], op[7], op[3], op[4], op[5]];
        let mut buf = [0u8; 8];
        match op[0] >> 2 & 7 {
            0 => cfg.read(offset, &mut buf[..width]),
            1 => cfg.write(offset, &value[..width]),
            2 => msix.read_table(u64::from(offset), &mut buf[..width]),
            3 => msix.write_table(u64::from(offset), &value[..width]),
            4 => msix.read_pba(u64::from(offset), &mut buf[..width]),
            5 => msix.set_control(u16::from_le_bytes([op[3], op[4]])),
            6 => {
                msix.trigger(u16::from(op[3]));
            }
            _ => {
                let _ = cfg.mem64_bar(usize::from(op[3] % 8));
                let _ = cfg.bus_master();
            }
        }
    }
    assert_eq!(msix.len(), 3);
});
