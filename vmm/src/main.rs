//! The `nmvm` command.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nmvm::cli::{Cli, Command, ReportTarget, RunArgs, DEFAULT_LINUX_CMDLINE};
use nmvm::report::Report;
use nmvm::verdict::{StopReason, EXIT_VMM_ERROR};
use nmvm::vm::{self, ConsoleConfig, KernelChoice, RunOutcome, VmConfig};

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line says what is wrong.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad command line");
            eprintln!(
                "nmvm: {} (see nmvm --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(nmvm::cli::usage_error_code());
        }
    };
    init_logging(cli.verbose);
    match cli.command {
        Command::Run(args) => run(args, started),
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
}

fn run(args: RunArgs, started: Instant) -> ExitCode {
    let kernel = match args.kernel {
        Some(path) => KernelChoice::File(path),
        None => KernelChoice::Bundled,
    };
    let cmdline = args.cmdline.unwrap_or_else(|| match kernel {
        KernelChoice::Bundled => String::new(),
        KernelChoice::File(_) => DEFAULT_LINUX_CMDLINE.to_string(),
    });
    let cfg = VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline,
        memory: args.memory,
        cpus: args.cpus,
        started,
        console: ConsoleConfig {
            stdout: !args.quiet,
            serial_log: args.serial_log,
            expect: args.expect,
            expect_fail: args.expect_fail,
        },
        timeout: args.timeout,
    };
    match vm::run(&cfg) {
        Ok(outcome) => {
            report(&outcome, args.stats);
            write_report(args.report.as_ref(), &Report::from_outcome(&outcome));
            ExitCode::from(outcome.reason.exit_code())
        }
        Err(e) => {
            let message = error_chain(&e);
            eprintln!("nmvm: {message}");
            write_report(args.report.as_ref(), &Report::vmm_error(message));
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

fn write_report(target: Option<&ReportTarget>, report: &Report) {
    match target {
        None => {}
        Some(ReportTarget::JsonStderr) => eprintln!("{}", report.to_json()),
        Some(ReportTarget::JsonFile(path)) => {
            if let Err(e) = std::fs::write(path, report.to_json() + "\n") {
                eprintln!("nmvm: cannot write the report to {}: {e}", path.display());
            }
        }
    }
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // thiserror messages often embed their source already.
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn report(outcome: &RunOutcome, stats: bool) {
    let quiet_success = matches!(
        outcome.reason,
        StopReason::GuestExit(0) | StopReason::GuestReset | StopReason::ExpectationsMet
    );
    if !quiet_success {
        eprintln!(
            "nmvm: {} (exit status {})",
            outcome.reason,
            outcome.reason.exit_code()
        );
    }
    if matches!(
        outcome.reason,
        StopReason::Timeout | StopReason::ExpectationsMissing
    ) {
        for (pattern, seen) in &outcome.expectations {
            if !seen {
                eprintln!("nmvm: expected pattern never appeared: {pattern}");
            }
        }
        eprintln!("nmvm: last console lines:");
        for line in &outcome.recent_lines {
            eprintln!("  | {line}");
        }
    }
    if !stats {
        return;
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let e = &outcome.exits;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("nmvm stats:");
    match outcome.first_exit {
        Some(d) => eprintln!("  first guest exit        {:.3} ms after start", ms(d)),
        None => eprintln!("  first guest exit        none"),
    }
    eprintln!(
        "  verdict                 {:.3} ms after start",
        ms(outcome.elapsed)
    );
    eprintln!(
        "  VM exits                {} (port in {}, port out {}, mmio read {}, mmio write {}, kicks {}, other {})",
        e.total(),
        get(&e.io_in),
        get(&e.io_out),
        get(&e.mmio_read),
        get(&e.mmio_write),
        get(&e.interrupted),
        get(&e.other)
    );
    if let Some(kib) = outcome.vmm_rss_kib {
        eprintln!("  VMM resident memory     {kib} KiB beyond resident guest RAM");
    }
}
