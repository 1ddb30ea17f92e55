//! Boots a stock Debian kernel (fetched from Debian's packages by
//! `guest-images/debian-kernel.sh`) as an ELF vmlinux and watches its first
//! lines on nmvm's serial console. Under the emulated KVM of our machines
//! the banner takes 10–20 s; the kernel dies much later on an instruction
//! the emulator lacks, so the test stops the VM once it has seen enough.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{guest_image, nmvm, require_kvm, run_with_deadline, text};

fn debian_vmlinux() -> PathBuf {
    let mut paths = guest_image(
        "debian-kernel.sh",
        "apt-get and the package registry (it fetches the stock kernel from Debian's packages)",
        &["vmlinux"],
    );
    paths.remove(0)
}

#[test]
fn stock_debian_kernel_prints_banner_and_command_line() {
    require_kvm();
    let vmlinux = debian_vmlinux();
    let marker = format!("nmvm-marker-{}", std::process::id());
    let cmdline = format!("earlyprintk=serial console=ttyS0 {marker}");
    // The one-line boot test of the README's "Use in CI" section.
    let out = run_with_deadline(
        nmvm()
            .args(["run", "--memory", "512M", "--kernel"])
            .arg(&vmlinux)
            .args(["--cmdline", &cmdline])
            .args(["--expect", "Linux version"])
            .args(["--expect", &format!("Command line: .*{marker}")])
            .args(["--timeout", "180s"]),
        Duration::from_secs(240),
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "banner and marked command line expected\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains(&marker));
}
