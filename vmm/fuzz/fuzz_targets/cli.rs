//! The command line: arguments separated by NUL bytes, through clap's
//! `try_parse_from` and nmvm's own value parsers (sizes, durations, MACs,
//! regexes, report targets). Errors are fine; panics are not.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args = std::iter::once("nmvm").chain(text.split('\0'));
    match nmvm::cli::Cli::try_parse_from(args) {
        Ok(cli) => {
            let _ = format!("{cli:?}");
        }
        Err(e) => {
            // main.rs renders the message into one line.
            let _ = e.render().to_string();
        }
    }
});
