//! One command's process from its start to its end, supervised on the calling
//! thread: its output is read and its end awaited together by one `poll(2)` over its
//! two pipes, a descriptor that becomes readable when it ends (a pidfd; where the
//! kernel has none, a pipe closed by a thread that blocks in `waitid`), and the
//! interrupt pipe ([`crate::interrupt::wake_fd`]). No thread per stream and no sleep
//! loop: a command's end is noticed as it happens, and a deadline or a Ctrl-C kills
//! its process group from the same loop (SIGTERM, then SIGKILL after [`KILL_GRACE`]).
//!
//! The leader is never reaped here (`WNOWAIT`): a zombie keeps its pid, so the
//! number of its process group is not reused before the group is killed (see
//! `job::Groups`).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Child;
use std::time::{Duration, Instant};

/// Grace period between SIGTERM and SIGKILL when a command's process group is killed.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// How long output is still read after a command ended: a process it left running
/// and that holds its pipes open must not hold up the build.
pub const DRAIN: Duration = Duration::from_secs(2);

/// The longest line of task output passed on as one: longer ones arrive in pieces,
/// so memory stays bounded whatever a command prints.
pub const MAX_LINE: usize = 64 * 1024;

/// How often the end of a command is checked where no descriptor can tell it.
const FALLBACK_POLL: Duration = Duration::from_millis(10);

/// The leaders of the commands that run or wait to be reaped (see `job::Groups`).
/// Commands are spawned and recorded under its lock, so that [`reap_orphans`]
/// never takes one of them for an orphan.
static LEADERS: std::sync::Mutex<std::collections::BTreeSet<i32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Whether [`reap_orphans`] runs in this process (it is PID 1).
static REAPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The recorded leaders, locked.
pub fn leaders() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<i32>> {
    LEADERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a command with `spawn` and records its leader. Where orphans are reaped,
/// both happen under the leaders' lock, so that the reaper never takes a command
/// that ended at once for an orphan; elsewhere commands start without it (spawns
/// from several threads would wait for each other).
pub fn spawn_recorded<E>(spawn: impl FnOnce() -> Result<Child, E>) -> Result<Child, E> {
    if REAPING.load(std::sync::atomic::Ordering::Relaxed) {
        let mut leaders = leaders();
        let child = spawn()?;
        leaders.insert(child.id() as i32);
        return Ok(child);
    }
    let child = spawn()?;
    leaders().insert(child.id() as i32);
    Ok(child)
}

/// Reaps the zombies that are this process's children only because it is their
/// reaper (jolt as PID 1 in a container: what commands leave behind is handed to
/// it): zombie children outside jolt's own process group (where the processes jolt
/// waits for itself, git say, run) that lead no recorded command.
pub fn reap_orphans() {
    let leaders = leaders();
    // SAFETY: getpgrp only reads this process's group.
    let own = unsafe { libc::getpgrp() };
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let Some(stat) = super::guardian::ProcStat::parse(&stat) else {
                continue;
            };
            if stat.state == 'Z' && stat.pgrp != own && !leaders.contains(&pid) {
                // SAFETY: reaps a dead child of ours that nothing else waits for.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
        }
    }
}

/// Starts a thread that reaps orphans each second, when this process is PID 1.
pub fn reap_orphans_if_init() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        return;
    }
    REAPING.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = std::thread::Builder::new()
        .name("jolt-reaper".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            reap_orphans();
        });
}

/// Marks every descriptor from 3 up that this process inherited close-on-exec, so
/// that commands get only 0, 1 and 2: a descriptor the caller of jolt left open
/// (a pipe it waits on, say) was inherited by every command, and whatever a command
/// left running (a daemon, started with `setsid`) held it open after jolt ended. In
/// jolt itself they stay open; processes it forks without exec (the guardian) keep
/// them too. Call it first thing in `main`, before any thread: what jolt opens
/// itself is close-on-exec already (Rust's standard library opens everything so).
///
/// `close_range` with `CLOSE_RANGE_CLOEXEC` (Linux 5.11), called by its number so
/// that the musl build has it too (`posix_spawn_file_actions_addclosefrom_np` is
/// glibc's alone); on older kernels, each descriptor listed in `/proc/self/fd`.
pub fn close_inherited_on_exec() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors;
    // none is closed.
    let set = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if set != 0 {
        close_listed_on_exec();
    }
}

