//! The `nmvm` command.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nmvm::cli::{
    BenchArgs, Cli, Command, DemoArgs, PktGenArgs, ReportTarget, RunArgs, DEFAULT_LINUX_CMDLINE,
};
use nmvm::frame::Endpoints;
use nmvm::pktgen::{self, Mode, PktGenOptions};
use nmvm::report::Report;
use nmvm::verdict::{StopReason, EXIT_VMM_ERROR};
use nmvm::vm::{self, ConsoleConfig, KernelChoice, NetSpec, RunOutcome, VmConfig};

#[cfg(target_os = "linux")]
mod vhost_user;

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
            // One line: clap's first paragraph says what is wrong (some
            // messages end in ':' and list the arguments on the next lines).
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = if first.is_empty() {
                "bad command line".to_string()
            } else {
                first.join(" ")
            };
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
        Command::PktGen(args) => pkt_gen(args),
        Command::Demo(args) => demo(args, started),
        Command::Bench(args) => bench(args),
        Command::VhostUser(args) => vhost_user(args),
    }
}

/// Turns the seccomp filters on (each thread installs its own once its
/// set-up is done), or says loudly that `--no-seccomp` leaves them off.
fn sandbox(no_seccomp: bool) -> Result<(), nmvm::seccomp::SeccompError> {
    if no_seccomp {
        eprintln!(
            "nmvm: WARNING: --no-seccomp: running without the seccomp filters; \
             for debugging only, never with an untrusted guest, frontend or netmap peer"
        );
        return Ok(());
    }
    if !nmvm::seccomp::SUPPORTED {
        eprintln!(
            "nmvm: WARNING: no system-call filter on this OS (seccomp is Linux's); \
             threads run unconfined"
        );
    }
    nmvm::seccomp::enable().inspect_err(|e| eprintln!("nmvm: {}", error_chain(e)))
}

#[cfg(not(target_os = "linux"))]
fn vhost_user(_args: nmvm::cli::VhostUserArgs) -> ExitCode {
    eprintln!("nmvm vhost-user: not built on this OS (the vhost-user backend is Linux-only)");
    ExitCode::from(EXIT_VMM_ERROR)
}

