//! Run logs: every build writes its full log (every console line, task output and
//! `-v`/`-vv` lines included, whatever the verbosity) to a file of its own under the
//! user's state directory, and keeps a failed task's whole output beside it.
//!
//! ```text
//! $XDG_STATE_HOME/jolt/runs/          (default ~/.local/state/jolt/runs)
//!   20261201T192301Z-4242.log         one run: its command line, then its lines
//!   20261201T192301Z-4242/NAME-ID8.log  the output of a task that failed in it
//! ```
//!
//! Run logs, like `--result` and `--trace` files, hold what tasks print: files are
//! 0600, directories 0700 (`util::fs::create_private`, `create_private_dir`).
//!
//! What they keep is bounded ([`Limits`]: `jolt.log_tail`, `jolt.log_total`): of each
//! task's output the first half of its share as it comes and the last half, its tail,
//! when the task ends, with a line saying how much was left out between; a kept
//! output is its tail. The newest [`KEPT_RUNS`] runs are kept, and older runs are
//! removed until they take at most half of `jolt.log_total`, the other half being
//! what this run may write of task output. `jolt log` prints the last run, `jolt log
//! -l` lists them. A log that cannot be written is never a failure (the caller says
//! why at debug level: this module sits below the console, which writes to it).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The longest task output stays in the run log's buffer.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// How many runs are kept.
pub const KEPT_RUNS: usize = 50;

/// How much task output run logs keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `jolt.log_tail`: bytes of each task's output in the run log, the first half as
    /// it comes and the last half when the task ends; also the most of a failed
    /// task's output kept beside it (its end).
    pub per_task: u64,
    /// `jolt.log_total`: bytes of the runs directory. Older runs are removed until
    /// they take at most half of it; this run writes task output, kept outputs
    /// included, up to the other half (jolt's own lines are always written).
    pub total: u64,
}

struct Run {
    /// Buffered: a task may print millions of lines. Flushed at warnings and errors,
    /// at least every [`FLUSH_EVERY`], and at the end ([`flush`]).
    file: std::io::BufWriter<File>,
    flushed: std::time::Instant,
    /// This run's log, never pruned by it.
    log: PathBuf,
    /// Where the outputs of failed tasks go.
    tasks: PathBuf,
    /// `None` until the settings are read ([`limit`]): nothing is bounded before.
    limits: Option<Limits>,
    /// Bytes of task output this run has written, kept outputs included.
    task_bytes: u64,
    /// Whether this run has said that it takes no more task output.
    full: bool,
    /// The output of each task that has printed, by its key.
    outputs: HashMap<String, TaskOutput>,
}

/// What the run log has of one task's output.
#[derive(Default)]
struct TaskOutput {
    /// Bytes written as they came: at most half the task's share.
    logged: u64,
    /// Past that half: the newest lines, at most the other half, written when the
    /// task ends.
    tail: VecDeque<String>,
    tail_bytes: u64,
    /// Lines and bytes between the two halves, never written.
    left_out_lines: u64,
    left_out_bytes: u64,
}

impl TaskOutput {
    /// Takes `text` (a line) into the tail of at most `room` bytes, dropping its
    /// oldest lines; a line longer than the tail keeps its end.
    fn hold(&mut self, text: &str, room: u64) {
        let keep = last_bytes(text, room.saturating_sub(1) as usize);
        self.left_out_bytes += (text.len() - keep.len()) as u64;
        self.tail.push_back(keep.to_string());
        self.tail_bytes += keep.len() as u64 + 1;
        while self.tail_bytes > room {
            let Some(old) = self.tail.pop_front() else {
                break;
            };
            self.tail_bytes -= old.len() as u64 + 1;
            self.left_out_lines += 1;
            self.left_out_bytes += old.len() as u64 + 1;
        }
    }
}