/// [`close_inherited_on_exec`] without `close_range`: each descriptor from 3 up
/// that `/proc/self/fd` lists.
fn close_listed_on_exec() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's close-on-exec
        // flag (the directory's own descriptor, closed by now, gives EBADF).
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// As a user reads it: `exit code 1`, `killed by signal 9`.
impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit code {code}"),
            Exit::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// Why a command was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Killed {
    TimedOut,
    Interrupted,
}

/// What the supervision of a command saw.
pub struct Ended {
    /// How the leader ended (`None`: it could not be told).
    pub exit: Option<Exit>,
    pub killed: Option<Killed>,
    /// Output streams still open [`DRAIN`] after the end: a process the command
    /// left running holds them. See [`Stream::forward_detached`].
    pub open: Vec<Stream>,
}

/// Where a command's output goes: its bytes as they come (the build log), and its
/// lines (`is_err` for stderr).
pub trait Sink {
    fn bytes(&mut self, bytes: &[u8]);
    fn line(&mut self, line: String, is_err: bool);
}

/// One output pipe of a command and the line it has begun.
pub struct Stream {
    file: File,
    is_err: bool,
    line: Lines,
}

impl Stream {
    fn new(fd: Option<OwnedFd>, is_err: bool) -> Option<Stream> {
        fd.map(|fd| Stream {
            file: File::from(fd),
            is_err,
            line: Lines::default(),
        })
    }

    /// Reads what is there (one read: the caller polled); false at end of file.
    fn read(&mut self, buf: &mut [u8], sink: &mut dyn Sink) -> bool {
        loop {
            match self.file.read(buf) {
                Ok(0) => {
                    self.finish(sink);
                    return false;
                }
                Ok(n) => {
                    sink.bytes(&buf[..n]);
                    let is_err = self.is_err;
                    self.line.feed(&buf[..n], &mut |l| sink.line(l, is_err));
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    self.finish(sink);
                    return false;
                }
            }
        }
    }

    fn finish(&mut self, sink: &mut dyn Sink) {
        let is_err = self.is_err;
        self.line.finish(&mut |l| sink.line(l, is_err));
    }

    /// Forwards the rest of this stream to `sink` on a thread of its own, until the
    /// processes holding it close it.
    pub fn forward_detached(mut self, mut sink: impl Sink + Send + 'static) {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_LINE];
            while self.read(&mut buf, &mut sink) {}
        });
    }
}

/// Splits a byte stream into lines, a line longer than [`MAX_LINE`] into pieces
/// (cut between characters, not inside one).
#[derive(Default)]
pub struct Lines {
    line: Vec<u8>,
    /// The last piece was cut for its length: a newline right after it ends that
    /// line, not another (empty) one.
    cut: bool,
}

impl Lines {
    /// Takes the next bytes; `emit` gets every line they complete, without its end.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut dyn FnMut(String)) {
        while !data.is_empty() {
            if std::mem::take(&mut self.cut) && self.line.is_empty() && data[0] == b'\n' {
                data = &data[1..];
                continue;
            }
            let room = MAX_LINE - self.line.len();
            let take = &data[..data.len().min(room)];
            let (used, ended) = match take.iter().position(|&b| b == b'\n') {
                Some(pos) => (pos + 1, true),
                None => (take.len(), self.line.len() + take.len() >= MAX_LINE),
            };
            self.line.extend_from_slice(&take[..used]);
            data = &data[used..];
            if !ended {
                continue;
            }
            if self.line.last() == Some(&b'\n') {
                emit(text_of(&self.line));
                self.line.clear();
                continue;
            }
            // Cut for its length: keep a character split at the end for the next piece.
            let keep = match std::str::from_utf8(&self.line) {
                Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => e.valid_up_to(),
                _ => self.line.len(),
            };
            let rest = self.line.split_off(keep);
            emit(text_of(&self.line));
            self.line = rest;
            self.cut = true;
        }
    }

    /// Passes on the unfinished last line, if any.
    pub fn finish(&mut self, emit: &mut dyn FnMut(String)) {
        if !self.line.is_empty() {
            emit(text_of(&self.line));
            self.line.clear();
        }
    }
}

