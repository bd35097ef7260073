//! The guardian: no process of a task outlives the jolt that started it, even when
//! jolt is killed with SIGKILL.
//!
//! Every command runs in a process group of its own. Before it runs anything, a jolt
//! that will run commands (`build`, `amqp-worker`) forks a guardian process that
//! reads the process groups in use from a pipe (`+PGID` when a command starts,
//! `-PGID` once its group is gone). Only jolt holds the pipe's write end, so when jolt
//! ends, however it ends, the guardian reads end-of-file, kills every group still
//! registered with SIGKILL, grandchildren included, and exits. The guardian ignores
//! the signals a terminal or an orchestrator sends and lives in a session of its own,
//! so that killing jolt's process group does not take it down first.
//!
//! A command is started with `posix_spawn` (a vfork: a fork would copy jolt's page
//! tables for each command, half of a trivial task's cost), so nothing runs in the
//! child before its shell does. To cover the instant between its start and its
//! registration, jolt announces each start first (`?`), then registers it (`+PGID`)
//! or withdraws it (`!`). A guardian that reads end-of-file with a start announced
//! and not registered waits until it has been handed to jolt's reaper, like the
//! command, and kills the process groups of that instant's orphans: leaders of their
//! group, in jolt's session, children of the same reaper, started since the
//! announcement (`/proc/PID/stat`). Where the guardian could not start, commands are
//! forked with `PR_SET_PDEATHSIG` instead.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

static PIPE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Starts the guardian. Call it while the process has a single thread (at the start
/// of a command): the child of a fork runs Rust code.
pub fn start() {
    let mut fds: [RawFd; 2] = [0; 2];
    // SAFETY: `fds` is valid for two descriptors; O_CLOEXEC keeps both ends out of
    // the commands jolt runs.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        crate::console::debug(&format!("no guardian: {}", std::io::Error::last_os_error()));
        return;
    }
    let (read, write) = (fds[0], fds[1]);
    // SAFETY: the process is single-threaded here (see above), so the child may run
    // arbitrary code; it never returns from `serve`.
    match unsafe { libc::fork() } {
        -1 => {
            crate::console::debug(&format!("no guardian: {}", std::io::Error::last_os_error()));
            // SAFETY: both descriptors are ours and used nowhere else.
            unsafe {
                libc::close(read);
                libc::close(write);
            }
        }
        0 => serve(read, write),
        _ => {
            // SAFETY: `read` is the child's end; `write` is ours alone from now on.
            unsafe { libc::close(read) };
            let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(write) });
            *PIPE.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
        }
    }
}

fn send(line: &str) {
    let mut pipe = PIPE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(file) = pipe.as_mut() {
        if file.write_all(line.as_bytes()).is_err() {
            // The guardian is gone: later commands get PR_SET_PDEATHSIG.
            *pipe = None;
        }
    }
}

/// Whether a guardian watches this process's commands.
pub fn active() -> bool {
    PIPE.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// A command about to start, announced to the guardian: [`Spawning::started`]
/// registers its process group; dropped without, it is withdrawn.
pub struct Spawning {
    done: bool,
}

/// Announces that a command is about to start.
pub fn spawning() -> Spawning {
    // When, by jolt's clock: a guardian that reads it late must not take it for later.
    send(&format!("?{}\n", boot_ticks()));
    Spawning { done: false }
}

impl Spawning {
    /// Registers the process group of the command that just started.
    pub fn started(mut self, pgid: i32) {
        self.done = true;
        send(&format!("+{pgid}\n"));
    }
}

impl Drop for Spawning {
    fn drop(&mut self) {
        if !self.done {
            send("!\n");
        }
    }
}

/// Unregisters a process group that is gone (its leader reaped, the rest killed).
pub fn release(pgid: i32) {
    send(&format!("-{pgid}\n"));
}

/// The guardian's life: read registrations until jolt is gone, then kill what is left.
fn serve(read: RawFd, write: RawFd) -> ! {
    // SAFETY: getppid, getsid and getpgrp only read this process's ids (jolt's
    // session and group, before setsid below).
    let (jolt, session, group) = unsafe { (libc::getppid(), libc::getsid(0), libc::getpgrp()) };
    // SAFETY: plain system calls on descriptors and signals of this (child) process.
    unsafe {
        libc::close(write);
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            libc::signal(signal, libc::SIG_IGN);
        }
        libc::setsid();
        let name = c"jolt-guardian";
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
        // Hold nothing of jolt's: not its output pipes (whoever reads them would wait
        // for us), not its lock files.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        libc::dup2(read, 3);
        close_from(4);
    }
    // SAFETY: descriptor 3 is the pipe's read end, owned by nothing else now.
    let pipe = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(3) });
    let mut groups = std::collections::HashSet::new();
    // When each start in flight was announced, in clock ticks since boot; a start
    // that ends takes the newest, so the oldest stays the lower bound.
    let mut in_flight: Vec<u64> = Vec::new();
    let mut reader = std::io::BufReader::new(pipe);
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::BufRead::read_line(&mut reader, &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let (sign, rest) = line.trim().split_at(1.min(line.trim().len()));
                match (sign, rest.parse::<i32>()) {
                    ("?", _) => in_flight.push(rest.parse().unwrap_or_else(|_| boot_ticks())),
                    ("!", _) => {
                        in_flight.pop();
                    }
                    ("+", Ok(pgid)) if pgid > 1 => {
                        in_flight.pop();
                        groups.insert(pgid);
                    }
                    ("-", Ok(pgid)) => {
                        groups.remove(&pgid);
                    }
                    _ => {}
                }
            }
        }
    }
    for pgid in groups {
        // SAFETY: signals a process group jolt started and registered.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    if let Some(&since) = in_flight.first() {
        kill_orphans(jolt, session, group, since);
    }
    // SAFETY: ends this process without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}

