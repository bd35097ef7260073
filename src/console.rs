//! The console: Jolt-style log lines, task output and the live status line.
//!
//! Every write takes one lock and writes whole lines, so output from different tasks
//! never interleaves mid-line; during a build only the executor's main thread writes.
//! Errors go to stderr, everything else to stdout. The status line is drawn on stderr
//! only when stderr is a terminal, and is cleared before any other line is written.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// Message severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Verbose,
    Info,
    Warning,
    Error,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Debug => "[  DEBUG]",
            Level::Verbose => "[VERBOSE]",
            Level::Info => "[   INFO]",
            Level::Warning => "[WARNING]",
            Level::Error => "[  ERROR]",
        }
    }
}

struct State {
    threshold: Level,
    /// ANSI colour on warnings, errors and finished lines.
    color: bool,
    status_enabled: bool,
    status: Option<String>,
}

static STATE: Mutex<State> = Mutex::new(State {
    threshold: Level::Info,
    color: false,
    status_enabled: false,
    status: None,
});

/// Sets verbosity (-1 quiet, 0 normal, 1 verbose, 2 debug) and enables the status
/// line when stderr is a terminal.
pub fn init(verbosity: i8, color: bool) {
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    s.color = color;
    s.threshold = match verbosity {
        i8::MIN..=-1 => Level::Warning,
        0 => Level::Info,
        1 => Level::Verbose,
        _ => Level::Debug,
    };
    s.status_enabled =
        std::io::stderr().is_terminal() && std::env::var_os("TERM").is_some_and(|t| t != "dumb");
}

fn with_cleared(s: &mut State, write: impl FnOnce()) {
    let redraw = s.status_enabled && s.status.is_some();
    if redraw {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
    write();
    if redraw {
        if let Some(status) = &s.status {
            let _ = write!(std::io::stderr(), "{status}");
            let _ = std::io::stderr().flush();
        }
    }
}

/// Writes a log line, with every registered secret masked.
pub fn log(level: Level, message: &str) {
    let message = crate::util::secrets::redact(message);
    crate::runlog::line(
        &format!("{} {message}", level.tag()),
        level >= Level::Warning,
    );
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if level < s.threshold {
        return;
    }
    let line = match colour_of(level, &message).filter(|_| s.color) {
        Some(c) => format!("\x1b[{c}m{} {message}\x1b[0m", level.tag()),
        None => format!("{} {message}", level.tag()),
    };
    with_cleared(&mut s, || {
        if level == Level::Error {
            let _ = writeln!(std::io::stderr(), "{line}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
}

/// The ANSI colour of a line, if it has one: errors red, warnings yellow, a task
/// finished green.
fn colour_of(level: Level, message: &str) -> Option<&'static str> {
    match level {
        Level::Error => Some("31"),
        Level::Warning => Some("33"),
        Level::Info
            if message.starts_with("Execution finished")
                || message.starts_with("Remote execution finished") =>
        {
            Some("32")
        }
        _ => None,
    }
}

pub fn info(message: &str) {
    log(Level::Info, message);
}

pub fn warn(message: &str) {
    log(Level::Warning, message);
}

pub fn error(message: &str) {
    log(Level::Error, message);
}

pub fn verbose(message: &str) {
    log(Level::Verbose, message);
}

/// A line for `-vv`: what jolt does in detail (retries, evictions, reconnects).
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Whether task output is hidden (`-q`).
pub fn quiet() -> bool {
    STATE.lock().unwrap_or_else(|e| e.into_inner()).threshold > Level::Info
}

/// Writes a line of the output of the task whose key is `task`, optionally prefixed
/// with the task's name; hidden with `-q`, and bounded in the run log.
pub fn output(task: &str, prefix: Option<&str>, line: &str, stderr: bool) {
    let text = prefixed(prefix, line);
    crate::runlog::output(task, &text);
    if quiet() {
        return;
    }
    write_output(&text, stderr);
}

/// Writes a line of task output even with `-q` (a failed task's log).
pub fn output_always(prefix: Option<&str>, line: &str, stderr: bool) {
    write_output(&prefixed(prefix, line), stderr);
}

/// A line of task output as shown: `[NAME] LINE`, or the line alone.
fn prefixed(prefix: Option<&str>, line: &str) -> String {
    match prefix {
        Some(p) => format!("[{p}] {line}"),
        None => line.to_string(),
    }
}

fn write_output(text: &str, stderr: bool) {
    let text = format!("{text}\n");
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    with_cleared(&mut s, || {
        if stderr {
            let _ = std::io::stderr().write_all(text.as_bytes());
        } else {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    });
}

/// Writes plain text to stdout (command results such as `list`), never filtered.
pub fn print(text: &str) {
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    with_cleared(&mut s, || {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    });
}

/// Whether the live status line is drawn (stderr is a terminal).
pub fn status_enabled() -> bool {
    STATE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .status_enabled
}

/// Shows (or, with `None`, removes) the live status line.
pub fn status(text: Option<String>) {
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if !s.status_enabled {
        return;
    }
    let mut err = std::io::stderr();
    let _ = write!(err, "\r\x1b[K");
    if let Some(t) = &text {
        let _ = write!(err, "{t}");
    }
    let _ = err.flush();
    s.status = text;
}
