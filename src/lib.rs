//! jolt: a build and task executor.
//!
//! Data flows one way: `recipe` → `graph` (identities, with file hashes from
//! `graph::hashes`) → `executor` → `store` (the local and HTTP caches), and, in a
//! network build, `remote` (the broker's messages). The command modules wire these
//! together; `main.rs` only turns [`run`]'s result into an exit code. Every module is
//! private to the crate; what the integration tests need is re-exported in
//! `testing`.

mod cli;
mod commands;
mod config;
mod console;
mod error;
mod executor;
mod graph;
mod interrupt;
mod recipe;
mod remote;
mod runlog;
mod store;
mod testhooks;
mod util;

/// What the integration tests (`tests/`) use of the library, and nothing else:
/// every module is private to the crate, so that the compiler sees dead code.
#[doc(hidden)]
pub mod testing {
    pub use crate::config::{Kind, SPECS};
    pub use crate::remote::messages::{lock_key, RecipeBundle, RecipeText};
    pub use crate::store::archive::pack;
    pub use crate::store::http::fleet_of;
    pub use crate::util::hex;
}

use std::ffi::OsString;

/// Runs jolt with these arguments and returns the exit code.
pub fn run(args: impl IntoIterator<Item = OsString>) -> error::Exit {
    // Before any thread or child: what the tasks jolt runs can read of it.
    util::secrets::seal_process();
    executor::process::close_inherited_on_exec();
    let cli = match cli::Cli::parse_args(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are no errors.
            return match e.exit_code() {
                0 => error::Exit::Success,
                _ => error::Exit::Usage,
            };
        }
    };
    let verbosity = if cli.quiet {
        -1
    } else {
        cli.verbose.min(3) as i8
    };
    let color = match cli.color {
        cli::ColorChoice::Always => true,
        cli::ColorChoice::Never => false,
        cli::ColorChoice::Auto => {
            use std::io::IsTerminal;
            std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::io::stdout().is_terminal()
                && std::env::var_os("TERM").is_some_and(|t| t != "dumb")
        }
    };
    console::init(verbosity, color);
    let mut logger = env_logger::Builder::new();
    logger.filter_level(library_level(verbosity));
    let _ = logger
        .parse_env("RUST_LOG")
        // Every record is redacted: amiquip logs its handshake, password included.
        .format(|out, record| {
            use std::io::Write;
            let text = format!("[{} {}] {}", record.level(), record.target(), record.args());
            writeln!(out, "{}", util::secrets::redact_record(&text))
        })
        .try_init();
    let code = match commands::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            console::error(&format!("{err:#}"));
            error::exit_code(&err)
        }
    };
    runlog::flush();
    match code {
        // Stopped as by a Ctrl-C, because the output's reader went away.
        error::Exit::Interrupted if interrupt::output_was_closed() => error::Exit::OutputClosed,
        code => code,
    }
}

/// Which log records of other crates (amiquip, rustls, ureq: jolt writes its own lines
/// through `console`) are shown: none below `-vv`, then their debug records too. What
/// goes wrong in them reaches jolt as an error, which jolt reports in its own words;
/// their warnings are mostly the broker closing a channel on purpose: the lock
/// protocol's expected refusals (a shard in exclusive use, gone, or a lock queue
/// held), and `jolt status` asking for queues that may not exist.
fn library_level(verbosity: i8) -> log::LevelFilter {
    match verbosity {
        2.. => log::LevelFilter::Debug,
        _ => log::LevelFilter::Off,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_crates_log_records_are_shown_from_debug_verbosity_on() {
        for (verbosity, level) in [
            (-1, log::LevelFilter::Off),
            // Regression (issue 23): amiquip's warnings reached a worker's log.
            (0, log::LevelFilter::Off),
            (1, log::LevelFilter::Off),
            (2, log::LevelFilter::Debug),
            (3, log::LevelFilter::Debug),
        ] {
            assert_eq!(library_level(verbosity), level, "verbosity {verbosity}");
        }
    }
}
