//! A child process whose output is collected while it runs (so a test can
//! wait for a line, and the child never blocks on a full pipe), killed if
//! the test drops it.

use std::io::Read;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a process may run before the test fails.
pub const LIMIT: Duration = Duration::from_secs(150);

/// Collects a child's output in the background.
pub struct Collector {
    text: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    pub fn new(mut from: impl Read + Send + 'static) -> Self {
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = text.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            text,
            thread: Some(thread),
        }
    }

    pub fn now(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }

    pub fn all(mut self) -> String {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.now()
    }
}

/// A running process whose output is collected; killed if dropped.
pub struct Proc {
    what: String,
    child: Option<Child>,
    started: Instant,
    stdout: Option<Collector>,
    stderr: Option<Collector>,
}

/// What a finished process printed.
pub struct Done {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Proc {
    pub fn spawn(what: &str, cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let out: ChildStdout = child.stdout.take().expect("piped stdout");
        let err: ChildStderr = child.stderr.take().expect("piped stderr");
        Self {
            what: what.into(),
            child: Some(child),
            started: Instant::now(),
            stdout: Some(Collector::new(out)),
            stderr: Some(Collector::new(err)),
        }
    }

    pub fn out(&self) -> String {
        self.stdout.as_ref().map(Collector::now).unwrap_or_default()
    }

    pub fn err(&self) -> String {
        self.stderr.as_ref().map(Collector::now).unwrap_or_default()
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    /// Waits until stdout contains `needle`; returns the time since start.
    pub fn wait_for(&mut self, needle: &str) -> Duration {
        loop {
            if self.out().contains(needle) {
                return self.started.elapsed();
            }
            let exited = self.child().try_wait().expect("wait").is_some();
            if exited || self.started.elapsed() > LIMIT {
                panic!(
                    "{} {} before printing {needle:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    if exited { "ended" } else { "timed out" },
                    self.out(),
                    self.err()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn finish(mut self) -> Done {
        let mut child = self.child.take().expect("running");
        while child.try_wait().expect("wait").is_none() {
            if self.started.elapsed() > LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not finish within {LIMIT:?}\nstdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.out(),
                    self.err()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = child.wait().expect("wait");
        Done {
            code: status.code().unwrap_or(-1),
            elapsed: self.started.elapsed(),
            stdout: self.stdout.take().map(Collector::all).unwrap_or_default(),
            stderr: self.stderr.take().map(Collector::all).unwrap_or_default(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
