//! Helpers shared by the integration tests: finding the `nmvm` binary,
//! checking that the host can run VMs, and running a VM with a deadline.

#![allow(dead_code)]

pub mod bench;
pub mod net;
pub mod proc;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `nmvm` binary under test.
pub fn nmvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nmvm"))
}

/// Fails the test, naming what is missing, when the host cannot run VMs.
pub fn require_kvm() {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(
        ok,
        "this test boots a VM and needs read/write access to /dev/kvm, which this host lacks"
    );
}

/// Runs `cmd` with stdin from /dev/null, killing it after `limit`.
pub fn run_with_deadline(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nmvm");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "nmvm did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// stdout and stderr as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads `child`'s stdout until `pred` holds for the text so far or
/// `limit` passes; returns the text. The child keeps running.
pub fn read_until(
    child: &mut Child,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> (bool, String) {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < limit {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => {
                seen.extend_from_slice(&chunk);
                if pred(&String::from_utf8_lossy(&seen)) {
                    return (true, String::from_utf8_lossy(&seen).into_owned());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    (false, String::from_utf8_lossy(&seen).into_owned())
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nmvm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs a guest-image script of `guest-images/` (which builds or fetches
/// the image, or finds it in the cache) and returns the paths it prints as
/// `KEY=PATH` lines, in the order of `keys`. `needs` says what the script
/// needs, for the failure message.
pub fn guest_image(script: &str, needs: &str, keys: &[&str]) -> Vec<PathBuf> {
    let script = repo_root().join("guest-images").join(script);
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed (see its messages above): it needs {needs}",
        script.display()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    keys.iter()
        .map(|key| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{} printed no {key}=PATH:\n{stdout}", script.display()))
        })
        .collect()
}
