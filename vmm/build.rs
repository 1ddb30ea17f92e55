//! Builds the bundled guest (`guest-images/guest`) and hands its ELF path to the vmm crate as
//! `NMVM_GUEST_ELF`, for `include_bytes!(env!("NMVM_GUEST_ELF"))`.
//!
//! The guest needs its own compiler flags (no SSE, static, own linker script), which must not
//! leak into the VMM's build, so it is built by a nested cargo into a private target dir.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Guest code at CPL 0 runs under an emulator without SSE/AVX (DESIGN.md §3): keep the
/// compiler from emitting any. rustc warns that the x86-64 ABI wants SSE2; that warning is
/// expected and harmless here, as the guest passes no floats anywhere.
const NO_SIMD: &str = "-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2";

/// Inherited variables that would change how the nested cargo builds the guest: flags, target
/// dir and target of the outer build, wrappers such as clippy-driver or coverage tools.
fn must_remove(name: &str) -> bool {
    const KEEP: &[&str] = &["CARGO_HOME", "CARGO_MAKEFLAGS"];
    const KEEP_PREFIXES: &[&str] = &[
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    const REMOVE: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
    ];
    if KEEP.contains(&name) || KEEP_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return false;
    }
    name.starts_with("CARGO_") || name.starts_with("__CARGO") || REMOVE.contains(&name)
}

fn env_path(name: &str) -> Result<PathBuf, String> {
    env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| format!("{name} is not set (not run by cargo?)"))
}

/// The guest is always x86-64; use the host triple when it is one (Linux or FreeBSD hosts
/// both link ELF with `cc`), so no extra standard library has to be installed.
fn guest_target() -> String {
    match env::var("HOST") {
        Ok(host) if host.starts_with("x86_64-") => host,
        _ => "x86_64-unknown-linux-gnu".to_string(),
    }
}

fn build_guest() -> Result<PathBuf, String> {
    let vmm_dir = env_path("CARGO_MANIFEST_DIR")?;
    let workspace = vmm_dir
        .parent()
        .ok_or("vmm crate has no parent directory")?
        .to_path_buf();
    let guest_dir = workspace.join("guest-images").join("guest");
    let link_script = guest_dir.join("link.ld");
    let target_dir = env_path("OUT_DIR")?.join("guest-target");

    for watched in [
        guest_dir.join("src"),
        guest_dir.join("Cargo.toml"),
        link_script.clone(),
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }

    let flags = [
        format!("-Ctarget-feature={NO_SIMD}"),
        "-Crelocation-model=static".to_string(),
        "-Cpanic=abort".to_string(),
        "-Cdebuginfo=0".to_string(),
        "-Cstrip=debuginfo".to_string(),
        "-Clink-arg=-nostartfiles".to_string(),
        "-Clink-arg=-nostdlib".to_string(),
        "-Clink-arg=-static".to_string(),
        "-Clink-arg=-no-pie".to_string(),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        format!("-Clink-arg=-Wl,-T,{}", link_script.display()),
    ];
    // CARGO_ENCODED_RUSTFLAGS separates flags with 0x1f, so paths with spaces survive.
    let encoded = flags.join("\x1f");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let target = guest_target();
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .args(["--release", "--offline", "-p", "nmvm-guest"])
        .args(["--features", "bare-metal", "--bin", "nmvm-guest"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target")
        .arg(&target)
        .arg("--target-dir")
        .arg(&target_dir);
    for (name, _) in env::vars_os() {
        if name.to_str().is_some_and(must_remove) {
            cmd.env_remove(&name);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", encoded);

    let output = cmd
        .output()
        .map_err(|e| format!("cannot run cargo for the guest: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the bundled guest failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let elf = target_dir.join(&target).join("release").join("nmvm-guest");
    check_elf(&elf)?;
    Ok(elf)
}

/// Cheap sanity checks on the ELF header, so a broken link fails here rather than at boot.
fn check_elf(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let field = |off: usize, len: usize| -> Option<u64> {
        let b = bytes.get(off..off + len)?;
        Some(
            b.iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
        )
    };
    let bad = |what: &str| format!("{}: {what}", path.display());
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) || bytes.get(4) != Some(&2) {
        return Err(bad("not a 64-bit ELF file"));
    }
    // e_type 2 = ET_EXEC: a static, non-PIE executable (a PIE would be ET_DYN).
    if field(16, 2) != Some(2) {
        return Err(bad("not a static executable (ET_EXEC)"));
    }
    // e_machine 62 = EM_X86_64.
    if field(18, 2) != Some(62) {
        return Err(bad("not an x86-64 executable"));
    }
    match field(24, 8) {
        Some(entry) if (0x10_0000..0x20_0000).contains(&entry) => Ok(()),
        _ => Err(bad("entry point is not between 1 MiB and 2 MiB")),
    }
}

fn main() -> ExitCode {
    match build_guest() {
        Ok(elf) => {
            println!("cargo:rustc-env=NMVM_GUEST_ELF={}", elf.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