#[cfg(target_os = "linux")]
fn vhost_user(args: nmvm::cli::VhostUserArgs) -> ExitCode {
    if sandbox(args.no_seccomp).is_err() {
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    let opts = vhost_user::Options {
        socket: args.socket,
        port: args.net,
        vnet_hdr: args.vnet_hdr,
        pipe_slots: args.pipe.pipe_slots,
        connections: args.connections,
        stats: args.stats,
    };
    let stop = pktgen::stop_on_signals();
    match vhost_user::serve(&opts, &stop) {
        Ok(served) => {
            if opts.stats {
                println!(
                    "vhost-user: {} connections, {} closed on an error",
                    served.connections, served.failed
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nmvm vhost-user: {}", error_chain(&e));
            ExitCode::from(EXIT_VMM_ERROR)
        }
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
    if let Some(backend) = args.hypervisor {
        nmvm::hypervisor::select(backend);
    }
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
        net: args.net.map(|port| NetSpec {
            port,
            mac: args.mac,
            vnet_hdr: args.vnet_hdr,
            passthrough: args.passthrough,
            pipe_slots: args.pipe.pipe_slots,
        }),
    };
    if let Err(e) = sandbox(args.no_seccomp) {
        write_report(args.report.as_ref(), &Report::vmm_error(e.to_string()));
        return ExitCode::from(EXIT_VMM_ERROR);
    }
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

fn bench(args: BenchArgs) -> ExitCode {
    let secs = args.seconds.unwrap_or(if args.quick { 0.3 } else { 1.0 });
    let dur = std::time::Duration::from_secs_f64(secs.clamp(0.05, 60.0));
    if let Some(n) = args.worker_frames {
        return match nmvm::bench::worker_frames(n) {
            Ok(done) => {
                println!("worker frames: {done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nmvm bench: {e}");
                ExitCode::from(EXIT_VMM_ERROR)
            }
        };
    }
    let sizes: &[usize] = if args.quick {
        &[64, 1514]
    } else {
        &nmvm::bench::SIZES
    };
    let mut report = if args.dpdk_only {
        nmvm::bench::BenchReport::empty(secs, args.repeat)
    } else {
        match nmvm::bench::run(sizes, dur, args.repeat) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("nmvm bench: {e}");
                return ExitCode::from(EXIT_VMM_ERROR);
            }
        }
    };
    if args.dpdk || args.dpdk_only {
        let race_secs = args.seconds.unwrap_or(if args.quick { 2.0 } else { 4.0 });
        match race(race_secs, args.repeat, args.race_pipe_slots) {
            Ok(race) => report.add_race(race),
            Err(e) => {
                eprintln!("nmvm bench: the DPDK race: {e}");
                return ExitCode::from(EXIT_VMM_ERROR);
            }
        }
    }
    print!("{}", nmvm::bench::table(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("nmvm bench: cannot write {}: {e}", path.display());
        }
    }
    if let Some(path) = &args.plot {
        if let Err(e) = std::fs::write(path, nmvm::bench::svg(&report)) {
            eprintln!("nmvm bench: cannot write {}: {e}", path.display());
        }
    }
    if let Some(race) = &report.dpdk {
        println!("race: {}; {}", race.testpmd, race.pinning);
        for dir in [nmvm::dpdk::Dir::Tx, nmvm::dpdk::Dir::Rx] {
            for b in [nmvm::dpdk::Backend::Dpdk, nmvm::dpdk::Backend::Nmvm] {
                println!("race {} {}: {}", b.path(), dir.name(), b.work(dir));
            }
        }
        for b in [nmvm::dpdk::Backend::Dpdk, nmvm::dpdk::Backend::Nmvm] {
            let paths = race.driver_paths(b);
            if !paths.is_empty() {
                println!(
                    "race {}: virtio_user's paths: {}",
                    b.path(),
                    paths.join("; ")
                );
            }
        }
    }
    for line in nmvm::bench::ratio_lines(&report) {
        println!("{line}");
    }
    if report
        .dpdk
        .as_ref()
        .is_some_and(|r| r.points.iter().any(|p| !p.counts_agree()))
    {
        eprintln!("nmvm bench: in the DPDK race, some run's counters disagree: frames were lost");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// The DPDK race (`--dpdk`): testpmd found or installed, two cores, this
/// binary for the nmvm side.
fn race(seconds: f64, repeat: u32, pipe_slots: u32) -> Result<nmvm::dpdk::RaceReport, String> {
    if cfg!(not(target_os = "linux")) {
        return Err("the DPDK race needs `nmvm vhost-user`, which is Linux-only".into());
    }
    let testpmd = nmvm::dpdk::find_testpmd(true).map_err(|e| e.to_string())?;
    let cores = nmvm::dpdk::pick_cores().map_err(|e| e.to_string())?;
    let nmvm = std::env::current_exe()
        .map_err(|e| format!("cannot find the nmvm binary to run its vhost-user side: {e}"))?;
    let cfg = nmvm::dpdk::RaceConfig {
        testpmd,
        nmvm,
        seconds,
        cores,
        pipe_slots,
    };
    eprintln!(
        "nmvm bench: racing DPDK ({} runs of {seconds} s per point and backend)",
        repeat
    );
    nmvm::dpdk::run(&cfg, &nmvm::dpdk::SIZES, repeat).map_err(|e| e.to_string())
}

fn demo(args: DemoArgs, started: Instant) -> ExitCode {
    if sandbox(args.no_seccomp).is_err() {
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    println!(
        "nmvm demo: booting the bundled guest as an echo appliance on a userspace netmap pipe,"
    );
    println!(
        "           then {} round trips of 60-1514 byte frames from pkt-gen ({} in flight)",
        args.frames, args.window
    );
    let r = match nmvm::demo::run(args.frames, args.window as usize, started) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nmvm demo: {e}");
            return ExitCode::from(EXIT_VMM_ERROR);
        }
    };
    let t = &r.traffic;
    let secs = t.elapsed.as_secs_f64().max(1e-9);
    println!(
        "frames:     {} sent, {} echoed back intact, {} corrupt, {} lost, {} out of order",
        t.sent, t.intact, t.corrupt, t.lost, t.out_of_order
    );
    println!(
        "rate:       {:.0} round trips/s, {:.1} Mbit/s each way ({:.2} s)",
        t.received as f64 / secs,
        t.received_bytes as f64 * 8.0 / secs / 1e6,
        secs
    );
    if let Some((min, avg, max)) = t.rtt_ns {
        println!(
            "round trip: min {:.1} us, avg {:.1} us, max {:.1} us",
            min as f64 / 1e3,
            avg as f64 / 1e3,
            max as f64 / 1e3
        );
    }
    if let Some(line) = &r.guest_counters {
        println!("guest:      {}", line.trim_start_matches("nmvm-guest: "));
    }
    if let Some(net) = &r.vm.net {
        println!("device:     {}", net.counters.summary());
    }
    println!(
        "vm:         {}; VM exits {}",
        r.vm.reason,
        r.vm.exits.total()
    );
    if r.success() {
        println!("demo: OK");
        ExitCode::SUCCESS
    } else {
        println!("demo: FAILED");
        ExitCode::from(1)
    }
}

fn pkt_gen(args: PktGenArgs) -> ExitCode {
    let mut endpoints = Endpoints::default();
    if let Some((ip, port)) = args.src {
        endpoints.src_ip = ip;
        endpoints.src_port = port.unwrap_or(endpoints.src_port);
    }
    if let Some((ip, port)) = args.dst {
        endpoints.dst_ip = ip;
        endpoints.dst_port = port.unwrap_or(endpoints.dst_port);
    }
    endpoints.src_mac = args.src_mac.unwrap_or(endpoints.src_mac);
    endpoints.dst_mac = args.dst_mac.unwrap_or(endpoints.dst_mac);
    let lens: Vec<usize> = args.len.iter().map(|&l| usize::from(l)).collect();
    let len = match lens.as_slice() {
        [] => (60, 60),
        [l] => (*l, *l),
        [a, b, ..] => (*a.min(b), *a.max(b)),
    };
    let port = if ["shm:", "netmap:", "vale"]
        .iter()
        .any(|p| args.port.starts_with(p))
    {
        args.port
    } else {
        format!("netmap:{}", args.port)
    };
    let batch = args.batch.map_or(
        match args.mode {
            Mode::Ping | Mode::Pong => 1,
            _ => 512,
        },
        |b| b as usize,
    );
    let opts = PktGenOptions {
        port,
        mode: args.mode,
        len,
        count: args.count,
        batch,
        report: std::time::Duration::from_millis(args.report_ms.max(1)),
        endpoints,
        wait_link: std::time::Duration::from_secs(args.wait_link),
        idle_timeout: args.idle_timeout,
        verbose: true,
        vnet_hdr_len: args.vnet_hdr_len,
        pipe_slots: args.pipe.pipe_slots,
        check: !args.no_check,
    };
    if sandbox(args.no_seccomp).is_err() {
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    let stop = pktgen::stop_on_signals();
    match pktgen::run(&opts, &stop) {
        Ok(r) if r.corrupt > 0 || r.lost > 0 => ExitCode::from(1),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nmvm pkt-gen: {}", error_chain(&e));
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

/// Names of the virtio-net feature bits in `f`.
fn feature_names(f: u64) -> String {
    const NAMES: [(u32, &str); 12] = [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (5, "MAC"),
        (7, "GUEST_TSO4"),
        (8, "GUEST_TSO6"),
        (11, "HOST_TSO4"),
        (12, "HOST_TSO6"),
        (15, "MRG_RXBUF"),
        (16, "STATUS"),
        (29, "EVENT_IDX"),
        (32, "VERSION_1"),
        (45, "NMVM_NETMAP"),
    ];
    let names: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| f & (1u64 << bit) != 0)
        .map(|(_, n)| *n)
        .collect();
    names.join(" ")
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
    // A clean exit says nothing; a reset is worth one line (it is how
    // Linux guests end, and it looks like a reboot otherwise).
    let quiet_success = matches!(
        outcome.reason,
        StopReason::GuestExit(0) | StopReason::ExpectationsMet
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
    if let Some(net) = &outcome.net {
        let unsent = net
            .counters
            .tx_unsent_at_stop
            .load(std::sync::atomic::Ordering::Relaxed);
        if unsent > 0 {
            eprintln!(
                "nmvm: {unsent} frames from the guest were still waiting for the netmap peer when the VM ended (the peer took nothing for 0.5 s); they were not delivered"
            );
        }
        let p = &net.port;
        let peer_errors = p.bad_index + p.bad_buf_idx + p.bad_len + p.bad_frame;
        if net.counters.guest_errors()
            + net.bad_msix_accesses
            + net.bad_register_accesses
            + peer_errors
            > 0
        {
            eprintln!(
                "nmvm: virtio-net dropped bad input: {}; {} bad register and {} bad MSI-X accesses from the guest; {} bad values from the netmap peer",
                net.counters.summary(),
                net.bad_register_accesses,
                net.bad_msix_accesses,
                peer_errors
            );
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
        "  VM exits                {} (port in {}, port out {}, mmio read {}, mmio write {}, interrupted runs {}, other {})",
        e.total(),
        get(&e.io_in),
        get(&e.io_out),
        get(&e.mmio_read),
        get(&e.mmio_write),
        get(&e.interrupted),
        get(&e.other)
    );
    if let Some(net) = &outcome.net {
        eprintln!(
            "  virtio-net              features {:#x} ({}), MSI-X {}",
            net.features,
            feature_names(net.features),
            if net.msix_enabled {
                "on"
            } else {
                "off (polling driver)"
            }
        );
        eprintln!("  virtio-net counters     {}", net.counters.summary());
        let packets = get(&net.counters.tx_frames) + get(&net.counters.rx_frames);
        let notifications = get(&net.counters.kicks) + get(&net.counters.interrupts);
        let per = |n: u64| n as f64 / packets.max(1) as f64;
        eprintln!(
            "  per packet              {packets} packets, {notifications} notifications: {:.4} VM exits and {:.4} notifications per packet",
            per(e.total()),
            per(notifications)
        );
        if let Some(pt) = &net.passthrough {
            eprintln!(
                "  netmap passthrough      {} syncs, {} worker sleeps, {} interrupts, {} starts refused (packets are slots)",
                get(&pt.syncs),
                get(&pt.sleeps),
                get(&pt.interrupts),
                get(&pt.refused)
            );
        }
        let p = &net.port;
        eprintln!(
            "  netmap peer             bad index {}, bad buf_idx {}, bad len {}, bad frames {}, rings repaired {}",
            p.bad_index, p.bad_buf_idx, p.bad_len, p.bad_frame, p.repaired
        );
        eprintln!(
            "  guest register misuse   {} bad virtio register accesses, {} bad MSI-X table accesses",
            net.bad_register_accesses, net.bad_msix_accesses
        );
    }
    if let Some(kib) = outcome.vmm_rss_kib {
        eprintln!("  VMM resident memory     {kib} KiB beyond resident guest RAM");
    }
}