fn text_of(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .trim_end_matches(['\n', '\r'])
        .to_string()
}

/// Reads `child`'s output into `sink` and waits for it to end, killing its process
/// group (the child leads it) past `deadline` or, when `interruptible`, on Ctrl-C.
/// Returns once the child has ended and its pipes are closed, or [`DRAIN`] after its
/// end. The child is not reaped.
pub fn supervise(
    child: &mut Child,
    deadline: Option<Instant>,
    interruptible: bool,
    sink: &mut dyn Sink,
) -> Ended {
    let pid = child.id() as i32;
    let mut streams: Vec<Stream> = [
        Stream::new(child.stdout.take().map(OwnedFd::from), false),
        Stream::new(child.stderr.take().map(OwnedFd::from), true),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut open = vec![true; streams.len()];
    let exit_fd = exit_notifier(pid);
    let wake = if interruptible {
        crate::interrupt::wake_fd()
    } else {
        None
    };
    let mut buf = vec![0u8; MAX_LINE];
    let mut exit: Option<(Instant, Option<Exit>)> = None;
    let mut killed: Option<(Instant, Killed)> = None;
    let mut hard_killed = false;
    loop {
        let now = Instant::now();
        if killed.is_none() && exit.is_none() && deadline.is_some_and(|d| now >= d) {
            kill_group(pid, libc::SIGTERM);
            killed = Some((now, Killed::TimedOut));
        }
        if let Some((when, _)) = killed {
            if !hard_killed && exit.is_none() && now >= when + KILL_GRACE {
                kill_group(pid, libc::SIGKILL);
                hard_killed = true;
            }
        }
        if let Some((when, _)) = exit {
            if !open.contains(&true) || now >= when + DRAIN {
                break;
            }
        }
        // What to wait for, and until when.
        let until = match (exit, killed) {
            (Some((when, _)), _) => Some(when + DRAIN),
            (None, Some((when, _))) if !hard_killed => Some(when + KILL_GRACE),
            (None, Some(_)) => None,
            (None, None) => deadline,
        };
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let mut roles: Vec<Role> = Vec::with_capacity(4);
        for (k, s) in streams.iter().enumerate() {
            if open[k] {
                fds.push(pollfd(s.file.as_raw_fd()));
                roles.push(Role::Stream(k));
            }
        }
        let mut timeout = until.map(|u| u.saturating_duration_since(now));
        if exit.is_none() {
            match &exit_fd {
                Some(fd) => {
                    fds.push(pollfd(fd.as_raw_fd()));
                    roles.push(Role::Exit);
                }
                None => timeout = Some(timeout.map_or(FALLBACK_POLL, |t| t.min(FALLBACK_POLL))),
            }
        }
        // Also while output drains after the end: Ctrl-C must not wait for it.
        if let (Some(fd), None) = (wake, killed) {
            fds.push(pollfd(fd.as_raw_fd()));
            roles.push(Role::Interrupt);
        }
        let ms = timeout.map_or(-1, |t| {
            // Rounded up, so that a deadline is not polled for again and again.
            t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
        });
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                // Cannot poll (out of memory): fall back to a short sleep.
                crate::console::debug(&format!("poll: {e}"));
                std::thread::sleep(FALLBACK_POLL);
            }
        }
        let mut check_exit = exit.is_none() && exit_fd.is_none();
        let mut give_up = false;
        for (fd, role) in fds.iter().zip(&roles) {
            if fd.revents == 0 {
                continue;
            }
            match *role {
                Role::Stream(k) => open[k] = streams[k].read(&mut buf, sink),
                Role::Exit => check_exit = true,
                Role::Interrupt => {
                    kill_group(pid, libc::SIGTERM);
                    killed = Some((Instant::now(), Killed::Interrupted));
                    // Ended already: what is left of its output can go.
                    give_up = exit.is_some();
                }
            }
        }
        if give_up {
            break;
        }
        if check_exit {
            match exited(pid) {
                Ok(Some(e)) => exit = Some((Instant::now(), Some(e))),
                Ok(None) => {}
                Err(_) => exit = Some((Instant::now(), None)),
            }
        }
    }
    let mut left = Vec::new();
    for (s, is_open) in streams.into_iter().zip(open) {
        if is_open {
            left.push(s);
        }
    }
    Ended {
        exit: exit.and_then(|(_, e)| e),
        killed: killed.map(|(_, why)| why),
        open: left,
    }
}

