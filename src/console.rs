//! The console: Jolt-style log lines, task output and the live status line.
//!
//! Every write takes one lock and writes whole lines, so output from different tasks
//! never interleaves mid-line; during a build only the executor's main thread writes.
//! Errors go to stderr, everything else to stdout. The status line is drawn on stderr
//! only when stderr is a terminal, cut to its width, and is cleared before any other
//! line is written.
//!
//! A write to a pipe or a terminal never blocks: it goes through a descriptor of the
//! console's own, opened again from `/proc/self/fd` without blocking (its flag is its
//! own, not that of the descriptor jolt shares with its parent), and one that would
//! block waits in `poll` beside the interrupt descriptor. A pipe nobody reads holds up
//! the build, as it must, but not a Ctrl-C, after which what cannot be written is
//! dropped. A reader that went away (`EPIPE`: `jolt build | head -1`) stops the build
//! as a Ctrl-C does ([`crate::interrupt::output_closed`]), and nothing more is written.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::os::fd::{AsRawFd, RawFd};
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
    /// How stdout and stderr are written.
    routes: [Route; 2],
    /// A reader of jolt's output went away: nothing more is written.
    closed: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    threshold: Level::Info,
    color: false,
    status_enabled: false,
    status: None,
    routes: [Route::Direct; 2],
    closed: false,
});

const STDOUT: RawFd = libc::STDOUT_FILENO;
const STDERR: RawFd = libc::STDERR_FILENO;

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
    s.routes = [STDOUT, STDERR].map(Route::of);
}

impl State {
    /// Writes `text` to `fd` (stdout or stderr), the status line cleared before it
    /// and drawn again after it.
    fn emit(&mut self, fd: RawFd, text: &str) {
        let redraw = self.status_enabled && self.status.is_some();
        if redraw {
            self.write(STDERR, "\r\x1b[K");
        }
        self.write(fd, text);
        if redraw {
            self.draw_status();
        }
    }

    fn draw_status(&mut self) {
        if let Some(status) = &self.status {
            let shown = fit(status, terminal_width().saturating_sub(1)).into_owned();
            self.write(STDERR, &shown);
        }
    }

    fn write(&mut self, fd: RawFd, text: &str) {
        if self.closed {
            return;
        }
        let route = self.routes[usize::from(fd == STDERR)];
        if let Written::Closed = write_fd(fd, route, text.as_bytes()) {
            self.closed = true;
            crate::runlog::line(
                "[  DEBUG] The reader of jolt's output went away (broken pipe): stopping",
                true,
            );
            crate::interrupt::output_closed();
        }
    }
}

/// How a write went.
enum Written {
    /// All of it, or as much as could be (an error other than a closed pipe is
    /// ignored: there is nowhere to report it).
    Done,
    /// Its reader went away (`EPIPE`).
    Closed,
    /// Dropped after an interrupt, while the descriptor could take no more.
    Dropped,
}

/// How the console writes one of its streams.
#[derive(Clone, Copy)]
enum Route {
    /// As it is: a regular file, which never blocks for long (and everything before
    /// [`init`]).
    Direct,
    /// Through a descriptor of the console's own on the same pipe or terminal,
    /// non-blocking: one system call per write, and `poll` only when it would block.
    Own(RawFd),
    /// One that cannot be opened again (a socket): each piece waits in `poll` until
    /// the stream can take it.
    Polled,
}

impl Route {
    fn of(fd: RawFd) -> Route {
        // SAFETY: fstat fills the stat structure we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG {
            return Route::Direct;
        }
        let path = format!("/proc/self/fd/{fd}\0");
        // SAFETY: a NUL-terminated path; the descriptor, if any, is kept for the
        // life of the process.
        let own = unsafe {
            libc::open(
                path.as_ptr().cast(),
                libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        };
        match own {
            -1 => Route::Polled,
            own => Route::Own(own),
        }
    }
}

