//! A task's build log while its execution runs, and the tail of a failed task's log
//! that its report shows.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::store::artifact;

/// At most how much of a failed task's log is read for its report.
pub(super) const TAIL_BYTES: u64 = 1 << 20;

/// Lines of a failed task's log kept for its report.
pub(super) const LOG_TAIL: usize = 200;

/// A task's build log while its execution runs. It is closed when the execution's
/// commands are done, before the artifact is published and committed: a process a
/// command left running (say, one that escaped its group with `setsid`) must not
/// write into a committed artifact.
#[derive(Clone)]
pub(super) struct Log(Arc<Mutex<Option<File>>>);

impl Log {
    pub(super) fn new(file: File) -> Log {
        Log(Arc::new(Mutex::new(Some(file))))
    }

    pub(super) fn write_all(&self, bytes: &[u8]) {
        if let Some(f) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = f.write_all(bytes);
        }
    }

    pub(super) fn line(&self, text: &str) {
        self.write_all(format!("{text}\n").as_bytes());
    }

    pub(super) fn close(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The last `LOG_TAIL` lines of a file, after a line saying how many earlier lines
/// are not shown, if any.
pub(super) fn tail(path: &Path) -> Option<String> {
    // The task may have replaced its log: read only a regular file, only its end.
    let (start, text) = artifact::read_end(path, TAIL_BYTES).ok()?;
    let (before, mid_line) = match start {
        0 => (0, false),
        _ => lines_before(path, start).ok()?,
    };
    Some(last_lines(
        &String::from_utf8_lossy(&text),
        before,
        mid_line,
        LOG_TAIL,
    ))
}

/// How many lines end in the first `end` bytes of a regular file, and whether a line
/// goes on past them.
pub(super) fn lines_before(path: &Path, end: u64) -> std::io::Result<(u64, bool)> {
    use std::io::Read;
    let mut file = crate::util::fs::open_regular(path)?.take(end);
    let mut buf = vec![0u8; 1 << 16];
    let (mut lines, mut last) = (0, b'\n');
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok((lines, last != b'\n')),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[n - 1];
    }
}

/// The last `keep` lines of a log's `end`, which follows `before` lines not read (and,
/// if `mid_line`, begins inside a line, never shown), after a line saying how many
/// lines are not shown, as the output a worker sends back says how many bytes.
pub(super) fn last_lines(end: &str, before: u64, mid_line: bool, keep: usize) -> String {
    let lines: Vec<&str> = end.lines().collect();
    let whole = &lines[usize::from(mid_line).min(lines.len())..];
    let shown = &whole[whole.len().saturating_sub(keep)..];
    let cut = before + (lines.len() - shown.len()) as u64;
    let mut text = match cut {
        0 => String::new(),
        1 => "[... the first line of the output is not shown ...]\n".to_string(),
        n => format!("[... the first {n} lines of the output are not shown ...]\n"),
    };
    text.push_str(&shown.join("\n"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_tail_says_how_many_lines_are_not_shown() {
        let log: String = (1..=5).map(|n| format!("line {n}\n")).collect();
        // All of it read, none cut: no note.
        assert_eq!(last_lines(&log, 0, false, 5), log.trim_end());
        assert_eq!(
            last_lines(&log, 0, false, 4),
            "[... the first line of the output is not shown ...]\nline 2\nline 3\nline 4\nline 5"
        );
        // Regression (issue 23): the last 200 of 5,002 lines did not say so.
        assert_eq!(
            last_lines(&log, 4997, false, 2),
            "[... the first 5000 lines of the output are not shown ...]\nline 4\nline 5"
        );
        // Read from inside a line: its rest is never shown, and it counts once.
        assert_eq!(
            last_lines("ne 1\nline 2\n", 7, true, 200),
            "[... the first 8 lines of the output are not shown ...]\nline 2"
        );
        assert_eq!(
            last_lines("no end in sight", 7, true, 200),
            "[... the first 8 lines of the output are not shown ...]\n"
        );
    }

    #[test]
    fn the_tail_of_a_log_longer_than_what_is_read_counts_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        // Longer than TAIL_BYTES, so its start is counted apart from its end.
        let lines = 2 * TAIL_BYTES as usize / 100;
        let log: String = (0..lines).map(|n| format!("{n:099}\n")).collect();
        std::fs::write(&path, &log).unwrap();
        let text = tail(&path).unwrap();
        let first = text.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "[... the first {} lines of the output are not shown ...]",
                lines - LOG_TAIL
            )
        );
        assert_eq!(text.lines().count(), LOG_TAIL + 1);
        assert_eq!(text.lines().last(), log.lines().last());
    }
}