/// The end of `text` of at most `n` bytes, cut at a character boundary.
fn last_bytes(text: &str, n: usize) -> &str {
    let mut start = text.len().saturating_sub(n);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

impl Run {
    fn write(&mut self, text: &str, flush: bool) {
        let _ = writeln!(self.file, "{text}");
        if flush || self.flushed.elapsed() >= FLUSH_EVERY {
            let _ = self.file.flush();
            self.flushed = std::time::Instant::now();
        }
    }

    /// Whether this run may write `bytes` more of task output; counts them if so.
    fn take(&mut self, bytes: u64) -> bool {
        let Some(limits) = self.limits else {
            return true;
        };
        if self.task_bytes + bytes <= limits.total / 2 {
            self.task_bytes += bytes;
            return true;
        }
        if !std::mem::replace(&mut self.full, true) {
            self.write(
                &format!(
                    "[WARNING] This run has logged {} bytes of task output, half of jolt.log_total: no more is logged (the console showed it)",
                    self.task_bytes
                ),
                false,
            );
        }
        false
    }

    /// Writes a line of task output within this run's share.
    fn write_output(&mut self, text: &str) {
        if self.take(text.len() as u64 + 1) {
            self.write(text, false);
        }
    }

    /// A line of `task`'s output: written while the task has printed less than half
    /// its share, else held in its tail.
    fn task_line(&mut self, task: &str, text: &str) {
        let Some(limits) = self.limits else {
            return self.write_output(text);
        };
        let head = limits.per_task / 2;
        let output = self.outputs.entry(task.to_string()).or_default();
        let len = text.len() as u64 + 1;
        if output.tail.is_empty() && output.left_out_lines == 0 && output.logged + len <= head {
            output.logged += len;
            self.write_output(text);
        } else {
            output.hold(text, limits.per_task - head);
        }
    }

    /// Writes what `task`'s tail holds, after a line saying what was left out.
    fn task_done(&mut self, task: &str, name: &str) {
        let Some(output) = self.outputs.remove(task) else {
            return;
        };
        if output.left_out_bytes > 0 {
            self.write(
                &format!(
                    "[   INFO] {} lines ({} bytes) of the output of {name} left out of the run log (jolt.log_tail): the console showed them",
                    output.left_out_lines, output.left_out_bytes
                ),
                false,
            );
        }
        for line in &output.tail {
            self.write_output(line);
        }
    }
}

static RUN: Mutex<Option<Run>> = Mutex::new(None);

/// Where run logs live: `$XDG_STATE_HOME/jolt/runs`, else `~/.local/state/jolt/runs`.
pub fn dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/"))
                .join(".local")
                .join("state")
        });
    base.join("jolt").join("runs")
}

/// Starts this process's run log, its first line the command line; why it could not
/// be, otherwise (the console says so, at debug level: this module sits below it).
pub fn start(args: &[String]) -> Result<(), String> {
    let dir = dir();
    let now = crate::util::fs::now_secs();
    let stamp: String = crate::util::fs::format_timestamp(now)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let name = format!("{stamp}-{}", std::process::id());
    let opened = crate::util::fs::create_private_dir(&dir).and_then(|()| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join(format!("{name}.log")))
    });
    match opened {
        Ok(mut file) => {
            let command = args.join(" ");
            let _ = writeln!(file, "$ jolt {}", crate::util::secrets::redact(&command));
            *RUN.lock().unwrap_or_else(|e| e.into_inner()) = Some(Run {
                file: std::io::BufWriter::with_capacity(1 << 16, file),
                flushed: std::time::Instant::now(),
                log: dir.join(format!("{name}.log")),
                tasks: dir.join(name),
                limits: None,
                task_bytes: 0,
                full: false,
                outputs: HashMap::new(),
            });
            prune(None);
            Ok(())
        }
        Err(e) => Err(format!("no run log in {}: {e}", dir.display())),
    }
}

/// Bounds what this run keeps from now on, and removes older runs past half of
/// `limits.total` (once the settings are read).
pub fn limit(limits: Limits) {
    let current = {
        let mut run = RUN.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = run.as_mut() else {
            return;
        };
        r.limits = Some(limits);
        r.log.clone()
    };
    prune(Some((limits.total / 2, &current)));
}

/// Appends a line of jolt's own (secrets already masked by the caller); an `urgent`
/// one (a warning, an error) is written out at once.
pub fn line(text: &str, urgent: bool) {
    if let Some(r) = RUN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        r.write(text, urgent);
    }
}