#[derive(Clone, Copy)]
enum Role {
    Stream(usize),
    Exit,
    Interrupt,
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// A descriptor that becomes readable when the child `pid` ends: its pidfd (Linux
/// 5.3), or the read end of a pipe a thread closes once `waitid` saw it end.
/// `None` when neither can be had: the caller checks now and then.
fn exit_notifier(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        return Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let (reader, writer) = std::io::pipe().ok()?;
    let spawned = std::thread::Builder::new()
        .name("jolt-wait".into())
        .spawn(move || {
            let _ = wait_exited(pid);
            drop(writer);
        });
    spawned.ok().map(|_| OwnedFd::from(reader))
}

/// `waitid` on the child `pid` with `WEXITED | WNOWAIT | extra`: what it says, the
/// child left waitable (so that `Child::wait` reaps it later).
fn peek_exit(pid: i32, extra: i32) -> std::io::Result<libc::siginfo_t> {
    // SAFETY: waitid writes only into `info`, a zeroed siginfo_t we own.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | extra,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

/// Blocks until the child `pid` has ended, without reaping it.
fn wait_exited(pid: i32) -> std::io::Result<()> {
    loop {
        match peek_exit(pid, 0) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other.map(|_| ()),
        }
    }
}

/// How the child `pid` ended, if it has, without reaping it.
fn exited(pid: i32) -> std::io::Result<Option<Exit>> {
    let info = peek_exit(pid, libc::WNOHANG)?;
    // SAFETY: for SIGCHLD information (waitid), si_pid and si_status are the fields
    // the kernel filled in; si_pid is 0 while the child runs.
    let (child, status) = unsafe { (info.si_pid(), info.si_status()) };
    if child == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        Exit::Code(status)
    } else {
        Exit::Signal(status)
    }))
}

