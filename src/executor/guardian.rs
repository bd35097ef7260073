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
//! registration, jolt announces each start first (`?SEQ TICKS LASTPID`: when, as a
//! [`Moment`]), then registers it (`+PGID SEQ`) or withdraws it (`!SEQ`). A guardian
//! that reads end-of-file with a start announced and not registered notes that
//! moment too, waits until it has been handed to jolt's reaper, like the command,
//! and then, once, kills the process groups that only that instant's command can
//! have made ([`orphaned_groups`]): led by a child of the same reaper in jolt's
//! session, its leader started between the announcement and jolt's end, and no
//! member older than the announcement. A user's job begun before the announcement
//! is never one, whatever it starts and whatever it leaves to the reaper. Where the
//! guardian could not start, commands are forked with `PR_SET_PDEATHSIG` instead.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
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
    send_with(|| line.to_string());
}

/// Sends the line `line` makes, made under the pipe's lock: lines reach the guardian
/// in the order their moments were taken.
fn send_with(line: impl FnOnce() -> String) {
    let mut pipe = PIPE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(file) = pipe.as_mut() {
        if file.write_all(line().as_bytes()).is_err() {
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
    /// Which announcement: starts of several threads may be in flight at once.
    seq: u64,
    done: bool,
}

/// Announces that a command is about to start.
pub fn spawning() -> Spawning {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // When, by jolt's clock: a guardian that reads it late must not take it for later.
    send_with(|| {
        let now = Moment::now();
        let last_pid = now
            .last_pid
            .map_or_else(|| "-".to_string(), |p| p.to_string());
        format!("?{seq} {} {last_pid}\n", now.ticks)
    });
    Spawning { seq, done: false }
}

impl Spawning {
    /// Registers the process group of the command that just started.
    pub fn started(mut self, pgid: i32) {
        self.done = true;
        send(&format!("+{pgid} {}\n", self.seq));
    }
}

impl Drop for Spawning {
    fn drop(&mut self) {
        if !self.done {
            send(&format!("!{}\n", self.seq));
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
    // The starts in flight, in the order they were announced.
    let mut in_flight: Vec<(u64, Moment)> = Vec::new();
    let mut reader = std::io::BufReader::new(pipe);
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::BufRead::read_line(&mut reader, &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = line.trim();
                let (sign, rest) = line.split_at(1.min(line.len()));
                let mut words = rest.split(' ');
                let mut number = || words.next().and_then(|w| w.parse::<i64>().ok());
                match (sign, number(), number(), number()) {
                    ("?", Some(seq), ticks, last_pid) => {
                        let moment = Moment {
                            ticks: ticks.map_or_else(boot_ticks, |t| t as u64),
                            last_pid: last_pid.map(|p| p as i32),
                        };
                        in_flight.push((seq as u64, moment));
                    }
                    ("!", Some(seq), _, _) => in_flight.retain(|&(s, _)| s != seq as u64),
                    ("+", Some(pgid), Some(seq), _) => {
                        in_flight.retain(|&(s, _)| s != seq as u64);
                        if pgid > 1 {
                            groups.insert(pgid as i32);
                        }
                    }
                    ("-", Some(pgid), _, _) => {
                        groups.remove(&(pgid as i32));
                    }
                    _ => {}
                }
            }
        }
    }
    // Jolt is gone: nothing it started can have started later than now.
    let end = Moment::now();
    for pgid in groups {
        // SAFETY: signals a process group jolt started and registered.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    if let Some(&(_, since)) = in_flight.first() {
        kill_orphans(jolt, session, group, since, end);
    }
    // SAFETY: ends this process without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
}

/// An instant as the guardian compares it with the start of a process.
///
/// `/proc/PID/stat` gives a start in clock ticks since boot (1/100 s), which cannot
/// order two starts within one tick; process ids can, handed out in increasing order
/// until they wrap at `pid_max` (barring a wrap within the tick, ids are exact).
/// Where this namespace's last id is unknown (`/proc/sys/kernel/ns_last_pid` needs
/// CONFIG_CHECKPOINT_RESTORE), a start within the moment's tick counts as at the
/// moment, on either side: a process started up to 1/100 s before an announcement
/// then counts as after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Moment {
    /// Clock ticks since boot, rounded down as `/proc/PID/stat` rounds a start.
    ticks: u64,
    /// The last process id handed out in jolt's pid namespace by then.
    last_pid: Option<i32>,
}

impl Moment {
    fn now() -> Moment {
        // The tick first: a process started after this call starts in it or later,
        // and one started before has an id at or below the last.
        let ticks = boot_ticks();
        let last_pid = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Moment { ticks, last_pid }
    }

    /// Whether `process` started after this moment, by its tick, within the tick by
    /// its id. An id at or below the last one counts as older: a process of the
    /// same tick started before, or after ids wrapped, which only spares a command.
    fn precedes(self, process: &ProcStat) -> bool {
        process.start > self.ticks
            || process.start == self.ticks && self.last_pid.is_none_or(|last| process.pid > last)
    }

    /// Whether `process` started at or before this moment (see [`Moment::precedes`]);
    /// a wrap of ids since counts as later, which only spares a command.
    fn follows(self, process: &ProcStat) -> bool {
        process.start < self.ticks
            || process.start == self.ticks && self.last_pid.is_none_or(|last| process.pid <= last)
    }
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

/// Kills the command jolt started at `since` and had not registered when it died
/// (`end`): once this process has been handed to jolt's reaper (as the command was,
/// at the same time), it reads every process once and kills [`orphaned_groups`].
/// The announcement is forgotten then: nothing later is looked at.
fn kill_orphans(jolt: i32, session: i32, group: i32, since: Moment, end: Moment) {
    // The handover follows end-of-file once jolt's memory is freed: milliseconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    // SAFETY: getppid only reads this process's parent.
    while unsafe { libc::getppid() } == jolt && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: as above. Jolt itself if the handover did not happen: then the
    // command is still its child.
    let reaper = unsafe { libc::getppid() };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let processes: Vec<ProcStat> = entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<i32>().is_ok())
        })
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter_map(|stat| ProcStat::parse(&stat))
        .collect();
    let jolt = Jolt {
        session,
        group,
        reaper,
    };
    for pgid in orphaned_groups(&processes, jolt, since, end) {
        // SAFETY: signals the process group of a command jolt started.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// Where a dead jolt's commands are to be found.
#[derive(Debug, Clone, Copy)]
struct Jolt {
    /// Jolt's session, which its commands stay in.
    session: i32,
    /// Jolt's own process group (what it runs itself, git say, runs there).
    group: i32,
    /// The parent of jolt's children since jolt died.
    reaper: i32,
}

/// The process groups among `processes` that only the command jolt announced at
/// `since` and started before its `end` can have made: groups whose leader (pid =
/// pgid; a zombie counts) is a child of jolt's reaper in jolt's session, outside
/// jolt's own group, started between `since` and `end`, and whose every member
/// started after `since`. A user's job in the session is never one: its leader
/// started before the announcement, or is not a child of the reaper, or a member
/// is older; what it starts later (even left to the reaper) does not lead its group.
/// Starts are compared as [`Moment`] says: within a tick by process id, or, without
/// ids, a start in the announcement's tick counts as after it.
///
/// A command whose leader has already exited and been reaped leads nothing: what it
/// left running in the background in that instant is not killed.
fn orphaned_groups(processes: &[ProcStat], jolt: Jolt, since: Moment, end: Moment) -> Vec<i32> {
    processes
        .iter()
        .filter(|p| {
            p.pid == p.pgrp
                && p.pgrp > 1
                && p.pgrp != jolt.group
                && p.session == jolt.session
                && p.ppid == jolt.reaper
                && since.precedes(p)
                && end.follows(p)
        })
        .map(|leader| leader.pgrp)
        .filter(|&pgid| {
            processes
                .iter()
                .filter(|p| p.pgrp == pgid)
                .all(|member| since.precedes(member))
        })
        .collect()
}

/// What jolt reads of `/proc/PID/stat`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ProcStat {
    pid: i32,
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
        let close = stat.rfind(')')?;
        let rest = &stat[close + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(ProcStat {
            pid: stat[..close].split(" (").next()?.trim().parse().ok()?,
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
                pid: 4242,
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
        assert!(Moment::now().follows(&me));
        assert!(!Moment::now().precedes(&me));
        // SAFETY: reads this process's ids.
        assert_eq!((me.pid, me.ppid), unsafe {
            (libc::getpid(), libc::getppid())
        });
    }

    /// A process: pid, parent, group, session, start tick.
    fn process(pid: i32, ppid: i32, pgrp: i32, session: i32, start: u64) -> ProcStat {
        ProcStat {
            pid,
            state: 'S',
            ppid,
            pgrp,
            session,
            start,
        }
    }

    #[test]
    fn only_groups_a_dead_jolts_command_can_have_made_are_orphaned() {
        // Jolt: session 100, group 50, its children handed to 1; it announced a start
        // in tick 1000 after pid 500 and died in tick 1200 after pid 700.
        let jolt = Jolt {
            session: 100,
            group: 50,
            reaper: 1,
        };
        let since = Moment {
            ticks: 1000,
            last_pid: Some(500),
        };
        let end = Moment {
            ticks: 1200,
            last_pid: Some(700),
        };
        let zombie = ProcStat {
            state: 'Z',
            ..process(600, 1, 600, 100, 1100)
        };
        let table: &[(&str, Vec<ProcStat>, &[i32])] = &[
            ("the command", vec![process(600, 1, 600, 100, 1100)], &[600]),
            ("its leader a zombie", vec![zombie], &[600]),
            (
                "the command with a child started after jolt's end",
                vec![
                    process(600, 1, 600, 100, 1100),
                    process(900, 600, 600, 100, 1500),
                ],
                &[600],
            ),
            (
                "in the announcement's tick, a later id",
                vec![process(501, 1, 501, 100, 1000)],
                &[501],
            ),
            (
                "in the announcement's tick, an earlier id",
                vec![process(499, 1, 499, 100, 1000)],
                &[],
            ),
            (
                "in the tick before",
                vec![process(600, 1, 600, 100, 999)],
                &[],
            ),
            (
                "in jolt's last tick, an earlier id",
                vec![process(690, 1, 690, 100, 1200)],
                &[690],
            ),
            (
                "in jolt's last tick, a later id",
                vec![process(710, 1, 710, 100, 1200)],
                &[],
            ),
            (
                "after jolt's end",
                vec![process(650, 1, 650, 100, 1201)],
                &[],
            ),
            (
                // The bug: the user's job left a process to the reaper while jolt
                // was starting a command, and its whole group was killed.
                "a user's job with a member started since, handed to the reaper",
                vec![
                    process(300, 7, 300, 100, 800),
                    process(301, 300, 300, 100, 800),
                    process(650, 1, 300, 100, 1100),
                ],
                &[],
            ),
            (
                "a new leader with an older member",
                vec![
                    process(610, 1, 610, 100, 1100),
                    process(400, 7, 610, 100, 900),
                ],
                &[],
            ),
            (
                "not a child of the reaper",
                vec![process(620, 7, 620, 100, 1100)],
                &[],
            ),
            (
                "another session",
                vec![process(630, 1, 630, 200, 1100)],
                &[],
            ),
            ("jolt's own group", vec![process(50, 1, 50, 100, 1100)], &[]),
        ];
        for (case, processes, groups) in table {
            assert_eq!(
                orphaned_groups(processes, jolt, since, end),
                *groups,
                "{case}"
            );
        }
        // Without process ids a start in the announcement's tick counts as after it.
        let since = Moment {
            last_pid: None,
            ..since
        };
        let older = [process(499, 1, 499, 100, 1000)];
        assert_eq!(orphaned_groups(&older, jolt, since, end), [499]);
    }
}