/// Appends a line of the output of the task whose key (unique in the build) is
/// `task`, within its share.
pub fn output(task: &str, text: &str) {
    if let Some(r) = RUN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        r.task_line(task, text);
    }
}

/// Ends the output of the task `task`, called `name` in messages: writes its tail.
pub fn task_done(task: &str, name: &str) {
    if let Some(r) = RUN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        r.task_done(task, name);
    }
}

/// Writes out what the run log holds (at the end of a command), the tails of tasks
/// that did not end among it.
pub fn flush() {
    if let Some(r) = RUN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let mut unfinished: Vec<String> = r.outputs.keys().cloned().collect();
        unfinished.sort();
        for task in unfinished {
            r.task_done(&task, &task);
        }
        let _ = r.file.flush();
    }
}

/// Keeps a failed remote task's output (the tail its worker sent) with this run, at
/// most its last `jolt.log_tail` bytes.
pub fn keep_task_text(name: &str, text: &str) -> Option<PathBuf> {
    let per_task = per_task();
    let size = text.len() as u64;
    let cut = match per_task {
        // From the first whole line of the share, if it has one.
        Some(n) if size > n => {
            let tail = last_bytes(text, n as usize);
            tail.split_once('\n').map_or(tail, |(_, rest)| rest)
        }
        _ => text,
    };
    let left_out = size - cut.len() as u64;
    keep(name, cut.len() as u64, &mut |out| {
        write_left_out(out, left_out)?;
        out.write_all(cut.as_bytes())
    })
}

/// Keeps a failed task's output (`log`, its build log: a regular file, read never
/// through a link) with this run, at most its last `jolt.log_tail` bytes, the lines
/// that say why it failed after it; returns where.
pub fn keep_task_log(name: &str, log: &Path, why: &[String]) -> Option<PathBuf> {
    let mut src = crate::util::fs::open_regular(log).ok()?;
    let size = src.metadata().ok()?.len();
    // Past the share: from the first whole line of the last share, if it has one.
    let left_out = match per_task() {
        Some(n) if size > n => {
            src.seek(std::io::SeekFrom::Start(size - n)).ok()?;
            let start = size - n + line_end(&mut src).ok()?.unwrap_or(0);
            src.seek(std::io::SeekFrom::Start(start)).ok()?;
            start
        }
        _ => 0,
    };
    keep(name, size - left_out, &mut |out| {
        let mut out = std::io::BufWriter::new(out);
        write_left_out(&mut out, left_out)?;
        let ends_line = copy_lines(&mut (&mut src).take(size - left_out), &mut out)?;
        if !ends_line && !why.is_empty() {
            writeln!(out)?;
        }
        why.iter().try_for_each(|line| writeln!(out, "{line}"))?;
        out.flush()
    })
}

/// `jolt.log_tail`, once the settings are read.
fn per_task() -> Option<u64> {
    RUN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|r| r.limits)
        .map(|l| l.per_task)
}

/// How many bytes of `src` its current line takes, its end included; `None` when it
/// does not end.
fn line_end(src: &mut impl Read) -> std::io::Result<Option<u64>> {
    let mut buf = vec![0u8; 1 << 16];
    let mut read = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(end) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok(Some(read + end as u64 + 1));
        }
        read += n as u64;
    }
}

/// The line that opens a kept output whose beginning was left out.
fn write_left_out(out: &mut impl Write, left_out: u64) -> std::io::Result<()> {
    if left_out == 0 {
        return Ok(());
    }
    writeln!(
        out,
        "[... {left_out} bytes of output left out (jolt.log_tail); its end follows ...]"
    )
}

/// Copies `src` to `out`; whether what it copied ends a line (or was nothing).
fn copy_lines(src: &mut impl std::io::Read, out: &mut impl Write) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 1 << 16];
    let mut last = b'\n';
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(last == b'\n'),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        last = buf[n - 1];
    }
}

