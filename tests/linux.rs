//! Boots a stock Debian kernel (fetched from Debian's packages by
//! `guest-images/debian-kernel.sh`) as an ELF vmlinux and watches its first
//! lines on nmvm's serial console. Under the emulated KVM of our machines
//! the banner takes 10–20 s; the kernel dies much later on an instruction
//! the emulator lacks, so the test stops the VM once it has seen enough.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{nmvm, read_until, repo_root, require_kvm};

fn debian_vmlinux() -> PathBuf {
    let script = repo_root().join("guest-images/debian-kernel.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: it fetches the stock kernel from Debian's packages (needs apt-get and the package registry)",
        script.display()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("vmlinux="))
        .expect("debian-kernel.sh prints vmlinux=PATH");
    PathBuf::from(line)
}

#[test]
fn stock_debian_kernel_prints_banner_and_command_line() {
    require_kvm();
    let vmlinux = debian_vmlinux();
    let marker = format!("nmvm-marker-{}", std::process::id());
    let cmdline = format!("earlyprintk=serial console=ttyS0 {marker}");
    let mut child = nmvm()
        .args(["run", "--memory", "512M", "--kernel"])
        .arg(&vmlinux)
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nmvm");
    let (found, seen) = read_until(&mut child, Duration::from_secs(180), |s| {
        s.contains("Linux version")
            && s.lines()
                .any(|l| l.contains("Command line:") && l.contains(&marker))
    });
    // Stop the VM: SIGTERM must end nmvm cleanly with 128+15.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().expect("wait nmvm");
    assert!(
        found,
        "no banner and marked command line within 180 s:\n{seen}"
    );
    assert_eq!(status.code(), Some(143), "nmvm should end with 128+SIGTERM");
}
