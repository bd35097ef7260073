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
//! Commands also get `PR_SET_PDEATHSIG`, which covers the instant between their
//! start and their registration, and a jolt whose guardian could not start.

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

fn send(line: String) {
    let mut pipe = PIPE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(file) = pipe.as_mut() {
        if file.write_all(line.as_bytes()).is_err() {
            // The guardian is gone: commands still have PR_SET_PDEATHSIG.
            *pipe = None;
        }
    }
}

/// Registers the process group of a command that just started.
pub fn watch(pgid: i32) {
    send(format!("+{pgid}\n"));
}

/// Unregisters a process group that is gone (its leader reaped, the rest killed).
pub fn release(pgid: i32) {
    send(format!("-{pgid}\n"));
}

/// The guardian's life: read registrations until jolt is gone, then kill what is left.
fn serve(read: RawFd, write: RawFd) -> ! {
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
    let mut reader = std::io::BufReader::new(pipe);
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::BufRead::read_line(&mut reader, &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let (sign, pgid) = line.trim().split_at(1.min(line.trim().len()));
                let Ok(pgid) = pgid.parse::<i32>() else {
                    continue;
                };
                if pgid <= 1 {
                    continue;
                }
                if sign == "+" {
                    groups.insert(pgid);
                } else {
                    groups.remove(&pgid);
                }
            }
        }
    }
    for pgid in groups {
        // SAFETY: signals a process group jolt started and registered.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    // SAFETY: ends this process without running the parent's atexit handlers.
    unsafe { libc::_exit(0) }
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