/// Clock ticks (as `/proc/PID/stat` counts a start) since boot.
fn boot_ticks() -> u64 {
    // SAFETY: clock_gettime writes into `now`, which we own; sysconf reads a limit.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u128;
    let nanos = now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128;
    (nanos * hz / 1_000_000_000) as u64
}

/// Kills the commands jolt started and had not registered when it died: once this
/// process has been handed to jolt's reaper, the process groups of the processes in
/// jolt's `session` (outside jolt's own `group`) that are children of the same
/// reaper and started since `since`: a command's leader, or what it started in the
/// background when the leader is gone already.
fn kill_orphans(jolt: i32, session: i32, group: i32, since: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    // SAFETY: getppid only reads this process's parent.
    while unsafe { libc::getppid() } == jolt && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: as above.
    let reaper = unsafe { libc::getppid() };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(_pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(stat) = ProcStat::parse(&stat) else {
            continue;
        };
        // One tick of slack: the announcement and the start may share a tick.
        if stat.pgrp != group
            && stat.pgrp > 1
            && stat.session == session
            && stat.ppid == reaper
            && stat.start + 1 >= since
        {
            // SAFETY: signals the process group of a command jolt started.
            unsafe { libc::kill(-stat.pgrp, libc::SIGKILL) };
        }
    }
}

/// What jolt reads of `/proc/PID/stat`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ProcStat {
    /// `Z` for a zombie.
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    session: i32,
    /// Clock ticks since boot.
    start: u64,
}

impl ProcStat {
    pub fn parse(stat: &str) -> Option<ProcStat> {
        // The name (field 2) is in parentheses and may hold anything: fields are
        // counted from the last ')'. Field 3 (state) is then index 0.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(ProcStat {
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            pgrp: fields.get(2)?.parse().ok()?,
            session: fields.get(3)?.parse().ok()?,
            start: fields.get(19)?.parse().ok()?,
        })
    }
}

/// Closes every descriptor from `first` on.
///
/// # Safety
///
/// Descriptors from `first` on must not be in use by anything that still runs: call
/// it in a freshly forked, single-threaded child only.
unsafe fn close_from(first: i32) {
    // SAFETY: close_range only closes descriptors, which the caller guarantees unused.
    if unsafe { libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0u32) } == 0 {
        return;
    }
    // Kernels without close_range: one by one, up to the soft limit.
    // SAFETY: sysconf only reads a limit.
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    let max = if max <= 0 {
        1024
    } else {
        max.min(1 << 20) as i32
    };
    for fd in first..max {
        // SAFETY: as above; closing a descriptor that is not open is harmless.
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (a) b (c)) S 1 4242 17 34816 4242 4194304 93 0 0 0 0 0 0 0 20 0 1 0 987654 2596864 229 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            ProcStat::parse(stat),
            Some(ProcStat {
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                session: 17,
                start: 987654
            })
        );
        assert_eq!(ProcStat::parse("1 (x) S 0"), None);
    }

    #[test]
    fn this_process_starts_before_now() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let me = ProcStat::parse(&stat).unwrap();
        assert!(me.start <= boot_ticks());
        // SAFETY: reads this process's ids.
        assert_eq!(me.ppid, unsafe { libc::getppid() });
    }
}
