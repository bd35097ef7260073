//! Signals. A client: the first SIGINT or SIGTERM sets a flag that running work polls
//! (commands are killed, the cache stays consistent, exit 130); a second one exits at
//! once. A worker: SIGTERM asks it to drain (finish the running task, take no more,
//! exit); SIGINT interrupts like a client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static DRAIN: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn flag(cell: &'static OnceLock<Arc<AtomicBool>>) -> &'static Arc<AtomicBool> {
    cell.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

fn register(signal: i32, target: &Arc<AtomicBool>) {
    // A second signal while the flag is set exits right away.
    let _ = signal_hook::flag::register_conditional_shutdown(signal, 130, target.clone());
    let _ = signal_hook::flag::register(signal, target.clone());
}

/// Installs the client's handlers.
pub fn install() {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        register(signal, flag(&FLAG));
    }
}

/// Installs the worker's handlers.
pub fn install_worker() {
    register(signal_hook::consts::SIGINT, flag(&FLAG));
    register(signal_hook::consts::SIGTERM, flag(&DRAIN));
}

/// Whether an interrupt was received.
pub fn is_set() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// Whether a worker was asked to finish its task and stop.
pub fn draining() -> bool {
    DRAIN.get().is_some_and(|f| f.load(Ordering::Relaxed))
}