/// Sends `signal` to a command's process group.
pub fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: kill has no memory effects; a negative pid names the process group the
    // command was started in (its leader's pid), which only holds its processes.
    unsafe { libc::kill(-pgid, signal) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    #[derive(Default)]
    struct Collect {
        bytes: Vec<u8>,
        lines: Vec<(String, bool)>,
    }

    impl Sink for Collect {
        fn bytes(&mut self, bytes: &[u8]) {
            self.bytes.extend_from_slice(bytes);
        }
        fn line(&mut self, line: String, is_err: bool) {
            self.lines.push((line, is_err));
        }
    }

    fn spawn(script: &str) -> Child {
        Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn sh")
    }

    fn lines_of(chunks: &[&[u8]]) -> Vec<String> {
        let mut lines = Lines::default();
        let mut out = Vec::new();
        for c in chunks {
            lines.feed(c, &mut |l| out.push(l));
        }
        lines.finish(&mut |l| out.push(l));
        out
    }

    #[test]
    fn inherited_descriptors_become_close_on_exec_also_without_close_range() {
        let mut fds = [0; 2];
        // SAFETY: `fds` holds two descriptors; without O_CLOEXEC, as a caller's are.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both were just opened and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_GETFD reads a flag of a descriptor this test owns.
        let cloexec = |fd: &OwnedFd| unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC != 0;
        assert!(!cloexec(&read) && !cloexec(&write));
        close_listed_on_exec();
        assert!(cloexec(&read) && cloexec(&write));
    }

    #[test]
    fn lines_are_split_across_chunks_and_long_ones_cut() {
        assert_eq!(lines_of(&[b"a\r\nb", b"c\n", b"d"]), ["a", "bc", "d"]);
        assert_eq!(lines_of(&[b"", b"\n\n"]), ["", ""]);
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let out = lines_of(&[&long[..10], &long[10..], b"\n"]);
        let sizes: Vec<usize> = out.iter().map(String::len).collect();
        assert_eq!(sizes, [MAX_LINE, MAX_LINE, 5]);
        // A line of exactly the limit is one line, not one and an empty one.
        let exact = [vec![b'y'; MAX_LINE], b"\nnext\n".to_vec()].concat();
        let out = lines_of(&[&exact]);
        assert_eq!(
            out.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE, 4]
        );
        // A character is never cut in two.
        let euros = "€".repeat(MAX_LINE / 3 + 10);
        let out = lines_of(&[euros.as_bytes(), b"\n"]);
        assert_eq!(out.concat(), euros);
        assert!(out.iter().all(|l| !l.contains('\u{fffd}')));
    }

    #[test]
    fn output_of_both_streams_and_the_exit_code_are_seen() {
        let mut child = spawn("echo out; echo err >&2; printf tail; exit 3");
        let mut sink = Collect::default();
        let ended = supervise(&mut child, None, false, &mut sink);
        assert_eq!(ended.exit, Some(Exit::Code(3)));
        assert!(ended.killed.is_none() && ended.open.is_empty());
        assert!(sink.lines.contains(&("out".into(), false)));
        assert!(sink.lines.contains(&("err".into(), true)));
        assert!(sink.lines.contains(&("tail".into(), false)));
        assert_eq!(sink.bytes.len(), "out\nerr\ntail".len());
        let _ = child.wait();
    }

    #[test]
    fn a_deadline_kills_the_group() {
        let start = Instant::now();
        let mut child = spawn("sleep 30 & sleep 30");
        let mut sink = Collect::default();
        let ended = supervise(
            &mut child,
            Some(start + Duration::from_millis(200)),
            false,
            &mut sink,
        );
        assert_eq!(ended.killed, Some(Killed::TimedOut));
        assert_eq!(ended.exit, Some(Exit::Signal(libc::SIGTERM)));
        assert!(start.elapsed() < Duration::from_secs(5));
        let _ = child.wait();
    }

    #[test]
    fn a_process_left_holding_the_pipes_is_left_after_the_drain() {
        let start = Instant::now();
        let mut child = spawn("sleep 30 & echo started");
        let pid = child.id() as i32;
        let mut sink = Collect::default();
        let ended = supervise(&mut child, None, false, &mut sink);
        assert_eq!(ended.exit, Some(Exit::Code(0)));
        assert_eq!(ended.open.len(), 2);
        assert!(start.elapsed() >= DRAIN && start.elapsed() < DRAIN * 3);
        assert_eq!(sink.lines, [("started".to_string(), false)]);
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait();
    }

    #[test]
    fn the_end_is_noticed_by_a_waiting_thread_without_a_pidfd() {
        let child = spawn("exit 0");
        let pid = child.id() as i32;
        let (reader, writer) = std::io::pipe().expect("pipe");
        std::thread::spawn(move || {
            let _ = wait_exited(pid);
            drop(writer);
        });
        let mut reader = reader;
        let mut byte = [0u8; 1];
        assert_eq!(reader.read(&mut byte).expect("read"), 0);
        assert_eq!(exited(pid).expect("waitid"), Some(Exit::Code(0)));
        let mut child = child;
        let _ = child.wait();
    }
}
