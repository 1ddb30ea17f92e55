//! The netmap port-name parser (`--net`, `pkt-gen -i`) on arbitrary text:
//! it returns a spec or an error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(name) = std::str::from_utf8(data) {
        if let Ok(spec) = nmvm_devices::netmap::parse_port_name(name) {
            // A parsed spec can be printed (logs do).
            let _ = format!("{spec:?}");
        }
    }
});