/// Writes `bytes` to `fd` as `route` says. A write that would block waits until the
/// stream can take more, or until an interrupt comes: then the rest is dropped.
fn write_fd(fd: RawFd, route: Route, mut bytes: &[u8]) -> Written {
    let target = match route {
        Route::Own(own) => own,
        _ => fd,
    };
    let polled = matches!(route, Route::Polled);
    while !bytes.is_empty() {
        if polled && !writable(target) {
            return Written::Dropped;
        }
        // A pipe that polls writable takes `PIPE_BUF` bytes without blocking.
        let piece = match polled {
            true => &bytes[..bytes.len().min(libc::PIPE_BUF)],
            false => bytes,
        };
        // SAFETY: `piece` is a valid buffer of `piece.len()` bytes.
        let n = unsafe { libc::write(target, piece.as_ptr().cast(), piece.len()) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if writable(target) => continue,
                Some(libc::EAGAIN) => return Written::Dropped,
                Some(libc::EPIPE) => return Written::Closed,
                _ => return Written::Done,
            }
        }
        bytes = &bytes[n as usize..];
    }
    Written::Done
}

/// Waits until `fd` can take more (or has failed: the write will say how); `false`
/// when an interrupt came first.
fn writable(fd: RawFd) -> bool {
    let wake = crate::interrupt::wake_fd().map_or(-1, |w| w.as_raw_fd());
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            },
            // A negative descriptor is ignored.
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two pollfd structures we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // Cannot poll: the write blocks as it would have.
            return true;
        }
        if fds[0].revents != 0 {
            return true;
        }
        if fds[1].revents != 0 {
            return false;
        }
    }
}

/// The width of the terminal on stderr in columns; else `COLUMNS`; else 80.
fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills the winsize structure we own.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(STDERR, libc::TIOCGWINSZ, &mut size) } == 0 && size.ws_col > 0 {
        return usize::from(size.ws_col);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|&c| c > 0)
        .unwrap_or(80)
}

/// `text` cut to at most `width` columns, ending in `...` where it was cut. A line
/// wider than its terminal wraps, and `\r\x1b[K` clears only its last row: every
/// redraw left a copy of the rest in the scrollback. Never splits a character or an
/// escape sequence (which takes no column; a colour cut off is reset); wide characters
/// (CJK, emoji) take two columns, combining marks none.
fn fit(text: &str, width: usize) -> Cow<'_, str> {
    const MORE: &str = "...";
    if columns(text) <= width {
        return Cow::Borrowed(text);
    }
    let room = width.saturating_sub(MORE.len());
    let mut out = String::with_capacity(width + MORE.len());
    let mut used = 0;
    let mut escaped = false;
    for unit in units(text) {
        if unit.starts_with('\x1b') {
            out.push_str(unit);
            escaped = true;
            continue;
        }
        let w = unit.chars().map(char_width).sum::<usize>();
        if used + w > room {
            break;
        }
        out.push_str(unit);
        used += w;
    }
    out.push_str(&MORE[..width.min(MORE.len())]);
    if escaped {
        out.push_str("\x1b[0m");
    }
    Cow::Owned(out)
}

/// The columns `text` takes on a terminal.
fn columns(text: &str) -> usize {
    units(text)
        .filter(|u| !u.starts_with('\x1b'))
        .flat_map(str::chars)
        .map(char_width)
        .sum()
}

/// `text` in pieces that are never split: an escape sequence (`ESC [` up to its
/// final byte, or `ESC` and one character), or one character.
fn units(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let mut chars = rest.char_indices();
        let (_, first) = chars.next()?;
        let end = match (first, chars.next()) {
            ('\x1b', Some((_, '['))) => chars
                .find(|&(_, c)| ('\x40'..='\x7e').contains(&c))
                .map_or(rest.len(), |(i, c)| i + c.len_utf8()),
            ('\x1b', Some((i, c))) => i + c.len_utf8(),
            _ => first.len_utf8(),
        };
        let (unit, tail) = rest.split_at(end);
        rest = tail;
        Some(unit)
    })
}

