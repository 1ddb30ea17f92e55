//! Bad input gets a one-line error and status 255, never a panic or a hang.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{nmvm, require_kvm, run_with_deadline, scratch_dir, text};

const VMM_ERROR: i32 = 255;

/// Runs nmvm and checks it fails with one line on stderr containing
/// `expect`.
fn fails_with(cmd: &mut Command, expect: &str) {
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(VMM_ERROR),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line expected:\n{stderr}");
    assert!(stderr.starts_with("nmvm: "), "{stderr}");
    assert!(stderr.contains(expect), "expected {expect:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write test file");
}

/// A 64-bit x86-64 ELF header with one PT_LOAD at 1 MiB whose file range
/// is `filesz` bytes from offset 0x1000.
fn elf(filesz: u64, paddr: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&filesz.to_le_bytes());
    ph[40..48].copy_from_slice(&filesz.to_le_bytes());
    f
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    require_kvm();
    let dir = scratch_dir("not-a-kernel");
    let path = dir.join("junk");
    write(&path, &[0x55; 4096]);
    fails_with(
        nmvm().args(["run", "--kernel"]).arg(&path),
        "neither an ELF vmlinux",
    );
}

#[test]
fn truncated_elf_kernel() {
    require_kvm();
    let dir = scratch_dir("truncated-elf");
    let path = dir.join("vmlinux");
    write(&path, &elf(0x10000, 0x100000)); // promises 64 KiB it lacks
    fails_with(
        nmvm().args(["run", "--kernel"]).arg(&path),
        "truncated kernel image",
    );
}

#[test]
fn truncated_bzimage() {
    require_kvm();
    let dir = scratch_dir("truncated-bz");
    let path = dir.join("bzImage");
    let mut img = vec![0u8; 5 * 512 + 1000];
    img[0x1f1] = 4;
    img[0x1f4..0x1f8].copy_from_slice(&0x1000u32.to_le_bytes()); // 64 KiB promised
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    write(&path, &img);
    fails_with(
        nmvm().args(["run", "--kernel"]).arg(&path),
        "truncated kernel image",
    );
}

#[test]
fn kernel_larger_than_memory() {
    require_kvm();
    let dir = scratch_dir("big-elf");
    let path = dir.join("vmlinux");
    let mut img = elf(0x1000, 0x4000_0000); // loads at 1 GiB
    img.resize(0x2000, 0);
    write(&path, &img);
    fails_with(
        nmvm()
            .args(["run", "--memory", "64M", "--kernel"])
            .arg(&path),
        "give the VM more --memory",
    );
}

#[test]
fn initrd_that_does_not_fit() {
    require_kvm();
    let dir = scratch_dir("big-initrd");
    let path = dir.join("initrd");
    write(&path, &vec![0u8; 20 << 20]);
    fails_with(
        nmvm()
            .args(["run", "--memory", "16M", "--initrd"])
            .arg(&path),
        "does not fit",
    );
}

#[test]
fn missing_kernel_file() {
    fails_with(
        nmvm().args(["run", "--kernel", "/nonexistent/vmlinux"]),
        "/nonexistent/vmlinux",
    );
}

#[test]
fn zero_memory() {
    require_kvm();
    fails_with(
        nmvm().args(["run", "--memory", "0"]),
        "--memory 0 is too small",
    );
}

#[test]
fn more_memory_than_the_host_has() {
    require_kvm();
    fails_with(
        nmvm().args(["run", "--memory", "64T"]),
        "more than this host's",
    );
}

#[test]
fn zero_cpus() {
    require_kvm();
    fails_with(
        nmvm().args(["run", "--cpus", "0"]),
        "--cpus 0 is out of range",
    );
}

#[test]
fn malformed_size() {
    fails_with(nmvm().args(["run", "--memory", "12Q"]), "not a size suffix");
}

#[test]
fn pipe_slots_out_of_range() {
    fails_with(
        nmvm().args(["pkt-gen", "-i", "shm:x{0", "--pipe-slots", "2"]),
        "--pipe-slots",
    );
}

#[test]
fn unknown_option() {
    fails_with(nmvm().args(["run", "--bogus"]), "--bogus");
}

#[test]
fn missing_dev_kvm_is_named() {
    // Hide /dev/kvm behind an empty /dev in a private mount namespace.
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "this test hides /dev/kvm with `unshare --mount` (util-linux) and needs the privilege to create a mount namespace"
    );
    fails_with(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs none /dev && exec \"$0\" run")
            .arg(env!("CARGO_BIN_EXE_nmvm")),
        "cannot open /dev/kvm",
    );
}
