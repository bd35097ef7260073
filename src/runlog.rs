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
//! The newest [`KEPT_RUNS`] runs are kept. `jolt log` prints the last run, `jolt log
//! -l` lists them. A log that cannot be written is never a failure (the caller says
//! why at debug level: this module sits below the console, which writes to it).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The longest task output stays in the run log's buffer.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// How many runs are kept.
pub const KEPT_RUNS: usize = 50;

struct Run {
    /// Buffered: a task may print millions of lines. Flushed at warnings and errors,
    /// at least every [`FLUSH_EVERY`], and at the end ([`flush`]).
    file: std::io::BufWriter<File>,
    flushed: std::time::Instant,
    /// Where the outputs of failed tasks go.
    tasks: PathBuf,
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
                tasks: dir.join(name),
            });
            prune();
            Ok(())
        }
        Err(e) => Err(format!("no run log in {}: {e}", dir.display())),
    }
}

/// Appends a line of jolt's own (secrets already masked by the caller); an `urgent`
/// one (a warning, an error) is written out at once.
pub fn line(text: &str, urgent: bool) {
    append(text, urgent);
}

/// Appends a line of task output.
pub fn output(text: &str) {
    append(text, false);
}

fn append(text: &str, flush: bool) {
    let mut run = RUN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = run.as_mut() {
        let _ = writeln!(r.file, "{text}");
        if flush || r.flushed.elapsed() >= FLUSH_EVERY {
            let _ = r.file.flush();
            r.flushed = std::time::Instant::now();
        }
    }
}

/// Writes out what the run log holds (at the end of a command).
pub fn flush() {
    if let Some(r) = RUN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let _ = r.file.flush();
    }
}

/// Keeps a failed remote task's output (the tail its worker sent) with this run.
pub fn keep_task_text(name: &str, text: &str) -> Option<PathBuf> {
    keep(name, &mut |out| out.write_all(text.as_bytes()))
}

/// Keeps a failed task's output (`log`, its build log: a regular file, read never
/// through a link) with this run, the lines that say why it failed after it; returns
/// where.
pub fn keep_task_log(name: &str, log: &Path, why: &[String]) -> Option<PathBuf> {
    let mut src = crate::util::fs::open_regular(log).ok()?;
    keep(name, &mut |out| {
        let mut out = std::io::BufWriter::new(out);
        let ends_line = copy_lines(&mut src, &mut out)?;
        if !ends_line && !why.is_empty() {
            writeln!(out)?;
        }
        why.iter().try_for_each(|line| writeln!(out, "{line}"))?;
        out.flush()
    })
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

/// Writes `NAME.log` beside this run's log with `write`; returns where.
fn keep(name: &str, write: &mut dyn FnMut(&mut File) -> std::io::Result<()>) -> Option<PathBuf> {
    flush();
    let dir = RUN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()?
        .tasks
        .clone();
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

/// Removes all but the newest [`KEPT_RUNS`] runs.
fn prune() {
    let logs = runs();
    if logs.len() <= KEPT_RUNS {
        return;
    }
    for old in &logs[..logs.len() - KEPT_RUNS] {
        let _ = std::fs::remove_file(old);
        let _ = std::fs::remove_dir_all(old.with_extension(""));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