/// The columns a character takes: none for control characters and combining marks,
/// two for East Asian wide ones and emoji, else one.
fn char_width(c: char) -> usize {
    match u32::from(c) {
        0..=0x1f | 0x7f..=0x9f => 0,
        0x300..=0x36f | 0x1ab0..=0x1aff | 0x1dc0..=0x1dff | 0x200b..=0x200f => 0,
        0x20d0..=0x20ff | 0xfe00..=0xfe0f | 0xfe20..=0xfe2f => 0,
        0x1100..=0x115f | 0x2e80..=0x303e | 0x3041..=0x33ff | 0x3400..=0x4dbf => 2,
        0x4e00..=0x9fff | 0xa000..=0xa4cf | 0xac00..=0xd7a3 | 0xf900..=0xfaff => 2,
        0xfe30..=0xfe4f | 0xff00..=0xff60 | 0xffe0..=0xffe6 => 2,
        0x1f300..=0x1f64f | 0x1f900..=0x1f9ff | 0x20000..=0x3fffd => 2,
        _ => 1,
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
    let fd = if level == Level::Error {
        STDERR
    } else {
        STDOUT
    };
    s.emit(fd, &format!("{line}\n"));
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
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    s.emit(if stderr { STDERR } else { STDOUT }, &format!("{text}\n"));
}

/// Writes plain text to stdout (command results such as `list`), never filtered.
pub fn print(text: &str) {
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    s.emit(STDOUT, &format!("{text}\n"));
}

/// Whether the live status line is drawn (stderr is a terminal).
pub fn status_enabled() -> bool {
    STATE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .status_enabled
}

/// Shows (or, with `None`, removes) the live status line, cut to the terminal's
/// width (less its last column, where some terminals wrap at once).
pub fn status(text: Option<String>) {
    let mut s = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if !s.status_enabled {
        return;
    }
    s.write(STDERR, "\r\x1b[K");
    s.status = text;
    s.draw_status();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_is_cut_to_the_terminal_width() {
        let line = "[4/30] 4 running: compile-everything 7s, link 3s";
        assert_eq!(fit(line, 80), line);
        assert_eq!(fit(line, line.len()), line);
        // Regression (issue 23): a line wider than the terminal wrapped, and each
        // redraw left its first rows in the scrollback.
        assert_eq!(fit(line, 20), "[4/30] 4 running:...");
        assert_eq!(fit(line, 2), "..");
        assert_eq!(fit(line, 0), "");
        for width in 0..=line.len() {
            assert!(columns(&fit(line, width)) <= width, "{width}");
        }
    }

    #[test]
    fn cutting_never_splits_a_character_or_an_escape_sequence() {
        // Two bytes each, one column each.
        assert_eq!(fit("éééééééé", 6), "ééé...");
        // Three bytes each, two columns each: a cut inside one keeps it out.
        assert_eq!(columns("日本語のタスク"), 14);
        assert_eq!(fit("日本語のタスク", 8), "日本...");
        assert_eq!(fit("日本語のタスク", 9), "日本語...");
        // Combining marks take no column.
        assert_eq!(columns("e\u{301}e\u{301}"), 2);
        assert_eq!(fit("e\u{301}e\u{301}xxxx", 5), "e\u{301}e\u{301}...");
        // Escape sequences take none and stay whole; a colour cut off is reset.
        let red = "\x1b[31mfailed: something long\x1b[0m";
        assert_eq!(columns(red), 22);
        assert_eq!(fit(red, 22), red);
        assert_eq!(fit(red, 10), "\x1b[31mfailed:...\x1b[0m");
        assert_eq!(fit("\x1b[31", 1), "\x1b[31");
        // The tree jolt draws in `display`.
        assert_eq!(fit("├╴a └╴b", 5), "├╴...");
    }
}
