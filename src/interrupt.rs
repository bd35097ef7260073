//! Signals. A client: the first SIGINT or SIGTERM sets a flag that running work polls
//! (commands are killed, the cache stays consistent, exit 130); a second one exits at
//! once. A worker: SIGTERM asks it to drain (finish the running task, take no more,
//! exit); SIGINT interrupts like a client. A reader of jolt's output that went away
//! (`EPIPE`) interrupts too ([`output_closed`]; exit 141).

use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static DRAIN: OnceLock<Arc<AtomicBool>> = OnceLock::new();
/// The read end of the socket pair an interrupt writes a byte to (never read).
static WAKE: OnceLock<UnixStream> = OnceLock::new();
/// Its write end.
static WAKE_WRITE: OnceLock<RawFd> = OnceLock::new();
/// Set when the reader of jolt's output went away.
static CLOSED: AtomicBool = AtomicBool::new(false);

fn flag(cell: &'static OnceLock<Arc<AtomicBool>>) -> &'static Arc<AtomicBool> {
    cell.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

fn register(signal: i32, target: &Arc<AtomicBool>) {
    // A second signal while the flag is set exits right away.
    let _ = signal_hook::flag::register_conditional_shutdown(signal, 130, target.clone());
    let _ = signal_hook::flag::register(signal, target.clone());
}

/// Makes the interrupt signals also wake whoever polls [`wake_fd`].
fn register_wake(signals: &[i32]) {
    if WAKE.get().is_some() {
        return;
    }
    let Ok((read, write)) = UnixStream::pair() else {
        return;
    };
    // The write end lives as long as the process: the handlers write to it.
    let write = write.into_raw_fd();
    for &signal in signals {
        let _ = signal_hook::low_level::pipe::register_raw(signal, write);
    }
    let _ = WAKE.set(read);
    let _ = WAKE_WRITE.set(write);
}

/// Ignores SIGTTIN and SIGTTOU, in jolt and (the disposition is inherited through
/// `exec`) in the commands it runs. Commands run in process groups of their own, in
/// the background of jolt's terminal: a command that reads the terminal (a password
/// prompt) or changes its settings was stopped by the kernel, and the build hung
/// without a word. Now such a read fails (`EIO`) and the command fails or goes on.
pub fn ignore_terminal_stops() {
    // SAFETY: setting the disposition of two signals to SIG_IGN has no other effect.
    unsafe {
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
    }
}

/// Installs the client's handlers.
pub fn install() {
    let signals = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];
    for signal in signals {
        register(signal, flag(&FLAG));
    }
    register_wake(&signals);
}

/// Installs the worker's handlers.
pub fn install_worker() {
    register(signal_hook::consts::SIGINT, flag(&FLAG));
    register(signal_hook::consts::SIGTERM, flag(&DRAIN));
    register_wake(&[signal_hook::consts::SIGINT]);
}

/// A descriptor that becomes readable, and stays so, once an interrupt arrived:
/// blocking waits poll it beside what they wait for. `None` before [`install`].
pub fn wake_fd() -> Option<BorrowedFd<'static>> {
    WAKE.get().map(|s| s.as_fd())
}

/// The reader of jolt's output went away (a write failed with `EPIPE`: `jolt build |
/// head -1` once `head` is done): what runs stops as after a Ctrl-C, quietly, and jolt
/// exits 141, as a shell reports a command that SIGPIPE ended.
pub fn output_closed() {
    CLOSED.store(true, Ordering::Relaxed);
    flag(&FLAG).store(true, Ordering::Relaxed);
    if let Some(&fd) = WAKE_WRITE.get() {
        // SAFETY: one byte from a static buffer to a socket this process keeps open;
        // it never blocks, and a full socket is readable already.
        unsafe {
            libc::send(
                fd,
                b"p".as_ptr().cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }
}

/// Whether the reader of jolt's output went away ([`output_closed`]).
pub fn output_was_closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Whether an interrupt was received.
pub fn is_set() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// Whether a worker was asked to finish its task and stop.
pub fn draining() -> bool {
    DRAIN.get().is_some_and(|f| f.load(Ordering::Relaxed))
}