/// Writes `NAME.log` (about `bytes` long) beside this run's log with `write`, if this
/// run's share of task output has room for it; returns where.
fn keep(
    name: &str,
    bytes: u64,
    write: &mut dyn FnMut(&mut File) -> std::io::Result<()>,
) -> Option<PathBuf> {
    let dir = {
        let mut run = RUN.lock().unwrap_or_else(|e| e.into_inner());
        let r = run.as_mut()?;
        let _ = r.file.flush();
        if !r.take(bytes) {
            return None;
        }
        r.tasks.clone()
    };
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dest = dir.join(format!("{safe}.log"));
    let kept = crate::util::fs::create_private_dir(&dir)
        .and_then(|()| crate::util::fs::create_private(&dest))
        .and_then(|mut out| write(&mut out));
    // A log that cannot be kept is no reason to fail anything.
    kept.ok().map(|()| dest)
}

/// The runs kept, oldest first.
pub fn runs() -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    sort_runs(&mut logs);
    logs
}

/// Orders run logs, named `<UTC second>-<pid>.log`, oldest first: by second, then by
/// pid as a number (as text, pid 999 came after pid 1000 of the same second).
fn sort_runs(logs: &mut [PathBuf]) {
    logs.sort_by_cached_key(|p| {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match stem.rsplit_once('-') {
            Some((stamp, pid)) => (
                stamp.to_string(),
                pid.parse::<u64>().unwrap_or(u64::MAX),
                stem.clone(),
            ),
            None => (stem.clone(), u64::MAX, stem),
        }
    });
}

/// Removes all but the newest [`KEPT_RUNS`] runs and, given `(bytes, current)`, the
/// oldest runs but `current` until the others take at most `bytes`.
fn prune(size: Option<(u64, &Path)>) {
    let logs = runs();
    let (old, kept) = logs.split_at(logs.len().saturating_sub(KEPT_RUNS));
    for log in old {
        remove_run(log);
    }
    let Some((bytes, current)) = size else {
        return;
    };
    let others: Vec<(&PathBuf, u64)> = kept
        .iter()
        .filter(|log| log.as_path() != current)
        .map(|log| (log, run_size(log)))
        .collect();
    let mut total: u64 = others.iter().map(|(_, size)| size).sum();
    for (log, size) in others {
        if total <= bytes {
            break;
        }
        remove_run(log);
        total -= size;
    }
}

/// A run's log and its kept outputs.
fn remove_run(log: &Path) {
    let _ = std::fs::remove_file(log);
    let _ = std::fs::remove_dir_all(log.with_extension(""));
}

/// The bytes of a run's log and of its kept outputs.
fn run_size(log: &Path) -> u64 {
    let size = |p: &Path| std::fs::symlink_metadata(p).map_or(0, |m| m.len());
    let kept: u64 = std::fs::read_dir(log.with_extension(""))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| size(&e.path()))
        .sum();
    size(log) + kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_tail_keeps_its_newest_lines_within_its_room() {
        let mut output = TaskOutput::default();
        for line in ["aaaa", "bbbb", "cccc"] {
            output.hold(line, 10);
        }
        // Two lines of 5 bytes (a newline each) fit in 10.
        assert_eq!(output.tail, ["bbbb", "cccc"]);
        assert_eq!((output.left_out_lines, output.left_out_bytes), (1, 5));
        // A line longer than the room keeps its end.
        output.hold("0123456789abcdef", 10);
        assert_eq!(output.tail, ["789abcdef"]);
        assert_eq!(output.tail_bytes, 10);
        assert_eq!(last_bytes("ééé", 3), "é");
        let mut none = TaskOutput::default();
        none.hold("x", 0);
        assert!(none.tail.is_empty());
    }

    #[test]
    fn runs_of_one_second_are_ordered_by_pid_as_a_number() {
        let mut logs: Vec<PathBuf> = [
            "20261202T045531Z-5.log",
            "20261202T045530Z-1000.log",
            "20261202T045530Z-999.log",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        sort_runs(&mut logs);
        // Regression: sorted as text, pid 1000 came before pid 999 of its second.
        assert_eq!(
            logs,
            [
                "20261202T045530Z-999.log",
                "20261202T045530Z-1000.log",
                "20261202T045531Z-5.log"
            ]
            .iter()
            .map(PathBuf::from)
            .collect::<Vec<_>>()
        );
    }
}
